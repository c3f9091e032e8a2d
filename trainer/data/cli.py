"""``frcnn data``: make a synthetic dataset (``synth``) or validate a COCO dataset folder (``check``).

Torch-free: only numpy + Pillow are imported.
"""

from __future__ import annotations

import argparse
import time
import warnings

from .coco import load_coco_split
from .synth import CLUTTER, MAX_SHAPES, MIN_SIDE, SHAPE_NAMES, synthesize_dataset


def _synth(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    counts = synthesize_dataset(
        args.out,
        num_images=args.images,
        size=args.size,
        num_classes=args.classes,
        seed=args.seed,
        val_fraction=args.val_fraction,
        overwrite=args.overwrite,
        workers=args.workers,
        min_side=args.min_side,
        max_shapes=args.max_shapes,
        clutter=args.clutter,
    )
    print(
        f"wrote {args.out}: train {counts['train_images']} images / {counts['train_annotations']} boxes, "
        f"val {counts['val_images']} images / {counts['val_annotations']} boxes, "
        f"classes {', '.join(SHAPE_NAMES[: args.classes])} ({time.perf_counter() - start:.1f} s)"
    )
    return 0


def _check(args: argparse.Namespace) -> int:
    for split in args.splits:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _dicts, meta = load_coco_split(args.dir, split)
        s = meta.stats
        print(
            f"{split}: {s.images} images, {s.annotations} boxes ({s.crowd} crowd), "
            f"{s.images_without_annotations} images without boxes, {meta.num_classes} classes "
            f"({', '.join(meta.thing_classes)}); clipped {s.clipped_boxes}, dropped {s.dropped_degenerate}"
        )
        for w in caught:
            print(f"  warning: {w.message}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("data", help="make or inspect datasets (e.g. `frcnn data synth OUT`)")
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    synth = sub.add_parser(
        "synth",
        help="write a synthetic COCO-format dataset of textured shapes",
        description="Writes OUT/{train,val}/*.png and OUT/annotations/instances_{train,val}.json.",
    )
    synth.add_argument("out", metavar="OUT", help="output folder (must be empty or new unless --overwrite)")
    synth.add_argument("--images", type=int, default=300, help="number of images, train + val (default 300)")
    synth.add_argument("--size", type=int, default=320, help="image side in pixels (default 320)")
    synth.add_argument(
        "--classes", type=int, default=4, help=f"number of shape classes, 1..{len(SHAPE_NAMES)} (default 4)"
    )
    synth.add_argument("--seed", type=int, default=0, help="random seed; same seed -> same bytes (default 0)")
    synth.add_argument(
        "--val-fraction", type=float, default=0.2, help="fraction of images in val (default 0.2)"
    )
    synth.add_argument(
        "--min-side", type=int, default=MIN_SIDE, help=f"smallest shape side in px (default {MIN_SIDE})"
    )
    synth.add_argument(
        "--max-shapes", type=int, default=MAX_SHAPES, help=f"most shapes per image (default {MAX_SHAPES})"
    )
    synth.add_argument(
        "--clutter",
        type=int,
        default=CLUTTER,
        help=f"most distractor lines / arcs per image, 0 for none (default {CLUTTER})",
    )
    synth.add_argument("--overwrite", action="store_true", help="replace an existing dataset in OUT")
    synth.add_argument(
        "--workers", type=int, default=0, help="render processes (default 0: one per core for >= 64 images)"
    )
    synth.set_defaults(func=_synth)

    check = sub.add_parser(
        "check", help="load and validate a COCO dataset folder (DIR/annotations, DIR/<split>)"
    )
    check.add_argument("dir", metavar="DIR", help="dataset folder")
    check.add_argument(
        "--splits", nargs="+", default=["train", "val"], help="splits to check (default train val)"
    )
    check.set_defaults(func=_check)
    return parser
