"""CLI: ``frcnn infer`` / ``bench`` (fast, on the stand-in ONNX of test_runtime), the polygraphy scripts, and
``frcnn parity`` / ``frcnn eval MODEL`` on a real exported model (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from frcnn.runtime.cli import main
from PIL import Image
from test_runtime import FRACS, NAMES, exported_small, make_fake_detector  # noqa: F401 - fixture

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fake_model(tmp_path_factory):
    return make_fake_detector(tmp_path_factory.mktemp("fakecli") / "fake.onnx")


def _write_image(path, h, w, value=150):
    rgb = np.full((h, w, 3), value, np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


def test_infer_writes_drawn_png_and_coco_json(fake_model, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    rgb = _write_image(images / "a.png", 120, 180)
    _write_image(images / "b.jpg", 90, 60, value=200)
    out = tmp_path / "out"
    assert main(["infer", fake_model, str(images), "--output", str(out), "--score-threshold", "0.3",
                 "--batch", "2"]) == 0
    with Image.open(out / "a.png") as png:
        assert png.format == "PNG" and png.size == (180, 120)
        drawn = np.asarray(png.convert("RGB"))
    changed = np.any(drawn != rgb, axis=2)
    assert changed.sum() > 500  # boxes and label backgrounds
    x1, y1 = int(FRACS[0, 0] * 180), int(FRACS[0, 1] * 120)  # top-left corner of the best box is drawn
    assert changed[y1 + 1, x1 + 5]
    results = json.loads((out / "results.json").read_text())
    first = [r for r in results if r["image_id"] == 1]
    assert first and all(r["score"] >= 0.3 for r in results)
    assert first[0]["category_id"] == 1 and first[0]["category_name"] == NAMES[0]
    np.testing.assert_allclose(first[0]["bbox"], [FRACS[0, 0] * 180, FRACS[0, 1] * 120,
                                                  (FRACS[0, 2] - FRACS[0, 0]) * 180,
                                                  (FRACS[0, 3] - FRACS[0, 1]) * 120], rtol=1e-4)  # fmt: skip
    assert {r["image_id"] for r in results} == {1, 2}
    assert "wrote" in capsys.readouterr().out


def test_infer_bad_inputs(fake_model, tmp_path, capsys):
    assert main(["infer", fake_model, str(tmp_path / "nope.png"), "--output", str(tmp_path / "o")]) == 2
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert main(["infer", fake_model, str(tmp_path / "broken.png"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "neither an image file nor a folder" in err and "cannot read image" in err


def test_bench_json_and_plot(fake_model, tmp_path, capsys):
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    assert main(["bench", fake_model, "--size", "48", "80", "--iters", "4", "--warmup", "1", "--batch", "2",
                 "--json", str(out), "--plot", str(plot)]) == 0
    result = json.loads(out.read_text())
    assert result["batch"] == 2 and result["iters"] == 4 and len(result["raw_seconds"]["inference"]) == 4
    lat = result["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    assert abs(sum(s["share"] for s in result["stages"].values()) - 1) < 1e-6
    with Image.open(plot) as png:
        assert png.format == "PNG" and png.size[0] > 100
    assert "pre + post" in capsys.readouterr().out


def test_polygraphy_scripts(fake_model, tmp_path, monkeypatch):
    from frcnn.export import polygraphy_compare, polygraphy_data_loader
    from frcnn.runtime.backends import create_backend
    from polygraphy.comparator.struct import IterationResult

    _write_image(tmp_path / "x.png", 50, 70)
    monkeypatch.setenv("FRCNN_IMAGES", str(tmp_path))
    monkeypatch.setenv("FRCNN_MODEL", fake_model)
    (feed,) = list(polygraphy_data_loader.load_data())
    assert feed["images"].dtype == np.uint8 and feed["images"].shape == (1, 3, 96, 96)
    np.testing.assert_array_equal(feed["image_sizes"], [[64, 90]])  # 70 * 64 / 50 = 89.6 -> 90; short edge 64 from the model metadata
    with create_backend(fake_model, providers=["cpu"]) as backend:
        out = backend.infer(feed)
    same = polygraphy_compare.compare_outputs(IterationResult(out, 0.0, "a"), IterationResult(out, 0.0, "b"))
    assert all(same.values())
    moved = dict(out, boxes=out["boxes"] + 5.0)
    diff = polygraphy_compare.compare_outputs(IterationResult(out, 0.0, "a"), IterationResult(moved, 0.0, "b"))
    assert diff["num_detections"] and not diff["detections"]


@pytest.mark.slow
def test_parity_and_eval_on_exported_model(exported_small, tmp_path):  # noqa: F811 - imported fixture
    """`frcnn parity` PyTorch vs ORT with every detection matched; `frcnn eval MODEL --weights` AP delta."""
    onnx_path, _cfg, _ = exported_small
    folder = os.path.dirname(onnx_path)
    from frcnn.trainer.data.synth import synthesize_dataset

    synthesize_dataset(tmp_path / "data", num_images=5, size=160, num_classes=3, val_fraction=0.6, workers=1)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    parity = subprocess.run([sys.executable, "-m", "frcnn.runtime.cli", "parity", os.path.join(folder, "model.pth"),
                             onnx_path, "--images", str(tmp_path / "data" / "val")],
                            check=False, capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert parity.returncode == 0, parity.stdout + parity.stderr
    assert "PARITY PASSED" in parity.stdout and " FAIL" not in parity.stdout
    res = subprocess.run([sys.executable, "-m", "frcnn.runtime.cli", "eval", onnx_path, "--data",
                          str(tmp_path / "data"), "--weights", os.path.join(folder, "model.pth"), "--config",
                          os.path.join(folder, "config.yaml"), "--output", str(tmp_path / "eval")],
                         check=False, capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert abs(metrics["delta_AP"]) <= 0.05 and "delta" in res.stdout


def test_infer_low_memory_gives_the_same_results(exported_small, tmp_path, monkeypatch):  # noqa: F811
    """`frcnn infer --low-memory`: the pre-optimised graph from the cache ($FRCNN_CACHE_DIR/ort), the same
    results.json as the default session."""
    onnx_path, _cfg, _ = exported_small
    monkeypatch.setenv("FRCNN_CACHE_DIR", str(tmp_path / "cache"))
    images = tmp_path / "images"
    images.mkdir()
    for k, (h, w) in enumerate([(120, 180), (90, 60)]):
        _write_image(images / f"{k}.png", h, w, value=60 + 90 * k)
    results = []
    for name, extra in (("plain", []), ("low", ["--low-memory"])):
        assert main(["infer", str(onnx_path), str(images), "--output", str(tmp_path / name),
                     "--score-threshold", "0.05", *extra]) == 0
        results.append(json.loads((tmp_path / name / "results.json").read_text()))
    assert results[0] and results[0] == results[1]
    assert len(list((tmp_path / "cache" / "ort").glob("*.onnx"))) == 1
