"""Optimizer and learning-rate schedule, as detectron2's ``build_optimizer`` / ``build_lr_scheduler``.

Optimizer (detectron2 ``get_default_optimizer_params`` + ``reduce_param_groups``): SGD with
``SOLVER.MOMENTUM`` / ``NESTEROV``; every trainable parameter gets ``lr = BASE_LR`` and
``weight_decay = WEIGHT_DECAY``, except

- parameters of normalization layers (BatchNorm, SyncBatchNorm, GroupNorm, InstanceNorm, LayerNorm,
  LocalResponseNorm): ``weight_decay = WEIGHT_DECAY_NORM``;
- parameters named ``bias``: ``lr = BASE_LR * BIAS_LR_FACTOR`` and ``weight_decay = WEIGHT_DECAY_BIAS``
  (``None`` = ``WEIGHT_DECAY``); the bias rule is applied after the norm rule, as in detectron2.

Parameters with equal hyper-parameters are merged into one group (first-seen order), so the optimizer
state dict has the same layout as detectron2's. FrozenBN holds buffers only, so it gets no group.

Schedule (detectron2 ``LRMultiplier`` over ``WarmupParamScheduler(MultiStepParamScheduler)``): at iteration
``i`` (0-based) the learning rate of every group is ``base_lr * m(i / MAX_ITER)`` with

    steps  = [s for s in STEPS if s <= MAX_ITER]
    ms(w)  = GAMMA ** bisect_right(steps, int((w + 1e-6) * MAX_ITER))              (multi-step)
    wl     = min(WARMUP_ITERS / MAX_ITER, 1.0)
    m(w)   = ms(w)                                          if w + 1e-6 > wl       (after warmup)
           = start * (1 - w / wl) + end * (w / wl)          otherwise, "linear"
           = start                                          otherwise, "constant"
    start  = WARMUP_FACTOR * ms(0),  end = ms(wl)  (ms(0) with SOLVER.RESCALE_INTERVAL)

The scheduler is stepped once after every optimizer step, so iteration ``i`` trains with ``m(i / MAX_ITER)``.

Gradient clipping (``SOLVER.CLIP_GRADIENTS``, detectron2 ``maybe_add_gradient_clipping``): applied to each
parameter separately before the step: ``"value"`` clamps every gradient element to +-CLIP_VALUE, ``"norm"``
rescales each parameter's gradient to a NORM_TYPE-norm of at most CLIP_VALUE.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from typing import Any

import torch
from frcnn.runtime.errors import ConfigError
from torch import nn

__all__ = [
    "LRMultiplier",
    "WarmupMultiStepMultiplier",
    "build_lr_scheduler",
    "build_optimizer",
    "clip_gradients",
    "get_default_optimizer_params",
]

NORM_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm,
)  # fmt: skip
_EPS = 1e-6  # fvcore ParamScheduler.WHERE_EPSILON


def get_default_optimizer_params(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: float | None = None,
    bias_lr_factor: float = 1.0,
    weight_decay_bias: float | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups of ``model`` (rules in the module docstring), merged by equal hyper-parameters.

    Returns a list of ``{"params": [Parameter, ...], "lr": float, "weight_decay": float}``.
    """
    if weight_decay_bias is None:
        weight_decay_bias = weight_decay
    bias_overrides: dict[str, float] = {"weight_decay": weight_decay_bias}
    if bias_lr_factor != 1.0:
        bias_overrides["lr"] = base_lr * bias_lr_factor
    groups: list[dict[str, Any]] = []
    memo: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in memo:
                continue
            memo.add(id(param))
            hyper = {"lr": base_lr, "weight_decay": weight_decay}
            if isinstance(module, NORM_MODULE_TYPES) and weight_decay_norm is not None:
                hyper["weight_decay"] = weight_decay_norm
            if name == "bias":
                hyper.update(bias_overrides)
            groups.append({"params": [param], **hyper})
    return _reduce_param_groups(groups)


