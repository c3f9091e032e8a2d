"""Two-process DistributedDataParallel training on CPU (gloo), through the same `train()` as `frcnn train`:
ranks read different images, end with identical parameters, losses are averaged across ranks in the
metrics, and only rank 0 writes files."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
from frcnn.trainer.data import synthesize_dataset

ITERS = 3
TINY = ["INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "160", "SOLVER.IMS_PER_BATCH", "2",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", "200", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64",
        "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu", "SEED", "11", "SOLVER.MAX_ITER", str(ITERS),
        "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "1", "SOLVER.CHECKPOINT_PERIOD", "2"]  # fmt: skip


class _Recorder:
    """Hook: taps the data loader (image ids per iteration) and the model (this rank's own losses)."""

    def __init__(self) -> None:
        self.image_ids: list[list[int]] = []
        self.losses: list[dict[str, float]] = []

    def before_train(self, trainer) -> None:
        loader, ids = trainer.data_loader, self.image_ids

        def tapped():
            for batch in loader:
                ids.append([d["image_id"] for d in batch])
                yield batch

        trainer.data_loader = tapped()
        inner = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
        inner.register_forward_hook(lambda m, i, out: self.losses.append({k: v.item() for k, v in out.items()}))


def _worker(rank: int, world: int, port: int, data: str, out: str, results: str) -> None:
    from frcnn.trainer.engine import train
    from frcnn.trainer.engine.trainer import unwrap_model  # noqa: F401  (import check in the child)
    from frcnn.trainer.train_cli import build_config

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    recorder = _Recorder()
    params: dict[str, torch.Tensor] = {}

    class _Params:
        def after_train(self, trainer) -> None:
            inner = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
            params.update({k: v.detach().clone() for k, v in inner.named_parameters()})
            params["__ddp__"] = torch.tensor(isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel))

    cfg = build_config("frcnn-small-R18.yaml", TINY)
    train(cfg, data, out, progress=False, log_period=1, extra_hooks=[recorder, _Params()])
    torch.save({"ids": recorder.image_ids, "losses": recorder.losses, "params": params},
               os.path.join(results, f"rank{rank}.pt"))  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_ddp(tmp_path: Path):
    data = tmp_path / "ds"
    synthesize_dataset(data, num_images=10, size=128, num_classes=3, seed=4)
    out, results = tmp_path / "out", tmp_path / "results"
    results.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(data), str(out), str(results)), nprocs=2, join=True)

    r0, r1 = (torch.load(results / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert bool(r0["params"].pop("__ddp__")) and bool(r1["params"].pop("__ddp__"))
    # each rank read one image per iteration (IMS_PER_BATCH 2 over 2 processes), never the same one
    assert [len(b) for b in r0["ids"]] == [1] * ITERS == [len(b) for b in r1["ids"]]
    seen0, seen1 = {i for b in r0["ids"] for i in b}, {i for b in r1["ids"] for i in b}
    assert len(seen0) == len(seen1) == ITERS and not seen0 & seen1, (r0["ids"], r1["ids"])
    # gradients are averaged: after the steps both ranks hold the same parameters (BatchNorm running
    # statistics are buffers, per rank as in detectron2 without SyncBN)
    assert r0["params"].keys() == r1["params"].keys()
    for key, value in r0["params"].items():
        assert torch.equal(value, r1["params"][key]), key
    # rank 0's final checkpoint is that model; rank 1 wrote nothing else
    final = torch.load(out / "model_final.pth", weights_only=True)
    assert final["world_size"] == 2 and len(final["rng"]) == 2
    for key, value in r0["params"].items():
        assert torch.equal(value, final["model"][key]), key
    assert sorted(p.name for p in out.glob("*.pth")) == ["model_0000001.pth", "model_final.pth"]
    # metrics.json holds the losses averaged over the two ranks
    lines = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == list(range(ITERS))
    for it, line in enumerate(lines):
        for key in ("loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"):
            mean = (r0["losses"][it][key] + r1["losses"][it][key]) / 2
            assert abs(line[key] - mean) <= 1e-6 * max(1.0, abs(mean)), (it, key, line[key], mean)
        assert r0["losses"][it]["loss_cls"] != r1["losses"][it]["loss_cls"]  # different images, different losses
