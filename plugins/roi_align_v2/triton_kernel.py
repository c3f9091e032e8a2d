"""Triton face of ``frcnn::ROIAlignV2``: one kernel pools every ROI from its own FPN level.

Launch design (docs/ops.md, "Triton kernel", has the cost model):

- grid ``(B * R, cdiv(C * S * S, BLOCK))``: axis 0 = one ROI, axis 1 = a block of BLOCK consecutive outputs
  of that ROI in the output's own layout ``[C, S, S]`` (flat index ``c * S * S + ph * S + pw``);
- every lane computes one output bin of one channel. Per program the ROI's level, scaled box, bin size and
  adaptive sampling grid are scalars (uniform control flow: the sample loops have the same trip count for
  every lane of the program);
- features stay NCHW (the network's layout; an NHWC copy of the pyramid would move more bytes than the op).
  Consecutive lanes are consecutive bins of one channel, so the taps of a warp fall in one channel plane in a
  window of the ROI's size (~14..28 pixels square on the ROI's own level): a few 32-byte sectors per row,
  re-used through L1 by neighbouring samples and the 4 bilinear taps. Channel-parallel lanes would instead
  touch 32 planes per load (one sector each). Writes are fully coalesced (the flat index is the output
  offset).
- accumulation in fp32, stored in the features' dtype.

Kernel arguments follow TensorRT's AOT plugin convention ``(inputs..., int32 extras..., outputs...)``:
``rois, p2, p3, p4, p5, rois_per_image, channels, h2, w2, h3, w3, h4, w4, h5, w5, out`` plus constexprs
(the op's attributes, which are baked into the PTX).
"""

from __future__ import annotations

from collections.abc import Sequence

import triton
import triton.language as tl
from frcnn.plugins import KERNEL_COMPILE_OPTIONS
from frcnn.plugins.roi_align_v2 import DEFAULTS

__all__ = [
    "BLOCK",
    "MAX_LEVELS",
    "NUM_WARPS",
    "constexprs",
    "launch_grid",
    "roi_align_v2_kernel",
    "roi_align_v2_triton",
    "signature",
]

BLOCK = 256
"""Outputs (bins x channels of one ROI) per program."""
NUM_WARPS = 4
MAX_LEVELS = 4
"""The kernel takes exactly four level pointers (p2..p5); fewer levels repeat the last pointer."""


@triton.jit
def _level_select(lvl, v0, v1, v2, v3):
    """Value of the selected level (scalar select chain; works for pointers and ints)."""
    return tl.where(lvl == 0, v0, tl.where(lvl == 1, v1, tl.where(lvl == 2, v2, v3)))


@triton.jit
def _bilinear(base, y, x, height, width, hf, wf, mask):
    """detectron2/torchvision ROIAlign bilinear tap sum at (y, x) of one [H, W] plane, fp32; 0 outside."""
    inside = mask & (y >= -1.0) & (y <= hf) & (x >= -1.0) & (x <= wf)
    y = tl.maximum(y, 0.0)
    x = tl.maximum(x, 0.0)
    y_low = y.to(tl.int32)
    x_low = x.to(tl.int32)
    y_end = y_low >= height - 1
    x_end = x_low >= width - 1
    y_low = tl.where(y_end, height - 1, y_low)
    x_low = tl.where(x_end, width - 1, x_low)
    y_high = tl.where(y_end, y_low, y_low + 1)
    x_high = tl.where(x_end, x_low, x_low + 1)
    y = tl.where(y_end, y_low.to(tl.float32), y)
    x = tl.where(x_end, x_low.to(tl.float32), x)
    ly = y - y_low.to(tl.float32)
    lx = x - x_low.to(tl.float32)
    hy = 1.0 - ly
    hx = 1.0 - lx
    v1 = tl.load(base + (y_low * width + x_low), mask=inside, other=0.0).to(tl.float32)
    v2 = tl.load(base + (y_low * width + x_high), mask=inside, other=0.0).to(tl.float32)
    v3 = tl.load(base + (y_high * width + x_low), mask=inside, other=0.0).to(tl.float32)
    v4 = tl.load(base + (y_high * width + x_high), mask=inside, other=0.0).to(tl.float32)
    val = hy * hx * v1 + hy * lx * v2 + ly * hx * v3 + ly * lx * v4
    return tl.where(inside, val, 0.0)


