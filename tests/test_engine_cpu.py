"""What the engine builder can prove without TensorRT: fp16 conversion (run by ONNX Runtime), the sidecar
and its compatibility checks, and the clear errors when TensorRT is absent."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from frcnn.export import engine
from frcnn.export.fp16 import default_keep_fp32, to_fp16_onnx
from frcnn.runtime.errors import UserError
from frcnn.runtime.tensorrt_env import GpuInfo, parse_version, tensorrt_available
from onnx import TensorProto, helper, numpy_helper

ort = pytest.importorskip("onnxruntime")
HAS_TENSORRT = tensorrt_available()  # tensorrt-stubs alone installs an empty `tensorrt` namespace package

MEAN = np.array([100.5, 20.25, 3.0, 50.0], np.float32)
W = np.linspace(-0.7, 0.9, 12, dtype=np.float32).reshape(4, 3)
SHARED = np.array([1.0001, 0.5, 2.0], np.float32)


def _graph_model() -> onnx.ModelProto:
    """normalize (fp32) -> backbone (fp16) -> softmax / decode (fp32), with three graph outputs."""
    f32 = TensorProto.FLOAT
    nodes = [
        helper.make_node("Cast", ["images"], ["a"], name="normalize/Cast", to=f32),
        helper.make_node("Sub", ["a", "mean"], ["b"], name="normalize/Sub"),
        helper.make_node("MatMul", ["b", "W"], ["c"], name="backbone/MatMul"),
        helper.make_node("Add", ["c", "shared"], ["d"], name="backbone/Add"),
        helper.make_node("Constant", [], ["k"], name="backbone/Const",
                         value=numpy_helper.from_array(np.array(0.001, np.float32))),
        helper.make_node("Add", ["d", "k"], ["e"], name="backbone/AddK"),
        helper.make_node("Softmax", ["e"], ["p"], name="roi_heads/softmax/Softmax", axis=-1),
        helper.make_node("Mul", ["p", "shared"], ["boxes"], name="roi_heads/decode/Mul"),
        helper.make_node("Relu", ["e"], ["feats"], name="backbone/Relu"),
        helper.make_node("Cast", ["sizes"], ["s"], name="backbone/Cast", to=f32),
        helper.make_node("Mul", ["feats", "s"], ["scaled"], name="backbone/Mul"),
    ]
    graph = helper.make_graph(
        nodes, "fp16_probe",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, [2, 4]),
         helper.make_tensor_value_info("sizes", TensorProto.INT32, [2, 1])],
        [helper.make_tensor_value_info(n, f32, [2, 3]) for n in ("boxes", "feats", "scaled")],
        [numpy_helper.from_array(MEAN, "mean"), numpy_helper.from_array(W, "W"),
         numpy_helper.from_array(SHARED, "shared")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))


def _feeds() -> dict[str, np.ndarray]:
    images = np.array([[200, 30, 7, 99], [101, 21, 250, 0]], np.uint8)
    return {"images": images, "sizes": np.array([[3], [5]], np.int32)}


def _reference(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """NumPy: fp32 normalize, fp16 backbone (rounded after every op), fp32 softmax and decode."""
    half = np.float16
    b = feeds["images"].astype(np.float32) - MEAN
    c = (b.astype(half).astype(np.float32) @ W.astype(half).astype(np.float32)).astype(half)
    d = (c + SHARED.astype(half)).astype(half)
    e = (d + half(0.001)).astype(half)
    e32 = e.astype(np.float32)
    p = np.exp(e32 - e32.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    feats = np.maximum(e, 0).astype(half)
    scaled = (feats * feeds["sizes"].astype(half)).astype(half)
    return {"boxes": p * SHARED, "feats": feats.astype(np.float32), "scaled": scaled.astype(np.float32)}


def test_fp16_conversion_types_and_casts() -> None:
    model = to_fp16_onnx(_graph_model())
    onnx.checker.check_model(model, full_check=True)
    inits = {t.name: t.data_type for t in model.graph.initializer}
    assert inits["W"] == TensorProto.FLOAT16  # read by fp16 nodes only: converted in place
    assert inits["mean"] == TensorProto.FLOAT  # read by the fp32 normalize only
    assert inits["shared"] == TensorProto.FLOAT and inits["shared/fp16"] == TensorProto.FLOAT16  # both: duplicated
    by_name = {n.name: n for n in model.graph.node}
    assert list(by_name["backbone/MatMul"].input) == ["b/fp16", "W"]
    assert list(by_name["roi_heads/softmax/Softmax"].input) == ["e/fp32"]
    assert list(by_name["roi_heads/decode/Mul"].input) == ["p", "shared"]
    assert list(by_name["backbone/Add"].input) == ["c", "shared/fp16"]
    assert by_name["backbone/Cast"].attribute[0].i == TensorProto.FLOAT16
    assert by_name["normalize/Cast"].attribute[0].i == TensorProto.FLOAT
    assert numpy_helper.to_array(by_name["backbone/Const"].attribute[0].t).dtype == np.float16
    outputs = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    assert outputs == {"boxes": TensorProto.FLOAT, "feats": TensorProto.FLOAT, "scaled": TensorProto.FLOAT}
    assert [i.name for i in model.graph.input] == ["images", "sizes"]


def test_fp16_model_matches_numpy_emulation_in_onnxruntime() -> None:
    feeds = _feeds()
    got = _run(to_fp16_onnx(_graph_model()), feeds)
    want = _reference(feeds)
    for name in ("feats", "scaled"):
        assert got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], want[name], rtol=2e-3, atol=2e-3, err_msg=name)
    # softmax + decode ran in fp32 on the fp16 activations: fp32 accuracy, not fp16's ~1e-3
    np.testing.assert_allclose(got["boxes"], want["boxes"], rtol=1e-5, atol=1e-6)
    fp32 = _run(_graph_model(), feeds)
    np.testing.assert_allclose(got["feats"], fp32["feats"], rtol=1e-2, atol=0.5)
    assert not np.array_equal(got["feats"], fp32["feats"])  # the backbone really computed in fp16


def test_keep_fp32_predicate_controls_the_split() -> None:
    model = to_fp16_onnx(_graph_model(), keep_fp32=lambda node: True)
    assert all(t.data_type == TensorProto.FLOAT for t in model.graph.initializer)
    assert not any(n.name.startswith("fp16_boundary/") for n in model.graph.node)
    np.testing.assert_array_equal(_run(model, _feeds())["feats"], _run(_graph_model(), _feeds())["feats"])


def test_default_predicate_names() -> None:
    keep = [helper.make_node("Mul", [], [], name=n) for n in
            ("rpn/decode/Mul_3", "/roi_heads/softmax/Softmax", "normalize/Sub", "roi_heads/decode/Clip")]
    keep.append(helper.make_node("BatchedNMS", [], [], name="rpn/nms", domain="frcnn"))
    keep.append(helper.make_node("TopK", [], [], name="rpn/topk"))
    convert = [helper.make_node("Conv", [], [], name=n) for n in ("backbone/res2/conv1", "roi_heads/box_head/fc1")]
    assert all(default_keep_fp32(n) for n in keep)
    assert not any(default_keep_fp32(n) for n in convert)


def test_fp16_clips_out_of_range_initializers() -> None:
    model = _graph_model()
    big = W.copy()
    big[0, 0] = 1e6
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(big, "W"))
    with pytest.warns(UserWarning, match="clipped"):
        converted = to_fp16_onnx(model)
    w16 = numpy_helper.to_array(next(t for t in converted.graph.initializer if t.name == "W"))
    assert w16[0, 0] == np.float16(65504) and np.isfinite(w16).all()


def _gpu() -> GpuInfo:
    return GpuInfo("NVIDIA Test GPU", (8, 6))


def _write_engine(tmp_path: Path, version: str = "10.13.0.35") -> Path:
    path = tmp_path / "model.engine"
    data = b"not a real engine, only bytes to hash"
    path.write_bytes(data)
    profile = {"images": {"min": [1, 3, 32, 32], "opt": [1, 3, 800, 1344], "max": [2, 3, 1344, 1344]}}
    sidecar = engine.make_sidecar(data, version, _gpu(), profile, False, {"class_names": '["a", "b"]'},
                                  [{"plugin": "frcnn::BatchedNMS", "ptx_sha256": "0" * 64}])
    engine.write_sidecar(path, sidecar)
    return path


def test_sidecar_round_trip_and_compat(tmp_path: Path) -> None:
    path = _write_engine(tmp_path)
    sidecar = engine.check_engine_compat(path, tensorrt_version="10.13.0.35", gpu=_gpu())
    assert sidecar["gpu"] == {"name": "NVIDIA Test GPU", "compute_capability": "8.6"}
    assert sidecar["metadata"]["class_names"] == '["a", "b"]'
    assert json.loads(engine.sidecar_path(path).read_text()) == sidecar
    assert engine.sidecar_path(path).name == "model.engine.json"
    # a later build number of the same TensorRT release is accepted
    engine.check_engine_compat(path, tensorrt_version="10.13.0.40", gpu=_gpu())


@pytest.mark.parametrize("version, gpu, message", [
    ("10.12.0.36", GpuInfo("NVIDIA Test GPU", (8, 6)), "built with TensorRT 10.13.0.35, this machine has TensorRT 10.12"),
    ("11.0.0.1", GpuInfo("NVIDIA Test GPU", (8, 6)), "TensorRT 11.0.0.1"),
    ("10.13.0.35", GpuInfo("NVIDIA H100", (9, 0)), "compute capability 8.6), this GPU is NVIDIA H100 (compute capability 9.0"),
])
def test_compat_mismatch_is_named(tmp_path: Path, version: str, gpu: GpuInfo, message: str) -> None:
    path = _write_engine(tmp_path)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        engine.check_engine_compat(path, tensorrt_version=version, gpu=gpu)


def test_compat_other_model_same_arch_warns(tmp_path: Path) -> None:
    path = _write_engine(tmp_path)
    with pytest.warns(UserWarning, match="built on NVIDIA Test GPU, running on NVIDIA A10"):
        engine.check_engine_compat(path, tensorrt_version="10.13.0.35", gpu=GpuInfo("NVIDIA A10", (8, 6)))


def test_compat_missing_or_stale_sidecar(tmp_path: Path) -> None:
    path = _write_engine(tmp_path)
    path.write_bytes(b"a different engine")
    with pytest.raises(UserError, match="SHA-256 differs"):
        engine.check_engine_compat(path, tensorrt_version="10.13.0.35", gpu=_gpu())
    engine.sidecar_path(path).unlink()
    with pytest.raises(UserError, match=r"sidecar .*model.engine.json not found"):
        engine.check_engine_compat(path, tensorrt_version="10.13.0.35", gpu=_gpu())
    engine.sidecar_path(path).write_text('{"format": "something else"}')
    with pytest.raises(UserError, match="not a frcnn engine sidecar"):
        engine.check_engine_compat(path, tensorrt_version="10.13.0.35", gpu=_gpu())
    with pytest.raises(UserError, match="engine file .* not found"):
        engine.check_engine_compat(tmp_path / "absent.engine", tensorrt_version="10.13.0.35", gpu=_gpu())


def test_image_profile_validation() -> None:
    lo, _, hi = engine.image_profile(1, 1, 4, (32, 32), (800, 1344), (1344, 1344))
    assert lo == {"images": [1, 3, 32, 32], "image_sizes": [1, 2]}
    assert hi == {"images": [4, 3, 1344, 1344], "image_sizes": [4, 2]}
    with pytest.raises(UserError, match="multiples of 32"):
        engine.image_profile(1, 1, 1, (30, 32), (800, 1344), (1344, 1344))
    with pytest.raises(UserError, match="min <= opt <= max"):
        engine.image_profile(2, 1, 1, (32, 32), (800, 1344), (1344, 1344))


def test_parse_version() -> None:
    assert parse_version("10.13.0.35") == (10, 13, 0, 35)
    assert parse_version("11.0.0rc1")[:2] == (11, 0) and parse_version("10.8.0.43")[:2] < (10, 9)


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here; this checks the error without it")
def test_build_engine_without_tensorrt_is_a_clear_user_error(tmp_path: Path) -> None:
    onnx_path = tmp_path / "m.onnx"
    onnx.save(_graph_model(), str(onnx_path))
    lo, opt, hi = engine.image_profile(1, 1, 1, (32, 32), (32, 32), (64, 64))
    with pytest.raises(UserError, match=r"needs TensorRT >= 10\.9 \(tensorrt\.plugin\)"):
        engine.build_engine(onnx_path, tmp_path / "m.engine", min_shapes=lo, opt_shapes=opt, max_shapes=hi)
    assert not (tmp_path / "m.engine").exists() and not (tmp_path / "m.engine.json").exists()


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here; this checks the error without it")
def test_plugin_modules_import_without_tensorrt_and_register_fails_clearly() -> None:
    code = (
        "import sys\n"
        "import frcnn.plugins.tensorrt as t, frcnn.export.engine\n"
        "import frcnn.plugins.roi_align_v2.trt_plugin, frcnn.plugins.batched_nms.trt_plugin\n"
        "heavy = sorted(m for m in ('torch', 'tensorrt', 'triton', 'onnx', 'numpy') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "from frcnn.runtime.errors import UserError\n"
        "try:\n    t.register()\nexcept UserError as e:\n    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ERR building a TensorRT engine needs TensorRT >= 10.9 (tensorrt.plugin)"), out.stdout


def test_plugin_shape_and_type_rules() -> None:
    from frcnn.plugins.batched_nms import trt_plugin as nms
    from frcnn.plugins.roi_align_v2 import trt_plugin as roi

    assert roi.output_shape((2, 1000, 4), (2, 256, 200, 336), 7) == (2, 1000, 256, 7, 7)
    assert ("FP32", "FP16", "FP16", "FP16", "FP16", "FP16") in roi.type_combinations()
    assert all(len(set(c[1:])) == 1 for c in roi.type_combinations())
    with pytest.raises(ValueError, match="exactly 4 levels"):
        roi.check_attributes(7, 0, 2, 6)
    assert nms.output_shapes((2, 80000), 100) == ((2,), (2, 100))
    assert nms.type_combinations() == [("FP32", "FP32", "INT32", "INT32", "INT32")]
    with pytest.raises(ValueError, match="max_output"):
        nms.check_attributes(0.5, 0)
    assert roi.PLUGIN_ID == "frcnn::ROIAlignV2" and nms.PLUGIN_ID == "frcnn::BatchedNMS"


def test_no_warnings_on_plain_conversion() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        to_fp16_onnx(_graph_model())


@pytest.mark.parametrize(("version", "flags"), [("10.9.0.34", 2), ("10.16.0.0", 2), ("11.0.0.1", 0),
                                                ("11.4.0.9", 0)])
def test_strongly_typed_flag_only_on_tensorrt_10(version: str, flags: int) -> None:
    """STRONGLY_TYPED (enum value 1 in tensorrt-stubs 10.13) -> 1 << 1 on 10.x; nothing on 11.x (ignored there).

    ``trt`` is a namespace with the two attributes network_flags reads; the real enum value is in the stubs.
    """
    from types import SimpleNamespace

    trt = SimpleNamespace(__version__=version,
                          NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1))
    assert engine.network_flags(trt) == flags
    del trt.NetworkDefinitionCreationFlag  # 11.x must not even read the flag
    if version.startswith("11."):
        assert engine.network_flags(trt) == 0


_BLOCKED = ("triton", "torch", "tensorrt", "frcnn.plugins", "frcnn.export", "frcnn.trainer")
_WITHOUT_TRITON = '''
import importlib.abc, sys
BLOCKED = {blocked!r}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{{name}} is blocked (a production box without it)")
        return None

sys.meta_path.insert(0, Block())
import numpy as np
import frcnn.runtime
import frcnn.runtime.backends.tensorrt as trt_backend
from frcnn.runtime import Detector
from frcnn.runtime.errors import UserError
try:
    Detector({engine!r})
except UserError as exc:
    print("ENGINE:", exc)
det = Detector({onnx!r}, providers=["cpu"], intra_op_threads=1)
out = det([np.full((40, 50, 3), 90, np.uint8)])
print("ONNX:", len(out), len(out[0]))
print("LOADED:", sorted(m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED)))
'''


def test_runtime_runs_without_triton_torch_and_plugins(tmp_path: Path) -> None:
    """A production box: no triton, torch, TensorRT or upper frcnn layers. The runtime and its TensorRT backend
    import, an engine reports the missing TensorRT (not an ImportError of triton), and the ONNX path runs."""
    from frcnn.runtime.engine_sidecar import make_sidecar, write_sidecar
    from test_runtime import fake_metadata, make_fake_detector

    onnx_path = make_fake_detector(tmp_path / "fake.onnx")
    engine_path = tmp_path / "model.engine"
    engine_path.write_bytes(b"serialized engine")
    write_sidecar(engine_path, make_sidecar(b"serialized engine", "10.13.0.35", GpuInfo("NVIDIA H100", (9, 0)),
                                            {}, False, fake_metadata(), []))
    code = _WITHOUT_TRITON.format(blocked=_BLOCKED, engine=str(engine_path), onnx=onnx_path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines())
    assert lines["ENGINE"].startswith("loading a TensorRT engine needs TensorRT, but `import tensorrt` failed "
                                      "(tensorrt is blocked"), lines["ENGINE"]
    images, detections = lines["ONNX"].split()
    assert images == "1" and int(detections) > 0 and lines["LOADED"] == "[]"


def test_blocker_really_blocks(tmp_path: Path) -> None:
    """Negative control for the test above: the same finder makes `import triton` fail in the child."""
    code = _WITHOUT_TRITON.split("import numpy as np")[0] + "import frcnn.plugins.ptx\n"
    out = subprocess.run([sys.executable, "-c", code.format(blocked=_BLOCKED)], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode != 0 and "frcnn.plugins is blocked" in out.stderr, out.stderr[-2000:]
