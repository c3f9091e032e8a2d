"""Triton python-backend model of a ``frcnn triton-repo`` repository (copied there as ``<model>/1/model.py``).

One file, two stages chosen by the config parameter ``stage``:

``preprocess``   image bytes [1] -> images uint8 [3, H, W], image_sizes int32 [2], original_sizes int32 [2]
                 (decode, ResizeShortestEdge, model channel order, padding: frcnn.runtime's Detector rules).
``postprocess``  the detector's outputs + image_sizes + original_sizes -> num_detections int32 [1],
                 boxes float32 [N, 4] in original pixels, scores float32 [N], classes int32 [N],
                 class_names bytes [N] (N >= 1: rows past num_detections are padding).

A bad request (not an image, empty, too large) gets its own TritonError; the rest of the batch is served.
Needs ``frcnn-deploy`` (numpy + Pillow) in the server's Python; never torch.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by Triton's python backend
from frcnn.runtime.backends.triton import METADATA_PARAMETER
from frcnn.runtime.contract import OUTPUT_NAMES
from frcnn.runtime.detector import model_feed, parse_metadata
from frcnn.runtime.postprocess import postprocess_detections
from frcnn.runtime.preprocess import Preprocessor
from frcnn.runtime.serving.requests import RequestError, decode_image, pad_axis1


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.stage = params["stage"]
        self.info = parse_metadata(json.loads(params[METADATA_PARAMETER]), config["name"])
        self.preprocessor = Preprocessor(self.info.short_edge, self.info.max_size, input_format="RGB",
                                         model_format=self.info.channel_order,
                                         size_divisibility=self.info.size_divisibility)  # fmt: skip

    def execute(self, requests: list[Any]) -> list[Any]:
        step = self._preprocess if self.stage == "preprocess" else self._postprocess
        responses = []
        for request in requests:
            try:
                tensors = step(request)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in tensors.items()]))
            except RequestError as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        return responses

    def _input(self, request: Any, name: str) -> np.ndarray:
        return pb_utils.get_input_tensor_by_name(request, name).as_numpy()

    def _preprocess(self, request: Any) -> dict[str, np.ndarray]:
        data = self._input(request, "image").reshape(-1)
        if data.size != 1:
            raise RequestError(f"send one encoded image per request, got {data.size}")
        batch = self.preprocessor([decode_image(bytes(data[0]))])
        feed = model_feed(batch, self.info.size_divisibility)
        return {"images": feed["images"], "image_sizes": feed["image_sizes"].astype(np.int32),
                "original_sizes": batch["original_sizes"].astype(np.int32)}  # fmt: skip

    def _postprocess(self, request: Any) -> dict[str, np.ndarray]:
        outputs = {n: self._input(request, n) for n in OUTPUT_NAMES}
        outputs["num_detections"] = outputs["num_detections"].reshape(-1)
        dets, = postprocess_detections(outputs, self._input(request, "image_sizes"),
                                       self._input(request, "original_sizes"), self.info.class_names)
        boxes, scores, classes, names = dets.boxes, dets.scores, dets.classes, dets.labels()
        labels = np.array([[n.encode() for n in names]], dtype=np.object_).reshape(1, len(names))
        return {"num_detections": np.array([[len(names)]], np.int32),
                "boxes": pad_axis1(boxes.astype(np.float32)[None]), "scores": pad_axis1(scores.astype(np.float32)[None]),
                "classes": pad_axis1(classes.astype(np.int32)[None]),
                "class_names": pad_axis1(labels) if labels.size else np.array([[b""]], dtype=np.object_)}
