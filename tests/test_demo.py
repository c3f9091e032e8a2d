"""The README's main job (`frcnn demo`) runs end to end, on a tiny setting: every step is a user command."""

from __future__ import annotations

import json

import pytest
from frcnn.runtime.cli import main as frcnn_main


@pytest.mark.slow
def test_demo_runs_every_step(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = frcnn_main(["demo", "--output", str(out), "--iters", "6", "--images", "12"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err[-3000:]
    assert printed.out.count("=== [") == 7 and "demo summary" in printed.out
    assert (out / "train" / "model_final.pth").is_file()
    assert (out / "model.onnx").is_file()
    results = json.loads((out / "infer" / "results.json").read_text())
    assert isinstance(results, list)
    assert list((out / "infer").glob("*.png")), "no drawn PNG"
    deployed = json.loads((out / "eval-onnx" / "metrics.json").read_text())
    assert "AP50" in deployed["metrics"]
