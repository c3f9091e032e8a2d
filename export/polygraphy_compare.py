"""polygraphy compare-func for detection outputs (padded, fixed-size, order of tied scores arbitrary).

    polygraphy run model.onnx --onnxrt --trt --plugins ... \\
        --data-loader-script export/polygraphy_data_loader.py:load_data \\
        --compare-func-script export/polygraphy_compare.py:compare_outputs

Element-wise comparison of ``boxes`` / ``scores`` / ``classes`` is wrong for detections: rows past
``num_detections`` are padding, and two backends may order equal scores differently. ``compare_outputs``
instead checks ``num_detections`` exactly and matches detections as sets (same class, IoU >=
FRCNN_MIN_IOU, |score delta| <= FRCNN_SCORE_ATOL; defaults and their reason: ``frcnn.runtime.tolerances``,
CROSS_BACKEND_*) with ``frcnn.export.polygraphy_runners.compare_detections``; it returns ``{"num_detections": bool,
"detections": bool}`` and prints what did not match. Torch-free.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import numpy as np
from frcnn.runtime.contract import OUTPUT_NAMES as KEYS
from frcnn.runtime.tolerances import CROSS_BACKEND_MIN_IOU, CROSS_BACKEND_SCORE_ATOL


def _arrays(result: Any) -> dict[str, np.ndarray]:
    return {k: np.asarray(result[k].load() if hasattr(result[k], "load") else result[k]) for k in KEYS if k in result}


def compare_outputs(result0: Any, result1: Any) -> OrderedDict[str, bool]:
    """polygraphy ``(IterationResult, IterationResult) -> OrderedDict[str, bool]``."""
    from frcnn.export.polygraphy_runners import compare_detections

    a, b = _arrays(result0), _arrays(result1)
    missing = [k for k in KEYS if k not in a or k not in b]
    if missing:
        print(f"[frcnn compare] outputs {missing} missing on one side")
        return OrderedDict(detections=False)
    same_num = a["num_detections"].shape == b["num_detections"].shape and bool(
        np.array_equal(a["num_detections"], b["num_detections"]))
    min_iou = float(os.environ.get("FRCNN_MIN_IOU", CROSS_BACKEND_MIN_IOU))
    score_atol = float(os.environ.get("FRCNN_SCORE_ATOL", CROSS_BACKEND_SCORE_ATOL))
    report = compare_detections(a, b, min_iou=min_iou, score_atol=score_atol)
    names = (getattr(result0, "runner_name", "?"), getattr(result1, "runner_name", "?"))
    print(f"[frcnn compare] {names[0]} vs {names[1]}: num_detections {a['num_detections'].tolist()} vs "
          f"{b['num_detections'].tolist()}; {report}")
    return OrderedDict(num_detections=same_num, detections=bool(report))
