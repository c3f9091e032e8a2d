"""The ONNX face shared by the custom ops: schemas, model-local functions and exporter hooks.

An exported model carries each custom op twice over (docs/onnx-ops.md, docs/export.md):

- a node ``frcnn::ROIAlignV2`` / ``frcnn::BatchedNMS`` with ``plugin_namespace="frcnn"`` and
  ``plugin_version="1"``: TensorRT's ONNX parser maps it to the registered plugin;
- a model-local ``FunctionProto`` of the same domain and name whose body is written in standard ONNX ops:
  ONNX Runtime (and ``onnx.reference``) inline it, so the very same file runs without any plugin.

This module registers the schemas (so ``onnx.checker`` and shape inference know the nodes), attaches or
strips the local functions, and hands the torch exporters their hooks. Only onnx is imported at module
level; torch and onnxscript are imported inside the hook functions.

Function bodies use standard-domain ops valid from opset 16 (``RoiAlign-16``, half_pixel) on; they are
built for the model's own standard opset because ``onnx.checker`` requires a local function to import the
same opset version as the model.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from types import ModuleType
from typing import Any

import onnx
from frcnn.plugins import DOMAIN, PLUGIN_VERSION
from onnx import defs, helper

MIN_OPSET = 16
"""Lowest standard opset the function bodies support (RoiAlign's half_pixel mode appeared in 16)."""

PLUGIN_ATTRIBUTES: dict[str, str] = {"plugin_namespace": DOMAIN, "plugin_version": PLUGIN_VERSION}
"""Attributes every custom node carries so TensorRT picks the plugin over the local function."""

_registered = False


def _op_modules() -> dict[str, ModuleType]:
    from frcnn.plugins.batched_nms import onnx_op as nms_onnx
    from frcnn.plugins.roi_align_v2 import onnx_op as roi_onnx

    return {roi_onnx.OP_NAME: roi_onnx, nms_onnx.OP_NAME: nms_onnx}


def register_schemas() -> None:
    """Register the ``frcnn`` op schemas with ``onnx.defs`` (idempotent; safe to call from anywhere)."""
    global _registered
    if _registered:
        return
    for op_type, module in _op_modules().items():
        if not defs.has(op_type, DOMAIN):
            defs.register_schema(module.schema())
    _registered = True


def plugin_attribute_schemas() -> list[defs.OpSchema.Attribute]:
    """Schema entries of the optional ``plugin_namespace`` / ``plugin_version`` string attributes."""
    string = defs.OpSchema.AttrType.STRING
    return [
        defs.OpSchema.Attribute(
            "plugin_namespace", string, "TensorRT plugin namespace (\"frcnn\"): makes TensorRT's ONNX "
            "parser use the plugin instead of inlining the local function.", required=False),
        defs.OpSchema.Attribute(
            "plugin_version", string, "TensorRT plugin version (\"1\").", required=False),
    ]


def _graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """``graph`` and every subgraph nested in its nodes' attributes (If/Loop/Scan bodies)."""
    found = [graph]
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                found.extend(_graphs(sub))
    return found


def custom_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Every ``frcnn`` node of the model's graph (subgraphs included), in graph order."""
    return [node for g in _graphs(model.graph) for node in g.node if node.domain == DOMAIN]


def model_opset(model: onnx.ModelProto) -> int:
    """The model's standard-domain (``""`` / ``ai.onnx``) opset version."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise ValueError("the model imports no standard ONNX opset; add opset_import {'': N} (N >= 16)")


def attach_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Add (or replace) the local functions of every ``frcnn`` op the model uses; returns ``model``.

    Also imports the ``frcnn`` domain at version 1 and raises the IR version to 10 where lower (function
    attribute defaults need IR >= 9). Raises ValueError when a node cannot be served by a function body
    (see each op's ``function_proto``) or the model's opset is below ``MIN_OPSET``.
    """
    opset = model_opset(model)
    if opset < MIN_OPSET:
        raise ValueError(f"model opset {opset} is below {MIN_OPSET}, the lowest opset the frcnn function "
                         f"bodies support (RoiAlign half_pixel); export with opset >= {MIN_OPSET}")
    modules = _op_modules()
    nodes = custom_nodes(model)
    unknown = sorted({n.op_type for n in nodes} - set(modules))
    if unknown:
        raise ValueError(f"the model has frcnn nodes {unknown} that no function body exists for; "
                         f"known ops: {sorted(modules)}")
    used = sorted({n.op_type for n in nodes})
    strip_functions(model, used)
    for op_type in used:
        model.functions.append(modules[op_type].function_proto(
            opset, [n for n in nodes if n.op_type == op_type]))
    if used and not any(e.domain == DOMAIN for e in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    model.ir_version = max(model.ir_version, 10)
    return model


def strip_functions(model: onnx.ModelProto, op_types: list[str] | None = None) -> onnx.ModelProto:
    """Remove the ``frcnn`` local functions (all, or those named in ``op_types``); returns ``model``.

    For TensorRT builds: without the function the parser can only map the node to the plugin.
    """
    keep = [f for f in model.functions
            if f.domain != DOMAIN or (op_types is not None and f.name not in op_types)]
    del model.functions[:]
    model.functions.extend(keep)
    return model


class FunctionBuilder:
    """Collects the nodes of a function body with unique, readable value names.

    ``fb.op("Add", a, b)`` appends a node and returns its output name (a list for ``outputs > 1``);
    ``fb.const(x)`` / ``fb.attr_const(...)`` make Constant nodes (literal / from a function attribute).
    """

    def __init__(self, prefix: str) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._prefix = prefix
        self._count = itertools.count()

    def _name(self, hint: str) -> str:
        return f"{self._prefix}_{hint}_{next(self._count)}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, name: str | None = None,
           out: str | None = None, **attributes: Any) -> Any:
        """Append a node; ``out`` gives its (single) output an exact name, e.g. a function output."""
        outs = [out] if out else [self._name(name or op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attributes))
        return outs[0] if outputs == 1 else outs

    def const(self, value: Any, dtype: int = onnx.TensorProto.INT64, name: str = "const") -> str:
        """A 1-D (list value) or scalar (number value) tensor constant."""
        dims = [len(value)] if isinstance(value, (list, tuple)) else []
        vals = list(value) if isinstance(value, (list, tuple)) else [value]
        return self.op("Constant", name=name, value=helper.make_tensor(self._name(name), dtype, dims, vals))

    def attr_const(self, attr: str, kind: str) -> str:
        """A scalar Constant holding the function attribute ``attr``; kind ``"int"`` or ``"float"``."""
        attr_type = onnx.AttributeProto.INT if kind == "int" else onnx.AttributeProto.FLOAT
        ref = helper.make_attribute_ref(f"value_{kind}", attr_type, ref_attr_name=attr)
        node = helper.make_node("Constant", [], [self._name(attr)])
        node.attribute.append(ref)
        self.nodes.append(node)
        return node.output[0]


def make_function(name: str, inputs: list[str], outputs: list[str], fb: FunctionBuilder, opset: int,
                  attributes: dict[str, Any], doc: str) -> onnx.FunctionProto:
    """A ``frcnn`` FunctionProto; ``attributes`` maps each attribute to its default (None: no default)."""
    function = helper.make_function(
        DOMAIN, name, inputs, outputs, fb.nodes,
        [helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)],
        attributes=[a for a, v in attributes.items() if v is None], doc_string=doc)
    function.attribute_proto.extend(
        helper.make_attribute(a, v) for a, v in attributes.items() if v is not None)
    return function


