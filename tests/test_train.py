"""Training: solver (param groups, LR schedule, clipping), the loop's checks, `frcnn train` / `frcnn eval`
end to end on a tiny synthetic set, and bad-input handling."""

from __future__ import annotations

import bisect
import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from frcnn.runtime.cli import main as frcnn_main
from frcnn.trainer.config import get_cfg
from frcnn.trainer.data import synthesize_dataset
from frcnn.trainer.engine import (
    NonFiniteLossError,
    PeriodicCheckpointer,
    Trainer,
    batch_to_inputs,
    build_lr_scheduler,
    build_optimizer,
    clip_gradients,
)
from torch import nn

# small config, small images: a few seconds per run on a 2-core CPU
TINY = ["INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "160", "INPUT.MIN_SIZE_TEST", "128",
        "INPUT.MAX_SIZE_TEST", "160", "SOLVER.IMS_PER_BATCH", "2", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "200",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64", "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu",
        "SEED", "3"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "ds"
    synthesize_dataset(root, num_images=10, size=128, num_classes=3, seed=0)
    return root


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ solver
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.norm = nn.GroupNorm(1, 2)
        self.fc = nn.Linear(2, 1, bias=False)
        self.frozen = nn.Linear(1, 1)
        self.frozen.requires_grad_(False)


def _solver_cfg(**solver):
    cfg = get_cfg()
    for k, v in solver.items():
        setattr(cfg.SOLVER, k, v)
    return cfg


def test_param_groups_follow_detectron2_rules():
    net = _Net()
    cfg = _solver_cfg(BASE_LR=0.1, WEIGHT_DECAY=1e-4, WEIGHT_DECAY_NORM=0.0, BIAS_LR_FACTOR=2.0,
                      WEIGHT_DECAY_BIAS=5e-5)  # fmt: skip
    opt = build_optimizer(cfg, net)
    got = {(g["lr"], g["weight_decay"]): {id(p) for p in g["params"]} for g in opt.param_groups}
    expected = {
        (0.1, 1e-4): {id(net.conv.weight), id(net.fc.weight)},
        (0.2, 5e-5): {id(net.conv.bias), id(net.norm.bias)},  # bias rule wins over the norm rule
        (0.1, 0.0): {id(net.norm.weight)},
    }
    assert got == expected
    assert opt.defaults["momentum"] == cfg.SOLVER.MOMENTUM


def _reference_lr(i: int, base: float, steps, gamma: float, warmup_iters: int, factor: float, method: str):
    """detectron2's legacy WarmupMultiStepLR formula (independent of the LRMultiplier arithmetic)."""
    warm = 1.0
    if i < warmup_iters:
        warm = factor if method == "constant" else factor * (1 - i / warmup_iters) + i / warmup_iters
    return base * warm * gamma ** bisect.bisect_right(steps, i)


@pytest.mark.parametrize("method", ["linear", "constant"])
def test_lr_schedule_matches_reference_and_resumes(method):
    cfg = _solver_cfg(BASE_LR=0.02, MAX_ITER=50, STEPS=(20, 35), GAMMA=0.1, WARMUP_ITERS=10,
                      WARMUP_FACTOR=0.001, WARMUP_METHOD=method, BIAS_LR_FACTOR=2.0)  # fmt: skip
    net = nn.Linear(2, 2)
    opt = build_optimizer(cfg, net)
    sched = build_lr_scheduler(cfg, opt)
    lrs = []
    for i in range(50):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
        if i == 24:
            saved = (opt.state_dict(), sched.state_dict())
    for i, (lr_w, lr_b) in enumerate(lrs):
        assert lr_w == pytest.approx(_reference_lr(i, 0.02, [20, 35], 0.1, 10, 0.001, method), rel=1e-9, abs=1e-15)
        assert lr_b == pytest.approx(2 * lr_w, rel=1e-12)
    # a fresh optimizer + scheduler loaded from iteration 24's state continue with the same learning rates
    opt2 = build_optimizer(cfg, nn.Linear(2, 2))
    sched2 = build_lr_scheduler(cfg, opt2)
    opt2.load_state_dict(saved[0])
    sched2.load_state_dict(saved[1])
    assert set(saved[1]) == {"base_lrs", "last_epoch"}
    for i in range(25, 50):
        assert [g["lr"] for g in opt2.param_groups] == lrs[i]
        opt2.step()
        sched2.step()


def test_clip_gradients_per_parameter():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, -4.0, 0.5]), torch.tensor([0.3, -0.4])
    clip_gradients([a, b], "value", 1.0)
    assert a.grad.tolist() == [1.0, -1.0, 0.5] and b.grad.tolist() == pytest.approx([0.3, -0.4])
    a.grad, b.grad = torch.tensor([3.0, -4.0, 0.0]), torch.tensor([0.3, -0.4])
    clip_gradients([a, b], "norm", 1.0)  # each parameter separately: |a| = 5 -> 1, |b| = 0.5 stays
    np.testing.assert_allclose(a.grad.numpy(), [0.6, -0.8, 0.0], rtol=1e-5)
    np.testing.assert_allclose(b.grad.numpy(), [0.3, -0.4], rtol=1e-6)


