"""Training: optimizer and schedule (solver), the loop (trainer), hooks, distributed setup (launch).

    from frcnn.trainer.engine import train
    train(cfg, data_dir, output_dir, resume=False)      # what `frcnn train` runs, also under torchrun

Pieces for custom loops: build_optimizer / build_lr_scheduler (solver.py), Trainer (trainer.py),
PeriodicCheckpointer / MetricsWriter / EvalHook / ProgressBar (hooks.py), evaluate_model (inference.py),
resumable_train_loader (resume.py).
"""

from .hooks import EvalHook, MetricsWriter, PeriodicCheckpointer, ProgressBar, find_last_checkpoint
from .inference import evaluate_model, predict_dataset
from .launch import init_distributed, seed_all, train
from .resume import resumable_train_loader
from .solver import (
    LRMultiplier,
    build_lr_scheduler,
    build_optimizer,
    clip_gradients,
    get_default_optimizer_params,
)
from .trainer import NonFiniteLossError, Trainer, batch_to_inputs

__all__ = [
    "EvalHook",
    "LRMultiplier",
    "MetricsWriter",
    "NonFiniteLossError",
    "PeriodicCheckpointer",
    "ProgressBar",
    "Trainer",
    "batch_to_inputs",
    "build_lr_scheduler",
    "build_optimizer",
    "clip_gradients",
    "evaluate_model",
    "find_last_checkpoint",
    "get_default_optimizer_params",
    "init_distributed",
    "predict_dataset",
    "resumable_train_loader",
    "seed_all",
    "train",
]
