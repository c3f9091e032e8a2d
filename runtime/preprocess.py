"""Test-time pre-processing shared by the PyTorch Predictor and the runtime (numpy + Pillow, never torch).

Reproduces detectron2's inference input pipeline exactly:

1. the user's image (uint8, HWC) is checked and brought to BGR (``validate_image``);
2. ``ResizeShortestEdge(short_edge, max_size)`` picks the new size (``resize_shortest_edge_size``) and
   ``ResizeTransform`` resizes the uint8 image with Pillow bilinear (``resize_image``);
3. the images are stacked into one zero-padded uint8 batch ``[B, 3, H, W]`` with ``H, W`` multiples of
   ``size_divisibility`` (``batch_images``). The model normalizes and zeroes the padded area itself.

Documented conversions (everything else is a ``UserError`` naming the problem and the fix):
- a 2-D grayscale image ``[H, W]`` or ``[H, W, 1]`` is replicated to 3 channels (as detectron2's
  ``read_image`` does for "L" images read as BGR);
- a non-contiguous array (a slice, ``img[:, :, ::-1]``) is copied to a contiguous one;
- ``input_format="RGB"`` flips the channels to the model's order.
Float images are refused (whether or not they hold NaN): the model was trained on uint8 pixels, and a silent
rounding or rescaling rule would hide mistakes such as passing 0..1 floats.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from frcnn.runtime.errors import UserError
from PIL import Image

#: Largest accepted image side in pixels (arrays and image files); beyond it the image is refused (a
#: 20000x20000 BGR image is 1.2 GB). The environment variable ``FRCNN_MAX_IMAGE_SIDE`` raises or lowers it.
MAX_IMAGE_SIDE = 20000
MAX_IMAGE_SIDE_ENV = "FRCNN_MAX_IMAGE_SIDE"
_FORMATS = ("BGR", "RGB")


def max_image_side() -> int:
    """``MAX_IMAGE_SIDE``, or the positive integer in ``$FRCNN_MAX_IMAGE_SIDE`` when that is set."""
    value = os.environ.get(MAX_IMAGE_SIDE_ENV, "").strip()
    if not value:
        return MAX_IMAGE_SIDE
    try:
        side = int(value)
    except ValueError:
        side = 0
    if side < 1:
        raise UserError(f"{MAX_IMAGE_SIDE_ENV}={value!r} is not a positive whole number of pixels; "
                        f"unset it (default {MAX_IMAGE_SIDE}) or set e.g. {MAX_IMAGE_SIDE_ENV}=40000")
    return side


def too_large_message(what: str, h: int, w: int, limit: int) -> str:
    """The refusal for an image with a side above ``limit`` (arrays and files share it)."""
    return (f"{what} is {w}x{h} pixels (WxH), larger than the supported {limit} pixels per side; downscale it "
            f"first (the detector resizes to about 800x1333 anyway), or raise the limit with the environment "
            f"variable {MAX_IMAGE_SIDE_ENV}=N (decoding needs about 3*W*H bytes of memory)")


def resize_shortest_edge_size(h: int, w: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """Output ``(newh, neww)`` of detectron2's ``ResizeShortestEdge.get_output_shape``, same float arithmetic.

    The short side becomes ``short_edge``; if the long side then exceeds ``max_size`` both sides are scaled
    down so that it equals ``max_size``; each side rounds half up. ``short_edge == 0`` means no resize.
    """
    if short_edge == 0:
        return int(h), int(w)
    size = short_edge * 1.0
    scale = size / min(h, w)
    if h < w:
        newh, neww = size, scale * w
    else:
        newh, neww = scale * h, size
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh = newh * scale
        neww = neww * scale
    return int(newh + 0.5), int(neww + 0.5)


def resize_image(img: np.ndarray, newh: int, neww: int) -> np.ndarray:
    """Resize ``img`` uint8 ``[H, W, 3]`` to uint8 ``[newh, neww, 3]`` with Pillow bilinear.

    Same call as detectron2's ``ResizeTransform.apply_image`` for uint8 images
    (``Image.fromarray(img).resize((neww, newh), Image.BILINEAR)``). Pillow returns an unchanged copy for a
    same-size resize, so that case returns ``img`` itself.
    """
    if newh < 1 or neww < 1:
        raise UserError(
            f"image of size {img.shape[0]}x{img.shape[1]} (HxW) would be resized to {newh}x{neww}: its aspect "
            "ratio is too extreme for the resize rule; crop or pad the image to a less elongated shape"
        )
    if img.shape[0] == newh and img.shape[1] == neww:
        return img
    resized = Image.fromarray(img).resize((neww, newh), Image.Resampling.BILINEAR)
    return np.asarray(resized)


def _check_array(img: Any) -> np.ndarray:
    if not isinstance(img, np.ndarray):
        kind = f"{type(img).__module__}.{type(img).__qualname__}"
        raise UserError(
            f"image must be a numpy array of shape (H, W, 3) and dtype uint8, got a {kind}; "
            "convert it with np.asarray(...) (PIL images and tensors: np.asarray(pil) / tensor.cpu().numpy())"
        )
    if img.dtype != np.uint8:
        if img.dtype.kind == "f":
            nan = " and contains NaN" if bool(np.isnan(img).any()) else ""
            raise UserError(
                f"image has dtype {img.dtype}{nan}; the detector takes uint8 pixels 0..255. Convert with "
                "np.clip(np.nan_to_num(img), 0, 255).astype(np.uint8) (multiply by 255 first if your "
                "floats are in 0..1)"
            )
        raise UserError(
            f"image has dtype {img.dtype}; the detector takes uint8 pixels 0..255. Convert with "
            "np.clip(img, 0, 255).astype(np.uint8) (rescale first if it is 16-bit)"
        )
    return img


def _check_shape(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3:
        hint = "; for a batch array [B, H, W, 3] pass list(batch)" if img.ndim == 4 else ""
        raise UserError(f"image must have shape (H, W, 3) (or (H, W) grayscale), got shape {img.shape}{hint}")
    h, w, c = img.shape
    if c not in (1, 3):
        hint = ""
        if c == 4:
            hint = "; drop the alpha channel with img[:, :, :3]"
        elif img.shape[0] in (1, 3):
            hint = "; it looks channels-first (C, H, W): use img.transpose(1, 2, 0)"
        raise UserError(f"image must have 3 channels (H, W, 3), got shape {img.shape} ({c} channels){hint}")
    if h == 0 or w == 0:
        raise UserError(f"image is empty: shape {img.shape}; pass an image with at least 1x1 pixels")
    limit = max_image_side()
    if max(h, w) > limit:
        raise UserError(too_large_message(f"image of shape {img.shape}", h, w, limit))
    if c == 1:
        img = np.repeat(img, 3, axis=2)
    return img


def validate_image(img: Any, input_format: str = "BGR", model_format: str = "BGR") -> np.ndarray:
    """Check one user image and return it as a contiguous uint8 ``[H, W, 3]`` array in ``model_format`` order.

    Args:
        img: uint8 ``[H, W, 3]`` (or grayscale ``[H, W]`` / ``[H, W, 1]``, replicated to 3 channels).
        input_format: channel order of ``img``, "BGR" (OpenCV) or "RGB" (Pillow).
        model_format: channel order the model expects (detectron2 ``INPUT.FORMAT``; "BGR" for R-50 models).
    Raises:
        UserError: wrong type or dtype (float, with or without NaN), wrong rank or channel count, empty image,
            a side above ``max_image_side()``, or an unknown format name.
    """
    for name, fmt in (("input_format", input_format), ("model_format", model_format)):
        if fmt not in _FORMATS:
            raise UserError(f"{name} must be one of {_FORMATS}, got {fmt!r}")
    img = _check_shape(_check_array(img))
    if input_format != model_format:
        img = img[:, :, ::-1]
    return np.ascontiguousarray(img)


def batch_images(images: Sequence[np.ndarray], size_divisibility: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Stack resized images into one zero-padded batch.

    Args:
        images: B uint8 arrays ``[H_i, W_i, 3]``.
        size_divisibility: the padded ``H, W`` are the batch maxima rounded up to a multiple of this.
    Returns:
        images uint8 ``[B, 3, H, W]`` (image i in ``[:, :H_i, :W_i]``, zeros elsewhere),
        image_sizes int32 ``[B, 2]`` (``H_i, W_i``).
    """
    if len(images) == 0:
        raise UserError("no images given: pass at least one image")
    sizes = np.array([img.shape[:2] for img in images], dtype=np.int32).reshape(len(images), 2)
    max_hw = sizes.max(axis=0).astype(np.int64)
    if size_divisibility > 1:
        max_hw = (max_hw + size_divisibility - 1) // size_divisibility * size_divisibility
    batch = np.zeros((len(images), 3, int(max_hw[0]), int(max_hw[1])), dtype=np.uint8)
    for i, img in enumerate(images):
        h, w = img.shape[:2]
        batch[i, :, :h, :w] = img.transpose(2, 0, 1)
    return batch, sizes


