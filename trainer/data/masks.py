"""Instance masks of COCO annotations for Mask R-CNN training (pycocotools' mask utilities, never by hand).

COCO ``segmentation`` is either polygons (a list of ``[x1, y1, x2, y2, ...]`` lists, >= 3 points each) or
RLE (``{"size": [h, w], "counts": str | list[int]}``, compressed or not). ``check_segmentation`` validates
one against its image (UserError naming the annotation and the fix); ``segmentation_to_mask`` decodes it to a
bool [H, W] bitmask (detectron2 ``polygons_to_bitmask`` / ``mask_util.decode``); ``transform_mask`` applies
the mapper's resize (Pillow NEAREST, as detectron2's ``ResizeTransform.apply_segmentation``) and flip.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from frcnn.runtime.errors import UserError
from PIL import Image

__all__ = ["check_segmentation", "segmentation_to_mask", "transform_mask"]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_segmentation(seg: Any, height: int, width: int, where: str) -> None:
    """UserError unless ``seg`` is COCO polygons or RLE for an image of ``height`` x ``width``."""
    if isinstance(seg, list):
        if not seg:
            raise UserError(f"{where}: 'segmentation' is an empty polygon list; give >= 1 polygon of >= 3 points "
                            "[x1, y1, x2, y2, x3, y3, ...] or an RLE {{'size', 'counts'}}, or drop the key.")
        for k, poly in enumerate(seg):
            if (not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2
                    or not all(_is_number(v) for v in poly)):  # fmt: skip
                raise UserError(f"{where}: 'segmentation' polygon {k} must be a flat list of >= 6 finite numbers "
                                f"(x, y pairs, >= 3 points), got {str(poly)[:80]}. Fix or drop the polygon.")
        return
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if list(size or []) != [height, width]:
            raise UserError(f"{where}: RLE 'size' {size!r} does not match the image's [height, width] "
                            f"[{height}, {width}]. Re-encode the mask for this image.")
        if isinstance(counts, list) and all(isinstance(c, int) and c >= 0 for c in counts):
            if sum(counts) != height * width:
                raise UserError(f"{where}: uncompressed RLE 'counts' sum to {sum(counts)}, not height x width = "
                                f"{height * width}. Re-encode the mask (pycocotools.mask.encode).")
            return
        if isinstance(counts, str) and counts:
            _decode_compressed(seg, height, width, where)
            return
        raise UserError(f"{where}: RLE 'counts' must be a non-empty string (compressed) or a list of "
                        f"non-negative ints, got {type(counts).__name__}. Re-encode the mask.")
    raise UserError(f"{where}: 'segmentation' must be a list of polygons or an RLE dict, got {type(seg).__name__}.")


def _decode_compressed(seg: dict, height: int, width: int, where: str) -> np.ndarray:
    from pycocotools import mask as mask_util

    try:
        mask = mask_util.decode({"size": [height, width], "counts": seg["counts"].encode("ascii")})
        area = int(mask_util.area({"size": [height, width], "counts": seg["counts"].encode("ascii")}))
    except (UnicodeEncodeError, ValueError, TypeError) as exc:
        raise UserError(f"{where}: RLE 'counts' is not valid compressed COCO RLE ({exc}). Re-encode the mask "
                        "(pycocotools.mask.encode).") from None
    if area != int(mask.sum()) or mask.shape != (height, width):
        raise UserError(f"{where}: RLE 'counts' is truncated or corrupt (decodes to {int(mask.sum())} pixels, "
                        f"its runs say {area}). Re-encode the mask (pycocotools.mask.encode).")
    return mask


def segmentation_to_mask(seg: Any, height: int, width: int) -> np.ndarray:
    """Checked COCO polygons / RLE -> bool [height, width] (pycocotools frPyObjects + merge + decode)."""
    from pycocotools import mask as mask_util

    if isinstance(seg, list):
        rle = mask_util.merge(mask_util.frPyObjects([list(map(float, p)) for p in seg], height, width))
    elif isinstance(seg["counts"], list):
        rle = mask_util.frPyObjects(seg, height, width)
    else:
        rle = {"size": [height, width], "counts": seg["counts"].encode("ascii")}
    return mask_util.decode(rle).astype(bool)


def transform_mask(mask: np.ndarray, new_hw: tuple[int, int], flip: str = "none") -> np.ndarray:
    """bool [H, W] -> bool [new_h, new_w]: Pillow NEAREST resize, then "horizontal" / "vertical" flip."""
    nh, nw = int(new_hw[0]), int(new_hw[1])
    out = mask
    if mask.shape != (nh, nw):
        out = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((nw, nh), Image.NEAREST)) > 0
    if flip == "horizontal":
        out = out[:, ::-1]
    elif flip == "vertical":
        out = out[::-1]
    return np.ascontiguousarray(out)
