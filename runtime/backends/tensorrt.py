"""TensorRT backend: deserializes a ``frcnn`` engine (after the sidecar check) and runs it on a CUDA stream.

UNVERIFIED HERE: the development machine has no GPU and no TensorRT, so this module has never been executed
end to end; only the sidecar check (:func:`check_engine`, pure Python) is tested. It follows the TensorRT
10.x Python API (``IExecutionContext.set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3``) and
cuda-python's runtime bindings (``cuda.bindings.runtime``, older ``cuda.cudart``). Run
``tests/gpu/`` and ``frcnn parity`` on a GPU machine before relying on it.

Design:
- ``activate``: :func:`frcnn.runtime.engine_sidecar.check_engine_compat` (engine file, sidecar,
  TensorRT version, GPU compute capability — a clear error instead of a deserialization crash), then
  ``deserialize_cuda_engine``. No plugin registration: the frcnn plugins are AOT plugins whose PTX and launch
  parameters are serialized into the engine, so loading needs neither ``frcnn.plugins`` nor Triton nor torch
  (a production box needs only TensorRT, cuda-python and this torch-free package).
- Thread safety: one ``IExecutionContext`` + CUDA stream + buffers **per thread** (``threading.local``);
  the engine is shared (TensorRT allows several contexts on one engine, used from different threads).
- Pinned (page-locked) host buffers and device buffers grow to the largest shape seen; copies are async on
  the thread's stream, synchronized once per call.
- ``cuda_graph=True``: after a call with a new input shape, the ``execute_async_v3`` launch is captured
  into a CUDA graph and replayed for later calls with the same shapes (fewer launch overheads for small
  batches). Off by default.
"""

from __future__ import annotations

import ctypes
import importlib
import threading
from typing import Any

import numpy as np
from frcnn.runtime.backends.base import INPUTS, MASK_OUTPUTS, OUTPUTS, Backend
from frcnn.runtime.engine_sidecar import check_engine_compat
from frcnn.runtime.errors import UserError
from frcnn.runtime.tensorrt_env import GpuInfo, import_tensorrt


def check_engine(path: str, tensorrt_version: str | None = None, gpu: GpuInfo | None = None) -> dict[str, Any]:
    """The engine's sidecar after checking it fits this machine (or the given TensorRT version / GPU).

    ``tensorrt_version`` / ``gpu`` (a :class:`frcnn.runtime.tensorrt_env.GpuInfo`) default to the
    installed TensorRT and CUDA device 0. Raises UserError for a missing or stale sidecar, another TensorRT
    version or another GPU architecture.
    """
    return check_engine_compat(path, tensorrt_version=tensorrt_version, gpu=gpu)


def _cudart() -> Any:
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise UserError("the TensorRT backend needs cuda-python (`pip install cuda-python`) for streams and memory")


