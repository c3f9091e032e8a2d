"""``frcnn demo [--output DIR] [--iters N] [--mask]``: the main job end to end on an embedded default.

synthetic dataset (192 px, 3 shape classes) -> train the small R-18 FPN (``frcnn-demo-R18.yaml``; with
``--mask`` the Mask R-CNN variant ``frcnn-demo-mask-R18.yaml``) -> COCO eval (PyTorch; box and, with masks,
segm AP) -> export ONNX (and a TensorRT engine where TensorRT is present) -> infer with the torch-free
runtime -> parity PyTorch vs ONNX Runtime (masks too) -> COCO eval of the deployed model. Every step is the very `frcnn` /
`export-engine` command a user would type; each is printed before it runs, and the demo stops at the first
failing step with that step's exit code.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from frcnn.runtime.errors import UserError

__all__ = ["DEMO_CONFIG", "DEMO_IMAGES", "DEMO_ITERS", "DEMO_MASK_CONFIG", "DEMO_SYNTH", "add_parser", "demo_steps",
           "run_demo"]

# The demo's settings (measured: docs/training.md, "The demo's settings"): an easier synthetic set than
# `frcnn data synth`'s default (192 px images, no shape under 16 px, at most 6 shapes and 6 distractor
# lines per image) and the packaged demo config (anchors 16..256 px, FPN 64 channels).
DEMO_CONFIG = "frcnn-demo-R18.yaml"
DEMO_MASK_CONFIG = "frcnn-demo-mask-R18.yaml"
"""``frcnn demo --mask``: DEMO_CONFIG plus a 64-channel mask head (same data and schedule)."""
DEMO_ITERS = 700
DEMO_IMAGES = 300
DEMO_SYNTH = ["--size", "192", "--classes", "3", "--min-side", "16", "--max-shapes", "6", "--clutter", "6",
              "--seed", "0"]  # fmt: skip


def demo_steps(out: Path, iters: int, images: int, mask: bool = False) -> list[tuple[str, str, list[str]]]:
    """(title, program, argv) of every step; program is "frcnn" or "export-engine"."""
    data, train, onnx = out / "data", out / "train", out / "model.onnx"
    weights = train / "model_final.pth"
    return [
        ("synthesize a dataset", "frcnn",
         ["data", "synth", str(data), "--images", str(images), *DEMO_SYNTH, "--overwrite"]),
        ("train the small R-18 FPN" + (" Mask R-CNN" if mask else ""), "frcnn",
         ["train", "--config", DEMO_MASK_CONFIG if mask else DEMO_CONFIG, "--data", str(data), "--output", str(train),
          "SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", f"({int(iters * 0.8)},)",
          "SOLVER.WARMUP_ITERS", str(min(100, iters // 4)), "SOLVER.CHECKPOINT_PERIOD", str(iters)]),
        ("evaluate the PyTorch model", "frcnn",
         ["eval", "--config", str(train / "config.yaml"), "--weights", str(weights), "--data", str(data),
          "--output", str(out / "eval-pytorch")]),
        ("export to ONNX (and TensorRT when present)", "export-engine",
         [str(weights), "--output", str(onnx)]),
        ("detect with the torch-free runtime", "frcnn",
         ["infer", str(onnx), str(data / "val"), "--output", str(out / "infer")]),
        ("parity: PyTorch vs ONNX Runtime", "frcnn",
         ["parity", str(weights), str(onnx), "--images", str(data / "val")]),
        ("evaluate the deployed model (and its AP delta to PyTorch)", "frcnn",
         ["eval", str(onnx), "--data", str(data), "--weights", str(weights), "--config", str(train / "config.yaml"),
          "--output", str(out / "eval-onnx")]),
    ]


def _entry(program: str) -> Callable[[Sequence[str]], int]:
    if program == "export-engine":
        from frcnn.export.cli import main as export_main

        return export_main
    from frcnn.runtime.cli import main as frcnn_main

    return frcnn_main


MARKER = ".frcnn-demo"
"""Written into the demo's folder: a later demo may reuse a folder that holds it (and only such a folder)."""


def _prepare_output(output: str) -> Path:
    """The resolved demo folder, created; UserError for a file, an unwritable path or someone else's folder."""
    out = Path(output).resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {output} is a file; pass a folder for the demo's data, model and pictures")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UserError(f"--output {output} is a non-empty folder that an earlier `frcnn demo` did not create; "
                        "pass a new or empty folder (the demo never writes into other folders)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).touch()
    except OSError as exc:
        raise UserError(f"cannot create the demo folder --output {output}: {exc.strerror or exc}; pass a writable "
                        "folder") from None
    return out


def run_demo(args: argparse.Namespace) -> int:
    if args.iters < 1 or args.images < 2:
        raise UserError(f"--iters must be >= 1 and --images >= 2, got --iters {args.iters} --images {args.images}")
    out = _prepare_output(args.output)
    steps = demo_steps(out, args.iters, args.images, mask=args.mask)
    timings = []
    for i, (title, program, argv) in enumerate(steps, 1):
        print(f"\n=== [{i}/{len(steps)}] {title}\n$ {program} {shlex.join(argv)}", flush=True)
        t0 = time.perf_counter()
        code = int(_entry(program)(argv) or 0)
        timings.append((title, time.perf_counter() - t0, code))
        if code != 0:
            print(f"\nfrcnn demo: step {i} ({title}) failed with exit code {code}; later steps not run.",
                  file=sys.stderr)
            return code
    print("\n=== demo summary")
    for title, seconds, _code in timings:
        print(f"  {title:45s} {seconds:8.1f} s")
    print(f"everything is under {out}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("demo", help="synthetic data -> train -> eval -> export -> infer -> parity",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="demo-output", help="folder for everything (default demo-output)")
    parser.add_argument("--iters", type=int, default=DEMO_ITERS,
                        help=f"training iterations (default {DEMO_ITERS})")
    parser.add_argument("--images", type=int, default=DEMO_IMAGES,
                        help=f"synthetic images, train + val (default {DEMO_IMAGES})")
    parser.add_argument("--mask", action="store_true",
                        help=f"Mask R-CNN: train {DEMO_MASK_CONFIG} (masks in eval, parity and the pictures)")
    parser.set_defaults(func=run_demo)
    return parser
