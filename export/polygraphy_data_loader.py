"""polygraphy data loader: real, pre-processed images for the exported detector.

    FRCNN_IMAGES=path/to/images polygraphy run model.onnx --onnxrt \\
        --data-loader-script export/polygraphy_data_loader.py:load_data

Environment:
- ``FRCNN_IMAGES``: an image file, a folder of images, or several of them joined by ``os.pathsep``
  (unset: one synthetic 480x640 image, deterministic);
- ``FRCNN_MODEL``: the exported ONNX (or an engine with its sidecar) whose metadata gives the resize rule
  and channel order (unset: detectron2's COCO test resize, short edge 800 / max 1333, BGR);
- ``FRCNN_BATCH``: images per feed (default 1).

Each feed is ``{"images": uint8 [B, 3, H, W], "image_sizes": int32 [B, 2]}``, exactly what the Detector sends
(frcnn.runtime.preprocess + padding). Torch-free.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from frcnn.runtime.detector import ModelInfo


def _model_info() -> ModelInfo:
    """The resize rule, channel order and size divisibility from FRCNN_MODEL's metadata, else defaults."""
    from frcnn.runtime.detector import ModelInfo, parse_metadata

    model = os.environ.get("FRCNN_MODEL")
    if not model:
        return ModelInfo(class_names=[], short_edge=800, max_size=1333, channel_order="BGR", size_divisibility=32)
    if model.endswith((".engine", ".plan")):
        from frcnn.export.engine import read_sidecar

        metadata = read_sidecar(model).get("metadata", {})
    else:
        import onnx

        metadata = {p.key: p.value for p in onnx.load(model, load_external_data=False).metadata_props}
    return parse_metadata(metadata, model)


def _images() -> list[np.ndarray]:
    """RGB uint8 images named by FRCNN_IMAGES (or one synthetic image)."""
    from frcnn.runtime.image_io import read_rgb
    from frcnn.runtime.infer_cli import collect_images

    spec = os.environ.get("FRCNN_IMAGES")
    if not spec:
        rng = np.random.default_rng(0)
        small = rng.integers(0, 256, (31, 41, 3), dtype=np.uint8)
        return [np.ascontiguousarray(np.repeat(np.repeat(small, 16, axis=0), 16, axis=1)[:480, :640])]
    return [read_rgb(f) for f in collect_images([p for p in spec.split(os.pathsep) if p])]


def load_data() -> Iterator[dict[str, np.ndarray]]:
    """Yield the feeds (see the module docstring)."""
    from frcnn.runtime.detector import model_feed

    info = _model_info()
    pre = info.preprocessor("RGB")
    images = _images()
    batch = max(1, int(os.environ.get("FRCNN_BATCH", "1")))
    for start in range(0, len(images), batch):
        yield model_feed(pre(images[start:start + batch]), info.size_divisibility)


if __name__ == "__main__":  # a quick look at what polygraphy would be fed
    for k, feed in enumerate(load_data()):
        print(k, json.dumps({n: [str(a.dtype), list(a.shape)] for n, a in feed.items()}))
