"""PyTorch detector -> one ONNX file that TensorRT (plugins) and ONNX Runtime (local functions) both run.

    from frcnn.export.onnx_export import export_onnx
    path = export_onnx(model.eval(), cfg, "model.onnx", opset=18, class_names=[...])

Steps (docs/export.md has the graph layout):

1. ``DeployModel`` wraps the eval model: inputs ``images`` uint8 [B, 3, H, W] and ``image_sizes`` int32 [B, 2],
   outputs ``num_detections`` int32 [B], ``boxes`` float32 [B, T, 4], ``scores`` float32 [B, T],
   ``classes`` int32 [B, T] (T = TEST.DETECTIONS_PER_IMAGE).
2. ``torch.onnx.export(dynamo=True)`` with symbolic B, H, W (``torch.export.Dim``) and the custom ops'
   ``custom_translation_table`` (frcnn::ROIAlignV2, frcnn::BatchedNMS nodes with plugin attributes). The
   dynamo exporter is used because it keeps every shape symbolic (anchors, paddings and top-k sizes are
   computed in the graph from the input's shape); the TorchScript tracer would bake Python-int arithmetic
   on shapes (``torch.sym_min`` in the RPN top-k) into constants.
3. Stable names (``name_graph``): node names are ``<module path>/<stage>/<OpType>_<k>`` built from the
   exporter's module scopes and the innermost frcnn function of each node's stack trace (``rpn/decode/Exp_0``,
   ``roi_heads/softmax/Softmax_0``); tensors are ``<node name>:<i>``; initializers keep the checkpoint keys;
   the RPN's output is ``proposals`` / ``num_proposals`` and the pooled features are ``p2``..``p5``.
4. onnx-graphsurgeon: fold constants, remove dead nodes, toposort. Local functions of the custom ops
   (``frcnn.plugins.onnx_registry.attach_functions``), metadata props, ``onnx.checker`` (full check) and
   strict shape inference, then an atomic write (temp file + ``os.replace``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from frcnn.export.naming import name_graph, register_stage_frames
from frcnn.runtime.contract import INPUT_NAMES, MASK_OUTPUT_NAMES, OUTPUT_NAMES, PROPOSAL_NAMES
from frcnn.runtime.contract import MIN_PADDED_SIDE as MIN_IMAGE_SIDE
from frcnn.runtime.errors import UserError
from frcnn.runtime.fileio import atomic_writer
from torch import Tensor, nn

DEFAULT_OPSET = 18
SUPPORTED_OPSETS = range(18, 22)
"""Standard opsets the export is tested with (the dynamo exporter emits 18 natively)."""

class DeployModel(nn.Module):
    """The exported module: plain tensors in, the fixed-size detection tuple out.

    Args:
        model: GeneralizedRCNN in eval mode.
        return_proposals: also return ``proposals`` [B, P, 4] and ``num_proposals`` [B] int32.
    forward(images uint8 [B, 3, H, W], image_sizes int32 [B, 2]) ->
        (num_detections [B] int32, boxes [B, T, 4] float32, scores [B, T] float32, classes [B, T] int32)
        + (masks [B, T, M, M] float32,) for a Mask R-CNN model
    """

    def __init__(self, model: Any, return_proposals: bool = False) -> None:
        super().__init__()
        self.model = model
        self.return_proposals = return_proposals

    @property
    def output_names(self) -> tuple[str, ...]:
        masks = MASK_OUTPUT_NAMES if getattr(self.model.roi_heads, "mask_on", False) else ()
        return OUTPUT_NAMES + masks + (PROPOSAL_NAMES if self.return_proposals else ())

    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, ...]:
        out = self.model.inference(images, image_sizes, return_proposals=self.return_proposals)
        return tuple(out[name] for name in self.output_names)


def check_opset(opset: int) -> int:
    """``opset`` if supported, else a UserError naming the supported range."""
    if int(opset) not in SUPPORTED_OPSETS:
        raise UserError(
            f"--opset {opset} is not supported: the export is built and checked for ONNX opsets "
            f"{SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1} (RoiAlign-16 half_pixel in the local "
            f"functions, the dynamo exporter's opset 18 ops); pass e.g. --opset {DEFAULT_OPSET}")
    return int(opset)


def check_writable(output_path: str | os.PathLike[str]) -> Path:
    """The output path, after checking that its folder exists and is writable (UserError otherwise)."""
    path = Path(output_path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UserError(f"output path '{path}' is a directory; pass a file name such as '{path / 'model.onnx'}'")
    if not folder.is_dir():
        raise UserError(f"cannot write '{path}': folder '{folder}' does not exist; create it or choose another "
                        "--output")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot write '{path}': folder '{folder}' is not writable; choose another --output")
    return path


def _torch_export(module: DeployModel, example: tuple[Tensor, Tensor], opset: int, max_batch: int,
                  max_side: int) -> onnx.ModelProto:
    from frcnn.plugins import onnx_registry

    register_stage_frames()
    batch = torch.export.Dim("batch", min=1, max=max(int(max_batch), 2))
    height = torch.export.Dim("height", min=MIN_IMAGE_SIDE, max=max(int(max_side), MIN_IMAGE_SIDE + 1))
    width = torch.export.Dim("width", min=MIN_IMAGE_SIDE, max=max(int(max_side), MIN_IMAGE_SIDE + 1))
    output_names = list(module.output_names)
    try:
        program = torch.onnx.export(
            module, example, dynamo=True, opset_version=opset, optimize=True, verbose=False, report=False,
            custom_translation_table=onnx_registry.custom_translation_table(),
            dynamic_shapes={"images": {0: batch, 2: height, 3: width}, "image_sizes": {0: batch}},
            input_names=list(INPUT_NAMES), output_names=output_names)
    except Exception as exc:
        if _caused_by_interrupt(exc):  # torch.export wraps a Ctrl-C raised while it traces: unwrap it
            raise KeyboardInterrupt from None
        raise
    if program is None:  # only None when exporting to a file path, which is not done here
        raise RuntimeError("torch.onnx.export returned no ONNXProgram")
    return program.model_proto


def _caused_by_interrupt(exc: BaseException | None) -> bool:
    """Whether ``exc`` or an exception it was raised from / during is a KeyboardInterrupt."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def cleanup(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx-graphsurgeon: fold constants, remove dead nodes and unused tensors, topological order."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    graph.fold_constants(error_ok=False).cleanup(remove_unused_graph_inputs=False).toposort()
    result = gs.export_onnx(graph, do_type_check=True)
    result.ir_version = model.ir_version
    return result


