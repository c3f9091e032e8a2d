"""What a served request may hold, and how requests are batched: numpy + Pillow only (no torch, no Triton).

Shared by ``frcnn serve`` (PyTriton) and the python-backend model of ``frcnn triton-repo``. Every check raises
``RequestError`` with a message meant for the client that sent the request; the other requests of the same
batch are unaffected.

Requests are batched only with requests of the same padded image shape: detectron2's batch pads every image
to the largest one, which changes what the RPN sees, so mixing shapes would make a served result depend on
its neighbours. Same-shape requests give the in-process Detector's result (within the parity tolerances).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from frcnn.runtime import image_io
from frcnn.runtime.backends.base import INPUTS
from frcnn.runtime.contract import MIN_PADDED_SIDE
from frcnn.runtime.errors import UserError
from frcnn.runtime.preprocess import MAX_IMAGE_SIDE


class RequestError(UserError):
    """One request is malformed; the message goes back to its client."""


def decode_image(data: bytes) -> np.ndarray:
    """Encoded JPEG / PNG (any format Pillow reads) -> RGB uint8 [H, W, 3]; RequestError when it is not one.

    Decoded by the runtime's one image reader (:func:`frcnn.runtime.image_io.decode_image`: the same modes,
    EXIF handling and size limit as image files); the size is checked from the header before any pixel is
    decoded (a huge image costs nothing).
    """
    if len(data) == 0:
        raise RequestError("the image is empty (0 bytes): send the encoded JPEG or PNG file's bytes")
    try:
        return image_io.decode_image(data, "RGB", name=f"of {len(data)} bytes")
    except image_io.ImageTooLargeError as exc:
        raise RequestError(f"the image sent exceeds the supported size per side ({exc}); downscale it before "
                           "sending") from None
    except image_io.ImageError as exc:
        raise RequestError(f"the {len(data)} bytes sent are not a readable image ({exc}): send the bytes of a "
                           "JPEG or PNG file") from None


def pad_axis1(arr: np.ndarray) -> np.ndarray:
    """``arr`` with axis 1 padded to length >= 1: Triton cannot ship zero-size arrays (the count output says how
    many rows are valid). Shared by the PyTriton server and the stock-Triton python model."""
    if arr.shape[1] > 0:
        return arr
    return np.zeros((arr.shape[0], 1, *arr.shape[2:]), dtype=arr.dtype)


def check_feed(images: np.ndarray, sizes: np.ndarray, divisibility: int) -> None:
    """RequestError unless (images uint8 [B, 3, H, W], image_sizes int32 [B, 2]) is a pre-processed batch.

    H and W must be multiples of ``divisibility`` and >= ``MIN_PADDED_SIDE`` (what ``Detector.preprocess``
    produces), each size within 1..(H, W).
    """
    if images.dtype != INPUTS["images"] or sizes.dtype != INPUTS["image_sizes"]:
        raise RequestError(f"images must be uint8 and image_sizes int32, got {images.dtype} and {sizes.dtype}")
    if images.ndim != 4 or images.shape[1] != 3 or sizes.shape != (images.shape[0], 2):
        raise RequestError(f"images must be [B, 3, H, W] and image_sizes [B, 2], got {list(images.shape)} and "
                           f"{list(sizes.shape)}; pre-process with frcnn.runtime.Detector.preprocess")
    h, w = images.shape[2:]
    if h % divisibility or w % divisibility or min(h, w) < MIN_PADDED_SIDE or max(h, w) > MAX_IMAGE_SIDE:
        raise RequestError(f"padded image size {h}x{w} must be multiples of {divisibility}, at least "
                           f"{MIN_PADDED_SIDE} and at most {MAX_IMAGE_SIDE}; pre-process with "
                           "frcnn.runtime.Detector.preprocess")
    if (sizes < 1).any() or (sizes[:, 0] > h).any() or (sizes[:, 1] > w).any():
        raise RequestError(f"image_sizes {sizes.tolist()} must lie within 1..{h} x 1..{w} (the valid region of "
                           "each padded image)")


Feed = dict[str, np.ndarray]


def run_grouped(infer: Callable[[Feed], Feed], feeds: Sequence[Feed | None]) -> list[Feed | str | None]:
    """Run ``infer`` once per padded shape over ``feeds`` (None entries are skipped) and split the outputs.

    Args:
        infer: a backend's ``infer`` (outputs with a leading batch axis).
        feeds: per request {images [b, 3, H, W], image_sizes [b, 2]}.
    Returns:
        per request the outputs of its own rows; None where the feed was None; the message of the UserError
        where its group failed (the other groups still run).
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, feed in enumerate(feeds):
        if feed is not None:
            groups.setdefault(feed["images"].shape[1:], []).append(i)
    results: list[Feed | str | None] = [None] * len(feeds)
    for members in groups.values():
        batch = {name: np.concatenate([feeds[i][name] for i in members]) for name in INPUTS}  # type: ignore[index]
        try:
            outputs = infer(batch)
        except UserError as exc:
            for i in members:
                results[i] = str(exc)
            continue
        start = 0
        for i in members:
            n = feeds[i]["images"].shape[0]  # type: ignore[index]
            results[i] = {k: v[start:start + n] for k, v in outputs.items()}
            start += n
    return results
