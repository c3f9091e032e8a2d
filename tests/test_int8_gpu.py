"""GPU (``pytest -m gpu``, TensorRT >= 10.9): the Q/DQ ONNX builds a TensorRT engine that finds what ONNX
Runtime finds on the same Q/DQ file. UNVERIFIED here (no GPU / TensorRT on the machines this was written on).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from export_utils import EXPORT_HW, exported, textured
from PIL import Image

pytestmark = pytest.mark.gpu


def test_int8_engine_matches_onnxruntime_on_the_same_qdq_graph(tmp_path: Path) -> None:
    from frcnn.plugins.tensorrt import tensorrt_available

    if not tensorrt_available():
        pytest.skip("TensorRT >= 10.9 is not installed (pip install -e '.[tensorrt]')")
    from frcnn.export import quantize_onnx
    from frcnn.export.engine import build_engine, image_profile
    from frcnn.runtime import Detector
    from frcnn.runtime.match_rate import match_detections

    calib = tmp_path / "calib"
    calib.mkdir()
    images = textured([(288, 352), (320, 320), (352, 288), (256, 384)], seed=21)
    for k, img in enumerate(images):
        Image.fromarray(np.ascontiguousarray(img[:, :, ::-1])).save(calib / f"{k}.png")
    int8 = quantize_onnx(exported().path, calib, tmp_path / "model.int8.onnx", calib_count=4)
    lo, opt, hi = image_profile(1, 1, 1, (96, 96), EXPORT_HW, (640, 640))
    info = build_engine(int8, tmp_path / "model.int8.engine", min_shapes=lo, opt_shapes=opt, max_shapes=hi)
    with Detector(int8, providers=["cpu"]) as ort_det, Detector(info.engine_path) as trt_det:
        for img in images:
            a, b = ({"boxes": d.boxes, "scores": d.scores, "classes": d.classes} for d in (ort_det(img), trt_det(img)))
            rep = match_detections(a, b, min_iou=0.9, score_atol=0.1)
            assert rep.rate >= 0.9, rep.summary()
