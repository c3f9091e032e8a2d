"""Where Q/DQ go in the frcnn graph, and the static check of TensorRT's explicit-quantization rules.

Quantized (int8 compute): the Conv / Gemm / residual and FPN Add / MaxPool / Resize nodes of the backbone,
FPN, RPN head and box head (``QUANTIZED_SCOPES``). Everything else stays fp32: pre-processing, anchors,
top-k, box decoding, clipping, softmax and the ``frcnn`` custom nodes (whose inputs are rewired to the fp32
tensors, never a DequantizeLinear output). ``check_qdq_rules`` is what tests and ``quantize_onnx`` assert:

- every QuantizeLinear / DequantizeLinear is int8 with all-zero zero points (symmetric; TensorRT refuses
  other zero points and uint8);
- weight DQs feeding Conv are per-channel on axis 0 (output channels) and on Gemm (transB=1) axis 0;
  activation scales are scalars (per-tensor);
- no input of a ``frcnn`` node is produced by a DequantizeLinear.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import numpy as np
import onnx
from frcnn.plugins import DOMAIN
from onnx import numpy_helper

QUANTIZED_SCOPES = ("backbone/", "rpn/rpn_head/", "roi_heads/box_head/")
"""Node-name prefixes whose compute runs in int8 (docs/export.md names the graph's scopes)."""
QUANTIZED_OP_TYPES = ("Conv", "Gemm", "Relu", "Add", "MaxPool", "Resize")
"""Op types quantized inside those scopes (a Relu after a Conv loses its Q/DQ: both TensorRT and ORT fuse it)."""


def nodes_to_quantize(model: onnx.ModelProto, exclude: Sequence[str] = ()) -> list[str]:
    """Names of the nodes to quantize: QUANTIZED_OP_TYPES inside QUANTIZED_SCOPES, minus those matching any
    ``exclude`` glob pattern (``fnmatch`` on the node name, e.g. ``"backbone/bottom_up/stem/*"``)."""
    chosen = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in QUANTIZED_OP_TYPES:
            continue
        if not node.name.startswith(QUANTIZED_SCOPES):
            continue
        if any(fnmatch.fnmatchcase(node.name, pattern) for pattern in exclude):
            continue
        chosen.append(node.name)
    return chosen


def bypass_qdq_for_custom_nodes(model: onnx.ModelProto) -> int:
    """Rewire each ``frcnn`` node input read from ``DequantizeLinear(QuantizeLinear(x))`` to ``x`` (in place);
    drops Q/DQ nodes left without consumers. Returns the number of rewired inputs."""
    producer = {o: n for n in model.graph.node for o in n.output}
    rewired = 0
    for node in model.graph.node:
        if node.domain != DOMAIN:
            continue
        for k, name in enumerate(node.input):
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[k] = q.input[0]
                rewired += 1
    _drop_dead_qdq(model)
    return rewired


def unshare_qdq_params(model: onnx.ModelProto) -> int:
    """Give each QuantizeLinear (and the DequantizeLinear nodes reading it) its own scale / zero-point
    initializers (in place); returns how many Q nodes were given copies.

    ONNX Runtime's quantizer reuses one scale/zero point for tensors that must share a range (MaxPool,
    Resize and their input); ORT's CPU optimizer (QDQS8ToU8Transformer, int8 -> uint8 activations on x86)
    then skips such shared pairs, leaving int8 and uint8 around one Conv, so no QLinearConv is fused and the
    Conv runs in fp32 on dequantized tensors. Values are unchanged; TensorRT sees the same graph semantics.
    """
    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    copied = 0
    for q in [n for n in model.graph.node if n.op_type == "QuantizeLinear"]:
        readers = [q] + [c for c in consumers.get(q.output[0], []) if c.op_type == "DequantizeLinear"]
        for slot, suffix in ((1, "scale"), (2, "zero_point")):
            if len(q.input) <= slot or q.input[slot] not in inits:
                continue
            old = q.input[slot]
            if len(consumers.get(old, [])) == len([r for r in readers if len(r.input) > slot and r.input[slot] == old]):
                continue  # used by this pair only
            new = f"{q.name}:{suffix}"
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[old])
            copy.name = new
            model.graph.initializer.append(copy)
            for r in readers:
                if len(r.input) > slot and r.input[slot] == old:
                    r.input[slot] = new
            copied += slot == 1
    used = {i for n in model.graph.node for i in n.input}
    for t in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(t)
    return copied


def _drop_dead_qdq(model: onnx.ModelProto) -> None:
    graph = model.graph
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]  # fmt: skip
        if not dead:
            return
        for n in dead:
            graph.node.remove(n)


def check_qdq_rules(model: onnx.ModelProto) -> list[str]:
    """Violations of the rules in the module docstring (empty when the graph follows them)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    problems: list[str] = []
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            problems += _check_qdq_node(node, inits)
        elif node.op_type in ("Conv", "Gemm") and len(node.input) > 1:
            dq = producer.get(node.input[1])
            if dq is not None and dq.op_type == "DequantizeLinear":
                problems += _check_weight_axis(node, dq, inits)
        if node.domain == DOMAIN:
            for name in node.input:
                if name in producer and producer[name].op_type == "DequantizeLinear":
                    problems.append(f"{node.name}: input {name} comes from a DequantizeLinear (must stay fp32)")
    return problems


def _check_qdq_node(node: onnx.NodeProto, inits: dict[str, np.ndarray]) -> list[str]:
    problems = []
    if len(node.input) < 3 or node.input[2] not in inits:
        return [f"{node.name}: no constant zero point (TensorRT needs an explicit int8 zero point of 0)"]
    zp = inits[node.input[2]]
    if zp.dtype != np.int8:
        problems.append(f"{node.name}: zero point type {zp.dtype} (TensorRT: int8 only)")
    if np.any(zp != 0):
        problems.append(f"{node.name}: non-zero zero point (TensorRT: symmetric, zero point 0)")
    scale = inits.get(node.input[1])
    if scale is None:
        problems.append(f"{node.name}: scale is not a constant")
    elif scale.dtype != np.float32 or not np.all(scale > 0) or not np.all(np.isfinite(scale)):
        problems.append(f"{node.name}: scale must be positive finite float32")
    return problems


def _check_weight_axis(consumer: onnx.NodeProto, dq: onnx.NodeProto, inits: dict[str, np.ndarray]) -> list[str]:
    weight = inits.get(dq.input[0])
    scale = inits.get(dq.input[1])
    if weight is None or scale is None:
        return [f"{consumer.name}: weight DequantizeLinear {dq.name} does not read constant int8 weights"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
    axis = int(attrs.get("axis", 1))
    trans_b = int({a.name: onnx.helper.get_attribute_value(a) for a in consumer.attribute}.get("transB", 0))
    want = 0 if consumer.op_type == "Conv" or trans_b else 1
    out_channels = weight.shape[want]
    if scale.ndim != 1 or scale.size != out_channels or axis % weight.ndim != want:
        return [(f"{consumer.name}: weights must be per-channel on axis {want} ({out_channels} scales), got "
                 f"axis {axis} with scale shape {scale.shape}")]
    return []
