"""Training hooks: periodic checkpoints, periodic evaluation, metrics files, progress bar; RNG state capture.

Every hook runs on every rank (collectives stay in step); only rank 0 writes files or prints.

Checkpoints (detectron2 ``PeriodicCheckpointer`` naming): after iteration ``i`` (0-based) with
``(i + 1) % SOLVER.CHECKPOINT_PERIOD == 0`` -> ``OUT/model_{i:07d}.pth``; after the last iteration ->
``OUT/model_final.pth``. Each file is ``{"model": state_dict, "optimizer", "scheduler", "iteration": i,
"rng": [state of rank 0, rank 1, ...], "data_seed", "world_size", "cfg": cfg.dump()}`` written atomically
(temp file + rename, :func:`frcnn.trainer.checkpoint.save_checkpoint`), loadable with
``torch.load(weights_only=True)``; the Predictor / exporter read ``"model"`` only. ``OUT/last_checkpoint``
(a one-line text file, also replaced atomically) names the newest file; only the newest ``keep`` periodic
files are kept (``model_final.pth`` is never deleted). Resuming from iteration ``i`` restarts at ``i + 1``.

Metrics: ``OUT/metrics.json`` gets one JSON object per line every ``period`` iterations (and at the last):
``{"iteration", "loss_*", "total_loss", "lr", "time", "data_time", "eta_seconds"}`` (losses are the values
of that iteration averaged over ranks), plus ``{"iteration", "eval/AP", ...}`` lines after evaluations; the
same scalars go to TensorBoard (``OUT/events.out.tfevents.*``). On resume, lines of iterations >= the start
iteration (written after the checkpoint by the interrupted run) are removed first.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from frcnn.runtime.fileio import atomic_write
from frcnn.trainer.checkpoint import save_checkpoint

from .comm import all_gather_object, is_main_process
from .trainer import Trainer, unwrap_model

__all__ = [
    "EvalHook",
    "MetricsWriter",
    "PeriodicCheckpointer",
    "ProgressBar",
    "find_last_checkpoint",
    "get_rng_state",
    "set_rng_state",
]

logger = logging.getLogger(__name__)
LAST_CHECKPOINT = "last_checkpoint"
_PERIODIC = re.compile(r"^model_(\d{7})\.pth$")


# ---------------------------------------------------------------------------------------------- RNG state
def get_rng_state() -> dict[str, Any]:
    """This process's Python, NumPy (global) and torch (CPU and CUDA) RNG states, as plain values/tensors."""
    np_state: Any = np.random.get_state()  # legacy tuple ('MT19937', keys, pos, has_gauss, cached)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`get_rng_state` (a checkpoint's ``rng[rank]``)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))  # fmt: skip
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -------------------------------------------------------------------------------------------- checkpoints
def find_last_checkpoint(output_dir: str) -> str | None:
    """Path named by ``OUT/last_checkpoint`` (None when there is no pointer or the file is gone)."""
    pointer = os.path.join(output_dir, LAST_CHECKPOINT)
    if not os.path.isfile(pointer):
        return None
    with open(pointer, encoding="utf-8") as f:
        name = f.read().strip()
    path = os.path.join(output_dir, name)
    return path if name and os.path.isfile(path) else None


class PeriodicCheckpointer:
    """Checkpoint every ``period`` iterations and at the end (layout in the module docstring).

    Args:
        output_dir: folder for ``model_*.pth`` and ``last_checkpoint``. period: SOLVER.CHECKPOINT_PERIOD
            (<= 0: only the final checkpoint). keep: newest periodic files to keep (>= 1).
        extra: entries added to every checkpoint (``cfg`` text, ``data_seed``, ...).
    """

    def __init__(self, output_dir: str, period: int, keep: int = 3, extra: dict[str, Any] | None = None) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.output_dir, self.period, self.keep = output_dir, int(period), int(keep)
        self.extra = dict(extra or {})

    def after_step(self, trainer: Trainer) -> None:
        i = trainer.iter
        if i >= trainer.max_iter - 1:
            self.save(trainer, "model_final.pth")
        elif self.period > 0 and (i + 1) % self.period == 0:
            self.save(trainer, f"model_{i:07d}.pth")
            if is_main_process():
                self._prune()

    def save(self, trainer: Trainer, name: str) -> None:
        """Write ``OUT/name`` and point ``last_checkpoint`` at it (collective: call on every rank)."""
        rng = all_gather_object(get_rng_state())
        if not is_main_process():
            return
        path = os.path.join(self.output_dir, name)
        save_checkpoint(path, unwrap_model(trainer.model), **trainer.state_dict(), iteration=trainer.iter,
                        rng=rng, world_size=len(rng), **self.extra)  # fmt: skip
        atomic_write(os.path.join(self.output_dir, LAST_CHECKPOINT), name + "\n", fsync=True)
        logger.info("saved checkpoint %s (iteration %d)", path, trainer.iter)

    def _prune(self) -> None:
        periodic = sorted(f for f in os.listdir(self.output_dir) if _PERIODIC.match(f))
        for name in periodic[: -self.keep]:
            os.remove(os.path.join(self.output_dir, name))


