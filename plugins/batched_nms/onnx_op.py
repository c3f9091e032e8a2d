"""ONNX face of frcnn::BatchedNMS: schema, function body in standard ops, torch exporter hooks.

Function body (what ONNX Runtime runs)::

    valid  = score > score_threshold                       (NaN is never valid)
    order  = TopK(where(valid, score, -inf), M)            M = most valid candidates in one image
    key    = M - rank  on valid positions, else 0          strictly decreasing in (score desc, index asc)
    keys   = [B, G, M] with key in the box's group row     G = groups spanned by the valid candidates
    kept   = NonMaxSuppression(compacted boxes, keys, K, iou_threshold, score_threshold = 0)
    out    = order[TopK(kept keys, min(K, M))], padded with -1 to K;  num = min(#kept, K)

How the body reproduces torchvision ``batched_nms`` exactly with ONNX's NonMaxSuppression:

- Groups become NMS "classes": a box's key sits in its group's row and 0 elsewhere; NMS runs per class,
  so boxes of different groups never suppress each other, and the ``score_threshold`` input 0 drops
  the other rows (ONNX Runtime keeps ``score > threshold``, strictly).
- Ties: ONNX does not define the order of equal scores inside NonMaxSuppression (older ONNX Runtime
  sources pop a ``std::priority_queue`` comparing the score only; ONNX Runtime 1.32 CPU was measured to
  pop lower indices first; other execution providers may differ). The body therefore feeds NMS a rank
  key instead of the score: TopK (ONNX: equal values, lower index first) sorts by (score desc, index
  asc) and ``M - rank`` is strictly decreasing (exact in float32 for M < 2**24), so the result does not
  depend on the provider's tie order.
- Thresholds: torchvision compares the float32 IoU with a *double* threshold, ONNX in float32; the
  exporter hooks and ``make_node`` store ``float32_at_most(t)`` (largest float32 <= t), which makes the
  two comparisons agree for every IoU. Scores are compared in float32 on both sides (torch casts the
  Python scalar to the tensor's dtype).
- IoU: ONNX Runtime computes ``inter / (area1 + area2 - inter)`` with ``inter = (min(x2) - max(x1)) *
  (min(y2) - max(y1))`` and ``area = (x2 - x1) * (y2 - y1)`` and suppresses when ``IoU > iou_threshold``
  (strict): torchvision's formula and operation order. ONNX's box layout is (y1, x1, y2, x2); passing
  (x1, y1, x2, y2) swaps the factors of two products, which is exact. No ``+1`` in widths.
- Zero-area boxes and disjoint pairs give "no suppression" in both (ONNX Runtime returns early;
  torchvision gets IoU 0 or 0/0 = NaN, never > threshold).
- Known differences (outside the contract's inputs): ONNX Runtime reorders flipped boxes (x2 < x1)
  with min/max, torchvision does not; ONNX Runtime rejects iou_threshold outside [0, 1].
- Per class at most K boxes are kept (``max_output_boxes_per_class = K``); the first K of each group
  contain every member of the overall top K, so the final top K is exact.

Candidates failing the score threshold are compacted away before NMS (the head's ~80k candidates shrink
to the few hundred above 0.05), so the [B, G, M] key tensor stays small.

The optional ``max_candidates`` attribute (default 4096) is the TensorRT kernel's candidate cap; the body
ignores it (it is exact for any number of candidates) and only declares it, with its default.
"""

from __future__ import annotations

from typing import Any

import onnx
from frcnn.plugins import DOMAIN, PLUGIN_VERSION
from frcnn.plugins.batched_nms import DEFAULT_MAX_CANDIDATES, OP_NAME, TORCH_OP, float32_at_most
from frcnn.plugins.onnx_registry import (
    PLUGIN_ATTRIBUTES,
    FunctionBuilder,
    attribute_value,
    infer_type,
    make_function,
    plugin_attribute_schemas,
)
from onnx import TensorProto, defs, helper

