"""R50-FPN: `export-engine` time, then ONNX Runtime (CPU) vs PyTorch eager latency at 800x1333, batch 1 and 2.

    python bench/bench_ort_vs_torch.py [--config COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml]
        [--height 800 --width 1333] [--batches 1 2] [--iters 2] [--threads N] [--hot-classes 5]
        [--json bench/results/ort_vs_torch.json]

Steps, all in one run: random R50-FPN weights with FrozenBN statistics calibrated on a random image (so
features stay O(1)) and ``--hot-classes`` class biases raised (every proposal then gives that many head-NMS
candidates: a busier head than a typical COCO image); saved as a trainer-style checkpoint; exported through
the real CLI (``export-engine``; the time is the acceptance number, <= 60 s); then both backends run the same
uint8 batches with the same thread count (median of ``--iters`` after one warm-up). ORT's profiler splits
its time between the nodes inlined from each custom op's local function and the rest.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from frcnn.trainer.config import get_cfg, model_zoo_config
from frcnn.trainer.modeling import build_model
from frcnn.trainer.modeling.layers import FrozenBatchNorm2d


def calibrated_model(config: str, hot_classes: int, seed: int = 0) -> tuple[object, torch.nn.Module]:
    """Random weights; each FrozenBN takes its input's batch statistics from one random image."""
    torch.manual_seed(seed)
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo_config(config))
    model = build_model(cfg).eval()

    def set_stats(module, inputs):
        module.running_mean.copy_(inputs[0].mean((0, 2, 3)))
        module.running_var.copy_(inputs[0].var((0, 2, 3)))

    hooks = [m.register_forward_pre_hook(set_stats) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    images = torch.randint(0, 256, (1, 3, 256, 320), dtype=torch.uint8)
    with torch.no_grad():
        model.backbone(model.preprocess(images, torch.tensor([[256, 320]])))
        model.roi_heads.box_predictor.cls_score.bias[:hot_classes] += 4.0
    for h in hooks:
        h.remove()
    return cfg, model


def _median_seconds(fn, iters: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def custom_op_seconds(model_path: str, feeds: dict[str, np.ndarray], threads: int, iters: int) -> dict[str, float]:
    """Median ORT seconds of each custom node run alone (its local function on the inputs it sees in the full
    model): the custom ops' share of the ORT time, attributable per node (inlined nodes lose their caller's
    name in ORT's profiler)."""
    import onnx
    import onnxruntime as ort
    from frcnn.export.onnx_export import with_outputs
    from frcnn.plugins.onnx_registry import attach_functions, custom_nodes
    from onnx import helper

    model = onnx.load(model_path)
    nodes = custom_nodes(model)
    outputs = {o.name for o in model.graph.output}
    wanted = list(dict.fromkeys(i for n in nodes for i in n.input if i not in outputs and i not in feeds))
    probe = with_outputs(model, wanted)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    values.update(feeds)
    seconds = {}
    for node in nodes:
        inputs = [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(values[i].dtype), None)
                  for i in node.input]
        outs = [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT if node.op_type == "ROIAlignV2" and k == 0
                                              else onnx.TensorProto.INT32, None)
                for k, o in enumerate(node.output)]
        single = helper.make_model(helper.make_graph([node], node.name, inputs, outs),
                                   opset_imports=list(model.opset_import))
        attach_functions(single)
        sess = ort.InferenceSession(single.SerializeToString(), options, providers=["CPUExecutionProvider"])
        single_feeds = {i: values[i] for i in node.input}
        seconds[node.name] = _median_seconds(lambda s=sess, f=single_feeds: s.run(None, f), iters)
        seconds[node.name + " [torch op]"] = _median_seconds(_torch_op(node, single_feeds), iters)
    return seconds


