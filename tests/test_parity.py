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
from frcnn.export.polygraphy_runners import (
    DetectionCompareFunc,
    TorchRunner,
    compare_detections,
    pasted_mask_iou,
)

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


# --- Mask R-CNN: masks of matched detections ----------------------------------------------------------------
def _mask_dets(seed: int = 0) -> dict[str, np.ndarray]:
    dets = _dets()
    rng = np.random.default_rng(seed)
    dets["masks"] = rng.uniform(0, 1, (1, 3, 28, 28)).astype(np.float32)
    return dets


def test_pasted_mask_iou_hand_cases() -> None:
    ones, zeros = np.ones((28, 28), np.float32), np.zeros((28, 28), np.float32)
    box = np.array([0, 0, 10, 10], np.float32)
    # An all-ones mask pastes to exactly the box's pixels (detectron2 paste): two 10x10 squares overlapping by
    # half -> 50 / 150.
    assert pasted_mask_iou(ones, box, ones, np.array([5, 0, 15, 10], np.float32)) == pytest.approx(1 / 3)
    assert pasted_mask_iou(ones, box, ones, np.array([20, 20, 30, 30], np.float32)) == 0.0
    assert pasted_mask_iou(zeros, box, zeros, box) == 1.0  # both empty: the same mask
    assert pasted_mask_iou(ones, box, zeros, box) == 0.0
    left = np.where(np.arange(28)[None, :] < 14, 1.0, 0.0).astype(np.float32) * ones
    assert pasted_mask_iou(left, np.array([0, 0, 28, 28], np.float32), ones,
                           np.array([0, 0, 28, 28], np.float32)) == pytest.approx(0.5)


def test_compare_matches_masks_with_their_detections() -> None:
    a, b = _mask_dets(), _mask_dets()
    for key in ("boxes", "scores", "classes", "masks"):  # same set, other order: masks travel with their rows
        b[key][0, :2] = b[key][0, 1::-1]
    b["masks"][0, 2] = 0.0  # padding rows are not compared
    report = compare_detections(a, b)
    assert report and report.masks_compared == 2 and report.max_mask_delta == 0.0 and report.min_mask_iou == 1.0
    assert "2 masks" in str(report)


@pytest.mark.parametrize("change", ["prob", "flip", "one_side"])
def test_compare_rejects_mask_differences(change: str) -> None:
    a, b = _mask_dets(), _mask_dets()
    if change == "prob":  # raw probabilities off by more than 1e-4, far from 0.5: IoU stays above 0.99
        b["masks"][0, 1] = np.where(b["masks"][0, 1] > 0.5, 0.99, 0.01)
        a["masks"][0, 1] = np.where(a["masks"][0, 1] > 0.5, 0.9995, 0.0095)
    elif change == "flip":  # the mask of detection 0 mirrored: same statistics, other pixels
        b["masks"][0, 0] = b["masks"][0, 0, :, ::-1]
    else:
        del b["masks"]
    report = compare_detections(a, b)
    assert not report and report.mask_failures >= 1
    assert report.matched == 2  # the detections themselves still match
    if change == "prob":
        assert report.min_mask_iou > 0.99 and report.max_mask_delta == pytest.approx(9.5e-3, abs=1e-6)
    elif change == "flip":
        assert report.min_mask_iou < 0.8
