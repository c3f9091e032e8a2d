"""Bad inputs on the runtime side (issue 9): ``frcnn infer`` / ``bench`` / ``eval MODEL`` and the Detector /
image-reader API. Every case asserts: exit 2 (CLI, run in-process, stderr captured) or a ``UserError``
subclass (API); a message naming the problem (words asserted); no "Traceback"; and nothing left behind —
the whole case folder (hidden files included, every byte of every file: inputs unchanged) is compared
before and after. The positive tests below pin the documented conversions (16-bit, modes, exact decoding).
Uses the stand-in ONNX detector of test_runtime (no model export).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from frcnn.runtime import image_io, infer_cli
from frcnn.runtime.cli import main
from frcnn.runtime.detector import Detector
from frcnn.runtime.errors import UserError
from frcnn.runtime.image_io import read_image
from frcnn.runtime.postprocess import unpad
from PIL import Image
from test_runtime import make_fake_detector


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_fake_detector(tmp_path_factory.mktemp("badrt") / "fake.onnx")


def _png(path: Path, h: int = 40, w: int = 60, value: int = 120) -> Path:
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)
    return path


def _noise_png(path: Path, h: int = 64, w: int = 64) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _huge_png_header(path: Path, w: int, h: int) -> Path:
    """A PNG whose header says w x h (8-bit RGB) with a tiny IDAT: refused from the header, never decoded."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + _chunk(b"IEND", b""))  # fmt: skip
    return path


