"""TensorRT plugin ``frcnn::ROIAlignV2``: descriptor, type combinations and AOT Triton kernel.

Inputs (the ONNX node's, in order): ``rois`` [B, R, 4], ``p2`` .. ``p5`` [B, C, H_l, W_l]. Output
[B, R, C, S, S] in the features' dtype. Attributes = the ONNX node's (``output_size``, ``sampling_ratio``,
``aligned``, ``canonical_box_size``, ``canonical_level``, ``min_level``, ``max_level``); the parser ignores the
node's ``plugin_namespace`` / ``plugin_version``. The plugin takes exactly four levels (detectron2's FPN
pooler: P2..P5).

Type combinations: features (and output) fp32 or fp16, all the same; ``rois`` fp32 or fp16 independently
(an fp16 engine keeps proposals in fp32, ``frcnn.export.engine.to_fp16_onnx``).

No ``from __future__ import annotations`` here: ``tensorrt.plugin`` inspects the annotations at
registration, they must be real classes.
"""

from typing import Any

from frcnn.plugins import DOMAIN
from frcnn.plugins.roi_align_v2 import OP_NAME

PLUGIN_ID = f"{DOMAIN}::{OP_NAME}"
NUM_LEVELS = 4

_registered = False


def output_shape(rois: tuple[Any, ...], p2: tuple[Any, ...], output_size: int) -> tuple[Any, ...]:
    """[B, R, C, S, S] from the rois and first-level shapes (works on ints and TensorRT shape expressions)."""
    return (rois[0], rois[1], p2[1], output_size, output_size)


def check_attributes(output_size: int, sampling_ratio: int, min_level: int, max_level: int) -> None:
    """Raise ValueError for attribute values the kernel cannot serve."""
    if max_level - min_level + 1 != NUM_LEVELS:
        raise ValueError(f"{PLUGIN_ID}: the TensorRT plugin pools exactly {NUM_LEVELS} levels (p2..p5), "
                         f"got min_level={min_level}, max_level={max_level}")
    if output_size < 1 or sampling_ratio < 0:
        raise ValueError(f"{PLUGIN_ID}: need output_size >= 1 and sampling_ratio >= 0, got "
                         f"{output_size}, {sampling_ratio}")


def type_combinations() -> list[tuple[str, ...]]:
    """(rois, p2, p3, p4, p5, output) Triton/TensorRT type names the plugin supports."""
    combos: list[tuple[str, ...]] = []
    for rois in ("FP32", "FP16"):
        for feat in ("FP32", "FP16"):
            combos.append((rois, feat, feat, feat, feat, feat))
    return combos


def register() -> None:
    """Register ``frcnn::ROIAlignV2`` with TensorRT (idempotent). Needs TensorRT >= 10.9."""
    global _registered
    if _registered:
        return
    import tensorrt.plugin as trtp
    from frcnn.plugins import ptx
    from frcnn.plugins import tensorrt as frcnn_trt
    from frcnn.plugins.roi_align_v2 import triton_kernel as kernel

    @trtp.register(PLUGIN_ID)
    def roi_align_v2_desc(
        rois: trtp.TensorDesc, p2: trtp.TensorDesc, p3: trtp.TensorDesc, p4: trtp.TensorDesc,
        p5: trtp.TensorDesc, output_size: int, sampling_ratio: int, aligned: int, canonical_box_size: float,
        canonical_level: int, min_level: int, max_level: int,
    ) -> trtp.TensorDesc:
        check_attributes(output_size, sampling_ratio, min_level, max_level)
        shape = output_shape(tuple(rois.shape_expr), tuple(p2.shape_expr), output_size)
        return trtp.from_shape_expr(shape, dtype=p2.dtype)

    @trtp.autotune(PLUGIN_ID)
    def roi_align_v2_autotune(
        rois: trtp.TensorDesc, p2: trtp.TensorDesc, p3: trtp.TensorDesc, p4: trtp.TensorDesc,
        p5: trtp.TensorDesc, outputs: tuple[trtp.TensorDesc],
    ) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(", ".join(combo), "LINEAR") for combo in type_combinations()]

    @trtp.aot_impl(PLUGIN_ID)
    def roi_align_v2_aot(
        rois: trtp.TensorDesc, p2: trtp.TensorDesc, p3: trtp.TensorDesc, p4: trtp.TensorDesc,
        p5: trtp.TensorDesc, output_size: int, sampling_ratio: int, aligned: int, canonical_box_size: float,
        canonical_level: int, min_level: int, max_level: int, outputs: tuple[trtp.TensorDesc], tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        feats = (p2, p3, p4, p5)
        if any(f.dtype != p2.dtype for f in feats) or outputs[0].dtype != p2.dtype:
            raise ValueError(f"{PLUGIN_ID}: p2..p5 and the output must share one dtype, got "
                             f"{[f.dtype for f in feats]} -> {outputs[0].dtype}")
        spec = ptx.roi_align_v2_spec(
            frcnn_trt.triton_dtype(p2.dtype), frcnn_trt.triton_dtype(rois.dtype), output_size=output_size,
            sampling_ratio=sampling_ratio, aligned=bool(aligned), canonical_box_size=canonical_box_size,
            canonical_level=canonical_level, min_level=min_level, num_levels=NUM_LEVELS)
        compiled = frcnn_trt.aot_kernel(PLUGIN_ID, spec, frcnn_trt.current_gpu().arch)
        batch, rois_per_image = rois.shape_expr[0], rois.shape_expr[1]
        channels = p2.shape_expr[1]
        params = trtp.KernelLaunchParams()
        params.grid_x = batch * rois_per_image
        params.grid_y = trtp.cdiv(channels * (output_size * output_size), kernel.BLOCK)
        params.grid_z = 1
        params.block_x = compiled.num_warps * 32
        params.shared_mem = compiled.shared
        # Kernel order: rois, p2..p5, then these int32 extras, then the output.
        sizes = [d for f in feats for d in (f.shape_expr[2], f.shape_expr[3])]
        extras = trtp.SymIntExprs.from_tuple((rois_per_image, channels, *sizes))
        return compiled.name, compiled.ptx, params, extras

    _registered = True


__all__ = ["NUM_LEVELS", "PLUGIN_ID", "check_attributes", "output_shape", "register", "type_combinations"]
