"""Predictor: one image in, detections in original-image pixels out (detectron2's DefaultPredictor).

The pre- and post-processing are the runtime's (``Preprocessor``, ``postprocess_detections``), so the PyTorch
path and the deployed ONNX / TensorRT path resize, pad and rescale with the very same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike

import numpy as np
import torch
from frcnn.runtime.errors import CheckpointError
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
    ``classes`` int64 [N], N <= TEST.DETECTIONS_PER_IMAGE; with MODEL.MASK_ON also ``masks`` bool [N, H, W]
    (detectron2's ``paste_masks_in_image``, threshold 0.5, via frcnn.runtime.masks).

    ``predictor.class_names``: the names of classes 0..K-1 stored in the checkpoint by ``frcnn train``
    (``class_names``), or None (detectron2 model-zoo files store none; their 80 classes are COCO's).
    A stored list whose length differs from MODEL.ROI_HEADS.NUM_CLASSES is refused (CheckpointError).
    """

    def __init__(self, cfg: CfgNode, weights: str | PathLike[str] | None = None, device: str = "cpu") -> None:
        self.cfg = cfg.clone()
        self.cfg.freeze()
        self.model = build_model(self.cfg).to(device).eval()
        self.class_names: list[str] | None = None
        if weights is not None:
            state, meta = load_checkpoint_state(weights)
            load_into_model(self.model, state, strict=True, path=str(weights))
            self.class_names = _stored_class_names(meta, int(cfg.MODEL.ROI_HEADS.NUM_CLASSES), str(weights))
        self.device = torch.device(device)
        self.short_edge = int(cfg.INPUT.MIN_SIZE_TEST)
        self.max_size = int(cfg.INPUT.MAX_SIZE_TEST)
        self.model_format = str(cfg.INPUT.FORMAT)
        self.preprocessor = Preprocessor(self.short_edge, self.max_size, "BGR", self.model_format)

    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        return self.predict_batch([image])[0]

    @torch.inference_mode()
    def predict_batch(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Detect on several images at once: one padded batch, one forward pass.

        Contract: the result equals detectron2's ``GeneralizedRCNN.inference`` on the *same batch* (same
        resize, the same padding to the batch's largest size rounded up to a multiple of 32). It is not
        always equal to calling the predictor one image at a time: images of different sizes are padded to
        the batch's size, and detectron2 generates anchors over the whole padded feature map, so a smaller
        image gets extra anchors in its padding; they can change which proposals survive the RPN top-k and
        NMS, hence (slightly) the detections. Images that pad to the same size get the same detections as one
        at a time (up to floating-point rounding of batched convolutions). Use ``predictor(image)`` per image
        when results must not depend on the batch.
        """
        batch = self.preprocessor(list(images))
        sizes = batch["image_sizes"]
        out = self.model(torch.from_numpy(batch["images"]).to(self.device), torch.from_numpy(sizes).to(self.device))
        out = {k: v.cpu().numpy() for k, v in out.items()}
        return [d.as_dict() for d in postprocess_detections(out, sizes, batch["original_sizes"])]


def _stored_class_names(meta: dict, num_classes: int, path: str) -> list[str] | None:
    names = meta.get("class_names")
    if names is None:
        return None
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"checkpoint '{path}' stores 'class_names' that is not a list of names")
    if len(names) != num_classes:
        raise CheckpointError(f"checkpoint '{path}' stores {len(names)} class names but the config has "
                              f"MODEL.ROI_HEADS.NUM_CLASSES {num_classes}; use the config it was trained with")
    return list(names)
