"""Torch face of ``frcnn::ROIAlignV2``: multi-level ROIAlign (detectron2 ``ROIPooler`` with ``ROIAlignV2``).

Importing this module registers the custom op ``torch.ops.frcnn.roi_align_v2`` (with a fake kernel for
tracing/export and an autograd formula w.r.t. the features). The PyTorch model calls :func:`roi_align_v2`.

Algorithm (pure, vectorized torch; docs/ops.md has the derivation and the cost):

1. every box gets one level (:func:`assign_box_levels`, detectron2's ``assign_boxes_to_levels``);
2. per level, only that level's boxes are pooled. Bilinear sampling is separable, so the weights of one
   output bin are ``wy ⊗ wx``: per box and axis the sample positions of each bin are generated, their two
   taps are summed into a short window (coalescing samples that share a pixel) and the 1 / grid averaging
   is folded in;
3. the outer products become one sparse CSR matrix ``W [R_l * S * S, B * H * W]`` and the pooled features
   are ``W @ F`` with ``F [B * H * W, C]`` (``torch.sparse.mm``), scattered back to the boxes' rows.

The backward pass is ``grad_F = W^T @ grad_out`` with the same matrix (rebuilt from the boxes).
"""

from __future__ import annotations

import warnings

import torch
from frcnn.plugins.roi_align_v2 import DEFAULTS, TORCH_OP
from torch import Tensor

__all__ = ["assign_box_levels", "roi_align_v2"]


def assign_box_levels(
    rois: Tensor,
    min_level: int,
    max_level: int,
    canonical_box_size: float = float(DEFAULTS["canonical_box_size"]),
    canonical_level: int = int(DEFAULTS["canonical_level"]),
) -> Tensor:
    """Level of each box, 0-based from ``min_level`` (detectron2 ``assign_boxes_to_levels``).

    Args:
        rois: [..., 4] boxes (x1, y1, x2, y2) in input-image pixels.
    Returns:
        [...] int64 in [0, max_level - min_level]:
        ``clamp(floor(canonical_level + log2(sqrt(area) / canonical_box_size + 1e-8)), min_level, max_level)
        - min_level`` with area = (x2 - x1) * (y2 - y1), computed in float32. A box with negative area
        (sqrt is NaN) goes to ``min_level`` like a zero-area box.
    """
    r = rois.float()
    area = (r[..., 2] - r[..., 0]) * (r[..., 3] - r[..., 1])
    level = torch.floor(canonical_level + torch.log2(torch.sqrt(area) / canonical_box_size + 1e-8))
    level = torch.nan_to_num(level, nan=float(min_level))
    level = torch.clamp(level, min=min_level, max=max_level)
    return level.to(torch.int64) - min_level


