"""fp32 -> fp16 conversion of an ONNX graph, keeping numerically sensitive nodes in fp32.

TensorRT 11 builds strongly typed networks only (no BuilderFlag.FP16): an fp16 engine is an fp16-typed ONNX.
:func:`to_fp16_onnx` retypes every float32 tensor computed by an "fp16 node" to float16 and leaves "fp32
nodes" alone; Casts are inserted where a tensor crosses between the two. Which nodes stay fp32 is a
predicate over the NodeProto; the default keeps detectron2's sensitive parts by the exporter's stable node
name prefixes (input normalization, anchors, box decoding, softmax) and by op type (NMS and TopK: ranking
ties, and the NMS inputs).

Rules:
- graph inputs and outputs keep their types (an fp16 value reaching a graph output is cast back);
- initializers and Constant nodes take the type their consumers want (converted once; an initializer that
  both kinds of consumers read is duplicated; values beyond fp16's range are clipped to +-65504, with a
  warning);
- inside fp16 nodes: Cast(to=FLOAT) becomes Cast(to=FLOAT16), ConstantOfShape's float value becomes fp16;
- some inputs are float32 by definition or by precision whatever their node is (``FP32_INPUTS``: Resize
  scales, ROIAlignV2's rois — box coordinates up to ~1333 px have a spacing of 1 px in fp16);
- nodes with subgraphs (If/Loop/Scan) stay fp32 as a whole.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FP32_NODE_PREFIXES: tuple[str, ...] = (
    "preprocess", "normalize", "rpn/anchors", "rpn/decode", "rpn/clip", "rpn/select", "roi_heads/decode",
    "roi_heads/clip", "postprocess",
    "roi_heads/softmax", "roi_heads/postprocess",
)
"""Node name prefixes the exporter gives the parts that must stay fp32."""

FP32_OP_TYPES: frozenset[str] = frozenset({"BatchedNMS", "NonMaxSuppression", "TopK", "Softmax", "LogSoftmax"})
"""Op types that always stay fp32."""

FP32_INPUTS: dict[str, frozenset[int]] = {
    "Resize": frozenset({2}), "Upsample": frozenset({1}), "ROIAlignV2": frozenset({0}),
}
"""Input positions that stay float32 even when their node runs in fp16."""

FP16_MAX = 65504.0

KeepFp32 = Callable[[onnx.NodeProto], bool]


def default_keep_fp32(node: onnx.NodeProto) -> bool:
    """True for nodes named with a ``FP32_NODE_PREFIXES`` prefix (optionally after a leading ``/``)."""
    name = node.name.lstrip("/")
    return node.op_type in FP32_OP_TYPES or name.startswith(FP32_NODE_PREFIXES)


def to_fp16_onnx(model: onnx.ModelProto, keep_fp32: KeepFp32 = default_keep_fp32) -> onnx.ModelProto:
    """A copy of ``model`` whose float32 computation runs in float16 except where ``keep_fp32`` says.

    Args:
        model: an ONNX model (top-level graph converted; subgraph nodes are kept fp32 whole).
        keep_fp32: predicate over nodes; True keeps the node's float tensors float32.
    Returns:
        the converted model (input/output names and types unchanged).
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    _Converter(result.graph, _float32_names(result), keep_fp32).run()
    return result


