"""The backend interface (polygraphy ``BaseRunner`` style): activate / infer / deactivate, name -> array.

A backend owns one deployed model (ONNX file or TensorRT engine). ``activate`` loads it (slow, once),
``infer`` runs one batch and may be called concurrently from many threads (each backend documents how it
guarantees that), ``deactivate`` frees it. A backend is also a context manager.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, Self

import numpy as np
from frcnn.runtime.contract import INPUTS, MASK_OUTPUTS, MODEL_INPUTS, OUTPUTS
from frcnn.runtime.errors import UserError

__all__ = ["INPUTS", "MASK_OUTPUTS", "MODEL_INPUTS", "OUTPUTS", "Backend", "check_feed",
           "polygraphy_input_metadata"]


def polygraphy_input_metadata() -> Any:
    """MODEL_INPUTS as polygraphy ``TensorMetadata`` (for runners' ``get_input_metadata_impl``)."""
    from polygraphy.common import TensorMetadata

    meta = TensorMetadata()
    for name, (dtype, shape) in MODEL_INPUTS.items():
        meta.add(name, dtype, shape)
    return meta


class Backend(ABC):
    """One deployed model behind activate / infer / deactivate.

    Attributes (valid after ``activate``):
        name: short backend name ("onnxruntime", "tensorrt").
        metadata: the model's string metadata (ONNX ``metadata_props`` or the engine sidecar's copy of them).
        max_batch: largest batch the model accepts (``None``: no limit known).
    """

    name = "backend"

    def __init__(self, path: str) -> None:
        self.path = str(path)
        self.metadata: dict[str, str] = {}
        self.max_batch: int | None = None
        self.is_active = False
        self._lock = threading.Lock()

    @abstractmethod
    def _activate(self) -> None: ...

    @abstractmethod
    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def _deactivate(self) -> None: ...

    def activate(self) -> None:
        """Load the model (idempotent, thread-safe)."""
        with self._lock:
            if not self.is_active:
                self._activate()
                self.is_active = True

    def deactivate(self) -> None:
        """Free the model; ``activate`` may be called again later."""
        with self._lock:
            if self.is_active:
                self._deactivate()
                self.is_active = False

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch.

        Args:
            feed: ``images`` uint8 [B, 3, H, W], ``image_sizes`` int32 [B, 2].
        Returns:
            ``num_detections`` int32 [B], ``boxes`` float32 [B, K, 4], ``scores`` float32 [B, K],
            ``classes`` int32 [B, K].
        """
        if not self.is_active:
            raise UserError(f"{type(self).__name__} is not active: call activate() or use `with backend:`")
        return self._infer(check_feed(feed, self.max_batch))

    def __enter__(self) -> Self:
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()


def check_feed(feed: Mapping[str, np.ndarray], max_batch: int | None = None) -> dict[str, np.ndarray]:
    """The feed as contiguous arrays of the right dtypes; UserError naming a missing / wrong input."""
    missing = [n for n in INPUTS if n not in feed]
    extra = [n for n in feed if n not in INPUTS]
    if missing or extra:
        raise UserError(f"model inputs are {list(INPUTS)}; got {sorted(feed)} (missing {missing}, unknown {extra})")
    out = {}
    for name, dtype in INPUTS.items():
        arr = np.asarray(feed[name])
        if arr.dtype != dtype:
            raise UserError(f"input {name!r} must have dtype {np.dtype(dtype).name}, got {arr.dtype}; "
                            "pre-process with frcnn.runtime.preprocess.Preprocessor")
        out[name] = np.ascontiguousarray(arr)
    images, sizes = out["images"], out["image_sizes"]
    if images.ndim != 4 or images.shape[1] != 3 or sizes.shape != (images.shape[0], 2):
        raise UserError(f"inputs must be images [B, 3, H, W] and image_sizes [B, 2]; got {images.shape} and "
                        f"{sizes.shape}")
    if max_batch is not None and images.shape[0] > max_batch:
        raise UserError(f"batch of {images.shape[0]} exceeds the model's max batch {max_batch}; split it "
                        "(the Detector does this for you)")
    return out