def _truncated_png(path: Path) -> Path:
    data = _noise_png(path).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _gif(path: Path, frames: int = 3) -> Path:
    images = [Image.fromarray(np.full((8, 8, 3), (40 * i, 0, 0), np.uint8)) for i in range(frames)]
    images[0].save(path, save_all=True, append_images=images[1:])
    return path


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(folder, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = "link:" + os.readlink(p)
            elif os.path.isdir(p):
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def _images(tmp: Path, n: int = 2) -> Path:
    folder = tmp / "imgs"
    folder.mkdir()
    for i in range(n):
        _png(folder / f"im{i}.png", value=60 + 40 * i)
    return folder


def _infer(tmp: Path, model: str, *extra: str, inputs: list[str] | None = None, out: str | None = None) -> list[str]:
    inputs = inputs if inputs is not None else [str(_images(tmp))]
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
    ("infer-batch-0", lambda t, m, mp: _infer(t, m, "--batch", "0"), ("--batch", ">= 1")),
    ("infer-batch-negative", lambda t, m, mp: _infer(t, m, "--batch", "-3"), ("--batch",)),
    ("infer-threshold-nan", lambda t, m, mp: _infer(t, m, "--score-threshold", "nan"), ("--score-threshold",)),
    ("infer-threshold-above-1", lambda t, m, mp: _infer(t, m, "--score-threshold", "1.5"), ("[0, 1]",)),
    # --- inputs
    ("infer-input-missing", lambda t, m, mp: _infer(t, m, inputs=[str(t / "nope.png")]), ("neither an image",)),
    ("infer-folder-without-images", lambda t, m, mp: (t / "e").mkdir() or _infer(t, m, inputs=[str(t / "e")]),
     ("holds no images",)),
    ("infer-broken-symlink", lambda t, m, mp: _infer(t, m, inputs=[_broken_link_folder(t)]), ("symbolic link",)),
    ("infer-symlink-loop", lambda t, m, mp: _infer(t, m, inputs=[_loop_folder(t)]), ("symbolic link",)),
    ("infer-duplicate-file", lambda t, m, mp: _infer(t, m, inputs=[str(_png(t / "a.png"))] * 2), ("given twice",)),
    ("infer-file-and-its-folder", lambda t, m, mp: _infer(t, m, inputs=[str(_images(t)), str(t / "imgs/im0.png")]),
     ("given twice",)),
    ("infer-corrupt-image-position", lambda t, m, mp: _infer(t, m, inputs=[
        str(_png(t / "a.png")), str(_write(t / "b.png", b"not a png")), str(_png(t / "c.png"))]),
     ("image 2 of 3", "b.png", "cannot read image")),
    ("infer-empty-file", lambda t, m, mp: _infer(t, m, inputs=[str(_write(t / "z.jpg", b""))]), ("cannot read",)),
    ("infer-int32-mode", lambda t, m, mp: _infer(t, m, inputs=[_save(t / "i.tif", np.full((9, 9), 7, np.int32))]),
     ("mode 'I'", "32-bit integer")),
    ("infer-float-mode", lambda t, m, mp: _infer(t, m, inputs=[_save(t / "f.tif", np.full((9, 9), .5, np.float32))]),
     ("mode 'F'", "float")),
    ("infer-animated-gif", lambda t, m, mp: _infer(t, m, inputs=[str(_gif(t / "a.gif"))]), ("3 frames",)),
    ("infer-huge-header", lambda t, m, mp: _infer(t, m, inputs=[str(_huge_png_header(t / "h.png", 30000, 30000))]),
     ("30000x30000", "20000", "FRCNN_MAX_IMAGE_SIDE")),
    ("infer-over-lowered-limit", lambda t, m, mp: mp.setenv("FRCNN_MAX_IMAGE_SIDE", "32") or _infer(t, m),
     ("larger than the supported 32",)),
    ("infer-bad-limit-env", lambda t, m, mp: mp.setenv("FRCNN_MAX_IMAGE_SIDE", "lots") or _infer(t, m),
     ("FRCNN_MAX_IMAGE_SIDE", "positive whole number")),
    ("infer-only-image-truncated", lambda t, m, mp: _infer(t, m, inputs=[str(_truncated_png(t / "t.png"))]),
     ("no image could be read", "truncated")),
    ("infer-non-utf8-name", lambda t, m, mp: _infer(t, m, inputs=[_write_bytes_name(t, b"bad\xff.png", b"xx")]),
     ("bad\\xff.png",)),
    # --- output folder (checked before the model loads; the user's files are never replaced)
    ("infer-output-is-file", lambda t, m, mp: _infer(t, m, out=str(_write(t / "o.txt", b"keep"))),
     ("existing file", "not a folder")),
    ("infer-output-under-file", lambda t, m, mp: _infer(t, m, out=str(_write(t / "f", b"x")) + "/sub/out"),
     ("is a file, not a folder", "cannot be created")),
    ("infer-output-is-input-folder", lambda t, m, mp: _infer(t, m, inputs=[str(_images(t))], out=str(t / "imgs")),
     ("is the input folder", "--output")),
    ("infer-output-clash-png", lambda t, m, mp: _with_user_file(t, "im0.png") and _infer(t, m),
     ("already holds im0.png", "not written by frcnn infer")),
    ("infer-output-clash-results", lambda t, m, mp: _with_user_file(t, "results.json") and _infer(t, m),
     ("results.json",)),
    ("infer-output-foreign-manifest", lambda t, m, mp: _with_user_file(t, ".frcnn-infer.json", b"{}") and _infer(t, m),
     (".frcnn-infer.json", "did not write")),
    ("infer-output-holds-input", lambda t, m, mp: _infer(t, m, inputs=[str(_png(_with_user_file(t, "x") / "p.png"))]),
     ("would overwrite the input image",)),
    # --- frcnn bench
    ("bench-batch-0", lambda t, m, mp: ["bench", m, "--batch", "0", "--json", str(t / "b.json")], ("--batch",)),
    ("bench-threads-negative", lambda t, m, mp: ["bench", m, "--threads", "-2", "--json", str(t / "b.json")],
     ("--threads",)),
    ("bench-json-is-folder", lambda t, m, mp: ["bench", m, "--json", str(t)], ("--json", "is a folder")),
    ("bench-json-foreign-file", lambda t, m, mp: ["bench", m, "--json", str(_write(t / "b.json", b'{"a": 1}'))],
     ("--json", "not written by frcnn")),
    ("bench-plot-under-file", lambda t, m, mp: ["bench", m, "--json", str(t / "b.json"), "--plot",
                                                str(_write(t / "f", b"x")) + "/p.png"], ("is a file",)),
    ("bench-json-equals-plot", lambda t, m, mp: ["bench", m, "--json", str(t / "b"), "--plot", str(t / "b")],
     ("same file",)),
    ("bench-size-over-limit", lambda t, m, mp: ["bench", m, "--size", "100000", "100000", "--json", str(t / "b")],
     ("--size", "FRCNN_MAX_IMAGE_SIDE")),
    ("bench-model-folder", lambda t, m, mp: ["bench", str(t), "--json", str(t / "b.json")], ("is a folder",)),
    # --- frcnn eval MODEL (deployed path)
    ("eval-batch-size-0", lambda t, m, mp: ["eval", m, "--data", str(t), "--batch-size", "0"], ("--batch-size",)),
    ("eval-model-suffix", lambda t, m, mp: ["eval", str(_write(t / "m.txt", b"x")), "--data", str(t)],
     ("must end with",)),
    ("eval-output-is-file", lambda t, m, mp: ["eval", m, "--data", str(t), "--output", str(_write(t / "o", b"x"))],
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
    ("read-int32", lambda t, m, mp: _call(read_image, _save(t / "i.tif", np.zeros((4, 4), np.int32))), ("'I'",)),
    ("read-animated", lambda t, m, mp: _call(read_image, _gif(t / "a.gif", 2)), ("2 frames",)),
    ("read-corrupt", lambda t, m, mp: _call(read_image, _write(t / "c.png", b"\x89PNG\r\n\x1a\nxx")), ("cannot read",)),
    ("read-truncated", lambda t, m, mp: _call(read_image, _truncated_png(t / "t.png")), ("truncated",)),
    ("read-bad-format", lambda t, m, mp: _call(read_image, _png(t / "a.png"), "BGRA"), ("'BGRA'",)),
    ("dataset-corrupt-image-header", lambda t, m, mp: _call(_load_dataset, _dataset(t, b"junk")),
     ("1 of 2 images", "b.png", "cannot read image")),
    ("dataset-float-image", lambda t, m, mp: _call(_load_dataset, _dataset(t, np.zeros((20, 40), np.float32))),
     ("mode 'F'",)),
    ("read-huge-header", lambda t, m, mp: _call(read_image, _huge_png_header(t / "h.png", 20001, 10)),
     ("20001x10", "FRCNN_MAX_IMAGE_SIDE")),
]  # fmt: skip


def _call(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """``fn(*args)`` later; the arguments (files) are made now, before the snapshot."""
    return lambda: fn(*args)


def _dataset(tmp: Path, second: bytes | np.ndarray) -> Path:
    """A 2-image COCO dataset whose second image file is ``second`` (bytes, or an array saved as TIFF data)."""
    (tmp / "imgs").mkdir()
    _png(tmp / "imgs" / "a.png", 20, 40)
    if isinstance(second, bytes):
        _write(tmp / "imgs" / "b.png", second)
    else:
        Image.fromarray(second).save(tmp / "imgs" / "b.png", format="TIFF")
    images = [{"id": i + 1, "file_name": n, "width": 40, "height": 20} for i, n in enumerate(["a.png", "b.png"])]
    anns = [{"id": i + 1, "image_id": i + 1, "bbox": [2, 2, 10, 10], "category_id": 1, "iscrowd": 0} for i in range(2)]
    data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "box"}]}
    _write(tmp / "train.json", json.dumps(data).encode())
    return tmp


