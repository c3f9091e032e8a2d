"""Fold the exported FrozenBN / eval-BN affine (``Conv -> Mul(scale) -> Add(shift)``) into the convolution.

The dynamo exporter keeps detectron2's ``FrozenBatchNorm2d`` as two elementwise nodes after each backbone
convolution (``.../conv1/Conv_0 -> .../conv1/norm/Mul_0 -> .../conv1/norm/Add_0``, constants [1, C, 1, 1]).
ONNX Runtime fuses them at session start in fp32, but a quantizer that runs on the raw graph puts Q/DQ
between the Conv and the Mul, which blocks both that fusion and ORT's QLinearConv fusion (the int8 model then
runs slower than fp32). Folding first gives every quantized Conv its real output:

    W'[o] = W[o] * scale[o]          b'[o] = b[o] * scale[o] + shift[o]      (b = 0 when the Conv has none)

Only folded when the Conv's weight (and bias) feed that Conv alone, the Mul/Add are the Conv's / Mul's only
consumers and their other inputs are constant per-output-channel tensors; anything else is left as is.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper


def _channel_vector(array: np.ndarray, channels: int) -> np.ndarray | None:
    """``array`` as a [C] vector when it is a per-output-channel constant of a [B, C, H, W] tensor."""
    if array.ndim in (3, 4) and array.size == channels and array.shape[-3] == channels:
        return array.reshape(channels)
    if array.ndim == 1 and array.size == 1:
        return np.full(channels, array[0], dtype=array.dtype)
    return None


def fold_conv_affine(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """(a copy of ``model`` with every foldable Conv->Mul->Add affine folded, the number folded)."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    outputs = {o.name for o in graph.output}
    removed: set[int] = set()
    folded = 0
    for conv in list(graph.node):
        chain = _affine_chain(conv, consumers, inits, outputs)
        if chain is None:
            continue
        mul, add, scale, shift = chain
        weight = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        bias = (numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2
                and conv.input[2] else np.zeros(weight.shape[0]))  # fmt: skip
        new_w = (weight * scale.reshape(-1, *([1] * (weight.ndim - 1)))).astype(np.float32)
        new_b = (bias * scale + shift).astype(np.float32)
        inits[conv.input[1]].CopyFrom(numpy_helper.from_array(new_w, conv.input[1]))
        bias_name = conv.input[2] if len(conv.input) > 2 and conv.input[2] else f"{conv.name}:bias"
        if bias_name in inits:
            inits[bias_name].CopyFrom(numpy_helper.from_array(new_b, bias_name))
        else:
            tensor = numpy_helper.from_array(new_b, bias_name)
            graph.initializer.append(tensor)
            inits[bias_name] = graph.initializer[-1]
        del conv.input[2:]
        conv.input.append(bias_name)
        conv.output[0] = add.output[0]
        removed.update((id(mul), id(add)))
        folded += 1
    kept = [n for n in graph.node if id(n) not in removed]
    del graph.node[:]
    graph.node.extend(kept)
    used = {i for n in graph.node for i in n.input}
    unused = [t for t in graph.initializer if t.name not in used]
    for t in unused:
        graph.initializer.remove(t)
    return result, folded


def _affine_chain(conv: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]],
                  inits: dict[str, onnx.TensorProto], outputs: set[str]
                  ) -> tuple[onnx.NodeProto, onnx.NodeProto, np.ndarray, np.ndarray] | None:
    """(Mul, Add, scale [C], shift [C]) following ``conv`` when they can be folded into it, else None."""
    if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or conv.input[1] not in inits:
        return None
    if len(consumers[conv.input[1]]) != 1 or (len(conv.input) > 2 and conv.input[2] and
                                              (conv.input[2] not in inits or len(consumers[conv.input[2]]) != 1)):
        return None
    channels = int(inits[conv.input[1]].dims[0])
    nxt = consumers.get(conv.output[0], [])
    if len(nxt) != 1 or nxt[0].op_type != "Mul" or conv.output[0] in outputs:
        return None
    mul = nxt[0]
    scale = _constant_operand(mul, conv.output[0], inits, channels)
    after = consumers.get(mul.output[0], [])
    if scale is None or len(after) != 1 or after[0].op_type != "Add" or mul.output[0] in outputs:
        return None
    add = after[0]
    shift = _constant_operand(add, mul.output[0], inits, channels)
    if shift is None:
        return None
    return mul, add, scale.astype(np.float64), shift.astype(np.float64)


def _constant_operand(node: onnx.NodeProto, data: str, inits: dict[str, onnx.TensorProto],
                      channels: int) -> np.ndarray | None:
    others = [i for i in node.input if i != data]
    if len(node.input) != 2 or len(others) != 1 or others[0] not in inits:
        return None
    array = numpy_helper.to_array(inits[others[0]])
    if array.dtype != np.float32:
        return None
    return _channel_vector(array, channels)
