"""ONNX face of frcnn::ROIAlignV2: schema, shape inference, function body in ONNX Runtime, exporters.

References: a float32 NumPy transcription of detectron2's ROIAlignV2 CPU kernel (written here), and the
torch op ``torch.ops.frcnn.roi_align_v2``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from frcnn.plugins import onnx_registry as reg
from frcnn.plugins.roi_align_v2 import onnx_op
from onnx import TensorProto, helper

F32 = np.float32
LEVELS = (2, 3, 4, 5)


# ----------------------------------------------------------------------------- references
def _bilinear(f: np.ndarray, y: F32, x: F32) -> np.ndarray:
    """detectron2 bilinear_interpolate for all channels of f [C, H, W], float32 arithmetic."""
    _, h, w = f.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return np.zeros(f.shape[0], F32)
    y, x = max(y, F32(0)), max(x, F32(0))
    y_low, x_low = int(y), int(x)
    if y_low >= h - 1:
        y_high = y_low = h - 1
        y = F32(y_low)
    else:
        y_high = y_low + 1
    if x_low >= w - 1:
        x_high = x_low = w - 1
        x = F32(x_low)
    else:
        x_high = x_low + 1
    ly, lx = F32(y - F32(y_low)), F32(x - F32(x_low))
    hy, hx = F32(1) - ly, F32(1) - lx
    return ((hy * hx) * f[:, y_low, x_low] + (hy * lx) * f[:, y_low, x_high]
            + (ly * hx) * f[:, y_high, x_low] + (ly * lx) * f[:, y_high, x_high])


def roi_align_v2_ref(f: np.ndarray, box: np.ndarray, scale: float, size: int = 7) -> np.ndarray:
    """detectron2 ROIAlignV2 (aligned=True, sampling_ratio=0) of one box on f [C, H, W] -> [C, S, S]."""
    x1, y1, x2, y2 = (F32(v) * F32(scale) - F32(0.5) for v in box)
    bin_h, bin_w = F32((y2 - y1) / F32(size)), F32((x2 - x1) / F32(size))
    grid_h, grid_w = int(np.ceil((y2 - y1) / F32(size))), int(np.ceil((x2 - x1) / F32(size)))
    out = np.zeros((f.shape[0], size, size), F32)
    for ph in range(size):
        for pw in range(size):
            acc = np.zeros(f.shape[0], F32)
            for iy in range(grid_h):
                y = F32(y1 + F32(ph) * bin_h + F32(iy + 0.5) * bin_h / F32(grid_h))
                for ix in range(grid_w):
                    x = F32(x1 + F32(pw) * bin_w + F32(ix + 0.5) * bin_w / F32(grid_w))
                    acc += _bilinear(f, y, x)
            out[:, ph, pw] = acc / F32(max(grid_h * grid_w, 1))
    return out


def level_ref(box: np.ndarray) -> int:
    """detectron2 assign_boxes_to_levels for one box (float32; log2 rounded from float64)."""
    area = F32((box[2] - box[0]) * (box[3] - box[1]))
    ratio = F32(np.sqrt(area) / F32(224)) + F32(1e-8)
    return int(np.clip(np.floor(F32(4) + F32(np.log2(np.float64(ratio)))), 2, 5))


# ----------------------------------------------------------------------------- helpers
def _model(opset: int = 18, channels: int = 3, elem: int = TensorProto.FLOAT, **attrs) -> onnx.ModelProto:
    reg.register_schemas()
    node = onnx_op.make_node("rois", [f"p{lvl}" for lvl in LEVELS], "pooled", name="box_pooler", **attrs)
    inputs = [helper.make_tensor_value_info("rois", TensorProto.FLOAT, ["B", "R", 4])] + [
        helper.make_tensor_value_info(f"p{lvl}", elem, ["B", channels, f"H{lvl}", f"W{lvl}"]) for lvl in LEVELS]
    graph = helper.make_graph([node], "roi", inputs, [helper.make_tensor_value_info("pooled", elem, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    reg.attach_functions(model)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _features(rng: np.random.Generator, batch: int, channels: int = 3, h: int = 64, w: int = 96) -> dict:
    return {f"p{lvl}": rng.standard_normal((batch, channels, h >> (lvl - 2), w >> (lvl - 2))).astype(F32)
            for lvl in LEVELS}


def _boxes(rng: np.random.Generator, batch: int, rois: int, h: int = 256, w: int = 384) -> np.ndarray:
    """Boxes of every level (sizes 2..700 px), some crossing the image border, some degenerate."""
    size = np.exp(rng.uniform(np.log(2), np.log(700), (batch, rois)))
    aspect = np.exp(rng.uniform(-1, 1, (batch, rois)))
    x1, y1 = rng.uniform(-30, w, (batch, rois)), rng.uniform(-30, h, (batch, rois))
    boxes = np.stack([x1, y1, x1 + size * aspect, y1 + size / aspect], -1).astype(F32)
    boxes[:, ::7, 2:] = boxes[:, ::7, :2]  # zero-size boxes (padding proposals look like this)
    return boxes


# ----------------------------------------------------------------------------- tests
def test_schema_registered_with_plugin_attributes_and_shape_inference() -> None:
    reg.register_schemas()
    reg.register_schemas()  # idempotent
    schema = onnx.defs.get_schema("ROIAlignV2", 1, "frcnn")
    assert {"plugin_namespace", "plugin_version", "output_size", "max_level"} <= set(schema.attributes)
    assert not schema.attributes["plugin_namespace"].required
    model = _model(elem=TensorProto.FLOAT16, channels=5, output_size=4)
    (out,) = model.graph.output
    assert out.type.tensor_type.elem_type == TensorProto.FLOAT16
    dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert dims == ["B", "R", 5, 4, 4]
    node = model.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert (node.domain, attrs["plugin_namespace"], attrs["plugin_version"]) == ("frcnn", b"frcnn", b"1")


def test_ort_roialign_half_pixel_is_detectron2_roialignv2_bit_exact() -> None:
    """The standard RoiAlign (opset 16, half_pixel, adaptive) has detectron2's arithmetic exactly."""
    rng = np.random.default_rng(0)
    feat = rng.standard_normal((2, 3, 13, 17)).astype(F32)
    rois = _boxes(rng, 1, 120, h=60, w=80)[0]
    rois = np.concatenate([rois, [[10, 10, 5, 5], [-50, -50, -30, -30], [60, 40, 200, 200]]]).astype(F32)
    batch = rng.integers(0, 2, len(rois)).astype(np.int64)
    node = helper.make_node("RoiAlign", ["X", "rois", "b"], ["Y"], output_height=7, output_width=7,
                            sampling_ratio=0, spatial_scale=0.25, coordinate_transformation_mode="half_pixel")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, t, None) for n, t in
                                            [("X", 1), ("rois", 1), ("b", TensorProto.INT64)]],
                              [helper.make_tensor_value_info("Y", 1, None)])
    got = _session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])).run(
        None, {"X": feat, "rois": rois, "b": batch})[0]
    want = np.stack([roi_align_v2_ref(feat[b], r, 0.25) for r, b in zip(rois, batch)])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("opset", [17, 18, 21])