def _load_dataset(root: Path) -> Any:
    from frcnn.trainer.data.coco import load_coco_json

    return load_coco_json(root / "train.json", root / "imgs")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _save(path: Path, array: np.ndarray) -> str:
    Image.fromarray(array).save(path)
    return str(path)


def _write_bytes_name(tmp: Path, name: bytes, data: bytes) -> str:
    path = os.path.join(os.fsencode(tmp), name)
    with open(path, "wb") as f:
        f.write(data)
    return os.fsdecode(path)


def _broken_link_folder(tmp: Path) -> str:
    folder = _images(tmp)
    (folder / "gone.png").symlink_to(tmp / "does-not-exist.png")
    return str(folder)


def _loop_folder(tmp: Path) -> str:
    folder = _images(tmp)
    (folder / "loop.png").symlink_to(folder / "loop.png")
    return str(folder)


def test_case_count() -> None:
    assert len(CASES) >= 45 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("builder", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused(builder: Builder, words: tuple[str, ...], model: str, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    case = tmp_path / "case"
    case.mkdir()
    action = builder(case, model, monkeypatch)
    before = _snapshot(case)
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
    assert _snapshot(case) == before  # nothing written, nothing replaced, inputs byte-identical


# ---------------------------------------------------------------- documented conversions (item 1, 2)


def test_png16_reproduction_is_scaled_not_white(model: str, tmp_path: Path) -> None:
    a = np.arange(256 * 256, dtype=np.uint16).reshape(256, 256) * 3  # issue 9, item 1, verbatim
    Image.fromarray(a).save(tmp_path / "png16.png")
    ref = np.floor(a.astype(np.float64) / 257 + 0.5).astype(np.uint8)  # round(v / 257)
    rgb = read_image(tmp_path / "png16.png")
    assert rgb.dtype == np.uint8 and rgb.shape == (256, 256, 3)
    np.testing.assert_array_equal(rgb, np.repeat(ref[:, :, None], 3, axis=2))
    assert rgb.min() == 0 and rgb.max() == 255 and 100 < rgb.mean() < 160  # not all-white
    from frcnn.trainer.data.mapper import read_image as trainer_read

    np.testing.assert_array_equal(trainer_read(str(tmp_path / "png16.png")), rgb)  # the trainer reads the same
    assert main(["infer", model, str(tmp_path / "png16.png"), "--output", str(tmp_path / "out")]) == 0
    with Image.open(tmp_path / "out" / "png16.png") as drawn:
        assert np.asarray(drawn.convert("RGB")).mean() < 200


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGBA", "CMYK", "YCbCr", "I;16"])
def test_modes_follow_the_documented_table(mode: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    if mode == "I;16":
        values = rng.integers(0, 65536, (12, 10), dtype=np.uint16)
        image = Image.fromarray(values)  # mode I;16
        expected = np.repeat(np.floor(values / 257 + 0.5).astype(np.uint8)[:, :, None], 3, axis=2)
        path = tmp_path / "x.tif"
    else:
        image = rgb.convert(mode) if mode not in ("P", "PA") else rgb.convert("RGB").quantize(16)
        if mode == "PA":
            image = image.convert("PA")
        path = tmp_path / ("x.tif" if mode in ("CMYK", "YCbCr", "PA") else "x.png")
        expected = None
    if mode == "YCbCr":
        path = tmp_path / "x.jpg"
    image.save(path)
    got = read_image(path)
    with Image.open(path) as f:
        if expected is None:  # alpha dropped, colours as stored: Pillow's convert("RGB")
            expected = np.asarray(f.convert("RGB"))
    assert got.dtype == np.uint8 and got.shape == (12, 10, 3) and got.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(got, expected)
    if mode == "RGBA":
        np.testing.assert_array_equal(got, np.asarray(image)[:, :, :3])  # alpha dropped, not composited


def test_exif_on_16_bit_and_mpo_first_frame(tmp_path: Path) -> None:
    a = np.arange(6, dtype=np.uint16).reshape(2, 3) * 10000
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(a).save(tmp_path / "e16.png", exif=exif)
    expected = np.floor(np.rot90(a, -1) / 257 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(read_image(tmp_path / "e16.png")[:, :, 1], expected)
    photo = np.random.default_rng(4).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "p.jpg", format="MPO", save_all=True,
                                append_images=[Image.new("RGB", (16, 16), "white")])  # fmt: skip
    with Image.open(tmp_path / "p.jpg") as f:
        assert f.format == "MPO" and f.n_frames == 2
        first = np.asarray(f.convert("RGB"))
    np.testing.assert_array_equal(read_image(tmp_path / "p.jpg"), first)


def test_normal_images_are_decoded_in_full_not_drafted(tmp_path: Path) -> None:
    """Exactness: a large JPEG is decoded at full resolution (no Image.draft), bit-identical to plain Pillow."""
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (1600, 2400, 3), dtype=np.uint8)).save(tmp_path / "big.jpg", quality=90)
    with Image.open(tmp_path / "big.jpg") as f:
        ref = np.asarray(f.convert("RGB"))
    np.testing.assert_array_equal(read_image(tmp_path / "big.jpg"), ref)
    np.testing.assert_array_equal(read_image(tmp_path / "big.jpg", "BGR"), ref[:, :, ::-1])


def test_pillow_bomb_limit_is_replaced_by_ours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's limit (~179 MP) no longer refuses what ours allows; Pillow's global is left as it was."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64x64 = 4096 > 2 * 100: Pillow alone would refuse
    _noise_png(tmp_path / "n.png")
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "n.png")
    assert read_image(tmp_path / "n.png").shape == (64, 64, 3)
    assert Image.MAX_IMAGE_PIXELS == 100
    monkeypatch.setenv("FRCNN_MAX_IMAGE_SIDE", "64")
    assert image_io.probe_image(tmp_path / "n.png") == (64, 64)  # the limit is inclusive


