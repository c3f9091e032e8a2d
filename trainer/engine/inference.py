"""COCO evaluation of a PyTorch model on a dataset split (detectron2 ``inference_on_dataset``).

Each rank runs the model on its shard of the split (``build_test_loader``: test-time resize from
INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST, the same code as the Predictor and the runtime), scales detections to the
original image size with ``frcnn.runtime.postprocess.postprocess_detections``; rank 0 gathers the
predictions and computes COCO AP with pycocotools (``COCOEvaluator``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from frcnn.runtime.postprocess import postprocess_detections
from torch import nn

from .comm import all_gather_object, get_rank, get_world_size, is_main_process
from .trainer import batch_to_inputs

__all__ = ["evaluate_model", "predict_dataset"]

logger = logging.getLogger(__name__)


@torch.inference_mode()
def predict_dataset(
    model: nn.Module, cfg: Any, dataset_dicts: Sequence[dict[str, Any]], *, batch_size: int = 1,
    device: torch.device | str = "cpu", num_workers: int | None = None,
) -> list[tuple[dict[str, Any], dict[str, Any]]]:  # fmt: skip
    """(input record, prediction) of every image of this rank's shard.

    prediction: ``{"boxes": float32 [N, 4] original-image XYXY, "scores": [N], "classes": int64 [N]}``.
    """
    from frcnn.trainer.data import build_test_loader

    loader = build_test_loader(cfg, dataset_dicts, batch_size=batch_size, num_workers=num_workers,
                               rank=get_rank(), world_size=get_world_size())  # fmt: skip
    was_training = model.training
    model.eval()
    pairs = []
    try:
        for batch in loader:
            for d in batch:
                d.setdefault("gt_boxes", torch.zeros((0, 4)))
                d.setdefault("gt_classes", torch.zeros((0,), dtype=torch.int64))
            images, sizes, _ = batch_to_inputs(batch, device)
            out = {k: v.cpu().numpy() for k, v in model(images, sizes).items()}
            resized = np.array([d["image_size"] for d in batch], dtype=np.int64).reshape(-1, 2)
            original = np.array([(d["height"], d["width"]) for d in batch], dtype=np.int64).reshape(-1, 2)
            for d, dets in zip(batch, postprocess_detections(out, resized, original), strict=True):
                pairs.append(({"image_id": d["image_id"], "file_name": d["file_name"]}, dets.as_dict()))
    finally:
        model.train(was_training)
    return pairs


def evaluate_model(
    model: nn.Module, cfg: Any, dataset_dicts: Sequence[dict[str, Any]], meta: Any, *,
    output_dir: str | None = None, batch_size: int = 1, device: torch.device | str = "cpu",
    num_workers: int | None = None,
) -> dict[str, float]:  # fmt: skip
    """COCO bbox metrics (AP, AP50, AP75, APs, APm, APl, AP-<class>; 0..1) on rank 0, ``{}`` on other ranks.

    With ``output_dir`` the COCO results JSON is written there (``coco_instances_results.json``).
    Collective: call on every rank.
    """
    from frcnn.trainer.evaluation import COCOEvaluator

    start = time.perf_counter()
    pairs = predict_dataset(model, cfg, dataset_dicts, batch_size=batch_size, device=device,
                            num_workers=num_workers)  # fmt: skip
    gathered = all_gather_object(pairs)
    if not is_main_process():
        return {}
    evaluator = COCOEvaluator(meta, output_dir=output_dir)
    for rank_pairs in gathered:
        for record, prediction in rank_pairs:
            evaluator.process([record], [prediction])
    metrics = evaluator.evaluate()
    logger.info("evaluated %d images in %.1f s", len(evaluator.img_ids), time.perf_counter() - start)
    return metrics

