"""Bad inputs on the runtime side (issue 9): ``frcnn infer`` / ``bench`` / ``eval MODEL``, the Detector and the
image reader API, the dataset's image headers. Every case asserts: exit 2 (CLI, run in-process, stderr
captured) or a ``UserError`` subclass (API); a message naming the problem (words asserted); no "Traceback";
and nothing left behind — the whole case folder (hidden files included, every byte of every file, so the
inputs are unchanged) is compared before and after. The documented conversions are pinned in
test_image_io.py, the output policy of ``frcnn infer`` in test_infer_policy.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bad_input_utils import (
    broken_link_folder,
    call_later,
    coco_dataset,
    fake_model_file,
    gif,
    huge_png_header,
    image_folder,
    load_dataset,
    loop_folder,
    png,
    save_array,
    snapshot,
    truncated_png,
    write,
    write_bytes_name,
)
from frcnn.runtime.cli import main
from frcnn.runtime.detector import Detector
from frcnn.runtime.errors import UserError
from frcnn.runtime.image_io import read_image
from frcnn.runtime.postprocess import unpad


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return fake_model_file(tmp_path_factory)


def _infer(tmp: Path, model: str, *extra: str, inputs: list[str] | None = None, out: str | None = None) -> list[str]:
    inputs = inputs if inputs is not None else [str(image_folder(tmp))]
    return ["infer", model, *inputs, "--output", out or str(tmp / "out"), *extra]


def _detector(model: str) -> Detector:
    return Detector(model, providers=["cpu"])


def _closed(model: str) -> Callable[[], Any]:
    det = _detector(model)
    det.close()
    return lambda: det(np.zeros((8, 8, 3), np.uint8))


def _with_user_file(tmp: Path, name: str, data: bytes = b"mine") -> Path:
    out = tmp / "out"
    out.mkdir(exist_ok=True)
    (out / name).write_bytes(data)
    return out


# (id, builder(tmp, model, monkeypatch) -> CLI argv list or API callable, words expected in the message)


Builder = Callable[[Path, str, pytest.MonkeyPatch], Any]
CASES: list[tuple[str, Builder, tuple[str, ...]]] = [
    # --- frcnn infer: model and arguments (checked before anything is created)
    ("infer-model-missing", lambda t, m, mp: _infer(t, str(t / "nope.onnx")), ("not found",)),
    ("infer-model-folder", lambda t, m, mp: (t / "m.onnx").mkdir() or _infer(t, str(t / "m.onnx")),
     ("is a folder", "not a model file")),
    ("infer-model-not-onnx", lambda t, m, mp: (t / "x.onnx").write_bytes(b"garbage") and _infer(t, str(t / "x.onnx")),
     ("cannot load",)),
    ("infer-model-unknown-suffix", lambda t, m, mp: (t / "x.bin").write_bytes(b"1") and _infer(t, str(t / "x.bin")),
     ("suffix", "--backend")),
    ("infer-tensorrt-on-onnx", lambda t, m, mp: _infer(t, m, "--backend", "tensorrt"),
     ("is an onnx model", "--backend onnxruntime")),
    ("infer-low-memory-on-engine", lambda t, m, mp: (t / "m.engine").write_bytes(b"1") and _infer(
        t, str(t / "m.engine"), "--low-memory"), ("--low-memory applies to ONNX Runtime", "tensorrt")),
    ("infer-low-memory-on-url", lambda t, m, mp: _infer(t, "http://127.0.0.1:9/frcnn", "--low-memory"),
     ("--low-memory applies to ONNX Runtime", "triton")),
    ("infer-batch-0", lambda t, m, mp: _infer(t, m, "--batch", "0"), ("--batch", ">= 1")),
    ("infer-batch-negative", lambda t, m, mp: _infer(t, m, "--batch", "-3"), ("--batch",)),
    ("infer-threshold-nan", lambda t, m, mp: _infer(t, m, "--score-threshold", "nan"), ("--score-threshold",)),
    ("infer-threshold-above-1", lambda t, m, mp: _infer(t, m, "--score-threshold", "1.5"), ("[0, 1]",)),
    # --- inputs
    ("infer-input-missing", lambda t, m, mp: _infer(t, m, inputs=[str(t / "nope.png")]), ("neither an image",)),
    ("infer-folder-without-images", lambda t, m, mp: (t / "e").mkdir() or _infer(t, m, inputs=[str(t / "e")]),
     ("holds no images",)),
    ("infer-broken-symlink", lambda t, m, mp: _infer(t, m, inputs=[broken_link_folder(t)]), ("symbolic link",)),
    ("infer-symlink-loop", lambda t, m, mp: _infer(t, m, inputs=[loop_folder(t)]), ("symbolic link",)),
    ("infer-duplicate-file", lambda t, m, mp: _infer(t, m, inputs=[str(png(t / "a.png"))] * 2), ("given twice",)),
    ("infer-file-and-its-folder", lambda t, m, mp: _infer(t, m, inputs=[str(image_folder(t)), str(t / "imgs/im0.png")]),
     ("given twice",)),
    ("infer-corrupt-image-position", lambda t, m, mp: _infer(t, m, inputs=[
        str(png(t / "a.png")), str(write(t / "b.png", b"not a png")), str(png(t / "c.png"))]),
     ("image 2 of 3", "b.png", "cannot read image")),
    ("infer-empty-file", lambda t, m, mp: _infer(t, m, inputs=[str(write(t / "z.jpg", b""))]), ("cannot read",)),
    ("infer-int32-mode", lambda t, m, mp: _infer(t, m, inputs=[save_array(t / "i.tif", np.full((9, 9), 7, np.int32))]),
     ("mode 'I'", "32-bit integer")),
    ("infer-float-mode", lambda t, m, mp: _infer(t, m, inputs=[save_array(t / "f.tif", np.full((9, 9), .5, np.float32))]),
     ("mode 'F'", "float")),
    ("infer-animated-gif", lambda t, m, mp: _infer(t, m, inputs=[str(gif(t / "a.gif"))]), ("3 frames",)),
    ("infer-huge-header", lambda t, m, mp: _infer(t, m, inputs=[str(huge_png_header(t / "h.png", 30000, 30000))]),
     ("30000x30000", "20000", "FRCNN_MAX_IMAGE_SIDE")),
    ("infer-over-lowered-limit", lambda t, m, mp: mp.setenv("FRCNN_MAX_IMAGE_SIDE", "32") or _infer(t, m),
     ("larger than the supported 32",)),
    ("infer-bad-limit-env", lambda t, m, mp: mp.setenv("FRCNN_MAX_IMAGE_SIDE", "lots") or _infer(t, m),
     ("FRCNN_MAX_IMAGE_SIDE", "positive whole number")),
    ("infer-only-image-truncated", lambda t, m, mp: _infer(t, m, inputs=[str(truncated_png(t / "t.png"))]),
     ("no image could be read", "truncated")),
    ("infer-non-utf8-name", lambda t, m, mp: _infer(t, m, inputs=[write_bytes_name(t, b"bad\xff.png", b"xx")]),
     ("bad\\xff.png",)),
    # --- output folder (checked before the model loads; the user's files are never replaced)
    ("infer-output-empty", lambda t, m, mp: _infer(t, m, out=" "), ("--output is empty",)),
    ("infer-output-is-file", lambda t, m, mp: _infer(t, m, out=str(write(t / "o.txt", b"keep"))),
     ("existing file", "not a folder")),
    ("infer-output-under-file", lambda t, m, mp: _infer(t, m, out=str(write(t / "f", b"x")) + "/sub/out"),
     ("is a file, not a folder", "cannot be created")),
    ("infer-output-is-input-folder", lambda t, m, mp: _infer(t, m, inputs=[str(image_folder(t))], out=str(t / "imgs")),
     ("is the input folder", "--output")),
    ("infer-output-clash-png", lambda t, m, mp: _with_user_file(t, "im0.png") and _infer(t, m),
     ("already holds im0.png", "not written by frcnn infer")),
    ("infer-output-clash-results", lambda t, m, mp: _with_user_file(t, "results.json") and _infer(t, m),
     ("results.json",)),
    ("infer-output-foreign-manifest", lambda t, m, mp: _with_user_file(t, ".frcnn-infer.json", b"{}") and _infer(t, m),
     (".frcnn-infer.json", "did not write")),
    ("infer-output-holds-input", lambda t, m, mp: _infer(t, m, inputs=[str(png(_with_user_file(t, "x") / "p.png"))]),
     ("would overwrite the input image",)),
    # --- frcnn bench
    ("bench-batch-0", lambda t, m, mp: ["bench", m, "--batch", "0", "--json", str(t / "b.json")], ("--batch",)),
    ("serve-low-memory-on-engine", lambda t, m, mp: (t / "s.engine").write_bytes(b"1") and [
        "serve", str(t / "s.engine"), "--low-memory"], ("--low-memory applies to ONNX Runtime", "s.engine")),
    ("bench-low-memory-second-model-engine", lambda t, m, mp: (t / "b.engine").write_bytes(b"1") and [
        "bench", m, str(t / "b.engine"), "--low-memory", "--json", str(t / "b.json")],
     ("--low-memory applies to ONNX Runtime", "b.engine")),
    ("bench-threads-negative", lambda t, m, mp: ["bench", m, "--threads", "-2", "--json", str(t / "b.json")],
     ("--threads",)),
    ("bench-json-is-folder", lambda t, m, mp: ["bench", m, "--json", str(t)], ("--json", "is a folder")),
    ("bench-json-foreign-file", lambda t, m, mp: ["bench", m, "--json", str(write(t / "b.json", b'{"a": 1}'))],
     ("--json", "not written by frcnn")),
    ("bench-plot-under-file", lambda t, m, mp: ["bench", m, "--json", str(t / "b.json"), "--plot",
                                                str(write(t / "f", b"x")) + "/p.png"], ("is a file",)),
    ("bench-json-equals-plot", lambda t, m, mp: ["bench", m, "--json", str(t / "b"), "--plot", str(t / "b")],
     ("same file",)),
    ("bench-size-over-limit", lambda t, m, mp: ["bench", m, "--size", "100000", "100000", "--json", str(t / "b")],
     ("--size", "FRCNN_MAX_IMAGE_SIDE")),
    ("bench-json-empty", lambda t, m, mp: ["bench", m, "--json", ""], ("--json is empty",)),
    ("bench-model-folder", lambda t, m, mp: ["bench", str(t), "--json", str(t / "b.json")], ("is a folder",)),
    # --- frcnn eval MODEL (deployed path)
    ("eval-batch-size-0", lambda t, m, mp: ["eval", m, "--data", str(t), "--batch-size", "0"], ("--batch-size",)),
    ("eval-model-suffix", lambda t, m, mp: ["eval", str(write(t / "m.txt", b"x")), "--data", str(t)],
     ("must end with",)),
    ("eval-output-is-file", lambda t, m, mp: ["eval", m, "--data", str(t), "--output", str(write(t / "o", b"x"))],
     ("existing file",)),
    # --- Detector API
    ("api-detector-folder", lambda t, m, mp: lambda: Detector(t), ("is a folder", "not a model file")),
    ("api-detector-none", lambda t, m, mp: lambda: Detector(None), ("path of an exported model",)),  # type: ignore[arg-type]
    ("api-max-batch-0", lambda t, m, mp: lambda: Detector(m, max_batch=0), ("max_batch",)),
    ("api-max-batch-float", lambda t, m, mp: lambda: Detector(m, max_batch=2.5), ("max_batch", "2.5")),
    ("api-max-batch-bool", lambda t, m, mp: lambda: Detector(m, max_batch=True), ("max_batch",)),
    ("api-max-batch-str", lambda t, m, mp: lambda: Detector(m, max_batch="4"), ("max_batch",)),
    ("api-input-format", lambda t, m, mp: lambda: Detector(m, input_format="BGRA"), ("input_format",)),
    ("api-tensorrt-on-onnx", lambda t, m, mp: lambda: Detector(m, backend="tensorrt"), ("is an onnx model",)),
    ("api-used-after-close", lambda t, m, mp: _closed(m), ("was closed", "create a new one")),
    ("api-nan-float-image", lambda t, m, mp: lambda: _detector(m)(np.full((8, 8, 3), np.nan, np.float32)),
     ("float32", "nan")),
    ("api-big-endian-uint16", lambda t, m, mp: lambda: _detector(m)(np.zeros((8, 8, 3), ">u2")), ("dtype >u2",)),
    ("api-zero-width", lambda t, m, mp: lambda: _detector(m)(np.zeros((8, 0, 3), np.uint8)), ("empty",)),
    ("api-bad-image-position", lambda t, m, mp: lambda: _detector(m)([np.zeros((8, 8, 3), np.uint8),
                                                                      np.zeros((8, 8, 4), np.uint8)]),
     ("image 1 (0-based", "4 channels")),
    ("api-bad-image-position-across-batches", lambda t, m, mp: lambda: Detector(m, max_batch=2)(
        [np.zeros((8, 8, 3), np.uint8)] * 4 + [np.zeros((8, 8), np.float64)]),
     ("image 4 (0-based position in the list of 5)", "float64")),
    ("api-channels-first", lambda t, m, mp: lambda: _detector(m)(np.zeros((3, 20, 30), np.uint8)), ("channels-first",)),
    ("api-batch-array", lambda t, m, mp: lambda: _detector(m)(np.zeros((2, 8, 8, 3), np.uint8)), ("list(batch)",)),
    ("api-not-array", lambda t, m, mp: lambda: _detector(m)("image.png"), ("numpy image",)),
    ("api-nested-list", lambda t, m, mp: lambda: _detector(m)([[1, 2, 3]]), ("numpy array",)),
    ("api-nonfinite-outputs", lambda t, m, mp: lambda: unpad(1, np.full((2, 4), np.inf, np.float32),
                                                            np.ones(2, np.float32), np.zeros(2, np.int32)),
     ("non-finite",)),
    # --- image reader API
    ("read-folder", lambda t, m, mp: lambda: read_image(t), ("is a folder",)),
    ("read-missing", lambda t, m, mp: lambda: read_image(t / "no.png"), ("does not exist",)),
    ("read-int32", lambda t, m, mp: call_later(read_image, save_array(t / "i.tif", np.zeros((4, 4), np.int32))), ("'I'",)),
    ("read-animated", lambda t, m, mp: call_later(read_image, gif(t / "a.gif", 2)), ("2 frames",)),
    ("read-corrupt", lambda t, m, mp: call_later(read_image, write(t / "c.png", b"\x89PNG\r\n\x1a\nxx")), ("cannot read",)),
    ("read-truncated", lambda t, m, mp: call_later(read_image, truncated_png(t / "t.png")), ("truncated",)),
    ("read-bad-format", lambda t, m, mp: call_later(read_image, png(t / "a.png"), "BGRA"), ("'BGRA'",)),
    ("dataset-corrupt-image-header", lambda t, m, mp: call_later(load_dataset, coco_dataset(t, b"junk")),
     ("1 of 2 images", "b.png", "cannot read image")),
    ("dataset-float-image", lambda t, m, mp: call_later(load_dataset, coco_dataset(t, np.zeros((20, 40), np.float32))),
     ("mode 'F'",)),
    ("read-huge-header", lambda t, m, mp: call_later(read_image, huge_png_header(t / "h.png", 20001, 10)),
     ("20001x10", "FRCNN_MAX_IMAGE_SIDE")),
]  # fmt: skip


def test_case_count() -> None:
    assert len(CASES) >= 45 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("builder", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused(builder: Builder, words: tuple[str, ...], model: str, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    case = tmp_path / "case"
    case.mkdir()
    action = builder(case, model, monkeypatch)
    before = snapshot(case)
    if callable(action):
        with pytest.raises(UserError) as info:
            action()
        message = str(info.value)
    else:
        assert main(action) == 2
        message = capsys.readouterr().err
    assert "Traceback" not in message
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in: {message}"
    assert snapshot(case) == before  # nothing written, nothing replaced, inputs byte-identical
