"""polygraphy glue: our PyTorch model as a runner, and a detection-aware comparison.

    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator
    runners = [OnnxrtRunner(SessionFromOnnx("model.onnx")), TorchRunner(model)]
    results = Comparator.run(runners, data_loader=[{"images": ..., "image_sizes": ...}])
    ok = bool(Comparator.compare_accuracy(results, compare_func=DetectionCompareFunc()))

``TorchRunner`` takes and returns the same name -> array dicts as the ONNX file (inputs ``images`` uint8
[B, 3, H, W] and ``image_sizes`` int32 [B, 2]; outputs ``num_detections``, ``boxes``, ``scores``, ``classes``
and, with ``return_proposals``, ``proposals`` / ``num_proposals``; Mask R-CNN models add ``masks``). Detections
are compared as sets, not by index: two detections match when their class is equal, IoU >= ``min_iou`` and
|score difference| <= ``score_atol`` (the outputs of two backends may order equal scores differently). When both
sides have ``masks``, each matched pair's raw 28x28 probabilities must agree within ``mask_atol`` and its two
masks, pasted on their own boxes (detectron2's paste, threshold 0.5; ``frcnn.runtime.masks``), must have IoU >=
``mask_min_iou``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from frcnn.runtime.backends.base import polygraphy_input_metadata
from frcnn.runtime.contract import MASK_OUTPUT_NAMES, PROPOSAL_NAMES
from frcnn.runtime.contract import OUTPUT_NAMES as DETECTION_KEYS
from frcnn.runtime.masks import paste_masks_in_image
from frcnn.runtime.tolerances import (
    PARITY_MASK_ATOL,
    PARITY_MASK_MIN_IOU,
    PARITY_MIN_IOU,
    PARITY_SCORE_ATOL,
    PROPOSAL_ATOL,
    PROPOSAL_RTOL,
)
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata


class TorchRunner(BaseRunner):
    """Runs a GeneralizedRCNN on CPU with the exported model's name -> array interface.

    Args:
        model: GeneralizedRCNN (put in eval mode on activation).
        return_proposals: also return ``proposals`` [B, P, 4] and ``num_proposals`` [B] int32.
    """

    def __init__(self, model: Any, name: str | None = None, return_proposals: bool = False) -> None:
        super().__init__(name=name, prefix="pytorch-cpu-runner")
        self.model = model
        self.return_proposals = return_proposals

    def activate_impl(self) -> None:
        self.model.eval()

    def get_input_metadata_impl(self) -> TensorMetadata:
        return polygraphy_input_metadata()

    def infer_impl(self, feed_dict: Mapping[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        import torch

        images = torch.from_numpy(np.ascontiguousarray(feed_dict["images"]))
        sizes = torch.from_numpy(np.ascontiguousarray(feed_dict["image_sizes"]))
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model.inference(images, sizes, return_proposals=self.return_proposals)
        self.inference_time = time.perf_counter() - start
        keys = DETECTION_KEYS + tuple(k for k in MASK_OUTPUT_NAMES if k in out)
        keys += PROPOSAL_NAMES if self.return_proposals else ()
        return OrderedDict((k, out[k].detach().cpu().numpy()) for k in keys)

    def deactivate_impl(self) -> None:
        pass


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[Na, Nb] IoU of boxes a [Na, 4] and b [Nb, 4] (x1, y1, x2, y2; width = x2 - x1), float64; 0 if empty."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


@dataclass
class MatchReport:
    """Outcome of a set comparison; ``bool(report)`` is the verdict, ``str(report)`` explains it."""

    passed: bool = True
    problems: list[str] = field(default_factory=list)
    matched: int = 0
    min_iou: float = 1.0
    max_score_delta: float = 0.0
    max_proposal_delta: float = 0.0
    max_proposal_rel_delta: float = 0.0
    masks_compared: int = 0
    max_mask_delta: float = 0.0
    min_mask_iou: float = 1.0
    mask_failures: int = 0

    def __bool__(self) -> bool:
        return self.passed

    def fail(self, message: str) -> None:
        self.passed = False
        self.problems.append(message)

    def __str__(self) -> str:
        head = (f"{'PASSED' if self.passed else 'FAILED'}: {self.matched} detections matched, min IoU "
                f"{self.min_iou:.6f}, max |dscore| {self.max_score_delta:.2e}, max |dproposal| "
                f"{self.max_proposal_delta:.2e} px (relative {self.max_proposal_rel_delta:.1e})")
        if self.masks_compared:
            head += (f"; {self.masks_compared} masks, max |dprob| {self.max_mask_delta:.2e}, min pasted-mask IoU "
                     f"{self.min_mask_iou:.4f}")
        return head + "".join(f"\n  {p}" for p in self.problems[:10])


@dataclass(frozen=True)
class Tolerances:
    """What makes two detections (and their masks) the same: see :func:`compare_detections`."""

    min_iou: float = PARITY_MIN_IOU
    score_atol: float = PARITY_SCORE_ATOL
    mask_atol: float = PARITY_MASK_ATOL
    mask_min_iou: float = PARITY_MASK_MIN_IOU


def pasted_mask_iou(mask_a: np.ndarray, box_a: np.ndarray, mask_b: np.ndarray, box_b: np.ndarray) -> float:
    """IoU of two [M, M] mask probabilities pasted (threshold 0.5) on their own boxes (x1, y1, x2, y2) in one
    image that holds both boxes; 1.0 when both pasted masks are empty."""
    boxes = np.stack([box_a, box_b]).astype(np.float32)
    hw = (int(np.ceil(max(boxes[:, 3].max(), 0.0))) + 2, int(np.ceil(max(boxes[:, 2].max(), 0.0))) + 2)
    pa, pb = paste_masks_in_image(np.stack([mask_a, mask_b]), boxes, hw)
    union = int((pa | pb).sum())
    return float((pa & pb).sum()) / union if union else 1.0


def _compare_masks(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], i: int, pair: tuple[int, int],
                   tol: Tolerances, report: MatchReport) -> None:
    j, k = pair
    ma, mb = a["masks"][i, j], b["masks"][i, k]
    delta = float(np.abs(ma.astype(np.float64) - mb).max())
    iou = pasted_mask_iou(ma, a["boxes"][i, j], mb, b["boxes"][i, k])
    report.masks_compared += 1
    report.max_mask_delta = max(report.max_mask_delta, delta)
    report.min_mask_iou = min(report.min_mask_iou, iou)
    if delta > tol.mask_atol or iou < tol.mask_min_iou:
        report.mask_failures += 1
        report.fail(f"image {i}: mask of detection {j} (class {int(a['classes'][i, j])}) differs: max |dprob| "
                    f"{delta:.3g} (atol {tol.mask_atol:g}), pasted-mask IoU {iou:.4f} (min {tol.mask_min_iou:g})")


def _match_image(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], i: int, tol: Tolerances,
                 report: MatchReport) -> None:
    na, nb = int(a["num_detections"][i]), int(b["num_detections"][i])
    if na != nb:
        report.fail(f"image {i}: {na} detections vs {nb}")
    n = min(na, nb)
    boxes_a, boxes_b = a["boxes"][i, :na], b["boxes"][i, :nb]
    iou = box_iou(boxes_a, boxes_b) if na and nb else np.zeros((na, nb))
    delta = np.abs(a["scores"][i, :na, None].astype(np.float64) - b["scores"][i, None, :nb])
    ok = (a["classes"][i, :na, None] == b["classes"][i, None, :nb]) & (iou >= tol.min_iou)
    ok &= delta <= tol.score_atol
    with_masks = "masks" in a and "masks" in b
    used = np.zeros(nb, dtype=bool)
    for j in range(na):
        candidates = np.flatnonzero(ok[j] & ~used)
        if candidates.size == 0:
            if j < n:
                report.fail(f"image {i}: detection {j} (class {int(a['classes'][i, j])}, score "
                            f"{float(a['scores'][i, j]):.6f}, box {np.round(boxes_a[j], 3).tolist()}) has no match")
            continue
        k = candidates[np.argmax(iou[j, candidates])]
        used[k] = True
        report.matched += 1
        report.min_iou = min(report.min_iou, float(iou[j, k]))
        report.max_score_delta = max(report.max_score_delta, float(delta[j, k]))
        if with_masks:
            _compare_masks(a, b, i, (j, k), tol, report)


def _match_proposals(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], atol: float, rtol: float,
                     report: MatchReport) -> None:
    """Proposals agree row by row within ``atol + rtol * |b|``; rows out of order (near-equal objectness
    logits) are searched for among the other side's rows."""
    for i in range(a["proposals"].shape[0]):
        na, nb = int(a["num_proposals"][i]), int(b["num_proposals"][i])
        if na != nb:
            report.fail(f"image {i}: {na} proposals vs {nb}")
            continue
        pa, pb = a["proposals"][i, :na].astype(np.float64), b["proposals"][i, :nb].astype(np.float64)
        excess = (np.abs(pa - pb) - rtol * np.abs(pb)).max(axis=1) if na else np.zeros(0)
        delta = np.abs(pa - pb).max(axis=1) if na else np.zeros(0)
        for j in np.flatnonzero(excess > atol):
            k = int(np.argmin((np.abs(pb - pa[j]) - rtol * np.abs(pb)).max(axis=1)))
            delta[j] = np.abs(pb[k] - pa[j]).max()
            if (np.abs(pb[k] - pa[j]) - rtol * np.abs(pb[k])).max() > atol:
                report.fail(f"image {i}: proposal {j} {np.round(pa[j], 4).tolist()} differs by "
                            f"{delta[j]:.3g} from every proposal of the other side")
        report.max_proposal_delta = max(report.max_proposal_delta, float(delta.max()) if na else 0.0)
        if na:
            relative = delta / np.maximum(np.abs(pb).max(axis=1), 1.0)
            report.max_proposal_rel_delta = max(report.max_proposal_rel_delta, float(relative.max()))