def _reduce_param_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge groups whose hyper-parameters are equal (first-seen order of both groups and parameters)."""
    merged: dict[tuple[tuple[str, Any], ...], list[nn.Parameter]] = {}
    for group in groups:
        key = tuple(sorted((k, v) for k, v in group.items() if k != "params"))
        merged.setdefault(key, []).extend(group["params"])
    return [{"params": params, **dict(key)} for key, params in merged.items()]


def build_optimizer(cfg: Any, model: nn.Module) -> torch.optim.SGD:
    """SGD over ``get_default_optimizer_params`` with the SOLVER.* settings (see module docstring)."""
    s = cfg.SOLVER
    params = get_default_optimizer_params(
        model,
        base_lr=float(s.BASE_LR),
        weight_decay=float(s.WEIGHT_DECAY),
        weight_decay_norm=float(s.WEIGHT_DECAY_NORM),
        bias_lr_factor=float(s.BIAS_LR_FACTOR),
        weight_decay_bias=None if s.WEIGHT_DECAY_BIAS is None else float(s.WEIGHT_DECAY_BIAS),
    )
    if not params:
        raise ConfigError("the model has no trainable parameter (check MODEL.BACKBONE.FREEZE_AT).")
    return torch.optim.SGD(
        params,
        lr=float(s.BASE_LR),
        momentum=float(s.MOMENTUM),
        nesterov=bool(s.NESTEROV),
        weight_decay=float(s.WEIGHT_DECAY),
    )


class WarmupMultiStepMultiplier:
    """``m(where)``, ``where`` = iteration / max_iter in [0, 1]: the formula of the module docstring."""

    def __init__(
        self,
        steps: Iterable[int],
        gamma: float,
        max_iter: int,
        warmup_factor: float,
        warmup_iters: int,
        warmup_method: str = "linear",
        rescale_interval: bool = False,
    ) -> None:
        if max_iter <= 0:
            raise ConfigError(f"SOLVER.MAX_ITER must be > 0, got {max_iter}.")
        if warmup_method not in ("linear", "constant"):
            raise ConfigError(f"SOLVER.WARMUP_METHOD {warmup_method!r}: use 'linear' or 'constant'.")
        self.steps = [int(s) for s in steps]
        if self.steps != sorted(set(self.steps)) or any(s <= 0 for s in self.steps):
            raise ConfigError(f"SOLVER.STEPS {tuple(steps)} must be strictly increasing positive iterations.")
        self.gamma, self.max_iter = float(gamma), int(max_iter)
        self.warmup_length = min(warmup_iters / max_iter, 1.0)
        self.warmup_method = warmup_method
        self.start = warmup_factor * self.multistep(0.0)
        self.end = self.multistep(0.0 if rescale_interval else self.warmup_length)

    def multistep(self, where: float) -> float:
        epoch = int((where + _EPS) * self.max_iter)
        return self.gamma ** bisect.bisect_right(self.steps, epoch)

    def __call__(self, where: float) -> float:
        if where + _EPS > self.warmup_length:
            return self.multistep(where)
        if self.warmup_method == "constant":
            return self.start
        alpha = where / self.warmup_length
        return self.end * alpha + self.start * (1 - alpha)


class LRMultiplier(torch.optim.lr_scheduler.LRScheduler):
    """Iteration-based scheduler: group lr = its initial lr * ``multiplier(last_epoch / max_iter)``.

    ``state_dict()`` holds ``{"base_lrs", "last_epoch"}`` only (plain values: checkpoints load with
    ``weights_only=True``); the multiplier is rebuilt from the config.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, multiplier: WarmupMultiStepMultiplier,
                 max_iter: int, last_iter: int = -1) -> None:  # fmt: skip
        self._multiplier = multiplier
        self._max_iter = int(max_iter)
        super().__init__(optimizer, last_epoch=last_iter)

    def state_dict(self) -> dict[str, Any]:
        return {"base_lrs": list(self.base_lrs), "last_epoch": int(self.last_epoch)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_lrs = list(state_dict["base_lrs"])
        self.last_epoch = int(state_dict["last_epoch"])
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_lr(self) -> list[float | torch.Tensor]:
        multiplier = self._multiplier(self.last_epoch / self._max_iter)
        return [base_lr * multiplier for base_lr in self.base_lrs]


def build_lr_scheduler(cfg: Any, optimizer: torch.optim.Optimizer) -> LRMultiplier:
    """``LRMultiplier`` with the SOLVER.* schedule; only ``WarmupMultiStepLR`` is supported."""
    s = cfg.SOLVER
    if s.LR_SCHEDULER_NAME != "WarmupMultiStepLR":
        raise ConfigError(f"SOLVER.LR_SCHEDULER_NAME {s.LR_SCHEDULER_NAME!r}: only 'WarmupMultiStepLR' is built.")
    steps = [x for x in s.STEPS if x <= s.MAX_ITER]  # detectron2 drops (and warns about) later steps
    multiplier = WarmupMultiStepMultiplier(
        steps,
        gamma=float(s.GAMMA),
        max_iter=int(s.MAX_ITER),
        warmup_factor=float(s.WARMUP_FACTOR),
        warmup_iters=int(s.WARMUP_ITERS),
        warmup_method=str(s.WARMUP_METHOD),
        rescale_interval=bool(s.RESCALE_INTERVAL),
    )
    return LRMultiplier(optimizer, multiplier, max_iter=int(s.MAX_ITER))


def clip_gradients(params: Iterable[torch.Tensor], clip_type: str, clip_value: float,
                   norm_type: float = 2.0) -> None:  # fmt: skip
    """Per-parameter clipping (detectron2 ``_create_gradient_clipper``): ``"value"`` or ``"norm"``."""
    if clip_type not in ("value", "norm"):
        raise ConfigError(f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE {clip_type!r}: use 'value' or 'norm'.")
    if not (clip_value > 0 and math.isfinite(clip_value)):
        raise ConfigError(f"SOLVER.CLIP_GRADIENTS.CLIP_VALUE must be a positive number, got {clip_value}.")
    for p in params:
        if p.grad is None:
            continue
        if clip_type == "value":
            torch.nn.utils.clip_grad_value_(p, clip_value)
        else:
            torch.nn.utils.clip_grad_norm_(p, clip_value, norm_type)
