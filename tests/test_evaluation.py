"""COCO evaluation: results JSON format, and AP values on hand-computable cases (pycocotools computes them)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from frcnn.runtime.errors import UserError
from frcnn.trainer.data import load_coco_json
from frcnn.trainer.evaluation import COCOEvaluator

# COCO ids 5 ("ball") and 9 ("box") -> contiguous 0, 1. All GT boxes are "large" (area > 96^2): APs, APm NaN.
GT_BOXES = {1: [([10, 20, 110, 120], 9), ([150, 30, 130, 100], 5)], 2: [([0, 0, 100, 200], 5)], 3: []}


@pytest.fixture()
def meta(tmp_path: Path) -> Any:
    images = [{"id": i, "file_name": f"{i}.png", "width": 300, "height": 250} for i in GT_BOXES]
    anns = [
        {"id": k, "image_id": i, "bbox": b, "category_id": c, "iscrowd": 0, "area": b[2] * b[3]}
        for k, (i, b, c) in enumerate(((i, b, c) for i, lst in GT_BOXES.items() for b, c in lst), start=1)
    ]
    cats = [{"id": 9, "name": "box"}, {"id": 5, "name": "ball"}]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return load_coco_json(path, tmp_path, check_files=False)[1]


def _prediction(items: list[tuple[list[float], int, float]]) -> dict[str, np.ndarray]:
    """(XYWH box, COCO id, score) -> model-style prediction: XYXY boxes, contiguous classes."""
    to_contiguous = {5: 0, 9: 1}
    boxes = np.array([[x, y, x + w, y + h] for (x, y, w, h), _, _ in items], np.float32).reshape(-1, 4)
    return {
        "boxes": boxes,
        "scores": np.array([s for _, _, s in items], np.float32),
        "classes": np.array([to_contiguous[c] for _, c, _ in items], np.int64),
    }


def _run(meta: Any, preds: dict[int, list[tuple[list[float], int, float]]], out: Path | None = None) -> dict:
    ev = COCOEvaluator(meta, output_dir=out)
    for image_id in GT_BOXES:
        ev.process([{"image_id": image_id}], [_prediction(preds.get(image_id, []))])
    return ev.evaluate()


def test_perfect_predictions_give_ap_one_and_results_use_coco_ids_xywh(meta: Any, tmp_path: Path) -> None:
    perfect = {i: [(b, c, 0.9) for b, c in lst] for i, lst in GT_BOXES.items()}
    m = _run(meta, perfect, tmp_path / "eval")
    assert (
        m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(1.0)
    )
    assert m["APl"] == pytest.approx(1.0) and math.isnan(m["APs"]) and math.isnan(m["APm"])
    assert m["AP-ball"] == pytest.approx(1.0) and m["AP-box"] == pytest.approx(1.0)
    results = json.loads((tmp_path / "eval" / "coco_instances_results.json").read_text())
    assert results[0] == {
        "image_id": 1,
        "category_id": 9,
        "bbox": [10.0, 20.0, 110.0, 120.0],
        "score": pytest.approx(0.9),
    }
    assert sorted((r["image_id"], r["category_id"], r["bbox"]) for r in results) == sorted(
        (i, c, [float(v) for v in b]) for i, lst in GT_BOXES.items() for b, c in lst
    )
    assert not list((tmp_path / "eval").glob("*.tmp*"))


def test_shifted_boxes_lower_ap(meta: Any) -> None:
    # shifting x by 30 % of the width: IoU = 0.7 / 1.3 = 0.538 -> a hit at IoU 0.5, a miss from 0.55 up
    shifted = {
        i: [([b[0] + 0.3 * b[2], b[1], b[2], b[3]], c, 0.9) for b, c in lst] for i, lst in GT_BOXES.items()
    }
    m = _run(meta, shifted)
    assert m["AP50"] == pytest.approx(1.0)
    assert m["AP75"] == pytest.approx(0.0)
    assert m["AP"] == pytest.approx(0.1)  # hit at 1 of the 10 IoU thresholds 0.50:0.95


def test_half_recall_gives_51_of_101_points(meta: Any) -> None:
    # ball (COCO 5) has 2 GT boxes; one found with precision 1 -> precision 1 at recall points 0.00..0.50
    preds = {1: [([150, 30, 130, 100], 5, 0.8), ([10, 20, 110, 120], 9, 0.9)]}
    m = _run(meta, preds)
    assert m["AP-ball"] == pytest.approx(51 / 101)
    assert m["AP-box"] == pytest.approx(1.0)
    assert m["AP"] == pytest.approx((51 / 101 + 1.0) / 2)


def test_no_predictions_give_zero(meta: Any, tmp_path: Path) -> None:
    m = _run(meta, {}, tmp_path)
    assert m["AP"] == 0.0 and m["AP50"] == 0.0 and m["APl"] == 0.0
    assert json.loads((tmp_path / "coco_instances_results.json").read_text()) == []


def test_bad_predictions_are_refused(meta: Any) -> None:
    ev = COCOEvaluator(meta)
    with pytest.raises(ValueError, match="class ids must be in 0..1"):
        ev.process(
            [{"image_id": 1}], [{"boxes": np.zeros((1, 4)), "scores": np.ones(1), "classes": np.array([-1])}]
        )
    ev.process([{"image_id": 42}], [_prediction([])])
    with pytest.raises(UserError, match=r"image ids \[42\]"):
        ev.evaluate()
    with pytest.raises(UserError, match="no image was processed"):
        COCOEvaluator(meta).evaluate()