def _torch_op(node, feeds: dict[str, np.ndarray]):
    """A call of the node's torch face (the op the PyTorch model runs) on the same inputs."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    args = [torch.from_numpy(feeds[i]) for i in node.input]
    if node.op_type == "ROIAlignV2":
        from frcnn.plugins.roi_align_v2.torch_op import roi_align_v2

        return lambda: roi_align_v2(args[0], args[1:], output_size=attrs["output_size"],
                                    sampling_ratio=attrs["sampling_ratio"], aligned=bool(attrs["aligned"]),
                                    canonical_box_size=attrs["canonical_box_size"],
                                    canonical_level=attrs["canonical_level"], min_level=attrs["min_level"])
    from frcnn.plugins.batched_nms.torch_op import batched_nms

    return lambda: batched_nms(*args, attrs["iou_threshold"], attrs["score_threshold"], attrs["max_output"])


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml")
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1333)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--hot-classes", type=int, default=5)
    p.add_argument("--json", default="bench/results/ort_vs_torch.json")
    return p.parse_args(argv)


def _time_batch(model: Any, session: Any, onnx_path: str, images: np.ndarray, sizes: np.ndarray,
                args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """One row: PyTorch and ORT median seconds on one batch, and the custom ops' share of the ORT time."""
    feeds = {"images": images, "image_sizes": sizes}
    timg, tsizes = torch.from_numpy(images), torch.from_numpy(sizes)

    def run_torch() -> Any:
        with torch.no_grad():
            return model(timg, tsizes)

    torch_s = _median_seconds(run_torch, args.iters)
    ort_s = _median_seconds(lambda: session.run(None, feeds), args.iters)
    custom = custom_op_seconds(onnx_path, feeds, args.threads, args.iters)
    return {"batch": len(images), "input": list(images.shape), "torch_s": torch_s, "ort_s": ort_s,
            "ratio_ort_over_torch": ort_s / torch_s, "ort_custom_op_s": custom,
            "ort_custom_op_share": {k: v / ort_s for k, v in custom.items() if "[torch op]" not in k}}


def _print_rows(rows: list[dict[str, Any]]) -> None:
    print(f"{'batch':>5} {'input':>18} {'torch s':>9} {'ORT s':>9} {'ORT/torch':>10}  custom-op share of ORT")
    for r in rows:
        share = ", ".join(f"{k} {v:.1%} ({r['ort_custom_op_s'][k]:.3f} s; torch op "
                          f"{r['ort_custom_op_s'][k + ' [torch op]']:.3f} s)" for k, v in r["ort_custom_op_share"].items())
        print(f"{r['batch']:>5} {'x'.join(map(str, r['input'])):>18} {r['torch_s']:>9.2f} {r['ort_s']:>9.2f} "
              f"{r['ratio_ort_over_torch']:>10.2f}  {share}")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)

    import onnxruntime as ort
    from frcnn.export.cli import main as export_main
    from frcnn.runtime.fileio import atomic_write_json
    from frcnn.runtime.preprocess import batch_images
    from frcnn.trainer.checkpoint import save_checkpoint

    cfg, model = calibrated_model(args.config, args.hot_classes)
    folder = Path(tempfile.mkdtemp(prefix="frcnn-bench-"))
    checkpoint = folder / "model_final.pth"
    save_checkpoint(checkpoint, model, cfg=cfg.dump())
    start = time.perf_counter()
    code = export_main([str(checkpoint), "--output", str(folder / "model.onnx")])
    export_seconds = time.perf_counter() - start
    if code != 0:
        return code
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    rows = []
    for b in args.batches:
        imgs = [rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8) for _ in range(b)]
        rows.append(_time_batch(model, session, str(folder / "model.onnx"), *batch_images(imgs), args))
    result = {"config": args.config, "threads": args.threads, "export_seconds": export_seconds,
              "onnx_bytes": (folder / "model.onnx").stat().st_size, "torch": torch.__version__,
              "onnxruntime": ort.__version__, "cpu_count": os.cpu_count(),
              "load_average": os.getloadavg(), "rows": rows}
    print(f"\nexport-engine ({args.config}, CLI end to end): {export_seconds:.1f} s")
    _print_rows(rows)
    atomic_write_json(args.json, result, indent=2)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
