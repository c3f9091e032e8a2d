"""ONNX -> TensorRT engine, plus the sidecar JSON that the runtime checks before deserializing.

    info = build_engine("model.onnx", "model.engine", min_shapes=..., opt_shapes=..., max_shapes=...,
                        fp16=False, timing_cache="model.timing", workspace=4 << 30)

Build steps: register the ``frcnn`` plugins (``frcnn.plugins.tensorrt``), strip the model-local functions of
the ``frcnn`` ops (so the parser can only map the nodes to the plugins), optionally convert to fp16 types
(:func:`frcnn.export.fp16.to_fp16_onnx`; TensorRT 11 has no BuilderFlag.FP16), parse into a STRONGLY_TYPED
network (valid on TensorRT 10.9+ and 11.x), one optimization profile, timing cache load/save, serialize.
The engine and ``<engine>.json`` are written atomically (temp file + os.replace).

Importing this module imports only the standard library (the runtime imports :func:`check_engine_compat`);
onnx and tensorrt are imported inside the functions that need them.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from frcnn.runtime.errors import UserError
from frcnn.runtime.fileio import atomic_write

SIDECAR_FORMAT = "frcnn-engine/1"
DEFAULT_WORKSPACE = 4 << 30
NO_TENSORRT_EXIT_CODE = 3
"""Exit code of ``export-engine ... --engine`` when the ONNX was written but the engine was skipped."""

Shapes = Mapping[str, Sequence[int]]


@dataclass
class EngineInfo:
    """What :func:`build_engine` produced; ``sidecar`` is the JSON written beside the engine."""

    engine_path: Path
    sidecar_path: Path
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    fp16: bool
    profile: dict[str, dict[str, list[int]]]
    sidecar: dict[str, Any] = field(repr=False)


def sidecar_path(engine_path: str | os.PathLike[str]) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    path = Path(engine_path)
    return path.with_name(path.name + ".json")


def image_profile(min_batch: int, opt_batch: int, max_batch: int, min_hw: Sequence[int], opt_hw: Sequence[int],
                  max_hw: Sequence[int]) -> tuple[dict[str, list[int]], dict[str, list[int]], dict[str, list[int]]]:
    """(min, opt, max) shapes of ``images`` [B, 3, H, W] and ``image_sizes`` [B, 2] from batch and (H, W).

    H and W must be multiples of 32 (the runtime pads batches to a multiple of 32).
    """
    shapes = []
    for batch, hw in ((min_batch, min_hw), (opt_batch, opt_hw), (max_batch, max_hw)):
        h, w = (int(v) for v in hw)
        if h % 32 or w % 32 or h <= 0 or w <= 0 or batch <= 0:
            raise UserError(f"engine profile: batch {batch} and image size {h}x{w} must be positive, with H and W "
                            f"multiples of 32 (the runtime pads to 32); e.g. --max-size 1344 1344")
        shapes.append({"images": [int(batch), 3, h, w], "image_sizes": [int(batch), 2]})
    _check_profile(*shapes)
    return shapes[0], shapes[1], shapes[2]


def _check_profile(min_shapes: Shapes, opt_shapes: Shapes, max_shapes: Shapes) -> dict[str, dict[str, list[int]]]:
    if not (set(min_shapes) == set(opt_shapes) == set(max_shapes)):
        raise UserError(f"engine profile: min/opt/max name different inputs: {sorted(min_shapes)}, "
                        f"{sorted(opt_shapes)}, {sorted(max_shapes)}")
    profile = {}
    for name in min_shapes:
        lo, mid, hi = (list(map(int, s[name])) for s in (min_shapes, opt_shapes, max_shapes))
        if not (len(lo) == len(mid) == len(hi)) or any(not a <= b <= c for a, b, c in zip(lo, mid, hi)):
            raise UserError(f"engine profile for input {name!r}: need min <= opt <= max per dimension, got "
                            f"{lo}, {mid}, {hi}")
        profile[name] = {"min": lo, "opt": mid, "max": hi}
    return profile


def build_engine(onnx_path: str | os.PathLike[str], engine_path: str | os.PathLike[str], *, min_shapes: Shapes,
                 opt_shapes: Shapes, max_shapes: Shapes, fp16: bool = False,
                 timing_cache: str | os.PathLike[str] | None = None,
                 workspace: int = DEFAULT_WORKSPACE) -> EngineInfo:
    """Build and write a TensorRT engine (plus sidecar) from an exported ONNX file.

    Args:
        onnx_path: the exported model (``frcnn::`` nodes with plugin attributes).
        engine_path: where the serialized engine goes; the sidecar is ``<engine_path>.json``.
        min_shapes / opt_shapes / max_shapes: input name -> shape, e.g. ``images`` [B, 3, H, W] and
            ``image_sizes`` [B, 2] (see :func:`image_profile`).
        fp16: convert float tensors to fp16 first (numerically sensitive parts stay fp32).
        timing_cache: file to load the timing cache from (if present) and save it to.
        workspace: builder workspace limit in bytes.
    Raises:
        UserError: TensorRT >= 10.9 / a GPU missing, unreadable ONNX, parser errors, failed build.
    """
    from frcnn.plugins import tensorrt as frcnn_trt

    profile = _check_profile(min_shapes, opt_shapes, max_shapes)
    trt = frcnn_trt.require_tensorrt()
    gpu = frcnn_trt.current_gpu()
    frcnn_trt.register()
    frcnn_trt.aot_records(clear=True)
    model = _load_for_tensorrt(Path(onnx_path), fp16)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString(), str(Path(onnx_path).resolve())):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise UserError(f"TensorRT's ONNX parser rejected {onnx_path} ({len(errors)} error(s)):\n  "
                        + "\n  ".join(errors) + "\nfix: re-export with the same frcnn version; custom nodes "
                        "need the frcnn plugins (registered here) and TensorRT >= 10.9")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    _add_profile(trt, builder, network, config, profile)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    cache_bytes = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"TensorRT could not build an engine from {onnx_path} (see the TensorRT log above); "
                        "check the profile shapes and the workspace limit")
    if cache_path is not None:
        atomic_write(cache_path, bytes(config.get_timing_cache().serialize()))
    engine = Path(engine_path)
    data = bytes(serialized)
    atomic_write(engine, data)
    sidecar = make_sidecar(data, trt.__version__, gpu, profile, fp16, _metadata(model),
                           frcnn_trt.aot_records(), onnx_sha256=_sha256_file(Path(onnx_path)))
    atomic_write(sidecar_path(engine), json.dumps(sidecar, indent=2).encode())
    return EngineInfo(engine, sidecar_path(engine), trt.__version__, gpu.name, gpu.cc_string(), fp16, profile,
                      sidecar)


def to_fp16_onnx(model: Any, keep_fp32: Any = None) -> Any:
    """:func:`frcnn.export.fp16.to_fp16_onnx` (imported lazily: this module stays stdlib-only at import)."""
    from frcnn.export import fp16

    return fp16.to_fp16_onnx(model, keep_fp32 or fp16.default_keep_fp32)


def _load_for_tensorrt(path: Path, fp16: bool) -> Any:
    """The ONNX model with the ``frcnn`` local functions stripped, converted to fp16 when asked."""
    import onnx
    from frcnn.plugins.onnx_registry import strip_functions

    if not path.is_file():
        raise UserError(f"ONNX file {path} not found; export it first (export-engine model.pth --onnx ...)")
    try:
        model = onnx.load(str(path))
    except (OSError, ValueError, RuntimeError) as exc:  # protobuf's DecodeError is a ValueError
        raise UserError(f"cannot read ONNX file {path}: {exc}; re-export it") from None
    strip_functions(model)
    return to_fp16_onnx(model) if fp16 else model


def _add_profile(trt: Any, builder: Any, network: Any, config: Any, profile: dict[str, dict[str, list[int]]]) -> None:
    """One optimization profile covering every network input; UserError for dynamic inputs not listed."""
    opt_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name in profile:
            shapes = profile[tensor.name]
            if len(shapes["min"]) != len(tensor.shape):
                raise UserError(f"engine profile for {tensor.name!r} has {len(shapes['min'])} dims, the network "
                                f"input has {len(tensor.shape)} ({tuple(tensor.shape)})")
            opt_profile.set_shape(tensor.name, trt.Dims(shapes["min"]), trt.Dims(shapes["opt"]),
                                  trt.Dims(shapes["max"]))
        elif any(d < 0 for d in tensor.shape):
            raise UserError(f"network input {tensor.name!r} has dynamic shape {tuple(tensor.shape)} but no profile "
                            f"entry; give min/opt/max shapes for it")
    config.add_optimization_profile(opt_profile)


def _metadata(model: Any) -> dict[str, str]:
    """The ONNX ``metadata_props`` (class names, input format, pixel mean/std, resize rule, ...), verbatim."""
    return {p.key: p.value for p in model.metadata_props}


def make_sidecar(engine_bytes: bytes, tensorrt_version: str, gpu: Any, profile: dict[str, Any], fp16: bool,
                 metadata: dict[str, str], plugins: list[dict[str, Any]], onnx_sha256: str = "") -> dict[str, Any]:
    """The sidecar dict for an engine (``gpu`` is a :class:`frcnn.plugins.tensorrt.GpuInfo`)."""
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
                        gpu: Any = None, verify_hash: bool = True) -> dict[str, Any]:
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
    if verify_hash and _sha256_file(engine) != sidecar.get("engine_sha256"):
        raise UserError(f"engine {engine} does not match its sidecar {sidecar_path(engine)} (SHA-256 differs): "
                        f"the engine was replaced after the sidecar was written; rebuild both together")
    if tensorrt_version is None or gpu is None:
        from frcnn.plugins import tensorrt as frcnn_trt

        tensorrt_version = tensorrt_version or frcnn_trt.require_tensorrt().__version__
        gpu = gpu or frcnn_trt.current_gpu()
    _compare(engine, sidecar, tensorrt_version, gpu)
    return sidecar


def _compare(engine: Path, sidecar: dict[str, Any], tensorrt_version: str, gpu: Any) -> None:
    from frcnn.plugins.tensorrt import parse_version

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


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = [
    "DEFAULT_WORKSPACE",
    "NO_TENSORRT_EXIT_CODE",
    "SIDECAR_FORMAT",
    "EngineInfo",
    "build_engine",
    "check_engine_compat",
    "image_profile",
    "make_sidecar",
    "read_sidecar",
    "sidecar_path",
    "to_fp16_onnx",
    "write_sidecar",
]