def compare_detections(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], *,
                       min_iou: float = PARITY_MIN_IOU, score_atol: float = PARITY_SCORE_ATOL,
                       proposal_atol: float = PROPOSAL_ATOL, proposal_rtol: float = PROPOSAL_RTOL,
                       mask_atol: float = PARITY_MASK_ATOL, mask_min_iou: float = PARITY_MASK_MIN_IOU) -> MatchReport:
    """Compare two output dicts (see module docstring); proposals too when both sides have them, masks when
    both sides have them (one side only: a failure, the two models are not the same kind).

    Proposal coordinates agree when |a - b| <= proposal_atol + proposal_rtol * |b| (defaults and their
    reasons: frcnn.runtime.tolerances).
    """
    report = MatchReport()
    missing = [k for k in DETECTION_KEYS if k not in a or k not in b]
    if missing:
        report.fail(f"outputs {missing} missing on one side")
        return report
    if a["num_detections"].shape != b["num_detections"].shape:
        report.fail(f"batch sizes differ: {a['num_detections'].shape} vs {b['num_detections'].shape}")
        return report
    sides = [("masks" in a), ("masks" in b)]
    if sides[0] != sides[1]:
        report.mask_failures += 1
        report.fail(f"only the {'first' if sides[0] else 'second'} side has a 'masks' output (Mask R-CNN vs a "
                    "box-only model): compare models of the same config")
    tol = Tolerances(min_iou, score_atol, mask_atol, mask_min_iou)
    for i in range(a["num_detections"].shape[0]):
        _match_image(a, b, i, tol, report)
    if all(k in a and k in b for k in PROPOSAL_NAMES):
        _match_proposals(a, b, proposal_atol, proposal_rtol, report)
    return report


