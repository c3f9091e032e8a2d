"""TensorRT plugin ``frcnn::BatchedNMS``: descriptor, type combinations and AOT Triton kernel.

Inputs (the ONNX node's, in order): ``boxes`` [B, N, 4], ``scores`` [B, N] (float32: NMS inputs stay fp32
in fp16 engines too, ``frcnn.export.fp16``),
``groups`` [B, N] int32. Outputs: ``num`` [B] int32, ``indices`` [B, max_output] int32 (fixed size, -1 padded:
no data-dependent shapes). Attributes = the ONNX node's (``iou_threshold``, ``score_threshold``,
``max_output``, ``max_candidates``); the parser ignores the node's ``plugin_namespace`` / ``plugin_version``.
The kernel is compiled with the candidate cap ``kernel_candidate_cap(max_candidates)`` (the attribute
rounded up to a power of two >= 64); it is exact when at most ``max_candidates`` scores exceed
``score_threshold`` (docs/kernels.md). ``tensorrt.plugin`` supports no attribute defaults, so the node must
carry ``max_candidates``: every exporter and ``onnx_op.make_node`` of this project write it (ONNX files
exported before the attribute existed must be exported again).

No ``from __future__ import annotations`` here: ``tensorrt.plugin`` inspects the annotations at
registration, they must be real classes.
"""

from typing import Any

from frcnn.plugins import DOMAIN
from frcnn.plugins.batched_nms import DEFAULT_MAX_CANDIDATES, OP_NAME, kernel_candidate_cap

PLUGIN_ID = f"{DOMAIN}::{OP_NAME}"

_registered = False


def output_shapes(scores: tuple[Any, ...], max_output: int) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """([B], [B, K]) from the scores shape (works on ints and TensorRT shape expressions)."""
    return (scores[0],), (scores[0], max_output)


def check_attributes(iou_threshold: float, max_output: int,
                     max_candidates: int = DEFAULT_MAX_CANDIDATES) -> None:
    """Raise ValueError for attribute values the kernel cannot serve."""
    if max_candidates < 1:
        raise ValueError(f"{PLUGIN_ID}: max_candidates must be >= 1, got {max_candidates}")
    if max_output < 1:
        raise ValueError(f"{PLUGIN_ID}: max_output must be >= 1, got {max_output}")
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"{PLUGIN_ID}: iou_threshold must be in [0, 1], got {iou_threshold}")


def type_combinations() -> list[tuple[str, ...]]:
    """(boxes, scores, groups, num, indices) type names the plugin supports."""
    return [("FP32", "FP32", "INT32", "INT32", "INT32")]


def register() -> None:
    """Register ``frcnn::BatchedNMS`` with TensorRT (idempotent). Needs TensorRT >= 10.9."""
    global _registered
    if _registered:
        return
    import tensorrt as trt
    import tensorrt.plugin as trtp
    from frcnn.plugins import ptx
    from frcnn.plugins import tensorrt as frcnn_trt

    @trtp.register(PLUGIN_ID)
    def batched_nms_desc(
        boxes: trtp.TensorDesc, scores: trtp.TensorDesc, groups: trtp.TensorDesc, iou_threshold: float,
        score_threshold: float, max_output: int, max_candidates: int,
    ) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
        check_attributes(iou_threshold, max_output, max_candidates)
        num_shape, indices_shape = output_shapes(tuple(scores.shape_expr), max_output)
        return (trtp.from_shape_expr(num_shape, dtype=trt.int32),
                trtp.from_shape_expr(indices_shape, dtype=trt.int32))

    @trtp.autotune(PLUGIN_ID)
    def batched_nms_autotune(
        boxes: trtp.TensorDesc, scores: trtp.TensorDesc, groups: trtp.TensorDesc,
        outputs: tuple[trtp.TensorDesc, trtp.TensorDesc],
    ) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(", ".join(combo), "LINEAR") for combo in type_combinations()]

    @trtp.aot_impl(PLUGIN_ID)
    def batched_nms_aot(
        boxes: trtp.TensorDesc, scores: trtp.TensorDesc, groups: trtp.TensorDesc, iou_threshold: float,
        score_threshold: float, max_output: int, max_candidates: int,
        outputs: tuple[trtp.TensorDesc, trtp.TensorDesc], tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        if boxes.dtype != trt.float32 or scores.dtype != trt.float32:
            raise ValueError(f"{PLUGIN_ID}: boxes and scores must be float32 (keep NMS inputs fp32), got "
                             f"{boxes.dtype}, {scores.dtype}")
        cap = kernel_candidate_cap(max_candidates)
        spec = ptx.batched_nms_spec(iou_threshold, score_threshold, max_output, max_candidates=cap)
        compiled = frcnn_trt.aot_kernel(PLUGIN_ID, spec, frcnn_trt.current_gpu().arch)
        params = trtp.KernelLaunchParams()
        params.grid_x = scores.shape_expr[0]  # one program per image
        params.grid_y = 1
        params.grid_z = 1
        params.block_x = compiled.num_warps * 32
        params.shared_mem = compiled.shared
        # Kernel order: boxes, scores, groups, then num_candidates (int32), then num, indices.
        extras = trtp.SymIntExprs.from_tuple((scores.shape_expr[1],))
        return compiled.name, compiled.ptx, params, extras

    _registered = True


__all__ = ["PLUGIN_ID", "check_attributes", "output_shapes", "register", "type_combinations"]