class Preprocessor:
    """validate + ResizeShortestEdge + batch, as detectron2's test-time input pipeline.

    ``Preprocessor(...)(images)`` takes a list of uint8 HWC images and returns a dict of numpy arrays:
    ``images`` uint8 ``[B, 3, H, W]``, ``image_sizes`` int32 ``[B, 2]`` (resized h, w),
    ``original_sizes`` int32 ``[B, 2]`` (input h, w).
    """

    def __init__(
        self,
        short_edge: int = 800,
        max_size: int = 1333,
        input_format: str = "BGR",
        model_format: str = "BGR",
        size_divisibility: int = 32,
    ) -> None:
        self.short_edge = int(short_edge)
        self.max_size = int(max_size)
        self.input_format = input_format
        self.model_format = model_format
        self.size_divisibility = int(size_divisibility)
        validate_image(np.zeros((1, 1, 3), np.uint8), input_format, model_format)  # checks the format names

    def preprocess_one(self, img: Any) -> np.ndarray:
        """One user image -> validated, resized uint8 ``[h, w, 3]`` in the model's channel order."""
        img = validate_image(img, self.input_format, self.model_format)
        newh, neww = resize_shortest_edge_size(img.shape[0], img.shape[1], self.short_edge, self.max_size)
        return resize_image(img, newh, neww)

    def __call__(self, images: Sequence[Any], first_index: int = 0, total: int | None = None) -> dict[str, np.ndarray]:
        """Pre-process a list of images; a bad one is reported with its 0-based position ``first_index + i``
        in the caller's list of ``total`` (default: this list) images."""
        if isinstance(images, np.ndarray):
            raise UserError("Preprocessor takes a list of images; wrap a single image as [image]")
        total = len(images) if total is None else total
        originals = []
        resized = []
        for i, img in enumerate(images):
            try:
                out = self.preprocess_one(img)
            except UserError as exc:
                if total == 1:
                    raise
                raise type(exc)(f"image {first_index + i} (0-based position in the list of {total}): {exc}") from None
            originals.append(np.shape(img)[:2])
            resized.append(out)
        batch, image_sizes = batch_images(resized, self.size_divisibility)
        return {
            "images": batch,
            "image_sizes": image_sizes,
            "original_sizes": np.array(originals, dtype=np.int32).reshape(-1, 2),
        }
