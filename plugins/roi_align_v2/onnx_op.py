"""ONNX face of frcnn::ROIAlignV2: schema, function body in standard ops, torch exporter hooks.

Function body (what ONNX Runtime runs), for L feature levels::

    rois [B,R,4] -> flat [B*R,4]; batch index of row j = j // R
    level  = clamp(floor(canonical_level + log2(sqrt(area) / canonical_box_size + 1e-8)), min, max) - min
    for each level i:  idx_i = NonZero(level == i)                       # only that level's ROIs
                       pooled_i = RoiAlign(p_i, rois[idx_i] * 2**-(min_level+i), batch[idx_i])
    pooled = Concat(pooled_i)[inverse permutation of Concat(idx_i)] -> [B,R,C,S,S]

Exactness (checked against a float32 NumPy transcription of detectron2's kernel in the tests):

- ``RoiAlign`` (opset 16, ``coordinate_transformation_mode="half_pixel"``, ``mode="avg"``) in ONNX Runtime
  has detectron2's ROIAlignV2 arithmetic: ``x * scale - 0.5``, no minimum ROI size, adaptive grid
  ``ceil(roi_size / output_size)``, samples outside [-1, size] contribute 0, [-1, 0] clamps to 0, mean
  over ``max(grid_h * grid_w, 1)`` samples, same float32 operation order (bit-identical outputs).
- The ROIs are pre-multiplied by the level scale ``2**-l`` and pooled with ``spatial_scale=1``; a
  power-of-two product is exact, so ``(x * 2**-l) * 1 - 0.5`` equals detectron2's ``x * 2**-l - 0.5``.
- ``log2`` is computed in float64 and rounded to float32 (ONNX has no Log2); the float32 sum with
  ``canonical_level`` and the floor follow detectron2. A sweep of 4000 float32 values around each level
  boundary gives the same levels as ``torch.log2``.

Each ROI is pooled on its own level only (docs/onnx-ops.md). Features may be float32 or float16 (the
body pools in float32 and casts back: ONNX Runtime's RoiAlign is float/double only). The body implements
``aligned=1`` only; ``attach_functions`` refuses a node with ``aligned=0``. A box with a NaN/inf coordinate
(which RoiAlign rejects) is replaced by (0, 0, 0, 0) and pools to zeros, like the torch op.
"""

from __future__ import annotations

from typing import Any

import onnx
from frcnn.plugins import DOMAIN, PLUGIN_VERSION
from frcnn.plugins.onnx_registry import (
    PLUGIN_ATTRIBUTES,
    FunctionBuilder,
    attribute_value,
    infer_type,
    make_function,
    plugin_attribute_schemas,
)
from frcnn.plugins.roi_align_v2 import DEFAULTS, OP_NAME, TORCH_OP
from onnx import TensorProto, defs, helper

_FLOAT_TYPES = ["tensor(float)", "tensor(float16)"]
_ATTR_DOCS = {
    "output_size": "Pooled height and width.",
    "sampling_ratio": "Samples per bin and axis; 0 = adaptive ceil(roi_size / output_size).",
    "aligned": "1 = ROIAlignV2 (subtract 0.5 pixel); the function body supports 1 only.",
    "canonical_box_size": "Box size (sqrt of area) that maps to canonical_level.",
    "canonical_level": "FPN level of a canonical_box_size box.",
    "min_level": "FPN level of the first feature input (its spatial scale is 2**-min_level).",
    "max_level": "FPN level of the last feature input (= min_level + number of features - 1).",
}


def _infer(ctx: Any) -> None:
    """Output [B, R, C, S, S] with the features' element type."""
    rois = ctx.get_input_type(0).tensor_type
    feats = ctx.get_input_type(1).tensor_type
    size = int(attribute_value(ctx, "output_size", DEFAULTS["output_size"]))
    rois_dims = list(rois.shape.dim) if rois.HasField("shape") else [None, None]
    channel = feats.shape.dim[1] if feats.HasField("shape") and len(feats.shape.dim) == 4 else None
    ctx.set_output_type(0, infer_type(feats.elem_type, [rois_dims[0], rois_dims[1], channel, size, size]))


