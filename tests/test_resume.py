"""`frcnn train` killed with SIGKILL between checkpoints, then `--resume`: iteration count, learning rate and
losses continue exactly as in an uninterrupted run with the same seed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from frcnn.trainer.data import synthesize_dataset

TINY = ["INPUT.MIN_SIZE_TRAIN", "(112, 128)", "INPUT.MAX_SIZE_TRAIN", "160", "SOLVER.IMS_PER_BATCH", "2",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", "200", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64",
        "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu", "SEED", "7", "SOLVER.MAX_ITER", "8",
        "SOLVER.STEPS", "(5,)", "SOLVER.WARMUP_ITERS", "2", "SOLVER.CHECKPOINT_PERIOD", "3"]  # fmt: skip
VOLATILE = {"time", "data_time", "eta_seconds"}


def _command(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "frcnn.runtime.cli", "train", "--config", "frcnn-small-R18.yaml", "--data",
            str(data), "--output", str(out), "--log-period", "1", "--no-progress", *extra, *TINY]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if line.strip()]


def _kill_after_first_checkpoint(cmd: list[str], out: Path, timeout: float = 120.0) -> str:
    """Start training, SIGKILL it as soon as `last_checkpoint` names a periodic checkpoint; return that name."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pointer, deadline = out / "last_checkpoint", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if pointer.is_file() and pointer.read_text().strip().startswith("model_0"):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert proc.returncode == -signal.SIGKILL, f"training was not killed (rc {proc.returncode}):\n{err[-2000:]}"
    return pointer.read_text().strip()


def test_sigkill_then_resume_continues_exactly(tmp_path):
    data = tmp_path / "ds"
    synthesize_dataset(data, num_images=10, size=128, num_classes=3, seed=1)

    reference = tmp_path / "uninterrupted"
    done = subprocess.run(_command(data, reference), env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = _metrics(reference)
    assert [r["iteration"] for r in expected] == list(range(8))

    out = tmp_path / "interrupted"
    name = _kill_after_first_checkpoint(_command(data, out), out)
    assert not (out / "model_final.pth").exists(), "the run finished before it could be killed"
    last_iter = torch.load(out / name, weights_only=True)["iteration"]
    assert name == f"model_{last_iter:07d}.pth" and last_iter in (2, 5)

    resumed = subprocess.run(_command(data, out, "--resume"), env=_env(), capture_output=True, text=True,
                             timeout=300, check=False)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"iterations {last_iter + 1}..7 done" in resumed.stdout, resumed.stdout

    got = _metrics(out)
    assert [r["iteration"] for r in got] == list(range(8)), "metrics.json lines of the killed run not replaced"
    for want, have in zip(expected, got):
        assert {k: v for k, v in have.items() if k not in VOLATILE} == {
            k: v for k, v in want.items() if k not in VOLATILE
        }, f"iteration {have['iteration']} differs from the uninterrupted run"
    assert got[last_iter + 1]["lr"] == expected[last_iter + 1]["lr"]

    final_ref = torch.load(reference / "model_final.pth", weights_only=True)
    final_res = torch.load(out / "model_final.pth", weights_only=True)
    assert final_ref["iteration"] == final_res["iteration"] == 7
    for key, value in final_ref["model"].items():
        assert torch.equal(value, final_res["model"][key]), key


def _mixed_orientation_dataset(root: Path, n: int = 14) -> Path:
    """n PNG images alternating 96x64 / 64x96 (and one 80x80), one box each, as a COCO split 'train'."""
    import numpy as np
    from PIL import Image

    (root / "train").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(n):
        h, w = [(64, 96), (96, 64), (80, 80)][i % 3]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "train" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": h, "width": w})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1 + i % 2, "bbox": [4.0, 5.0, 30.0, 20.0 + i],
                     "iscrowd": 0, "area": 600.0})  # fmt: skip
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    (root / "annotations" / "instances_train.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


@pytest.mark.parametrize("start_iter", [1, 4])
def test_resumable_loader_yields_the_uninterrupted_batches(tmp_path, start_iter, monkeypatch):
    from frcnn.trainer.config import get_cfg, model_zoo_config
    from frcnn.trainer.data import load_coco_split
    from frcnn.trainer.data import mapper as mapper_module
    from frcnn.trainer.engine import resumable_train_loader
    from frcnn.trainer.engine.resume import first_needed_sample

    dicts, _ = load_coco_split(_mixed_orientation_dataset(tmp_path / "ds"), "train")
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo_config("frcnn-small-R18.yaml"))
    cfg.merge_from_list(["INPUT.MIN_SIZE_TRAIN", "(64, 80)", "INPUT.MAX_SIZE_TRAIN", "100",
                         "SOLVER.IMS_PER_BATCH", "3", "DATALOADER.NUM_WORKERS", "0"])  # fmt: skip

    def batches(loader, n):
        return [[(d["image_id"], tuple(d["image"].shape), d["gt_boxes"].tolist()) for d in next(loader)]
                for _ in range(n)]  # fmt: skip

    reads: list[str] = []
    original = mapper_module.read_image
    monkeypatch.setattr(mapper_module, "read_image", lambda *a, **k: reads.append(a[0]) or original(*a, **k))
    full = batches(resumable_train_loader(cfg, dicts, start_iter=0, seed=5), start_iter + 3)
    full_reads, reads[:] = len(reads), []
    later = batches(resumable_train_loader(cfg, dicts, start_iter=start_iter, seed=5), 3)
    assert later == full[start_iter:]
    # samples before the first one a later batch needs are not read at all
    first = first_needed_sample(dicts, start_iter, batch_size=3, seed=5)
    assert len(reads) == full_reads - first
    assert start_iter < 4 or first >= 6, first
