"""``frcnn infer``'s output policy (docs/runtime.md): re-runs replace only its own files, an undecodable image
is skipped and reported, a full disk / Ctrl-C / real SIGINT mid-run leave nothing behind, read-only output;
and odd but valid arrays give the plain image's results."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bad_input_utils import fake_model_file, image_folder, snapshot, truncated_png
from frcnn.runtime import infer_cli
from frcnn.runtime.cli import main
from frcnn.runtime.detector import Detector
from PIL import Image


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return fake_model_file(tmp_path_factory)


def test_rerun_replaces_only_its_own_files(model: str, tmp_path: Path) -> None:
    images, out = image_folder(tmp_path), tmp_path / "out"
    assert main(["infer", model, str(images), "--output", str(out)]) == 0
    (out / "notes.txt").write_text("user")
    first = (out / "results.json").read_bytes()
    assert main(["infer", model, str(images), "--output", str(out), "--score-threshold", "0"]) == 0
    assert (out / "notes.txt").read_text() == "user" and (out / "results.json").read_bytes() != first
    manifest = json.loads((out / ".frcnn-infer.json").read_text())
    assert manifest["files"] == ["im0.png", "im1.png", "results.json"]
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_undecodable_image_is_skipped_and_reported(model: str, tmp_path: Path, capsys: Any) -> None:
    images = image_folder(tmp_path, 1)
    truncated_png(images / "z_broken.png")
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
    images = image_folder(tmp_path, 3)
    before = snapshot(tmp_path)
    monkeypatch.setattr(infer_cli, "_atomic_save", _fail_on_second(exc))
    assert main(["infer", model, str(images), "--output", str(tmp_path / "new" / "out")]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(w in err.lower() for w in words)
    assert snapshot(tmp_path) == before


def test_read_only_output_folder(model: str, tmp_path: Path, capsys: Any) -> None:
    """chmod a-w: refused up front for a normal user. Root ignores permission bits (it really can write there),
    so as root the run succeeds; read-only file systems are refused by the same os.access check."""
    images, ro = image_folder(tmp_path, 1), tmp_path / "ro"
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
    det = Detector(model, providers=["cpu"])
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

    images = image_folder(tmp_path, 3)
    before = snapshot(tmp_path)
    code = ("import os, signal, sys\nfrom frcnn.runtime import infer_cli\nfrom frcnn.runtime.cli import main\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"  # as in a terminal, even if inherited ignored
            "orig, calls = infer_cli._atomic_save, []\n"
            "def save(image, path):\n    calls.append(path)\n    orig(image, path)\n"
            "    if len(calls) == 2:\n        os.kill(os.getpid(), signal.SIGINT)\n"
            "infer_cli._atomic_save = save\n"
            f"sys.exit(main(['infer', {model!r}, {str(images)!r}, '--output', {str(tmp_path / 'out')!r}]))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 130, res.stderr
    assert "Traceback" not in res.stderr and "interrupted" in res.stderr
    assert snapshot(tmp_path) == before