def metadata(cfg: Any, class_names: Sequence[str], opset: int, size_divisibility: int = 32,
             category_ids: Sequence[int] | None = None) -> dict[str, str]:
    """The ``metadata_props`` of the exported model (all values are strings; lists/dicts as JSON).

    ``class_names[k]`` names class ``k`` of the ``classes`` output; ``category_ids[k]`` (when known: the
    training dataset's COCO category id of class ``k``) is stored as ``category_ids``.
    """
    import onnxscript
    from frcnn.plugins import DOMAIN, PLUGIN_VERSION

    try:
        from importlib.metadata import version

        frcnn_version = version("frcnn-deploy")
    except Exception:  # noqa: BLE001 - not installed as a distribution (source checkout)
        frcnn_version = "unknown"
    ids = {"category_ids": json.dumps([int(i) for i in category_ids])} if category_ids is not None else {}
    return {
        "class_names": json.dumps(list(class_names)),
        **ids,
        "num_classes": str(int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)),
        "input_format": json.dumps({
            "images": "uint8 [B, 3, H, W], channels " + str(cfg.INPUT.FORMAT) + ", values 0..255, resized, the "
                      "batch padded on the bottom/right (padding values arbitrary)",
            "image_sizes": "int32 [B, 2] valid (height, width) of each image inside the padded batch",
            "channel_order": str(cfg.INPUT.FORMAT)}),
        "pixel_mean": json.dumps([float(v) for v in cfg.MODEL.PIXEL_MEAN]),
        "pixel_std": json.dumps([float(v) for v in cfg.MODEL.PIXEL_STD]),
        "resize": json.dumps({"rule": "ResizeShortestEdge", "min_size": int(_first(cfg.INPUT.MIN_SIZE_TEST)),
                              "max_size": int(cfg.INPUT.MAX_SIZE_TEST), "interpolation": "bilinear (Pillow)"}),
        "size_divisibility": str(int(size_divisibility)),
        "detections_per_image": str(int(cfg.TEST.DETECTIONS_PER_IMAGE)),
        "score_threshold": repr(float(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST)),
        "box_coordinates": "x1, y1, x2, y2 in pixels of the resized input image (scale to the original size)",
        "opset": str(int(opset)),
        "custom_domain": DOMAIN,
        "plugin_version": PLUGIN_VERSION,
        "exporter": "torch.onnx.export(dynamo=True)",
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "onnxscript_version": getattr(onnxscript, "__version__", "unknown"),
        "frcnn_deploy_version": frcnn_version,
    }


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) else value


def check(model: onnx.ModelProto) -> onnx.ModelProto:
    """``onnx.checker`` full check and strict shape inference (with type checks); returns the inferred model."""
    from frcnn.plugins import onnx_registry

    onnx_registry.register_schemas()
    onnx.checker.check_model(model, full_check=True)
    return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)


