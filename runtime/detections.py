"""Detections: the one result type of the detector, whichever way it runs (torch-free).

The runtime :class:`~frcnn.runtime.detector.Detector` returns one per image; the PyTorch
:class:`~frcnn.trainer.predictor.Predictor` and the COCO evaluation build the same object from the same
post-processing (:func:`frcnn.runtime.postprocess.postprocess_detections`) and hand out its plain-array
form (:meth:`Detections.as_dict`, detectron2 / torchvision style ``{"boxes", "scores", "classes"}``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Detections:
    """Detections of one image, in original-image pixels.

    boxes: float32 [N, 4] (x1, y1, x2, y2); scores: float32 [N] (descending); classes: int64 [N]
    (indices into ``class_names``); class_names: the model's class names (all of them, not per box; empty
    when the caller has none, e.g. a Predictor without stored names); masks: bool [N, H, W] instance masks in
    the original image (Mask R-CNN models; None for box models), ``frcnn.runtime.masks.masks_to_rle``
    encodes them for COCO results.
    """

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    class_names: list[str] = field(default_factory=list)
    masks: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.scores)

    def labels(self) -> list[str]:
        """Class name of every detection."""
        return [self.class_names[int(c)] for c in self.classes]

    def as_dict(self) -> dict[str, np.ndarray]:
        """``{"boxes": [N, 4], "scores": [N], "classes": [N]}`` (+ ``"masks"`` [N, H, W] for Mask R-CNN): the
        Predictor's plain-array output."""
        out = {"boxes": self.boxes, "scores": self.scores, "classes": self.classes}
        return out if self.masks is None else {**out, "masks": self.masks}
