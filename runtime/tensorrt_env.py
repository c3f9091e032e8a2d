"""What this machine offers TensorRT: the ``tensorrt`` module, its version, and the CUDA device.

Torch-free and Triton-free (the deployed runtime loads an engine whose plugin kernels are already inside it).
``frcnn.plugins.tensorrt`` (engine build) and ``frcnn.export.engine`` reuse these; this module is their home.
Importing it imports only the standard library; ``tensorrt`` / cuda-python are imported when called.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shutil
import subprocess
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from frcnn.runtime.errors import UserError

__all__ = ["GpuInfo", "current_gpu", "import_tensorrt", "parse_version", "tensorrt_available"]

RUNTIME_INSTALL_HINT = (
    "install TensorRT (the same version that built the engine) and cuda-python on a machine with an NVIDIA GPU: "
    "pip install -e \".[tensorrt]\" (docs/gpu-deployment.md)"
)


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


def tensorrt_available() -> bool:
    """True when the TensorRT library (not just its type stubs) is importable; imports nothing."""
    spec = importlib.util.find_spec("tensorrt")
    return spec is not None and spec.origin is not None


def import_tensorrt(purpose: str = "running a TensorRT engine", hint: str = RUNTIME_INSTALL_HINT,
                    requirement: str = "TensorRT") -> ModuleType:
    """Import and return ``tensorrt``; UserError "<purpose> needs <requirement>, but ...; <hint>" when missing.

    A ``tensorrt`` folder without the library (e.g. only the ``tensorrt-stubs`` type stubs, which Python
    imports as an empty namespace package) counts as missing.
    """
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as exc:
        raise UserError(f"{purpose} needs {requirement}, but `import tensorrt` failed ({exc}); {hint}") from None
    if getattr(trt, "__file__", None) is None or not hasattr(trt, "Runtime"):
        where = ", ".join(getattr(trt, "__path__", [])) or "?"
        raise UserError(f"{purpose} needs {requirement}, but only an empty `tensorrt` package (type stubs?) "
                        f"was found at {where}; {hint}")
    return trt


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
