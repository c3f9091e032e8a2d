"""``frcnn bench MODEL_A MODEL_B``: two deployed models side by side in one run (e.g. fp32 vs int8).

Both Detectors are built first; then each timed iteration runs A once and B once on the same synthetic
images (interleaved, so a shared machine's load hits both alike). Prints each model's report
(``bench_cli.format_report``) and the latency ratio A / B (> 1: B is faster); writes both summaries and the
ratio as JSON.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from frcnn.runtime.bench_cli import STAGES, format_report, summarize, synthetic_image, time_detector
from frcnn.runtime.fileio import atomic_write_json


def run_compare(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """Interleaved timing of ``args.model`` and ``args.compare``; returns the exit code."""
    from frcnn.runtime.detector import Detector

    detectors = [Detector(p, backend=args.backend, max_batch=args.batch, **options) for p in (args.model, args.compare)]
    h, w = args.size
    images = [synthetic_image(h, w, seed=i) for i in range(args.batch)]
    for d in detectors:
        time_detector(d, images, 1, args.warmup)
    times: list[dict[str, list[float]]] = [{s: [] for s in STAGES} for _ in detectors]
    for _ in range(args.iters):
        for d, acc in zip(detectors, times):
            one = time_detector(d, images, 1, 0)
            for s in STAGES:
                acc[s] += one[s]
    results = []
    for path, d, t in zip((args.model, args.compare), detectors, times):
        feed, _ = d.preprocess(images)
        results.append({"model": path, "backend": d.backend.name, "precision": d.backend.metadata.get("precision",
                        "fp32"), "batch": args.batch, "image_hw": [h, w], "input_hw": list(feed["images"].shape[2:]),
                        "iters": args.iters, **summarize(t, args.batch), "raw_seconds": t})  # fmt: skip
    ratio = results[0]["latency_mean_ms"] / results[1]["latency_mean_ms"]
    for r in results:
        print(f"[{r['precision']}] " + format_report(r))
    print(f"latency ratio {results[0]['precision']} / {results[1]['precision']}: {ratio:.2f}x (mean per call, "
          f"{args.iters} interleaved iterations, load {os.getloadavg()[0]:.1f})")
    atomic_write_json(args.json, {"models": results, "ratio_a_over_b": ratio, "threads": args.threads,
                                  "load_1m": os.getloadavg()[0]}, indent=2)  # fmt: skip
    print(f"wrote {args.json}")
    return 0
