"""Triton face of ``frcnn::BatchedNMS``: one program per image does select, sort and greedy NMS.

Why one kernel: a TensorRT AOT plugin launches exactly one kernel and gets no workspace, so the whole op
is a single launch whose only global memory is its inputs and outputs. Design (docs/ops.md, "Triton
kernel", has the cost model):

1. **select** (streaming top-``MAX_CANDIDATES``): each candidate gets a 64-bit key
   ``(order-preserving score bits << 32) | ~index`` (0 = fails the score threshold / NaN), so one
   descending order means "score descending, ties lower index first". The N candidates stream through in
   chunks of ``MAX_CANDIDATES``; a chunk that beats the running buffer's minimum is sorted ascending and
   merged by an element-wise maximum with the descending buffer (the bitonic top-k identity), and the
   buffer is re-sorted. The buffer lives in registers.
2. **NMS** over the sorted buffer in tiles of ``TILE`` candidates, in order, until ``MAX_OUTPUT`` boxes are
   kept: (a) candidates of the tile overlapping an already kept box of their group are removed (the kept
   indices are read back from the output row, ``KEPT_BLOCK`` at a time); (b) the tile's own greedy
   result is the fixed point of ``keep_j = alive_j and no i < j in the tile with keep_i and
   IoU_ij > threshold`` (same group), iterated from ``keep = alive`` (converges in <= TILE rounds,
   typically 2-4); (c) kept indices are appended to the output row.

Exactness: identical to torchvision ``batched_nms`` + top-K when the candidates passing the score
threshold number at most ``MAX_CANDIDATES``, and more generally whenever at least ``MAX_OUTPUT`` boxes are
kept among the top ``MAX_CANDIDATES`` (a box's fate depends only on higher-scored boxes).

Kernel arguments follow TensorRT's AOT plugin convention ``(inputs..., int32 extras..., outputs...)``:
``boxes, scores, groups, num_candidates, num_out, indices_out``; grid ``(B, 1, 1)``.
"""

from __future__ import annotations

import triton
import triton.language as tl
from frcnn.plugins import KERNEL_COMPILE_OPTIONS
from frcnn.plugins.batched_nms import float32_at_most

__all__ = [
    "MAX_CANDIDATES",
    "NUM_WARPS",
    "TILE",
    "batched_nms_kernel",
    "batched_nms_triton",
    "constexprs",
    "launch_grid",
    "signature",
]

MAX_CANDIDATES = 4096
"""Default candidate cap (top scores kept for NMS); RPN sees <= 5 * 1000 pre-NMS boxes per image."""
TILE = 64
KEPT_BLOCK = 64
NUM_WARPS = 32
"""One CTA of 1024 threads per image: 4 sort keys per thread (64 registers, no real spills) and the fastest
compile of the cap-4096 sort (~20 s per arch on a 2-core CPU; 8 warps: ~2 min)."""


@triton.jit
def _sort_keys(scores_ptr, row, start, n, SCORE_THRESHOLD: tl.constexpr, BLOCK: tl.constexpr):
    """[BLOCK] uint64 keys of candidates start..start+BLOCK (0 = not a candidate)."""
    offs = start + tl.arange(0, BLOCK)
    inb = offs < n
    s = tl.load(scores_ptr + row + offs, mask=inb, other=0.0).to(tl.float32)
    valid = inb & (s > SCORE_THRESHOLD)
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 ties with +0.0, as in torch.sort
    bits = s.to(tl.uint32, bitcast=True)
    order = tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)
    key = (order.to(tl.uint64) << 32) | (~offs.to(tl.uint32)).to(tl.uint64)
    return tl.where(valid, key, 0)


@triton.jit
def _iou(ax1, ay1, ax2, ay2, a_area, bx1, by1, bx2, by2, b_area):
    """torchvision nms IoU (width = x2 - x1, no +1); 0 / 0 = NaN never exceeds a threshold."""
    w = tl.maximum(tl.minimum(ax2, bx2) - tl.maximum(ax1, bx1), 0.0)
    h = tl.maximum(tl.minimum(ay2, by2) - tl.maximum(ay1, by1), 0.0)
    inter = w * h
    return tl.div_rn(inter, a_area + b_area - inter)


