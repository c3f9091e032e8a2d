"""The exported detector's I/O contract: the one home of its tensor names, dtypes, shapes and input limits.

Every side that produces or consumes the deployed model imports these names instead of spelling them: the
exporter (``frcnn.export.onnx_export``, ``naming``), the runtime backends (``frcnn.runtime.backends``), the
polygraphy runners, scripts and ``frcnn parity``. Torch-free (numpy only); see docs/export.md for the model
the contract describes.

Inputs:
    ``images`` uint8 [B, 3, H, W] (channels in the model's ``channel_order``, 0..255, resized and padded;
    H, W >= :data:`MIN_PADDED_SIDE`), ``image_sizes`` int32 [B, 2] (valid height, width of each image).
Outputs (T = the model's ``detections_per_image``, detectron2's ``TEST.DETECTIONS_PER_IMAGE``):
    ``num_detections`` int32 [B], ``boxes`` float32 [B, T, 4] (x1, y1, x2, y2 in resized-image pixels),
    ``scores`` float32 [B, T], ``classes`` int32 [B, T]; rows ``>= num_detections[b]`` are padding.
Optional debug outputs (``--proposals`` exports): ``proposals`` float32 [B, P, 4], ``num_proposals`` int32
[B].
Mask R-CNN exports add ``masks`` (:data:`MASK_OUTPUTS`) after the detection outputs.
"""

from __future__ import annotations

import numpy as np

INPUTS: dict[str, type] = {"images": np.uint8, "image_sizes": np.int32}
"""Model inputs, in graph order: name -> numpy dtype."""

OUTPUTS: dict[str, type] = {"num_detections": np.int32, "boxes": np.float32, "scores": np.float32,
                            "classes": np.int32}  # fmt: skip
"""Model outputs, in graph order: name -> numpy dtype."""

MASK_OUTPUTS: dict[str, type] = {"masks": np.float32}
"""Outputs of Mask R-CNN exports only (MODEL.MASK_ON), after the detection outputs: ``masks`` float32
[B, T, M, M], each detection's class probabilities on its box (:mod:`frcnn.runtime.masks` pastes them)."""

PROPOSAL_OUTPUTS: dict[str, type] = {"proposals": np.float32, "num_proposals": np.int32}
"""Extra outputs of a model exported with proposals (for parity debugging), in graph order."""

INPUT_NAMES: tuple[str, ...] = tuple(INPUTS)
OUTPUT_NAMES: tuple[str, ...] = tuple(OUTPUTS)
COUNT_OUTPUT = "num_detections"
"""The output that says how many leading rows of each image's per-detection outputs are valid."""
DETECTION_OUTPUT_NAMES: tuple[str, ...] = tuple(name for name in OUTPUTS if name != COUNT_OUTPUT)
"""The per-detection outputs (``boxes``, ``scores``, ``classes``: [B, T, ...], padding after the count)."""
MASK_OUTPUT_NAMES: tuple[str, ...] = tuple(MASK_OUTPUTS)
PROPOSAL_NAMES: tuple[str, ...] = tuple(PROPOSAL_OUTPUTS)

INPUT_SHAPES: dict[str, tuple[int | None, ...]] = {"images": (None, 3, None, None), "image_sizes": (None, 2)}
"""Input shapes, ``None`` for a dynamic axis (batch, height, width)."""

MODEL_INPUTS: dict[str, tuple[type, tuple[int | None, ...]]] = {
    name: (dtype, INPUT_SHAPES[name]) for name, dtype in INPUTS.items()
}
"""name -> (dtype, shape): what a polygraphy runner reports as its input metadata."""

MIN_PADDED_SIDE = 65
"""Smallest padded H / W the exported graph accepts: torch.export specialises H, W >= 65 because the FPN's
P6 level (stride 64) must be larger than 1x1. The runtime pads smaller batches up to it."""

__all__ = [
    "COUNT_OUTPUT",
    "DETECTION_OUTPUT_NAMES",
    "INPUTS",
    "INPUT_NAMES",
    "INPUT_SHAPES",
    "MASK_OUTPUTS",
    "MASK_OUTPUT_NAMES",
    "MIN_PADDED_SIDE",
    "MODEL_INPUTS",
    "OUTPUTS",
    "OUTPUT_NAMES",
    "PROPOSAL_NAMES",
    "PROPOSAL_OUTPUTS",
]
