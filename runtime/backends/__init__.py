"""Inference backends of the runtime: one small polygraphy-style interface, one module per engine kind.

    from frcnn.runtime.backends import create_backend
    with create_backend("model.onnx") as backend:          # activate() ... deactivate()
        outputs = backend.infer({"images": ..., "image_sizes": ...})

``create_backend`` picks TensorRT for ``.engine`` / ``.plan`` and ONNX Runtime for ``.onnx`` (``"auto"``).
Importing this package imports neither onnxruntime nor tensorrt (nor torch, ever).
"""

from __future__ import annotations

import os
from typing import Any

from frcnn.runtime.backends.base import Backend
from frcnn.runtime.errors import UserError

BACKENDS = ("auto", "onnxruntime", "tensorrt", "triton")
ENGINE_SUFFIXES = (".engine", ".plan")
ONNX_SUFFIXES = (".onnx",)


def resolve_backend(path: str | os.PathLike[str], backend: str = "auto") -> str:
    """``"onnxruntime"`` or ``"tensorrt"`` for ``path`` (by suffix when ``backend == "auto"``)."""
    if backend not in BACKENDS:
        raise UserError(f"backend must be one of {BACKENDS}, got {backend!r}")
    from frcnn.runtime.backends.triton import is_url  # URL dispatch (issue 13); imports no tritonclient

    if is_url(os.fspath(path)) != (backend == "triton") and backend != "auto":
        raise UserError(f"backend={backend!r} does not fit {os.fspath(path)!r}: a Triton server is named by an "
                        "http:// or grpc:// URL (backend 'triton' or 'auto'), a local model by its file")
    if is_url(os.fspath(path)):
        return "triton"
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if backend == "auto":
        if suffix in ENGINE_SUFFIXES:
            return "tensorrt"
        if suffix in ONNX_SUFFIXES:
            return "onnxruntime"
        raise UserError(f"cannot tell the backend of {os.fspath(path)!r} from its suffix: name an ONNX model "
                        f"'*.onnx' or a TensorRT engine '*.engine' / '*.plan', or pass --backend onnxruntime / "
                        "tensorrt (backend='onnxruntime' / 'tensorrt' in Python)")
    if backend == "onnxruntime" and suffix in ENGINE_SUFFIXES:
        raise UserError(f"{os.fspath(path)!r} is a TensorRT engine; ONNX Runtime needs the .onnx file (or use "
                        "--backend tensorrt / backend='tensorrt')")
    if backend == "tensorrt" and suffix in ONNX_SUFFIXES:
        raise UserError(f"{os.fspath(path)!r} is an ONNX model, not a TensorRT engine: run it with --backend "
                        "onnxruntime (backend='onnxruntime'), or build an engine from it with "
                        "`frcnn export-engine` and pass the .engine file")
    return backend


def check_model_file(path: str | os.PathLike[str]) -> None:
    """UserError unless ``path`` is an existing, readable regular file (checked before any loading); a Triton
    server URL passes (it is checked when the client connects)."""
    from frcnn.runtime.backends.triton import is_url

    name = os.fspath(path)
    if is_url(name):
        return
    if os.path.isdir(name):
        raise UserError(f"model path {name!r} is a folder, not a model file; pass the .onnx / .engine file inside "
                        "it")  # fmt: skip
    if not os.path.exists(name):
        raise UserError(f"model file {name!r} not found; export one with `frcnn export` (ONNX) or "
                        "`frcnn export ... --engine` (TensorRT)")
    if not os.path.isfile(name):
        raise UserError(f"model path {name!r} is not a regular file; pass the exported .onnx / .engine file")
    if not os.access(name, os.R_OK):
        raise UserError(f"model file {name!r} is not readable (permission denied); fix its permissions "
                        "(chmod u+r)")


def create_backend(path: str | os.PathLike[str], backend: str = "auto", **kwargs: Any) -> Backend:
    """An (inactive) backend for ``path``; ``kwargs`` go to its constructor (device, providers, ...)."""
    if os.path.isdir(path):
        check_model_file(path)  # "a folder, not a model file" rather than "cannot tell the backend"
    kind = resolve_backend(path, backend)
    if kind == "triton":
        from frcnn.runtime.backends.triton import TritonBackend

        return TritonBackend(os.fspath(path), **kwargs)
    check_model_file(path)
    if kind == "tensorrt":
        from frcnn.runtime.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(path, **kwargs)
    from frcnn.runtime.backends.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(path, **kwargs)


LOW_MEMORY_HELP = ("ONNX Runtime (CPU): load the model's pre-optimised graph (cached; `frcnn optimize` fills it) "
                   "with the memory arena off: lower peak memory, the same detections (docs/int8.md)")
"""Help of the ``--low-memory`` flag of ``frcnn infer`` / ``bench`` / ``serve``."""


def low_memory_options(paths: list[str], backend: str = "auto", low_memory: bool = False) -> dict[str, Any]:
    """Backend options of the ``--low-memory`` flag: ``{"low_memory": True}`` when set; UserError when one of
    ``paths`` does not run on ONNX Runtime (a TensorRT engine or a server URL has no such option)."""
    if not low_memory:
        return {}
    for path in paths:
        kind = resolve_backend(path, backend)
        if kind != "onnxruntime":
            raise UserError(f"--low-memory applies to ONNX Runtime (a .onnx model); {os.fspath(path)!r} runs on "
                            f"{kind}: drop --low-memory")
    return {"low_memory": True}


__all__ = ["BACKENDS", "LOW_MEMORY_HELP", "Backend", "check_model_file", "create_backend", "low_memory_options",
           "resolve_backend"]