@triton.jit
def _load_boxes(boxes_ptr, groups_ptr, row, idx, mask):
    """Coordinates, area and group of candidates ``idx`` of one image."""
    p = boxes_ptr + (row + idx).to(tl.int64) * 4
    x1 = tl.load(p + 0, mask=mask, other=0.0).to(tl.float32)
    y1 = tl.load(p + 1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p + 2, mask=mask, other=0.0).to(tl.float32)
    y2 = tl.load(p + 3, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(groups_ptr + row + idx, mask=mask, other=-1)
    return x1, y1, x2, y2, (x2 - x1) * (y2 - y1), g


@triton.jit
def _bitonic_to_descending(x, LOG_N: tl.constexpr):
    """Sort a bitonic [2**LOG_N] uint64 sequence descending (Batcher's half-cleaner cascade)."""
    for d in tl.static_range(LOG_N):
        y = tl.reshape(x, [1 << d, 2, 1 << (LOG_N - d - 1)])
        half = tl.arange(0, 2)[None, :, None]
        a = tl.max(tl.where(half == 0, y, 0), axis=1)
        b = tl.max(tl.where(half == 1, y, 0), axis=1)
        hi = tl.maximum(a, b)[:, None, :]
        lo = tl.minimum(a, b)[:, None, :]
        x = tl.reshape(tl.where(half == 0, hi, lo), [1 << LOG_N])
    return x


@triton.jit
def _select_top(scores_ptr, row, n, SCORE_THRESHOLD: tl.constexpr, CAP: tl.constexpr):
    """[CAP] uint64 keys of the top-CAP candidates, sorted descending (zeros after the last one).

    Buffer (descending) and sorted chunk (ascending) -> element-wise max is bitonic and holds the top CAP
    of their union; one half-cleaner cascade sorts it again.
    """
    LOG_CAP: tl.constexpr = CAP.bit_length() - 1
    buf = tl.zeros([CAP], dtype=tl.uint64)
    for start in range(0, n, CAP):
        keys = _sort_keys(scores_ptr, row, start, n, SCORE_THRESHOLD, CAP)
        if tl.max(keys, axis=0) > tl.min(buf, axis=0):
            buf = _bitonic_to_descending(tl.maximum(buf, tl.sort(keys)), LOG_CAP)
    return buf


@triton.jit
def _removed_by_kept(boxes_ptr, groups_ptr, idx_row_ptr, row, kept, x1, y1, x2, y2, area, g, removed,
                     IOU_THRESHOLD: tl.constexpr, KB: tl.constexpr):
    """``removed`` [TILE] or-ed with: overlaps a kept box (output row [0, kept)) of its group."""
    for k0 in range(0, kept, KB):
        kpos = k0 + tl.arange(0, KB)
        km = kpos < kept
        kidx = tl.load(idx_row_ptr + kpos, mask=km, other=0, cache_modifier=".cg")
        kx1, ky1, kx2, ky2, karea, kg = _load_boxes(boxes_ptr, groups_ptr, row, kidx, km)
        iou = _iou(kx1[:, None], ky1[:, None], kx2[:, None], ky2[:, None], karea[:, None],
                   x1[None, :], y1[None, :], x2[None, :], y2[None, :], area[None, :])
        hit = km[:, None] & (kg[:, None] == g[None, :]) & (iou > IOU_THRESHOLD)
        removed = removed | (tl.max(hit.to(tl.int32), axis=0) > 0)
    return removed


@triton.jit
def _greedy_tile(x1, y1, x2, y2, area, g, alive, IOU_THRESHOLD: tl.constexpr, TILE_SIZE: tl.constexpr):
    """Greedy NMS inside one score-sorted tile: fixed point of keep_j = alive_j & !any_{i<j}(keep_i & M_ij)."""
    i = tl.arange(0, TILE_SIZE)
    iou = _iou(x1[:, None], y1[:, None], x2[:, None], y2[:, None], area[:, None],
               x1[None, :], y1[None, :], x2[None, :], y2[None, :], area[None, :])
    m = (i[:, None] < i[None, :]) & (g[:, None] == g[None, :]) & (iou > IOU_THRESHOLD)
    keep = alive
    changed = tl.sum(alive.to(tl.int32), axis=0) + 1
    while changed > 0:
        hit = tl.max((m & keep[:, None]).to(tl.int32), axis=0) > 0
        new_keep = alive & (hit == 0)
        changed = tl.sum((new_keep != keep).to(tl.int32), axis=0)
        keep = new_keep
    return keep


@triton.jit
def batched_nms_kernel(
    boxes_ptr, scores_ptr, groups_ptr,
    num_candidates,
    num_ptr, indices_ptr,
    IOU_THRESHOLD: tl.constexpr, SCORE_THRESHOLD: tl.constexpr, MAX_OUTPUT: tl.constexpr,
    CAP: tl.constexpr, TILE_SIZE: tl.constexpr, KB: tl.constexpr,
):
    """boxes [B, N, 4], scores [B, N], groups [B, N] int32 -> num [B] int32, indices [B, K] int32; grid (B,)."""
    b = tl.program_id(0)
    row = b * num_candidates
    idx_row = indices_ptr + b.to(tl.int64) * MAX_OUTPUT
    buf = _select_top(scores_ptr, row, num_candidates, SCORE_THRESHOLD, CAP)
    n_valid = tl.sum((buf > 0).to(tl.int32), axis=0)
    NT: tl.constexpr = CAP // TILE_SIZE
    keys2d = tl.reshape(buf, [NT, TILE_SIZE])
    tile_of = tl.arange(0, NT)[:, None]
    lane = tl.arange(0, TILE_SIZE)
    kept = n_valid * 0
    t = n_valid * 0
    while (t * TILE_SIZE < n_valid) & (kept < MAX_OUTPUT):
        key = tl.max(tl.where(tile_of == t, keys2d, 0), axis=0)
        valid = key > 0
        idx = tl.where(valid, (~key.to(tl.uint32)).to(tl.int32), 0)
        x1, y1, x2, y2, area, g = _load_boxes(boxes_ptr, groups_ptr, row, idx, valid)
        removed = _removed_by_kept(boxes_ptr, groups_ptr, idx_row, row, kept, x1, y1, x2, y2, area, g,
                                   valid == 0, IOU_THRESHOLD, KB)
        keep = _greedy_tile(x1, y1, x2, y2, area, g, valid & (removed == 0), IOU_THRESHOLD, TILE_SIZE)
        k = keep.to(tl.int32)
        pos = kept + tl.cumsum(k, axis=0) - k
        tl.store(idx_row + pos, idx, mask=keep & (pos < MAX_OUTPUT))
        kept = tl.minimum(kept + tl.sum(k, axis=0), MAX_OUTPUT)
        tl.debug_barrier()  # the next tile reads these indices back
        t += 1
    for p0 in range(0, MAX_OUTPUT, TILE_SIZE):
        p = p0 + lane
        tl.store(idx_row + p, tl.full([TILE_SIZE], -1, tl.int32), mask=(p >= kept) & (p < MAX_OUTPUT))
    tl.store(num_ptr + b, kept)


def signature(boxes_dtype: str = "fp32", scores_dtype: str = "fp32") -> dict[str, str]:
    """Triton signature (argument name -> type) of :func:`batched_nms_kernel` for ``ASTSource``."""
    return {
        "boxes_ptr": f"*{boxes_dtype}", "scores_ptr": f"*{scores_dtype}", "groups_ptr": "*i32",
        "num_candidates": "i32", "num_ptr": "*i32", "indices_ptr": "*i32",
    }


def constexprs(
    iou_threshold: float, score_threshold: float, max_output: int, max_candidates: int = MAX_CANDIDATES
) -> dict[str, int | float]:
    """Compile-time constants of the kernel (the op's attributes and the candidate cap) by argument name."""
    if max_candidates < TILE or max_candidates & (max_candidates - 1):
        raise ValueError(
            f"batched_nms kernel: max_candidates must be a power of two >= {TILE}, got {max_candidates}"
        )
    if max_output < 1:
        raise ValueError(f"batched_nms kernel: max_output must be >= 1, got {max_output}")
    return {
        "IOU_THRESHOLD": float32_at_most(float(iou_threshold)), "SCORE_THRESHOLD": float(score_threshold),
        "MAX_OUTPUT": int(max_output), "CAP": int(max_candidates), "TILE_SIZE": TILE, "KB": KEPT_BLOCK,
    }


def launch_grid(batch: int) -> tuple[int, int, int]:
    """Grid (x, y, z): one program (CTA of 32 * NUM_WARPS threads) per image."""
    return (batch, 1, 1)


def batched_nms_triton(boxes, scores, groups, iou_threshold: float, score_threshold: float, max_output: int,
                       max_candidates: int = MAX_CANDIDATES):
    """Launch the kernel on torch tensors (CUDA, or CPU under ``TRITON_INTERPRET=1``).

    Args:
        boxes: [B, N, 4] float; scores: [B, N] float; groups: [B, N] int32.
    Returns:
        (num [B] int32, indices [B, max_output] int32, -1 padded).
    """
    import torch

    b, n = scores.shape
    num = torch.empty((b,), dtype=torch.int32, device=scores.device)
    indices = torch.empty((b, max_output), dtype=torch.int32, device=scores.device)
    if b == 0:
        return num, indices
    consts = constexprs(iou_threshold, score_threshold, max_output, max_candidates)
    batched_nms_kernel[launch_grid(b)](
        boxes.contiguous(), scores.contiguous(), groups.to(torch.int32).contiguous(), n, num, indices,
        num_warps=NUM_WARPS, **KERNEL_COMPILE_OPTIONS, **consts,
    )
    return num, indices