class DetectionCompareFunc:
    """polygraphy ``compare_func``: ``{"detections": MatchReport}`` per iteration (see compare_detections)."""

    def __init__(self, min_iou: float = PARITY_MIN_IOU, score_atol: float = PARITY_SCORE_ATOL,
                 proposal_atol: float = PROPOSAL_ATOL, proposal_rtol: float = PROPOSAL_RTOL,
                 mask_atol: float = PARITY_MASK_ATOL, mask_min_iou: float = PARITY_MASK_MIN_IOU) -> None:
        self.options = {"min_iou": min_iou, "score_atol": score_atol, "proposal_atol": proposal_atol,
                        "proposal_rtol": proposal_rtol, "mask_atol": mask_atol, "mask_min_iou": mask_min_iou}
        self.reports: list[MatchReport] = []

    def __call__(self, result0: Mapping[str, Any], result1: Mapping[str, Any]) -> OrderedDict[str, MatchReport]:
        a = {k: np.asarray(v.load() if hasattr(v, "load") else v) for k, v in result0.items()}
        b = {k: np.asarray(v.load() if hasattr(v, "load") else v) for k, v in result1.items()}
        report = compare_detections(a, b, **self.options)
        self.reports.append(report)
        return OrderedDict(detections=report)


__all__ = [
    "DETECTION_KEYS",
    "DetectionCompareFunc",
    "MatchReport",
    "Tolerances",
    "TorchRunner",
    "box_iou",
    "compare_detections",
    "pasted_mask_iou",
]
