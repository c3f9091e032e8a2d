"""ONNX -> TensorRT engine, plus the sidecar JSON that the runtime checks before deserializing.

    info = build_engine("model.onnx", "model.engine", min_shapes=..., opt_shapes=..., max_shapes=...,
                        fp16=False, timing_cache="model.timing", workspace=4 << 30)

Build steps: register the ``frcnn`` plugins (``frcnn.plugins.tensorrt``), strip the model-local functions of
the ``frcnn`` ops (so the parser can only map the nodes to the plugins), optionally convert to fp16 types
(:func:`frcnn.export.fp16.to_fp16_onnx`; TensorRT 11 has no BuilderFlag.FP16), parse into a strongly typed
network (:func:`network_flags`: the STRONGLY_TYPED flag on 10.x; on 11.x every network is strongly typed and
the flag is deprecated and ignored, so none is passed), one optimization profile, timing cache load/save,
serialize.
The engine and ``<engine>.json`` are written atomically (temp file + os.replace).

Importing this module imports only the standard library (the runtime imports :func:`check_engine_compat`);
onnx and tensorrt are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from frcnn.runtime.engine_sidecar import (
    SIDECAR_FORMAT,
    check_engine_compat,
    file_sha256,
    make_sidecar,
    read_sidecar,
    sidecar_path,
    write_sidecar,
)
from frcnn.runtime.errors import UserError
from frcnn.runtime.fileio import atomic_write
from frcnn.runtime.tensorrt_env import parse_version

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
    network = builder.create_network(network_flags(trt))
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
                           frcnn_trt.aot_records(), onnx_sha256=file_sha256(Path(onnx_path)))
    atomic_write(sidecar_path(engine), json.dumps(sidecar, indent=2).encode())
    return EngineInfo(engine, sidecar_path(engine), trt.__version__, gpu.name, gpu.cc_string(), fp16, profile,
                      sidecar)


def network_flags(trt: Any) -> int:
    """``create_network`` flags for a strongly typed network on the installed TensorRT (``trt`` module).

    TensorRT 10.x: ``1 << STRONGLY_TYPED`` (weak typing is still the default there). TensorRT 11+: 0, as
    weak typing was removed and ``STRONGLY_TYPED`` is deprecated and ignored.
    """
    if parse_version(str(trt.__version__))[:1] < (11,):
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0


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




__all__ = [
    "DEFAULT_WORKSPACE",
    "NO_TENSORRT_EXIT_CODE",
    "SIDECAR_FORMAT",
    "EngineInfo",
    "build_engine",
    "check_engine_compat",
    "image_profile",
    "make_sidecar",
    "network_flags",
    "read_sidecar",
    "sidecar_path",
    "to_fp16_onnx",
    "write_sidecar",
]
