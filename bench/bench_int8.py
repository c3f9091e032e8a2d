"""fp32 vs INT8 (Q/DQ) ONNX on ONNX Runtime CPU: latency ratio and peak RSS, in one run.

    python bench/bench_int8.py MODEL.onnx MODEL.int8.onnx [--height 800 --width 1216] [--threads 2]
        [--repeats 5] [--json bench/results/int8.json] [--no-rss]

Latency: both sessions are built first, then their calls are interleaved (fp32, int8, fp32, ...) on the same
uint8 batch (batch 1, one random image, resized as given), ``--repeats`` times after one warm-up each; the
ratio of the medians is what a shared machine can still measure fairly. The 1-minute load average at the
start and end is recorded.

Peak RSS: every configuration runs in a *fresh* subprocess, before the parent builds any session: the peak
resident set (``VmHWM`` of /proc/self/status, which a new program image starts afresh; ``ru_maxrss`` is also
recorded, but Linux carries it over from the forking parent) after building the session and running it twice: fp32 and int8 with ONNX Runtime's defaults, and fp32 with
each memory option of ``frcnn.runtime.backends.onnxruntime.MEMORY_OPTIONS`` alone and all together, with
the time of the second run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

CONFIGS = {"default": [], "no_prepacking": ["disable_prepacking"], "no_arena": ["disable_cpu_mem_arena"],
           "no_mem_pattern": ["disable_mem_pattern"], "device_allocator_init": ["device_allocator_for_initializers"],
           "low_memory (all four)": ["disable_prepacking", "disable_cpu_mem_arena", "disable_mem_pattern",
                                     "device_allocator_for_initializers"]}  # fmt: skip


def _feed(height: int, width: int) -> dict[str, np.ndarray]:
    from frcnn.runtime.preprocess import batch_images

    img = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    images, sizes = batch_images([img])
    return {"images": images, "image_sizes": sizes}


def _session(path: str, threads: int, options: list[str]) -> Any:
    import onnxruntime as ort
    from frcnn.runtime.backends.onnxruntime import apply_memory_options

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    apply_memory_options(so, options)
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def rss_child(path: str, threads: int, options: list[str], height: int, width: int) -> dict[str, Any]:
    """Run in a fresh process: build, run twice, report peak RSS (MiB) and the second run's seconds."""
    import resource

    feed = _feed(height, width)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sess = _session(path, threads, options)
    sess.run(None, feed)
    start = time.perf_counter()
    sess.run(None, feed)
    seconds = time.perf_counter() - start
    return {"peak_rss_mib": _vm_hwm_mib(), "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "ru_maxrss_before_session_mib": base, "second_run_s": seconds}  # fmt: skip


def _vm_hwm_mib() -> float:
    """Peak resident set of this process image (Linux /proc/self/status VmHWM), MiB."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not in /proc/self/status (Linux only)")


def measure_rss(path: str, args: argparse.Namespace, options: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--rss-child", path, "--threads", str(args.threads),
           "--height", str(args.height), "--width", str(args.width), "--options", *options]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def latency(fp32: str, int8: str, args: argparse.Namespace) -> dict[str, Any]:
    feed = _feed(args.height, args.width)
    sessions = {"fp32": _session(fp32, args.threads, []), "int8": _session(int8, args.threads, [])}
    for s in sessions.values():
        s.run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(args.repeats):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feed)
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"times_s": times, "median_s": med, "speedup_int8": med["fp32"] / med["int8"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("fp32")
    p.add_argument("int8", nargs="?")
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1216)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "int8.json"))
    p.add_argument("--no-rss", action="store_true")
    p.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--options", nargs="*", default=[], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rss_child:
        print(json.dumps(rss_child(args.fp32, args.threads, args.options, args.height, args.width)))
        return 0
    if not args.int8:
        p.error("give the fp32 and the int8 ONNX files")
    import onnxruntime as ort
    from frcnn.runtime.fileio import atomic_write_json

    record: dict[str, Any] = {"fp32": args.fp32, "int8": args.int8, "input_hw": [args.height, args.width],
                              "batch": 1, "threads": args.threads, "onnxruntime": ort.__version__,
                              "cpu_count": os.cpu_count(), "load_1m_start": os.getloadavg()[0]}  # fmt: skip
    if not args.no_rss:  # first: the children must not inherit a large parent
        record["rss"] = {f"fp32 {name}": measure_rss(args.fp32, args, opts) for name, opts in CONFIGS.items()}
        record["rss"]["int8 default"] = measure_rss(args.int8, args, [])
        record["rss"]["int8 low_memory (all four)"] = measure_rss(args.int8, args, CONFIGS["low_memory (all four)"])
    record["latency"] = latency(args.fp32, args.int8, args)
    record["load_1m_end"] = os.getloadavg()[0]
    atomic_write_json(args.json, record, indent=2)
    lat = record["latency"]
    print(f"latency, batch 1, {args.height}x{args.width}, {args.threads} threads, {args.repeats} interleaved repeats "
          f"(load {record['load_1m_start']:.1f} -> {record['load_1m_end']:.1f})")
    print(f"  fp32 {lat['median_s']['fp32']:.3f} s   int8 {lat['median_s']['int8']:.3f} s   "
          f"int8 speed-up {lat['speedup_int8']:.2f}x")
    for name, r in record.get("rss", {}).items():
        print(f"  {name:<32} peak RSS {r['peak_rss_mib']:7.0f} MiB   run {r['second_run_s']:.3f} s")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