_ATTRIBUTES: dict[str, Any] = {"iou_threshold": None, "score_threshold": None, "max_output": None,
                               "max_candidates": DEFAULT_MAX_CANDIDATES}
"""Function attributes and their defaults (None: required)."""


def _infer(ctx: Any) -> None:
    """Outputs ``num`` [B] int32 and ``indices`` [B, max_output] int32."""
    scores = ctx.get_input_type(1).tensor_type
    batch = scores.shape.dim[0] if scores.HasField("shape") and len(scores.shape.dim) == 2 else None
    top_k = attribute_value(ctx, "max_output", None)
    ctx.set_output_type(0, infer_type(TensorProto.INT32, [batch]))
    ctx.set_output_type(1, infer_type(TensorProto.INT32, [batch, None if top_k is None else int(top_k)]))


def schema() -> defs.OpSchema:
    """The ``frcnn::BatchedNMS`` (since_version 1) schema with its shape inference function."""
    param, attr = defs.OpSchema.FormalParameter, defs.OpSchema.Attribute
    kind = defs.OpSchema.AttrType
    result = defs.OpSchema(
        OP_NAME, DOMAIN, 1,
        doc="Greedy NMS per image where boxes of different groups never suppress each other "
            "(torchvision batched_nms; docs/ops.md).",
        inputs=[param("boxes", "T", "[B, N, 4] (x1, y1, x2, y2)"),
                param("scores", "T", "[B, N]"),
                param("groups", "tensor(int32)", "[B, N] group id (class or level)")],
        outputs=[param("num", "tensor(int32)", "[B] kept boxes per image (<= max_output)"),
                 param("indices", "tensor(int32)", "[B, max_output] indices into N, score descending "
                       "(ties: lower index first), padded with -1")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "box and score type")],
        attributes=[attr("iou_threshold", kind.FLOAT, "suppress when IoU > threshold (strictly)"),
                    attr("score_threshold", kind.FLOAT, "candidates need score > threshold (-inf: all "
                         "but -inf/NaN)"),
                    attr("max_output", kind.INT, "K, boxes kept per image"),
                    attr("max_candidates", helper.make_attribute("max_candidates", DEFAULT_MAX_CANDIDATES),
                         "GPU kernel's candidate cap (>= 1, rounded up to a power of two >= 64): exact when "
                         "at most this many scores exceed score_threshold; ONNX Runtime ignores it (exact "
                         "for any N)")] + plugin_attribute_schemas())
    result.set_type_and_shape_inference_function(_infer)
    return result


def _compact(fb: FunctionBuilder) -> tuple[str, str, str, str]:
    """Sort valid candidates first: (order [B,M] int64, key [B,M] float, boxes [B,M,4], groups [B,M])."""
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    scores = fb.op("Cast", "scores", to=f32)
    valid = fb.op("Greater", scores, fb.attr_const("score_threshold", "float"), name="valid")
    neg_inf = fb.const(float("-inf"), f32)
    masked = fb.op("Where", valid, scores, neg_inf, name="masked_scores")
    per_image = fb.op("ReduceSum", fb.op("Cast", valid, to=i64), fb.const([1]), keepdims=0)
    most = fb.op("ReduceMax", fb.op("Concat", per_image, fb.const([0]), axis=0), keepdims=1, name="M")
    values, order = fb.op("TopK", masked, most, axis=1, largest=1, sorted=1, outputs=2, name="sorted")
    valid_sorted = fb.op("Greater", values, neg_inf)
    rank_key = fb.op("Cast", fb.op("Range", fb.op("Squeeze", most), fb.const(0), fb.const(-1)), to=f32)
    key = fb.op("Where", valid_sorted, rank_key, fb.const(0.0, f32), name="rank_key")
    boxes = fb.op("GatherND", fb.op("Cast", "boxes", to=f32), fb.op("Unsqueeze", order, fb.const([2])),
                  batch_dims=1, name="sorted_boxes")
    groups = fb.op("GatherElements", fb.op("Cast", "groups", to=i64), order, axis=1)
    groups = fb.op("Where", valid_sorted, groups, fb.const(0), name="sorted_groups")
    return order, key, boxes, groups


