"""Calibration images for INT8: read, checked and pre-processed exactly as the runtime's Detector does.

``CalibrationImages(model_info, folder, count)`` decodes the first ``count`` images (sorted names) of
``folder`` up front (and again when iterating, to keep them out of memory), so a missing/empty folder or an undecodable file fails before any quantization work.
Iterating over it yields the feeds the model sees at inference (batch 1): ``images`` uint8 [1, 3, H, W]
resized by the model's ResizeShortestEdge rule, padded to its size divisibility; ``image_sizes`` int32 [1, 2].
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
from frcnn.runtime.detector import ModelInfo, model_feed
from frcnn.runtime.errors import UserError
from frcnn.runtime.image_io import ImageError, read_rgb
from frcnn.runtime.infer_cli import IMAGE_SUFFIXES

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
"""Activation range estimators (ONNX Runtime's MinMax, Entropy, Percentile calibrators)."""
DEFAULT_CALIB_COUNT = 64


def list_images(folder: str | os.PathLike[str]) -> list[str]:
    """Image files in ``folder`` (non-recursive, sorted); UserError when it is missing or holds none."""
    path = os.fspath(folder)
    if not os.path.isdir(path):
        raise UserError(f"--calib-images {path}: no such folder; pass a folder of representative images (e.g. "
                        "a few hundred from your validation set)")
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise UserError(f"--calib-images {path} holds no images ({', '.join(IMAGE_SUFFIXES)}); put "
                        "representative images there (a few hundred from your validation set)")
    return files


def read_image(path: str) -> np.ndarray:
    """uint8 [H, W, 3] RGB through the runtime's one image reader (as ``frcnn infer`` and the trainer read
    images: same modes, EXIF orientation, size limit)."""
    try:
        return read_rgb(path)
    except ImageError as exc:
        raise UserError(f"calibration image {path} cannot be decoded ({exc}); replace it or remove it from the "
                        "folder") from None


class CalibrationImages:
    """The calibration set of one model (see the module docstring).

    Args:
        info: the model's metadata (``frcnn.runtime.detector.parse_metadata``).
        folder: folder of images.
        count: use the first ``count`` images (sorted names); ``None``: all of them.
    """

    def __init__(self, info: ModelInfo, folder: str | os.PathLike[str], count: int | None = None) -> None:
        if count is not None and int(count) < 1:
            raise UserError(f"--calib-count must be >= 1, got {count}")
        self.files = list_images(folder)[: None if count is None else int(count)]
        self.info = info
        self.preprocessor = info.preprocessor("RGB")
        for f in self.files:  # every file decodes before any quantization work starts (kept out of memory)
            _checked(read_image(f), f)

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for f in self.files:
            yield model_feed(self.preprocessor([read_image(f)]), self.info.size_divisibility)


def _checked(img: np.ndarray, path: str) -> np.ndarray:
    if img.ndim != 3 or img.shape[0] < 1 or img.shape[1] < 1:
        raise UserError(f"calibration image {path} has shape {img.shape}; expected a non-empty color image")
    return img
