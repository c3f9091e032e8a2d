"""Instance masks in the original image (numpy only, never torch): detectron2's ``paste_masks_in_image``.

The model returns, per detection, the M x M (28 x 28) sigmoid probabilities of its class on the detection
box. detectron2 (``detector_postprocess`` -> ``ROIMasks.to_bitmasks`` -> ``paste_masks_in_image``) pastes
them onto the output image with the *scaled and clipped* boxes:

- pixel (y, x) samples the mask at its centre, normalised to the box:
  ``gx = (x + 0.5 - x0) / (x1 - x0) * 2 - 1`` (``gy`` likewise), in float32;
- ``F.grid_sample(mask, grid, mode="bilinear", padding_mode="zeros", align_corners=False)``: mask coordinate
  ``ix = ((gx + 1) * M - 1) / 2``, bilinear between the 4 neighbouring cells, cells outside the mask are 0;
- binary mask = ``value >= 0.5``.

detectron2's CPU path evaluates only the window ``[floor(x0) - 1, ceil(x1) + 1)`` (clamped to the image) and
leaves the rest 0, its GPU path the whole image. For threshold 0.5 both give the same binary mask: a pixel
centre outside the box lies beyond the outer cell's centre by more than half a cell (``ix < -0.5`` or
``ix > M - 0.5``), so its value is below ``0.5 * p <= 0.5``; every centre inside the box is in the window.
Here the window is used and the sampling is done separably (``Wy @ mask @ Wx^T``, grid_sample's bilinear
weights).

``masks_to_rle`` encodes binary masks as COCO RLE with pycocotools (never by hand), as detectron2's
``instances_to_coco_json`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from frcnn.runtime.errors import UserError
from frcnn.runtime.postprocess import detector_postprocess

#: Probability at or above which a pasted pixel belongs to the instance (detectron2's mask_threshold).
MASK_THRESHOLD = 0.5

__all__ = ["MASK_THRESHOLD", "detector_postprocess_masks", "masks_to_rle", "paste_mask_probs",
           "paste_masks_in_image"]


def _axis_weights(start: np.float32, end: np.float32, lo: int, hi: int, size: int) -> np.ndarray:
    """Bilinear weights float32 [hi - lo, size] of pixels lo..hi-1 on a mask axis of ``size`` cells spanning
    [start, end) (grid_sample, align_corners=False, zero padding)."""
    centres = np.arange(lo, hi, dtype=np.float32) + np.float32(0.5)
    g = (centres - start) / (end - start) * np.float32(2) - np.float32(1)
    coord = ((g + np.float32(1)) * np.float32(size) - np.float32(1)) / np.float32(2)
    low = np.floor(coord)
    frac = coord - low
    low = low.astype(np.int64)
    weights = np.zeros((hi - lo, size), dtype=np.float32)
    rows = np.arange(hi - lo)
    for tap, w in ((low, np.float32(1) - frac), (low + 1, frac)):
        inside = (tap >= 0) & (tap < size)
        weights[rows[inside], tap[inside]] += w[inside]
    return weights


def paste_mask_probs(mask: np.ndarray, box: Sequence[float], image_hw: Sequence[int]
                     ) -> tuple[np.ndarray, tuple[slice, slice]]:  # fmt: skip
    """Bilinear probabilities of one mask on its box, in detectron2's window (see the module docstring).

    Args:
        mask: float [M, M] probabilities; box: (x0, y0, x1, y1) in image pixels; image_hw: (H, W).
    Returns:
        (float32 [h, w] values, (row slice, column slice) of the window in the image). A box with no
        positive width or height gives an empty window.
    """
    height, width = int(image_hw[0]), int(image_hw[1])
    x0, y0, x1, y1 = (np.float32(v) for v in box)
    if not (x1 > x0 and y1 > y0):  # also False for NaN
        return np.zeros((0, 0), np.float32), (slice(0, 0), slice(0, 0))
    col0, row0 = max(int(np.floor(x0)) - 1, 0), max(int(np.floor(y0)) - 1, 0)
    col1, row1 = min(int(np.ceil(x1)) + 1, width), min(int(np.ceil(y1)) + 1, height)
    col1, row1 = max(col1, col0), max(row1, row0)
    m = np.asarray(mask, dtype=np.float32)
    wy = _axis_weights(y0, y1, row0, row1, m.shape[0])
    wx = _axis_weights(x0, x1, col0, col1, m.shape[1])
    return wy @ m @ wx.T, (slice(row0, row1), slice(col0, col1))


def paste_masks_in_image(masks: np.ndarray, boxes: np.ndarray, image_hw: Sequence[int],
                         threshold: float = MASK_THRESHOLD) -> np.ndarray:  # fmt: skip
    """detectron2 ``paste_masks_in_image``: masks float [N, M, M], boxes [N, 4] (x0, y0, x1, y1, image
    pixels), image_hw (H, W) -> bool [N, H, W] (``value >= threshold``)."""
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.shape[1] != masks.shape[2]:
        raise ValueError(f"masks must be [N, M, M] (square), got {masks.shape}")
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if len(boxes) != len(masks):
        raise ValueError(f"{len(masks)} masks but {len(boxes)} boxes")
    out = np.zeros((len(masks), int(image_hw[0]), int(image_hw[1])), dtype=bool)
    for i in range(len(masks)):
        values, (rows, cols) = paste_mask_probs(masks[i], boxes[i], image_hw)
        out[i, rows, cols] = values >= np.float32(threshold)
    return out


def detector_postprocess_masks(mask_probs: np.ndarray, boxes: np.ndarray, resized_hw: Sequence[int],
                               original_hw: Sequence[int], threshold: float = MASK_THRESHOLD) -> np.ndarray:  # fmt: skip
    """The masks of ``detector_postprocess(boxes, ...)``'s rows: bool [M, H, W] in the original image.

    Args:
        mask_probs: float [N, S, S] (the model's ``masks`` rows of the valid detections);
        boxes: [N, 4] the same detections in resized-image pixels; resized_hw / original_hw as for
        ``detector_postprocess``.
    The boxes are scaled, clipped and filtered by ``detector_postprocess`` itself (the row numbers ride
    through its filter as the class ids), then each kept mask is pasted on its final box, as detectron2 does.
    """
    n = len(boxes)
    if len(mask_probs) != n:
        raise ValueError(f"{len(mask_probs)} masks but {n} boxes")
    final, _, rows = detector_postprocess(boxes, np.zeros(n, np.float32), np.arange(n), resized_hw, original_hw)
    return paste_masks_in_image(np.asarray(mask_probs)[rows], final, original_hw, threshold)


def masks_to_rle(masks: np.ndarray) -> list[dict]:
    """bool [N, H, W] -> N COCO RLE dicts ``{"size": [H, W], "counts": str}`` (pycocotools ``mask.encode``;
    counts decoded to text so the results are JSON-serialisable, as detectron2 writes them)."""
    try:
        from pycocotools import mask as mask_util
    except ImportError:
        raise UserError("COCO RLE encoding needs pycocotools: pip install pycocotools") from None
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got {masks.shape}")
    if len(masks) == 0:
        return []
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("utf-8")
    return rles