# ---------------------------------------------------------------- frcnn infer output policy (items 2, 3, 10)


def test_rerun_replaces_only_its_own_files(model: str, tmp_path: Path) -> None:
    images, out = _images(tmp_path), tmp_path / "out"
    assert main(["infer", model, str(images), "--output", str(out)]) == 0
    (out / "notes.txt").write_text("user")
    first = (out / "results.json").read_bytes()
    assert main(["infer", model, str(images), "--output", str(out), "--score-threshold", "0"]) == 0
    assert (out / "notes.txt").read_text() == "user" and (out / "results.json").read_bytes() != first
    manifest = json.loads((out / ".frcnn-infer.json").read_text())
    assert manifest["files"] == ["im0.png", "im1.png", "results.json"]
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_undecodable_image_is_skipped_and_reported(model: str, tmp_path: Path, capsys: Any) -> None:
    images = _images(tmp_path, 1)
    _truncated_png(images / "z_broken.png")
    assert main(["infer", model, str(images), "--output", str(tmp_path / "out"), "--score-threshold", "0"]) == 2
    err = capsys.readouterr().err
    assert "image 2 of 2" in err and "z_broken.png" in err and "Traceback" not in err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results and {r["image_id"] for r in results} == {1}
    assert sorted(os.listdir(tmp_path / "out")) == [".frcnn-infer.json", "im0.png", "results.json"]


