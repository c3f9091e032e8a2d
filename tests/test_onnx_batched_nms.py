"""ONNX face of frcnn::BatchedNMS: schema, shape inference, function body in ONNX Runtime, exporters.

References: a NumPy greedy NMS written here (torchvision ``batched_nms`` semantics: stable sort by score,
float32 IoU ``inter / (area_i + area_j - inter)`` compared with the double threshold) and the torch op.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from frcnn.plugins import onnx_registry as reg
from frcnn.plugins.batched_nms import float32_at_most, onnx_op
from onnx import TensorProto, helper

F32 = np.float32


def batched_nms_ref(boxes: np.ndarray, scores: np.ndarray, groups: np.ndarray, iou_threshold: float,
                    score_threshold: float, max_output: int) -> tuple[np.ndarray, np.ndarray]:
    """(num [B] int32, indices [B, K] int32 -1 padded) of greedy NMS per image and group."""
    num = np.zeros(len(scores), np.int32)
    out = np.full((len(scores), max_output), -1, np.int32)
    for b, (box, score, group) in enumerate(zip(boxes, scores, groups)):
        valid = np.flatnonzero(score > F32(score_threshold))
        kept: list[int] = []
        for i in valid[np.argsort(-score[valid], kind="stable")]:
            if len(kept) == max_output:
                break
            suppressed = False
            for j in (j for j in kept if group[j] == group[i]):
                w = max(F32(0), min(box[i, 2], box[j, 2]) - max(box[i, 0], box[j, 0]))
                h = max(F32(0), min(box[i, 3], box[j, 3]) - max(box[i, 1], box[j, 1]))
                inter = F32(w * h)
                area_i = F32((box[i, 2] - box[i, 0]) * (box[i, 3] - box[i, 1]))
                area_j = F32((box[j, 2] - box[j, 0]) * (box[j, 3] - box[j, 1]))
                with np.errstate(invalid="ignore", divide="ignore"):
                    iou = F32(inter / F32(F32(area_j + area_i) - inter))
                if float(iou) > iou_threshold:  # double comparison, as torchvision's kernel
                    suppressed = True
                    break
            if not suppressed:
                kept.append(int(i))
        num[b] = len(kept)
        out[b, :len(kept)] = kept
    return num, out


def _model(iou: float, score: float, top_k: int, opset: int = 18, elem: int = TensorProto.FLOAT,
           max_candidates: int | None = 4096) -> onnx.ModelProto:
    """One-node model; ``max_candidates=None`` leaves the attribute off the node (files from before it)."""
    reg.register_schemas()
    node = onnx_op.make_node("boxes", "scores", "groups", ("num", "indices"), iou, score, top_k, name="nms",
                             max_candidates=max_candidates or 4096)
    if max_candidates is None:
        kept = [a for a in node.attribute if a.name != "max_candidates"]
        del node.attribute[:]
        node.attribute.extend(kept)
    inputs = [helper.make_tensor_value_info("boxes", elem, ["B", "N", 4]),
              helper.make_tensor_value_info("scores", elem, ["B", "N"]),
              helper.make_tensor_value_info("groups", TensorProto.INT32, ["B", "N"])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.INT32, None) for n in ("num", "indices")]
    model = helper.make_model(helper.make_graph([node], "nms", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", opset)])
    reg.attach_functions(model)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _inputs(rng: np.random.Generator, batch: int, n: int, groups: int, ties: bool) -> dict[str, np.ndarray]:
    """Clustered boxes (so NMS suppresses), some zero-area, optional heavy score ties, a NaN score."""
    corner = rng.uniform(0, 60, (batch, n, 2))
    size = rng.uniform(1, 40, (batch, n, 2)) * (rng.random((batch, n, 1)) > 0.05)
    scores = rng.random((batch, n))
    if ties:
        scores = np.round(scores * 4) / 4
    scores = scores.astype(F32)
    if n > 3:
        scores[0, 3] = np.nan
    return {"boxes": np.concatenate([corner, corner + size], -1).astype(F32), "scores": scores,
            "groups": rng.integers(0, groups, (batch, n)).astype(np.int32)}


def test_schema_and_shape_inference() -> None:
    reg.register_schemas()
    schema = onnx.defs.get_schema("BatchedNMS", 1, "frcnn")
    assert {"plugin_namespace", "plugin_version", "max_output"} <= set(schema.attributes)
    cap = schema.attributes["max_candidates"]
    assert not cap.required and helper.get_attribute_value(cap.default_value) == 4096
    num, indices = _model(0.5, 0.05, 100).graph.output
    assert [d.dim_param or d.dim_value for d in num.type.tensor_type.shape.dim] == ["B"]
    assert [d.dim_param or d.dim_value for d in indices.type.tensor_type.shape.dim] == ["B", 100]
    assert indices.type.tensor_type.elem_type == TensorProto.INT32


@pytest.mark.parametrize("opset", [17, 18, 21])
def test_function_body_equals_reference_exactly(opset: int) -> None:
    rng = np.random.default_rng(opset)
    cases = [(0.7, -np.inf, 50), (0.5, 0.05, 20), (0.3, 0.5, 7), (0.5, 0.0, 0), (1.0, -np.inf, 400)]
    sessions = {case: _session(_model(*case, opset=opset)) for case in cases}
    for trial in range(24):
        case = cases[trial % len(cases)]
        feed = _inputs(rng, int(rng.integers(1, 4)), int(rng.integers(0, 160)), int(rng.integers(1, 6)),
                       ties=trial % 2 == 0)
        num, indices = sessions[case].run(None, feed)
        want_num, want_indices = batched_nms_ref(feed["boxes"], feed["scores"], feed["groups"], *case)
        np.testing.assert_array_equal(num, want_num, err_msg=f"{case} trial {trial}")
        np.testing.assert_array_equal(indices, want_indices, err_msg=f"{case} trial {trial}")


def test_equal_scores_keep_the_lower_index_and_groups_do_not_interact() -> None:
    boxes = np.array([[[0, 0, 10, 10]] * 6], F32)
    scores = np.array([[0.5, 0.9, 0.5, 0.9, 0.5, 0.5]], F32)
    groups = np.array([[0, 0, 0, 0, 1, 1]], np.int32)
    num, indices = _session(_model(0.5, -np.inf, 5)).run(
        None, {"boxes": boxes, "scores": scores, "groups": groups})
    assert num.tolist() == [2] and indices.tolist() == [[1, 4, -1, -1, -1]]


def test_iou_threshold_compared_like_torchvision_double() -> None:
    """IoU exactly float32(0.3) > 0.3 (double): suppressed, although float32(0.3) > float32(0.3) is false."""
    assert float32_at_most(0.3) < F32(0.3) and float32_at_most(0.5) == 0.5
    # box b: 10 x h2 inside box a (10 x 10): IoU = h2 / 10; pick h2 so that the float32 IoU is float32(0.3)
    boxes = np.array([[[0, 0, 10, 10], [0, 0, 10, 3]]], F32)
    iou = F32(30) / F32(F32(100 + 30) - F32(30))
    assert iou == F32(0.3)
    feed = {"boxes": boxes, "scores": np.array([[0.9, 0.8]], F32), "groups": np.zeros((1, 2), np.int32)}
    num, _ = _session(_model(0.3, -np.inf, 5)).run(None, feed)
    assert num.tolist() == [1] == batched_nms_ref(*feed.values(), 0.3, -np.inf, 5)[0].tolist()


def test_max_candidates_attribute_is_carried_and_ignored_by_the_body() -> None:
    """200 candidates above the threshold: ORT stays exact (the body ignores the cap) with the attribute
    below N (64), above it (8192) or absent (function default); the kernel's cap rounds up."""
    from frcnn.plugins.batched_nms import kernel_candidate_cap

    feed = _inputs(np.random.default_rng(11), 2, 200, 3, ties=True)
    want = batched_nms_ref(feed["boxes"], feed["scores"], feed["groups"], 0.5, -np.inf, 150)
    for cap in (64, 8192, None):
        model = _model(0.5, -np.inf, 150, max_candidates=cap)
        attrs = {a.name: helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
        assert attrs.get("max_candidates") == cap
        num, indices = _session(model).run(None, feed)
        np.testing.assert_array_equal(num, want[0])
        np.testing.assert_array_equal(indices, want[1])
    assert want[0].min() > 64  # more kept than the cap: a capped evaluation could not produce this
    assert [kernel_candidate_cap(n) for n in (1, 64, 65, 4096, 4819, 8192)] == [64, 64, 128, 4096, 8192, 8192]
    with pytest.raises(ValueError, match="max_candidates"):
        onnx_op.make_node("b", "s", "g", ("n", "i"), 0.5, 0.0, 10, max_candidates=0)
    with pytest.raises(ValueError, match="max_candidates"):
        kernel_candidate_cap(0)


def test_fp16_inputs_and_empty_candidates() -> None:
    rng = np.random.default_rng(5)
    feed = _inputs(rng, 2, 40, 3, ties=False)
    session = _session(_model(0.5, 0.2, 10, elem=TensorProto.FLOAT16))
    half = {k: v.astype(np.float16) if v.dtype == F32 else v for k, v in feed.items()}
    num, indices = session.run(None, half)
    want = batched_nms_ref(*(half[k].astype(F32) if half[k].dtype == np.float16 else half[k]
                             for k in ("boxes", "scores", "groups")), 0.5, 0.2, 10)
    np.testing.assert_array_equal(num, want[0])
    np.testing.assert_array_equal(indices, want[1])
    empty = {"boxes": np.zeros((2, 0, 4), np.float16), "scores": np.zeros((2, 0), np.float16),
             "groups": np.zeros((2, 0), np.int32)}
    num, indices = session.run(None, empty)
    assert num.tolist() == [0, 0] and indices.tolist() == [[-1] * 10] * 2


def test_refusals() -> None:
    with pytest.raises(ValueError, match="outside"):
        _model(1.5, 0.0, 10)
    model = _model(0.5, 0.0, 10)
    del model.graph.node[0].attribute[:]
    with pytest.raises(ValueError, match="lacks"):
        reg.attach_functions(model)


def test_onnx_faces_import_without_torch() -> None:
    import subprocess
    import sys

    code = ("import sys; from frcnn.plugins import onnx_registry as r; r.register_schemas(); "
            "assert 'torch' not in sys.modules and 'onnxscript' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- exporters
torch = pytest.importorskip("torch")


class _TwoNms(torch.nn.Module):
    """Two NMS nodes with different attributes (RPN-like and head-like) sharing one function."""

    def forward(self, boxes, scores, groups):
        from frcnn.plugins.batched_nms.torch_op import batched_nms

        rpn = batched_nms(boxes, scores, groups, 0.7, float("-inf"), 30, max_candidates=8192)
        head = batched_nms(boxes, scores, groups, 0.3, 0.25, 8)
        return rpn[0], rpn[1], head[0], head[1]


def _export(dynamo: bool, path) -> onnx.ModelProto:
    feed = _inputs(np.random.default_rng(6), 2, 50, 3, ties=False)
    args = tuple(torch.from_numpy(feed[k]) for k in ("boxes", "scores", "groups"))
    names, outputs = ["boxes", "scores", "groups"], ["rpn_num", "rpn_indices", "num", "indices"]
    if dynamo:
        batch, n = torch.export.Dim("B", min=1, max=8), torch.export.Dim("N", min=0, max=100000)
        program = torch.onnx.export(_TwoNms(), args, dynamo=True, input_names=names, output_names=outputs,
                                    dynamic_shapes={k: {0: batch, 1: n} for k in names}, opset_version=18,
                                    custom_translation_table=reg.custom_translation_table())
        model = program.model_proto
    else:
        reg.register_torchscript_symbolics(17)
        torch.onnx.export(_TwoNms(), args, str(path), dynamo=False, input_names=names, output_names=outputs,
                          opset_version=17, dynamic_axes={k: {0: "B", 1: "N"} for k in names})
        model = onnx.load(str(path))
    reg.attach_functions(model)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_exported_module_runs_in_ort_like_the_torch_op(dynamo: bool, tmp_path) -> None:
    model = _export(dynamo, tmp_path / "nms.onnx")
    nodes = reg.custom_nodes(model)
    assert [n.op_type for n in nodes] == ["BatchedNMS"] * 2 and len(model.functions) == 1
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    assert [(a["max_output"], a["max_candidates"]) for a in attrs] == [(30, 8192), (8, 4096)]
    session = _session(model)
    module = _TwoNms()
    rng = np.random.default_rng(7)
    for batch, n, ties in [(2, 300, True), (1, 7, False), (2, 0, False), (3, 120, False)]:
        feed = _inputs(rng, batch, n, 4, ties)
        got = session.run(None, feed)
        want = module(*(torch.from_numpy(feed[k]) for k in ("boxes", "scores", "groups")))
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w.numpy())

