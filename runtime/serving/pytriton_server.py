"""``frcnn serve``: a real Triton Inference Server around a Detector, through PyTriton.

Two models, both with Triton's dynamic batcher and ``instances`` model instances (threads of this process
sharing the Detector, whose backends are thread-safe):

``frcnn``        the detector on pre-processed tensors, for ``Detector("http://HOST:PORT/frcnn")``:
                 images uint8 [3, H, W], image_sizes int32 [2] -> num_detections int32 [1], boxes float32 [K, 4],
                 scores float32 [K], classes int32 [K], error bytes [1] (per request, batch axis implied).
``frcnn_image``  the whole pipeline on encoded image bytes (same interface as the ensemble ``frcnn triton-repo``
                 writes): image bytes [1] -> num_detections int32 [1], boxes float32 [N, 4] in original pixels,
                 scores float32 [N], classes int32 [N], class_names bytes [N], error bytes [1]. N >= 1: rows
                 past num_detections are padding (PyTriton cannot send zero-size arrays).

A bad request gets its reason in ``error`` (empty on success) and no detections; the rest of its batch is served.
The model's frcnn metadata is published in the ``frcnn`` config as parameter ``METADATA_PARAMETER``.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from frcnn.runtime.backends.base import OUTPUTS
from frcnn.runtime.backends.triton import ERROR_OUTPUT, METADATA_PARAMETER
from frcnn.runtime.detector import Detector
from frcnn.runtime.errors import UserError
from frcnn.runtime.serving.requests import RequestError, check_feed, decode_image, pad_axis1, run_grouped

DETECTOR_MODEL = "frcnn"
IMAGE_MODEL = "frcnn_image"


@dataclass(frozen=True)
class ServeOptions:
    """Where and how to serve (ports 0 are not allowed: Triton needs fixed ports)."""

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = 8
    instances: int = 1
    max_queue_delay_us: int = 2000


def python_libdir_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default os.environ) with the running interpreter's libpython folder first on LD_LIBRARY_PATH.

    PyTriton's backend stub loads ``libpython3.X.so`` by name; without this a pyenv / venv interpreter's stub
    can pick up the system's libpython of another patch version and die at start-up
    (``'_thread.RLock' object has no attribute '_recursion_count'``).
    """
    env = dict(os.environ if env is None else env)
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and os.path.isdir(libdir):
        parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != libdir]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *parts])
    return env


def _error_row(message: str) -> np.ndarray:
    return np.array([[message.encode()]], dtype=np.bytes_)


def detector_infer_fn(detector: Detector) -> Callable[[Sequence[Any]], list[dict[str, np.ndarray]]]:
    """PyTriton callable of the ``frcnn`` model: a list of requests -> a list of responses."""
    divisibility = max(detector.info.size_divisibility, 1)

    def infer(requests: Sequence[Any]) -> list[dict[str, np.ndarray]]:
        feeds: list[dict[str, np.ndarray] | None] = []
        errors: list[str] = []
        for request in requests:
            feed = {"images": request["images"], "image_sizes": request["image_sizes"]}
            try:
                check_feed(feed["images"], feed["image_sizes"], divisibility)
                feeds.append(feed)
                errors.append("")
            except RequestError as exc:
                feeds.append(None)
                errors.append(str(exc))
        results = _run(detector, feeds, errors)
        return [_detector_response(out, err, len(req["images"])) for out, err, req in zip(results, errors, requests)]

    return infer


def _run(detector: Detector, feeds: list[Any], errors: list[str]) -> list[Any]:
    """run_grouped on the checked feeds; a failed group's message goes to ``errors`` of its members."""
    results = run_grouped(detector.backend.infer, feeds)
    for i, result in enumerate(results):
        if isinstance(result, str):
            errors[i], results[i] = result, None
    return results


def _detector_response(out: dict[str, np.ndarray] | None, error: str, rows: int) -> dict[str, np.ndarray]:
    if out is None:
        out = {"num_detections": np.zeros(rows, np.int32), "boxes": np.zeros((rows, 0, 4), np.float32),
               "scores": np.zeros((rows, 0), np.float32), "classes": np.zeros((rows, 0), np.int32)}  # fmt: skip
    response = {k: np.ascontiguousarray(out[k], dtype=dtype) for k, dtype in OUTPUTS.items()}
    response = {k: (v.reshape(rows, 1) if k == "num_detections" else pad_axis1(v)) for k, v in response.items()}
    response[ERROR_OUTPUT] = np.repeat(_error_row(error), rows, axis=0)
    return response


