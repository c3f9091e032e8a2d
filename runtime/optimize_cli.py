"""``frcnn optimize MODEL.onnx [--cache-dir DIR]``: fill the pre-optimised graph cache ahead of time.

What ``Detector(path, low_memory=True)`` (ONNX Runtime, CPU) loads: the model's graph optimised once at
ORT_ENABLE_ALL for this machine and ORT build, cached by content (:mod:`frcnn.runtime.backends.ort_cache`).
Run it where the model will be served (like building a TensorRT engine): the entry is valid only for the same
onnxruntime version and CPU features. Prints the entry's path (an existing entry is reused). The optimiser
runs in a child process. Bad input (a missing or non-ONNX file, a model that is not a frcnn detector, a cache
folder that cannot be written) exits 2 with one line and writes nothing.
"""

from __future__ import annotations

import argparse
import os

from frcnn.runtime.backends import ONNX_SUFFIXES, check_model_file
from frcnn.runtime.errors import UserError

__all__ = ["add_parser", "run_optimize"]


def run_optimize(args: argparse.Namespace) -> int:
    """Check the model and the cache folder, build the entry if missing, print its path."""
    check_model_file(args.model)
    if os.path.splitext(args.model)[1].lower() not in ONNX_SUFFIXES:
        raise UserError(f"frcnn optimize takes the .onnx model written by `frcnn export`, got {args.model!r} (a "
                        "TensorRT engine is already optimised; an ONNX file must end in .onnx)")
    from frcnn.runtime.backends.onnxruntime import _import_ort
    from frcnn.runtime.backends.ort_cache import ensure_optimized

    _import_ort()
    entry = ensure_optimized(args.model, args.cache_dir)
    print(entry.path)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("optimize", help="pre-optimise an ONNX model for low-memory ONNX Runtime (CPU)",
                                   description=__doc__.split("\n\n")[0] if __doc__ else None)  # fmt: skip
    parser.add_argument("model", metavar="MODEL.onnx", help="the ONNX model written by `frcnn export`")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="cache folder (default: $FRCNN_CACHE_DIR/ort, else $XDG_CACHE_HOME/frcnn/ort, else "
                             "~/.cache/frcnn/ort)")  # fmt: skip
    parser.set_defaults(func=run_optimize)
    return parser
