"""Stable, meaningful node and tensor names for the exported graph (see docs/export.md, "Names").

Nodes: ``<module path>/<stage>/<OpType>_<k>`` from the exporter's module scopes (``pkg.torch.onnx.name_scopes``)
and the innermost frcnn function in the node's stack trace (``pkg.torch.onnx.stack_trace``); tensors:
``<node name>:<i>``; initializers keep the checkpoint keys (exporter constants: ``<consumer>:const<k>``);
the RPN's result is ``proposals`` / ``num_proposals`` and the pooled FPN levels ``p2``..``p5``.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Sequence

import onnx
import torch
from frcnn.runtime.contract import INPUT_NAMES, MASK_OUTPUT_NAMES, OUTPUT_NAMES, PROPOSAL_NAMES

PROTECTED = INPUT_NAMES + OUTPUT_NAMES + MASK_OUTPUT_NAMES + PROPOSAL_NAMES
"""Graph input/output names that are never renamed."""

_SCOPE_ALIASES = {"proposal_generator": "rpn", "anchor_generator": "anchors"}
_STAGE_ALIASES = {
    "preprocess": "preprocess", "apply_deltas": "decode", "grid_anchors": "anchors", "clip_boxes": "clip",
    "_top_candidates": "topk", "find_top_rpn_proposals": "select", "fast_rcnn_inference": "postprocess",
}
_FRAME = re.compile(r'File "([^"]+)", line \d+, in (\w+)')
_OUR_SOURCES = (os.sep + "modeling" + os.sep, os.sep + "plugins" + os.sep)


def register_stage_frames() -> None:
    """Keep the frames of the functions in ``_STAGE_ALIASES`` in the exporter's stack traces.

    torch.export records only ``forward`` frames by default; node names use the innermost stage function.
    Uses torch.fx's (private) stack-trace anchor registry when present; without it nodes are named by module
    scope only (still stable).
    """
    register = getattr(torch.fx.proxy, "_register_stack_trace_anchor", None)
    if register is None:
        return
    from frcnn.trainer.modeling import anchors, box_transform, meta_arch, roi_heads, rpn

    for fn in (meta_arch.GeneralizedRCNN.preprocess, box_transform.Box2BoxTransform.apply_deltas,
               anchors.DefaultAnchorGenerator.grid_anchors, rpn.clip_boxes, rpn._top_candidates,
               rpn.find_top_rpn_proposals, roi_heads.fast_rcnn_inference):
        register(fn)


def _stage(stack_trace: str) -> str:
    """Alias of the innermost frcnn modeling / plugins function in a node's stack trace ('' if none)."""
    frames = [(path, func) for path, func in _FRAME.findall(stack_trace) if any(s in path for s in _OUR_SOURCES)]
    if not frames:
        return ""
    for _, func in reversed(frames):
        if func in _STAGE_ALIASES:
            return _STAGE_ALIASES[func]
    return ""


def _scope(name_scopes: str) -> str:
    """'model.roi_heads.box_pooler' (deepest module of the exporter's scope list) -> 'roi_heads/box_pooler'."""
    try:
        scopes = json.loads(name_scopes.replace("'", '"'))
    except json.JSONDecodeError:
        return ""
    modules = [s for s in scopes[:-1] if s.startswith("model")]
    if not modules:
        return ""
    parts = modules[-1].split(".")[1:]
    return "/".join(_SCOPE_ALIASES.get(p, p) for p in parts)


def _node_prefix(node: onnx.NodeProto) -> str:
    meta = {p.key: p.value for p in node.metadata_props}
    scope = _scope(meta.get("pkg.torch.onnx.name_scopes", ""))
    stage = "softmax" if node.op_type == "Softmax" else _stage(meta.get("pkg.torch.onnx.stack_trace", ""))
    if "_empty_nn_module_stack" in meta.get("pkg.torch.onnx.name_scopes", "") or not meta:
        scope = "shapes"
    parts = [p for p in (scope, stage) if p]
    if len(parts) == 2 and parts[0].split("/")[-1] == parts[1]:
        parts = parts[:1]
    return "/".join(parts) or "graph"


def _rename_values(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    for node in graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]
    for value in list(graph.output) + list(graph.value_info):
        value.name = mapping.get(value.name, value.name)
    for init in graph.initializer:
        init.name = mapping.get(init.name, init.name)


def _name_constants(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    """Initializers that are not model weights (exporter constants): ``<first consumer node>:const<k>``."""
    first_use: dict[str, str] = {}
    for node in graph.node:
        for name in node.input:
            first_use.setdefault(name, node.name)
    counts: Counter[str] = Counter()
    for init in graph.initializer:
        if init.name in mapping or init.name not in first_use:
            continue
        consumer = first_use[init.name]
        mapping[init.name] = f"{consumer}:const{counts[consumer]}"
        counts[consumer] += 1


def name_graph(model: onnx.ModelProto, feature_names: Sequence[str]) -> onnx.ModelProto:
    """Give nodes and tensors the stable names described in the module docstring; drops node metadata."""
    from frcnn.plugins import DOMAIN

    graph = model.graph
    counts: Counter[str] = Counter()
    keep = set(PROTECTED)
    mapping: dict[str, str] = {}
    for init in graph.initializer:
        if init.name.startswith("model."):
            mapping[init.name] = init.name[len("model."):]
    for node in graph.node:
        prefix = _node_prefix(node)
        if node.domain == DOMAIN:
            node.name = f"{prefix}/{node.op_type}"
        else:
            node.name = f"{prefix}/{node.op_type}_{counts[prefix + node.op_type]}"
            counts[prefix + node.op_type] += 1
        for i, out in enumerate(node.output):
            if out and out not in keep:
                mapping[out] = f"{node.name}:{i}"
        del node.metadata_props[:]
    _name_constants(graph, mapping)
    custom = [n for n in graph.node if n.domain == DOMAIN]
    roi = [n for n in custom if n.op_type == "ROIAlignV2"]  # the box pooler's, then the mask pooler's
    nms = [n for n in custom if n.op_type == "BatchedNMS"]
    num_roi = 1 + any(o.name in MASK_OUTPUT_NAMES for o in graph.output)
    if len(roi) != num_roi or len(nms) != 2 or not roi[0].name.startswith("roi_heads/box_pooler"):
        raise RuntimeError(f"expected {num_roi} ROIAlignV2 (box pooler first) and 2 BatchedNMS nodes in the export, "
                           f"got {[n.name for n in roi]} and {len(nms)}; the model's inference path changed")
    rpn_nms = next(n for n in nms if n.name.startswith("rpn/"))
    special = {rpn_nms.output[0]: "num_proposals", roi[0].input[0]: "proposals"}
    special.update(zip(roi[0].input[1:], feature_names))
    outputs = {o.name for o in graph.output}
    mapping.update({old: new for old, new in special.items() if new not in outputs})
    _rename_values(graph, mapping)
    return model


__all__ = ["PROTECTED", "name_graph", "register_stage_frames"]
