"""Test-time post-processing shared by the PyTorch Predictor and the runtime (numpy only, never torch).

The model (and the exported engine) returns fixed-size, padded detections in resized-image pixels:
``num_detections [B]``, ``boxes [B, K, 4]``, ``scores [B, K]``, ``classes [B, K]``. ``unpad`` keeps the valid
rows of one image and ``detector_postprocess`` maps them to the original image as detectron2's
``detector_postprocess`` does: scale, clip to the output image, drop empty boxes. ``postprocess_batch``
does both for a batch (plain arrays); ``postprocess_detections`` wraps them as
:class:`~frcnn.runtime.detections.Detections`, the one result type of the Detector and the Predictor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from frcnn.runtime.detections import Detections
from frcnn.runtime.errors import UserError

BoxesScoresClasses = tuple[np.ndarray, np.ndarray, np.ndarray]


def unpad(num: int, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray) -> BoxesScoresClasses:
    """Valid rows of one image's padded outputs.

    Args:
        num: number of valid detections (``num_detections[i]``).
        boxes: ``[K, 4]``; scores: ``[K]``; classes: ``[K]`` (rows ``>= num`` are padding).
    Returns:
        boxes float32 ``[num, 4]``, scores float32 ``[num]``, classes int64 ``[num]``.
    Raises:
        UserError: ``num`` outside ``[0, K]`` or non-finite values in the valid rows (a broken model: refused
            rather than drawn as garbage).
    """
    n = int(num)
    if not 0 <= n <= boxes.shape[0]:
        raise UserError(f"the model returned num_detections {n}, outside [0, {boxes.shape[0]}]: its outputs are "
                        "malformed; use a model exported by `frcnn export`")
    b, s = np.asarray(boxes[:n], dtype=np.float32), np.asarray(scores[:n], dtype=np.float32)
    if not (np.isfinite(b).all() and np.isfinite(s).all()):
        raise UserError("the model returned non-finite (NaN or infinite) boxes or scores: its weights or the "
                        "engine are broken (e.g. an fp16 overflow); re-export the model, and check it with "
                        "`frcnn parity`")
    return b, s, np.asarray(classes[:n], dtype=np.int64)


def detector_postprocess(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    resized_hw: Sequence[int],
    original_hw: Sequence[int],
) -> BoxesScoresClasses:
    """Scale detections from the resized image to the original one, clip, drop empty boxes.

    detectron2 ``detector_postprocess`` semantics: ``scale_x = out_w / resized_w``, ``scale_y = out_h /
    resized_h`` (float64 division, applied in float32 like ``Boxes.scale`` on a float32 tensor), then
    ``Boxes.clip((out_h, out_w))`` (x to ``[0, out_w]``, y to ``[0, out_h]``) and ``Boxes.nonempty()``
    (width > 0 and height > 0; NaN boxes are dropped).

    Args:
        boxes: ``[N, 4]`` x1, y1, x2, y2 in resized-image pixels; scores: ``[N]``; classes: ``[N]``.
        resized_hw: ``(h, w)`` of the image the model saw (``image_sizes[i]``).
        original_hw: ``(h, w)`` of the user's image.
    Returns:
        boxes float32 ``[M, 4]`` in original-image pixels, scores float32 ``[M]``, classes int64 ``[M]``.
    """
    out_h, out_w = int(original_hw[0]), int(original_hw[1])
    res_h, res_w = int(resized_hw[0]), int(resized_hw[1])
    scale_x = np.float32(out_w / res_w)
    scale_y = np.float32(out_h / res_h)
    b = np.array(boxes, dtype=np.float32).reshape(-1, 4)
    b[:, 0::2] *= scale_x
    b[:, 1::2] *= scale_y
    b[:, 0::2] = np.clip(b[:, 0::2], np.float32(0), np.float32(out_w))
    b[:, 1::2] = np.clip(b[:, 1::2], np.float32(0), np.float32(out_h))
    keep = ((b[:, 2] - b[:, 0]) > 0) & ((b[:, 3] - b[:, 1]) > 0)
    return (
        b[keep],
        np.asarray(scores, dtype=np.float32).reshape(-1)[keep],
        np.asarray(classes).astype(np.int64).reshape(-1)[keep],
    )


def postprocess_batch(
    outputs: Mapping[str, np.ndarray], image_sizes: np.ndarray, original_sizes: np.ndarray
) -> list[BoxesScoresClasses]:
    """``unpad`` + ``detector_postprocess`` for every image of a batch.

    Args:
        outputs: ``num_detections [B]``, ``boxes [B, K, 4]``, ``scores [B, K]``, ``classes [B, K]``.
        image_sizes: int ``[B, 2]`` resized (h, w); original_sizes: int ``[B, 2]`` original (h, w).
    Returns:
        B tuples (boxes float32 ``[M_i, 4]``, scores float32 ``[M_i]``, classes int64 ``[M_i]``).
    """
    results = []
    for i in range(len(image_sizes)):
        dets = unpad(
            outputs["num_detections"][i], outputs["boxes"][i], outputs["scores"][i], outputs["classes"][i]
        )
        results.append(detector_postprocess(*dets, image_sizes[i], original_sizes[i]))
    return results


def postprocess_detections(
    outputs: Mapping[str, np.ndarray],
    image_sizes: np.ndarray,
    original_sizes: np.ndarray,
    class_names: Sequence[str] = (),
) -> list[Detections]:
    """:func:`postprocess_batch` as one :class:`Detections` per image (``class_names`` attached to each); with
    a ``masks`` output (Mask R-CNN) each image's masks are pasted into it (:mod:`frcnn.runtime.masks`)."""
    from frcnn.runtime.contract import MASK_OUTPUTS
    from frcnn.runtime.masks import detector_postprocess_masks  # imports this module: imported here

    names = list(class_names)
    results = [Detections(b, s, c, names) for b, s, c in postprocess_batch(outputs, image_sizes, original_sizes)]
    for name in MASK_OUTPUTS.keys() & outputs.keys():
        for i, det in enumerate(results):
            n = int(outputs["num_detections"][i])
            det.masks = detector_postprocess_masks(outputs[name][i, :n], outputs["boxes"][i, :n],
                                                   image_sizes[i], original_sizes[i])  # fmt: skip
    return results
