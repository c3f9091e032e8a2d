"""Predictor: one image in, detections in original-image pixels out (detectron2's DefaultPredictor).

The pre- and post-processing are the runtime's (``Preprocessor``, ``postprocess_detections``), so the PyTorch
path and the deployed ONNX / TensorRT path resize, pad and rescale with the very same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike

import numpy as np
import torch
from frcnn.runtime.postprocess import postprocess_detections
from frcnn.runtime.preprocess import Preprocessor

from .checkpoint import load_checkpoint_state, load_into_model
from .config import CfgNode
from .modeling import build_model


class Predictor:
    """Run the PyTorch model on uint8 HWC images with detectron2's test-time behaviour.

    Args:
        cfg: a config (``get_cfg()`` + merges). Uses MODEL.*, INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST / FORMAT.
        weights: a checkpoint path (detectron2 ``.pth`` / model-zoo ``.pkl``); ``None`` keeps the freshly
            built weights (tests, benchmarks).
        device: torch device for the model.

    ``predictor(image)`` with ``image`` uint8 [H, W, 3] BGR (like detectron2's DefaultPredictor; it is
    flipped when the model was trained on ``INPUT.FORMAT`` RGB) returns a dict with
    ``boxes`` float32 [N, 4] (x1, y1, x2, y2 in original-image pixels), ``scores`` float32 [N] and
    ``classes`` int64 [N], N <= TEST.DETECTIONS_PER_IMAGE.
    """

    def __init__(self, cfg: CfgNode, weights: str | PathLike[str] | None = None, device: str = "cpu") -> None:
        self.cfg = cfg.clone()
        self.cfg.freeze()
        self.model = build_model(self.cfg).to(device).eval()
        if weights is not None:
            state, _meta = load_checkpoint_state(weights)
            load_into_model(self.model, state, strict=True, path=weights)
        self.device = torch.device(device)
        self.short_edge = int(cfg.INPUT.MIN_SIZE_TEST)
        self.max_size = int(cfg.INPUT.MAX_SIZE_TEST)
        self.model_format = str(cfg.INPUT.FORMAT)
        self.preprocessor = Preprocessor(self.short_edge, self.max_size, "BGR", self.model_format)

    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        return self.predict_batch([image])[0]

    @torch.inference_mode()
    def predict_batch(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Detect on several images at once (one padded batch); same results as one at a time."""
        batch = self.preprocessor(list(images))
        sizes = batch["image_sizes"]
        out = self.model(torch.from_numpy(batch["images"]).to(self.device), torch.from_numpy(sizes).to(self.device))
        out = {k: v.cpu().numpy() for k, v in out.items()}
        return [d.as_dict() for d in postprocess_detections(out, sizes, batch["original_sizes"])]