def image_infer_fn(detector: Detector) -> Callable[[Sequence[Any]], list[dict[str, np.ndarray]]]:
    """PyTriton callable of the ``frcnn_image`` model: encoded image bytes -> detections in original pixels."""

    def infer(requests: Sequence[Any]) -> list[dict[str, np.ndarray]]:
        feeds: list[Any] = []
        originals: list[Any] = []
        errors: list[str] = []
        for request in requests:
            try:
                data = np.asarray(request["image"]).reshape(-1)
                if data.size != 1:
                    raise RequestError(f"send one encoded image per request, got {data.size}")
                rgb = decode_image(bytes(data[0]))
                feed, original, error = *detector.preprocess([rgb]), ""
            except UserError as exc:  # RequestError included
                feed, original, error = None, None, str(exc)
            feeds.append(feed)
            originals.append(original)
            errors.append(error)
        results = _run(detector, feeds, errors)
        responses = []
        for out, feed, original, err in zip(results, feeds, originals, errors):
            dets = detector.postprocess(out, feed["image_sizes"], original)[0] if out is not None else None
            responses.append(_image_response(dets, err))
        return responses

    return infer


def _image_response(dets: Any, error: str) -> dict[str, np.ndarray]:
    if dets is None:
        boxes, scores, classes, names = np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32), []
    else:
        boxes, scores, classes, names = dets.boxes, dets.scores, dets.classes, dets.labels()
    labels = np.array([[n.encode() for n in names]], dtype=np.bytes_).reshape(1, len(names))
    return {"num_detections": np.array([[len(names)]], np.int32),
            "boxes": pad_axis1(boxes.astype(np.float32)[None]), "scores": pad_axis1(scores.astype(np.float32)[None]),
            "classes": pad_axis1(classes.astype(np.int32)[None]),
            "class_names": pad_axis1(labels if labels.size else np.zeros((1, 0), np.bytes_)),
            ERROR_OUTPUT: _error_row(error)}  # fmt: skip


def import_pytriton() -> Any:
    """The ``pytriton`` modules used here; UserError naming the extra when missing."""
    try:
        from pytriton import model_config, triton
    except ImportError as exc:
        raise UserError(f"`frcnn serve` needs PyTriton (`pip install frcnn-deploy[serve]`): {exc}") from None
    return model_config, triton


def build_server(detector: Detector, options: ServeOptions) -> Any:
    """A configured (not yet started) ``pytriton.triton.Triton`` with both models bound.

    The statistics endpoint stays open (PyTriton protects it by default) so that clients and monitoring
    can read the batch sizes; model-repository, shared-memory and the rest keep PyTriton's token.
    """
    mc, tr = import_pytriton()
    os.environ.update(python_libdir_env())  # inherited by tritonserver and its python backend stubs
    config = tr.TritonConfig(http_address=options.host, http_port=options.http_port, grpc_address=options.host,
                             grpc_port=options.grpc_port, metrics_port=options.metrics_port, exit_timeout_secs=5,
                             log_verbose=0)  # fmt: skip
    restricted = [e for e in tr.DEFAULT_PROTECTED_ENDPOINTS if e != "statistics"]
    server = tr.Triton(config=config, security_config=tr.TritonSecurityConfig(restricted_endpoints=restricted))
    model_config = mc.ModelConfig(max_batch_size=options.max_batch, batcher=mc.DynamicBatcher(
        max_queue_delay_microseconds=options.max_queue_delay_us))  # fmt: skip

    def t(name: str, dtype: Any, shape: tuple[int, ...]) -> Any:
        return mc.Tensor(name=name, dtype=dtype, shape=shape)

    common = [t("boxes", np.float32, (-1, 4)), t("scores", np.float32, (-1,)), t("classes", np.int32, (-1,))]
    server.bind(DETECTOR_MODEL, [detector_infer_fn(detector)] * options.instances,
                inputs=[t("images", np.uint8, (3, -1, -1)), t("image_sizes", np.int32, (2,))],
                outputs=[t("num_detections", np.int32, (1,)), *common, t(ERROR_OUTPUT, bytes, (1,))],
                config=model_config)  # fmt: skip
    server.bind(IMAGE_MODEL, [image_infer_fn(detector)] * options.instances, inputs=[t("image", bytes, (1,))],
                outputs=[t("num_detections", np.int32, (1,)), *common, t("class_names", bytes, (-1,)),
                         t(ERROR_OUTPUT, bytes, (1,))],
                config=model_config)  # fmt: skip
    _publish_metadata(server, DETECTOR_MODEL, detector.backend.metadata)
    return server


def _publish_metadata(server: Any, model_name: str, metadata: dict[str, str]) -> None:
    """Put the frcnn metadata into the model's Triton config parameters.

    PyTriton has no public hook for config parameters; its Model keeps the generated ``TritonModelConfig``
    (whose ``backend_parameters`` become the config's ``parameters``), which is filled here before start-up.
    tests/test_serve.py reads the parameter back from the running server, so a PyTriton change fails there.
    """
    models = [m for m in server._model_manager.models if m.model_name == model_name]
    if len(models) != 1:
        raise RuntimeError(f"PyTriton internals changed: cannot find bound model {model_name!r}")
    params = models[0]._get_triton_model_config().backend_parameters
    params[METADATA_PARAMETER] = json.dumps(metadata, sort_keys=True)
