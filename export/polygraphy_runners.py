"""polygraphy glue: our PyTorch model as a runner, and a detection-aware comparison.

    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator
    runners = [OnnxrtRunner(SessionFromOnnx("model.onnx")), TorchRunner(model)]
    results = Comparator.run(runners, data_loader=[{"images": ..., "image_sizes": ...}])
    ok = bool(Comparator.compare_accuracy(results, compare_func=DetectionCompareFunc()))

``TorchRunner`` takes and returns the same name -> array dicts as the ONNX file (inputs ``images`` uint8
[B, 3, H, W] and ``image_sizes`` int32 [B, 2]; outputs ``num_detections``, ``boxes``, ``scores``, ``classes``
and, with ``return_proposals``, ``proposals`` / ``num_proposals``). Detections are compared as sets, not by
index: two detections match when their class is equal, IoU >= ``min_iou`` and |score difference| <=
``score_atol`` (the outputs of two backends may order equal scores differently).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from frcnn.runtime.backends.base import polygraphy_input_metadata
from frcnn.runtime.contract import OUTPUT_NAMES as DETECTION_KEYS
from frcnn.runtime.contract import PROPOSAL_NAMES
from frcnn.runtime.tolerances import PARITY_MIN_IOU, PARITY_SCORE_ATOL, PROPOSAL_ATOL, PROPOSAL_RTOL
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
        keys = DETECTION_KEYS + (PROPOSAL_NAMES if self.return_proposals else ())
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

    def __bool__(self) -> bool:
        return self.passed

    def fail(self, message: str) -> None:
        self.passed = False
        self.problems.append(message)

    def __str__(self) -> str:
        head = (f"{'PASSED' if self.passed else 'FAILED'}: {self.matched} detections matched, min IoU "
                f"{self.min_iou:.6f}, max |dscore| {self.max_score_delta:.2e}, max |dproposal| "
                f"{self.max_proposal_delta:.2e} px (relative {self.max_proposal_rel_delta:.1e})")
        return head + "".join(f"\n  {p}" for p in self.problems[:10])


def _match_image(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], i: int, min_iou: float,
                 score_atol: float, report: MatchReport) -> None:
    na, nb = int(a["num_detections"][i]), int(b["num_detections"][i])
    if na != nb:
        report.fail(f"image {i}: {na} detections vs {nb}")
    n = min(na, nb)
    boxes_a, boxes_b = a["boxes"][i, :na], b["boxes"][i, :nb]
    iou = box_iou(boxes_a, boxes_b) if na and nb else np.zeros((na, nb))
    delta = np.abs(a["scores"][i, :na, None].astype(np.float64) - b["scores"][i, None, :nb])
    ok = (a["classes"][i, :na, None] == b["classes"][i, None, :nb]) & (iou >= min_iou) & (delta <= score_atol)
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
                       proposal_atol: float = PROPOSAL_ATOL,
                       proposal_rtol: float = PROPOSAL_RTOL) -> MatchReport:
    """Compare two output dicts (see module docstring); proposals too when both sides have them.

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
    for i in range(a["num_detections"].shape[0]):
        _match_image(a, b, i, min_iou, score_atol, report)
    if all(k in a and k in b for k in PROPOSAL_NAMES):
        _match_proposals(a, b, proposal_atol, proposal_rtol, report)
    return report


class DetectionCompareFunc:
    """polygraphy ``compare_func``: ``{"detections": MatchReport}`` per iteration (see compare_detections)."""

    def __init__(self, min_iou: float = PARITY_MIN_IOU, score_atol: float = PARITY_SCORE_ATOL,
                 proposal_atol: float = PROPOSAL_ATOL, proposal_rtol: float = PROPOSAL_RTOL) -> None:
        self.min_iou, self.score_atol = min_iou, score_atol
        self.proposal_atol, self.proposal_rtol = proposal_atol, proposal_rtol
        self.reports: list[MatchReport] = []

    def __call__(self, result0: Mapping[str, Any], result1: Mapping[str, Any]) -> OrderedDict[str, MatchReport]:
        a = {k: np.asarray(v.load() if hasattr(v, "load") else v) for k, v in result0.items()}
        b = {k: np.asarray(v.load() if hasattr(v, "load") else v) for k, v in result1.items()}
        report = compare_detections(a, b, min_iou=self.min_iou, score_atol=self.score_atol,
                                    proposal_atol=self.proposal_atol, proposal_rtol=self.proposal_rtol)
        self.reports.append(report)
        return OrderedDict(detections=report)


__all__ = [
    "DETECTION_KEYS",
    "DetectionCompareFunc",
    "MatchReport",
    "TorchRunner",
    "box_iou",
    "compare_detections",
]