def write_atomic(model: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Serialize ``model`` to a temp file beside ``path``, then ``os.replace``; nothing is left on failure."""
    target = check_writable(path)
    data = model.SerializeToString()
    try:
        with atomic_writer(target, "wb", fsync=True) as f:
            f.write(data)
    except OSError as err:
        raise UserError(f"cannot write '{target}': {err.strerror or err} (disk full or read-only?); nothing "
                        "was written; choose another --output") from None
    return target


def to_onnx_model(model: nn.Module, cfg: Any, *, opset: int = DEFAULT_OPSET,
                  class_names: Sequence[str] | None = None, max_batch: int = 8, max_side: int = 4096,
                  example_hw: tuple[int, int] | None = None, return_proposals: bool = False,
                  category_ids: Sequence[int] | None = None) -> onnx.ModelProto:
    """The exported, named, cleaned, function-carrying and checked ModelProto (see the module docstring).

    model: GeneralizedRCNN (put in eval mode here). example_hw: (H, W) of the trace example (symbolic
    anyway; default MIN_SIZE_TEST rounded up to 32). return_proposals: also output ``proposals`` [B, P, 4]
    and ``num_proposals`` [B] (for parity checks; the deployed file has the four detection outputs only).
    """
    from frcnn.plugins import onnx_registry

    opset = check_opset(opset)
    num_classes = int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise UserError(f"{len(names)} class names given for a model with MODEL.ROI_HEADS.NUM_CLASSES "
                        f"{num_classes}; pass exactly one name per class")
    side = -(-int(_first(cfg.INPUT.MIN_SIZE_TEST)) // 32) * 32
    h, w = example_hw or (side, side)
    example = (torch.zeros(2, 3, h, w, dtype=torch.uint8), torch.tensor([[h, w], [h - 7, w - 5]], dtype=torch.int32))
    module = DeployModel(model.eval(), return_proposals=return_proposals).eval()
    with torch.no_grad():
        proto = _torch_export(module, example, opset, max_batch, max_side)
    proto = name_graph(proto, list(cfg.MODEL.ROI_HEADS.IN_FEATURES))
    proto = cleanup(proto)
    proto.graph.name = "frcnn_faster_rcnn_fpn"
    props = metadata(cfg, names, opset, int(getattr(model.backbone, "size_divisibility", 0) or 1), category_ids)
    proto.producer_name, proto.producer_version = "frcnn-deploy", props["frcnn_deploy_version"]
    onnx_registry.attach_functions(proto)
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    check(proto)
    return proto


def export_onnx(model: nn.Module, cfg: Any, output_path: str | os.PathLike[str], *, opset: int = DEFAULT_OPSET,
                class_names: Sequence[str] | None = None, max_batch: int = 8, max_side: int = 4096,
                example_hw: tuple[int, int] | None = None, return_proposals: bool = False,
                category_ids: Sequence[int] | None = None) -> Path:
    """Export ``model`` (GeneralizedRCNN) to ``output_path`` atomically; returns the path.

    Dynamic axes: batch (1..max_batch), height and width (MIN_IMAGE_SIDE..max_side). Raises UserError for an
    unsupported opset, wrong class-name count or an unwritable path (checked before the slow export).
    """
    check_opset(opset)
    check_writable(output_path)
    proto = to_onnx_model(model, cfg, opset=opset, class_names=class_names, max_batch=max_batch,
                          max_side=max_side, example_hw=example_hw, return_proposals=return_proposals,
                          category_ids=category_ids)
    return write_atomic(proto, output_path)


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the named intermediate tensors (e.g. ``proposals``,
    ``num_proposals``, ``p2``); types and shapes come from shape inference. KeyError for an unknown name."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    inferred = onnx.shape_inference.infer_shapes(result)
    known = {v.name: v for v in inferred.graph.value_info}
    for name in names:
        if name not in known:
            raise KeyError(f"tensor {name!r} is not in the graph (or its type is unknown)")
        result.graph.output.append(known[name])
    return result


def describe(model: onnx.ModelProto) -> dict[str, Any]:
    """Inputs / outputs (name, type, dims), custom nodes, opset and metadata of an exported model."""
    from frcnn.plugins import DOMAIN
    from frcnn.plugins.onnx_registry import model_opset

    def values(vs: Any) -> list[tuple[str, str, list[str | int]]]:
        out = []
        for v in vs:
            t = v.type.tensor_type
            dims: list[str | int] = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append((v.name, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, dims))
        return out

    return {
        "inputs": values(model.graph.input),
        "outputs": values(model.graph.output),
        "custom_nodes": [(n.name, f"{n.domain}::{n.op_type}") for n in model.graph.node if n.domain == DOMAIN],
        "functions": [f"{f.domain}::{f.name}" for f in model.functions],
        "opset": model_opset(model),
        "metadata": {p.key: p.value for p in model.metadata_props},
    }


__all__ = [
    "DEFAULT_OPSET",
    "INPUT_NAMES",
    "MASK_OUTPUT_NAMES",
    "MIN_IMAGE_SIDE",
    "OUTPUT_NAMES",
    "PROPOSAL_NAMES",
    "SUPPORTED_OPSETS",
    "DeployModel",
    "check",
    "check_opset",
    "check_writable",
    "cleanup",
    "describe",
    "export_onnx",
    "metadata",
    "name_graph",
    "to_onnx_model",
    "with_outputs",
    "write_atomic",
]
