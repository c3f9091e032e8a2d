"""The ``--int8`` options of ``export-engine`` / ``frcnn export`` (the quantizer itself: ``quantize.py``).

    export-engine model.pth --int8 --calib-images DIR [--calib-count N]
                  [--calib-method minmax|entropy|percentile] [--int8-exclude PATTERN ...] [--engine model.engine]

writes ``model.int8.onnx`` beside the fp32 ONNX and, with ``--engine``, builds the engine from it. The
calibration folder is checked (exists, holds images, the images used decode) before the checkpoint is
loaded. Building the parser imports nothing heavy (no onnx / torch).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from frcnn.export.calibration import (
    CALIBRATION_METHODS,
    DEFAULT_CALIB_COUNT,
    CalibrationImages,
    list_images,
    read_image,
)
from frcnn.runtime.errors import UserError


def add_int8_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--int8``, ``--calib-images``, ``--calib-count``, ``--calib-method``, ``--int8-exclude``."""
    group = parser.add_argument_group("INT8 (explicit Q/DQ; docs/int8.md)")
    group.add_argument("--int8", action="store_true", help="also write <output>.int8.onnx (Q/DQ) and build the "
                       "engine from it with --engine")
    group.add_argument("--calib-images", metavar="DIR", help="folder of representative images (with --int8)")
    group.add_argument("--calib-count", type=int, default=DEFAULT_CALIB_COUNT,
                       help=f"calibrate on the first N images, sorted by name ({DEFAULT_CALIB_COUNT})")
    group.add_argument("--calib-method", choices=CALIBRATION_METHODS, default="minmax",
                       help="activation range estimator (minmax)")
    group.add_argument("--int8-exclude", nargs="+", default=[], metavar="PATTERN",
                       help="keep nodes whose name matches these fnmatch patterns in fp32, e.g. 'backbone/bottom_up/stem/*'")


def check_int8_arguments(args: argparse.Namespace, onnx_output: Path) -> None:
    """UserError for inconsistent INT8 options or a bad calibration folder (before any model work)."""
    if not args.int8:
        if args.calib_images or args.int8_exclude:
            raise UserError("--calib-images / --int8-exclude apply to --int8 only; add --int8")
        return
    if not args.calib_images:
        raise UserError("--int8 needs --calib-images DIR: a folder of representative images (a few hundred from "
                        "your validation set)")
    if args.fp16:
        raise UserError("--fp16 and --int8 exclude each other: the int8 engine is built from the Q/DQ ONNX; "
                        "choose one")
    if args.calib_count < 1:
        raise UserError(f"--calib-count must be >= 1, got {args.calib_count}")
    for path in list_images(args.calib_images)[: args.calib_count]:  # every image decodes, before the export
        read_image(path)
    from frcnn.export.quantize import check_int8_output, int8_path

    check_int8_output(int8_path(onnx_output), onnx_output, args.overwrite)


def run_int8(args: argparse.Namespace, onnx_path: Path) -> Path:
    """Quantize ``onnx_path`` per ``args`` and print a summary; returns the path the engine is built from."""
    if not args.int8:
        return onnx_path
    from frcnn.export.onnx_export import write_atomic
    from frcnn.export.quantize import int8_path, load_frcnn_model, quantize_model
    from frcnn.runtime.detector import parse_metadata

    start = time.perf_counter()
    model = load_frcnn_model(onnx_path)
    info = parse_metadata({p.key: p.value for p in model.metadata_props}, str(onnx_path))
    images = CalibrationImages(info, args.calib_images, args.calib_count)
    quantized = quantize_model(model, images, args.calib_method, args.int8_exclude)
    path = write_atomic(quantized, int8_path(onnx_path))
    qdq = sum(n.op_type == "QuantizeLinear" for n in quantized.graph.node)
    print(f"int8 ONNX: {path} ({len(images)} calibration images, {args.calib_method}, {qdq} QuantizeLinear nodes, "
          f"{path.stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - start:.1f} s)")
    return path
