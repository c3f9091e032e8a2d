"""Matcher: assign every prediction (anchor or proposal) to a ground-truth box by IoU (detectron2 `Matcher`).

Given an IoU matrix M [G, N] (G ground-truth boxes x N predictions), each prediction n is matched to the
ground truth with the highest IoU, `matches[n] = argmax_g M[g, n]` (first index on ties), and labelled by
where that best IoU falls among the thresholds:

    thresholds [t_1 .. t_k], labels [l_0 .. l_k] (each -1, 0 or 1):
    best < t_1 -> l_0;  t_1 <= best < t_2 -> l_1;  ...;  best >= t_k -> l_k

(the RPN uses [0.3, 0.7] / [0, -1, 1]: background, ignore, foreground; the ROI heads [0.5] / [0, 1]).

With `allow_low_quality_matches`, for every ground truth the predictions whose IoU equals that ground truth's
highest IoU (every tie) are labelled 1, even when the IoU is below the foreground threshold; their `matches`
entry is left as the argmax above (detectron2's behaviour, quirks included: a ground truth that overlaps
nothing has highest IoU 0, so every prediction with IoU 0 to it becomes foreground).

With no ground truth (G = 0) every prediction gets label l_0 and match index 0.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["Matcher", "pairwise_iou"]


def pairwise_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of every pair (detectron2 `pairwise_iou`, width = x2 - x1, no +1).

    boxes1: Tensor[N, 4]; boxes2: Tensor[M, 4] (x1, y1, x2, y2) -> Tensor[N, M]; 0 where the boxes do not
    intersect (also for empty boxes).
    """
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    width_height = torch.min(boxes1[:, None, 2:], boxes2[:, 2:]) - torch.max(
        boxes1[:, None, :2], boxes2[:, :2]
    )
    width_height = width_height.clamp(min=0)
    inter = width_height.prod(dim=2)  # [N, M]
    return torch.where(
        inter > 0,
        inter / (area1[:, None] + area2 - inter),
        torch.zeros(1, dtype=inter.dtype, device=inter.device),
    )


class Matcher:
    """Label predictions foreground (1) / background (0) / ignored (-1) from an IoU matrix (module docstring).

    Args:
        thresholds: increasing IoU thresholds, the first > 0, e.g. [0.3, 0.7].
        labels: len(thresholds) + 1 labels in {-1, 0, 1}, e.g. [0, -1, 1].
        allow_low_quality_matches: also label 1 every best prediction of each ground truth.
    """

    def __init__(
        self, thresholds: Sequence[float], labels: Sequence[int], allow_low_quality_matches: bool = False
    ) -> None:
        thresholds = [float(t) for t in thresholds]
        if not thresholds or thresholds[0] <= 0:
            raise ValueError(f"Matcher thresholds must be non-empty with the first > 0, got {thresholds}.")
        if any(low > high for low, high in itertools.pairwise(thresholds)):
            raise ValueError(f"Matcher thresholds must be increasing, got {thresholds}.")
        if len(labels) != len(thresholds) + 1:
            raise ValueError(
                f"Matcher needs len(thresholds) + 1 labels, got thresholds {thresholds} and labels {list(labels)}."
            )
        if any(label not in (-1, 0, 1) for label in labels):
            raise ValueError(f"Matcher labels must each be -1, 0 or 1, got {list(labels)}.")
        self.thresholds = [float("-inf")] + thresholds + [float("inf")]
        self.labels = [int(label) for label in labels]
        self.allow_low_quality_matches = bool(allow_low_quality_matches)

    def __call__(self, match_quality_matrix: Tensor) -> tuple[Tensor, Tensor]:
        """match_quality_matrix: Tensor[G, N] IoUs (>= 0) ->
        (matches Tensor[N] int64 in [0, G), match_labels Tensor[N] int8 in {-1, 0, 1})."""
        if match_quality_matrix.dim() != 2:
            raise ValueError(
                f"Matcher expects a [G, N] matrix, got shape {list(match_quality_matrix.shape)}."
            )
        num_preds = match_quality_matrix.shape[1]
        device = match_quality_matrix.device
        if match_quality_matrix.shape[0] == 0 or num_preds == 0:
            matches = torch.zeros(num_preds, dtype=torch.int64, device=device)
            labels = torch.full((num_preds,), self.labels[0], dtype=torch.int8, device=device)
            return matches, labels

        matched_vals, matches = match_quality_matrix.max(dim=0)
        match_labels = torch.ones(num_preds, dtype=torch.int8, device=device)
        for label, low, high in zip(self.labels, self.thresholds[:-1], self.thresholds[1:]):
            in_range = (matched_vals >= low) & (matched_vals < high)
            match_labels = torch.where(in_range, torch.full_like(match_labels, label), match_labels)

        if self.allow_low_quality_matches:
            highest_per_gt = match_quality_matrix.max(dim=1).values  # [G]
            is_best = (match_quality_matrix == highest_per_gt[:, None]).any(dim=0)  # [N]
            match_labels = torch.where(is_best, torch.ones_like(match_labels), match_labels)
        return matches, match_labels
