"""The one image-file reader of the project (torch-free): ``frcnn infer``, the deployed eval, parity, the
polygraphy data loader and the trainer's ``read_image`` all read files through :func:`read_image`.

Result: a contiguous uint8 ``[H, W, 3]`` array in "RGB" or "BGR" order, EXIF orientation applied. For an
8-bit RGB file this is exactly ``np.asarray(ImageOps.exif_transpose(Image.open(f)).convert("RGB"))``, as
detectron2's ``read_image`` does. Pillow modes are handled deliberately (docs/runtime.md has the table):

- 8-bit colour and gray (``1 L P RGB RGBX YCbCr LAB HSV CMYK``): Pillow's ``convert("RGB")`` (CMYK by
  Pillow's plain formula, no ICC profile; gray replicated to 3 channels);
- with an alpha channel or palette transparency (``LA La PA RGBA RGBa``, ``P``/``L``/``RGB`` with a
  ``transparency`` entry): the alpha is **dropped** (the colour values as stored), as detectron2 does;
  nothing is composited, so training and deployment see the same pixels;
- 16-bit gray (``I;16 I;16L I;16B I;16N``, e.g. 16-bit PNG): scaled to 8 bits as ``round(v / 257)``
  (0 -> 0, 65535 -> 255), then replicated to 3 channels. (16-bit RGB PNGs are decoded by Pillow itself
  to 8-bit ``RGB`` keeping the high byte, ``v >> 8``.)
- 32-bit integer or float (``I``, ``F``) and anything else: refused, naming the mode (their value range has
  no standard 0..255 meaning);
- several frames (animated GIF / WebP / PNG, multi-page TIFF): refused, naming the frame count. Camera
  JPEGs in MPO form (a photo plus previews / depth maps, common from phones) are read as their first frame,
  the photo itself, which is what every JPEG viewer shows.

Size: the header is checked against :func:`frcnn.runtime.preprocess.max_image_side` (20000 px per side,
``FRCNN_MAX_IMAGE_SIDE`` raises it) **before** any pixel is decoded, so a huge file is refused without the
memory to hold it. Up to that limit every image is decoded in full: ``Image.draft`` / ``reduce`` are not
used because they change the pixels (JPEG DCT scaling) and the box coordinate frame, and results must stay
detectron2's exact ResizeShortestEdge on the full image. Pillow's own decompression-bomb limit (about
179 MP) is replaced by this explicit one.

Every failure is an :class:`ImageError` naming the file, the problem and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import struct
import threading
from collections.abc import Callable, Iterator
from typing import IO, TypeVar

import numpy as np
from frcnn.runtime.errors import UserError
from frcnn.runtime.preprocess import max_image_side, too_large_message
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageError", "ImageTooLargeError", "decode_image", "display", "probe_image", "read_image", "read_rgb"]

#: Modes converted with Pillow's ``convert("RGB")`` (alpha, where present, is dropped).
RGB_CONVERTIBLE = frozenset({"1", "L", "P", "RGB", "RGBX", "YCbCr", "LAB", "HSV", "CMYK",
                             "LA", "La", "PA", "RGBA", "RGBa"})  # fmt: skip
#: 16-bit gray modes, scaled by round(v / 257).
SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_FORMATS = ("BGR", "RGB")
_PILLOW_LIMIT_LOCK = threading.RLock()  # re-entrant: a retry holds it while opening again
T = TypeVar("T")


class ImageError(UserError):
    """An image file that cannot be used: missing, unreadable, corrupt, unsupported mode, too large."""


class ImageTooLargeError(ImageError):
    """An image with a side above :func:`frcnn.runtime.preprocess.max_image_side` (refused from its header)."""


def display(path: str) -> str:
    """``path`` printable as UTF-8 (undecodable bytes of a file name shown as ``\\xNN``) for messages."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@contextlib.contextmanager
def _without_pillow_bomb_limit() -> Iterator[None]:
    """Pillow's global decompression-bomb check off while this thread opens a file (our limit replaces it)."""
    with _PILLOW_LIMIT_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _os_error(file: str, exc: OSError) -> ImageError:
    path = display(file)
    if isinstance(exc, FileNotFoundError):
        return ImageError(f"image file {path} does not exist; check the path")
    if isinstance(exc, IsADirectoryError) or os.path.isdir(file):
        return ImageError(f"{path} is a folder, not an image file; pass the image files (or the folder, on "
                          "the command line)")  # fmt: skip
    if isinstance(exc, PermissionError) or exc.errno == errno.EACCES:
        return ImageError(f"cannot read image {path}: permission denied; fix its permissions (chmod u+r)")
    reason = exc.strerror or str(exc)
    return ImageError(f"cannot read image {path}: {reason}; replace the file or leave it out")


@contextlib.contextmanager
def _open(path: str, source: IO[bytes] | None = None) -> Iterator[Image.Image]:
    """The opened (header-only) image of file ``path`` (or of ``source``, named ``path`` in messages); every
    open failure as ImageError."""
    try:
        with _without_pillow_bomb_limit():
            image = Image.open(path if source is None else source)
    except UnidentifiedImageError:
        raise ImageError(f"cannot read image {display(path)}: not an image file Pillow knows (corrupt, or another "
                         "format); replace the file or leave it out") from None  # fmt: skip
    except OSError as exc:
        raise _os_error(path, exc) from None
    except (SyntaxError, ValueError) as exc:
        raise ImageError(f"cannot read image {display(path)}: corrupt header ({exc}); replace the file or leave it "
                         "out") from None  # fmt: skip
    with image:
        yield image