def _ok(result: Any, what: str) -> Any:
    """cuda-python returns (err, *values): raise on error, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err} in {what}")
    return values[0] if len(values) == 1 else tuple(values)


class _Buffer:
    """A pinned host buffer and a device buffer of ``nbytes`` (grown on demand)."""

    def __init__(self, cudart: Any) -> None:
        self.cudart, self.nbytes, self.host_ptr, self.device_ptr = cudart, 0, 0, 0

    def ensure(self, nbytes: int) -> None:
        if nbytes <= self.nbytes:
            return
        self.free()
        self.host_ptr = int(_ok(self.cudart.cudaMallocHost(nbytes), "cudaMallocHost"))
        self.device_ptr = int(_ok(self.cudart.cudaMalloc(nbytes), "cudaMalloc"))
        self.nbytes = nbytes

    def host_view(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        count = int(np.prod(shape)) if shape else 1
        raw = (ctypes.c_byte * (count * np.dtype(dtype).itemsize)).from_address(self.host_ptr)
        return np.frombuffer(memoryview(raw), dtype=dtype, count=count).reshape(shape)

    def free(self) -> None:
        if self.nbytes:
            self.cudart.cudaFreeHost(self.host_ptr)
            self.cudart.cudaFree(self.device_ptr)
        self.nbytes, self.host_ptr, self.device_ptr = 0, 0, 0


class _ThreadState:
    """Per-thread execution context, stream, buffers and (optionally) a captured CUDA graph."""

    def __init__(self, engine: Any, cudart: Any, output_names: list[str]) -> None:
        self.context = engine.create_execution_context()
        if self.context is None:
            raise UserError("TensorRT could not create an execution context (out of GPU memory?)")
        self.stream = _ok(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.buffers = {name: _Buffer(cudart) for name in (*INPUTS, *output_names)}
        self.graph_key: tuple[Any, ...] | None = None
        self.graph_exec: Any = None

    def free(self, cudart: Any) -> None:
        for buf in self.buffers.values():
            buf.free()
        if self.graph_exec is not None:
            cudart.cudaGraphExecDestroy(self.graph_exec)
        cudart.cudaStreamDestroy(self.stream)


class TensorRTBackend(Backend):
    """A TensorRT engine built by ``frcnn export ... --engine`` (UNVERIFIED here: see the module docstring).

    Args:
        path: the ``.engine`` / ``.plan`` file; its sidecar ``<path>.json`` must be beside it.
        device: CUDA device id.
        cuda_graph: capture and replay the inference launch per input shape.
        max_batch: cap below the engine profile's max batch.
    """

    name = "tensorrt"

    def __init__(self, path: str, device: int = 0, providers: Any = None, cuda_graph: bool = False,
                 max_batch: int | None = None) -> None:  # fmt: skip
        super().__init__(path)
        if providers is not None:
            raise UserError("providers=... applies to ONNX Runtime only; the TensorRT backend takes device=")
        self.device, self.cuda_graph, self._user_max_batch = int(device), bool(cuda_graph), max_batch
        self._local = threading.local()
        self._states: list[_ThreadState] = []
        self.engine: Any = None

    def _activate(self) -> None:
        sidecar = check_engine(self.path)  # engine file, sidecar, TensorRT version, GPU: before any CUDA work
        trt = import_tensorrt(f"loading the TensorRT engine {self.path}")
        self._trt, self._cudart = trt, _cudart()
        _ok(self._cudart.cudaSetDevice(self.device), "cudaSetDevice")
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        with open(self.path, "rb") as f:
            engine = runtime.deserialize_cuda_engine(f.read())
        if engine is None:
            raise UserError(f"TensorRT could not deserialize {self.path} (see its log above): the file is damaged, "
                            "or it uses a non-AOT plugin that must be loaded first; rebuild it with "
                            "`export-engine ... --engine`")
        self._runtime, self.engine = runtime, engine
        io_names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        self.output_names = [*OUTPUTS, *(n for n in MASK_OUTPUTS if n in io_names)]  # + masks: Mask R-CNN
        self.metadata = {str(k): str(v) for k, v in sidecar.get("metadata", {}).items()}
        profile_max = sidecar.get("profile", {}).get("images", {}).get("max", [None])[0]
        self.max_batch = min(x for x in (self._user_max_batch, profile_max) if x) if profile_max else \
            self._user_max_batch  # fmt: skip

    def _state(self) -> _ThreadState:
        state = getattr(self._local, "state", None)
        if state is None:
            _ok(self._cudart.cudaSetDevice(self.device), "cudaSetDevice")
            state = _ThreadState(self.engine, self._cudart, self.output_names)
            self._local.state = state
            with self._lock:
                self._states.append(state)
        return state

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        trt, cudart, st = self._trt, self._cudart, self._state()
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, arr in feed.items():
            if not st.context.set_input_shape(name, arr.shape):
                raise UserError(f"input {name!r} of shape {arr.shape} is outside the engine's profile; rebuild "
                                "the engine with larger --max-size / batch, or resize the images smaller")
            buf = st.buffers[name]
            buf.ensure(arr.nbytes)
            buf.host_view(arr.shape, arr.dtype)[...] = arr
            _ok(cudart.cudaMemcpyAsync(buf.device_ptr, buf.host_ptr, arr.nbytes, h2d, st.stream), "H2D copy")
            st.context.set_tensor_address(name, buf.device_ptr)
        shapes = {}
        for name in self.output_names:
            shape = tuple(st.context.get_tensor_shape(name))
            dtype = trt.nptype(self.engine.get_tensor_dtype(name))
            st.buffers[name].ensure(max(1, int(np.prod(shape))) * np.dtype(dtype).itemsize)
            st.context.set_tensor_address(name, st.buffers[name].device_ptr)
            shapes[name] = (shape, dtype)
        self._execute(st, tuple(a.shape for a in feed.values()))
        for name, (shape, dtype) in shapes.items():
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            buf = st.buffers[name]
            _ok(cudart.cudaMemcpyAsync(buf.host_ptr, buf.device_ptr, nbytes, d2h, st.stream), "D2H copy")
        _ok(cudart.cudaStreamSynchronize(st.stream), "cudaStreamSynchronize")
        dtypes = {**OUTPUTS, **MASK_OUTPUTS}
        return {name: st.buffers[name].host_view(shape, dtype).astype(dtypes[name], copy=True)
                for name, (shape, dtype) in shapes.items()}  # fmt: skip

    def _execute(self, st: _ThreadState, key: tuple[Any, ...]) -> None:
        cudart = self._cudart
        if self.cuda_graph and st.graph_key == key:
            _ok(cudart.cudaGraphLaunch(st.graph_exec, st.stream), "cudaGraphLaunch")
            return
        if not st.context.execute_async_v3(st.stream):  # first run of a shape: TensorRT may allocate here
            raise RuntimeError(f"TensorRT execute_async_v3 failed on {self.path} (see its log above)")
        if not self.cuda_graph:
            return
        if st.graph_exec is not None:
            cudart.cudaGraphExecDestroy(st.graph_exec)
            st.graph_exec, st.graph_key = None, None
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        _ok(cudart.cudaStreamBeginCapture(st.stream, mode), "cudaStreamBeginCapture")
        st.context.execute_async_v3(st.stream)
        graph = _ok(cudart.cudaStreamEndCapture(st.stream), "cudaStreamEndCapture")
        st.graph_exec = _ok(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        cudart.cudaGraphDestroy(graph)
        st.graph_key = key

    def _deactivate(self) -> None:
        for state in self._states:
            state.free(self._cudart)
        self._states.clear()
        self._local = threading.local()
        self.engine = self._runtime = None
