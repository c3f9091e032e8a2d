"""Datasets for training and evaluation: COCO loading, the dataset mapper, loaders, the synthetic dataset.

``coco`` and ``synth`` need only numpy + Pillow and are imported eagerly; ``mapper`` and ``loader`` (torch)
are imported on first use, so ``frcnn data synth`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from .coco import (
    DatasetMeta,
    DatasetWarning,
    LoadStats,
    dataset_paths,
    filter_images_without_annotations,
    load_coco_json,
    load_coco_split,
    load_dataset,
)
from .synth import SHAPE_NAMES, synthesize_dataset

_LAZY = {
    "DatasetMapper": "mapper",
    "read_image": "mapper",
    "transform_boxes": "mapper",
    "build_train_loader": "loader",
    "build_test_loader": "loader",
    "trivial_batch_collator": "loader",
}

__all__ = [
    "SHAPE_NAMES",
    "DatasetMapper",
    "DatasetMeta",
    "DatasetWarning",
    "LoadStats",
    "build_test_loader",
    "build_train_loader",
    "dataset_paths",
    "filter_images_without_annotations",
    "load_coco_json",
    "load_coco_split",
    "load_dataset",
    "read_image",
    "synthesize_dataset",
    "transform_boxes",
    "trivial_batch_collator",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
