"""Detector: the torch-free runtime API — images in, detections in original-image pixels out.

    from frcnn.runtime import Detector
    detector = Detector("model.onnx")                  # or "model.engine" (TensorRT), backend="auto"
    dets = detector(image_bgr)                         # uint8 [H, W, 3] -> Detections
    batch = detector([img1, img2, img3])               # list -> list[Detections]
    for box, score, cls in zip(dets.boxes, dets.scores, dets.classes):
        print(dets.class_names[cls], score, box)

Pre-processing is detectron2's test-time pipeline (:mod:`frcnn.runtime.preprocess`: ResizeShortestEdge with
Pillow bilinear, zero padding to the size divisibility, batching); post-processing scales the boxes back to
each original image, clips them and drops empty ones (:mod:`frcnn.runtime.postprocess`). The resize rule,
channel order, class names and size divisibility come from the model's metadata (ONNX ``metadata_props``
or the engine sidecar); a model without that metadata is refused.

A Detector may be called from many threads at once (the backends are thread-safe; pre- and
post-processing hold no shared state). This module never imports torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
from frcnn.runtime.backends import create_backend
from frcnn.runtime.backends.base import Backend
from frcnn.runtime.contract import MIN_PADDED_SIDE
from frcnn.runtime.detections import Detections
from frcnn.runtime.errors import UserError
from frcnn.runtime.postprocess import postprocess_detections
from frcnn.runtime.preprocess import Preprocessor
from frcnn.runtime.shape_buckets import pad_to_bucket, resolve_sides

#: ONNX batches are split to this size when neither the model nor the caller gives a max batch.
DEFAULT_ONNX_MAX_BATCH = 8
REQUIRED_METADATA = ("class_names", "resize", "input_format", "size_divisibility")


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime needs from the model's metadata."""

    class_names: list[str]
    short_edge: int
    max_size: int
    channel_order: str
    size_divisibility: int

    def preprocessor(self, input_format: str = "BGR") -> Preprocessor:
        """The model's test-time pre-processing for images in ``input_format`` channel order."""
        return Preprocessor(self.short_edge, self.max_size, input_format=input_format,
                            model_format=self.channel_order, size_divisibility=self.size_divisibility)  # fmt: skip


def parse_metadata(metadata: dict[str, str], source: str) -> ModelInfo:
    """The ModelInfo from ``metadata_props`` (or the sidecar's copy); UserError naming what is missing."""
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise UserError(f"{source} has no frcnn metadata ({', '.join(missing)} missing): the runtime needs the "
                        "class names, resize rule and channel order stored by `frcnn export`; export the model "
                        "with `frcnn export` (or copy the metadata_props of an exported model onto it)")
    try:
        names = json.loads(metadata["class_names"])
        resize = json.loads(metadata["resize"])
        fmt = json.loads(metadata["input_format"])
        info = ModelInfo(class_names=[str(n) for n in names], short_edge=int(resize["min_size"]),
                         max_size=int(resize["max_size"]), channel_order=str(fmt.get("channel_order", "BGR")),
                         size_divisibility=int(metadata["size_divisibility"]))  # fmt: skip
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{source} has malformed frcnn metadata ({type(exc).__name__}: {exc}); re-export the model "
                        "with `frcnn export`") from None
    if info.channel_order not in ("BGR", "RGB"):
        raise UserError(f"{source} metadata names channel order {info.channel_order!r}; expected BGR or RGB")
    return info