# ------------------------------------------------------------------------------------------------ metrics
class MetricsWriter:
    """``metrics.json`` lines + TensorBoard scalars every ``period`` iterations (rank 0 only)."""

    def __init__(self, output_dir: str, period: int = 20, tensorboard: bool = True) -> None:
        self.output_dir, self.period, self.tensorboard = output_dir, max(1, int(period)), tensorboard
        self.json_path = os.path.join(output_dir, "metrics.json")
        self._times: deque[float] = deque(maxlen=20)
        self._tb: Any = None

    def before_train(self, trainer: Trainer) -> None:
        if not is_main_process():
            return
        self._truncate(trainer.start_iter)
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(self.output_dir, purge_step=trainer.start_iter or None)

    def _truncate(self, start_iter: int) -> None:
        """Drop lines of iterations >= start_iter (left by a run that was interrupted after its checkpoint)."""
        if not os.path.isfile(self.json_path):
            return
        with open(self.json_path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        kept = [line for line in lines if json.loads(line).get("iteration", -1) < start_iter]
        if len(kept) != len(lines):
            atomic_write(self.json_path, "".join(kept), fsync=True)

    def after_step(self, trainer: Trainer) -> None:
        self._times.append(trainer.metrics.get("time", 0.0))
        i = trainer.iter
        if (i + 1) % self.period == 0 or i == trainer.max_iter - 1:
            eta = float(np.median(self._times)) * (trainer.max_iter - 1 - i)
            self.write(i, {**trainer.metrics, "eta_seconds": eta})

    def write(self, iteration: int, scalars: dict[str, float]) -> None:
        """One metrics.json line ``{"iteration": iteration, **scalars}`` and the scalars to TensorBoard."""
        if not is_main_process():
            return
        record = {"iteration": int(iteration), **{k: v for k, v in scalars.items() if k != "iteration"}}
        with open(self.json_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, iteration)

    def after_train(self, trainer: Trainer) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class EvalHook:
    """Run ``eval_fn()`` (collective; returns metrics on rank 0) every ``period`` iterations and at the end.

    Results are logged as ``eval/<name>`` scalars through ``writer`` and kept in ``self.results``.
    """

    def __init__(self, period: int, eval_fn: Callable[[], dict[str, float]], writer: MetricsWriter | None) -> None:
        self.period, self.eval_fn, self.writer = int(period), eval_fn, writer
        self.results: dict[int, dict[str, float]] = {}

    def after_step(self, trainer: Trainer) -> None:
        i = trainer.iter
        if self.period <= 0 or not ((i + 1) % self.period == 0 or i == trainer.max_iter - 1):
            return
        metrics = self.eval_fn()
        trainer.model.train()
        if is_main_process() and metrics:
            self.results[i] = metrics
            logger.info("evaluation at iteration %d: %s", i, json.dumps(metrics))
            if self.writer is not None:
                self.writer.write(i, {f"eval/{k}": v for k, v in metrics.items()})


class ProgressBar:
    """tqdm bar on rank 0: iteration / max_iter, ETA, iterations per second, total loss and lr."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bar: Any = None

    def before_train(self, trainer: Trainer) -> None:
        if self.enabled and is_main_process():
            from tqdm import tqdm

            self._bar = tqdm(total=trainer.max_iter, initial=trainer.start_iter, unit="it", mininterval=1.0,
                             dynamic_ncols=True, desc="train")  # fmt: skip

    def after_step(self, trainer: Trainer) -> None:
        if self._bar is not None:
            m = trainer.metrics
            self._bar.set_postfix(loss=f"{m.get('total_loss', float('nan')):.3f}", lr=f"{m.get('lr', 0):.2e}",
                                  refresh=False)  # fmt: skip
            self._bar.update(1)

    def after_train(self, trainer: Trainer) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