# ----------------------------------------------------------------------------------------- loop checks
def test_batch_to_inputs_pads_to_multiple_of_32():
    imgs = [torch.full((3, 40, 50), 7, dtype=torch.uint8), torch.full((3, 64, 33), 9, dtype=torch.uint8)]
    batch = [{"image": im, "gt_boxes": torch.zeros((1, 4)), "gt_classes": torch.zeros(1, dtype=torch.int64)}
             for im in imgs]  # fmt: skip
    images, sizes, targets = batch_to_inputs(batch)
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.uint8
    assert sizes.tolist() == [[40, 50], [64, 33]]
    assert (images[0, :, :40, :50] == 7).all() and images[0, :, 40:].sum() == 0 and images[0, :, :, 50:].sum() == 0
    assert (images[1, :, :, :33] == 9).all() and images[1, :, :, 33:].sum() == 0
    assert targets[0]["boxes"].dtype == torch.float32 and targets[1]["classes"].dtype == torch.int64


class _StandIn(nn.Module):
    """Stand-in detector: loss = (w * mean pixel - 1)^2, NaN at iteration ``nan_at``."""

    def __init__(self, nan_at: int = -1) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))
        self.calls, self.nan_at = 0, nan_at

    def forward(self, images, image_sizes, targets):
        loss = (self.w * images.float().mean() / 255 - 1) ** 2
        if self.calls == self.nan_at:
            loss = loss * float("nan")
        self.calls += 1
        return {"loss_a": loss, "loss_b": 0.1 * loss.detach() + 0 * self.w}


def _stand_in_batches():
    while True:
        yield [{"image": torch.full((3, 32, 32), 200, dtype=torch.uint8), "gt_boxes": torch.zeros((0, 4)),
                "gt_classes": torch.zeros(0, dtype=torch.int64)}]  # fmt: skip


def _stand_in_trainer(model, tmp_path, period=1, keep=3):
    cfg = _solver_cfg(BASE_LR=0.1, MAX_ITER=10, STEPS=(), WARMUP_ITERS=0)
    opt = build_optimizer(cfg, model)
    ckpt = PeriodicCheckpointer(str(tmp_path), period, keep=keep)
    return Trainer(model, opt, build_lr_scheduler(cfg, opt), _stand_in_batches(), hooks=[ckpt])


def test_non_finite_loss_stops_before_backward_without_checkpoint(tmp_path):
    model = _StandIn(nan_at=2)
    trainer = _stand_in_trainer(model, tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"iteration 2: loss_a = nan") as info:
        trainer.run(0, 10)
    assert isinstance(info.value, FloatingPointError)
    w_after_1 = model.w.item()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000000.pth", "model_0000001.pth"]
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_0000001.pth"
    saved = torch.load(tmp_path / "model_0000001.pth", weights_only=True)
    assert saved["model"]["w"].item() == w_after_1  # the NaN iteration did not step the parameter
    assert saved["iteration"] == 1 and saved["scheduler"]["last_epoch"] == 2


def test_checkpointer_keeps_last_n_and_final(tmp_path):
    trainer = _stand_in_trainer(_StandIn(), tmp_path, period=2, keep=2)
    trainer.run(0, 10)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["last_checkpoint", "model_0000005.pth", "model_0000007.pth", "model_final.pth"]
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert torch.load(tmp_path / "model_final.pth", weights_only=True)["iteration"] == 9


