"""Training benchmarks on the CPU.

    # small config on the synthetic dataset: synthesize -> train -> COCO AP on val (target AP50 >= 0.6, <= 20 min)
    python bench/bench_train.py small [--images 375 --size 320] [--threads 2] [--work /tmp/frcnn-bench]
        [--json bench/results/train_small.json] [KEY VALUE ...]

    # frcnn demo's training (frcnn-demo-R18.yaml on its easier synthetic set; see docs/training.md)
    python bench/bench_train.py small --config frcnn-demo-R18.yaml --images 300 --size 192 --min-side 16 \
        --max-shapes 6 --clutter 6

    # seconds per training iteration of R50-FPN at batch 2, 800x1333, on the CPU
    python bench/bench_train.py r50 [--iters 3] [--threads 2] [--json bench/results/train_r50.json]

``small`` runs ``frcnn.trainer.engine.train`` (what ``frcnn train`` runs) with the packaged
``frcnn-small-R18.yaml`` (or ``--config``) plus the KEY VALUE overrides, then ``evaluate_model`` on the val split (pycocotools).
``--images`` counts train + val (val = 20 %), so the default 375 gives 300 training images. Wall time
covers training and evaluation (synthesis is reported separately; a cached dataset in --work is reused);
``train_cpu_s`` is the CPU time of training (this process and its data workers), which a busy machine
inflates much less than the wall time.

``r50`` times ``Trainer.run_step`` (data already in memory: two random 800x1333 BGR images with 8 random
boxes each, 80 classes, BN frozen as in the model zoo config): one warm-up iteration, then ``--iters``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any

import torch
from frcnn.runtime.fileio import atomic_write_json
from frcnn.trainer.data.synth import CLUTTER, MAX_SHAPES, MIN_SIDE


def _machine(threads: int) -> dict[str, Any]:
    return {"torch": torch.__version__, "threads": threads, "cpu_count": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "loadavg_1m_at_end": os.getloadavg()[0]}  # fmt: skip


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (data loader workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_small(args: argparse.Namespace) -> dict[str, Any]:
    from frcnn.trainer.data import load_coco_split, synthesize_dataset
    from frcnn.trainer.engine import evaluate_model, train
    from frcnn.trainer.modeling import build_model
    from frcnn.trainer.train_cli import build_config

    style = {"min_side": args.min_side, "max_shapes": args.max_shapes, "clutter": args.clutter}
    data = os.path.join(
        args.work, "synth-{}-{}-{min_side}-{max_shapes}-{clutter}".format(args.images, args.size, **style)
    )
    t0 = time.perf_counter()
    if not os.path.isfile(os.path.join(data, "annotations", "instances_val.json")):
        synthesize_dataset(data, num_images=args.images, size=args.size, num_classes=args.classes, seed=0,
                           overwrite=True, **style)  # fmt: skip
    synth_s = time.perf_counter() - t0
    cfg = build_config(args.config, ["MODEL.DEVICE", "cpu", "SEED", "0", "MODEL.ROI_HEADS.NUM_CLASSES",
                                     str(args.classes), *args.opts])  # fmt: skip
    out = os.path.join(args.work, "train-small")
    t1, c1 = time.perf_counter(), _cpu_s()
    summary = train(cfg, data, out, log_period=20, progress=not args.no_progress)
    train_s, train_cpu_s = time.perf_counter() - t1, _cpu_s() - c1
    val, meta = load_coco_split(data, "val")
    model = build_model(cfg).eval()
    from frcnn.trainer.checkpoint import load_checkpoint

    load_checkpoint(model, summary["final_checkpoint"])
    t2 = time.perf_counter()
    metrics = evaluate_model(model, cfg, val, meta, output_dir=os.path.join(out, "eval"), num_workers=0)
    eval_s = time.perf_counter() - t2
    with open(os.path.join(out, "metrics.json"), encoding="utf-8") as f:
        lines = [json.loads(x) for x in f if x.strip()]
    iter_times = [r["time"] for r in lines if "time" in r]
    train_images = len(load_coco_split(data, "train")[0])
    return {
        "mode": "small", "config": args.config, "overrides": list(args.opts), "synth": style,
        "train_images": train_images, "val_images": len(val), "image_size": args.size, "train_cpu_s": train_cpu_s,
        "max_iter": int(cfg.SOLVER.MAX_ITER), "ims_per_batch": int(cfg.SOLVER.IMS_PER_BATCH),
        "synth_s": synth_s, "train_s": train_s, "eval_s": eval_s, "wall_s": train_s + eval_s,
        "s_per_iter_median": statistics.median(iter_times) if iter_times else None,
        "final_total_loss": lines[-1].get("total_loss") if lines else None,
        "metrics": {k: v for k, v in metrics.items()}, "target": {"AP50": 0.6, "wall_s": 1200},
        "met": bool(metrics.get("AP50", 0) >= 0.6 and train_s + eval_s <= 1200),
    }  # fmt: skip


def _random_batch(n: int, h: int, w: int, num_classes: int, gen: torch.Generator) -> list[dict[str, Any]]:
    batch = []
    for _ in range(n):
        xy = torch.rand((8, 2), generator=gen) * torch.tensor([w * 0.7, h * 0.7])
        wh = 32 + torch.rand((8, 2), generator=gen) * torch.tensor([w * 0.25, h * 0.25])
        batch.append({"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen),
                      "gt_boxes": torch.cat([xy, xy + wh], 1),
                      "gt_classes": torch.randint(0, num_classes, (8,), generator=gen)})  # fmt: skip
    return batch


def run_r50(args: argparse.Namespace) -> dict[str, Any]:
    from frcnn.trainer.engine import Trainer, build_lr_scheduler, build_optimizer
    from frcnn.trainer.modeling import build_model
    from frcnn.trainer.train_cli import build_config

    cfg = build_config("COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml", ["MODEL.DEVICE", "cpu", *args.opts])
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    gen = torch.Generator().manual_seed(0)
    batch = _random_batch(2, 800, 1333, int(cfg.MODEL.ROI_HEADS.NUM_CLASSES), gen)

    def forever():
        while True:
            yield batch

    trainer = Trainer(model, opt, build_lr_scheduler(cfg, opt), forever())
    times = []
    for i in range(args.iters + 1):
        trainer.iter = i
        start = time.perf_counter()
        trainer.run_step()
        times.append(time.perf_counter() - start)
        print(f"iteration {i}: {times[-1]:.2f} s  total_loss {trainer.metrics['total_loss']:.3f}", flush=True)
    return {"mode": "r50", "config": "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml", "batch": 2,
            "image_hw": [800, 1333], "warmup_s": times[0], "iter_s": times[1:],
            "s_per_iter_median": statistics.median(times[1:])}  # fmt: skip


def _print_table(record: dict[str, Any]) -> None:
    if record["mode"] == "small":
        m = record["metrics"]
        rows = [("train images / val images", f"{record['train_images']} / {record['val_images']}"),
                ("iterations x batch", f"{record['max_iter']} x {record['ims_per_batch']}"),
                ("median s / iteration", f"{record['s_per_iter_median']:.3f}"),
                ("training CPU seconds", f"{record['train_cpu_s']:.0f}"),
                ("train + eval wall (s)", f"{record['train_s']:.0f} + {record['eval_s']:.0f} = {record['wall_s']:.0f}"),
                ("AP / AP50 / AP75 (%)", f"{100 * m['AP']:.1f} / {100 * m['AP50']:.1f} / {100 * m['AP75']:.1f}"),
                ("APs / APm / APl (%)", " / ".join(f"{100 * m[k]:.1f}" for k in ("APs", "APm", "APl"))),
                ("target AP50 >= 60 in <= 1200 s", "met" if record["met"] else "NOT met")]  # fmt: skip
    else:
        rows = [("R50-FPN train step, batch 2, 800x1333", f"{record['s_per_iter_median']:.2f} s / iteration"),
                ("first (warm-up) iteration", f"{record['warmup_s']:.2f} s")]  # fmt: skip
    width = max(len(r[0]) for r in rows)
    print(f"threads {record['machine']['threads']}, torch {record['machine']['torch']}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["small", "r50"])
    p.add_argument("--images", type=int, default=375, help="synthetic images, train + val (val = 20 %%)")
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--config", default="frcnn-small-R18.yaml", help="small: packaged name or YAML file")
    p.add_argument(
        "--min-side", type=int, default=MIN_SIDE, help="small: synthetic set's smallest shape (px)"
    )
    p.add_argument("--max-shapes", type=int, default=MAX_SHAPES, help="small: most shapes per image")
    p.add_argument("--clutter", type=int, default=CLUTTER, help="small: most distractor lines per image")
    p.add_argument("--iters", type=int, default=3, help="r50: timed iterations after one warm-up")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "frcnn-bench"))
    p.add_argument("--json", default=None, help="result file (default bench/results/train_<mode>.json)")
    p.add_argument("--no-progress", action="store_true")
    args, opts = p.parse_known_args(argv)  # the rest: KEY VALUE config overrides
    bad = [o for o in opts[::2] if o.startswith("-")]
    if bad:
        p.error(f"unknown option(s) {bad}; config overrides are KEY VALUE pairs")
    args.opts = opts
    torch.set_num_threads(args.threads)
    record = run_small(args) if args.mode == "small" else run_r50(args)
    record["machine"] = _machine(args.threads)
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"train_{args.mode}.json")
    atomic_write_json(path, record, indent=2)
    _print_table(record)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