def schema() -> defs.OpSchema:
    """The ``frcnn::ROIAlignV2`` (since_version 1) schema with its shape inference function."""
    param = defs.OpSchema.FormalParameter
    attributes = [defs.OpSchema.Attribute(name, helper.make_attribute(name, value), _ATTR_DOCS[name])
                  for name, value in DEFAULTS.items()]
    result = defs.OpSchema(
        OP_NAME, DOMAIN, 1,
        doc="Multi-level ROIAlign with detectron2 ROIAlignV2 semantics (docs/ops.md).",
        inputs=[param("rois", "T1", "[B, R, 4] boxes (x1, y1, x2, y2) in input-image pixels."),
                param("features", "T", "One [B, C, H_l, W_l] map per level, min_level first.",
                      param_option=defs.OpSchema.FormalParameterOption.Variadic, min_arity=1)],
        outputs=[param("pooled", "T", "[B, R, C, output_size, output_size]")],
        type_constraints=[("T", _FLOAT_TYPES, "feature type"), ("T1", _FLOAT_TYPES, "box type")],
        attributes=attributes + plugin_attribute_schemas())
    result.set_type_and_shape_inference_function(_infer)
    return result


def _check_nodes(nodes: list[onnx.NodeProto]) -> int:
    """The number of feature levels all ``nodes`` share; ValueError if the body cannot serve them."""
    levels = {len(n.input) - 1 for n in nodes}
    if len(levels) != 1 or min(levels) < 1:
        raise ValueError(f"{OP_NAME} nodes need the same number (>= 1) of feature inputs to share one "
                         f"function body; found {sorted(levels)}")
    num_levels = levels.pop()
    for node in nodes:
        attrs = {**DEFAULTS, **{a.name: helper.get_attribute_value(a) for a in node.attribute}}
        if attrs["aligned"] != 1:
            raise ValueError(f"{OP_NAME} node {node.name!r} has aligned={attrs['aligned']}; the ONNX "
                             "function body implements aligned=1 (ROIAlignV2) only")
        if attrs["max_level"] - attrs["min_level"] + 1 != num_levels:
            raise ValueError(
                f"{OP_NAME} node {node.name!r}: max_level - min_level + 1 = "
                f"{attrs['max_level'] - attrs['min_level'] + 1} but it has {num_levels} feature inputs; "
                "set min_level/max_level to match the features")
    return num_levels


def _levels(fb: FunctionBuilder, flat: str, num_levels: int) -> str:
    """int64 [B*R] level index (0 = min_level) of each box, detectron2's assign_boxes_to_levels."""
    f32, f64 = TensorProto.FLOAT, TensorProto.DOUBLE
    x1, y1, x2, y2 = (fb.op("Gather", flat, fb.const(k), axis=1, name=n)
                      for k, n in enumerate(["x1", "y1", "x2", "y2"]))
    area = fb.op("Mul", fb.op("Sub", x2, x1), fb.op("Sub", y2, y1), name="area")
    box_size = fb.op("Div", fb.op("Sqrt", area), fb.attr_const("canonical_box_size", "float"))
    ratio = fb.op("Add", box_size, fb.const(1e-8, TensorProto.FLOAT))
    log2 = fb.op("Div", fb.op("Log", fb.op("Cast", ratio, to=f64)), fb.const(0.6931471805599453, f64))
    canonical = fb.op("Cast", fb.attr_const("canonical_level", "int"), to=f32)
    level = fb.op("Floor", fb.op("Add", canonical, fb.op("Cast", log2, to=f32)), name="level")
    low, high = fb.attr_const("min_level", "int"), fb.attr_const("max_level", "int")
    level = fb.op("Clip", level, fb.op("Cast", low, to=f32), fb.op("Cast", high, to=f32))
    index = fb.op("Sub", fb.op("Cast", level, to=TensorProto.INT64), low)
    # NaN boxes: a NaN level casts to an arbitrary integer; clamp so that every row lands on one level
    return fb.op("Max", fb.op("Min", index, fb.const(num_levels - 1)), fb.const(0), name="level_index")