def _group_keys(fb: FunctionBuilder, key: str, groups: str) -> str:
    """[B, G, M] keys: a candidate's key in its group's row, 0 elsewhere."""
    flat = fb.op("Concat", fb.op("Reshape", groups, fb.const([-1])), fb.const([0]), axis=0)
    low = fb.op("ReduceMin", flat, keepdims=0, name="group_min")
    count = fb.op("Add", fb.op("Sub", fb.op("ReduceMax", flat, keepdims=0), low), fb.const(1))
    row = fb.op("Unsqueeze", fb.op("Sub", groups, low), fb.const([1]))
    ids = fb.op("Reshape", fb.op("Range", fb.const(0), count, fb.const(1)), fb.const([1, -1, 1]))
    member = fb.op("Equal", row, ids, name="group_member")
    return fb.op("Where", member, fb.op("Unsqueeze", key, fb.const([1])), fb.const(0.0, TensorProto.FLOAT),
                 name="group_keys")


def function_proto(opset: int, nodes: list[onnx.NodeProto]) -> onnx.FunctionProto:
    """The ``frcnn::BatchedNMS`` local function for standard opset ``opset``.

    Attributes are read from the calling node, so nodes with different thresholds and K (RPN and box
    head) share one function. ValueError if a node lacks an attribute or has iou_threshold outside [0, 1].
    """
    for node in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        missing = [a for a, default in _ATTRIBUTES.items() if default is None and a not in attrs]
        if missing:
            raise ValueError(f"{OP_NAME} node {node.name!r} lacks attribute(s) {missing}")
        if not 0.0 <= attrs["iou_threshold"] <= 1.0:
            raise ValueError(f"{OP_NAME} node {node.name!r}: iou_threshold {attrs['iou_threshold']} is "
                             "outside [0, 1] (ONNX NonMaxSuppression rejects it)")
        if attrs.get("max_candidates", DEFAULT_MAX_CANDIDATES) < 1:
            raise ValueError(f"{OP_NAME} node {node.name!r}: max_candidates {attrs['max_candidates']} must "
                             "be >= 1")
    i64 = TensorProto.INT64
    fb = FunctionBuilder("nms")
    order, key, boxes, groups = _compact(fb)
    top_k = fb.op("Reshape", fb.attr_const("max_output", "int"), fb.const([1]), name="K")
    iou = fb.op("Reshape", fb.attr_const("iou_threshold", "float"), fb.const([1]))
    selected = fb.op("NonMaxSuppression", boxes, _group_keys(fb, key, groups), top_k, iou,
                     fb.const([0.0], TensorProto.FLOAT), center_point_box=0, name="selected")
    where = fb.op("Gather", selected, fb.const([0, 2]), axis=1, name="selected_batch_pos")
    kept_key = fb.op("ScatterND", fb.op("Mul", key, fb.const(0.0, TensorProto.FLOAT)), where,
                     fb.op("GatherND", key, where), name="kept_key")
    most = fb.op("Shape", key, start=1, end=2)
    width = fb.op("Min", top_k, most, name="out_width")
    top_values, top_pos = fb.op("TopK", kept_key, width, axis=1, largest=1, sorted=1, outputs=2)
    is_kept = fb.op("Greater", top_values, fb.const(0.0, TensorProto.FLOAT))
    picked = fb.op("Where", is_kept, fb.op("GatherElements", order, top_pos, axis=1), fb.const(-1))
    pads = fb.op("Concat", fb.const([0, 0, 0]), fb.op("Sub", top_k, width), axis=0)
    padded = fb.op("Pad", picked, pads, fb.const(-1), mode="constant")
    fb.op("Cast", padded, to=TensorProto.INT32, out="indices")
    count = fb.op("ReduceSum", fb.op("Cast", is_kept, to=i64), fb.const([1]), keepdims=0)
    fb.op("Cast", count, to=TensorProto.INT32, out="num")
    return make_function(OP_NAME, ["boxes", "scores", "groups"], ["num", "indices"], fb, opset,
                         {**_ATTRIBUTES, **PLUGIN_ATTRIBUTES}, doc=__doc__ or "")


