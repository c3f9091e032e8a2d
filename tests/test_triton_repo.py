"""`frcnn triton-repo` (issue 13): the repository a stock tritonserver loads.

Every config.pbtxt is parsed into Triton's own ModelConfig protobuf (shipped in tritonclient), so a typo or an
unknown field fails; the layout is Triton's (``<model>/config.pbtxt``, ``<model>/1/model.onnx|model.plan``, an
empty ``1/`` for the ensemble); the ensemble's wiring is checked against the models' declared tensors; OUT is
never overwritten and a failure leaves nothing. The generator only reads the model's metadata, so a small ONNX
file carrying an exported model's metadata_props stands in for the detector (the engine case: a sidecar as
`frcnn export --engine` writes it; no TensorRT is run or imitated, the plan file is copied byte for byte).
Loading the repository in a stock tritonserver (onnxruntime / tensorrt backends) is not possible here.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from frcnn.runtime.backends.base import OUTPUTS
from frcnn.runtime.backends.triton import METADATA_PARAMETER
from frcnn.runtime.cli import main
from onnx import TensorProto, helper

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient (dev extra)")
text_format = pytest.importorskip("google.protobuf.text_format")
http = pytest.importorskip("tritonclient.http", reason="tritonclient (dev extra)")

METADATA = {"class_names": json.dumps(["person", "cat \"quoted\"", "ünïcode"]),
            "resize": json.dumps({"rule": "ResizeShortestEdge", "min_size": 320, "max_size": 512}),
            "input_format": json.dumps({"channel_order": "BGR"}), "size_divisibility": "32", "max_batch": "4"}


def _onnx(path: Path) -> Path:
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["out"])], "g",
                              [helper.make_tensor_value_info("images", TensorProto.UINT8, ["B", 3, "H", "W"])],
                              [helper.make_tensor_value_info("out", TensorProto.UINT8, ["B", 3, "H", "W"])])
    model = helper.make_model(graph)
    onnx.helper.set_model_props(model, METADATA)
    onnx.save(model, str(path))
    return path


def _parse(path: Path):
    return text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())


def _configs(repo: Path) -> dict:
    return {p.parent.name: _parse(p) for p in sorted(repo.glob("*/config.pbtxt"))}


def test_onnx_repository_layout_and_configs(tmp_path: Path, capsys) -> None:
    model = _onnx(tmp_path / "det.onnx")
    repo = tmp_path / "repo"
    assert main(["triton-repo", str(model), str(repo), "--max-batch", "3", "--instances", "2",
                 "--max-queue-delay-us", "500"]) == 0  # fmt: skip
    files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*"))
    assert files == ["README.md", "frcnn", "frcnn/1", "frcnn/1/model.onnx", "frcnn/config.pbtxt", "frcnn_image",
                     "frcnn_image/1", "frcnn_image/config.pbtxt", "frcnn_postprocess", "frcnn_postprocess/1",
                     "frcnn_postprocess/1/model.py", "frcnn_postprocess/config.pbtxt", "frcnn_preprocess",
                     "frcnn_preprocess/1", "frcnn_preprocess/1/model.py", "frcnn_preprocess/config.pbtxt"]
    assert (repo / "frcnn/1/model.onnx").read_bytes() == model.read_bytes()
    cfg = _configs(repo)
    det = cfg["frcnn"]
    assert (det.name, det.backend, det.max_batch_size) == ("frcnn", "onnxruntime", 3)
    assert det.dynamic_batching.max_queue_delay_microseconds == 500
    assert [g.count for g in det.instance_group] == [2]
    assert json.loads(det.parameters[METADATA_PARAMETER].string_value) == METADATA
    assert [o.name for o in det.output] == list(OUTPUTS)
    assert [(i.name, i.data_type, list(i.dims)) for i in det.input] == [
        ("images", model_config_pb2.TYPE_UINT8, [3, -1, -1]), ("image_sizes", model_config_pb2.TYPE_INT32, [2])]
    assert list(det.output[0].reshape.shape) == [] and det.output[0].HasField("reshape")
    for name in ("frcnn_preprocess", "frcnn_postprocess"):
        assert cfg[name].backend == "python" and cfg[name].instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert {cfg[n].parameters["stage"].string_value for n in ("frcnn_preprocess", "frcnn_postprocess")} == {
        "preprocess", "postprocess"}
    _check_ensemble_wiring(cfg)
    assert "frcnn_image" in capsys.readouterr().out or (repo / "README.md").is_file()


def _check_ensemble_wiring(cfg: dict) -> None:
    """Every ensemble step names a generated model and only its declared tensors; dtypes agree end to end."""
    ens = cfg["frcnn_image"]
    assert ens.platform == "ensemble"
    produced = {t.name: t.data_type for t in ens.input}
    for step in ens.ensemble_scheduling.step:
        model = cfg[step.model_name]
        inputs = {t.name: t.data_type for t in model.input}
        assert set(step.input_map) == set(inputs), step.model_name
        for key, value in step.input_map.items():
            assert produced[value] == inputs[key], (step.model_name, key)
        outputs = {t.name: t.data_type for t in model.output}
        assert set(step.output_map) <= set(outputs), step.model_name
        produced.update({value: outputs[key] for key, value in step.output_map.items()})
    assert {t.name: t.data_type for t in ens.output}.items() <= produced.items()
    assert [t.name for t in ens.output] == ["num_detections", "boxes", "scores", "classes", "class_names"]


def test_engine_repository_uses_tensorrt_backend_and_names_the_version(tmp_path: Path) -> None:
    engine = tmp_path / "det.engine"
    engine.write_bytes(bytes(range(256)) * 4)  # copied verbatim, never run here
    sidecar = {"format": "frcnn-engine/1", "tensorrt_version": "11.4.0", "metadata": METADATA,
               "profile": {"images": {"min": [1, 3, 64, 64], "opt": [2, 3, 320, 320], "max": [6, 3, 512, 512]}}}
    (tmp_path / "det.engine.json").write_text(json.dumps(sidecar))
    repo = tmp_path / "repo"
    assert main(["triton-repo", str(engine), str(repo)]) == 0
    assert (repo / "frcnn/1/model.plan").read_bytes() == engine.read_bytes()
    cfg = _configs(repo)
    assert (cfg["frcnn"].backend, cfg["frcnn"].max_batch_size) == ("tensorrt", 6)
    assert cfg["frcnn"].instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert "TensorRT 11.4.0" in (repo / "README.md").read_text()
    _check_ensemble_wiring(cfg)


def test_refuses_non_empty_out_and_bad_input_leaving_nothing(tmp_path: Path, capsys) -> None:
    model = _onnx(tmp_path / "det.onnx")
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["triton-repo", str(model), str(out)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert main(["triton-repo", str(model), str(tmp_path / "r"), "--max-batch", "5"]) == 2
    assert "exceeds the model's max batch 4" in capsys.readouterr().err
    bare = tmp_path / "bare.onnx"
    onnx.save(helper.make_model(helper.make_graph([], "g", [], [])), str(bare))
    assert main(["triton-repo", str(bare), str(tmp_path / "r")]) == 2
    assert "no frcnn metadata" in capsys.readouterr().err
    assert main(["triton-repo", str(tmp_path / "missing.onnx"), str(tmp_path / "r")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.onnx", "det.onnx", "taken"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["triton-repo", str(model), str(empty)]) == 0 and (empty / "frcnn/config.pbtxt").is_file()


def test_metadata_quotes_survive_pbtxt(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert main(["triton-repo", str(_onnx(tmp_path / "m.onnx")), str(repo)]) == 0
    for name in ("frcnn", "frcnn_preprocess", "frcnn_postprocess"):
        meta = json.loads(_configs(repo)[name].parameters[METADATA_PARAMETER].string_value)
        assert json.loads(meta["class_names"]) == ["person", "cat \"quoted\"", "ünïcode"]
    assert np.dtype(OUTPUTS["classes"]).name == "int32"


def _tritonserver(repo: Path, tmp: Path):
    """PyTriton's bundled tritonserver (python backend only) on ``repo``; returns (process, http port)."""
    import shutil
    import site
    import socket
    import subprocess
    import sys
    import time

    pytriton = pytest.importorskip("pytriton", reason="nvidia-pytriton (dev extra) ships tritonserver")
    from frcnn.runtime.serving.pytriton_server import python_libdir_env
    from pytriton.utils.distribution import get_libs_path

    dist = Path(pytriton.__file__).parent / "tritonserver"
    server = tmp / "tritonserver"
    shutil.copytree(dist / "bin", server / "bin")
    shutil.copytree(dist / "backends", server / "backends")
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    shutil.copy(dist / "python_backend_stubs" / version / "triton_python_backend_stub", server / "backends/python")
    socks = [socket.socket() for _ in range(3)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    env = python_libdir_env()
    env["LD_LIBRARY_PATH"] += f":{get_libs_path()}"
    env["PYTHONPATH"] = os.pathsep.join(site.getsitepackages())  # the stub imports frcnn from this venv
    proc = subprocess.Popen([str(server / "bin/tritonserver"), f"--model-repository={repo}",
                             f"--backend-directory={server / 'backends'}", "--http-address=127.0.0.1",
                             f"--http-port={ports[0]}", "--grpc-address=127.0.0.1", f"--grpc-port={ports[1]}",
                             f"--metrics-port={ports[2]}", "--allow-gpu-metrics=false", "--exit-timeout-secs=3"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    client = http.InferenceServerClient(f"127.0.0.1:{ports[0]}")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(Exception):
            if client.is_model_ready("frcnn_preprocess") and client.is_model_ready("frcnn_postprocess"):
                return proc, client
        time.sleep(0.5)
    proc.kill()
    raise AssertionError("tritonserver did not load the python models in 120 s")


def test_python_models_run_in_a_real_tritonserver(tmp_path: Path) -> None:
    """The generated pre/post models (model.py) in Triton's python backend, against frcnn.runtime directly."""
    from frcnn.runtime.detector import MIN_PADDED_SIDE, pad_to_min_side
    from frcnn.runtime.preprocess import Preprocessor

    repo = tmp_path / "repo"
    assert main(["triton-repo", str(_onnx(tmp_path / "m.onnx")), str(repo)]) == 0
    subset = tmp_path / "prepost"  # the onnxruntime backend is not in PyTriton's tritonserver
    subset.mkdir()
    for name in ("frcnn_preprocess", "frcnn_postprocess"):
        (repo / name).rename(subset / name)
    proc, client = _tritonserver(subset, tmp_path)
    try:
        rgb = np.random.default_rng(0).integers(0, 256, (300, 451, 3), dtype=np.uint8)
        pre = _infer(client, "frcnn_preprocess", {"image": np.array([[_png(rgb)]], dtype=object)})
        batch = Preprocessor(320, 512, input_format="RGB", model_format="BGR", size_divisibility=32)([rgb])
        assert np.array_equal(pre["images"], pad_to_min_side(batch["images"], MIN_PADDED_SIDE, 32))
        assert pre["image_sizes"].tolist() == [[320, 481]] and pre["original_sizes"].tolist() == [[300, 451]]
        for bad, why in ((b"", "0 bytes"), (b"GIF89a-not-really", "not a readable image")):
            with pytest.raises(Exception, match=why):
                _infer(client, "frcnn_preprocess", {"image": np.array([[bad]], dtype=object)})
        dets = {"num_detections": np.array([[2]], np.int32),
                "boxes": np.array([[[32, 16, 160, 96], [0, 0, 481, 320], [1, 1, 2, 2]]], np.float32),
                "scores": np.array([[0.9, 0.5, 0.1]], np.float32), "classes": np.array([[1, 2, 0]], np.int32),
                "image_sizes": pre["image_sizes"], "original_sizes": pre["original_sizes"]}  # fmt: skip
        post = _infer(client, "frcnn_postprocess", dets)
        scale_y, scale_x = 300 / 320, 451 / 481  # detectron2: boxes scaled by original / resized, then clipped
        expected = np.array([[32 * scale_x, 16 * scale_y, 160 * scale_x, 96 * scale_y], [0, 0, 451, 300]])
        assert int(post["num_detections"][0, 0]) == 2
        np.testing.assert_allclose(post["boxes"][0, :2], expected, rtol=1e-6, atol=1e-4)
        assert post["class_names"][0, :2].tolist() == [b"cat \"quoted\"", "ünïcode".encode()]
        dets["num_detections"] = np.array([[0]], np.int32)
        empty = _infer(client, "frcnn_postprocess", dets)
        assert int(empty["num_detections"][0, 0]) == 0
    finally:
        proc.terminate()
        proc.wait(15)


def _png(rgb: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def _infer(client, model: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    types = {np.dtype(np.uint8): "UINT8", np.dtype(np.int32): "INT32", np.dtype(np.float32): "FP32",
             np.dtype(object): "BYTES"}  # fmt: skip
    inputs = []
    for name, value in arrays.items():
        tensor = http.InferInput(name, list(value.shape), types[value.dtype])
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    result = client.infer(model, inputs)
    return {o["name"]: result.as_numpy(o["name"]) for o in result.get_response()["outputs"]}