def _pool_level(fb: FunctionBuilder, feature: str, flat: str, batch: str, level: str, i: int) -> tuple[str, str]:
    """(row indices of level i's boxes, their pooled features [K_i, C, S, S] float32)."""
    idx = fb.op("Reshape", fb.op("NonZero", fb.op("Equal", level, fb.const(i))), fb.const([-1]),
                name=f"rows_l{i}")
    exponent = fb.op("Cast", fb.op("Add", fb.attr_const("min_level", "int"), fb.const(i)),
                     to=TensorProto.FLOAT)
    scale = fb.op("Pow", fb.const(0.5, TensorProto.FLOAT), exponent, name=f"scale_l{i}")
    rois = fb.op("Mul", fb.op("Gather", flat, idx, axis=0), scale, name=f"rois_l{i}")
    node = helper.make_node(
        "RoiAlign", [fb.op("Cast", feature, to=TensorProto.FLOAT), rois, fb.op("Gather", batch, idx)],
        [f"pooled_l{i}"], mode="avg", coordinate_transformation_mode="half_pixel", spatial_scale=1.0)
    node.attribute.extend([
        helper.make_attribute_ref("output_height", onnx.AttributeProto.INT, ref_attr_name="output_size"),
        helper.make_attribute_ref("output_width", onnx.AttributeProto.INT, ref_attr_name="output_size"),
        helper.make_attribute_ref("sampling_ratio", onnx.AttributeProto.INT)])
    fb.nodes.append(node)
    return idx, node.output[0]


def function_proto(opset: int, nodes: list[onnx.NodeProto]) -> onnx.FunctionProto:
    """The ``frcnn::ROIAlignV2`` local function for standard opset ``opset`` serving ``nodes``.

    Numeric attributes are read from the calling node (attribute references); the number of feature
    inputs is fixed by ``nodes`` (they must agree, with aligned=1 and max_level - min_level + 1 levels).
    """
    num_levels = _check_nodes(nodes)
    features = [f"features_{i}" for i in range(num_levels)]
    fb = FunctionBuilder("roi")
    flat = fb.op("Reshape", fb.op("Cast", "rois", to=TensorProto.FLOAT), fb.const([-1, 4]), name="rois_flat")
    # RoiAlign rejects non-finite boxes; such a row becomes (0, 0, 0, 0), which pools to zeros on
    # min_level, as the torch op does with a NaN box
    bad = fb.op("Or", fb.op("IsNaN", flat), fb.op("IsInf", flat))
    bad_row = fb.op("Greater", fb.op("ReduceSum", fb.op("Cast", bad, to=TensorProto.FLOAT), fb.const([1]),
                                     keepdims=1), fb.const(0.0, TensorProto.FLOAT))
    flat = fb.op("Where", bad_row, fb.const(0.0, TensorProto.FLOAT), flat, name="flat")
    batch_dim = fb.op("Shape", "rois", start=0, end=1)
    rows_dim = fb.op("Shape", "rois", start=1, end=2)
    batch_ids = fb.op("Unsqueeze", fb.op("Range", fb.const(0), fb.op("Squeeze", batch_dim), fb.const(1)),
                      fb.const([1]))
    grid = fb.op("Concat", batch_dim, rows_dim, axis=0)
    batch = fb.op("Reshape", fb.op("Expand", batch_ids, grid), fb.const([-1]), name="batch_index")
    level = _levels(fb, flat, num_levels)
    pooled_levels = [_pool_level(fb, features[i], flat, batch, level, i) for i in range(num_levels)]
    order = fb.op("Concat", *[idx for idx, _ in pooled_levels], axis=0, name="order")
    pooled = fb.op("Concat", *[p for _, p in pooled_levels], axis=0, name="pooled_by_level")
    positions = fb.op("Range", fb.const(0), fb.op("Size", order), fb.const(1))
    inverse = fb.op("ScatterElements", positions, order, positions, axis=0, name="inverse_order")
    out_shape = fb.op("Concat", grid, fb.op("Shape", pooled, start=1), axis=0)
    result = fb.op("Reshape", fb.op("Gather", pooled, inverse, axis=0), out_shape, allowzero=1)
    fb.op("CastLike", result, features[0], out="pooled")
    return make_function(OP_NAME, ["rois", *features], ["pooled"], fb, opset,
                         {**DEFAULTS, **PLUGIN_ATTRIBUTES}, doc=__doc__ or "")