def _check_header(path: str, image: Image.Image) -> tuple[int, int]:
    w, h = image.size
    if w < 1 or h < 1:
        raise ImageError(f"image {display(path)} is empty ({w}x{h} pixels); replace the file or leave it out")
    limit = max_image_side()
    if max(w, h) > limit:
        raise ImageTooLargeError(too_large_message(f"image {display(path)}", h, w, limit))
    if image.mode not in RGB_CONVERTIBLE and image.mode not in SIXTEEN_BIT:
        kind = {"I": "32-bit integer", "F": "32-bit float"}.get(image.mode, "unsupported")
        raise ImageError(f"image {display(path)} has Pillow mode {image.mode!r} ({kind} pixels) with no standard "
                         "0..255 scale; convert it to 8-bit RGB or grayscale (or 16-bit grayscale) first")
    frames = getattr(image, "n_frames", 1)
    if frames > 1 and image.format != "MPO":  # MPO: a camera JPEG; frame 0 is the photo, the rest previews
        raise ImageError(f"image {display(path)} has {frames} frames (animated or multi-page); the detector "
                         "takes one picture: extract the frame you want into its own file")
    return w, h


@contextlib.contextmanager
def _errors_named(path: str) -> Iterator[None]:
    """Pillow's and the OS's exceptions while reading ``path`` -> ImageError naming the file and the fix."""
    try:
        yield
    except ImageError:
        raise
    except OSError as exc:
        if exc.errno is None:  # Pillow's decoder errors: truncated or broken data
            raise ImageError(f"cannot read image {display(path)}: {exc} (the file is truncated or corrupt); "
                             "replace the file or leave it out") from None  # fmt: skip
        raise _os_error(path, exc) from None
    except (SyntaxError, ValueError, EOFError, IndexError, KeyError, struct.error) as exc:  # broken EXIF / data
        raise ImageError(f"cannot read image {display(path)}: corrupt data ({exc}); replace the file or leave "
                         "it out") from None  # fmt: skip


def _beyond_pillow_limit(read: Callable[[], T]) -> T:
    """``read()``; again with Pillow's bomb check off if a later step (frames, decoding) trips it: our
    header limit has already been applied."""
    try:
        return read()
    except Image.DecompressionBombError:
        with _without_pillow_bomb_limit():
            return read()


def probe_image(path: str | os.PathLike[str], oriented: bool = False) -> tuple[int, int]:
    """``(width, height)`` after checking the header only (exists, readable, known format, supported mode,
    one frame, within the size limit); no pixels are decoded. With ``oriented`` the size is the one after the
    EXIF orientation (what :func:`read_image` returns), else the stored one.

    Raises:
        ImageError: naming the file and the problem.
    """
    name = os.fspath(path)

    def probe() -> tuple[int, int]:
        with _errors_named(name), _open(name) as image:
            w, h = _check_header(name, image)
            return (h, w) if oriented and _exif_orientation(image) in (5, 6, 7, 8) else (w, h)

    return _beyond_pillow_limit(probe)


def _exif_orientation(image: Image.Image) -> int:
    """EXIF orientation tag (1 when absent), read without decoding the pixels."""
    return int(image.getexif().get(0x0112, 1) or 1)


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in SIXTEEN_BIT:
        v = np.asarray(image).astype(np.uint32)
        gray = ((v * 2 + 257) // 514).astype(np.uint8)  # round(v / 257), halves up
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"))


def read_image(path: str | os.PathLike[str], image_format: str = "RGB") -> np.ndarray:
    """Read an image file -> contiguous uint8 ``[H, W, 3]`` in ``image_format`` ("RGB" or "BGR").

    EXIF orientation is applied; modes are converted as the module docstring says.

    Raises:
        ImageError: missing / unreadable / corrupt / truncated file, unsupported mode, several frames, a side
            above the size limit.
    """
    return _read(os.fspath(path), None, image_format)


def decode_image(data: bytes, image_format: str = "RGB", name: str = "<bytes>") -> np.ndarray:
    """:func:`read_image` of an encoded image held in memory (JPEG, PNG, ... bytes, e.g. a server request);
    ``name`` stands for it in messages. Same modes, EXIF handling, size limit and errors."""
    if len(data) == 0:
        raise ImageError(f"image {name} is empty (0 bytes); send or pass the bytes of an encoded JPEG / PNG file")
    return _read(name, io.BytesIO(data), image_format)


def _read(name: str, source: IO[bytes] | None, image_format: str) -> np.ndarray:
    if image_format not in _FORMATS:
        raise UserError(f"image format {image_format!r} is not supported; use 'BGR' (detectron2's default) or "
                        "'RGB'")  # fmt: skip

    def read() -> np.ndarray:
        if source is not None:
            source.seek(0)
        with _errors_named(name), _open(name, source) as image:
            _check_header(name, image)
            return _to_rgb(ImageOps.exif_transpose(image))

    rgb = _beyond_pillow_limit(read)
    if image_format == "BGR":
        rgb = rgb[:, :, ::-1]
    return np.ascontiguousarray(rgb)


def read_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """``read_image(path, "RGB")``: what ``frcnn infer`` and the runtime's file helpers feed the Detector."""
    return read_image(path, "RGB")
