"""`export-engine` / `frcnn export` and the exported graph (issue 4, items 1-3 and the bad-input acceptance).

The export itself runs once per session (tests/export_utils.py: the real CLI on a trainer-style checkpoint
of the small R18 model, with --engine, which exits 3 here because TensorRT is absent).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from export_utils import exported, parity_model
from frcnn.export import onnx_export
from frcnn.export.cli import main
from frcnn.plugins import DOMAIN

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return onnx.load(str(exported().path))


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def test_cli_writes_onnx_then_skips_engine_with_exit_3() -> None:
    result = exported()
    assert result.exit_code == 3, result.stderr
    assert result.path.is_file() and not result.path.with_suffix(".engine").exists()
    assert "TensorRT >= 10.9" in result.stderr and "engine step skipped" in result.stderr
    for row in ("inputs", "outputs", "custom nodes", "opset", "file size", "export time"):
        assert re.search(rf"^  {row}\s", result.stdout, re.MULTILINE), result.stdout
    assert "frcnn::ROIAlignV2" in result.stdout and f"stored in {result.checkpoint}" in result.stdout
    assert sorted(p.name for p in result.path.parent.iterdir()) == ["model.onnx", "model_final.pth"]
    print(f"small R18 export through the CLI: {result.seconds:.1f} s")


def test_graph_interface(model: onnx.ModelProto) -> None:
    def sig(values):
        return [(v.name, v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
                for v in values]

    i32, u8, f32 = onnx.TensorProto.INT32, onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT
    assert sig(model.graph.input) == [("images", u8, ["batch", 3, "height", "width"]),
                                      ("image_sizes", i32, ["batch", 2])]
    assert sig(model.graph.output) == [("num_detections", i32, ["batch"]), ("boxes", f32, ["batch", 100, 4]),
                                       ("scores", f32, ["batch", 100]), ("classes", i32, ["batch", 100])]


def test_custom_nodes_functions_and_no_torchvision(model: onnx.ModelProto) -> None:
    custom = [(n.name, n.op_type) for n in model.graph.node if n.domain == DOMAIN]
    assert custom == [("rpn/select/BatchedNMS", "BatchedNMS"), ("roi_heads/box_pooler/ROIAlignV2", "ROIAlignV2"),
                      ("roi_heads/postprocess/BatchedNMS", "BatchedNMS")]
    nodes = {n.name: n for n in model.graph.node}
    rpn, head = _attrs(nodes["rpn/select/BatchedNMS"]), _attrs(nodes["roi_heads/postprocess/BatchedNMS"])
    assert (rpn["max_output"], rpn["score_threshold"]) == (1000, -math.inf) and rpn["iou_threshold"] == pytest.approx(0.7)
    assert head["max_output"] == 100 and head["iou_threshold"] == pytest.approx(0.5)
    assert head["score_threshold"] == pytest.approx(0.05)
    assert (rpn["max_candidates"], head["max_candidates"]) == (8192, 4096)  # GPU cap >= 5 levels x 1000
    roi = _attrs(nodes["roi_heads/box_pooler/ROIAlignV2"])
    assert {k: roi[k] for k in ("output_size", "sampling_ratio", "aligned", "min_level", "max_level")} == {
        "output_size": 7, "sampling_ratio": 0, "aligned": 1, "min_level": 2, "max_level": 5}
    for name, _ in custom:
        assert _attrs(nodes[name])["plugin_namespace"] == b"frcnn" and _attrs(nodes[name])["plugin_version"] == b"1"
    assert sorted((f.domain, f.name) for f in model.functions) == [(DOMAIN, "BatchedNMS"), (DOMAIN, "ROIAlignV2")]
    assert {n.domain for n in model.graph.node} == {"", DOMAIN}
    assert not [n for n in model.graph.node if "torchvision" in n.domain or n.op_type in ("RoiAlign", "NonMaxSuppression")]
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 18), (DOMAIN, 1)}


def test_polygraphy_inspect_lists_custom_nodes() -> None:
    command = [sys.executable, "-c", "import sys; from polygraphy.tools import main; sys.exit(main())",
               "inspect", "model", str(exported().path), "--show", "layers", "attrs"]  # = `polygraphy inspect model`
    out = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    assert "Other Opsets: {'frcnn': 1}" in out
    assert out.count("[Op: BatchedNMS]") == 2 and out.count("[Op: ROIAlignV2]") == 1
    assert "ROIAlignV2.plugin_namespace = frcnn" in out and "torchvision" not in out.lower()
    assert "shape=('batch', 3, 'height', 'width')" in out


def test_checker_passes_and_metadata(model: onnx.ModelProto) -> None:
    cfg, _ = parity_model()
    onnx_export.check(model)
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["class_names"]) == ["class_0", "class_1", "class_2"]
    assert json.loads(meta["pixel_mean"]) == pytest.approx(list(cfg.MODEL.PIXEL_MEAN))
    assert json.loads(meta["pixel_std"]) == pytest.approx(list(cfg.MODEL.PIXEL_STD))
    assert json.loads(meta["resize"])["min_size"] == 320 and json.loads(meta["resize"])["max_size"] == 512
    assert meta["size_divisibility"] == "32" and meta["opset"] == "18"
    assert meta["torch_version"] == torch.__version__ and meta["onnx_version"] == onnx.__version__
    assert json.loads(meta["input_format"])["channel_order"] == "BGR"
    assert {"exporter", "frcnn_deploy_version", "onnxscript_version"} <= set(meta)


def test_names_are_stable_and_meaningful(model: onnx.ModelProto) -> None:
    names = [n.name for n in model.graph.node]
    assert len(set(names)) == len(names)
    auto = re.compile(r"^(node_|val_|_val|onnx::|/?[A-Za-z]+_\d+$)")
    assert not [n for n in names if auto.search(n)]
    produced = {o for n in model.graph.node for o in n.output}
    assert {"proposals", "num_proposals", "p2", "p3", "p4", "p5"} <= produced
    inits = {t.name for t in model.graph.initializer}
    _, torch_model = parity_model()
    assert "backbone.bottom_up.stem.conv1.weight" in inits and "roi_heads.box_predictor.cls_score.bias" in inits
    assert not [t for t in inits if auto.search(t)]
    weights = {k for k, v in torch_model.state_dict().items() if "norm" not in k and bool(v.abs().sum() > 0)}
    assert weights <= inits  # zero biases may be dropped by the exporter's optimizer; FrozenBN is folded
    prefixes = {n.split("/")[0] for n in names}
    assert prefixes <= {"preprocess", "backbone", "rpn", "roi_heads", "shapes"}, prefixes
    assert any(n.startswith("rpn/decode/") for n in names) and any(n.startswith("rpn/anchors/") for n in names)


# --- bad input: clear errors, exit code 2, nothing written --------------------------------------------------
def _cli(tmp_path: Path, *args: str, capsys) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err
    return code, err


def test_missing_checkpoint(tmp_path: Path, capsys) -> None:
    code, err = _cli(tmp_path, str(tmp_path / "nope.pth"), "--output", str(tmp_path / "m.onnx"), capsys=capsys)
    assert code == 2 and "nope.pth" in err and "Cannot read checkpoint" in err
    assert list(tmp_path.iterdir()) == []


def test_corrupt_checkpoint(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    code, err = _cli(tmp_path, str(bad), "--output", str(tmp_path / "m.onnx"), capsys=capsys)
    assert code == 2 and "corrupted" in err and "bad.pth" in err
    assert [p.name for p in tmp_path.iterdir()] == ["bad.pth"]


def test_config_checkpoint_mismatch(tmp_path: Path, capsys) -> None:
    from frcnn.trainer.checkpoint import save_checkpoint

    _, small = parity_model()
    ckpt = tmp_path / "small.pth"
    save_checkpoint(ckpt, small)  # no config inside: --config decides
    code, err = _cli(tmp_path, str(ckpt), "--config", "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml",
                     "--output", str(tmp_path / "m.onnx"), capsys=capsys)
    assert code == 2 and "does not match the model" in err and "ResNet-18" in err
    assert [p.name for p in tmp_path.iterdir()] == ["small.pth"]


def test_unsupported_opset(tmp_path: Path, capsys) -> None:
    code, err = _cli(tmp_path, str(tmp_path / "x.pth"), "--opset", "11", capsys=capsys)
    assert code == 2 and "--opset 11 is not supported" in err and "18" in err


@pytest.mark.parametrize("where", ["missing_folder", "is_directory"])
def test_unwritable_output(tmp_path: Path, capsys, where: str) -> None:
    target = tmp_path / "no" / "such" / "m.onnx" if where == "missing_folder" else tmp_path
    code, err = _cli(tmp_path, str(tmp_path / "x.pth"), "--output", str(target), capsys=capsys)
    assert code == 2 and ("does not exist" in err if where == "missing_folder" else "is a directory" in err)
    assert list(tmp_path.iterdir()) == []


def test_frcnn_export_subcommand_dispatches(tmp_path: Path, capsys) -> None:
    from frcnn.runtime.cli import main as frcnn_main

    code = frcnn_main(["export", str(tmp_path / "nope.pth"), "--output", str(tmp_path / "m.onnx")])
    assert code == 2 and "nope.pth" in capsys.readouterr().err


def test_write_atomic_leaves_nothing_on_failure(tmp_path: Path, monkeypatch) -> None:
    import os

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(Exception, match="No space left"):
        onnx_export.write_atomic(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra", [
    [],
    ["--int8", "--calib-images", "calib dir", "--calib-count", "5", "--calib-method", "entropy",
     "--int8-exclude", "backbone/bottom_up/stem/*"],
    ["--fp16", "--max-batch", "2", "--min-size", "64", "96", "--opt-size", "320", "320", "--config", "my.yaml",
     "--opset", "17", "--class-names", "a,b,c"],
])
def test_engine_hint_redoes_the_same_export(extra: list[str], capsys: pytest.CaptureFixture) -> None:
    """The no-TensorRT hint (and the ``next:`` line) is a command that re-exports with the same options; with
    --int8 it keeps the int8 options and names the fp32 --output, never the int8 file as the fp32 output."""
    import argparse
    import shlex

    from frcnn.export.cli import _build_engine, configure_parser, engine_command

    parser = configure_parser(argparse.ArgumentParser(prog="export-engine"))
    args = parser.parse_args(["run/model.pth", "--output", "out/model.onnx", "--engine", "out/m.engine", *extra])
    command = shlex.split(engine_command(args, args.engine))
    assert command[0] == "export-engine"
    again = parser.parse_args(command[1:])
    assert vars(again) == vars(args)
    assert again.output == "out/model.onnx"
    if importlib.util.find_spec("tensorrt") is None:  # the hint the CLI prints when TensorRT is missing
        onnx_path = Path("out/model.int8.onnx" if "--int8" in extra else "out/model.onnx")
        assert _build_engine(args, onnx_path, ([64, 64], [320, 320], [640, 640])) == 3
        assert capsys.readouterr().err.strip().splitlines()[-1].strip() == shlex.join(command)
