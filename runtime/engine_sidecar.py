"""The JSON sidecar beside a TensorRT engine, and the check that the engine fits this machine.

A serialized engine only deserializes in the TensorRT version that built it, on the GPU architecture it was
built for; TensorRT reports a mismatch with a crash or a cryptic log line. :func:`check_engine_compat` reads
``<engine>.json`` (written by ``frcnn.export.engine.build_engine``) first and names the mismatch instead.
This is the runtime's home of the sidecar format: the builder (export/) imports it from here.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from frcnn.runtime.errors import UserError
from frcnn.runtime.fileio import atomic_write
from frcnn.runtime.tensorrt_env import GpuInfo, current_gpu, import_tensorrt, parse_version

__all__ = ["SIDECAR_FORMAT", "check_engine_compat", "file_sha256", "make_sidecar", "read_sidecar", "sidecar_path",
           "write_sidecar"]

SIDECAR_FORMAT = "frcnn-engine/1"


def sidecar_path(engine_path: str | os.PathLike[str]) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    path = Path(engine_path)
    return path.with_name(path.name + ".json")


def make_sidecar(engine_bytes: bytes, tensorrt_version: str, gpu: GpuInfo, profile: dict[str, Any], fp16: bool,
                 metadata: dict[str, str], plugins: list[dict[str, Any]], onnx_sha256: str = "") -> dict[str, Any]:
    """The sidecar dict for an engine."""
    return {
        "format": SIDECAR_FORMAT,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "engine_sha256": hashlib.sha256(engine_bytes).hexdigest(),
        "engine_bytes": len(engine_bytes),
        "onnx_sha256": onnx_sha256,
        "tensorrt_version": tensorrt_version,
        "gpu": {"name": gpu.name, "compute_capability": gpu.cc_string()},
        "precision": "fp16" if fp16 else "fp32",
        "strongly_typed": True,
        "profile": profile,
        "metadata": metadata,
        "plugins": plugins,
    }


def write_sidecar(engine_path: str | os.PathLike[str], sidecar: dict[str, Any]) -> Path:
    """Write ``sidecar`` as ``<engine_path>.json`` atomically; returns its path."""
    path = sidecar_path(engine_path)
    atomic_write(path, json.dumps(sidecar, indent=2).encode())
    return path


def read_sidecar(engine_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The engine's sidecar; UserError when it is missing or not a frcnn sidecar."""
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise UserError(f"engine sidecar {path} not found; an engine is only usable with the JSON written "
                        f"beside it by build_engine (rebuild with export-engine ... --engine {engine_path})")
    try:
        sidecar = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"engine sidecar {path} is unreadable ({exc}); rebuild the engine") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != SIDECAR_FORMAT:
        raise UserError(f"{path} is not a frcnn engine sidecar (format {SIDECAR_FORMAT!r}); rebuild the engine")
    return sidecar


def check_engine_compat(engine_path: str | os.PathLike[str], *, tensorrt_version: str | None = None,
                        gpu: GpuInfo | None = None, verify_hash: bool = True) -> dict[str, Any]:
    """Check that the engine can be deserialized here, before TensorRT tries; returns the sidecar.

    Args:
        tensorrt_version / gpu: what this machine has (default: the installed TensorRT and CUDA device 0).
        verify_hash: compare the engine file's SHA-256 with the sidecar's (catches a stale sidecar).
    Raises:
        UserError naming the mismatch: missing engine or sidecar, engine changed after the sidecar was
        written, other TensorRT version (major.minor.patch), other compute capability. A different GPU
        model with the same compute capability only warns (TensorRT runs it, possibly slower).
    """
    engine = Path(engine_path)
    if not engine.is_file():
        raise UserError(f"engine file {engine} not found; build it with export-engine model.pth --engine {engine}")
    sidecar = read_sidecar(engine)
    if verify_hash and file_sha256(engine) != sidecar.get("engine_sha256"):
        raise UserError(f"engine {engine} does not match its sidecar {sidecar_path(engine)} (SHA-256 differs): "
                        f"the engine was replaced after the sidecar was written; rebuild both together")
    if tensorrt_version is None:
        tensorrt_version = str(import_tensorrt("loading a TensorRT engine").__version__)
    if gpu is None:
        gpu = current_gpu()
    _compare(engine, sidecar, tensorrt_version, gpu)
    return sidecar


def _compare(engine: Path, sidecar: dict[str, Any], tensorrt_version: str, gpu: GpuInfo) -> None:
    built = str(sidecar.get("tensorrt_version", "?"))
    if parse_version(built)[:3] != parse_version(tensorrt_version)[:3]:
        raise UserError(f"engine {engine} was built with TensorRT {built}, this machine has TensorRT "
                        f"{tensorrt_version}; engines only load in the TensorRT version that built them: rebuild "
                        f"it here (export-engine ... --engine) or install TensorRT {built}")
    built_gpu = sidecar.get("gpu", {})
    built_cc = str(built_gpu.get("compute_capability", "?"))
    if built_cc != gpu.cc_string():
        raise UserError(f"engine {engine} was built for {built_gpu.get('name', '?')} (compute capability "
                        f"{built_cc}), this GPU is {gpu.name} (compute capability {gpu.cc_string()}); engines "
                        f"and their plugin PTX are specific to the GPU architecture: rebuild it on this machine")
    if built_gpu.get("name") != gpu.name:
        import warnings

        warnings.warn(f"engine {engine} was built on {built_gpu.get('name')}, running on {gpu.name} (same "
                      f"compute capability {built_cc}); rebuild here for best performance", stacklevel=3)


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