@triton.jit
def roi_align_v2_kernel(
    rois_ptr, p2_ptr, p3_ptr, p4_ptr, p5_ptr,
    rois_per_image, channels, h2, w2, h3, w3, h4, w4, h5, w5,
    out_ptr,
    OUTPUT_SIZE: tl.constexpr, SAMPLING_RATIO: tl.constexpr, ALIGNED: tl.constexpr,
    CANONICAL_BOX_SIZE: tl.constexpr, CANONICAL_LEVEL: tl.constexpr, MIN_LEVEL: tl.constexpr,
    NUM_LEVELS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    """rois [B*R, 4] (x1, y1, x2, y2), p_l [B, C, H_l, W_l] -> out [B*R, C, S, S]; grid (B*R, cdiv(C*S*S, BLOCK))."""
    roi = tl.program_id(0)
    blk = tl.program_id(1)
    image = roi // rois_per_image
    box = rois_ptr + roi.to(tl.int64) * 4
    bx1 = tl.load(box + 0).to(tl.float32)
    by1 = tl.load(box + 1).to(tl.float32)
    bx2 = tl.load(box + 2).to(tl.float32)
    by2 = tl.load(box + 3).to(tl.float32)
    # Level (detectron2 assign_boxes_to_levels), fp32 in the same order; NaN (negative area) -> min level.
    area = (bx2 - bx1) * (by2 - by1)
    lvl_f = tl.floor(CANONICAL_LEVEL + tl.log2(tl.div_rn(tl.sqrt_rn(area), CANONICAL_BOX_SIZE) + 1e-8))
    lvl_f = tl.where(lvl_f == lvl_f, lvl_f, MIN_LEVEL)  # noqa: PLR0124 (NaN test)
    lvl_f = tl.minimum(tl.maximum(lvl_f, MIN_LEVEL), MIN_LEVEL + NUM_LEVELS - 1)
    lvl = lvl_f.to(tl.int32) - MIN_LEVEL
    height = _level_select(lvl, h2, h3, h4, h5)
    width = _level_select(lvl, w2, w3, w4, w5)
    feat = _level_select(lvl, p2_ptr, p3_ptr, p4_ptr, p5_ptr)
    # 2**-level built from its exponent bits (exact; ex2.approx is not guaranteed to be).
    scale = ((127 - MIN_LEVEL - lvl) << 23).to(tl.float32, bitcast=True)
    offset: tl.constexpr = 0.5 if ALIGNED else 0.0
    x1 = bx1 * scale - offset
    y1 = by1 * scale - offset
    roi_w = (bx2 * scale - offset) - x1
    roi_h = (by2 * scale - offset) - y1
    if not ALIGNED:
        roi_w = tl.maximum(roi_w, 1.0)
        roi_h = tl.maximum(roi_h, 1.0)
    bin_w = tl.div_rn(roi_w, OUTPUT_SIZE * 1.0)
    bin_h = tl.div_rn(roi_h, OUTPUT_SIZE * 1.0)
    if SAMPLING_RATIO > 0:
        grid_w = SAMPLING_RATIO
        grid_h = SAMPLING_RATIO
    else:
        grid_w = tl.maximum(tl.ceil(bin_w), 0.0).to(tl.int32)
        grid_h = tl.maximum(tl.ceil(bin_h), 0.0).to(tl.int32)
    count = tl.maximum(grid_w * grid_h, 1).to(tl.float32)
    gw = tl.maximum(grid_w, 1).to(tl.float32)
    gh = tl.maximum(grid_h, 1).to(tl.float32)

    PP: tl.constexpr = OUTPUT_SIZE * OUTPUT_SIZE
    flat = blk * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = flat < channels * PP
    c = flat // PP
    ph = (flat % PP) // OUTPUT_SIZE
    pw = flat % OUTPUT_SIZE
    plane = (image * channels).to(tl.int64) * height * width
    base = feat + plane + c.to(tl.int64) * height * width
    hf = height.to(tl.float32)
    wf = width.to(tl.float32)
    y0 = y1 + ph.to(tl.float32) * bin_h
    x0 = x1 + pw.to(tl.float32) * bin_w
    acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    for iy in range(grid_h):
        y = y0 + tl.div_rn((iy + 0.5) * bin_h, gh)
        for ix in range(grid_w):
            x = x0 + tl.div_rn((ix + 0.5) * bin_w, gw)
            acc += _bilinear(base, y, x, height, width, hf, wf, mask)
    out = tl.div_rn(acc, count)
    tl.store(out_ptr + roi.to(tl.int64) * channels * PP + flat, out.to(out_ptr.dtype.element_ty), mask=mask)


def signature(feature_dtype: str = "fp32", rois_dtype: str = "fp32") -> dict[str, str]:
    """Triton signature (argument name -> type) of :func:`roi_align_v2_kernel` for ``ASTSource``."""
    ptr = f"*{feature_dtype}"
    sig = {"rois_ptr": f"*{rois_dtype}", "p2_ptr": ptr, "p3_ptr": ptr, "p4_ptr": ptr, "p5_ptr": ptr}
    for name in ("rois_per_image", "channels", "h2", "w2", "h3", "w3", "h4", "w4", "h5", "w5"):
        sig[name] = "i32"
    sig["out_ptr"] = ptr
    return sig


def constexprs(
    output_size: int = int(DEFAULTS["output_size"]),
    sampling_ratio: int = int(DEFAULTS["sampling_ratio"]),
    aligned: bool = bool(DEFAULTS["aligned"]),
    canonical_box_size: float = float(DEFAULTS["canonical_box_size"]),
    canonical_level: int = int(DEFAULTS["canonical_level"]),
    min_level: int = int(DEFAULTS["min_level"]),
    num_levels: int = MAX_LEVELS,
) -> dict[str, int | float | bool]:
    """Compile-time constants of the kernel (the op's attributes) by argument name."""
    if not 1 <= num_levels <= MAX_LEVELS:
        raise ValueError(f"roi_align_v2 kernel: num_levels must be in 1..{MAX_LEVELS}, got {num_levels}")
    if output_size < 1 or sampling_ratio < 0:
        raise ValueError(
            f"roi_align_v2 kernel: need output_size >= 1 and sampling_ratio >= 0, got {output_size}, "
            f"{sampling_ratio}"
        )
    return {
        "OUTPUT_SIZE": int(output_size), "SAMPLING_RATIO": int(sampling_ratio), "ALIGNED": bool(aligned),
        "CANONICAL_BOX_SIZE": float(canonical_box_size), "CANONICAL_LEVEL": int(canonical_level),
        "MIN_LEVEL": int(min_level), "NUM_LEVELS": int(num_levels), "BLOCK_SIZE": BLOCK,
    }


def launch_grid(batch: int, rois_per_image: int, channels: int,
                output_size: int = int(DEFAULTS["output_size"])) -> tuple[int, int, int]:
    """Grid (x, y, z) for ``batch * rois_per_image`` ROIs of ``channels`` channels; block = 32 * NUM_WARPS."""
    return (batch * rois_per_image, triton.cdiv(channels * output_size * output_size, BLOCK), 1)


def roi_align_v2_triton(
    rois,
    features: Sequence,
    output_size: int = int(DEFAULTS["output_size"]),
    sampling_ratio: int = int(DEFAULTS["sampling_ratio"]),
    aligned: bool = bool(DEFAULTS["aligned"]),
    canonical_box_size: float = float(DEFAULTS["canonical_box_size"]),
    canonical_level: int = int(DEFAULTS["canonical_level"]),
    min_level: int = int(DEFAULTS["min_level"]),
):
    """Launch the kernel on torch tensors (CUDA, or CPU under ``TRITON_INTERPRET=1``).

    Args:
        rois: [B, R, 4] float boxes; features: 1..4 maps [B, C, H_l, W_l], all fp32 or all fp16.
    Returns:
        [B, R, C, S, S] in the features' dtype.
    """
    import torch

    if len(features) == 0 or len(features) > MAX_LEVELS:
        raise ValueError(f"roi_align_v2_triton: need 1..{MAX_LEVELS} feature levels, got {len(features)}")
    b, r = rois.shape[:2]
    c = features[0].shape[1]
    feats = [f.contiguous() for f in features]
    levels = feats + [feats[-1]] * (MAX_LEVELS - len(feats))
    sizes = [int(d) for f in levels for d in f.shape[2:]]
    out = torch.empty((b, r, c, output_size, output_size), dtype=feats[0].dtype, device=feats[0].device)
    if b * r == 0 or c == 0:
        return out
    consts = constexprs(output_size, sampling_ratio, aligned, canonical_box_size, canonical_level, min_level,
                        len(feats))
    grid = launch_grid(b, r, c, output_size)
    roi_align_v2_kernel[grid](rois.contiguous(), *levels, r, c, *sizes, out, num_warps=NUM_WARPS,
                              **KERNEL_COMPILE_OPTIONS, **consts)
    return out
