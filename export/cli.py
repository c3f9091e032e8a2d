"""``export-engine model.pth`` (also ``frcnn export``): checkpoint -> ONNX (-> TensorRT engine).

    export-engine model.pth [--config CFG] [--output model.onnx] [--opset N] [--max-batch B]
                  [--min-size H W] [--opt-size H W] [--max-size H W] [--engine model.engine] [--fp16]
                  [--class-names FILE|a,b,c] [--overwrite]

Config lookup without ``--config``: the YAML the trainer stores inside the checkpoint (key ``cfg``), else
``config.yaml`` beside the checkpoint, else the R50-FPN default (the summary says which one was used).

Class names: ``--class-names``, else the checkpoint's ``class_names`` (stored by ``frcnn train``), else
COCO's for 80 classes, else ``class_<k>`` (see :mod:`frcnn.export.class_names`).

Existing files: ``--output`` / ``--engine`` / the ``--int8`` copy replace a file only when it is one this tool
wrote (an ONNX file with producer ``frcnn-deploy``; an engine with its frcnn sidecar; an int8 ONNX); any other
existing file is refused unless ``--overwrite`` is given (:mod:`frcnn.export.replace_policy`). Ctrl-C stops with exit code 130 and says what was (not) written.

Exit codes: 0 done; 2 bad input (missing/corrupt checkpoint, config/checkpoint mismatch, unsupported opset,
unwritable output, a file it did not write in the way; nothing is written); 3 the ONNX was written but ``--engine`` was skipped because TensorRT
>= 10.9 or a GPU is missing; 1 an unexpected internal error (traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from frcnn.runtime.errors import INTERRUPTED_EXIT_CODE, ConfigError, UserError, run_command

DEFAULT_CONFIG = "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"
NO_TENSORRT_EXIT_CODE = 3


def _hw(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer image side, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"image sides must be positive, got {value}")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the export arguments to ``parser`` (shared by ``export-engine`` and ``frcnn export``)."""
    parser.add_argument("checkpoint", help="trained checkpoint (.pth from the trainer, or a detectron2 .pth/.pkl)")
    parser.add_argument("--config", help="config YAML or packaged name (default: stored with the checkpoint, "
                        f"else {DEFAULT_CONFIG})")
    parser.add_argument("--output", help="ONNX file to write (default: the checkpoint path with .onnx)")
    parser.add_argument("--opset", type=int, default=None, help="standard ONNX opset (default 18)")
    parser.add_argument("--max-batch", type=int, default=4, help="largest batch of the engine profile (4)")
    for which, text in (("min", "smallest"), ("opt", "tuned"), ("max", "largest")):
        parser.add_argument(f"--{which}-size", type=_hw, nargs=2, metavar=("H", "W"),
                            help=f"{text} padded input size of the engine profile (multiples of 32)")
    parser.add_argument("--engine", help="also build this TensorRT engine (needs TensorRT >= 10.9 and a GPU)")
    parser.add_argument("--fp16", action="store_true", help="fp16 engine (with --engine)")
    parser.add_argument("--class-names", metavar="FILE|a,b,c",
                        help="class names for the metadata: a file (one per line, or a .json list) or a,b,c "
                             "(default: those stored in the checkpoint)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --output / --engine / the --int8 copy even when they are files this tool did "
                        "not write")
    from frcnn.export.quantize_cli import add_int8_arguments

    add_int8_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``frcnn export``: the same arguments as ``export-engine``."""
    parser = subparsers.add_parser("export", help="checkpoint -> ONNX (-> TensorRT engine)",
                                   description=__doc__.splitlines()[0])
    return configure_parser(parser)


def load_config(checkpoint: str, config: str | None, meta: dict[str, Any]) -> tuple[Any, str]:
    """(cfg, description of its source) following the lookup order in the module docstring."""
    import yaml
    from frcnn.trainer.config import available_configs, get_cfg, model_zoo_config

    cfg = get_cfg()
    if config:
        if os.path.exists(config):  # a file; a directory is refused by merge_from_file naming it
            cfg.merge_from_file(config)
            return cfg, config
        if config in available_configs():
            cfg.merge_from_file(model_zoo_config(config))
            return cfg, f"packaged {config}"
        raise ConfigError(f"config '{config}' is neither a file nor a packaged config name "
                          f"({', '.join(available_configs())})")
    stored = meta.get("cfg")
    if isinstance(stored, str) and stored.strip():
        try:
            cfg.merge_from_other_cfg(yaml.safe_load(stored))
        except yaml.YAMLError as exc:
            raise ConfigError(f"the config stored in checkpoint '{checkpoint}' is not valid YAML ({exc}); pass "
                              "--config") from None
        return cfg, f"stored in {checkpoint}"
    beside = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "config.yaml")
    if os.path.isfile(beside):
        cfg.merge_from_file(beside)
        return cfg, beside
    cfg.merge_from_file(model_zoo_config(DEFAULT_CONFIG))
    return cfg, f"default {DEFAULT_CONFIG} (no config stored with the checkpoint; pass --config if wrong)"


def _sizes(args: argparse.Namespace, cfg: Any) -> tuple[list[int], list[int], list[int]]:
    """(min, opt, max) padded (H, W) of the profile; defaults from the config's test resize rule."""
    from frcnn.export.onnx_export import MIN_IMAGE_SIDE

    def up32(v: int) -> int:
        return -(-int(v) // 32) * 32

    short = cfg.INPUT.MIN_SIZE_TEST
    short = int(short[0] if isinstance(short, (list, tuple)) else short)
    long = int(cfg.INPUT.MAX_SIZE_TEST)
    lo = list(args.min_size or (up32(MIN_IMAGE_SIDE),) * 2)
    opt = list(args.opt_size or (up32(short), up32(long)))
    hi = list(args.max_size or (up32(long),) * 2)
    if any(v < MIN_IMAGE_SIDE for v in lo):
        raise UserError(f"--min-size {lo[0]} {lo[1]}: the exported graph needs H, W >= {MIN_IMAGE_SIDE}")
    if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
        raise UserError(f"sizes must satisfy min <= opt <= max per side, got min {lo}, opt {opt}, max {hi}")
    return lo, opt, hi


def _table(rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def summary(info: dict[str, Any], path: Path, seconds: float, config_source: str, names_source: str = "") -> str:
    """The summary table printed after a successful export."""
    def fmt(values: list[tuple[str, str, list[Any]]]) -> str:
        return ", ".join(f"{n} {t}[{','.join(str(d) for d in dims)}]" for n, t, dims in values)

    size = path.stat().st_size
    rows = [("file", str(path)), ("config", config_source), ("inputs", fmt(info["inputs"])),
            ("outputs", fmt(info["outputs"])),
            ("custom nodes", ", ".join(f"{op} ({name})" for name, op in info["custom_nodes"])),
            ("local functions", ", ".join(info["functions"])), ("opset", str(info["opset"])),
            ("classes", f"{len(json.loads(info['metadata']['class_names']))}"
                        + (f" ({names_source})" if names_source else "")),
            ("file size", f"{size / 2**20:.1f} MiB"), ("export time", f"{seconds:.1f} s")]
    return "exported ONNX:\n" + _table(rows)


def onnx_output(args: argparse.Namespace) -> Path:
    """The fp32 ONNX path of this export: ``--output``, else the checkpoint path with ``.onnx``."""
    return Path(args.output) if args.output else Path(args.checkpoint).with_suffix(".onnx")


def engine_command(args: argparse.Namespace, engine_path: str) -> str:
    """The ``export-engine`` command (shell-quoted) that redoes this export, ``--int8`` copy included, and
    builds ``engine_path`` from it: the engine must come from the same ONNX, profile and precision."""
    parts = ["export-engine", str(args.checkpoint), "--output", str(onnx_output(args))]
    for flag, value in (("--config", args.config), ("--class-names", args.class_names), ("--opset", args.opset)):
        if value is not None:
            parts += [flag, str(value)]
    parts += ["--max-batch", str(args.max_batch)]
    for which in ("min", "opt", "max"):
        if getattr(args, f"{which}_size"):
            parts += [f"--{which}-size", *(str(v) for v in getattr(args, f"{which}_size"))]
    if args.fp16:
        parts.append("--fp16")
    if args.int8:
        parts += ["--int8", "--calib-images", str(args.calib_images), "--calib-count", str(args.calib_count),
                  "--calib-method", args.calib_method]
        if args.int8_exclude:
            parts += ["--int8-exclude", *args.int8_exclude]
    return shlex.join(parts + ["--engine", str(engine_path)])


def _build_engine(args: argparse.Namespace, onnx_path: Path, sizes: tuple[list[int], ...]) -> int:
    from frcnn.export import engine

    try:
        from frcnn.plugins import tensorrt as frcnn_trt

        frcnn_trt.require_tensorrt()
        frcnn_trt.current_gpu()
    except (UserError, ImportError) as exc:
        print(f"engine step skipped: building {args.engine} needs TensorRT >= 10.9 and an NVIDIA GPU ({exc}). "
              f"The ONNX file {onnx_path} is complete; build the engine on a GPU machine by running the export "
              f"there again (it replaces the files it wrote):\n  {engine_command(args, args.engine)}",
              file=sys.stderr)
        return NO_TENSORRT_EXIT_CODE
    lo, opt, hi = engine.image_profile(1, 1, args.max_batch, *sizes)
    start = time.perf_counter()
    try:
        info = engine.build_engine(onnx_path, args.engine, min_shapes=lo, opt_shapes=opt, max_shapes=hi,
                                   fp16=args.fp16)
    except UserError as exc:
        raise type(exc)(f"{exc} (the engine {args.engine} was not written; the ONNX file {onnx_path} is complete "
                        "and was kept)") from None  # fmt: skip
    print(f"engine: {info.engine_path} (TensorRT {info.tensorrt_version}, {info.gpu_name}, "
          f"{'fp16' if info.fp16 else 'fp32'}, {time.perf_counter() - start:.1f} s); sidecar {info.sidecar_path}")
    return 0


def _prog(args: argparse.Namespace) -> str:
    return "frcnn export" if getattr(args, "command", None) == "export" else "export-engine"


def _check_args(args: argparse.Namespace) -> tuple[int, Path]:
    """(opset, ONNX output path) after the checks that need no checkpoint; UserError otherwise."""
    from frcnn.export import onnx_export
    from frcnn.export.replace_policy import check_replaceable

    opset = onnx_export.check_opset(args.opset if args.opset is not None else onnx_export.DEFAULT_OPSET)
    if args.fp16 and not args.engine:
        raise UserError("--fp16 applies to the TensorRT engine only; add --engine model.engine (the ONNX stays fp32)")
    if args.max_batch < 1:
        raise UserError(f"--max-batch must be >= 1, got {args.max_batch}")
    output = onnx_output(args)
    if output.resolve() == Path(args.checkpoint).resolve():
        raise UserError(f"--output {output} is the checkpoint itself; choose another file name")
    onnx_export.check_writable(output)
    check_replaceable(output, args.overwrite, "onnx", "--output")
    if args.engine:
        if Path(args.engine).resolve() in (output.resolve(), Path(args.checkpoint).resolve()):
            raise UserError(f"--engine {args.engine} is the same file as the checkpoint or --output; choose another")
        onnx_export.check_writable(args.engine)
        check_replaceable(args.engine, args.overwrite, "engine", "--engine")
    from frcnn.export import quantize_cli

    quantize_cli.check_int8_arguments(args, output)
    return opset, output


_LOAD_FIX = ("Pass the --config the checkpoint was trained with (its training output's config.yaml), or a "
             "packaged config of the same model.")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Export per ``args`` (see module docstring); returns the exit code. Raises UserError for bad input.

    Ctrl-C: exit code 130 and one message saying what was written (nothing, or the complete ONNX file when
    the engine build was interrupted) and the command that finishes the job.
    """
    done: dict[str, Any] = {}
    try:
        return _run(args, done)
    except KeyboardInterrupt:
        output = onnx_output(args)
        if "onnx" in done:
            print(f"{_prog(args)}: interrupted after writing {done['onnx']}; {args.engine} was not written. Build "
                  f"the engine by running the export again:\n  {engine_command(args, args.engine)}",
                  file=sys.stderr)  # fmt: skip
        else:
            state = "is unchanged" if done.get("existed") else "was not created"
            print(f"{_prog(args)}: interrupted; nothing was written ({output} {state}). Run the same command "
                  "again to export.", file=sys.stderr)  # fmt: skip
        return INTERRUPTED_EXIT_CODE


def _run(args: argparse.Namespace, done: dict[str, Any]) -> int:
    from frcnn.export import onnx_export
    from frcnn.export.class_names import parse_class_names, resolve_class_names

    start = time.perf_counter()
    opset, output = _check_args(args)
    done["existed"] = output.exists()
    if args.class_names is not None:
        parse_class_names(args.class_names)  # a bad value is refused before the checkpoint is read
    from frcnn.trainer.checkpoint import load_checkpoint_state, load_into_model
    from frcnn.trainer.modeling import build_model

    state, meta = load_checkpoint_state(args.checkpoint)
    cfg, source = load_config(args.checkpoint, args.config, meta)
    num = int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    names, ids, names_source = resolve_class_names(num, meta, args.class_names, str(args.checkpoint))
    sizes = _sizes(args, cfg)
    model = build_model(cfg)
    load_into_model(model, state, strict=True, path=str(args.checkpoint), fix=_LOAD_FIX)
    path = onnx_export.export_onnx(model.eval(), cfg, output, opset=opset, class_names=names, category_ids=ids,
                                   max_batch=args.max_batch, max_side=max(sizes[2]),
                                   example_hw=(sizes[1][0], sizes[1][1]))  # fmt: skip
    done["onnx"] = path
    import onnx
    from frcnn.export import quantize_cli

    info = onnx_export.describe(onnx.load(str(path), load_external_data=False))
    print(summary(info, path, time.perf_counter() - start, source, names_source))
    path = quantize_cli.run_int8(args, path)
    if args.engine:
        return _build_engine(args, path, sizes)
    print(f"next: run it with ONNX Runtime (`frcnn infer {path} IMAGE`), or build a TensorRT engine on a GPU "
          f"machine (`{engine_command(args, 'model.engine')}`)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``export-engine``."""
    parser = configure_parser(argparse.ArgumentParser(prog="export-engine", description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    return run_command("export-engine", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
