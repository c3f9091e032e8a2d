"""``frcnn bench MODEL [--batch B] [--size H W] [--iters N] [--json OUT.json] [--plot OUT.png]``.

Times the deployed model the way the Detector runs it, one stage at a time, on a synthetic uint8 image of
``H x W`` (default 800 x 1333, i.e. no resize for the COCO configs): pre-processing (validate, resize, pad,
batch), inference (the backend call only), post-processing (unpad, scale, clip). Prints latency p50 / p90 /
p99 per call, throughput in images/s and each stage's share; writes all numbers as JSON
(``--json``, default ``bench.json``) and optionally a bar chart (matplotlib when installed, else drawn with
Pillow). No accelerator timing is invented: the JSON names the backend and its providers.
Arguments, the model file and both output paths are checked before the model loads; an existing ``--json`` /
``--plot`` is replaced only if frcnn bench wrote it (a bench JSON; a PNG whose "Software" text says so).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Any

import numpy as np
from frcnn.runtime.backends import LOW_MEMORY_HELP, check_model_file, low_memory_options, resolve_backend
from frcnn.runtime.errors import UserError
from frcnn.runtime.fileio import atomic_write_json, atomic_writer
from frcnn.runtime.infer_output import check_output_file
from frcnn.runtime.preprocess import max_image_side, too_large_message

STAGES = ("preprocess", "inference", "postprocess")
#: PNG "Software" text of the plots frcnn bench draws (so a later run may replace them, and nothing else).
PLOT_SOFTWARE = "frcnn bench"


def synthetic_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 [h, w, 3] with coarse blocks (a realistic, compressible image rather than pure noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.repeat(np.repeat(small, 16, axis=0), 16, axis=1)[:h, :w])


def time_detector(detector: Any, images: list[np.ndarray], iters: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per stage for ``iters`` timed calls (after ``warmup`` untimed ones)."""
    times: dict[str, list[float]] = {s: [] for s in STAGES}
    for k in range(warmup + iters):
        t0 = time.perf_counter()
        feed, original_sizes = detector.preprocess(images)
        t1 = time.perf_counter()
        outputs = detector.backend.infer(feed)
        t2 = time.perf_counter()
        detector.postprocess(outputs, feed["image_sizes"], original_sizes)
        t3 = time.perf_counter()
        if k >= warmup:
            for stage, dt in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2)):
                times[stage].append(dt)
    return times


def summarize(times: dict[str, list[float]], batch: int) -> dict[str, Any]:
    """Latency percentiles (ms), throughput (images/s) and per-stage means / shares."""
    total = np.sum([np.asarray(times[s]) for s in STAGES], axis=0)
    stages = {s: {"mean_ms": 1e3 * float(np.mean(times[s])), "p50_ms": 1e3 * float(np.percentile(times[s], 50))}
              for s in STAGES}  # fmt: skip
    mean_total = float(np.mean(total))
    for s in STAGES:
        stages[s]["share"] = float(np.mean(times[s])) / mean_total
    pre_post = (stages["preprocess"]["mean_ms"] + stages["postprocess"]["mean_ms"]) / stages["inference"]["mean_ms"]
    return {
        "latency_ms": {f"p{q}": 1e3 * float(np.percentile(total, q)) for q in (50, 90, 99)},
        "latency_mean_ms": 1e3 * mean_total,
        "throughput_images_per_s": batch / mean_total,
        "stages": stages,
        "pre_post_over_inference": pre_post,
    }


def format_report(result: dict[str, Any]) -> str:
    lat, st = result["latency_ms"], result["stages"]
    lines = [(f"{result['model']} [{result['backend']}] batch {result['batch']}, image {result['image_hw'][0]}x"
              f"{result['image_hw'][1]} (model input {result['input_hw'][0]}x{result['input_hw'][1]}), "
              f"{result['iters']} iterations"),
             f"latency  p50 {lat['p50']:.2f} ms   p90 {lat['p90']:.2f} ms   p99 {lat['p99']:.2f} ms",
             f"throughput {result['throughput_images_per_s']:.2f} images/s",
             f"{'stage':<12} {'mean ms':>10} {'p50 ms':>10} {'share':>8}"]  # fmt: skip
    lines += [f"{s:<12} {st[s]['mean_ms']:>10.2f} {st[s]['p50_ms']:>10.2f} {100 * st[s]['share']:>7.1f}%"
              for s in STAGES]  # fmt: skip
    lines.append(f"pre + post = {100 * result['pre_post_over_inference']:.2f}% of inference time")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> str:
    """Bar chart of the stage means and latency percentiles; returns the library used."""
    labels = [*STAGES, "p50", "p90", "p99"]
    percentiles = [result["latency_ms"][k] for k in ("p50", "p90", "p99")]
    values = [result["stages"][s]["mean_ms"] for s in STAGES] + percentiles
    title = f"{os.path.basename(result['model'])} [{result['backend']}] batch {result['batch']} (ms)"
    with atomic_writer(path, "wb") as f:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(7, 4))
            ax.bar(labels, values, color=["#4c72b0"] * 3 + ["#dd8452"] * 3)
            ax.set_ylabel("ms")
            ax.set_title(title)
            fig.tight_layout()
            fig.savefig(f, format="png", metadata={"Software": PLOT_SOFTWARE})
            plt.close(fig)
            used = "matplotlib"
        except ImportError:
            from PIL.PngImagePlugin import PngInfo

            info = PngInfo()
            info.add_text("Software", PLOT_SOFTWARE)
            _pillow_bars(labels, values, title).save(f, format="PNG", pnginfo=info)
            used = "pillow"
    return used


