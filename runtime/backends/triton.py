"""Triton Inference Server backend: inference on a server, pre/post-processing stays in the calling process.

    detector = Detector("http://127.0.0.1:8000/frcnn")     # or "grpc://127.0.0.1:8001/frcnn"

The URL names the protocol (``http`` / ``grpc``, KServe v2), the server and the model (default ``frcnn``).
The model is either the one ``frcnn serve`` binds or the detector of a repository written by
``frcnn triton-repo`` (inputs ``images`` / ``image_sizes``, outputs as in :mod:`frcnn.runtime.backends.base`).
The model's frcnn metadata travels in its Triton config as the string parameter ``METADATA_PARAMETER`` (JSON
of the ONNX ``metadata_props``); ``max_batch`` is the config's ``max_batch_size``.

Thread safety: tritonclient's HTTP client (geventhttpclient) is not thread-safe, so each calling thread gets
its own client (gRPC likewise, for symmetry); ``deactivate`` closes them all. Needs the ``serve`` extra
(``tritonclient[http,grpc]``), imported only when a URL is opened.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from typing import Any

import numpy as np
from frcnn.runtime.backends.base import INPUTS, OUTPUTS, Backend
from frcnn.runtime.errors import UserError

SCHEMES = ("http", "grpc")
DEFAULT_MODEL = "frcnn"
#: Name of the Triton config parameter holding the model's frcnn metadata (JSON object of strings).
METADATA_PARAMETER = "frcnn_metadata"
#: Optional per-request output of ``frcnn serve``: empty on success, else why the request was refused.
ERROR_OUTPUT = "error"
_TRITON_DTYPES = {np.uint8: "UINT8", np.int32: "INT32", np.float32: "FP32"}


def is_url(path: str) -> bool:
    """True for ``http://...`` / ``grpc://...`` model locations."""
    return urllib.parse.urlsplit(str(path)).scheme.lower() in SCHEMES


def parse_url(url: str) -> tuple[str, str, str]:
    """``"grpc://host:8001/frcnn"`` -> ("grpc", "host:8001", "frcnn"); UserError when malformed."""
    parts = urllib.parse.urlsplit(url)
    scheme, model = parts.scheme.lower(), parts.path.strip("/") or DEFAULT_MODEL
    try:
        port = parts.port
    except ValueError:
        port = None
    if scheme not in SCHEMES or not parts.hostname or port is None or "/" in model:
        raise UserError(f"bad Triton URL {url!r}: write http://HOST:PORT/MODEL or grpc://HOST:PORT/MODEL "
                        "(e.g. http://127.0.0.1:8000/frcnn)")
    return scheme, f"{parts.hostname}:{port}", model


def import_client(scheme: str) -> Any:
    """``tritonclient.http`` or ``tritonclient.grpc``; UserError naming the extra when missing."""
    try:
        if scheme == "http":
            import tritonclient.http as client
        else:
            import tritonclient.grpc as client
    except ImportError as exc:
        raise UserError(f"talking to a Triton server needs tritonclient (`pip install frcnn-deploy[serve]`): "
                        f"{exc}") from None
    return client


