"""``frcnn eval``: COCO AP of a model on a dataset split.

Two paths, chosen by the arguments:

- PyTorch checkpoint: ``frcnn eval --config CFG --weights W.pth --data DIR [--split val] [--output OUT]``
  (the trainer's model; needs torch, imported only on this path);
- deployed model: ``frcnn eval MODEL.onnx|MODEL.engine|MODEL.plan --data DIR ...`` (ONNX Runtime / TensorRT).

Both print a table of AP, AP50, AP75, APs, APm, APl (and per-class AP), computed by pycocotools, and with
``--output`` write ``OUT/coco_instances_results.json`` (COCO results format) and ``OUT/metrics.json``
(metrics in 0..1). This module imports neither torch nor the model at import time.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from typing import Any

from frcnn.runtime.errors import UserError
from frcnn.runtime.fileio import atomic_write_json

__all__ = ["DEPLOYED_SUFFIXES", "add_parser", "evaluate_checkpoint", "format_table", "run_eval"]

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


def evaluate_checkpoint(config: str, weights: str, data_dir: str, *, split: str = "val",
                        opts: Sequence[str] = (), output_dir: str | None = None, batch_size: int = 1,
                        device: str | None = None) -> dict[str, float]:
    """COCO AP of a checkpoint (the PyTorch path of ``frcnn eval``): config + KEY VALUE overrides, strict load,
    ``evaluate_model`` on ``data_dir``'s ``split``. Input problems raise UserError naming the fix."""
    import torch
    from frcnn.trainer.checkpoint import load_checkpoint
    from frcnn.trainer.data import load_coco_split
    from frcnn.trainer.engine import evaluate_model
    from frcnn.trainer.engine.launch import select_device
    from frcnn.trainer.modeling import build_model
    from frcnn.trainer.train_cli import build_config

    cfg = build_config(config, list(opts))
    if not os.path.isdir(data_dir):
        raise UserError(f"dataset folder {data_dir} does not exist (expected annotations/instances_"
                        f"{split}.json and {split}/ inside).")  # fmt: skip
    dicts, meta = load_coco_split(data_dir, split)
    if meta.num_classes != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
        raise UserError(f"the '{split}' split has {meta.num_classes} classes but the config's "
                        f"MODEL.ROI_HEADS.NUM_CLASSES is {cfg.MODEL.ROI_HEADS.NUM_CLASSES}; pass the config the "
                        "model was trained with (OUT/config.yaml).")  # fmt: skip
    dev = select_device(device or cfg.MODEL.DEVICE)
    model = build_model(cfg).to(dev).eval()
    load_checkpoint(model, weights, strict=True)
    with torch.inference_mode():
        return evaluate_model(model, cfg, dicts, meta, output_dir=output_dir, batch_size=batch_size, device=dev,
                              num_workers=0)  # fmt: skip


def _eval_checkpoint(args: argparse.Namespace) -> dict[str, float]:
    """PyTorch path: build the model from --config, load --weights, evaluate on --data/--split."""
    if not args.config:
        raise UserError("--weights needs --config (the config the checkpoint was trained with, e.g. "
                        "OUT/config.yaml written by `frcnn train`).")  # fmt: skip
    if not os.path.isfile(args.weights):
        raise UserError(f"checkpoint {args.weights} does not exist; pass the .pth / .pkl to evaluate.")
    return evaluate_checkpoint(args.config, args.weights, args.data, split=args.split, opts=args.opts,
                               output_dir=args.output, batch_size=args.batch_size, device=args.device)  # fmt: skip


def _eval_deployed(args: argparse.Namespace) -> dict[str, float]:
    """Deployed path (ONNX / TensorRT; torch-free unless --weights asks for the PyTorch reference too)."""
    from frcnn.trainer.eval_deployed import run_deployed

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