def _is_bench_json(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return isinstance(data, dict) and "raw_seconds" in data and "latency_ms" in data
    except (OSError, ValueError):
        return False


def _is_bench_plot(path: str) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return getattr(image, "text", {}).get("Software") == PLOT_SOFTWARE
    except (OSError, ValueError, SyntaxError):
        return False


def _check_args(args: argparse.Namespace) -> None:
    if args.batch < 1 or args.iters < 1 or args.warmup < 0 or min(args.size) < 1:
        raise UserError("--batch and --iters must be >= 1, --warmup >= 0, --size positive; got --batch "
                        f"{args.batch} --iters {args.iters} --warmup {args.warmup} --size {args.size[0]} "
                        f"{args.size[1]}")  # fmt: skip
    limit = max_image_side()
    if max(args.size) > limit:
        raise UserError(too_large_message("--size", args.size[0], args.size[1], limit))
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1 (or left out for ONNX Runtime's default), got {args.threads}")
    for model in (args.model, args.compare) if args.compare else (args.model,):
        check_model_file(model)
        resolve_backend(model, args.backend)
    check_output_file(args.json, "--json", _is_bench_json)
    if args.plot:
        check_output_file(args.plot, "--plot", _is_bench_plot)
    if args.plot and os.path.abspath(args.plot) == os.path.abspath(args.json):
        raise UserError("--json and --plot name the same file; pass two different paths")


def _pillow_bars(labels: list[str], values: list[float], title: str) -> Any:
    from PIL import Image, ImageDraw, ImageFont

    w, h, margin = 720, 400, 50
    image = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    draw.text((margin, 12), title, fill="black", font=font)
    top = max(values) or 1.0
    slot = (w - 2 * margin) / len(values)
    draw.line((margin, h - margin, w - margin, h - margin), fill="black", width=2)
    for i, (label, value) in enumerate(zip(labels, values)):
        x0 = margin + i * slot + slot * 0.15
        y0 = h - margin - (h - 2 * margin - 20) * value / top
        draw.rectangle((x0, y0, x0 + slot * 0.7, h - margin), fill="#4c72b0" if i < 3 else "#dd8452")
        draw.text((x0, y0 - 16), f"{value:.1f}", fill="black", font=font)
        draw.text((x0, h - margin + 6), label, fill="black", font=font)
    return image


def run_bench(args: argparse.Namespace) -> int:
    from frcnn.runtime.detector import Detector

    _check_args(args)
    options = {"intra_op_threads": args.threads} if args.threads else {}
    options.update(low_memory_options([args.model, *([args.compare] if args.compare else [])], args.backend,
                                      args.low_memory))
    if args.compare:
        from frcnn.runtime.bench_compare import run_compare

        return run_compare(args, options)
    detector = Detector(args.model, backend=args.backend, max_batch=args.batch, **options)
    h, w = args.size
    images = [synthetic_image(h, w, seed=i) for i in range(args.batch)]
    feed, _ = detector.preprocess(images)
    times = time_detector(detector, images, args.iters, args.warmup)
    result = {"model": args.model, "backend": detector.backend.name,
              "providers": getattr(detector.backend, "providers_used", None), "batch": args.batch,
              "image_hw": [h, w], "input_hw": list(feed["images"].shape[2:]), "iters": args.iters,
              "warmup": args.warmup, "threads": args.threads, "cpu_count": os.cpu_count(),
              "machine": platform.processor() or platform.machine(), **summarize(times, args.batch),
              "raw_seconds": times}  # fmt: skip
    print(format_report(result))
    atomic_write_json(args.json, result, indent=2)
    print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {args.plot} ({plot(result, args.plot)})")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("bench", help="latency / throughput of a deployed model",
                                   description=__doc__.split("\n\n")[0] if __doc__ else None)  # fmt: skip
    parser.add_argument("model", metavar="MODEL", help="deployed model (.onnx, .engine / .plan) or a Triton URL "
                        "(http://HOST:PORT/frcnn, grpc://HOST:PORT/frcnn)")
    parser.add_argument("compare", nargs="?", metavar="MODEL_B", help="second model timed side by side, e.g. "
                        "model.int8.onnx (prints the latency ratio)")
    parser.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"),
                        help="synthetic image size (default 800 1333)")  # fmt: skip
    parser.add_argument("--iters", type=int, default=20, help="timed iterations (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--backend", default="auto", choices=("auto", "onnxruntime", "tensorrt", "triton"))
    parser.add_argument("--low-memory", action="store_true", help=LOW_MEMORY_HELP)
    parser.add_argument("--json", default="bench.json", help="where to write the numbers (default bench.json)")
    parser.add_argument("--plot", default=None, metavar="PNG", help="also draw a bar chart")
    parser.set_defaults(func=run_bench)
    return parser
