"""PyTorch CPU inference benchmark of the model: total time and per-stage split, custom ops' share.

    python bench/bench_inference.py [--config COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml]
        [--height 800 --width 1333] [--batch 1] [--iters 3] [--threads N] [--json bench/results/inference.json]

Stages are timed with forward hooks on ``model.backbone``, ``model.proposal_generator`` and
``model.roi_heads``; the custom ops' time comes from the PyTorch profiler (events ``frcnn::*``).
Random weights give no head detections above 0.05, so the head NMS would see no candidates: the benchmark
raises the cls_score bias of ``--hot-classes`` classes so that every proposal yields that many candidates
(a busier head NMS than a typical COCO image), which keeps the NMS share honest.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from frcnn.runtime.fileio import atomic_write_json
from frcnn.trainer.config import get_cfg, model_zoo_config
from frcnn.trainer.modeling import build_model

STAGES = ("backbone", "proposal_generator", "roi_heads")


def _attach_stage_timers(model: torch.nn.Module, sink: dict[str, list[float]]) -> None:
    for name in STAGES:
        module = getattr(model, name)
        start: dict[str, float] = {}

        def pre(_m, _a, name=name, start=start):
            start[name] = time.perf_counter()

        def post(_m, _a, _o, name=name, start=start):
            sink.setdefault(name, []).append(time.perf_counter() - start[name])

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


def _op_seconds(model: torch.nn.Module, images: torch.Tensor, sizes: torch.Tensor) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(images, sizes)
    totals: dict[str, float] = {}
    for evt in prof.key_averages():
        if evt.key.startswith("frcnn::"):
            totals[evt.key] = evt.cpu_time_total / 1e6
    return totals


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml")
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1333)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--hot-classes", type=int, default=5)
    p.add_argument("--json", default="bench/results/inference.json")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo_config(args.config) if not Path(args.config).exists() else args.config)
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[: args.hot_classes] += 4.0
    images = torch.randint(0, 256, (args.batch, 3, args.height, args.width), dtype=torch.uint8)
    sizes = torch.tensor([[args.height, args.width]] * args.batch, dtype=torch.int32)

    stage_times: dict[str, list[float]] = {}
    totals = []
    with torch.inference_mode():
        model(images, sizes)  # warm-up
        _attach_stage_timers(model, stage_times)
        for _ in range(args.iters):
            t0 = time.perf_counter()
            out = model(images, sizes)
            totals.append(time.perf_counter() - t0)
        ops = _op_seconds(model, images, sizes)

    total = statistics.median(totals)
    rows = [(name, statistics.median(stage_times[name])) for name in STAGES]
    rows += [(f"  op {k}", v) for k, v in sorted(ops.items())]
    op_share = sum(ops.values()) / max(total, 1e-9)
    print(f"R-CNN inference, {args.config}, batch {args.batch}, {args.height}x{args.width}, "
          f"{args.threads} threads, median of {args.iters}")
    print(f"{'stage':32s} {'seconds':>9s} {'share':>7s}")
    for name, sec in rows:
        print(f"{name:32s} {sec:9.3f} {sec / total:7.1%}")
    print(f"{'total':32s} {total:9.3f} {1:7.1%}")
    print(f"custom ops share: {op_share:.1%} (target < 10%); detections: {out['num_detections'].tolist()}")

    result = {
        "config": args.config, "batch": args.batch, "height": args.height, "width": args.width,
        "threads": args.threads, "iters": args.iters, "total_s": total,
        "stages_s": {name: sec for name, sec in rows}, "ops_share": op_share,
        "torch": torch.__version__, "cpu_count": os.cpu_count(),
    }
    out_path = Path(args.json)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_path, result, indent=2)
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