def test_function_body_matches_detectron2_reference_exactly(opset: int) -> None:
    rng = np.random.default_rng(opset)
    feats, rois = _features(rng, 2), _boxes(rng, 2, 30)
    got = _session(_model(opset)).run(None, {"rois": rois, **feats})[0]
    assert got.shape == (2, 30, 3, 7, 7)
    levels = [level_ref(box) for box in rois.reshape(-1, 4)]
    assert set(levels) == set(LEVELS), "the test boxes must cover every level"
    want = np.stack([roi_align_v2_ref(feats[f"p{lvl}"][i // 30], box, 2.0 ** -lvl)
                     for i, (box, lvl) in enumerate(zip(rois.reshape(-1, 4), levels))])
    np.testing.assert_array_equal(got.reshape(want.shape), want)


def test_level_assignment_at_boundaries_matches_torch() -> None:
    """Box sizes a few float32 ulps around 112, 224 and 448 px land on torch's level."""
    torch = pytest.importorskip("torch")
    from frcnn.plugins.roi_align_v2.torch_op import assign_box_levels

    sides = []
    for edge in (112.0, 224.0, 448.0):
        low = high = F32(edge)
        for _ in range(40):
            low, high = np.nextafter(low, F32(0)), np.nextafter(high, F32(1e4))
            sides += [low, high]
    sides = np.array(sides + [F32(112), F32(224), F32(448)], F32)
    rois = np.stack([np.full_like(sides, 4), np.full_like(sides, 4), 4 + sides, 4 + sides], -1)[None]
    feats = {f"p{lvl}": np.full((1, 1, 160 >> (lvl - 2), 160 >> (lvl - 2)), 10.0 * lvl, F32) for lvl in LEVELS}
    got = _session(_model(channels=1)).run(None, {"rois": rois, **feats})[0][0, :, 0, 3, 3]
    want = assign_box_levels(torch.from_numpy(rois[0]), 2, 5).numpy() + 2
    np.testing.assert_array_equal(np.round(got / 10), want)
    assert len(set(want.tolist())) == 4


def test_empty_rois_nan_box_and_fp16() -> None:
    rng = np.random.default_rng(1)
    feats = _features(rng, 2)
    session = _session(_model())
    assert session.run(None, {"rois": np.zeros((2, 0, 4), F32), **feats})[0].shape == (2, 0, 3, 7, 7)
    rois = np.array([[[np.nan, 0, 10, 10], [5, 5, 40, 30]]], F32)
    one = {k: v[:1] for k, v in feats.items()}
    got = session.run(None, {"rois": rois, **one})[0]
    np.testing.assert_array_equal(got[0, 1], roi_align_v2_ref(one["p2"][0], rois[0, 1], 0.25))
    assert (got[0, 0] == 0).all()  # a NaN box pools to zeros, as in the torch op
    half = _session(_model(elem=TensorProto.FLOAT16)).run(
        None, {"rois": rois[:, 1:], **{k: v.astype(np.float16) for k, v in one.items()}})[0]
    assert half.dtype == np.float16
    np.testing.assert_allclose(half[0, 0], got[0, 1], atol=2e-2)


def test_each_level_pools_only_its_own_rois() -> None:
    """Cost trap (docs/onnx-ops.md): one RoiAlign per level fed by a Gather over that level's NonZero rows."""
    function = next(f for f in _model().functions if f.name == "ROIAlignV2")
    producer = {out: node for node in function.node for out in node.output}
    roi_aligns = [n for n in function.node if n.op_type == "RoiAlign"]
    assert len(roi_aligns) == len(LEVELS)
    for node in roi_aligns:
        gather = producer[producer[node.input[1]].input[0]]  # Mul(Gather(flat, rows), scale)
        assert gather.op_type == "Gather"
        rows = producer[gather.input[1]]
        assert rows.op_type == "Reshape" and producer[rows.input[0]].op_type == "NonZero"


def test_attach_strip_and_refusals() -> None:
    model = _model()
    assert [f.name for f in model.functions] == ["ROIAlignV2"]
    reg.attach_functions(model)  # re-attaching replaces, never duplicates
    assert len(model.functions) == 1
    reg.strip_functions(model)
    assert len(model.functions) == 0 and len(reg.custom_nodes(model)) == 1
    with pytest.raises(ValueError, match="aligned=1"):
        _model(aligned=0)
    with pytest.raises(ValueError, match="4 feature inputs"):
        _model(max_level=6)
    with pytest.raises(ValueError, match="opset 15"):
        _model(opset=15)


# ----------------------------------------------------------------------------- exporters
torch = pytest.importorskip("torch")


class _Pooler(torch.nn.Module):
    """rois [B, R, 4], p2..p5 -> 2 * roi_align_v2(...) [B, R, C, 7, 7] (the op inside a graph)."""

    def forward(self, rois, p2, p3, p4, p5):
        from frcnn.plugins.roi_align_v2.torch_op import roi_align_v2

        return 2.0 * roi_align_v2(rois, [p2, p3, p4, p5])


def _export(dynamo: bool, path) -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    args = (torch.from_numpy(_boxes(rng, 2, 5)),
            *(torch.from_numpy(v) for v in _features(rng, 2).values()))
    names = ["rois", "p2", "p3", "p4", "p5"]
    if dynamo:
        dim = torch.export.Dim
        batch = dim("B", min=1, max=8)
        shapes = {"rois": {0: batch, 1: dim("R", min=0, max=4096)},
                  **{f"p{lvl}": {0: batch, 2: dim(f"H{lvl}"), 3: dim(f"W{lvl}")} for lvl in LEVELS}}
        program = torch.onnx.export(_Pooler(), args, dynamo=True, dynamic_shapes=shapes, input_names=names,
                                    output_names=["pooled"], opset_version=18,
                                    custom_translation_table=reg.custom_translation_table())
        model = program.model_proto
    else:
        reg.register_torchscript_symbolics(17)
        axes = {"rois": {0: "B", 1: "R"}, "pooled": {0: "B", 1: "R"},
                **{f"p{lvl}": {0: "B", 2: f"H{lvl}", 3: f"W{lvl}"} for lvl in LEVELS}}
        torch.onnx.export(_Pooler(), args, str(path), dynamo=False, input_names=names, opset_version=17,
                          output_names=["pooled"], dynamic_axes=axes)
        model = onnx.load(str(path))
    reg.attach_functions(model)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_exported_module_runs_in_ort_like_the_torch_op(dynamo: bool, tmp_path) -> None:
    from frcnn.plugins.roi_align_v2.torch_op import roi_align_v2

    model = _export(dynamo, tmp_path / "pooler.onnx")
    (node,) = reg.custom_nodes(model)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert (node.op_type, attrs["plugin_namespace"], attrs["max_level"]) == ("ROIAlignV2", b"frcnn", 5)
    session = _session(model)
    rng = np.random.default_rng(3)
    for batch, rois in [(2, 40), (1, 3), (2, 0)]:  # other sizes than the export sample
        feats, boxes = _features(rng, batch, h=48, w=80), _boxes(rng, batch, rois)
        got = session.run(None, {"rois": boxes, **feats})[0]
        want = 2.0 * roi_align_v2(torch.from_numpy(boxes), [torch.from_numpy(v) for v in feats.values()])
        assert got.shape == tuple(want.shape)
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-5)
