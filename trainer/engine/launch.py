"""Set up one training process (single process or one rank of ``torchrun``) and run the training.

    from frcnn.trainer.engine import train
    summary = train(cfg, "data/synth", "output/run1", resume=False)

Distributed: when ``WORLD_SIZE`` > 1 (set by ``torchrun --nproc_per_node N [--nnodes M --rdzv-backend
c10d --rdzv-endpoint HOST:PORT]``), :func:`init_distributed` joins the process group (``env://``; NCCL when
the process uses a GPU, gloo on CPU), every rank builds the same model, wraps it in
DistributedDataParallel (which broadcasts rank 0's initial weights and averages gradients), reads its own
shard of the data stream (``build_train_loader(rank=, world_size=)``, SOLVER.IMS_PER_BATCH is the total over
ranks), losses are averaged across ranks for logging and the non-finite check, and only rank 0 writes
checkpoints, metrics and logs.

Seeding: ``SEED >= 0`` seeds Python, NumPy and torch with ``SEED + rank`` (detectron2's convention) and the
data stream with ``SEED``; ``SEED < 0`` draws both at random (the data seed is broadcast from rank 0). The
data seed and every rank's RNG states are stored in checkpoints, so ``resume=True`` continues exactly: same
batches, same random sampling, same losses as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import random
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from frcnn.runtime.errors import CheckpointError, ConfigError, UserError
from frcnn.runtime.fileio import atomic_write
from frcnn.trainer.data import load_dataset

from .comm import barrier, get_rank, get_world_size, is_main_process
from .hooks import (
    EvalHook,
    MetricsWriter,
    PeriodicCheckpointer,
    ProgressBar,
    find_last_checkpoint,
    set_rng_state,
)
from .resume import resumable_train_loader
from .solver import build_lr_scheduler, build_optimizer
from .trainer import Trainer

__all__ = ["DistContext", "init_distributed", "seed_all", "select_device", "train"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    created_group: bool  # this call initialized the process group (and must destroy it)


def select_device(requested: str, local_rank: int = 0) -> torch.device:
    """MODEL.DEVICE -> torch.device: "cuda" becomes cuda:<local rank>, or the CPU when no GPU is visible."""
    kind = str(requested).split(":")[0]
    if kind == "cuda":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        logger.warning("MODEL.DEVICE is %r but no CUDA GPU is available: training on the CPU", requested)
        return torch.device("cpu")
    if kind != "cpu":
        raise ConfigError(f"MODEL.DEVICE {requested!r}: use 'cuda' or 'cpu'.")
    return torch.device("cpu")


def init_distributed(requested_device: str = "cuda") -> DistContext:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (NCCL on GPU, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(requested_device, local_rank)
    created = False
    if world_size > 1 and not dist.is_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise UserError(f"WORLD_SIZE={world_size} but {', '.join(missing)} is not set: start distributed "
                            "training with `torchrun --nproc_per_node N -m frcnn.runtime.cli train ...`.")  # fmt: skip
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                rank=rank, world_size=world_size)  # fmt: skip
        created = True
    return DistContext(get_rank(), get_world_size(), local_rank, device, created)


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _shared_random_seed() -> int:
    from frcnn.trainer.data.loader import shared_seed

    return shared_seed(None, get_world_size())


def _init_weights(model: torch.nn.Module, weights: str) -> None:
    """MODEL.WEIGHTS (detectron2 .pth/.pkl or an ImageNet backbone .pkl) into a fresh model, non-strict."""
    from frcnn.trainer.checkpoint import load_checkpoint_state, load_into_model

    state, _ = load_checkpoint_state(weights)
    report = load_into_model(model, state, strict=False, path=weights)
    if not report.loaded:
        raise CheckpointError(f"MODEL.WEIGHTS {weights}: no tensor matches the model; is it a detectron2 "
                              "ResNet/Faster R-CNN checkpoint of the configured depth?")  # fmt: skip
    logger.info("initialized %d tensors from %s (%d missing)", len(report.loaded), weights, len(report.missing))


def train(
    cfg: Any, data_dir: str, output_dir: str, *, resume: bool = False, train_split: str = "train",
    eval_split: str = "val", log_period: int = 20, progress: bool = True, keep_checkpoints: int = 3,
    extra_hooks: Sequence[Any] = (), dataset: tuple[list[dict[str, Any]], Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Train ``cfg`` on ``data_dir`` (COCO layout: annotations/instances_<split>.json + <split>/) into
    ``output_dir``; see the module docstring. Returns ``{"start_iter", "max_iter", "final_checkpoint",
    "eval"}`` (eval: metrics of the last evaluation on rank 0, or {}). ``dataset``: the already loaded
    ``load_coco_split(data_dir, train_split)`` result (else it is loaded here)."""
    from frcnn.trainer.config import check_supported
    from frcnn.trainer.modeling import build_model

    check_supported(cfg, training=True)
    ctx = init_distributed(cfg.MODEL.DEVICE)
    try:
        dicts, meta = load_dataset(data_dir, train_split) if dataset is None else dataset
        if meta.num_classes > cfg.MODEL.ROI_HEADS.NUM_CLASSES:
            raise ConfigError(f"the dataset has {meta.num_classes} classes but MODEL.ROI_HEADS.NUM_CLASSES is "
                              f"{cfg.MODEL.ROI_HEADS.NUM_CLASSES}; set it to {meta.num_classes}.")  # fmt: skip
        if is_main_process():
            os.makedirs(output_dir, exist_ok=True)
            atomic_write(os.path.join(output_dir, "config.yaml"), cfg.dump(), fsync=True)
        barrier()
        checkpoint = find_last_checkpoint(output_dir) if resume else None
        if resume and checkpoint is None and is_main_process():
            logger.warning("--resume: no checkpoint in %s, starting from iteration 0", output_dir)
        seed = int(cfg.SEED) if int(cfg.SEED) >= 0 else _shared_random_seed()
        seed_all(seed + ctx.rank)
        model = build_model(cfg).to(ctx.device)
        if cfg.MODEL.WEIGHTS and checkpoint is None:
            _init_weights(model, cfg.MODEL.WEIGHTS)
        optimizer = build_optimizer(cfg, model)
        scheduler = build_lr_scheduler(cfg, optimizer)
        return _run(cfg, ctx, model, optimizer, scheduler, (dicts, meta), data_dir, output_dir, checkpoint,
                    seed, {"eval_split": eval_split, "log_period": log_period, "progress": progress,
                           "keep": keep_checkpoints, "extra_hooks": extra_hooks})  # fmt: skip
    finally:
        if ctx.created_group:
            dist.destroy_process_group()


