"""Torch face of ``frcnn::BatchedNMS``: per-image greedy NMS with groups, fixed-size -1 padded output.

Importing this module registers the custom op ``torch.ops.frcnn.batched_nms`` (with a fake kernel for
tracing/export). The PyTorch model calls :func:`batched_nms`.

Algorithm (exact greedy NMS, pure torch; docs/ops.md has the cost):

1. candidates are the boxes with score > score_threshold, stably sorted by score descending;
2. the sorted candidates are processed in chunks of ``CHUNK``. A chunk is first checked against the boxes
   kept so far (one [kept, CHUNK] IoU matrix; kept <= max_output), then resolved internally: with the
   strict upper-triangular suppression matrix ``S`` of the chunk, a sequential sweep over its rows gives
   the greedy keep vector (each kept row clears the candidates it suppresses);
3. it stops as soon as ``max_output`` boxes are kept. No N x N matrix is ever built.

``max_candidates`` (the GPU kernel's candidate cap, an attribute of the ONNX node) is accepted and ignored:
this face is exact for any number of candidates.
"""

from __future__ import annotations

import math

import torch
from frcnn.plugins.batched_nms import DEFAULT_MAX_CANDIDATES, TORCH_OP, float32_at_most
from torch import Tensor

__all__ = ["CHUNK", "batched_nms"]

CHUNK = 256
"""Candidates resolved together; bounds the working set to CHUNK x max(CHUNK, max_output)."""


def _iou(a: Tensor, area_a: Tensor, b: Tensor, area_b: Tensor) -> Tensor:
    """[Na, Nb] IoU, torchvision's float order: inter / (area_a + area_b - inter), width = x2 - x1."""
    w = (torch.minimum(a[:, None, 2], b[None, :, 2]) - torch.maximum(a[:, None, 0], b[None, :, 0])).clamp(
        min=0
    )
    h = (torch.minimum(a[:, None, 3], b[None, :, 3]) - torch.maximum(a[:, None, 1], b[None, :, 1])).clamp(
        min=0
    )
    inter = w * h
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def _resolve_chunk(suppress: Tensor, alive: Tensor) -> Tensor:
    """Greedy keep vector of a chunk: keep_j = alive_j & !any_{i<j}(keep_i & suppress[i, j]).

    A plain sequential sweep over the chunk's rows (NumPy on the host): its cost is bounded by CHUNK row
    updates, whatever the suppression chains look like (a fixed-point iteration needs as many matrix
    products as the longest chain, which overlapping boxes of an untrained RPN make long).
    """
    s = suppress.cpu().numpy()
    keep = alive.cpu().numpy().copy()
    for i in range(keep.shape[0]):
        if keep[i]:
            keep &= ~s[i]
    return torch.from_numpy(keep).to(alive.device)


def _nms_one(
    boxes: Tensor,
    scores: Tensor,
    groups: Tensor,
    iou_threshold: float,
    score_threshold: float,
    max_output: int,
) -> Tensor:
    """Kept indices (int64, <= max_output, best first) of one image: boxes [N, 4], scores [N], groups [N]."""
    valid = scores.float() > score_threshold
    key = torch.where(valid, scores.float(), torch.full_like(scores, -math.inf, dtype=torch.float32))
    order = torch.argsort(key, descending=True, stable=True)[: int(valid.sum())]
    cand = boxes[order].float()
    area = (cand[:, 2] - cand[:, 0]) * (cand[:, 3] - cand[:, 1])
    group = groups[order]
    thr = float32_at_most(iou_threshold)
    kept: list[Tensor] = []
    num_kept = 0
    kept_pos = order[:0]
    for start in range(0, order.numel(), CHUNK):
        if num_kept >= max_output:
            break
        end = min(start + CHUNK, order.numel())
        c_box, c_area, c_group = cand[start:end], area[start:end], group[start:end]
        alive = torch.ones(end - start, dtype=torch.bool, device=boxes.device)
        if num_kept > 0:
            hit = (_iou(cand[kept_pos], area[kept_pos], c_box, c_area) > thr) & (
                group[kept_pos][:, None] == c_group[None, :]
            )
            alive = ~hit.any(0)
        rank = torch.arange(end - start, device=boxes.device)
        inside = (_iou(c_box, c_area, c_box, c_area) > thr) & (c_group[:, None] == c_group[None, :])
        inside &= rank[:, None] < rank[None, :]  # strict upper triangle (torch.triu on bool is slow)
        local = _resolve_chunk(inside, alive).nonzero().view(-1)[: max_output - num_kept] + start
        kept.append(local)
        kept_pos = torch.cat([kept_pos, local])
        num_kept += local.numel()
    return order[kept_pos]


@torch.library.custom_op(TORCH_OP, mutates_args=())
def _batched_nms_op(
    boxes: Tensor,
    scores: Tensor,
    groups: Tensor,
    iou_threshold: float,
    score_threshold: float,
    max_output: int,
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
) -> tuple[Tensor, Tensor]:
    b = boxes.shape[0]
    num = torch.zeros(b, dtype=torch.int32, device=boxes.device)
    indices = torch.full((b, max_output), -1, dtype=torch.int32, device=boxes.device)
    for i in range(b):
        keep = _nms_one(boxes[i], scores[i], groups[i], iou_threshold, score_threshold, max_output)
        num[i] = keep.numel()
        indices[i, : keep.numel()] = keep.to(torch.int32)
    return num, indices


@_batched_nms_op.register_fake
def _(boxes, scores, groups, iou_threshold, score_threshold, max_output,
      max_candidates=DEFAULT_MAX_CANDIDATES):
    b = boxes.shape[0]
    return (
        boxes.new_empty((b,), dtype=torch.int32),
        boxes.new_empty((b, max_output), dtype=torch.int32),
    )


def batched_nms(
    boxes: Tensor,
    scores: Tensor,
    groups: Tensor,
    iou_threshold: float,
    score_threshold: float,
    max_output: int,
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
) -> tuple[Tensor, Tensor]:
    """Greedy NMS per image; boxes of different groups never suppress each other (``torch.ops.frcnn.batched_nms``).

    Args:
        boxes: [B, N, 4] float (x1, y1, x2, y2); scores: [B, N] float; groups: [B, N] int32 (or int64).
        iou_threshold: a box is suppressed by a kept box of its group when IoU > threshold (strictly).
        score_threshold: a candidate needs score > threshold (-inf: only -inf and NaN scores drop out).
        max_output: K, kept boxes per image at most.
        max_candidates: the GPU kernel's candidate cap (>= 1), carried to the exported node; ignored here
            (exact for any N). The kernel is exact when at most this many scores exceed score_threshold.
    Returns:
        num: [B] int32 kept boxes per image; indices: [B, K] int32 into N, sorted by score descending
        (ties: lower index first), padded with -1.
    """
    if boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"batched_nms: boxes must be [B, N, 4], got {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:2] or groups.shape != boxes.shape[:2]:
        raise ValueError(
            f"batched_nms: scores {tuple(scores.shape)} and groups {tuple(groups.shape)} must be "
            f"[B, N] = {tuple(boxes.shape[:2])}"
        )
    if max_output < 0:
        raise ValueError(f"batched_nms: max_output must be >= 0, got {max_output}")
    if max_candidates < 1:
        raise ValueError(f"batched_nms: max_candidates must be >= 1, got {max_candidates}")
    return torch.ops.frcnn.batched_nms(
        boxes, scores, groups.to(torch.int32), float(iou_threshold), float(score_threshold), int(max_output),
        int(max_candidates),
    )