def _fail_on_second(exc: BaseException) -> Callable[..., None]:
    calls = []
    original = infer_cli._atomic_save

    def save(image: Image.Image, path: str) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise exc
        original(image, path)

    return save


@pytest.mark.parametrize("exc, code, words", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), 2, ("no space left", "were removed")),
    (KeyboardInterrupt(), 130, ("interrupted", "removed")),
])  # fmt: skip
def test_failure_mid_run_leaves_nothing(model: str, tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch,
                                        exc: BaseException, code: int, words: tuple[str, ...]) -> None:  # fmt: skip
    """A full disk (the 2nd write fails with ENOSPC) or Ctrl-C: one message, the 1st PNG and the folder removed."""
    images = _images(tmp_path, 3)
    before = _snapshot(tmp_path)
    monkeypatch.setattr(infer_cli, "_atomic_save", _fail_on_second(exc))
    assert main(["infer", model, str(images), "--output", str(tmp_path / "new" / "out")]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(w in err.lower() for w in words)
    assert _snapshot(tmp_path) == before


def test_read_only_output_folder(model: str, tmp_path: Path, capsys: Any) -> None:
    """chmod a-w: refused up front for a normal user. Root ignores permission bits (it really can write there),
    so as root the run succeeds; read-only file systems are refused by the same os.access check."""
    images, ro = _images(tmp_path, 1), tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code = main(["infer", model, str(images), "--output", str(ro / "out")])
        if os.geteuid() == 0:
            assert code == 0
        else:
            assert code == 2 and "cannot write into the folder" in capsys.readouterr().err
            assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


# ---------------------------------------------------------------- arrays handled correctly (item 5)


def test_odd_but_valid_arrays_match_the_plain_image(model: str) -> None:
    det = _detector(model)
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    ref = det(img)
    readonly = img.copy()
    readonly.flags.writeable = False
    padded = np.zeros((50, 140, 3), np.uint8)
    padded[:, ::2] = img
    for variant in (readonly, padded[:, ::2], np.asfortranarray(img)):
        got = det(variant)
        np.testing.assert_array_equal(got.boxes, ref.boxes)
        np.testing.assert_array_equal(got.scores, ref.scores)
    one = det(np.full((1, 1, 3), 200, np.uint8))  # 1x1 works: boxes are inside the 1x1 image
    assert len(one) > 0 and float(one.boxes.max()) <= 1.0
    gray = det(img[:, :, 0])
    np.testing.assert_array_equal(gray.scores, det(np.repeat(img[:, :, :1], 3, axis=2)).scores)
    det.close()
    det.close()  # closing twice is harmless


def test_real_sigint_mid_run_subprocess(model: str, tmp_path: Path) -> None:
    """A real SIGINT (sent by the process to itself while writing its 2nd PNG): exit 130, one line, no
    traceback, no output folder and no temp file left."""
    import subprocess
    import sys

    images = _images(tmp_path, 3)
    before = _snapshot(tmp_path)
    code = ("import os, signal, sys\nfrom frcnn.runtime import infer_cli\nfrom frcnn.runtime.cli import main\n"
            "orig, calls = infer_cli._atomic_save, []\n"
            "def save(image, path):\n    calls.append(path)\n    orig(image, path)\n"
            "    if len(calls) == 2:\n        os.kill(os.getpid(), signal.SIGINT)\n"
            "infer_cli._atomic_save = save\n"
            f"sys.exit(main(['infer', {model!r}, {str(images)!r}, '--output', {str(tmp_path / 'out')!r}]))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 130, res.stderr
    assert "Traceback" not in res.stderr and "interrupted" in res.stderr
    assert _snapshot(tmp_path) == before