def _run(cfg: Any, ctx: DistContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
         data: tuple[list[dict[str, Any]], Any], data_dir: str, output_dir: str, checkpoint: str | None,
         seed: int, opts: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    from frcnn.trainer.checkpoint import load_checkpoint_state, load_into_model

    amp = bool(cfg.SOLVER.AMP.ENABLED)
    if amp and ctx.device.type != "cuda":
        warnings.warn("SOLVER.AMP.ENABLED is ignored on the CPU (mixed precision runs on CUDA only).", stacklevel=2)
    clip = dict(cfg.SOLVER.CLIP_GRADIENTS) if cfg.SOLVER.CLIP_GRADIENTS.ENABLED else None
    start_iter, data_seed, saved = 0, seed, None
    if checkpoint is not None:
        state, saved = load_checkpoint_state(checkpoint)
        load_into_model(model, state, strict=True, path=checkpoint)
        start_iter, data_seed = int(saved["iteration"]) + 1, int(saved.get("data_seed", seed))
        if is_main_process():
            logger.info("resuming from %s at iteration %d", checkpoint, start_iter)
    if ctx.world_size > 1:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        model = _wrap_ddp(model, ids)
    dicts = data[0]
    max_iter = int(cfg.SOLVER.MAX_ITER)
    loader = resumable_train_loader(cfg, dicts, start_iter=min(start_iter, max_iter), seed=data_seed,
                                    rank=ctx.rank, world_size=ctx.world_size)  # fmt: skip
    writer = MetricsWriter(output_dir, period=opts["log_period"])
    hooks: list[Any] = [PeriodicCheckpointer(output_dir, int(cfg.SOLVER.CHECKPOINT_PERIOD), keep=opts["keep"],
                                             extra={"cfg": cfg.dump(), "data_seed": data_seed})]  # fmt: skip
    eval_hook = _eval_hook(cfg, model, data_dir, opts["eval_split"], output_dir, ctx, writer)
    hooks += [h for h in (eval_hook, writer, ProgressBar(opts["progress"])) if h is not None]
    hooks += list(opts["extra_hooks"])
    trainer = Trainer(model, optimizer, scheduler, loader, device=ctx.device, hooks=hooks, clip=clip, amp=amp)
    if saved is not None:
        trainer.load_state_dict(saved)
        rng = saved.get("rng") or []
        if len(rng) == ctx.world_size:
            set_rng_state(rng[ctx.rank])
        elif is_main_process():
            logger.warning("checkpoint was written by %d process(es), now %d: random states are not restored",
                           len(rng), ctx.world_size)  # fmt: skip
    if start_iter >= max_iter and is_main_process():
        logger.warning("%s is already at iteration %d >= SOLVER.MAX_ITER %d: nothing to train",
                       checkpoint, start_iter - 1, max_iter)  # fmt: skip
    trainer.run(start_iter, max_iter)
    final = os.path.join(output_dir, "model_final.pth")
    last_eval = eval_hook.results[max(eval_hook.results)] if eval_hook is not None and eval_hook.results else {}
    return {"start_iter": start_iter, "max_iter": max_iter, "eval": last_eval,
            "final_checkpoint": final if os.path.isfile(final) else None}  # fmt: skip


def _wrap_ddp(model: torch.nn.Module, device_ids: list[int] | None) -> torch.nn.Module:
    """DDP that syncs parameters and buffers once at construction but not at every forward (detectron2's
    ``broadcast_buffers=False``): BatchNorm running statistics (NORM "BN") are then per rank, like
    detectron2 without SyncBN; rank 0's are checkpointed."""
    ddp = torch.nn.parallel.DistributedDataParallel
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:  # torch >= 2.10
        return ddp(model, device_ids=device_ids, forward_sync_buffers=False)
    return ddp(model, device_ids=device_ids, broadcast_buffers=False)


def _eval_hook(cfg: Any, model: torch.nn.Module, data_dir: str, split: str, output_dir: str, ctx: DistContext,
               writer: MetricsWriter) -> EvalHook | None:  # fmt: skip
    from frcnn.trainer.data import dataset_paths

    period = int(cfg.TEST.EVAL_PERIOD)
    if period <= 0:
        return None
    if not os.path.isfile(dataset_paths(data_dir, split)[0]):
        if is_main_process():
            logger.warning("TEST.EVAL_PERIOD %d but %s has no '%s' split: no evaluation", period, data_dir, split)
        return None
    from .inference import evaluate_model

    dicts, meta = load_dataset(data_dir, split)
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model

    def run_eval() -> dict[str, float]:
        return evaluate_model(inner, cfg, dicts, meta, output_dir=os.path.join(output_dir, "eval"),
                              device=ctx.device)  # fmt: skip

    return EvalHook(period, run_eval, writer)
