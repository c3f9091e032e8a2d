"""frcnn.trainer — the one network definition, its config, data, training, evaluation and Predictor.

``from frcnn.trainer import get_cfg, build_model, Predictor``. Names are resolved lazily so that
``import frcnn.trainer.config`` does not build the whole package.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "get_cfg": "frcnn.trainer.config",
    "CfgNode": "frcnn.trainer.config",
    "model_zoo_config": "frcnn.trainer.config",
    "build_model": "frcnn.trainer.modeling",
    "Predictor": "frcnn.trainer.predictor",
    "load_checkpoint_state": "frcnn.trainer.checkpoint",
    "save_checkpoint": "frcnn.trainer.checkpoint",
}

__all__ = ["CfgNode", "Predictor", "build_model", "get_cfg", "load_checkpoint_state", "model_zoo_config", "save_checkpoint"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'frcnn.trainer' has no attribute {name!r}")
