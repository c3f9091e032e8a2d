"""ONNX Runtime backend: runs the exported ONNX file (custom ``frcnn`` nodes run as their model-local functions).

Execution providers: CPU always; CUDA when ``onnxruntime-gpu`` is installed (``providers=None`` picks it
automatically, on CUDA device ``device``). ``providers`` may name them explicitly: ``["cpu"]``,
``["cuda", "cpu"]`` or ORT's own names / ``(name, options)`` pairs.

Thread safety: ``InferenceSession.run`` is documented by ONNX Runtime as safe to call concurrently on one
session (the session is immutable after creation; each run gets its own execution frame). This backend
therefore shares one session between threads; ``tests/test_runtime.py`` checks 8 threads x 50 calls against
serial results.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from frcnn.runtime.backends.base import INPUTS, MASK_OUTPUTS, OUTPUTS, Backend
from frcnn.runtime.errors import UserError

MEMORY_OPTIONS = {
    "disable_prepacking": ("config", "session.disable_prepacking", "1"),
    "disable_cpu_mem_arena": ("attr", "enable_cpu_mem_arena", False),
    "disable_mem_pattern": ("attr", "enable_mem_pattern", False),
    "device_allocator_for_initializers": ("config", "session.use_device_allocator_for_initializers", "1"),
}
"""ONNX Runtime session options that trade speed for peak memory (docs/int8.md has the measured costs)."""
LOW_MEMORY = ("disable_cpu_mem_arena",)
"""What ``OnnxRuntimeBackend(low_memory=True)`` applies: the one option that lowered R50-FPN's peak RSS here
(874 -> 674 MiB at 800x1216); adding the other three measured higher (727-746 MiB), see docs/int8.md."""


def apply_memory_options(options: Any, names: Any) -> Any:
    """Set the named MEMORY_OPTIONS on an ``onnxruntime.SessionOptions`` (in place; returns it)."""
    for name in names:
        if name not in MEMORY_OPTIONS:
            raise UserError(f"unknown ONNX Runtime memory option {name!r}; choose from {', '.join(MEMORY_OPTIONS)}")
        kind, key, value = MEMORY_OPTIONS[name]
        if kind == "attr":
            setattr(options, key, value)
        else:
            options.add_session_config_entry(key, value)
    return options


_SHORT_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                "tensorrt": "TensorrtExecutionProvider"}  # fmt: skip


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise UserError(f"running an ONNX model needs onnxruntime (`pip install onnxruntime`, or onnxruntime-gpu "
                        f"for CUDA): {exc}") from None
    return onnxruntime


def select_providers(ort: Any, providers: Any, device: int) -> list[Any]:
    """ORT provider list from ``providers`` (None: CUDA if available, then CPU); UserError if unavailable."""
    available = ort.get_available_providers()
    if providers is None:
        chosen: list[Any] = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in available:
            chosen.insert(0, ("CUDAExecutionProvider", {"device_id": int(device)}))
        return chosen
    if isinstance(providers, str):
        providers = [providers]
    chosen = []
    for p in providers:
        name, opts = (p[0], dict(p[1])) if isinstance(p, (tuple, list)) else (p, {})
        name = _SHORT_NAMES.get(str(name).lower(), str(name))
        if name not in available:
            raise UserError(f"ONNX Runtime execution provider {name} is not available here (available: "
                            f"{available}); for CUDA install onnxruntime-gpu, or pass providers=['cpu']")
        if name == "CUDAExecutionProvider":
            opts.setdefault("device_id", int(device))
        chosen.append((name, opts) if opts else name)
    return chosen


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime session on an exported model.

    Args:
        path: the ``.onnx`` file written by ``frcnn export`` (with its model-local functions).
        device: CUDA device id for the CUDA provider.
        providers: see the module docstring.
        intra_op_threads: ORT intra-op thread count (``None``: ORT's default, one per core).
        low_memory: apply LOW_MEMORY (no CPU memory arena): lower peak RSS (measured in docs/int8.md).
    """

    name = "onnxruntime"

    def __init__(self, path: str, device: int = 0, providers: Any = None, intra_op_threads: int | None = None,
                 max_batch: int | None = None, low_memory: bool = False) -> None:  # fmt: skip
        super().__init__(path)
        self.device = int(device)
        self.providers = providers
        self.intra_op_threads = intra_op_threads
        self._user_max_batch = max_batch
        self.low_memory = bool(low_memory)
        self.session: Any = None

    def _activate(self) -> None:
        ort = _import_ort()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.intra_op_threads is not None:
            options.intra_op_num_threads = int(self.intra_op_threads)
        options.log_severity_level = 3  # errors only; ORT's warnings about unused initializers are noise
        if self.low_memory:
            apply_memory_options(options, LOW_MEMORY)
        providers = select_providers(ort, self.providers, self.device)
        try:
            session = ort.InferenceSession(self.path, options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own pybind exception types
            raise UserError(_session_error(self.path, exc)) from None
        _check_signature(self.path, session)
        self.session = session
        self.optional_outputs = [o.name for o in session.get_outputs() if o.name in MASK_OUTPUTS]
        self.metadata = dict(session.get_modelmeta().custom_metadata_map)
        self.max_batch = self._user_max_batch or _int_or_none(self.metadata.get("max_batch"))
        self.providers_used = session.get_providers()

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [*OUTPUTS, *self.optional_outputs]
        try:
            values = self.session.run(names, feed)
        except Exception as exc:  # noqa: BLE001 - ORT runtime failure: name the inputs
            shapes = {k: v.shape for k, v in feed.items()}
            raise UserError(f"ONNX Runtime failed to run {self.path} on inputs {shapes}: {exc}") from None
        return dict(zip(names, values))

    def _deactivate(self) -> None:
        self.session = None


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _session_error(path: str, exc: Exception) -> str:
    text = str(exc)
    if "frcnn" in text or "ROIAlignV2" in text or "BatchedNMS" in text:
        return (f"ONNX Runtime cannot run the custom frcnn ops in {path} ({text.strip()}). This file has no "
                "model-local functions for them (e.g. a copy stripped for TensorRT); run the ONNX file written "
                "by `frcnn export`, which carries the functions, or use the TensorRT engine with the plugins")
    return f"ONNX Runtime cannot load {path}: {text.strip()}; re-export it with `frcnn export`"


def _check_signature(path: str, session: Any) -> None:
    """UserError unless the model has the frcnn inputs/outputs (names and element types)."""
    ort_types = {np.uint8: "tensor(uint8)", np.int32: "tensor(int32)", np.float32: "tensor(float)"}
    got_in = {i.name: i.type for i in session.get_inputs()}
    got_out = {o.name: o.type for o in session.get_outputs()}
    want_in = {k: ort_types[v] for k, v in INPUTS.items()}
    want_out = {k: ort_types[v] for k, v in OUTPUTS.items()}
    optional = {k: ort_types[v] for k, v in MASK_OUTPUTS.items() if k in got_out}
    if got_in != want_in or any(got_out.get(k) != v for k, v in {**want_out, **optional}.items()):
        raise UserError(f"{path} is not a frcnn detector: inputs {got_in}, outputs {got_out}; expected inputs "
                        f"{want_in} and outputs {want_out} (export with `frcnn export`)")
