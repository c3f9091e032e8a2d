"""COCO evaluation (detectron2 ``COCOEvaluator``, bbox and segm): predictions -> results JSON + AP metrics.

Usage (the detectron2 evaluator protocol)::

    evaluator = COCOEvaluator(meta, output_dir="out/eval")
    evaluator.reset()
    for inputs, outputs in ...:            # inputs: dicts with "image_id"; outputs: per-image predictions
        evaluator.process(inputs, outputs)
    metrics = evaluator.evaluate()        # {"AP", "AP50", "AP75", "APs", "APm", "APl", "AP-<class>", ...}

A prediction is ``{"boxes": [N, 4] XYXY in ORIGINAL image pixels, "scores": [N], "classes": [N] contiguous
ids}`` (numpy arrays or CPU/GPU tensors). Results are COCO ``[{"image_id", "category_id" (original COCO id),
"bbox" [x, y, w, h], "score"}]`` (float32 ``w = x2 - x1`` like detectron2 ``instances_to_coco_json``),
written atomically to ``output_dir/coco_instances_results.json``. A prediction with ``masks`` (bool [N, H, W],
original image) also gets ``"segmentation"`` (COCO RLE, pycocotools) and the metrics gain ``segm/AP`` etc.

Metrics are computed by pycocotools ``COCOeval`` (never by hand) and reported as floats in **0..1**
(detectron2 reports x100). A metric without any ground truth (e.g. APs when no small objects exist) is NaN,
as in detectron2. Zero predictions give AP 0 (COCOeval run on an empty result set).
Only the images passed to ``process`` are evaluated (so a shard or a subset evaluates correctly).
Torch-free (tensors are converted through ``.cpu().numpy()`` duck typing).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from frcnn.runtime.errors import UserError
from frcnn.runtime.fileio import atomic_write_json
from frcnn.trainer.data.coco import DatasetMeta, read_coco_json
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["COCOEvaluator", "evaluate_predictions", "predictions_to_coco_results"]

logger = logging.getLogger(__name__)
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def predictions_to_coco_results(
    image_id: int, prediction: Mapping[str, Any], meta: DatasetMeta
) -> list[dict[str, Any]]:
    """One image's prediction (XYXY original pixels, contiguous classes) -> COCO result dicts (XYWH, COCO ids)."""
    boxes = _numpy(prediction["boxes"]).astype(np.float32).reshape(-1, 4)
    scores = _numpy(prediction["scores"]).astype(np.float32).reshape(-1)
    classes = _numpy(prediction["classes"]).astype(np.int64).reshape(-1)
    if not len(boxes) == len(scores) == len(classes):
        raise ValueError(
            f"image {image_id}: boxes {boxes.shape}, scores {scores.shape} and classes "
            f"{classes.shape} must have the same length"
        )
    if len(classes) and (classes.min() < 0 or classes.max() >= meta.num_classes):
        raise ValueError(
            f"image {image_id}: class ids must be in 0..{meta.num_classes - 1}, got "
            f"{sorted(set(classes.tolist()))}; drop padding rows (class -1) before evaluating"
        )
    xywh = boxes.copy()
    xywh[:, 2:] = boxes[:, 2:] - boxes[:, :2]
    results = [
        {"image_id": int(image_id), "category_id": meta.to_dataset_id(int(c)), "bbox": b, "score": float(s)}
        for b, s, c in zip(xywh.tolist(), scores.tolist(), classes.tolist())
    ]
    if prediction.get("masks") is not None:  # Mask R-CNN: bool [N, H, W] in the original image -> COCO RLE
        from frcnn.runtime.masks import masks_to_rle

        masks = _numpy(prediction["masks"])
        if len(masks) != len(results):
            raise ValueError(f"image {image_id}: {len(masks)} masks for {len(results)} boxes")
        for result, rle in zip(results, masks_to_rle(masks)):
            result["segmentation"] = rle
    return results


