"""TensorRT face of the custom ops: registers ``frcnn::ROIAlignV2`` and ``frcnn::BatchedNMS`` as plugins.

The plugins use TensorRT's Python plugin API (``tensorrt.plugin``, TensorRT >= 10.9): a shape/type descriptor
(``@trtp.register``), the supported type combinations (``@trtp.autotune``) and an ahead-of-time
implementation (``@trtp.aot_impl``) that hands TensorRT the Triton kernel's PTX plus its launch parameters.
The PTX is serialized into the engine, so a built engine runs without Python (trtexec, C++ runtimes).

Plugin id = ``<ONNX node domain>::<ONNX op_type>``, so TensorRT's ONNX parser maps an exported node straight
to its plugin (the node also carries ``plugin_namespace="frcnn"``, DESIGN §6). Node attributes the plugin
does not declare (``plugin_namespace``, ``plugin_version``) are ignored by the parser.

Importing this module imports nothing heavy: ``tensorrt``, ``triton`` and the CUDA bindings are imported by
:func:`register` / :func:`current_gpu` when called. ``GpuInfo``, ``current_gpu``, ``parse_version`` and
``tensorrt_available`` live in ``frcnn.runtime.tensorrt_env`` (the deployed runtime needs them
without the plugins) and are re-exported here.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from frcnn.runtime.errors import UserError
from frcnn.runtime.tensorrt_env import (
    GpuInfo,
    current_gpu,
    import_tensorrt,
    parse_version,
    tensorrt_available,
)

MIN_TENSORRT = (10, 9)
"""Oldest TensorRT with ``tensorrt.plugin`` AOT implementations (``@trtp.aot_impl``)."""

INSTALL_HINT = (
    "install TensorRT >= 10.9 on a machine with an NVIDIA GPU: pip install -e \".[tensorrt,plugins]\" "
    "(docs/gpu-deployment.md)"
)

_registered = False
_aot_records: list[dict[str, Any]] = []


def require_tensorrt() -> ModuleType:
    """Import and return ``tensorrt`` for an engine build; UserError when it is missing (or only its type
    stubs are), older than 10.9 or lacks ``tensorrt.plugin``."""
    purpose = "building a TensorRT engine"
    trt = import_tensorrt(purpose, INSTALL_HINT, "TensorRT >= 10.9 (tensorrt.plugin)")
    if not hasattr(trt, "Builder"):
        raise UserError(f"{purpose}: the installed `tensorrt` has no Builder (a lean / dispatch runtime?); "
                        f"{INSTALL_HINT}")
    version = str(getattr(trt, "__version__", "0"))
    if parse_version(version)[:2] < MIN_TENSORRT:
        raise UserError(f"TensorRT {version} is installed, but the frcnn plugins need TensorRT >= 10.9 "
                        f"(tensorrt.plugin with aot_impl); {INSTALL_HINT}")
    try:
        importlib.import_module("tensorrt.plugin")
    except ImportError as exc:
        raise UserError(f"TensorRT {version} is installed without the tensorrt.plugin module ({exc}); the "
                        f"frcnn plugins need TensorRT >= 10.9 (tensorrt.plugin); {INSTALL_HINT}") from None
    return trt


def register() -> None:
    """Register both plugins with TensorRT's plugin registry (idempotent).

    Raises UserError when TensorRT >= 10.9 (``tensorrt.plugin``) is not installed.
    """
    global _registered
    if _registered:
        return
    require_tensorrt()
    from frcnn.plugins.batched_nms import trt_plugin as nms_plugin
    from frcnn.plugins.roi_align_v2 import trt_plugin as roi_plugin

    roi_plugin.register()
    nms_plugin.register()
    _registered = True




def triton_dtype(trt_dtype: Any) -> str:
    """Triton pointer element type (``"fp32"`` / ``"fp16"`` / ``"i32"``) of a TensorRT DataType."""
    import tensorrt as trt

    names = {trt.float32: "fp32", trt.float16: "fp16", trt.int32: "i32"}
    if trt_dtype not in names:
        raise ValueError(f"frcnn plugins support float32, float16 and int32 tensors, got {trt_dtype}")
    return names[trt_dtype]


@dataclass(frozen=True)
class AotKernel:
    """A kernel compiled for one GPU arch: what ``@trtp.aot_impl`` returns plus the block size."""

    name: str
    ptx: str
    num_warps: int
    shared: int

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.ptx.encode()).hexdigest()


def aot_kernel(plugin_id: str, spec: Any, arch: int) -> AotKernel:
    """PTX of ``spec`` (a :class:`frcnn.plugins.ptx.KernelSpec`) for ``sm_<arch>``, recorded for the sidecar.

    Compiles through :func:`frcnn.plugins.ptx.compile_ptx` (cached by source hash). The record (plugin id,
    kernel entry, arch, signature, constexprs, PTX sha256) is listed by :func:`aot_records`.
    """
    from frcnn.plugins import ptx

    compiled = ptx.compile_ptx(spec, arch)
    kernel = AotKernel(compiled.kernel_name, compiled.ptx, compiled.num_warps, compiled.shared_mem)
    record = {"plugin": plugin_id, "spec": spec.name, "kernel": kernel.name, "arch": arch,
              "signature": dict(spec.signature),
              "constexprs": {k: _jsonable(v) for k, v in spec.constexprs.items()},
              "num_warps": kernel.num_warps, "shared_mem": kernel.shared, "ptx_params": compiled.num_params,
              "ptx_version": compiled.ptx_version, "ptx_sha256": kernel.sha256}
    if record not in _aot_records:
        _aot_records.append(record)
    return kernel


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


def aot_records(clear: bool = False) -> list[dict[str, Any]]:
    """Kernels handed to TensorRT by the AOT implementations since the last ``clear`` (copies)."""
    records = [dict(r) for r in _aot_records]
    if clear:
        _aot_records.clear()
    return records


__all__ = [
    "MIN_TENSORRT",
    "AotKernel",
    "GpuInfo",
    "aot_kernel",
    "aot_records",
    "current_gpu",
    "parse_version",
    "register",
    "require_tensorrt",
    "tensorrt_available",
    "triton_dtype",
]
