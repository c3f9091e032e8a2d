"""``frcnn eval``: COCO AP of a model on a dataset split.

Two paths, chosen by the arguments:

- PyTorch checkpoint: ``frcnn eval --config CFG --weights W.pth --data DIR [--split val] [--output OUT]``
  (the trainer's model; needs torch, imported only on this path);
- deployed model: ``frcnn eval MODEL.onnx|MODEL.engine|MODEL.plan --data DIR ...`` (ONNX Runtime / TensorRT).

Both print a table of AP, AP50, AP75, APs, APm, APl (and per-class AP), computed by pycocotools, and with
``--output`` write ``OUT/coco_instances_results.json`` (COCO results format) and ``OUT/metrics.json``
(metrics in 0..1). This module imports neither torch nor the trainer at import time.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

from frcnn.runtime.errors import UserError
from frcnn.runtime.fileio import atomic_write_json

__all__ = ["DEPLOYED_SUFFIXES", "add_parser", "format_table", "run_eval"]

DEPLOYED_SUFFIXES = (".onnx", ".engine", ".plan")
MAIN_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def format_table(metrics: dict[str, float], title: str = "") -> str:
    """Metrics (0..1) -> a text table in percent (detectron2 prints x100); NaN shown as 'nan'."""

    def pct(v: float) -> str:
        return "nan" if v is None or math.isnan(v) else f"{100 * v:.2f}"

    main = [k for k in MAIN_METRICS if k in metrics]
    lines = [title] if title else []
    lines.append(" | ".join(f"{k:>6}" for k in main))
    lines.append(" | ".join(f"{pct(metrics[k]):>6}" for k in main))
    per_class = {k[3:]: v for k, v in metrics.items() if k.startswith("AP-")}
    if per_class:
        width = max(len(name) for name in per_class)
        lines.append("per-class AP:")
        lines += [f"  {name:<{width}}  {pct(v)}" for name, v in per_class.items()]
    return "\n".join(lines)


def _write_metrics(output: str, metrics: dict[str, float], extra: dict[str, Any]) -> str:
    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, "metrics.json")
    atomic_write_json(path, {**extra, "metrics": {k: (None if math.isnan(v) else v) for k, v in metrics.items()}},
                      indent=2)  # fmt: skip
    return path


def _eval_checkpoint(args: argparse.Namespace) -> dict[str, float]:
    """PyTorch path: build the model from --config, load --weights, evaluate on --data/--split."""
    if not args.config:
        raise UserError("--weights needs --config (the config the checkpoint was trained with, e.g. "
                        "OUT/config.yaml written by `frcnn train`).")  # fmt: skip
    if not os.path.isfile(args.weights):
        raise UserError(f"checkpoint {args.weights} does not exist; pass the .pth / .pkl to evaluate.")
    from frcnn.trainer.engine.inference import evaluate_checkpoint

    return evaluate_checkpoint(args.config, args.weights, args.data, split=args.split, opts=args.opts,
                               output_dir=args.output, batch_size=args.batch_size, device=args.device)  # fmt: skip


def _eval_deployed(args: argparse.Namespace) -> dict[str, float]:
    """Deployed path (ONNX / TensorRT; torch-free unless --weights asks for the PyTorch reference too)."""
    from frcnn.runtime.eval_deployed import run_deployed

    return run_deployed(args, _eval_checkpoint, format_table)


def run_eval(args: argparse.Namespace) -> int:
    if args.model:
        if not args.model.endswith(DEPLOYED_SUFFIXES):
            raise UserError(f"MODEL {args.model!r} must end with one of {', '.join(DEPLOYED_SUFFIXES)}; for a "
                            "PyTorch checkpoint use --config CFG --weights W.pth.")  # fmt: skip
        metrics, source = _eval_deployed(args), args.model
    elif args.weights:
        metrics, source = _eval_checkpoint(args), args.weights
    else:
        raise UserError("nothing to evaluate: pass --config CFG --weights W.pth, or a MODEL.onnx / .engine.")
    print(format_table(metrics, title=f"COCO bbox AP (%) of {source} on {args.data} [{args.split}]"))
    if "segm/AP" in metrics:  # Mask R-CNN
        segm = {k.removeprefix("segm/"): v for k, v in metrics.items() if k.startswith("segm/")}
        print(format_table(segm, title=f"COCO segm AP (%) of {source} on {args.data} [{args.split}]"))
    if args.output:
        path = _write_metrics(args.output, metrics, {"model": source, "data": args.data, "split": args.split})
        print(f"wrote {path} and {os.path.join(args.output, 'coco_instances_results.json')}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("eval", help="COCO AP of a checkpoint or a deployed model",
                                   description=__doc__.split("\n\n")[0] if __doc__ else None)  # fmt: skip
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="deployed model (.onnx / .engine / .plan); omit with --weights")  # fmt: skip
    parser.add_argument("--config", help="config of the checkpoint (file or packaged name)")
    parser.add_argument("--weights", help="PyTorch checkpoint (.pth / .pkl) to evaluate; with MODEL: the PyTorch "
                        "reference whose AP the deployed model's is compared with")
    parser.add_argument("--data", required=True, help="dataset folder (annotations/instances_<split>.json)")
    parser.add_argument("--split", default="val", help="split to evaluate (default val)")
    parser.add_argument("--output", help="folder for coco_instances_results.json and metrics.json")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass (default 1)")
    parser.add_argument("--device", help="torch device for --weights (default: MODEL.DEVICE, CPU without GPU)")
    parser.add_argument("--opts", nargs="*", default=[], metavar="KEY VALUE",
                        help="config overrides for --config, e.g. --opts INPUT.MIN_SIZE_TEST 640")  # fmt: skip
    parser.set_defaults(func=run_eval)
    return parser
