"""Low-memory ONNX Runtime sessions from the pre-optimised graph cache (runtime/backends/ort_cache.py).

Detections of the cached graph (optimised once at ORT_ENABLE_ALL in a child process, loaded with graph
optimisations off) are compared with ONNX Runtime's default session on the real exported small model; the
cache's behaviour (hits without a child, content keys, corrupt entries rebuilt, races, failures falling back
with one warning) and ``frcnn optimize``'s bad inputs are checked on the tiny stand-in detector of
test_runtime.py, whose graph runs in milliseconds.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from frcnn.runtime.backends import ort_cache
from frcnn.runtime.backends.onnxruntime import OnnxRuntimeBackend
from frcnn.runtime.errors import UserError
from model_utils import random_images
from test_runtime import exported_small, fake_metadata, make_fake_detector  # noqa: F401 - session fixture

OUT_NAMES = ("num_detections", "boxes", "scores", "classes")


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_fake_detector(tmp_path_factory.mktemp("ortcache") / "fake.onnx")


def _feed(shapes: list[tuple[int, int]], seed: int = 3) -> dict[str, np.ndarray]:
    from frcnn.runtime.preprocess import batch_images

    images, sizes = batch_images(random_images(shapes, seed))
    return {"images": images, "image_sizes": sizes}


def _run(path: str, feed: dict[str, np.ndarray], **kwargs) -> tuple[dict[str, np.ndarray], OnnxRuntimeBackend]:
    backend = OnnxRuntimeBackend(path, providers=["cpu"], intra_op_threads=1, **kwargs)
    with backend:
        return backend.infer(feed), backend


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "frcnn.runtime" and r.levelno == logging.WARNING]


def test_cached_graph_gives_the_default_sessions_detections(exported_small, tmp_path: Path) -> None:  # noqa: F811
    from frcnn.runtime import Detector

    onnx_path = exported_small[0]
    feed = _feed([(256, 320), (288, 224)])
    reference, _ = _run(onnx_path, feed)
    low, backend = _run(onnx_path, feed, low_memory=True, cache_dir=tmp_path)
    assert backend.optimized_graph is not None and backend.optimized_graph.built
    assert backend.optimized_graph.path.parent == tmp_path and sorted(os.listdir(tmp_path)) == [
        backend.optimized_graph.path.name]  # fmt: skip
    # the saved graph really is optimised (fused / NCHWc nodes), and the frcnn functions were inlined into it
    saved = onnx.load(str(backend.optimized_graph.path))
    fused = [n.op_type for n in saved.graph.node if n.domain in ("com.microsoft", "com.microsoft.nchwc")]
    assert "FusedConv" in fused or "Conv" in fused, sorted(set(fused))
    assert not any(n.domain == "frcnn" for n in saved.graph.node) and not saved.functions
    assert int(reference["num_detections"].sum()) > 0
    for name in OUT_NAMES:  # same kernels on the same graph: identical, not merely close
        np.testing.assert_array_equal(reference[name], low[name], err_msg=name)
    image = random_images([(256, 320)], 3)[0]
    plain = Detector(onnx_path, providers=["cpu"])(image)
    detector = Detector(onnx_path, providers=["cpu"], low_memory=True, cache_dir=tmp_path)
    assert detector.backend.optimized_graph == (backend.optimized_graph.path, False)
    dets = detector(image)
    assert len(dets.scores) > 0
    for name in ("boxes", "scores", "classes"):
        np.testing.assert_array_equal(getattr(plain, name), getattr(dets, name), err_msg=name)


def test_second_construction_hits_without_a_child(fake: str, tmp_path: Path, monkeypatch) -> None:
    feed = _feed([(64, 96)])
    first, backend = _run(fake, feed, low_memory=True, cache_dir=tmp_path)
    entry = backend.optimized_graph.path
    before = entry.stat()

    def no_child(*args, **kwargs):
        raise AssertionError(f"a cache hit started a child process: {args}")

    monkeypatch.setattr(ort_cache, "build_in_child", no_child)
    again, backend2 = _run(fake, feed, low_memory=True, cache_dir=tmp_path)
    assert backend2.optimized_graph == (entry, False)
    after = entry.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    for name in OUT_NAMES:
        np.testing.assert_array_equal(first[name], again[name])


def test_key_follows_the_bytes_not_the_path(fake: str, tmp_path: Path, monkeypatch) -> None:
    copy = tmp_path / "copy.onnx"
    shutil.copy(fake, copy)
    assert ort_cache.cache_key(copy) == ort_cache.cache_key(fake)
    edited = make_fake_detector(tmp_path / "edited.onnx", {**fake_metadata(), "class_names": '["a", "b", "c"]'})
    assert ort_cache.cache_key(edited) != ort_cache.cache_key(fake)
    import onnxruntime

    key = ort_cache.cache_key(fake)
    monkeypatch.setattr(onnxruntime, "__version__", "0.0.0")  # another ORT build: another entry
    assert ort_cache.cache_key(fake) != key
    monkeypatch.undo()
    monkeypatch.setattr(ort_cache, "cpu_fingerprint", lambda: "another-cpu")  # another CPU: another entry
    assert ort_cache.cache_key(fake) != key
    monkeypatch.undo()
    assert ort_cache.cache_key(fake) == key


def test_cache_root_is_shared_with_the_ptx_cache(monkeypatch, tmp_path: Path) -> None:
    from frcnn.plugins.ptx import default_cache_dir
    from frcnn.runtime.cache_dir import cache_root

    monkeypatch.delenv("FRCNN_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "frcnn"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "frcnn"
    monkeypatch.setenv("FRCNN_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine" / "ptx"
    assert ort_cache.entry_path(make_fake_detector(tmp_path / "m.onnx")).parent == tmp_path / "mine" / "ort"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_entry_is_rebuilt(fake: str, tmp_path: Path, damage: str, caplog) -> None:
    feed = _feed([(64, 96)])
    good, backend = _run(fake, feed, low_memory=True, cache_dir=tmp_path)
    entry = backend.optimized_graph.path
    data = entry.read_bytes()
    entry.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x08\x07not onnx" * 50, "empty": b""}[damage])
    out, backend = _run(fake, feed, low_memory=True, cache_dir=tmp_path)
    assert backend.optimized_graph == (entry, True)
    assert entry.read_bytes() == data  # the same optimiser on the same model writes the same graph
    assert _warnings(caplog) == []
    for name in OUT_NAMES:
        np.testing.assert_array_equal(good[name], out[name])


def test_racing_builds_both_end_with_a_valid_entry(fake: str, tmp_path: Path) -> None:
    entry = ort_cache.entry_path(fake, tmp_path)
    errors: list[BaseException] = []

    def build() -> None:
        try:
            ort_cache.build_in_child(fake, entry)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(os.listdir(tmp_path)) == [entry.name]  # no temp file left by either writer
    _, backend = _run(fake, _feed([(64, 96)]), low_memory=True, cache_dir=tmp_path)
    assert backend.optimized_graph == (entry, False)


def _fallback_case(case: str, fake: str, tmp_path: Path, monkeypatch) -> tuple[str, Path]:
    """(model, cache dir) for a cache that cannot serve: the child killed (as the OOM killer would), a
    cache "folder" that is a file, a model whose weights live in external data (refused by the real child)."""
    cache = tmp_path / "cache"
    if case == "child killed":
        monkeypatch.setattr(ort_cache, "child_command", lambda model, entry: [
            sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])  # fmt: skip
        return fake, cache
    if case == "cache is a file":
        cache.write_text("not a folder")
        return fake, cache / "ort"
    model = onnx.load(fake)
    onnx.save(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=100)  # fmt: skip
    return str(tmp_path / "ext.onnx"), cache


@pytest.mark.parametrize("case", ["child killed", "cache is a file", "external data"])
def test_cache_that_cannot_serve_falls_back_with_one_warning(fake: str, tmp_path: Path, case: str, monkeypatch,
                                                             caplog) -> None:  # fmt: skip
    feed = _feed([(64, 96)])
    reference, _ = _run(fake, feed)
    model, cache = _fallback_case(case, fake, tmp_path, monkeypatch)
    out, backend = _run(model, feed, low_memory=True, cache_dir=cache)
    assert backend.optimized_graph is None
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "\n" not in warnings[0] and "low_memory" in warnings[0], warnings
    expected = {"child killed": "killed by signal 9", "cache is a file": "is not a folder",
                "external data": "external data"}[case]  # fmt: skip
    assert expected in warnings[0]
    assert not (cache.is_dir() and os.listdir(cache)), "a failed build left files in the cache"
    for name in OUT_NAMES:
        np.testing.assert_array_equal(reference[name], out[name])


def test_low_memory_on_a_bad_model_is_one_user_error(tmp_path: Path, caplog) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x01\x02 this is not a protobuf")
    with pytest.raises(UserError, match="ONNX Runtime cannot load .*bad.onnx.*re-export"):
        _run(str(bad), {}, low_memory=True, cache_dir=tmp_path / "cache")
    assert _warnings(caplog) == [] and not (tmp_path / "cache").exists()


def _frcnn(argv: list[str], capsys) -> tuple[int, str, str]:
    from frcnn.runtime.cli import main

    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_optimize_cli_prints_the_entry_and_reuses_it(fake: str, tmp_path: Path, capsys) -> None:
    code, out, err = _frcnn(["optimize", fake, "--cache-dir", str(tmp_path / "c")], capsys)
    assert (code, err) == (0, "")
    entry = Path(out.strip())
    assert entry == ort_cache.entry_path(fake, tmp_path / "c") and entry.is_file()
    mtime = entry.stat().st_mtime_ns
    assert _frcnn(["optimize", fake, "--cache-dir", str(tmp_path / "c")], capsys) == (0, out, "")
    assert entry.stat().st_mtime_ns == mtime
    assert sorted(os.listdir(Path(fake).parent)) == ["fake.onnx"]  # nothing beside the user's model


def _not_a_detector(path: Path) -> str:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return str(path)


@pytest.mark.parametrize("case", ["missing", "folder", "engine", "garbage", "not a detector", "cache is a file"])
def test_optimize_cli_bad_inputs(fake: str, tmp_path: Path, capsys, case: str) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    cache = tmp_path / "cache"
    model = {"missing": str(inputs / "nope.onnx"), "folder": str(inputs), "engine": str(inputs / "m.engine"),
             "garbage": str(inputs / "g.onnx"), "not a detector": str(inputs / "id.onnx"),
             "cache is a file": fake}[case]  # fmt: skip
    if case == "engine":
        Path(model).write_bytes(b"engine bytes")
    elif case == "garbage":
        Path(model).write_bytes(b"\x01\x02 this is not a protobuf")
    elif case == "not a detector":
        _not_a_detector(Path(model))
    elif case == "cache is a file":
        cache.write_text("x")
    expected = {"missing": "not found", "folder": "is a folder", "engine": "takes the .onnx model",
                "garbage": "cannot load", "not a detector": "is not a frcnn detector",
                "cache is a file": "is not a folder"}[case]  # fmt: skip
    before = sorted(os.listdir(inputs))
    code, out, err = _frcnn(["optimize", model, "--cache-dir", str(cache / "ort")], capsys)
    assert code == 2 and out == ""
    assert err.startswith("frcnn: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert expected in err, err
    assert sorted(os.listdir(inputs)) == before
    assert not cache.is_dir(), "a failed `frcnn optimize` left a cache folder"
