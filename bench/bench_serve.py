"""Serving throughput and latency: `frcnn serve` (Triton via PyTriton, HTTP client) vs the in-process Detector.

    python bench/bench_serve.py MODEL.onnx [--requests 48] [--concurrency 1 4 16] [--out bench/results/serve]

For each concurrency C, C client threads send ``--requests`` images in total (real photos bundled with
scikit-image, mixed sizes) to (a) ``Detector("http://127.0.0.1:PORT/frcnn")`` against a ``frcnn serve``
subprocess on loopback and (b) one in-process ``Detector(MODEL)`` shared by the threads. Reports images/s and
p50 / p99 latency per request; writes ``OUT.json`` and ``OUT.md``. Both sides share this machine's CPUs, so
the server column includes the client's pre/post-processing and the network stack.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from frcnn.runtime import Detector
from frcnn.runtime.fileio import atomic_write, atomic_write_json


def photos() -> list[np.ndarray]:
    from skimage import data

    return [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_server(model: str, ports: list[int], max_batch: int, delay_us: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "frcnn.runtime.cli", "serve", model, "--http-port", str(ports[0]), "--grpc-port",
           str(ports[1]), "--metrics-port", str(ports[2]), "--max-batch", str(max_batch), "--max-queue-delay-us",
           str(delay_us)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    from tritonclient import http

    client, deadline = http.InferenceServerClient(f"127.0.0.1:{ports[0]}"), time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"frcnn serve exited with {proc.returncode}")
        with contextlib.suppress(Exception):
            if client.is_model_ready("frcnn"):
                return proc
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit("frcnn serve did not become ready in 300 s")


def run_level(detector: Detector, images: list[np.ndarray], concurrency: int, requests: int) -> dict[str, Any]:
    """``requests`` single-image calls spread over ``concurrency`` threads: throughput and latency."""

    def one(k: int) -> float:
        start = time.perf_counter()
        detector(images[k % len(images)])
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = np.array(list(pool.map(one, range(requests))))
    wall = time.perf_counter() - start
    return {"concurrency": concurrency, "requests": requests, "images_per_s": requests / wall,
            "p50_ms": float(np.percentile(latencies, 50) * 1e3), "p99_ms": float(np.percentile(latencies, 99) * 1e3)}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| concurrency | side | images/s | p50 ms | p99 ms |", "|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['side']} | {r['images_per_s']:.2f} | {r['p50_ms']:.0f} | "
                     f"{r['p99_ms']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="exported .onnx")
    parser.add_argument("--requests", type=int, default=48, help="images per concurrency level and side")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    parser.add_argument("--out", default="bench/results/serve", help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    images = photos()
    ports = free_ports(3)
    proc = start_server(args.model, ports, args.max_batch, args.max_queue_delay_us)
    rows: list[dict[str, Any]] = []
    try:
        sides = {"frcnn serve (HTTP)": Detector(f"http://127.0.0.1:{ports[0]}/frcnn", input_format="RGB"),
                 "in-process Detector": Detector(args.model, input_format="RGB")}  # fmt: skip
        for detector in sides.values():
            detector(images[0])  # warm-up
        for c in args.concurrency:
            for side, detector in sides.items():
                rows.append({"side": side, **run_level(detector, images, c, args.requests)})
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    load = os.getloadavg()
    result = {"model": os.path.basename(args.model), "max_batch": args.max_batch, "cpu_count": os.cpu_count(),
              "load_average_after": load, "machine": platform.platform(), "rows": rows,
              "images": [list(i.shape) for i in images]}  # fmt: skip
    atomic_write_json(args.out + ".json", result, indent=2)
    atomic_write(args.out + ".md", f"{table(rows)}\n\nmodel {result['model']}, {os.cpu_count()} CPUs, "
                 f"load average after the run {load[0]:.1f} (shared machine)\n")  # fmt: skip
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