def _load_gt(json_file: str) -> COCO:
    """GT as a pycocotools COCO object; fills ``area`` (w * h) and ``iscrowd`` (0) when missing and numbers
    annotations 1..N (COCOeval treats a matched gt id 0 as unmatched)."""
    data = copy.deepcopy(read_coco_json(json_file))
    for i, ann in enumerate(data.get("annotations", [])):
        ann["id"] = i + 1
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
    data.setdefault("annotations", [])
    gt = COCO()
    gt.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def _load_results(gt: COCO, results: list[dict[str, Any]]) -> COCO:
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            return gt.loadRes(copy.deepcopy(results))
    dt = COCO()  # pycocotools' loadRes cannot take an empty list
    dt.dataset = {
        "images": list(gt.dataset["images"]),
        "categories": copy.deepcopy(gt.dataset["categories"]),
        "annotations": [],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        dt.createIndex()
    return dt


def evaluate_predictions(
    results: list[dict[str, Any]], meta: DatasetMeta, img_ids: Iterable[int], gt: COCO | None = None,
    iou_type: str = "bbox",
) -> dict[str, float]:
    """COCOeval (``iou_type`` "bbox" or "segm") of COCO results on ``img_ids`` -> {AP, AP50, AP75, APs, APm,
    APl, AP-<class>} in 0..1. For "segm" the results' boxes are dropped (detectron2: mask area, not box area,
    decides small / medium / large)."""
    gt = _load_gt(meta.json_file) if gt is None else gt
    if iou_type == "segm":
        if any("segmentation" not in a for a in gt.dataset["annotations"]):
            raise UserError(f"{meta.json_file} has annotations without 'segmentation': segm AP needs the "
                            "instance masks of every object; evaluate boxes only or use a dataset with masks.")
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    img_ids = sorted({int(i) for i in img_ids})
    unknown = [i for i in img_ids if i not in gt.imgs]
    if unknown:
        raise UserError(
            f"predictions for image ids {unknown[:5]} that are not in {meta.json_file}; evaluate "
            "with the annotation file the images came from."
        )
    dt = _load_results(gt, results)
    coco_eval = COCOeval(gt, dt, iou_type)
    coco_eval.params.imgIds = img_ids
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    logger.info(
        "COCO %s evaluation on %d images, %d detections:\n%s",
        iou_type,
        len(img_ids),
        len(results),
        summary.getvalue(),
    )
    metrics = {name: _metric(coco_eval.stats[i]) for i, name in enumerate(METRICS)}
    precision = coco_eval.eval["precision"]  # [iou thr, recall, class, area range, max dets]
    for k, cat_id in enumerate(coco_eval.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        name = (
            meta.thing_classes[meta.to_contiguous(cat_id)]
            if cat_id in meta.thing_dataset_ids
            else str(cat_id)
        )
        metrics[f"AP-{name}"] = float(p.mean()) if p.size else float("nan")
    return metrics


def _metric(value: float) -> float:
    return float(value) if value >= 0 else float("nan")


class COCOEvaluator:
    """Collects predictions image by image, then writes the COCO results JSON and computes the metrics."""

    def __init__(self, meta: DatasetMeta, output_dir: str | os.PathLike[str] | None = None) -> None:
        if not meta.json_file:
            raise UserError(
                "COCOEvaluator needs the DatasetMeta of a loaded COCO JSON (meta.json_file is empty)."
            )
        self.meta = meta
        self.output_dir = None if output_dir is None else os.fspath(output_dir)
        self._gt: COCO | None = None
        self.reset()

    def reset(self) -> None:
        self.results: list[dict[str, Any]] = []
        self.img_ids: list[int] = []
        self.with_masks = False

    def process(self, inputs: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]]) -> None:
        """``inputs[i]["image_id"]`` and ``outputs[i]`` (boxes XYXY original pixels, scores, classes; a Mask R-CNN
        model's also ``masks``, bool [N, H, W], present even when N = 0)."""
        for inp, out in zip(inputs, outputs, strict=True):
            self.img_ids.append(int(inp["image_id"]))
            self.with_masks |= out.get("masks") is not None
            self.results.extend(predictions_to_coco_results(inp["image_id"], out, self.meta))

    def evaluate(self) -> dict[str, float]:
        """Write the results JSON (if output_dir) and return the metrics (0..1 floats, NaN when undefined)."""
        if not self.img_ids:
            raise UserError("no image was processed: the evaluation dataset is empty.")
        if self.output_dir is not None:
            atomic_write_json(os.path.join(self.output_dir, "coco_instances_results.json"), self.results)
        if self._gt is None:
            self._gt = _load_gt(self.meta.json_file)
        metrics = evaluate_predictions(self.results, self.meta, self.img_ids, gt=self._gt)
        if self.with_masks:  # Mask R-CNN: segm metrics as "segm/<name>" (0 AP, not absent, without detections)
            segm = evaluate_predictions(self.results, self.meta, self.img_ids, gt=self._gt, iou_type="segm")
            metrics.update({f"segm/{k}": v for k, v in segm.items()})
        return metrics