# -------------------------------------------------------------------------------------------- end to end
def test_train_small_config_loss_decreases_and_predictor_loads(tiny_data, tmp_path, capsys):
    from frcnn.trainer.predictor import Predictor
    from frcnn.trainer.train_cli import build_config

    out = tmp_path / "run"
    overrides = TINY + ["SOLVER.MAX_ITER", "12", "SOLVER.STEPS", "(10,)", "SOLVER.WARMUP_ITERS", "2",
                        "SOLVER.BASE_LR", "0.02", "SOLVER.CHECKPOINT_PERIOD", "5",
                        "SOLVER.CLIP_GRADIENTS.ENABLED", "False"]  # fmt: skip
    rc = frcnn_main(["train", "--config", "frcnn-small-R18.yaml", "--data", str(tiny_data), "--output", str(out),
                     "--log-period", "1", "--no-progress", *overrides])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    lines = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == list(range(12))
    total = [r["total_loss"] for r in lines]
    assert np.mean(total[-3:]) < 0.9 * np.mean(total[:3]), total
    assert all(abs(r["total_loss"] - sum(v for k, v in r.items() if k.startswith("loss_"))) < 1e-6 for r in lines)
    assert {"lr", "time", "data_time", "eta_seconds"} <= set(lines[0])
    assert sorted(p.name for p in out.glob("model_*.pth")) == ["model_0000004.pth", "model_0000009.pth",
                                                                 "model_final.pth"]  # fmt: skip
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert list(out.glob("events.out.tfevents.*")), "no TensorBoard event file"
    ckpt = torch.load(out / "model_final.pth", weights_only=True)
    assert ckpt["iteration"] == 11 and {"optimizer", "scheduler", "rng", "cfg", "data_seed"} <= set(ckpt)

    cfg = build_config(str(out / "config.yaml"), [])
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3
    predictor = Predictor(cfg, weights=out / "model_final.pth")
    for key, value in predictor.model.state_dict().items():
        assert torch.equal(value, ckpt["model"][key]), key
    det = predictor(np.full((100, 120, 3), 128, dtype=np.uint8))
    assert set(det) == {"boxes", "scores", "classes"} and det["boxes"].shape[1] == 4

    capsys.readouterr()
    rc = frcnn_main(["eval", "--config", str(out / "config.yaml"), "--weights", str(out / "model_final.pth"),
                     "--data", str(tiny_data), "--output", str(tmp_path / "eval")])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0 and "AP50" in printed and "per-class AP" in printed
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert set(metrics) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert (tmp_path / "eval" / "coco_instances_results.json").is_file()


# -------------------------------------------------------------------------------------------- bad input
def _copy_with(tiny_data: Path, tmp_path: Path, edit) -> Path:
    root = tmp_path / "bad"
    shutil.copytree(tiny_data, root)
    path = root / "annotations" / "instances_train.json"
    data = json.loads(path.read_text())
    result = edit(data, root)
    path.write_text(result if isinstance(result, str) else json.dumps(data))
    return root


def _remove_image(data, root):
    (root / "train" / data["images"][0]["file_name"]).unlink()


def _unknown_category(data, root):
    data["annotations"][0]["category_id"] = 99


def _empty(data, root):
    data["images"], data["annotations"] = [], []


@pytest.mark.parametrize(
    "edit, message",
    [
        (_remove_image, "image files named in .* are missing"),
        (lambda data, root: json.dumps(data)[:-20], "is not valid JSON: .* line 1"),
        (_unknown_category, "category_id=99 is not one of the ids"),
        (_empty, "the dataset is empty"),
    ],
    ids=["missing-image", "malformed-json", "unknown-category", "empty-dataset"],
)
def test_bad_dataset_is_a_clear_error(tiny_data, tmp_path, capsys, edit, message):
    root = _copy_with(tiny_data, tmp_path, edit)
    rc = frcnn_main(["train", "--config", "frcnn-small-R18.yaml", "--data", str(root), "--output",
                     str(tmp_path / "out"), *TINY])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("frcnn: error: "), err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "/nonexistent/data"], r"dataset folder /nonexistent/data does not exist"),
        (["SOLVER.MAX_ITERS", "5"], r"SOLVER\.MAX_ITERS"),
        (["--num-classes", "2"], r"--num-classes 2 is smaller than the dataset's 3 classes"),
        (["SOLVER.MAX_ITER"], r"KEY VALUE pairs"),
    ],
    ids=["missing-data-dir", "config-key-typo", "too-few-classes", "odd-overrides"],
)
def test_bad_arguments_are_clear_errors(tiny_data, tmp_path, capsys, args, message):
    base = ["train", "--config", "frcnn-small-R18.yaml", "--output", str(tmp_path / "out")]
    if "--data" not in args:
        base += ["--data", str(tiny_data)]
    rc = frcnn_main(base + args)
    err = capsys.readouterr().err
    assert rc == 2 and re.search(message, err), err


def test_boxes_outside_image_are_clipped_with_a_counted_warning(tiny_data, tmp_path, capsys):
    def outside(data, root):
        data["annotations"][0]["bbox"] = [-20.0, -20.0, 60.0, 60.0]  # reaches outside: clipped
        data["annotations"][1]["bbox"] = [500.0, 500.0, 10.0, 10.0]  # entirely outside: dropped

    root = _copy_with(tiny_data, tmp_path, outside)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = frcnn_main(["train", "--config", "frcnn-small-R18.yaml", "--data", str(root), "--output",
                         str(tmp_path / "out"), "--no-progress", *TINY, "SOLVER.MAX_ITER", "1",
                         "SOLVER.STEPS", "()"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    text = " ".join(str(w.message) for w in caught)
    assert "2 boxes reaching outside their image were clipped" in text or "1 boxes reaching outside" in text, text
    assert "1 boxes with zero or negative width/height were dropped" in text, text
    assert (tmp_path / "out" / "model_final.pth").is_file()