def make_node(rois: str, features: list[str], output: str, name: str | None = None,
              **attributes: Any) -> onnx.NodeProto:
    """A ``frcnn::ROIAlignV2`` node (plugin attributes and ``max_level`` filled in)."""
    attrs = {**attributes}
    attrs.setdefault("min_level", DEFAULTS["min_level"])
    attrs.setdefault("max_level", int(attrs["min_level"]) + len(features) - 1)
    return helper.make_node(OP_NAME, [rois, *features], [output], name=name, domain=DOMAIN,
                            **attrs, **PLUGIN_ATTRIBUTES)


def _node_attributes(output_size: int, sampling_ratio: int, aligned: bool, canonical_box_size: float,
                     canonical_level: int, min_level: int, num_levels: int) -> dict[str, Any]:
    return {"output_size": int(output_size), "sampling_ratio": int(sampling_ratio), "aligned": int(aligned),
            "canonical_box_size": float(canonical_box_size), "canonical_level": int(canonical_level),
            "min_level": int(min_level), "max_level": int(min_level) + num_levels - 1, **PLUGIN_ATTRIBUTES}


def translation_entry() -> dict[Any, Any]:
    """``{torch.ops.frcnn.roi_align_v2.default: onnxscript function}`` for the dynamo exporter."""
    import frcnn.plugins.roi_align_v2.torch_op  # noqa: F401  (registers torch.ops.frcnn.roi_align_v2)
    import onnxscript
    import torch

    # torch 2.13's exporter (_building._construct_named_inputs_and_attrs) binds *all* positional args to
    # a variadic input that is not the first one (rois would appear twice); the node is therefore
    # recorded through an unregistered copy of the schema whose single variadic input is (rois, *levels).
    param = defs.OpSchema.FormalParameter
    registered = schema()
    flat_schema = defs.OpSchema(
        OP_NAME, DOMAIN, 1, inputs=[param("inputs", "T", param_option=defs.OpSchema.FormalParameterOption
                                          .Variadic, is_homogeneous=False)],
        outputs=[param("pooled", "T")], type_constraints=[("T", _FLOAT_TYPES, "")],
        attributes=list(registered.attributes.values()))
    node = onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, 1), OP_NAME, op_schema=flat_schema)

    def roi_align_v2(rois: Any, features: Any, output_size: int = int(DEFAULTS["output_size"]),
                     sampling_ratio: int = int(DEFAULTS["sampling_ratio"]), aligned: bool = bool(DEFAULTS["aligned"]),
                     canonical_box_size: float = float(DEFAULTS["canonical_box_size"]),
                     canonical_level: int = int(DEFAULTS["canonical_level"]),
                     min_level: int = int(DEFAULTS["min_level"])) -> Any:
        """rois [B, R, 4], features list of [B, C, H_l, W_l] -> one frcnn::ROIAlignV2 node."""
        attrs = _node_attributes(output_size, sampling_ratio, aligned, canonical_box_size,
                                 canonical_level, min_level, len(features))
        return node(rois, *features, **attrs)

    return {torch.ops.frcnn.roi_align_v2.default: roi_align_v2}


def torchscript_symbolic() -> tuple[str, Any]:
    """``(torch op name, symbolic)`` for ``torch.onnx.register_custom_op_symbolic`` (dynamo=False)."""
    from torch.onnx import symbolic_helper

    @symbolic_helper.parse_args("v", "v", "i", "i", "b", "f", "i", "i")
    def symbolic(g: Any, rois: Any, features: Any, output_size: int, sampling_ratio: int, aligned: bool,
                 canonical_box_size: float, canonical_level: int, min_level: int) -> Any:
        feats = symbolic_helper._unpack_list(features)
        attrs = _node_attributes(output_size, sampling_ratio, aligned, canonical_box_size,
                                 canonical_level, min_level, len(feats))
        suffix = {int: "_i", float: "_f", str: "_s"}
        out = g.op(f"{DOMAIN}::{OP_NAME}", rois, *feats,
                   **{name + suffix[type(value)]: value for name, value in attrs.items()})
        feature_type: Any = feats[0].type()  # a TensorType (JitType lacks the size accessors)
        rois_sizes = rois.type().varyingSizes() or [None, None]
        channels = (feature_type.varyingSizes() or [None, None])[1]
        out.setType(feature_type.with_sizes([rois_sizes[0], rois_sizes[1], channels, output_size,
                                             output_size]))
        return out

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
