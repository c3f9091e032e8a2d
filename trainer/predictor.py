"""Predictor: one image in, detections in original-image pixels out (detectron2's DefaultPredictor).

The pre- and post-processing are the runtime's NumPy functions (frcnn.runtime.preprocess / postprocess), so
the PyTorch path and the deployed ONNX / TensorRT path resize, pad and rescale with the very same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike

import numpy as np
import torch
from frcnn.runtime.errors import CheckpointError
from frcnn.runtime.masks import detector_postprocess_masks
from frcnn.runtime.postprocess import detector_postprocess
from frcnn.runtime.preprocess import batch_images, resize_image, resize_shortest_edge_size, validate_image

from .checkpoint import load_checkpoint_state, load_into_model
from .config import CfgNode
from .modeling import build_model

Detections = dict[str, np.ndarray]


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

    ``predictor.class_names``: the names of classes 0..K-1 stored in the checkpoint by ``frcnn train``
    (``class_names``), or None (detectron2 model-zoo files store none; their 80 classes are COCO's).
    A stored list whose length differs from MODEL.ROI_HEADS.NUM_CLASSES is refused (CheckpointError).
    ``classes`` int64 [N], N <= TEST.DETECTIONS_PER_IMAGE; with MODEL.MASK_ON also ``masks`` bool [N, H, W]
    (detectron2's ``paste_masks_in_image``, threshold 0.5, via frcnn.runtime.masks).
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

    def __call__(self, image: np.ndarray) -> Detections:
        return self.predict_batch([image])[0]

    @torch.inference_mode()
    def predict_batch(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Detect on several images at once: one padded batch, one forward pass.

        Contract: the result equals detectron2's ``GeneralizedRCNN.inference`` on the *same batch* (same
        resize, the same padding to the batch's largest size rounded up to a multiple of 32). It is not
        always equal to calling the predictor one image at a time: images of different sizes are padded to
        the batch's size, and detectron2 generates anchors over the whole padded feature map, so a smaller
        image gets extra anchors in its padding; they can change which proposals survive the RPN top-k and
        NMS, hence (slightly) the detections. Images that pad to the same size get the same detections as one
        at a time (up to floating-point rounding of batched convolutions). Use ``predictor(image)`` per image when results must not depend on the batch.
        """
        originals = [validate_image(img, input_format="BGR", model_format=self.model_format) for img in images]
        resized = []
        for img in originals:
            newh, neww = resize_shortest_edge_size(img.shape[0], img.shape[1], self.short_edge, self.max_size)
            resized.append(resize_image(img, newh, neww))
        batch, sizes = batch_images(resized)
        out = self.model(torch.from_numpy(batch).to(self.device), torch.from_numpy(sizes).to(self.device))
        out = {k: v.cpu().numpy() for k, v in out.items()}
        results = []
        for i, img in enumerate(originals):
            n = int(out["num_detections"][i])
            boxes, scores, classes = detector_postprocess(
                out["boxes"][i, :n], out["scores"][i, :n], out["classes"][i, :n],
                resized_hw=(int(sizes[i, 0]), int(sizes[i, 1])), original_hw=img.shape[:2],
            )
            result = {"boxes": boxes, "scores": scores, "classes": classes.astype(np.int64)}
            if "masks" in out:
                result["masks"] = detector_postprocess_masks(
                    out["masks"][i, :n], out["boxes"][i, :n], (int(sizes[i, 0]), int(sizes[i, 1])), img.shape[:2])
            results.append(result)
        return results


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
