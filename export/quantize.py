"""INT8 by explicit Q/DQ: an exported fp32 ONNX + calibration images -> ``model.int8.onnx``.

    from frcnn.export import quantize_onnx
    quantize_onnx("model.onnx", "calib/", calib_count=200, method="minmax")   # -> model.int8.onnx

TensorRT 11 builds INT8 only from QuantizeLinear/DequantizeLinear nodes in the ONNX; ONNX Runtime runs the
same graph with integer kernels on the CPU, which is how this file is proven here. Steps:

1. checks (before any work): the model has frcnn metadata and the custom domain, the calibration folder
   exists and every image in it decodes (``frcnn.export.calibration``);
2. FrozenBN affine folded into the convolutions (``frcnn.export.fold_bn``) so Q/DQ sit on real Conv outputs;
3. ONNX Runtime's ``quantize_static`` in QDQ format: int8 activations and weights, symmetric (zero point 0),
   per-channel weights, per-tensor activations, on the nodes ``frcnn.export.qdq_rules.nodes_to_quantize``
   picks (backbone, FPN, RPN head, box head) minus ``exclude`` patterns; the ranges come from running the
   calibration images through the model as the runtime feeds them;
4. the ``frcnn`` nodes read fp32 tensors again (Q/DQ bypassed), the local functions and metadata are
   restored, ``precision`` / ``int8_*`` metadata added, ``onnx.checker`` full check, strict shape
   inference, the TensorRT Q/DQ rule check, then an atomic write.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from frcnn.export.calibration import CALIBRATION_METHODS, DEFAULT_CALIB_COUNT, CalibrationImages
from frcnn.export.fold_bn import fold_conv_affine
from frcnn.export.onnx_export import check, check_writable, write_atomic
from frcnn.export.qdq_rules import (
    QUANTIZED_OP_TYPES,
    bypass_qdq_for_custom_nodes,
    check_qdq_rules,
    nodes_to_quantize,
    unshare_qdq_params,
)
from frcnn.export.replace_policy import check_replaceable
from frcnn.runtime.detector import parse_metadata
from frcnn.runtime.errors import UserError

PRECISION_KEY = "precision"


def int8_path(onnx_path: str | os.PathLike[str]) -> Path:
    """``model.onnx`` -> ``model.int8.onnx`` (beside it)."""
    path = Path(onnx_path)
    return path.with_name(path.stem + ".int8.onnx")


def load_frcnn_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """The fp32 model written by ``frcnn export``; UserError when missing, unreadable or not ours."""
    from frcnn.plugins import DOMAIN

    if not os.path.isfile(path):
        raise UserError(f"ONNX model {path} does not exist; export it first with `frcnn export model.pth`")
    try:
        model = onnx.load(os.fspath(path))
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types for a corrupt file
        raise UserError(f"cannot read ONNX model {path} ({type(exc).__name__}: {exc}); re-export it") from None
    metadata = {p.key: p.value for p in model.metadata_props}
    parse_metadata(metadata, os.fspath(path))  # UserError when the frcnn metadata is missing
    if metadata.get(PRECISION_KEY, "fp32") != "fp32":
        raise UserError(f"{path} is already {metadata[PRECISION_KEY]}; quantize the fp32 ONNX written by "
                        "`frcnn export`")
    if metadata.get("custom_domain") != DOMAIN or not any(n.domain == DOMAIN for n in model.graph.node):
        raise UserError(f"{path} has no frcnn custom nodes; --int8 quantizes the ONNX written by `frcnn export`")
    return model


class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader`` over CalibrationImages (duck-typed: get_next/rewind)."""

    def __init__(self, images: CalibrationImages | list[dict[str, np.ndarray]]) -> None:
        self.images = images
        self._it: Iterator[dict[str, np.ndarray]] = iter(images)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.images)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.images)

    def __len__(self) -> int:
        return len(self.images)


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """ONNX Runtime's quantizer prints progress (histogram calibration) and logs advice to run
    ``quant_pre_process`` on the root logger (this module folds the BN affine itself, the part of that
    pre-processing the graph needs: docs/int8.md); both are kept off the user's terminal for the duration."""

    def keep(record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.removeFilter(keep)


HISTOGRAM_OPTIONS = {"entropy": {"num_bins": 2048, "num_quantized_bins": 128, "symmetric": True},
                     "percentile": {"num_bins": 2048, "percentile": 99.999, "symmetric": True}}
"""ORT calibrator options of the histogram methods. Entropy as TensorRT's entropy calibrator (2048 bins,
thresholds searched over 128 quantized bins): ``quantize_static`` cannot pass the bins and ORT's entropy default
is 128 / 128, where the only candidate threshold is the full range, i.e. exactly MinMax (measured: identical
scales). Percentile: ORT's defaults, stated."""


def _histogram_ranges(src: str, images: CalibrationImages, method: str, kind: Any, tmp: str) -> str:
    """Calibrate ``src`` with ORT's histogram calibrator of ``method``, one image per ``collect_data`` call
    (ORT stacks the calls' tensors with ``np.asarray``, which fails on images of different sizes; histograms
    merge across calls); returns the path of its range cache (``save_tensors_data``) for
    ``quantize_static(calibration_cache_path=...)``; ``kind`` is the method's ``CalibrationMethod``."""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    calibrator = create_calibrator(src, list(QUANTIZED_OP_TYPES),
                                   augmented_model_path=os.path.join(tmp, "augmented.onnx"), calibrate_method=kind,
                                   extra_options=HISTOGRAM_OPTIONS[method])  # fmt: skip
    for feed in images:
        calibrator.collect_data(_Reader([feed]))
    cache = os.path.join(tmp, "calibration.json")
    save_tensors_data(calibrator.compute_data(), cache)
    return cache


def _ort_quantize(model: onnx.ModelProto, images: CalibrationImages, method: str, nodes: list[str]) -> onnx.ModelProto:
    import inspect

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}[method]  # fmt: skip
    if method in HISTOGRAM_OPTIONS and "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        raise UserError(f"--calib-method {method} needs an onnxruntime whose quantize_static takes "
                        "calibration_cache_path (1.32 has it); upgrade onnxruntime or use minmax")
    with tempfile.TemporaryDirectory(prefix="frcnn-int8-") as tmp:
        src, dst = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        onnx.save(model, src)
        with _quiet_quantizer():
            cache = _histogram_ranges(src, images, method, calib, tmp) if method in HISTOGRAM_OPTIONS else None
            reader = None if cache else _Reader(images)
            kwargs = {"calibration_cache_path": cache} if cache else {}
            quantize_static(src, dst, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                            op_types_to_quantize=list(QUANTIZED_OP_TYPES),  # also what calibration collects
                            calibrate_method=calib,
                            # No "CalibMaxIntermediateOutputs": ORT's MinMax calibrator (1.32) drops each full
                            # chunk without reducing it, so only the last len % chunk images would count (none
                            # left: "No data is collected"). Its per-image outputs are ReduceMin/ReduceMax
                            # results, small anyway.
                            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                           "QuantizeBias": False, "DedicatedQDQPair": True},
                            **kwargs)  # fmt: skip
        return onnx.load(dst)


