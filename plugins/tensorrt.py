"""TensorRT face of the custom ops: registers ``frcnn::ROIAlignV2`` and ``frcnn::BatchedNMS`` as plugins.

The plugins use TensorRT's Python plugin API (``tensorrt.plugin``, TensorRT >= 10.9): a shape/type descriptor
(``@trtp.register``), the supported type combinations (``@trtp.autotune``) and an ahead-of-time
implementation (``@trtp.aot_impl``) that hands TensorRT the Triton kernel's PTX plus its launch parameters.
The PTX is serialized into the engine, so a built engine runs without Python (trtexec, C++ runtimes).

Plugin id = ``<ONNX node domain>::<ONNX op_type>``, so TensorRT's ONNX parser maps an exported node straight
to its plugin (the node also carries ``plugin_namespace="frcnn"``, DESIGN §6). Node attributes the plugin
does not declare (``plugin_namespace``, ``plugin_version``) are ignored by the parser.

Importing this module imports nothing heavy: ``tensorrt``, ``triton`` and the CUDA bindings are imported by
:func:`register` / :func:`current_gpu` when called.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import re
import shutil
import subprocess
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from frcnn.runtime.errors import UserError

MIN_TENSORRT = (10, 9)
"""Oldest TensorRT with ``tensorrt.plugin`` AOT implementations (``@trtp.aot_impl``)."""

INSTALL_HINT = (
    "install TensorRT >= 10.9 on a machine with an NVIDIA GPU: pip install -e \".[tensorrt,plugins]\" "
    "(docs/gpu-deployment.md)"
)

_registered = False
_aot_records: list[dict[str, Any]] = []


@dataclass(frozen=True)
class GpuInfo:
    """The CUDA device TensorRT builds for: its name and compute capability ``(major, minor)``."""

    name: str
    compute_capability: tuple[int, int]

    @property
    def arch(self) -> int:
        """Compute capability as Triton's / nvcc's integer, e.g. ``90`` for sm_90."""
        return self.compute_capability[0] * 10 + self.compute_capability[1]

    def cc_string(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"


def parse_version(version: str) -> tuple[int, ...]:
    """``"10.13.0.35"`` -> ``(10, 13, 0, 35)``; non-numeric suffixes are dropped (``"11.0.0rc1"``)."""
    parts = []
    for piece in version.split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
    return tuple(parts)


def require_tensorrt() -> ModuleType:
    """Import and return ``tensorrt``; UserError when it is missing, older than 10.9 or lacks ``tensorrt.plugin``.

    A ``tensorrt`` folder without the library (e.g. only the ``tensorrt-stubs`` type stubs, which Python
    imports as an empty namespace package) counts as missing.
    """
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise UserError(f"building a TensorRT engine needs TensorRT >= 10.9 (tensorrt.plugin), but "
                        f"`import tensorrt` failed ({exc}); {INSTALL_HINT}") from None
    if getattr(trt, "__file__", None) is None or not hasattr(trt, "Builder"):
        where = ", ".join(getattr(trt, "__path__", [])) or "?"
        raise UserError(f"building a TensorRT engine needs TensorRT >= 10.9 (tensorrt.plugin), but only an "
                        f"empty `tensorrt` package (type stubs?) was found at {where}; {INSTALL_HINT}")
    version = str(getattr(trt, "__version__", "0"))
    if parse_version(version)[:2] < MIN_TENSORRT:
        raise UserError(f"TensorRT {version} is installed, but the frcnn plugins need TensorRT >= 10.9 "
                        f"(tensorrt.plugin with aot_impl); {INSTALL_HINT}")
    try:
        import tensorrt.plugin
    except ImportError as exc:
        raise UserError(f"TensorRT {version} is installed without the tensorrt.plugin module ({exc}); the "
                        f"frcnn plugins need TensorRT >= 10.9 (tensorrt.plugin); {INSTALL_HINT}") from None
    return trt


def tensorrt_available() -> bool:
    """True when the TensorRT library (not just its type stubs) is importable; imports nothing."""
    import importlib.util

    spec = importlib.util.find_spec("tensorrt")
    return spec is not None and spec.origin is not None


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


def current_gpu(device: int = 0) -> GpuInfo:
    """Name and compute capability of CUDA device ``device`` (cuda-python, else ``nvidia-smi``).

    Raises UserError when no NVIDIA GPU / driver is found.
    """
    info = _gpu_from_cuda_python(device)
    if info is None:
        info = _gpu_from_nvidia_smi(device)
    if info is None:
        raise UserError("no NVIDIA GPU found (neither cuda-python nor nvidia-smi reports a device); a TensorRT "
                        "engine must be built and run on a machine with an NVIDIA GPU and driver")
    return info


def _gpu_from_cuda_python(device: int) -> GpuInfo | None:
    cudart: Any = None
    for module in ("cuda.bindings.runtime", "cuda.cudart"):  # cuda-python >= 12.6, older layout
        try:
            cudart = importlib.import_module(module)
            break
        except ImportError:
            continue
    if cudart is None:
        return None
    err, props = cudart.cudaGetDeviceProperties(device)
    if int(err) != 0:
        return None
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return GpuInfo(name.strip("\x00 "), (int(props.major), int(props.minor)))


def _gpu_from_nvidia_smi(device: int) -> GpuInfo | None:
    if shutil.which("nvidia-smi") is None:
        return None
    cmd = ["nvidia-smi", f"--id={device}", "--query-gpu=name,compute_cap", "--format=csv,noheader"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    name, _, cap = out.strip().rpartition(",")
    major, _, minor = cap.strip().partition(".")
    if not (major.isdigit() and minor.isdigit()):
        return None
    return GpuInfo(name.strip(), (int(major), int(minor)))


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
