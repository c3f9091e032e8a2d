"""Precision-aware parity (runtime/match_rate.py) on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from frcnn.runtime.match_rate import MatchReport, box_iou, match_batches, match_detections


def _dets(boxes: list[list[float]], scores: list[float], classes: list[int]) -> dict[str, np.ndarray]:
    return {"boxes": np.array(boxes, np.float32).reshape(-1, 4), "scores": np.array(scores, np.float32),
            "classes": np.array(classes, np.int32)}  # fmt: skip


def test_box_iou_hand_computed() -> None:
    iou = box_iou(np.array([[0, 0, 10, 10], [0, 0, 0, 0]]), np.array([[5, 0, 15, 10], [0, 0, 10, 10]]))
    np.testing.assert_allclose(iou, [[50 / 150, 1.0], [0.0, 0.0]])  # empty box: IoU 0, not NaN


def test_match_requires_class_iou_and_score() -> None:
    ref = _dets([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60], [70, 70, 80, 80]], [0.9, 0.8, 0.7, 0.6],
                [0, 1, 2, 0])
    got = _dets([[0, 0, 10, 10.5], [20, 20, 40, 40], [50, 50, 60, 60], [70, 70, 90, 80]], [0.85, 0.8, 0.2, 0.6],
                [0, 2, 2, 0])
    rep = match_detections(ref, got, min_iou=0.9, score_atol=0.1)
    # 1st: IoU 100/105 = 0.952, dscore 0.05 -> match; 2nd: other class; 3rd: dscore 0.5; 4th: IoU 0.5
    assert (rep.reference, rep.deployed, rep.matched) == (4, 4, 1)
    assert rep.rate == 0.25
    assert rep.ious == [pytest.approx(100 / 105)] and rep.score_deltas == [pytest.approx(0.05, abs=1e-6)]


def test_each_deployed_detection_matches_once_highest_reference_first() -> None:
    ref = _dets([[0, 0, 10, 10], [0, 0, 10, 10.2]], [0.5, 0.9], [1, 1])
    got = _dets([[0, 0, 10, 10.1]], [0.9], [1])
    rep = match_detections(ref, got, min_iou=0.9, score_atol=0.5)
    assert rep.matched == 1 and rep.score_deltas == [pytest.approx(0.0)]  # the 0.9 reference took it


def test_match_batches_uses_valid_rows_only() -> None:
    pad = np.zeros((1, 3, 4), np.float32)
    pad[0, 0] = [0, 0, 10, 10]
    pad[0, 1] = [0, 0, 10, 10]  # padding row (past num_detections): must not count
    out = {"num_detections": np.array([1]), "boxes": pad, "scores": np.array([[0.9, 0.9, 0]], np.float32),
           "classes": np.array([[0, 0, -1]], np.int32)}  # fmt: skip
    rep = match_batches([out], [out], min_iou=0.9, score_atol=0.1)
    assert (rep.reference, rep.deployed, rep.matched, rep.rate) == (1, 1, 1, 1.0)
    assert MatchReport().rate == 1.0 and MatchReport(deployed=2).rate == 0.0


def test_parity_precision_verdict_uses_the_match_rate(capsys: pytest.CaptureFixture) -> None:
    import argparse

    from frcnn.runtime.match_rate import PRECISION_DEFAULTS, run_match_rate

    boxes = np.array([[[10 * k, 0, 10 * k + 8, 8] for k in range(10)]], np.float32)
    ref = {"num_detections": np.array([10]), "boxes": boxes, "scores": np.full((1, 10), 0.9, np.float32),
           "classes": np.zeros((1, 10), np.int32)}  # fmt: skip
    args = argparse.Namespace(precision="int8", weights="w.pth", model="m.int8.onnx", images="imgs")
    assert PRECISION_DEFAULTS["int8"]["min_match_rate"] == 0.9
    shifted = dict(ref, boxes=boxes.copy())
    shifted["boxes"][0, 0] += 4  # one of ten detections moves (IoU 0.33): 90 % matched, still passes
    assert run_match_rate(args, [ref], [shifted], "onnxruntime", 1) == 0
    assert "9/10 reference detections matched (90.0 %)" in capsys.readouterr().out
    shifted["boxes"][0, 1] += 4  # 80 %: fails
    assert run_match_rate(args, [ref], [shifted], "onnxruntime", 1) == 1
    assert "PARITY FAILED" in capsys.readouterr().out


def test_min_score_filters_the_reference_side_only(capsys: pytest.CaptureFixture) -> None:
    """Reference detections under --min-score are not counted; a deployed detection under it still matches a
    reference one above it (the threshold must not turn a 0.52 vs 0.48 pair into a miss)."""
    import argparse

    from frcnn.runtime.match_rate import run_match_rate

    ref = _dets([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], [0.52, 0.3, 0.1], [0, 0, 0])
    got = _dets([[0, 0, 10, 10], [60, 60, 70, 70]], [0.48, 0.3], [0, 0])
    everything = match_detections(ref, got, min_iou=0.9, score_atol=0.1)
    assert (everything.reference, everything.matched) == (3, 1)
    confident = match_detections(ref, got, min_iou=0.9, score_atol=0.1, min_score=0.5)
    assert (confident.reference, confident.deployed, confident.matched, confident.rate) == (1, 2, 1, 1.0)

    def batch(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"num_detections": np.array([len(d["scores"])]), **{k: v[None] for k, v in d.items()}}

    args = argparse.Namespace(precision="int8", weights="w.pth", model="m.int8.onnx", images="imgs", min_score=0.0)
    assert run_match_rate(args, [batch(ref)], [batch(got)], "onnxruntime", 1) == 1  # 1 of 3
    out = capsys.readouterr().out
    assert "1/3 reference detections matched" in out and "of those scoring >= 0.5: 1/1" in out
    args.min_score = 0.5
    assert run_match_rate(args, [batch(ref)], [batch(got)], "onnxruntime", 1) == 0  # 1 of 1
    assert "[reference detections scoring >= 0.5]" in capsys.readouterr().out