def _float32_names(model: onnx.ModelProto) -> set[str]:
    """Names of every float32 tensor of the top-level graph (after ONNX shape inference)."""
    from frcnn.plugins.onnx_registry import register_schemas

    register_schemas()
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    graph = inferred.graph
    typed = list(graph.input) + list(graph.value_info) + list(graph.output)
    names = {v.name for v in typed if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    names |= {t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT}
    for node in graph.node:
        if node.op_type == "Constant" and _constant_is_float32(node):
            names.add(node.output[0])
    return names


def _constant_is_float32(node: onnx.NodeProto) -> bool:
    for attr in node.attribute:
        if attr.name == "value":
            return attr.t.data_type == TensorProto.FLOAT
        if attr.name in ("value_float", "value_floats"):
            return True
    return False


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


class _Converter:
    """One pass over a topologically sorted graph; tracks the current fp16 / fp32 name of every tensor."""

    def __init__(self, graph: onnx.GraphProto, float32: set[str], keep_fp32: KeepFp32) -> None:
        self.graph = graph
        self.float32 = float32
        self.keep = keep_fp32
        self.nodes = list(graph.node)  # held: protobuf wrappers keep their id() only while referenced
        self.fp16_nodes = {id(n) for n in self.nodes if not (keep_fp32(n) or _has_subgraph(n))}
        self.initializers = {t.name: t for t in graph.initializer}
        self.constants = {n.output[0]: n for n in self.nodes if n.op_type == "Constant"}
        self.half: dict[str, str] = {}  # fp32 tensor name -> name of its fp16 version
        self.full: dict[str, str] = {}  # tensor produced in fp16 -> name of its fp32 version
        self.produced_fp16: set[str] = set()
        self.new_nodes: list[onnx.NodeProto] = []
        self.clipped: list[str] = []

    def run(self) -> None:
        wants = self._constant_wants()
        for name, kinds in wants.items():
            if kinds != {"fp16"}:
                continue
            if name in self.constants:
                self._constant_to_fp16(self.constants[name])
            else:  # an initializer only fp16 nodes read: converted in place
                tensor = self.initializers[name]
                tensor.CopyFrom(numpy_helper.from_array(self._to_half(numpy_helper.to_array(tensor), name), name))
                self.produced_fp16.add(name)
        for node in self.nodes:
            if node.op_type == "Constant" and node.output[0] in self.produced_fp16 | self._fp32_constants(wants):
                self.new_nodes.append(node)
                continue
            self._convert_node(node)
        self._restore_outputs()
        del self.graph.node[:]
        self.graph.node.extend(self.new_nodes)
        retyped = self.produced_fp16 | set(self.half.values())
        keep_info = [v for v in self.graph.value_info if v.name not in retyped]
        del self.graph.value_info[:]
        self.graph.value_info.extend(keep_info)
        if self.clipped:
            warnings.warn(f"to_fp16_onnx: values beyond +-{FP16_MAX} clipped in {sorted(self.clipped)}",
                          stacklevel=3)

    def _fp32_constants(self, wants: dict[str, set[str]]) -> set[str]:
        return {n for n in self.constants if wants.get(n, set()) != {"fp16"}}

    def _constant_wants(self) -> dict[str, set[str]]:
        """For every initializer / Constant output: the precisions its consumers want."""
        wants: dict[str, set[str]] = {}
        for node in self.nodes:
            for i, name in enumerate(node.input):
                if name in self.float32 and (name in self.initializers or name in self.constants):
                    wants.setdefault(name, set()).add(self._wanted(node, i))
        return wants

    def _wanted(self, node: onnx.NodeProto, index: int) -> str:
        if id(node) not in self.fp16_nodes or index in FP32_INPUTS.get(node.op_type, frozenset()):
            return "fp32"
        return "fp16"

    def _convert_node(self, node: onnx.NodeProto) -> None:
        for i, name in enumerate(node.input):
            if name and name in self.float32:
                node.input[i] = self._as(name, self._wanted(node, i))
        if id(node) in self.fp16_nodes:
            self._retype_attributes(node)
            for name in node.output:
                if name in self.float32:
                    self.produced_fp16.add(name)
        self.new_nodes.append(node)

    def _as(self, name: str, want: str) -> str:
        """Name of tensor ``name`` in precision ``want`` (Casts / fp16 initializers made on first use)."""
        is_fp16 = name in self.produced_fp16
        if want == "fp16":
            if is_fp16:
                return name
            if name not in self.half:
                self.half[name] = self._fp16_initializer(name) if name in self.initializers else \
                    self._cast(name, TensorProto.FLOAT16, f"{name}/fp16")
            return self.half[name]
        if not is_fp16:
            return name
        if name not in self.full:
            self.full[name] = self._cast(name, TensorProto.FLOAT, f"{name}/fp32")
        return self.full[name]

    def _cast(self, source: str, to: int, output: str) -> str:
        self.new_nodes.append(helper.make_node("Cast", [source], [output], name=f"fp16_boundary/{output}", to=to))
        return output

    def _fp16_initializer(self, name: str) -> str:
        tensor = self.initializers[name]
        half = numpy_helper.from_array(self._to_half(numpy_helper.to_array(tensor), name), f"{name}/fp16")
        self.graph.initializer.append(half)
        return half.name

    def _to_half(self, array: np.ndarray, name: str) -> np.ndarray:
        if array.size and np.nanmax(np.abs(np.where(np.isinf(array), 0, array))) > FP16_MAX:
            self.clipped.append(name)
            array = np.where(np.isinf(array), array, np.clip(array, -FP16_MAX, FP16_MAX))
        return array.astype(np.float16)

    def _constant_to_fp16(self, node: onnx.NodeProto) -> None:
        """Rewrite a float32 Constant node's value to float16 in place."""
        for attr in list(node.attribute):
            if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                value = self._to_half(numpy_helper.to_array(attr.t), node.output[0])
            elif attr.name in ("value_float", "value_floats"):
                scalar = attr.name == "value_float"
                value = self._to_half(np.asarray(attr.f if scalar else list(attr.floats), np.float32), node.output[0])
            else:
                continue
            node.attribute.remove(attr)
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(value)))
        self.produced_fp16.add(node.output[0])

    def _retype_attributes(self, node: onnx.NodeProto) -> None:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
            elif node.op_type == "ConstantOfShape" and attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(numpy_helper.from_array(self._to_half(numpy_helper.to_array(attr.t), node.name)))

    def _restore_outputs(self) -> None:
        """Graph outputs computed in fp16 are produced under a new name and cast back to the original."""
        for output in self.graph.output:
            if output.name not in self.produced_fp16:
                continue
            inner = f"{output.name}/fp16_out"
            for node in self.new_nodes:
                _rename(node.output, output.name, inner)
                _rename(node.input, output.name, inner)
            self.new_nodes.append(helper.make_node("Cast", [inner], [output.name], to=TensorProto.FLOAT,
                                                   name=f"fp16_boundary/{output.name}"))
            self.produced_fp16.discard(output.name)
            self.produced_fp16.add(inner)


def _rename(names: Any, old: str, new: str) -> None:
    """Replace ``old`` by ``new`` in a protobuf repeated string field."""
    for i, name in enumerate(list(names)):
        if name == old:
            names[i] = new


__all__ = ["FP32_INPUTS", "FP32_NODE_PREFIXES", "FP32_OP_TYPES", "default_keep_fp32", "to_fp16_onnx"]
