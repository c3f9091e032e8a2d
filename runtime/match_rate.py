"""Precision-aware parity: how many reference detections a lower-precision model still finds (numpy only).

An INT8 (or fp16) model is not expected to reproduce fp32 to 1e-4; it is expected to find the same objects.
``match_detections`` pairs every reference detection (highest score first) with the unmatched deployed
detection of the same class that overlaps it most, if that IoU is >= ``min_iou`` and the scores differ by at
most ``score_atol``; the report gives the match rate (matched / reference detections) instead of failing on
the first difference. ``frcnn parity --precision int8`` uses PRECISION_DEFAULTS["int8"].
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from frcnn.runtime.contract import COUNT_OUTPUT, DETECTION_OUTPUT_NAMES

PRECISION_DEFAULTS = {"int8": {"min_iou": 0.9, "score_atol": 0.1, "min_match_rate": 0.9}}
"""Per precision: IoU and |score delta| for a match, and the match rate the parity verdict requires."""
SHOWN_SCORE = 0.5
"""The score above which detections are usually shown (detectron2's demo ``--confidence-threshold``):
``frcnn parity --precision`` also reports the match rate of the reference detections above it."""


@dataclass
class MatchReport:
    """Matched / reference / deployed detection counts, and the IoU and |score delta| of the matches."""

    reference: int = 0
    deployed: int = 0
    matched: int = 0
    ious: list[float] = field(default_factory=list)
    score_deltas: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """matched / reference (1.0 when neither side has a detection)."""
        return self.matched / self.reference if self.reference else (1.0 if not self.deployed else 0.0)

    def __add__(self, other: MatchReport) -> MatchReport:
        return MatchReport(self.reference + other.reference, self.deployed + other.deployed,
                           self.matched + other.matched, self.ious + other.ious,
                           self.score_deltas + other.score_deltas)  # fmt: skip

    def summary(self) -> str:
        iou = f"min IoU {min(self.ious):.3f}" if self.ious else "no matches"
        dscore = f"max |dscore| {max(self.score_deltas):.3f}" if self.score_deltas else ""
        return (f"{self.matched}/{self.reference} reference detections matched ({100 * self.rate:.1f} %), "
                f"{self.deployed} deployed; {iou} {dscore}".strip())


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [N, M] of boxes a [N, 4] and b [M, 4] (x1, y1, x2, y2); 0 where the union is empty."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def match_detections(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], min_iou: float,
                     score_atol: float, min_score: float = 0.0) -> MatchReport:
    """Greedy matching of one image's detections (``boxes`` [N, 4], ``scores`` [N], ``classes`` [N]).

    Only reference detections scoring >= ``min_score`` are counted and matched; the deployed side keeps all
    of its detections, so one just under the threshold still matches a reference just above it."""
    rb, rs, rc = (np.asarray(ref[k]) for k in DETECTION_OUTPUT_NAMES)  # boxes, scores, classes
    keep = rs >= min_score
    rb, rs, rc = rb[keep], rs[keep], rc[keep]
    gb, gs, gc = (np.asarray(got[k]) for k in DETECTION_OUTPUT_NAMES)
    report = MatchReport(reference=len(rs), deployed=len(gs))
    if not len(rs) or not len(gs):
        return report
    iou = box_iou(rb, gb)
    ok = (rc[:, None] == gc[None, :]) & (iou >= min_iou) & (np.abs(rs[:, None] - gs[None, :]) <= score_atol)
    taken = np.zeros(len(gs), bool)
    for i in np.argsort(-rs, kind="stable"):
        candidates = np.flatnonzero(ok[i] & ~taken)
        if not len(candidates):
            continue
        j = candidates[np.argmax(iou[i, candidates])]
        taken[j] = True
        report.matched += 1
        report.ious.append(float(iou[i, j]))
        report.score_deltas.append(float(abs(rs[i] - gs[j])))
    return report


def batch_rows(outputs: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The model's padded outputs (``num_detections`` [B], ``boxes`` [B, T, 4], ...) -> valid rows per image."""
    num = np.asarray(outputs[COUNT_OUTPUT]).reshape(-1)
    return [{k: np.asarray(outputs[k])[b, : int(n)] for k in DETECTION_OUTPUT_NAMES}
            for b, n in enumerate(num)]  # fmt: skip


def match_batches(reference: Iterable[Mapping[str, np.ndarray]], deployed: Iterable[Mapping[str, np.ndarray]],
                  min_iou: float, score_atol: float, min_score: float = 0.0) -> MatchReport:
    """One MatchReport over every image of paired output batches."""
    total = MatchReport()
    for ref_batch, got_batch in zip(reference, deployed):
        for r, g in zip(batch_rows(ref_batch), batch_rows(got_batch)):
            total = total + match_detections(r, g, min_iou, score_atol, min_score)
    return total


def run_match_rate(args: Any, reference: Iterable[Mapping[str, np.ndarray]],
                   deployed: Iterable[Mapping[str, np.ndarray]], deployed_name: str, batches: int) -> int:
    """``frcnn parity --precision P``: print the match report; exit 0 when the rate meets P's default."""
    limits = PRECISION_DEFAULTS[args.precision]
    min_score = float(getattr(args, "min_score", 0.0) or 0.0)
    reference, deployed = list(reference), list(deployed)
    report = match_batches(reference, deployed, limits["min_iou"], limits["score_atol"], min_score)
    print(f"parity ({args.precision}): {args.weights} (pytorch) vs {args.model} ({deployed_name}) on {batches} "
          f"batch(es) from {args.images}")
    scope = f"reference detections scoring >= {min_score:g}" if min_score > 0 else "all reference detections"
    print(f"  {report.summary()} [{scope}]")
    if min_score < SHOWN_SCORE:  # what a user sees (detectron2's demo threshold), for information
        shown = match_batches(reference, deployed, limits["min_iou"], limits["score_atol"], SHOWN_SCORE)
        print(f"  of those scoring >= {SHOWN_SCORE:g}: {shown.summary()} (information, not the verdict)")
    print(f"  match: same class, IoU >= {limits['min_iou']}, |dscore| <= {limits['score_atol']}; required match "
          f"rate {100 * limits['min_match_rate']:.0f} %")
    passed = report.rate >= limits["min_match_rate"]
    print("PARITY PASSED" if passed else "PARITY FAILED")
    return 0 if passed else 1
