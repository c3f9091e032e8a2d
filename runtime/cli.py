"""The ``frcnn`` command: one entry point, one sub-command per job.

Sub-commands live beside the code they drive and are imported only when chosen, so ``frcnn infer`` never
imports torch. A sub-command module provides ``add_parser(subparsers) -> argparse.ArgumentParser`` whose
parser sets ``func`` (called with the parsed namespace, returns an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from frcnn.runtime.errors import UserError

# name -> (module providing add_parser, one-line help). Ordered as a user meets them.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("frcnn.runtime.demo_cli", "the main job end to end: synthetic data -> train -> export -> infer -> parity"),
    "data": ("frcnn.trainer.data.cli", "make or inspect datasets (e.g. `frcnn data synth OUT`)"),
    "train": ("frcnn.trainer.train_cli", "train a detector from a config"),
    "export": ("frcnn.export.cli", "checkpoint -> ONNX (-> TensorRT engine); same as `export-engine`"),
    "plugins": ("frcnn.plugins.cli", "build the plugins' PTX for GPU targets"),
    "infer": ("frcnn.runtime.infer_cli", "run an exported model on images"),
    "parity": ("frcnn.runtime.parity_cli", "compare PyTorch with the deployed model"),
    "eval": ("frcnn.runtime.eval_cli", "COCO AP of a checkpoint or a deployed model"),
    "bench": ("frcnn.runtime.bench_cli", "latency / throughput of a deployed model"),
    "serve": ("frcnn.runtime.serving.serve_cli", "serve a deployed model on Triton Inference Server (PyTriton)"),
    "triton-repo": ("frcnn.runtime.serving.triton_repo_cli", "write a model repository for a stock tritonserver"),
}


def _build_parser(chosen: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="frcnn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if name == chosen:
            try:
                mod = importlib.import_module(module)
            except ImportError as exc:
                raise UserError(
                    f"`frcnn {name}` needs a dependency that is not installed ({exc}). "
                    "Install the matching extra, e.g. `pip install frcnn-deploy[dev]`."
                ) from exc
            mod.add_parser(sub)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in args_list if not a.startswith("-")), None)
    chosen = chosen if chosen in COMMANDS else None
    try:
        parser = _build_parser(chosen)
        args = parser.parse_args(args_list)
        if getattr(args, "func", None) is None:
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"frcnn: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