def infer_type(elem_type: int, dims: list[onnx.TensorShapeProto.Dimension | int | None]) -> onnx.TypeProto:
    """A tensor TypeProto for shape inference functions; a dim is copied, an int fixed, None unknown."""
    result = onnx.TypeProto()
    result.tensor_type.elem_type = elem_type
    shape = result.tensor_type.shape
    for dim in dims:
        new = shape.dim.add()
        if isinstance(dim, int):
            new.dim_value = dim
        elif dim is not None:
            new.CopyFrom(dim)
    return result


def attribute_value(ctx: Any, name: str, default: Any) -> Any:
    """The value of attribute ``name`` in a shape inference context, else ``default``."""
    attr = ctx.get_attribute(name)
    return default if attr is None else helper.get_attribute_value(attr)


def custom_translation_table() -> dict[Any, Callable[..., Any]]:
    """``torch.onnx.export(..., dynamo=True, custom_translation_table=...)`` entries for both ops.

    Maps ``torch.ops.frcnn.roi_align_v2.default`` and ``torch.ops.frcnn.batched_nms.default`` to
    onnxscript functions that emit one ``frcnn`` node each (plugin attributes set). Imports the torch
    faces (registering the torch ops) and registers the ONNX schemas.
    """
    register_schemas()
    table: dict[Any, Callable[..., Any]] = {}
    for module in _op_modules().values():
        table.update(module.translation_entry())
    return table


def register_torchscript_symbolics(opset: int) -> None:
    """Register both ops with the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``)."""
    import torch.onnx

    register_schemas()
    for module in _op_modules().values():
        torch_name, symbolic = module.torchscript_symbolic()
        torch.onnx.register_custom_op_symbolic(torch_name, symbolic, opset)


__all__ = [
    "MIN_OPSET",
    "PLUGIN_ATTRIBUTES",
    "FunctionBuilder",
    "attach_functions",
    "attribute_value",
    "custom_nodes",
    "custom_translation_table",
    "infer_type",
    "make_function",
    "model_opset",
    "plugin_attribute_schemas",
    "register_schemas",
    "register_torchscript_symbolics",
    "strip_functions",
]
