"""The training loop: one iteration = batch -> padded tensors -> loss dict -> checks -> backward -> step.

    trainer = Trainer(model, optimizer, scheduler, data_loader, device="cpu", hooks=[...])
    trainer.run(start_iter=0, max_iter=cfg.SOLVER.MAX_ITER)

Per iteration ``i`` (detectron2 ``SimpleTrainer.run_step`` + the ``LRScheduler`` hook):

1. ``batch = next(data_loader)`` (list of mapper dicts, timed as ``data_time``);
2. :func:`batch_to_inputs`: images padded into one uint8 Tensor[B, 3, H, W] (H, W multiples of 32),
   image sizes Tensor[B, 2], targets ``[{"boxes": float32 [G, 4], "classes": int64 [G]}]``;
3. ``loss_dict = model(images, image_sizes, targets)`` (under ``torch.autocast`` fp16 on CUDA with AMP);
4. the detached losses are averaged across ranks (one ``all_reduce``), so every rank sees the same values;
   a non-finite loss raises :class:`NonFiniteLossError` on every rank *before* backward: nothing is
   stepped, no checkpoint is written;
5. ``sum(losses).backward()`` (scaled with AMP), optional per-parameter gradient clipping
   (``SOLVER.CLIP_GRADIENTS``), ``optimizer.step()``, then ``scheduler.step()``;
6. ``trainer.metrics`` = {iteration, each loss and total_loss (rank averages), lr, time, data_time};
   hooks' ``after_step`` run (checkpoints, metrics, evaluation, progress bar).

Hooks are objects with optional ``before_train(trainer)``, ``after_step(trainer)``, ``after_train(trainer)``
methods (see :mod:`.hooks`); ``after_train`` runs even when training fails, to close files.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .solver import clip_gradients

__all__ = ["NonFiniteLossError", "Trainer", "batch_to_inputs", "unwrap_model"]

SIZE_DIVISIBILITY = 32


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; raised before the backward pass of that iteration."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel (or ``model`` itself)."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def batch_to_inputs(
    batch: Sequence[dict[str, Any]], device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor, list[dict[str, Tensor]]]:
    """Mapper dicts -> (images uint8 Tensor[B, 3, H, W], image_sizes int32 Tensor[B, 2], targets).

    H, W: the largest image height / width rounded up to a multiple of 32 (frcnn.runtime.preprocess
    ``batch_images`` in torch); the padded area is 0. targets[i]: ``{"boxes": float32 [G, 4] (resized-image
    pixels), "classes": int64 [G]}`` from ``gt_boxes`` / ``gt_classes`` (+ ``"masks"`` from ``gt_masks``).
    """
    if not batch:
        raise ValueError("an empty batch cannot be trained on.")
    heights = [int(d["image"].shape[-2]) for d in batch]
    widths = [int(d["image"].shape[-1]) for d in batch]
    pad_h = -(-max(heights) // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY
    pad_w = -(-max(widths) // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY
    images = torch.zeros((len(batch), 3, pad_h, pad_w), dtype=torch.uint8)
    for i, d in enumerate(batch):
        images[i, :, : heights[i], : widths[i]] = d["image"]
    sizes = torch.tensor([[h, w] for h, w in zip(heights, widths)], dtype=torch.int32)
    targets = [
        {
            "boxes": d["gt_boxes"].to(device=device, dtype=torch.float32),
            "classes": d["gt_classes"].to(device=device, dtype=torch.int64),
        }
        for d in batch
    ]
    for target, d in zip(targets, batch):
        if "gt_masks" in d:  # Mask R-CNN: bool [G, h, w] in the image's own (unpadded) pixels
            target["masks"] = d["gt_masks"].to(device=device)
    non_blocking = torch.device(device).type == "cuda"
    return images.to(device, non_blocking=non_blocking), sizes.to(device), targets


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class Trainer:
    """Runs iterations of SGD on a detection model (see the module docstring for one iteration).

    Args:
        model: module (or DDP-wrapped module) whose training forward is
            ``model(images, image_sizes, targets) -> dict[str, Tensor]`` of scalar losses.
        optimizer: the optimizer over the model's parameters. scheduler: stepped after every step.
        data_loader: infinite iterator of batches (list of mapper dicts, see :func:`batch_to_inputs`).
        device: where the inputs go (the model's device).
        hooks: objects with optional before_train / after_step / after_train methods, run in order.
        clip: ``{"CLIP_TYPE", "CLIP_VALUE", "NORM_TYPE"}`` (SOLVER.CLIP_GRADIENTS) or None for no clipping.
        amp: fp16 autocast + GradScaler; only on CUDA (ignored on CPU, see :func:`.launch.amp_enabled`).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        data_loader: Iterator[list[dict[str, Any]]],
        *,
        device: torch.device | str = "cpu",
        hooks: Sequence[Any] = (),
        clip: dict[str, Any] | None = None,
        amp: bool = False,
    ) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.data_loader = data_loader
        self.device = torch.device(device)
        self.hooks = list(hooks)
        self.clip = clip
        self.amp = bool(amp) and self.device.type == "cuda"
        self.grad_scaler = torch.amp.GradScaler("cuda") if self.amp else None
        self.iter = self.start_iter = self.max_iter = 0
        self.metrics: dict[str, float] = {}
        self._lr_group = max(range(len(optimizer.param_groups)),
                             key=lambda g: len(optimizer.param_groups[g]["params"]))  # fmt: skip

    # ------------------------------------------------------------------------------------------------ loop
    def run(self, start_iter: int, max_iter: int) -> None:
        """Train iterations ``start_iter .. max_iter - 1`` (``trainer.iter`` is the current one)."""
        self.start_iter, self.max_iter = int(start_iter), int(max_iter)
        self.model.train()
        try:
            self._call_hooks("before_train")
            for iteration in range(self.start_iter, self.max_iter):
                self.iter = iteration
                self.run_step()
                self._call_hooks("after_step")
        finally:
            self._call_hooks("after_train")

    def _call_hooks(self, name: str) -> None:
        for hook in self.hooks:
            method = getattr(hook, name, None)
            if method is not None:
                method(self)

    def run_step(self) -> None:
        """One iteration (steps 1-6 of the module docstring)."""
        start = time.perf_counter()
        batch = next(self.data_loader)
        data_time = time.perf_counter() - start
        images, sizes, targets = batch_to_inputs(batch, self.device)
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.amp else nullcontext()
        with autocast:
            loss_dict = self.model(images, sizes, targets)
        if not isinstance(loss_dict, dict) or not loss_dict:
            raise TypeError(f"the model's training forward must return a dict of losses, got {type(loss_dict)}")
        names = sorted(loss_dict)
        values = self._reduce_mean(torch.stack([loss_dict[k].detach().float() for k in names]))
        self._check_finite(names, values)
        total = sum(loss_dict[k] for k in names)
        self.optimizer.zero_grad(set_to_none=True)
        lr = float(self.optimizer.param_groups[self._lr_group]["lr"])
        if self.grad_scaler is not None:
            self.grad_scaler.scale(total).backward()
            if self.clip is not None:
                self.grad_scaler.unscale_(self.optimizer)
                self._clip()
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            total.backward()
            if self.clip is not None:
                self._clip()
            self.optimizer.step()
        self.scheduler.step()
        losses = dict(zip(names, values.tolist()))
        self.metrics = {"iteration": self.iter, **losses, "total_loss": math.fsum(losses.values()), "lr": lr,
                        "data_time": data_time, "time": time.perf_counter() - start}  # fmt: skip

    def _clip(self) -> None:
        assert self.clip is not None
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        clip_gradients(params, str(self.clip["CLIP_TYPE"]), float(self.clip["CLIP_VALUE"]),
                       float(self.clip.get("NORM_TYPE", 2.0)))  # fmt: skip

    @staticmethod
    def _reduce_mean(values: Tensor) -> Tensor:
        """Average ``values`` over all ranks (identity without torch.distributed)."""
        world = _world_size()
        if world > 1:
            values = values.clone()
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
            values /= world
        return values.cpu()

    def _check_finite(self, names: list[str], values: Tensor) -> None:
        bad = [f"{n} = {v}" for n, v in zip(names, values.tolist()) if not math.isfinite(v)]
        if bad:
            raise NonFiniteLossError(
                f"loss became non-finite at iteration {self.iter}: {', '.join(bad)} (averaged over "
                f"{_world_size()} process(es)). Training stopped before the backward pass; no checkpoint "
                "was written for this iteration. Usual fixes: lower SOLVER.BASE_LR, lengthen "
                "SOLVER.WARMUP_ITERS, enable SOLVER.CLIP_GRADIENTS, or check the dataset's boxes."
            )

    # -------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Optimizer, scheduler (and AMP grad-scaler) state: plain values, loadable with weights_only."""
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (missing grad-scaler state is fine)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.grad_scaler is not None and "grad_scaler" in state:
            self.grad_scaler.load_state_dict(state["grad_scaler"])