class Detector:
    """An exported Faster R-CNN ready to run on numpy images (no torch).

    Args:
        path: ``.onnx`` (ONNX Runtime) or ``.engine`` / ``.plan`` (TensorRT, with its sidecar JSON).
        backend: "auto" (by suffix), "onnxruntime" or "tensorrt".
        device: CUDA device id (TensorRT, ONNX Runtime's CUDA provider).
        providers: ONNX Runtime execution providers (``None``: CUDA if installed, then CPU; ``["cpu"]``).
        max_batch: largest batch sent to the model; larger lists are split (default: the engine profile's
            max batch, or 8 for ONNX).
        input_format: channel order of the images you pass, "BGR" (OpenCV) or "RGB" (Pillow).
        backend_options: extra keyword arguments for the backend (``intra_op_threads``, ``cuda_graph``;
            ``low_memory`` / ``cache_dir``: ONNX Runtime's pre-optimised graph cache, see
            :class:`frcnn.runtime.backends.onnxruntime.OnnxRuntimeBackend`).
        shape_buckets: pad each batch up to a fixed ladder of sides (``True``: the default ladder, or a list
            of sides) so a TensorRT engine sees few shapes; see :mod:`frcnn.runtime.shape_buckets` (opt-in:
            results are then exact to detectron2 on the padded input).
    """

    def __init__(self, path: str | os.PathLike[str], backend: str = "auto", device: int = 0, providers: Any = None,
                 max_batch: int | None = None, input_format: str = "BGR",
                 shape_buckets: bool | Sequence[int] = False, **backend_options: Any) -> None:  # fmt: skip
        if not isinstance(path, (str, os.PathLike)):
            raise UserError(f"Detector takes the path of an exported model (str or pathlib.Path), got a "
                            f"{type(path).__name__}")
        _check_max_batch(max_batch)
        if input_format not in ("BGR", "RGB"):
            raise UserError(f"input_format must be 'BGR' (OpenCV) or 'RGB' (Pillow), got {input_format!r}")
        self._closed = False
        self.path = os.fspath(path)
        self.backend: Backend = create_backend(self.path, backend, device=device, providers=providers,
                                               max_batch=max_batch, **backend_options)  # fmt: skip
        self.backend.activate()
        self.info = parse_metadata(self.backend.metadata, self.path)
        self.class_names = self.info.class_names
        self.max_batch = int(max_batch or self.backend.max_batch or DEFAULT_ONNX_MAX_BATCH)
        self.preprocessor = self.info.preprocessor(input_format)
        self.shape_sides = resolve_sides(shape_buckets, self.info.short_edge, self.info.max_size,
                                         self.info.size_divisibility)

    def __call__(self, images: np.ndarray | Sequence[np.ndarray]) -> Detections | list[Detections]:
        """One image (uint8 [H, W, 3]) -> Detections; a list of images -> a list of Detections."""
        if isinstance(images, np.ndarray):
            return self.detect([images])[0]
        if not isinstance(images, (list, tuple)):
            raise UserError(f"pass a numpy image (H, W, 3) or a list of them, got {type(images).__name__}")
        return self.detect(images)

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Detect on a list of images, ``max_batch`` at a time (an empty list gives an empty list)."""
        if self._closed:
            raise UserError(f"this Detector was closed (close() or the end of its `with` block) and cannot be used "
                            f"again; create a new one: Detector({self.path!r})")
        results: list[Detections] = []
        for start in range(0, len(images), self.max_batch):
            feed, original_sizes = self.preprocess(images[start:start + self.max_batch], start, len(images))
            outputs = self.backend.infer(feed)
            results += self.postprocess(outputs, feed["image_sizes"], original_sizes)
        return results

    def preprocess(self, images: Sequence[np.ndarray], first_index: int = 0,
                   total: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:  # fmt: skip
        """Images -> (feed {images uint8 [B, 3, H, W], image_sizes int32 [B, 2]}, original sizes int32 [B, 2]).

        ``first_index`` / ``total``: where these images sit in the caller's list (for error messages).
        """
        if len(images) == 0:
            raise UserError("no images given: pass at least one image")
        batch = self.preprocessor(list(images), first_index, total)
        feed = model_feed(batch, self.info.size_divisibility)
        if self.shape_sides:
            feed["images"] = pad_to_bucket(feed["images"], self.shape_sides)
        return feed, batch["original_sizes"]

    def postprocess(self, outputs: dict[str, np.ndarray], image_sizes: np.ndarray,
                    original_sizes: np.ndarray) -> list[Detections]:  # fmt: skip
        """Padded model outputs -> per-image Detections in original pixels (with masks when the model has them)."""
        return postprocess_detections(outputs, image_sizes, original_sizes, self.class_names)

    def close(self) -> None:
        """Free the backend (the Detector cannot be used afterwards; closing twice is harmless)."""
        self._closed = True
        self.backend.deactivate()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_max_batch(max_batch: Any) -> None:
    """UserError unless ``max_batch`` is None or a whole number >= 1 (not a bool, float or string)."""
    if max_batch is None:
        return
    if isinstance(max_batch, (bool, np.bool_)) or not isinstance(max_batch, (int, np.integer)) or max_batch < 1:
        raise UserError(f"max_batch must be a whole number >= 1 (or None for the model's own), got {max_batch!r}")


def model_feed(batch: Mapping[str, np.ndarray], size_divisibility: int) -> dict[str, np.ndarray]:
    """A :class:`Preprocessor` batch -> the model's feed: ``images`` uint8 [B, 3, H, W] zero-padded up to
    :data:`~frcnn.runtime.contract.MIN_PADDED_SIDE`, ``image_sizes`` int32 [B, 2] unchanged."""
    return {"images": pad_to_min_side(batch["images"], MIN_PADDED_SIDE, size_divisibility),
            "image_sizes": batch["image_sizes"]}  # fmt: skip


def pad_to_min_side(images: np.ndarray, min_side: int, divisibility: int) -> np.ndarray:
    """Zero-pad a batch uint8 [B, 3, H, W] so H and W are >= ``min_side`` (rounded up to ``divisibility``).

    Only extremely elongated or tiny resized images need it; the padded area is outside ``image_sizes``
    and ignored by the model.
    """
    div = max(int(divisibility), 1)
    side = -(-int(min_side) // div) * div
    b, c, h, w = images.shape
    if h >= side and w >= side:
        return images
    out = np.zeros((b, c, max(h, side), max(w, side)), dtype=images.dtype)
    out[:, :, :h, :w] = images
    return out
