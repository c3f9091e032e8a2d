"""ONNX Runtime runs the exported file exactly like the PyTorch model (issue 4, item 4).

One export at 320x320 (tests/export_utils.py, through the CLI); ORT then runs other sizes, batches of 1, 2 and
3 images of different sizes, and a white image without detections. Detections are compared as sets: same
count, every detection matched (same class, IoU >= 0.999, |dscore| <= 1e-4); proposals within 1e-4.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from export_utils import batch, exported, parity_model, textured, white_image
from frcnn.export.onnx_export import PROPOSAL_NAMES, with_outputs
from frcnn.export.polygraphy_runners import DetectionCompareFunc, TorchRunner, compare_detections

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    result = exported()
    assert result.path.is_file(), result.stderr
    return with_outputs(onnx.load(str(result.path)), PROPOSAL_NAMES).SerializeToString()


@pytest.fixture(scope="module")
def session(model_bytes: bytes):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def _run_both(session, images: list[np.ndarray]) -> tuple[dict, dict]:
    array, sizes = batch(images)
    names = [o.name for o in session.get_outputs()]
    ort_out = dict(zip(names, session.run(None, {"images": array, "image_sizes": sizes})))
    _, model = parity_model()
    with torch.no_grad():
        ref = model.inference(torch.from_numpy(array), torch.from_numpy(sizes), return_proposals=True)
    return ort_out, {k: v.numpy() for k, v in ref.items()}


CASES = {
    "batch1_256x384": lambda: textured([(256, 384)], 1),
    "batch2_416x288_256x384": lambda: textured([(416, 288), (256, 384)], 2),
    "batch3_with_blank": lambda: [*textured([(256, 384)], 3), white_image(320, 288), *textured([(416, 288)], 4)],
}


@pytest.mark.parametrize("case", list(CASES))
def test_ort_matches_pytorch(session, case: str) -> None:
    images = CASES[case]()
    ort_out, ref = _run_both(session, images)
    report = compare_detections(ort_out, ref, min_iou=0.999, score_atol=1e-4, proposal_atol=1e-4, proposal_rtol=1e-5)
    print(f"{case}: {report}")
    assert report, str(report)
    for i, img in enumerate(images):
        blank = bool((img >= 250).all())
        assert (ref["num_detections"][i] == 0) == blank, "test weights: textured images need detections"
        assert ref["num_proposals"][i] > 100
    assert report.matched == int(ref["num_detections"].sum())


def test_polygraphy_comparator_ort_vs_torch(model_bytes: bytes) -> None:
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator

    _, model = parity_model()
    feeds = []
    for images in (textured([(288, 352)], 5), textured([(256, 320), (320, 256)], 6)):
        array, sizes = batch(images)
        feeds.append({"images": array, "image_sizes": sizes})
    runners = [OnnxrtRunner(SessionFromOnnx(model_bytes)), TorchRunner(model, return_proposals=True)]
    results = Comparator.run(runners, data_loader=feeds)
    func = DetectionCompareFunc()
    accuracy = Comparator.compare_accuracy(results, compare_func=func)
    assert bool(accuracy), "\n".join(map(str, func.reports))
    assert len(func.reports) == 2 and all(r.matched > 0 for r in func.reports)


# --- the comparison itself must be able to fail -------------------------------------------------------------
def _dets() -> dict[str, np.ndarray]:
    boxes = np.array([[[10, 10, 50, 60], [100, 40, 180, 90], [0, 0, 0, 0]]], np.float32)
    return {"num_detections": np.array([2], np.int32), "boxes": boxes,
            "scores": np.array([[0.9, 0.4, 0.0]], np.float32), "classes": np.array([[1, 0, -1]], np.int32)}


def test_compare_accepts_reordered_equal_sets() -> None:
    a, b = _dets(), _dets()
    for key in ("boxes", "scores", "classes"):
        b[key][0, :2] = b[key][0, 1::-1]
    assert compare_detections(a, b).matched == 2


@pytest.mark.parametrize("change", ["box", "class", "score", "count"])
def test_compare_rejects_differences(change: str) -> None:
    a, b = _dets(), _dets()
    if change == "box":
        b["boxes"][0, 1, 2] += 0.5  # IoU ~0.994 < 0.999
    elif change == "class":
        b["classes"][0, 0] = 2
    elif change == "score":
        b["scores"][0, 1] += 2e-4
    else:
        b["num_detections"][0] = 1
    assert not compare_detections(a, b)


def test_compare_checks_proposals() -> None:
    a, b = _dets(), _dets()
    a["proposals"] = np.array([[[1, 2, 30, 40], [5, 5, 9, 9]]], np.float32)
    a["num_proposals"] = np.array([2], np.int32)
    b["proposals"], b["num_proposals"] = a["proposals"][:, ::-1].copy(), a["num_proposals"].copy()
    assert compare_detections(a, b)  # same set, other order
    b["proposals"][0, 0, 0] += 1e-3
    assert not compare_detections(a, b)