def _check_max_candidates(max_candidates: int) -> int:
    if int(max_candidates) < 1:
        raise ValueError(f"{OP_NAME}: max_candidates must be >= 1, got {max_candidates}")
    return int(max_candidates)


def make_node(boxes: str, scores: str, groups: str, outputs: tuple[str, str], iou_threshold: float,
              score_threshold: float, max_output: int, name: str | None = None,
              max_candidates: int = DEFAULT_MAX_CANDIDATES) -> onnx.NodeProto:
    """A ``frcnn::BatchedNMS`` node (plugin attributes set; iou via ``float32_at_most``); ``outputs`` =
    (num, indices). ``score_threshold`` is compared in float32, as torch compares a tensor with a scalar.
    ``max_candidates`` (>= 1) is always written, so the TensorRT plugin (which has no attribute defaults)
    receives it."""
    return helper.make_node(OP_NAME, [boxes, scores, groups], list(outputs), name=name, domain=DOMAIN,
                            iou_threshold=float32_at_most(iou_threshold), score_threshold=float(score_threshold),
                            max_output=int(max_output), max_candidates=_check_max_candidates(max_candidates),
                            **PLUGIN_ATTRIBUTES)


def translation_entry() -> dict[Any, Any]:
    """``{torch.ops.frcnn.batched_nms.default: onnxscript function}`` for the dynamo exporter."""
    import frcnn.plugins.batched_nms.torch_op  # noqa: F401  (registers torch.ops.frcnn.batched_nms)
    import onnxscript
    import torch

    frcnn_opset = onnxscript.values.Opset(DOMAIN, 1)

    def batched_nms(boxes: Any, scores: Any, groups: Any, iou_threshold: float, score_threshold: float,
                    max_output: int, max_candidates: int = DEFAULT_MAX_CANDIDATES) -> Any:
        """boxes [B, N, 4], scores [B, N], groups [B, N] int32 -> one frcnn::BatchedNMS node."""
        return frcnn_opset.BatchedNMS(
            boxes, scores, groups, iou_threshold=float32_at_most(iou_threshold),
            score_threshold=float(score_threshold), max_output=int(max_output),
            max_candidates=_check_max_candidates(max_candidates), _num_outputs=2, **PLUGIN_ATTRIBUTES)

    return {torch.ops.frcnn.batched_nms.default: batched_nms}


def torchscript_symbolic() -> tuple[str, Any]:
    """``(torch op name, symbolic)`` for ``torch.onnx.register_custom_op_symbolic`` (dynamo=False)."""
    import torch
    from torch.onnx import symbolic_helper

    @symbolic_helper.parse_args("v", "v", "v", "f", "f", "i", "i")
    def symbolic(g: Any, boxes: Any, scores: Any, groups: Any, iou_threshold: float,
                 score_threshold: float, max_output: int, max_candidates: int) -> Any:
        num, indices = g.op(f"{DOMAIN}::{OP_NAME}", boxes, scores, groups, outputs=2,
                            iou_threshold_f=float32_at_most(iou_threshold),
                            score_threshold_f=score_threshold,
                            max_output_i=max_output,
                            max_candidates_i=_check_max_candidates(max_candidates),
                            **{name + "_s": value for name, value in PLUGIN_ATTRIBUTES.items()})
        batch = (scores.type().varyingSizes() or [None])[0]
        num.setType(torch._C.TensorType.create_from_tensor(torch.zeros(0, dtype=torch.int32))
                    .with_sizes([batch]))
        indices.setType(num.type().with_sizes([batch, max_output]))
        return num, indices

    return TORCH_OP, symbolic


__all__ = [
    "OP_NAME",
    "PLUGIN_VERSION",
    "TORCH_OP",
    "function_proto",
    "make_node",
    "schema",
    "torchscript_symbolic",
    "translation_entry",
]
