"""The README's main job (`frcnn demo`) runs end to end, on a tiny setting: every step is a user command."""

from __future__ import annotations

import json

import pytest
from frcnn.runtime.cli import main as frcnn_main


@pytest.mark.slow
@pytest.mark.parametrize("mask", [False, True], ids=["boxes", "mask"])
def test_demo_runs_every_step(tmp_path, capsys, mask: bool):
    out = tmp_path / "demo"
    rc = frcnn_main(["demo", "--output", str(out), "--iters", "6", "--images", "12", *(["--mask"] if mask else [])])
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
    assert ("segm/AP50" in deployed["metrics"]) == mask
    assert ("masks " in printed.out) == mask  # parity's masks row
    if mask:
        import onnx

        assert [o.name for o in onnx.load(str(out / "model.onnx")).graph.output][-1] == "masks"
        assert all("segmentation" in r for r in results)


def test_demo_config_fits_its_dataset(tmp_path):
    """The demo trains at the size it synthesizes (no resize) and its smallest anchor fits its smallest shape."""
    from frcnn.export.demo_cli import DEMO_CONFIG, DEMO_ITERS, DEMO_MASK_CONFIG, DEMO_SYNTH, demo_steps
    from frcnn.trainer.train_cli import build_config

    synth = dict(zip(DEMO_SYNTH[::2], DEMO_SYNTH[1::2]))
    size, min_side = int(synth["--size"]), int(synth["--min-side"])
    steps = demo_steps(tmp_path, iters=DEMO_ITERS, images=300)
    train_argv = steps[1][2]
    assert train_argv[train_argv.index("--config") + 1] == DEMO_CONFIG
    overrides = train_argv[train_argv.index(str(tmp_path / "train")) + 1 :]
    cfg = build_config(DEMO_CONFIG, overrides)
    assert cfg.INPUT.MIN_SIZE_TRAIN == (size,) and cfg.INPUT.MIN_SIZE_TEST == size
    assert size <= cfg.INPUT.MAX_SIZE_TEST and size <= cfg.INPUT.MAX_SIZE_TRAIN
    # the demo's command line reproduces the packaged schedule
    packaged = build_config(DEMO_CONFIG, [])
    assert (
        (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS)
        == (packaged.SOLVER.MAX_ITER, packaged.SOLVER.STEPS, packaged.SOLVER.WARMUP_ITERS)
        == (DEMO_ITERS, (560,), 100)
    )
    # the mask variant is the same model, data and schedule plus the mask head
    mask_argv = demo_steps(tmp_path, iters=DEMO_ITERS, images=300, mask=True)[1][2]
    assert mask_argv[mask_argv.index("--config") + 1] == DEMO_MASK_CONFIG
    masked = build_config(DEMO_MASK_CONFIG, overrides)
    assert masked.MODEL.MASK_ON and masked.INPUT.MASK_FORMAT == "bitmask"
    masked.merge_from_list(["MODEL.MASK_ON", "False", "INPUT.MASK_FORMAT", cfg.INPUT.MASK_FORMAT,
                            "MODEL.ROI_MASK_HEAD.CONV_DIM", cfg.MODEL.ROI_MASK_HEAD.CONV_DIM])
    assert masked.dump() == cfg.dump()
    # no shape is smaller than the smallest anchor: with detectron2's default 32 px anchors a concentric
    # 16 px square has IoU (16 / 32) ** 2 = 0.25 < 0.3, a negative for the RPN
    assert cfg.MODEL.ANCHOR_GENERATOR.SIZES[0][0] <= min_side
