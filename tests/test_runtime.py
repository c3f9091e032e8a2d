"""Runtime: Detector, backends, bad input, thread safety, torch-freedom, engine sidecar checks.

Fast tests use a tiny stand-in detector written here in standard ONNX ops with the frcnn I/O contract
(``images`` uint8 [B, 3, H, W], ``image_sizes`` int32 [B, 2] -> num_detections, boxes [B, 100, 4], scores,
classes) and metadata: its boxes are fixed fractions of each image's resized size, so the Detector's
boxes must come back as the same fractions of the ORIGINAL image (hand-computable reference); its scores
depend on pixel values, so batching / threading mix-ups show. Real-model tests are marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import onnx
import pytest
from frcnn.runtime.errors import UserError
from onnx import TensorProto, helper, numpy_helper

K = 100
FRACS = np.stack([np.linspace(0.05, 0.30, K), np.linspace(0.10, 0.20, K), np.linspace(0.50, 0.95, K),
                  np.linspace(0.60, 0.90, K)], axis=1).astype(np.float32)  # x1, y1, x2, y2 / (w, h, w, h)
DECAY = np.linspace(1.0, 0.01, K).astype(np.float32)  # scores = mean pixel / 255 * DECAY (sorted descending)
CLASSES = (np.arange(K) % 3).astype(np.int32)
NAMES = ["cat", "dog", "bird"]


def fake_metadata(short: int = 64, max_size: int = 128, order: str = "BGR") -> dict[str, str]:
    return {"class_names": json.dumps(NAMES), "size_divisibility": "32",
            "resize": json.dumps({"rule": "ResizeShortestEdge", "min_size": short, "max_size": max_size}),
            "input_format": json.dumps({"channel_order": order})}  # fmt: skip


def make_fake_detector(path, metadata: dict[str, str] | None = None, extra_node: onnx.NodeProto | None = None):
    """Write the stand-in detector (module docstring) to ``path``; ``metadata=None`` gives fake_metadata()."""
    c = [numpy_helper.from_array(a, n) for a, n in (
        (FRACS[None], "fracs"), (DECAY[None], "decay"), (CLASSES[None], "cls"), (np.array([1], np.int64), "ax1"),
        (np.array([0, -1], np.int64), "flat"), (np.array([1, 0, 1, 0], np.int64), "hw_idx"),
        (np.array(255.0, np.float32), "c255"), (np.array(0.05, np.float32), "thr"))]
    nodes = [
        helper.make_node("Cast", ["image_sizes"], ["sizes_f"], to=TensorProto.FLOAT),
        helper.make_node("Gather", ["sizes_f", "hw_idx"], ["whwh"], axis=1),           # [B, 4] = w, h, w, h
        helper.make_node("Unsqueeze", ["whwh", "ax1"], ["whwh1"]),                     # [B, 1, 4]
        helper.make_node("Mul", ["whwh1", "fracs"], ["boxes"]),                        # [B, K, 4]
        helper.make_node("Cast", ["images"], ["img_f"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["img_f", "flat"], ["img_flat"]),
        helper.make_node("ReduceMean", ["img_flat", "ax1"], ["mean"], keepdims=1),     # [B, 1]
        helper.make_node("Div", ["mean", "c255"], ["mean01"]),
        helper.make_node("Mul", ["mean01", "decay"], ["scores"]),                      # [B, K]
        helper.make_node("Shape", ["scores"], ["bk"]),
        helper.make_node("Expand", ["cls", "bk"], ["classes"]),
        helper.make_node("Greater", ["scores", "thr"], ["keep"]),
        helper.make_node("Cast", ["keep"], ["keep_i"], to=TensorProto.INT32),
        helper.make_node("ReduceSum", ["keep_i", "ax1"], ["num_detections"], keepdims=0),
    ]
    outputs = [helper.make_tensor_value_info("num_detections", TensorProto.INT32, ["B"]),
               helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["B", K, 4]),
               helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["B", K]),
               helper.make_tensor_value_info("classes", TensorProto.INT32, ["B", K])]
    if extra_node is not None:
        nodes.append(extra_node)
        outputs.append(helper.make_tensor_value_info(extra_node.output[0], TensorProto.INT32, ["B"]))
    graph = helper.make_graph(
        nodes, "fake_frcnn",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["B", 3, "H", "W"]),
         helper.make_tensor_value_info("image_sizes", TensorProto.INT32, ["B", 2])], outputs, initializer=c)
    opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid("frcnn", 1)] if extra_node is not None else [])
    model = helper.make_model(graph, opset_imports=opsets, ir_version=9)
    for key, value in (fake_metadata() if metadata is None else metadata).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture(scope="session")
def exported_small(tmp_path_factory):
    """(onnx path, cfg, model) of a lively random-weight small R18 model, exported once per session (slow);
    WEIGHTS.pth and config.yaml are written beside the ONNX."""
    import torch
    from frcnn.export.onnx_export import export_onnx
    from model_utils import lively_model

    folder = tmp_path_factory.getbasetemp() / "exported_small"
    cfg, model = lively_model()
    if not (folder / "model.onnx").is_file():
        folder.mkdir(exist_ok=True)
        torch.save({"model": model.state_dict()}, folder / "model.pth")
        (folder / "config.yaml").write_text(cfg.dump())
        export_onnx(model, cfg, folder / "model.onnx", class_names=NAMES, max_batch=4, max_side=1024)
    return str(folder / "model.onnx"), cfg, model


@pytest.fixture(scope="module")
def fake_model(tmp_path_factory):
    return make_fake_detector(tmp_path_factory.mktemp("fake") / "fake.onnx")


@pytest.fixture(scope="module")
def detector(fake_model):
    from frcnn.runtime import Detector

    return Detector(fake_model, providers=["cpu"], intra_op_threads=1)


def _img(h, w, seed=0, c=3):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c) if c else (h, w), dtype=np.uint8)


def test_boxes_come_back_in_original_pixels(detector):
    img = np.full((50, 75, 3), 120, np.uint8)  # resized to 64 x 96 (short edge 64), padded batch 96 x 96
    det = detector(img)
    n = int(np.sum(np.float32(120 * 64 / 96 / 255) * DECAY > 0.05))  # mean over the padded batch
    assert len(det) == n > 0
    expect = FRACS[:n] * np.array([75, 50, 75, 50], np.float32)
    np.testing.assert_allclose(det.boxes, expect, rtol=1e-5, atol=1e-3)
    assert det.classes.dtype == np.int64 and det.labels()[:3] == ["cat", "dog", "bird"]
    assert np.all(np.diff(det.scores) <= 0)


def test_rgb_input_is_flipped_to_model_order(fake_model):
    from frcnn.runtime import Detector

    img = _img(64, 64, seed=3)
    bgr = Detector(fake_model, providers=["cpu"])(img)
    rgb = Detector(fake_model, providers=["cpu"], input_format="RGB")(np.ascontiguousarray(img[:, :, ::-1]))
    np.testing.assert_array_equal(bgr.scores, rgb.scores)


def test_large_list_is_split_to_max_batch(fake_model):
    from frcnn.runtime import Detector

    det = Detector(fake_model, providers=["cpu"], max_batch=2)
    seen = []
    infer = det.backend.infer
    det.backend.infer = lambda feed: seen.append(feed["images"].shape[0]) or infer(feed)
    sizes = [(40, 60), (70, 50), (64, 64), (33, 90), (80, 80)]
    out = det([_img(h, w, seed=i) for i, (h, w) in enumerate(sizes)])
    assert seen == [2, 2, 1] and len(out) == 5
    for d, (h, w) in zip(out, sizes):  # each image's boxes are fractions of ITS size, whatever the batch
        np.testing.assert_allclose(d.boxes, FRACS[:len(d)] * np.array([w, h, w, h], np.float32), atol=2e-3)


def test_threads_match_serial(detector):
    images = [_img(30 + 7 * i, 90 - 5 * i, seed=i) for i in range(8)]
    serial = [detector(img) for img in images]
    errors, mismatches = [], []

    def work(t):
        try:
            for k in range(50):
                i = (t + k) % len(images)
                got = detector(images[i])
                if not (np.array_equal(got.boxes, serial[i].boxes) and np.array_equal(got.scores, serial[i].scores)
                        and np.array_equal(got.classes, serial[i].classes)):
                    mismatches.append((t, k))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and not mismatches


@pytest.mark.parametrize("image, message", [
    (np.zeros((20, 20, 3), np.int16), "dtype int16"),
    (np.zeros((20, 20, 3), np.float32), "dtype float32;"),
    (np.full((20, 20, 3), np.nan, np.float32), "contains NaN"),
    (np.zeros((20, 20, 4), np.uint8), "alpha"),
    (np.zeros((3, 20, 20), np.uint8), "channels-first"),
    (np.zeros((0, 20, 3), np.uint8), "empty"),
    (np.zeros((1, 5000, 3), np.uint8), "aspect ratio"),
    (np.zeros((20, 20, 3, 1), np.uint8), "shape"),
    ([[1, 2, 3]], "numpy array"),
], ids=["int16", "float", "float-nan", "4-channels", "CHW", "0-sized", "extreme-aspect", "5-d", "list"])
def test_bad_images_are_clear_errors(detector, image, message):
    with pytest.raises(UserError, match=message):
        detector([image])


def test_documented_conversions(detector):
    gray = _img(40, 60, c=0)
    np.testing.assert_array_equal(detector(gray).scores, detector(np.repeat(gray[:, :, None], 3, 2)).scores)
    tiny = detector(np.full((1, 1, 3), 200, np.uint8))  # 1x1 -> 64x64, padded up to the model's minimum
    assert len(tiny) > 0 and np.all(tiny.boxes <= 1.0)
    huge = np.broadcast_to(np.uint8(128), (10000, 10000, 3))  # read-only, non-contiguous: copied, resized
    np.testing.assert_allclose(detector(huge).boxes[0], FRACS[0] * 10000, rtol=1e-4)
    assert detector([]) == []  # an empty list is an empty answer


def test_onnx_without_metadata_is_refused(tmp_path):
    from frcnn.runtime import Detector

    path = make_fake_detector(tmp_path / "nometa.onnx", metadata={})
    with pytest.raises(UserError, match="no frcnn metadata"):
        Detector(path, providers=["cpu"])
    bad = make_fake_detector(tmp_path / "badmeta.onnx", metadata={**fake_metadata(), "resize": "{oops"})
    with pytest.raises(UserError, match="malformed"):
        Detector(bad, providers=["cpu"])


def test_missing_custom_op_implementation_is_explained(tmp_path):
    from frcnn.runtime import Detector

    node = helper.make_node("BatchedNMS", ["boxes", "scores", "classes"], ["nms_num", "nms_idx"], domain="frcnn",
                            iou_threshold=0.5, score_threshold=0.05, max_output=10)
    path = make_fake_detector(tmp_path / "stripped.onnx", extra_node=node)
    with pytest.raises(UserError, match="custom frcnn ops.*local functions"):
        Detector(path, providers=["cpu"])


def test_not_a_detector_and_bad_paths(tmp_path):
    from frcnn.runtime import Detector

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    other = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.save(other, str(tmp_path / "other.onnx"))
    with pytest.raises(UserError, match="not a frcnn detector"):
        Detector(tmp_path / "other.onnx", providers=["cpu"])
    with pytest.raises(UserError, match="not found"):
        Detector(tmp_path / "missing.onnx")
    with pytest.raises(UserError, match="suffix"):
        Detector(tmp_path / "model.bin")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(UserError, match="cannot load"):
        Detector(tmp_path / "junk.onnx", providers=["cpu"])
    with pytest.raises(UserError, match="not available"):
        Detector(tmp_path / "other.onnx", providers=["NoSuchExecutionProvider"])


def _fake_engine(tmp_path, trt_version="10.13.0.35", cc=(9, 0), name="NVIDIA H100 80GB HBM3"):
    from frcnn.export.engine import make_sidecar, write_sidecar
    from frcnn.plugins.tensorrt import GpuInfo

    engine = tmp_path / "model.engine"
    data = b"serialized engine bytes"
    engine.write_bytes(data)
    profile = {"images": {"min": [1, 3, 96, 96], "opt": [1, 3, 800, 1344], "max": [4, 3, 1344, 1344]}}
    write_sidecar(engine, make_sidecar(data, trt_version, GpuInfo(name, cc), profile, False, fake_metadata(), []))
    return str(engine)


def test_engine_sidecar_checks_without_tensorrt(tmp_path):
    from frcnn.plugins.tensorrt import GpuInfo
    from frcnn.runtime.backends.tensorrt import check_engine

    engine = _fake_engine(tmp_path)
    h100 = GpuInfo("NVIDIA H100 80GB HBM3", (9, 0))
    assert check_engine(engine, "10.13.0.35", h100)["profile"]["images"]["max"][0] == 4
    with pytest.raises(UserError, match="TensorRT 10.13.0.35, this machine has TensorRT 10.9.0"):
        check_engine(engine, "10.9.0.34", h100)
    with pytest.raises(UserError, match="compute capability 9.0.*compute capability 8.6"):
        check_engine(engine, "10.13.0.35", GpuInfo("NVIDIA A10", (8, 6)))
    with open(engine, "ab") as f:
        f.write(b"tampered")
    with pytest.raises(UserError, match="SHA-256"):
        check_engine(engine, "10.13.0.35", h100)
    os.remove(engine + ".json")
    with pytest.raises(UserError, match="sidecar .* not found"):
        check_engine(engine, "10.13.0.35", h100)


def test_engine_without_tensorrt_is_a_clear_error(tmp_path):
    from frcnn.runtime import Detector

    engine = _fake_engine(tmp_path)
    with pytest.raises(UserError, match="TensorRT"):
        Detector(engine)
    with pytest.raises(UserError, match="TensorRT engine; ONNX Runtime needs the .onnx"):
        Detector(engine, backend="onnxruntime")


def test_full_run_never_imports_torch(fake_model):
    code = (f"import sys, numpy as np\nfrom frcnn.runtime import Detector\n"
            f"d = Detector({fake_model!r}, providers=['cpu'])\n"
            f"out = d([np.zeros((40, 50, 3), np.uint8) + 90, np.full((70, 30), 7, np.uint8)])\n"
            f"assert len(out) == 2 and len(out[0]) > 0\n"
            f"from frcnn.runtime import infer_cli, bench_cli\n"
            f"from frcnn.export import polygraphy_data_loader, polygraphy_compare\n"
            f"assert 'torch' not in sys.modules, 'torch was imported'\nprint('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


@pytest.mark.slow
def test_exported_model_matches_pytorch_and_stays_torch_free(exported_small):
    """Real exported R18 model: Detector == PyTorch Predictor path; torch-free subprocess run; threads."""
    onnx_path, _cfg, model = exported_small
    import torch
    from frcnn.export.polygraphy_runners import compare_detections
    from frcnn.runtime import Detector
    from model_utils import random_images

    images = random_images([(150, 200), (240, 180)], 7)
    det = Detector(onnx_path, providers=["cpu"], intra_op_threads=1)
    feed, originals = det.preprocess(images)
    with torch.no_grad():
        ref = {k: v.numpy() for k, v in model(torch.from_numpy(feed["images"]),
                                               torch.from_numpy(feed["image_sizes"])).items()}
    report = compare_detections(ref, det.backend.infer(feed), min_iou=0.999, score_atol=1e-4)
    assert report and report.matched == int(ref["num_detections"].sum()) > 0, str(report)  # tied scores may swap rows
    want = det.postprocess(ref, feed["image_sizes"], originals)
    got = det(images)
    for g, w in zip(got, want):
        assert len(g) == len(w) > 0
        np.testing.assert_allclose(np.sort(g.scores), np.sort(w.scores), atol=1e-4)
    serial = [det(img) for img in images]
    results = {}
    threads = [threading.Thread(target=lambda t=t: results.__setitem__(t, det(images[t % 2]))) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for t, r in results.items():
        np.testing.assert_array_equal(r.boxes, serial[t % 2].boxes)
    code = (f"import sys, numpy as np\nfrom frcnn.runtime import Detector\n"
            f"d = Detector({onnx_path!r}, providers=['cpu'])\nassert len(d(np.full((120, 160, 3), 99, np.uint8))) >= 0\n"
            f"assert 'torch' not in sys.modules\nprint('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