def _axis_taps(
    start: Tensor, bin_size: Tensor, grid: Tensor, length: int, output_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Coalesced bilinear taps along one axis for every (box, bin), as short dense windows.

    Args:
        start, bin_size: [R] float32 box start (already scaled and shifted) and bin size along the axis.
        grid: [R] int64 samples per bin along the axis (<= 0: the box contributes nothing).
        length: feature size along the axis.
    Returns:
        first [R, S] int64 first pixel of each bin's window, weight [R, S, T] float32 weights of pixels
        first .. first + T - 1 (the 1 / grid averaging folded in; 0 where no sample lands) and span [R]
        int64 window length each box needs (<= T).
    """
    n = start.shape[0]
    g_max = max(int(grid.max()), 1) if n > 0 else 1
    p = torch.arange(output_size, dtype=torch.float32, device=start.device).view(1, -1, 1)
    i = torch.arange(g_max, dtype=torch.float32, device=start.device).view(1, 1, -1)
    gf = grid.clamp(min=1).to(torch.float32).view(-1, 1, 1)
    b = bin_size.view(-1, 1, 1)
    # Same evaluation order as detectron2 / torchvision: start + p * bin + (i + .5) * bin / grid.
    y = start.view(-1, 1, 1) + p * b + (i + 0.5) * b / gf
    valid = (i < grid.view(-1, 1, 1).to(torch.float32)) & (y >= -1.0) & (y <= length)
    y = y.clamp(min=0.0)
    low = y.to(torch.int64)
    at_end = low >= length - 1
    low = torch.where(at_end, torch.full_like(low, length - 1), low)
    high = torch.where(at_end, low, low + 1)
    frac = torch.where(at_end, torch.zeros_like(y), y - low.to(torch.float32))
    scale = valid.to(torch.float32) / gf
    w_low, w_high = (1.0 - frac) * scale, frac * scale
    # Window of pixels touched by each (box, bin): starts at its first valid tap.
    first = torch.where(valid, low, torch.full_like(low, length)).amin(-1, keepdim=True)
    first = torch.where(first >= length, torch.zeros_like(first), first)
    zero = torch.zeros_like(low)
    low, high = torch.where(valid, low - first, zero), torch.where(valid, high - first, zero)
    span = high.reshape(n, -1).amax(-1) + 1 if n > 0 else torch.ones(0, dtype=torch.int64)
    weight = torch.zeros(n, output_size, int(span.max()) if n > 0 else 1, device=start.device)
    weight.scatter_add_(2, low, w_low)
    weight.scatter_add_(2, high, w_high)
    return first.view(n, output_size), weight, span


def _grids(roi_w: Tensor, roi_h: Tensor, output_size: int, sampling_ratio: int) -> tuple[Tensor, Tensor]:
    """Samples per bin along x and y: ``sampling_ratio`` or ceil(roi_size / output_size) (adaptive)."""
    if sampling_ratio > 0:
        grid = torch.full(roi_w.shape, sampling_ratio, dtype=torch.int64, device=roi_w.device)
        return grid, grid
    grid_w = torch.nan_to_num(torch.ceil(roi_w / output_size)).clamp(min=0).to(torch.int64)
    grid_h = torch.nan_to_num(torch.ceil(roi_h / output_size)).clamp(min=0).to(torch.int64)
    if grid_w.numel() > 0 and int(torch.maximum(grid_w, grid_h).max()) > 4096:
        raise ValueError(
            "roi_align_v2: a box spans more than 4096 * output_size feature pixels; clip the boxes to the "
            "image before pooling (detectron2 clips proposals)."
        )
    return grid_w, grid_h


def _level_entries(
    boxes: Tensor, batch: Tensor, spatial_scale: float, shape: tuple[int, int, int], attrs: tuple
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """Nonzero weights of one level's boxes, grouped by window size.

    Args:
        boxes: [R, 4] float32 boxes in input-image pixels; batch: [R] int64 image of each box.
        shape: (B, H, W) of the level's feature map; attrs: (output_size, sampling_ratio, aligned).
    Returns:
        order [R] (processing order of the boxes) and, per group, col (pixel b * H * W + y * W + x), val
        and count [R_g * S * S] (nonzeros per output bin, bins ordered (box, ph, pw)).
    """
    output_size, sampling_ratio, aligned = attrs
    _, height, width = shape
    s = output_size
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (boxes * spatial_scale - offset).unbind(-1)
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    grid_w, grid_h = _grids(roi_w, roi_h, s, sampling_ratio)
    x0, wx, span_x = _axis_taps(x1, roi_w / s, grid_w, width, s)
    y0, wy, span_y = _axis_taps(y1, roi_h / s, grid_h, height, s)
    y_last = (batch * height + height - 1).view(-1, 1, 1)
    y0 = y0 + (batch * height).view(-1, 1)
    # Boxes with the same window sizes (Ty, Tx) are expanded together: bin (ph, pw) = wy[ph] (x) wx[pw].
    key = span_y * (wx.shape[2] + 1) + span_x
    order = torch.argsort(key, stable=True)
    sizes = torch.unique_consecutive(key[order], return_counts=True)[1].tolist()
    cols, vals, counts = [], [], []
    for sel in torch.split(order, sizes):
        ty, tx = int(span_y[sel[0]]), int(span_x[sel[0]])
        yy = torch.minimum(y0[sel].unsqueeze(-1) + torch.arange(ty, device=boxes.device), y_last[sel])
        xx = (x0[sel].unsqueeze(-1) + torch.arange(tx, device=boxes.device)).clamp(max=width - 1)
        col = (yy * width)[:, :, None, :, None] + xx[:, None, :, None, :]
        val = wy[sel, :, :ty][:, :, None, :, None] * wx[sel, :, :tx][:, None, :, None, :]
        keep = val != 0  # drops the padding (and clamped duplicates, which always weigh 0)
        cols.append(torch.masked_select(col, keep))
        vals.append(torch.masked_select(val, keep))
        counts.append(keep.view(-1, ty * tx).sum(-1))
    return order, cols, vals, counts


def _sample_matrix(rois: Tensor, shapes: list[tuple[int, int, int]], attrs: tuple) -> Tensor:
    """Sparse CSR matrix of all ROIAlign weights.

    Args:
        rois: [B, R, 4] boxes; shapes: (B, H_l, W_l) per level;
        attrs: (output_size, sampling_ratio, aligned, canonical_box_size, canonical_level, min_level).
    Returns:
        [B * R * S * S, sum_l B * H_l * W_l] float32 CSR. Row ((b * R + r) * S + ph) * S + pw holds the
        averaged bilinear weights of bin (ph, pw) of box r of image b over the rows of the level-stacked
        pixel matrix (level l's pixel (b, y, x) is row base_l + (b * H_l + y) * W_l + x).
    """
    output_size, canonical_box_size, canonical_level, min_level = attrs[0], attrs[3], attrs[4], attrs[5]
    b, r = rois.shape[:2]
    n, ss, dev = b * r, output_size * output_size, rois.device
    flat = rois.reshape(n, 4).float()
    level = assign_box_levels(
        flat, min_level, min_level + len(shapes) - 1, canonical_box_size, canonical_level
    )
    orders, cols, vals, counts = [], [], [], []
    base = 0
    for lvl, shape in enumerate(shapes):
        ids = (level == lvl).nonzero().view(-1)
        if ids.numel() > 0:
            scale = 2.0 ** -(min_level + lvl)
            order, c, v, k = _level_entries(flat[ids], ids // r, scale, shape, attrs[:3])
            orders.append(ids[order])
            cols += [x + base for x in c]
            vals += v
            counts += k
        base += shape[0] * shape[1] * shape[2]
    crow = torch.zeros(n * ss + 1, dtype=torch.int64, device=dev)
    if n == 0:
        return _csr(crow, crow[:0], torch.zeros(0, device=dev), (0, base))
    # Entries are grouped by box in processing order; reorder the boxes' blocks to box order.
    processed = torch.cat(orders)
    per_bin = torch.empty(n, ss, dtype=torch.int64, device=dev)
    per_bin[processed] = torch.cat(counts).view(-1, ss)
    block = torch.cat(counts).view(-1, ss).sum(-1)  # entries per box, processing order
    block_start = torch.cumsum(block, 0) - block
    position = torch.empty_like(processed)
    position[processed] = torch.arange(n, device=dev)
    length = block[position]
    torch.cumsum(per_bin.view(-1), 0, out=crow[1:])
    nnz = int(crow[-1])
    shift = block_start[position] - (torch.cumsum(length, 0) - length)
    gather = torch.repeat_interleave(shift, length, output_size=nnz) + torch.arange(nnz, device=dev)
    return _csr(crow, torch.cat(cols)[gather], torch.cat(vals)[gather], (n * ss, base))


def _csr(crow: Tensor, col: Tensor, val: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, val, size, check_invariants=False)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (gradcheck); fp32 / fp16 / bf16 are pooled in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stack_pixels(features: list[Tensor], dtype: torch.dtype) -> Tensor:
    """Levels [B, C, H_l, W_l] -> one pixel matrix [sum_l B * H_l * W_l, C] (one copy pass per level)."""
    c = features[0].shape[1]
    rows = [f.shape[0] * f.shape[2] * f.shape[3] for f in features]
    out = torch.empty(sum(rows), c, dtype=dtype, device=features[0].device)
    for part, f in zip(torch.split(out, rows), features):
        part.view(f.shape[0], f.shape[2], f.shape[3], c).copy_(f.permute(0, 2, 3, 1))
    return out


@torch.library.custom_op(TORCH_OP, mutates_args=())
def _roi_align_v2_op(
    rois: Tensor,
    features: list[Tensor],
    output_size: int,
    sampling_ratio: int,
    aligned: bool,
    canonical_box_size: float,
    canonical_level: int,
    min_level: int,
) -> Tensor:
    attrs = (output_size, sampling_ratio, aligned, canonical_box_size, canonical_level, min_level)
    b, r = rois.shape[:2]
    c, s = features[0].shape[1], output_size
    dtype = _compute_dtype(features[0].dtype)
    weights = _sample_matrix(rois, [(f.shape[0], f.shape[2], f.shape[3]) for f in features], attrs)
    pooled = torch.sparse.mm(weights.to(dtype), _stack_pixels(features, dtype))  # [B*R*S*S, C]
    out = torch.empty(b, r, c, s, s, dtype=features[0].dtype, device=features[0].device)
    out.copy_(pooled.view(b, r, s, s, c).permute(0, 1, 4, 2, 3))
    return out


@_roi_align_v2_op.register_fake
def _(rois, features, output_size, sampling_ratio, aligned, canonical_box_size, canonical_level, min_level):
    b, r = rois.shape[:2]
    return features[0].new_empty((b, r, features[0].shape[1], output_size, output_size))


def _setup_context(ctx, inputs, output) -> None:
    rois, features, *attrs = inputs
    ctx.save_for_backward(rois)
    ctx.attrs = tuple(attrs)
    ctx.feature_meta = [(f.shape, f.dtype) for f in features]


def _backward(ctx, grad: Tensor):
    """grad_features = W^T @ grad_out, split back into the levels."""
    (rois,) = ctx.saved_tensors
    shapes = [(shape[0], shape[2], shape[3]) for shape, _ in ctx.feature_meta]
    weights = _sample_matrix(rois, shapes, ctx.attrs)
    dtype = _compute_dtype(grad.dtype)
    c = grad.shape[2]
    g_rows = grad.to(dtype).permute(0, 1, 3, 4, 2).reshape(-1, c)
    g_pixels = torch.sparse.mm(weights.to(dtype).t(), g_rows)
    grads = []
    for part, (shape, fdtype) in zip(
        torch.split(g_pixels, [b * h * w for b, h, w in shapes]), ctx.feature_meta
    ):
        grads.append(part.view(shape[0], shape[2], shape[3], c).permute(0, 3, 1, 2).to(fdtype).contiguous())
    return None, grads, None, None, None, None, None, None


_roi_align_v2_op.register_autograd(_backward, setup_context=_setup_context)


def roi_align_v2(
    rois: Tensor,
    features: list[Tensor],
    output_size: int = int(DEFAULTS["output_size"]),
    sampling_ratio: int = int(DEFAULTS["sampling_ratio"]),
    aligned: bool = bool(DEFAULTS["aligned"]),
    canonical_box_size: float = float(DEFAULTS["canonical_box_size"]),
    canonical_level: int = int(DEFAULTS["canonical_level"]),
    min_level: int = int(DEFAULTS["min_level"]),
) -> Tensor:
    """Multi-level ROIAlign of detectron2's ``ROIPooler(ROIAlignV2)`` (``torch.ops.frcnn.roi_align_v2``).

    Args:
        rois: [B, R, 4] float boxes (x1, y1, x2, y2) in input-image pixels; box r of image b pools from
            image b. Padding rows may hold anything finite (zero boxes pool to zeros).
        features: one [B, C, H_l, W_l] map per level, levels min_level .. min_level + len - 1 (stride
            2**level), all fp32 or all fp16.
        output_size: S; sampling_ratio: samples per bin and axis (0: ceil(roi_size / S) per box);
        aligned: True = ROIAlignV2 (pixel-centre shift of -0.5, no minimum ROI size).
    Returns:
        [B, R, C, S, S] in the features' dtype (computed in float32). Differentiable w.r.t. the features.
    """
    if rois.dim() != 3 or rois.shape[-1] != 4:
        raise ValueError(f"roi_align_v2: rois must be [B, R, 4], got {tuple(rois.shape)}")
    if len(features) == 0 or any(f.dim() != 4 for f in features):
        raise ValueError("roi_align_v2: features must be a non-empty list of [B, C, H, W] maps")
    if any(f.shape[:2] != features[0].shape[:2] or f.dtype != features[0].dtype for f in features):
        raise ValueError("roi_align_v2: all feature levels need the same batch size, channels and dtype")
    if features[0].shape[0] != rois.shape[0]:
        raise ValueError(f"roi_align_v2: rois batch {rois.shape[0]} != features batch {features[0].shape[0]}")
    return torch.ops.frcnn.roi_align_v2(
        rois,
        list(features),
        output_size,
        sampling_ratio,
        aligned,
        float(canonical_box_size),
        canonical_level,
        min_level,
    )
