"""``frcnn train --config CFG --data DIR --output OUT [--resume] [KEY VALUE ...]``.

CFG is a YAML file or a packaged config name (``frcnn-small-R18.yaml``,
``COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml``); ``KEY VALUE`` pairs override it (detectron2 style, e.g.
``SOLVER.MAX_ITER 2000 SOLVER.BASE_LR 0.01``). DIR holds ``annotations/instances_train.json`` + ``train/``
(and ``val`` for TEST.EVAL_PERIOD), as written by ``frcnn data synth``. The same command runs one rank of
``torchrun --nproc_per_node N -m frcnn.runtime.cli train ...`` (see docs/training.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from typing import Any

from frcnn.runtime.errors import INTERRUPTED_EXIT_CODE, ConfigError, UserError

__all__ = ["add_parser", "build_config", "run_train"]


def build_config(config: str, opts: list[str]) -> Any:
    """get_cfg() + the file (or packaged name) + KEY VALUE overrides; ConfigError names a bad key/value."""
    from frcnn.trainer.config import available_configs, get_cfg, model_zoo_config

    options = [o for o in opts[0::2] if o.startswith("--")]
    if options:
        raise ConfigError(f"{options[0]} must come before the KEY VALUE overrides (everything after the first "
                          f"override is read as KEY VALUE pairs); move it before {opts[0]}")  # fmt: skip
    if len(opts) % 2:
        raise ConfigError(f"overrides must be KEY VALUE pairs; got an odd number of items: {' '.join(opts)}")
    path = config
    if not os.path.exists(config):
        if config not in available_configs():
            raise ConfigError(f"config {config!r} is neither a file nor a packaged config; packaged: "
                              f"{', '.join(available_configs())}.")  # fmt: skip
        path = model_zoo_config(config)
    cfg = get_cfg()
    cfg.merge_from_file(path)
    cfg.merge_from_list(list(opts))
    return cfg


def _set_num_classes(cfg: Any, requested: str, dataset_classes: int, names: tuple[str, ...]) -> None:
    current = int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    if requested == "auto":
        if current != dataset_classes:
            print(f"frcnn train: MODEL.ROI_HEADS.NUM_CLASSES {current} -> {dataset_classes} (the dataset's "
                  f"classes: {', '.join(names)}); pass --num-classes N to choose.", file=sys.stderr)  # fmt: skip
            cfg.MODEL.ROI_HEADS.NUM_CLASSES = dataset_classes
        return
    try:
        wanted = int(requested)
    except ValueError:
        raise UserError(f"--num-classes {requested!r}: give 'auto' or a positive integer.") from None
    if wanted < dataset_classes:
        raise UserError(f"--num-classes {wanted} is smaller than the dataset's {dataset_classes} classes "
                        f"({', '.join(names)}); use --num-classes auto.")  # fmt: skip
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = wanted


def run_train(args: argparse.Namespace) -> int:
    from frcnn.trainer.data import load_dataset
    from frcnn.trainer.engine import NonFiniteLossError, train

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")  # fmt: skip
    if args.log_period < 1:
        raise UserError(f"--log-period {args.log_period}: give a number of iterations >= 1")
    cfg = build_config(args.config, args.opts)
    dataset = load_dataset(args.data, "train")
    _set_num_classes(cfg, args.num_classes, dataset[1].num_classes, dataset[1].thing_classes)
    try:
        summary = train(cfg, args.data, args.output, resume=args.resume, log_period=args.log_period,
                        progress=not args.no_progress, eval_split=args.eval_split, dataset=dataset)  # fmt: skip
    except NonFiniteLossError as exc:
        print(f"frcnn train: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if rank == 0:
            print(interrupted_message(args, int(cfg.SOLVER.MAX_ITER)), file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    if rank == 0:  # the process group is gone by now: torchrun's RANK decides who reports
        final = summary["final_checkpoint"]
        print(f"frcnn train: iterations {summary['start_iter']}..{summary['max_iter'] - 1} done; "
              f"final checkpoint: {final or '(none)'}")  # fmt: skip
        if summary["eval"]:
            ev = summary["eval"]
            print("frcnn train: " + ", ".join(f"{k} {100 * ev[k]:.1f}" for k in ("AP", "AP50", "AP75") if k in ev))
    return 0


def interrupted_message(args: argparse.Namespace, max_iter: int) -> str:
    """What Ctrl-C left in OUT (the last checkpoint and its iteration, or nothing) and the command to resume."""
    from frcnn.trainer.engine.run_dir import last_saved

    command = ["frcnn", "train", "--config", args.config, "--data", args.data, "--output", args.output, "--resume"]
    if args.num_classes != "auto":
        command += ["--num-classes", args.num_classes]
    command = shlex.join(command + list(args.opts))
    saved = last_saved(args.output) if os.path.isdir(args.output) else None
    if saved is None:
        return ("frcnn train: interrupted before the first checkpoint; no checkpoint was written (the first is saved "
                f"after SOLVER.CHECKPOINT_PERIOD iterations). Start again with the same command; with --resume it "
                f"starts at iteration 0: {command}")  # fmt: skip
    path, iteration = saved
    done = f"iteration {iteration}" if iteration is not None else f"the final iteration {max_iter - 1}"
    return (f"frcnn train: interrupted. The last checkpoint is {path} ({done}); iterations after it are lost. "
            f"Resume from it with:\n  {command}")  # fmt: skip


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="train a detector from a config",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Example: frcnn train --config frcnn-small-R18.yaml --data data/synth --output out/small "
               "SOLVER.MAX_ITER 300",
    )  # fmt: skip
    parser.add_argument("--config", required=True, help="YAML config file or packaged config name")
    parser.add_argument("--data", required=True, help="dataset folder (annotations/instances_train.json, train/)")
    parser.add_argument("--output", required=True, help="output folder: checkpoints, metrics.json, config.yaml")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT/last_checkpoint")
    parser.add_argument("--num-classes", default="auto",
                        help="'auto' (default): MODEL.ROI_HEADS.NUM_CLASSES = the dataset's class count")
    parser.add_argument("--eval-split", default="val", help="split evaluated every TEST.EVAL_PERIOD (default val)")
    parser.add_argument("--log-period", type=int, default=20, help="iterations between metrics.json lines")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides, e.g. SOLVER.MAX_ITER 100")  # fmt: skip
    parser.set_defaults(func=run_train)
    return parser