class TritonBackend(Backend):
    """A model on a Triton Inference Server (KServe v2 over HTTP or gRPC).

    Args:
        url: ``http://HOST:PORT/MODEL`` or ``grpc://HOST:PORT/MODEL``.
        max_batch: largest batch sent per request (default: the model config's ``max_batch_size``).
        timeout_s: network timeout of one request, seconds.
        device, providers: accepted for Detector's signature; the server decides devices (``providers`` must
            be None).
    """

    name = "triton"

    def __init__(self, url: str, max_batch: int | None = None, timeout_s: float = 60.0, device: int = 0,
                 providers: Any = None, **options: Any) -> None:  # fmt: skip
        super().__init__(url)
        given = sorted(k for k, v in {"providers": providers, **options}.items() if v not in (None, False))
        if given:
            raise UserError(f"{', '.join(given)} do not apply to a Triton URL: the server runs the model (set them "
                            "where it is served, e.g. `frcnn serve`)")
        self.scheme, self.address, self.model = parse_url(url)
        self.timeout_s = float(timeout_s)
        self._user_max_batch = max_batch
        self._local = threading.local()
        self._clients: list[Any] = []
        self._clients_lock = threading.Lock()
        self._outputs: list[str] = []

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            module = import_client(self.scheme)
            if self.scheme == "http":
                client = module.InferenceServerClient(self.address, connection_timeout=self.timeout_s,
                                                      network_timeout=self.timeout_s)  # fmt: skip
            else:
                client = module.InferenceServerClient(self.address)
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    def _activate(self) -> None:
        client = self._client()
        try:
            ready = client.is_model_ready(self.model)
        except Exception as exc:  # noqa: BLE001 - tritonclient raises transport-specific errors
            raise UserError(f"cannot reach the Triton server at {self.scheme}://{self.address} ({exc}); start it "
                            "with `frcnn serve MODEL` or check the host and port") from None
        if not ready:
            raise UserError(f"the Triton server at {self.scheme}://{self.address} has no ready model "
                            f"{self.model!r}; check the model name in the URL")
        config, outputs = self._read_config(client)
        missing = [n for n in OUTPUTS if n not in outputs]
        if missing:
            raise UserError(f"Triton model {self.model!r} is not a frcnn detector: outputs {outputs}, missing "
                            f"{missing}; point the URL at the detector model")
        self._outputs = [n for n in (*OUTPUTS, ERROR_OUTPUT) if n in outputs]
        raw = config.get("parameters", {}).get(METADATA_PARAMETER, {}).get("string_value")
        try:
            self.metadata = {str(k): str(v) for k, v in json.loads(raw).items()} if raw else {}
        except (ValueError, AttributeError):
            raise UserError(f"Triton model {self.model!r} has malformed {METADATA_PARAMETER!r}; regenerate it "
                            "with `frcnn triton-repo` or `frcnn serve`") from None
        limits = [int(x) for x in (self._user_max_batch, config.get("max_batch_size")) if x]
        self.max_batch = min(limits) if limits else None

    def _read_config(self, client: Any) -> tuple[dict[str, Any], list[str]]:
        if self.scheme == "http":
            config = client.get_model_config(self.model)
        else:
            from google.protobuf.json_format import MessageToDict

            config = MessageToDict(client.get_model_config(self.model).config, preserving_proto_field_name=True)
        return config, [o["name"] for o in config.get("output", [])]

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        module = import_client(self.scheme)
        inputs = []
        for name, dtype in INPUTS.items():
            tensor = module.InferInput(name, list(feed[name].shape), _TRITON_DTYPES[dtype])
            tensor.set_data_from_numpy(feed[name])
            inputs.append(tensor)
        outputs = [module.InferRequestedOutput(n) for n in self._outputs]
        try:
            if self.scheme == "http":
                result = self._client().infer(self.model, inputs, outputs=outputs, timeout=int(self.timeout_s * 1e6))
            else:
                result = self._client().infer(self.model, inputs, outputs=outputs, client_timeout=self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - InferenceServerException and transport errors
            raise UserError(f"Triton server {self.scheme}://{self.address} refused model {self.model!r} on inputs "
                            f"{ {k: v.shape for k, v in feed.items()} }: {_message(exc)}") from None
        values = {n: result.as_numpy(n) for n in self._outputs}
        if ERROR_OUTPUT in values:
            errors = [e.decode() if isinstance(e, bytes) else str(e) for e in values.pop(ERROR_OUTPUT).reshape(-1)]
            if any(errors):
                raise UserError(f"Triton model {self.model!r} refused the request: {next(e for e in errors if e)}")
        values["num_detections"] = values["num_detections"].reshape(-1)
        return {n: np.ascontiguousarray(v, dtype=OUTPUTS[n]) for n, v in values.items()}

    def _deactivate(self) -> None:
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()
        self._local = threading.local()


def _message(exc: Exception) -> str:
    """The server's own text of a tritonclient exception (not its repr)."""
    text = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
    return str(text).strip()
