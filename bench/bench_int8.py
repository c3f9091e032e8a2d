"""fp32 vs INT8 (Q/DQ) ONNX on ONNX Runtime CPU: latency ratio and peak RSS, in one run.

    python bench/bench_int8.py MODEL.onnx MODEL.int8.onnx [--height 800 --width 1216] [--threads 2]
        [--repeats 5] [--json bench/results/int8.json] [--no-rss | --rss-only] [--configs NAME ...]
        [--cache-dir DIR]

Latency: both sessions are built first, then their calls are interleaved (fp32, int8, fp32, ...) on the same
uint8 batch (batch 1, one random image, resized as given), ``--repeats`` times after one warm-up each; the
ratio of the medians is what a shared machine can still measure fairly. The 1-minute load average at the
start and end is recorded.

Peak RSS: every configuration runs in a *fresh* subprocess, before the parent builds any session: the peak
resident set (``VmHWM`` of /proc/self/status, which a new program image starts afresh; ``ru_maxrss`` is also
recorded, but Linux carries it over from the forking parent) after building the session and running it
twice: fp32 and int8 with ONNX Runtime's defaults, fp32 with each memory option of
``frcnn.runtime.backends.onnxruntime.MEMORY_OPTIONS`` alone and all together, and both models through the
product's ``OnnxRuntimeBackend(low_memory=True)`` (the cached pre-optimised graph, ``frcnn optimize``; the
cache is filled before, so the measured process loads a warm entry), with the session-construction time and
the time of the second run. ``--configs`` measures only the named rows; ``--rss-only`` skips the latency.
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
           "all four options": ["disable_prepacking", "disable_cpu_mem_arena", "disable_mem_pattern",
                                "device_allocator_for_initializers"]}  # fmt: skip
"""Session options on the model file itself (``apply_memory_options``); row names get an "fp32 " prefix."""
LOW_MEMORY_ROW = "low_memory"
"""Row suffix of the product path: ``OnnxRuntimeBackend(low_memory=True)`` on a warm cache entry."""


def rss_plan(fp32: str, int8: str) -> dict[str, tuple[str, list[str], bool]]:
    """Row name -> (model, session options, through OnnxRuntimeBackend(low_memory=True))."""
    plan = {f"fp32 {name}": (fp32, opts, False) for name, opts in CONFIGS.items()}
    plan[f"fp32 {LOW_MEMORY_ROW}"] = (fp32, [], True)
    plan["int8 default"] = (int8, [], False)
    plan["int8 all four options"] = (int8, CONFIGS["all four options"], False)
    plan[f"int8 {LOW_MEMORY_ROW}"] = (int8, [], True)
    return plan


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


def _runner(path: str, threads: int, options: list[str], low_memory: bool, cache_dir: str | None) -> tuple[Any, dict]:
    """(run(feed), extra record fields): a plain session, or the product's low-memory backend."""
    if not low_memory:
        sess = _session(path, threads, options)
        return lambda feed: sess.run(None, feed), {}
    from frcnn.runtime.backends.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(path, providers=["cpu"], intra_op_threads=threads, low_memory=True,
                                 cache_dir=cache_dir)  # fmt: skip
    backend.activate()
    entry = backend.optimized_graph
    return backend.infer, {"cache_hit": entry is not None and not entry.built,
                           "optimized_graph": str(entry.path) if entry else None}


def rss_child(path: str, threads: int, options: list[str], height: int, width: int, low_memory: bool = False,
              cache_dir: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Run in a fresh process: build, run twice, report peak RSS (MiB) and the second run's seconds."""
    import resource

    feed = _feed(height, width)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    run, extra = _runner(path, threads, options, low_memory, cache_dir)
    session_s = time.perf_counter() - start
    run(feed)
    start = time.perf_counter()
    run(feed)
    seconds = time.perf_counter() - start
    return {"peak_rss_mib": _vm_hwm_mib(), "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "ru_maxrss_before_session_mib": base, "session_s": session_s, "second_run_s": seconds,
            **extra}  # fmt: skip


def _vm_hwm_mib() -> float:
    """Peak resident set of this process image (Linux /proc/self/status VmHWM), MiB."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not in /proc/self/status (Linux only)")


def measure_rss(path: str, args: argparse.Namespace, options: list[str], low_memory: bool = False) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--rss-child", path, "--threads", str(args.threads),
           "--height", str(args.height), "--width", str(args.width), "--options", *options]  # fmt: skip
    if low_memory:
        cmd += ["--low-memory-child", *(["--cache-dir", args.cache_dir] if args.cache_dir else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_all_rss(args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of the chosen rows (``--configs``, default all), each in a fresh process; the low-memory
    rows' cache entries are filled first (in a child process), so each row loads a warm entry."""
    plan = rss_plan(args.fp32, args.int8)
    chosen = args.configs or list(plan)
    unknown = [c for c in chosen if c not in plan]
    if unknown:
        raise SystemExit(f"unknown --configs {unknown}; choose from {list(plan)}")
    from frcnn.runtime.backends.ort_cache import ensure_optimized

    for name in chosen:
        if plan[name][2]:
            ensure_optimized(plan[name][0], args.cache_dir)
    return {name: measure_rss(plan[name][0], args, plan[name][1], plan[name][2]) for name in chosen}


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
    p.add_argument("--rss-only", action="store_true", help="peak RSS rows only, no latency")
    p.add_argument("--configs", nargs="+", default=None, metavar="NAME", help="peak RSS rows to measure "
                   "(e.g. 'fp32 default' 'fp32 low_memory'); default all")
    p.add_argument("--cache-dir", default=None, help="pre-optimised graph cache of the low_memory rows "
                   "(default: frcnn's, $FRCNN_CACHE_DIR/ort)")
    p.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--low-memory-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--options", nargs="*", default=[], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rss_child:
        print(json.dumps(rss_child(args.fp32, args.threads, args.options, args.height, args.width,
                                   args.low_memory_child, args.cache_dir)))  # fmt: skip
        return 0
    if not args.int8:
        p.error("give the fp32 and the int8 ONNX files")
    import onnxruntime as ort
    from frcnn.runtime.fileio import atomic_write_json

    record: dict[str, Any] = {"fp32": args.fp32, "int8": args.int8, "input_hw": [args.height, args.width],
                              "batch": 1, "threads": args.threads, "onnxruntime": ort.__version__,
                              "cpu_count": os.cpu_count(), "load_1m_start": os.getloadavg()[0]}  # fmt: skip
    if not args.no_rss:  # first: the children must not inherit a large parent
        record["rss"] = measure_all_rss(args)
    if not args.rss_only:
        record["latency"] = latency(args.fp32, args.int8, args)
    record["load_1m_end"] = os.getloadavg()[0]
    atomic_write_json(args.json, record, indent=2)
    if "latency" in record:
        lat = record["latency"]
        print(f"latency, batch 1, {args.height}x{args.width}, {args.threads} threads, {args.repeats} interleaved "
              f"repeats (load {record['load_1m_start']:.1f} -> {record['load_1m_end']:.1f})")
        print(f"  fp32 {lat['median_s']['fp32']:.3f} s   int8 {lat['median_s']['int8']:.3f} s   "
              f"int8 speed-up {lat['speedup_int8']:.2f}x")
    for name, r in record.get("rss", {}).items():
        print(f"  {name:<28} peak RSS {r['peak_rss_mib']:7.0f} MiB   session {r['session_s']:.2f} s   "
              f"run {r['second_run_s']:.3f} s")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