def quantize_model(model: onnx.ModelProto, images: CalibrationImages, method: str = "minmax",
                   exclude: Sequence[str] = ()) -> onnx.ModelProto:
    """The checked Q/DQ ModelProto of an fp32 frcnn ``model`` (steps 2-4 of the module docstring)."""
    if method not in CALIBRATION_METHODS:
        raise UserError(f"--calib-method {method!r} is not one of {', '.join(CALIBRATION_METHODS)}")
    folded, _ = fold_conv_affine(model)
    nodes = nodes_to_quantize(folded, exclude)
    if not nodes:
        raise UserError(f"--int8-exclude {' '.join(exclude)} excludes every quantizable node; nothing would run "
                        "in int8")
    result = _ort_quantize(folded, images, method, nodes)
    bypass_qdq_for_custom_nodes(result)
    unshare_qdq_params(result)
    del result.functions[:]
    result.functions.extend(model.functions)
    del result.opset_import[:]
    result.opset_import.extend(model.opset_import)
    result.ir_version = model.ir_version
    del result.graph.value_info[:]
    result.graph.name = model.graph.name
    result.producer_name, result.producer_version = model.producer_name, model.producer_version
    props = {p.key: p.value for p in model.metadata_props}
    props.update({PRECISION_KEY: "int8", "int8_calibration": json.dumps(
        {"method": method, "images": len(images), "exclude": list(exclude), "quantized_nodes": len(nodes),
         "tool": "onnxruntime.quantization.quantize_static (QDQ, symmetric, per-channel weights)"})})
    del result.metadata_props[:]
    for key, value in props.items():
        result.metadata_props.add(key=key, value=value)
    problems = check_qdq_rules(result)
    if problems:
        raise RuntimeError("the Q/DQ graph breaks TensorRT's rules: " + "; ".join(problems[:5]))
    check(result)
    return result


def quantize_onnx(onnx_path: str | os.PathLike[str], calib_images: str | os.PathLike[str],
                  output_path: str | os.PathLike[str] | None = None, *, calib_count: int | None = DEFAULT_CALIB_COUNT,
                  method: str = "minmax", exclude: Sequence[str] = (), overwrite: bool = False) -> Path:
    """Write the INT8 Q/DQ copy of ``onnx_path`` (default ``model.int8.onnx`` beside it); returns its path.

    calib_count: the first N images (sorted names) of ``calib_images``; ``None`` uses all. method: one of
    CALIBRATION_METHODS. exclude: fnmatch patterns of node names kept fp32. Raises UserError for bad input,
    before any quantization work; an existing ``output_path`` that is not a frcnn int8 model is refused
    unless ``overwrite``.
    """
    output = Path(output_path) if output_path is not None else int8_path(onnx_path)
    if method not in CALIBRATION_METHODS:
        raise UserError(f"--calib-method {method!r} is not one of {', '.join(CALIBRATION_METHODS)}")
    check_int8_output(output, onnx_path, overwrite, remedy="pass overwrite=True")
    model = load_frcnn_model(onnx_path)
    info = parse_metadata({p.key: p.value for p in model.metadata_props}, os.fspath(onnx_path))
    images = CalibrationImages(info, calib_images, calib_count)
    return write_atomic(quantize_model(model, images, method, exclude), output)


def check_int8_output(output: Path, source: str | os.PathLike[str], overwrite: bool,
                      remedy: str = "pass --overwrite") -> None:
    """UserError unless the int8 copy of ``source`` may be written to ``output`` (writable, not ``source``
    itself, and not an existing file other than a frcnn int8 model unless ``overwrite``)."""
    if output.resolve() == Path(source).resolve():
        raise UserError(f"the int8 output {output} is the fp32 model itself; choose another output path")
    check_writable(output)
    check_replaceable(output, overwrite, "int8", "the int8 output", remedy)
