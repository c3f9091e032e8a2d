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

import logging
import os
from typing import Any

import numpy as np
from frcnn.runtime.backends.base import INPUTS, MASK_OUTPUTS, OUTPUTS, Backend
from frcnn.runtime.backends.ort_cache import PROVIDER, CacheEntry, OptimizeError, ensure_optimized
from frcnn.runtime.errors import UserError

_LOG = logging.getLogger("frcnn.runtime")

MEMORY_OPTIONS = {
    "disable_prepacking": ("config", "session.disable_prepacking", "1"),
    "disable_cpu_mem_arena": ("attr", "enable_cpu_mem_arena", False),
    "disable_mem_pattern": ("attr", "enable_mem_pattern", False),
    "device_allocator_for_initializers": ("config", "session.use_device_allocator_for_initializers", "1"),
}
"""ONNX Runtime session options that trade speed for peak memory (docs/int8.md has the measured costs)."""
LOW_MEMORY = ("disable_cpu_mem_arena",)
"""The session option ``OnnxRuntimeBackend(low_memory=True)`` applies (besides the pre-optimised graph): the
one that lowered R50-FPN's peak RSS here (874 -> 674 MiB at 800x1216); adding the other three measured
higher (727-746 MiB), see docs/int8.md."""


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
        low_memory: lower peak RSS (measured in docs/int8.md, "Memory options"): LOW_MEMORY (no CPU memory
            arena), and with the CPU EP alone the model's pre-optimised graph from the cache
            (:mod:`frcnn.runtime.backends.ort_cache`; built in a child process on a miss), loaded with graph
            optimisations off, so this process never holds the optimiser's second copy of the weights. When
            the cache cannot serve (unwritable folder, external-data model, the child failed) one warning line
            goes to the ``frcnn.runtime`` logger and the session optimises the graph itself. With the CUDA
            EP only the arena option applies: ORT_ENABLE_ALL output depends on the provider the nodes were
            assigned to and is keyed and measured here for the CPU EP only, and with CUDA the weights live in
            device memory, where the host-RSS saving was never measured.
        cache_dir: folder of the pre-optimised graphs (default ``$FRCNN_CACHE_DIR/ort``, see
            :func:`frcnn.runtime.cache_dir.cache_root`).

    Attributes: ``optimized_graph`` (after ``activate``): the ``CacheEntry`` the session was loaded from, or
    ``None`` when it runs the model file itself.
    """

    name = "onnxruntime"

    def __init__(self, path: str, device: int = 0, providers: Any = None, intra_op_threads: int | None = None,
                 max_batch: int | None = None, low_memory: bool = False,
                 cache_dir: str | os.PathLike[str] | None = None) -> None:  # fmt: skip
        super().__init__(path)
        self.device = int(device)
        self.providers = providers
        self.intra_op_threads = intra_op_threads
        self._user_max_batch = max_batch
        self.low_memory = bool(low_memory)
        self.cache_dir = cache_dir
        self.session: Any = None
        self.optimized_graph: CacheEntry | None = None

    def _activate(self) -> None:
        ort = _import_ort()
        providers = select_providers(ort, self.providers, self.device)
        cpu_only = all((p[0] if isinstance(p, tuple) else p) == PROVIDER for p in providers)
        session = self._open_optimized(ort, providers) if self.low_memory and cpu_only else None
        if session is None:
            session = self._open(ort, self.path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, providers)
        check_signature(self.path, session)
        self.session = session
        self.optional_outputs = [o.name for o in session.get_outputs() if o.name in MASK_OUTPUTS]
        self.metadata = dict(session.get_modelmeta().custom_metadata_map)
        self.max_batch = self._user_max_batch or _int_or_none(self.metadata.get("max_batch"))
        self.providers_used = session.get_providers()

    def _options(self, ort: Any, level: Any) -> Any:
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        if self.intra_op_threads is not None:
            options.intra_op_num_threads = int(self.intra_op_threads)
        options.log_severity_level = 3  # errors only; ORT's warnings about unused initializers are noise
        if self.low_memory:
            apply_memory_options(options, LOW_MEMORY)
        return options

    def _open(self, ort: Any, path: str, level: Any, providers: list[Any]) -> Any:
        try:
            return ort.InferenceSession(path, self._options(ort, level), providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own pybind exception types
            raise UserError(session_error(self.path, exc)) from None

    def _open_optimized(self, ort: Any, providers: list[Any]) -> Any:
        """Session on the cached pre-optimised graph (a corrupt entry is deleted and rebuilt once); ``None``
        after one warning line when the cache cannot serve. UserError when the model itself is rejected."""
        off = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            entry = ensure_optimized(self.path, self.cache_dir)
            try:
                session = ort.InferenceSession(str(entry.path), self._options(ort, off), providers=providers)
            except Exception:  # noqa: BLE001 - truncated / corrupted entry: ORT cannot load it
                entry.path.unlink(missing_ok=True)
                entry = ensure_optimized(self.path, self.cache_dir)
                session = ort.InferenceSession(str(entry.path), self._options(ort, off), providers=providers)
        except OptimizeError as exc:
            if exc.model_rejected:
                raise UserError(str(exc)) from None
            _LOG.warning("frcnn: warning: low_memory: %s; loading %s without the pre-optimised graph (higher "
                         "peak memory)", exc, self.path)  # fmt: skip
            return None
        except Exception as exc:  # noqa: BLE001 - OSError from the cache folder, ORT's errors on a rebuilt entry
            _LOG.warning("frcnn: warning: low_memory: the pre-optimised graph of %s cannot be used (%s); loading "
                         "the model without it (higher peak memory)", self.path, str(exc).strip().splitlines()[0]
                         if str(exc).strip() else type(exc).__name__)  # fmt: skip
            return None
        self.optimized_graph = entry
        return session

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


def session_error(path: str, exc: Exception) -> str:
    text = str(exc)
    if "frcnn" in text or "ROIAlignV2" in text or "BatchedNMS" in text:
        return (f"ONNX Runtime cannot run the custom frcnn ops in {path} ({text.strip()}). This file has no "
                "model-local functions for them (e.g. a copy stripped for TensorRT); run the ONNX file written "
                "by `frcnn export`, which carries the functions, or use the TensorRT engine with the plugins")
    return f"ONNX Runtime cannot load {path}: {text.strip()}; re-export it with `frcnn export`"


def check_signature(path: str, session: Any) -> None:
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
