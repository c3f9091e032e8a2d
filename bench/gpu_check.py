"""The GPU check behind ``bench/gpu_check.sh``: every step records pass / fail / skipped / error with its reason.

Part (a), CUDA torch + Triton only: the Triton kernels at the shipped configurations
(``frcnn.plugins.ptx.default_specs``) on CUDA tensors vs the torch reference ops (exact NMS indices,
ROIAlignV2 fp32 within 1e-5), their time vs the memory-bandwidth floor, the PyTorch model on CUDA vs CPU
(IoU-matched). Part (b), TensorRT: engine build fp32 / fp16 (int8 when a Q/DQ ONNX is given), parity
against ONNX Runtime, latency, and a shape-change memory soak (200 calls over 20 sizes, device memory
before / after; once more with shape buckets).

    python bench/gpu_check.py --out-dir DIR [--int8-onnx model.int8.onnx] [--budget-s 540]

Writes ``DIR/gpu_check.json`` (atomically) and prints one line per step; exits 0 whatever the steps found.
The model is tests/model_utils.lively_model (random weights calibrated to give detections: no pretrained
weights exist offline); the check is about numerics and memory, not accuracy.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ROI_FP32_TOL, ROI_FP16_TOL = 1e-5, 1e-2
FLOOR_BUDGET = {"roi_align_v2 7x7 float32": 50.0, "roi_align_v2 7x7 float16": 100.0,
                "roi_align_v2 14x14 float32": 25.0, "roi_align_v2 14x14 float16": 50.0}
"""Kernel time / bandwidth floor allowed for the gather-bound ROIAlignV2: 1.5x what an H200 measured
(2026-12-04: 33, 67, 16 and 34; 0.34 / 0.35 / 0.67 / 0.71 ms for 1000 ROIs x 256 channels). The floor counts
output bytes only: the bilinear taps (adaptive sampling, many per bin for large boxes) hit L2, so the kernel
is bound by gathers, not DRAM, and fp16 maps are not faster than fp32 ones."""
NMS_BUDGET_MS = 3.0
"""Head NMS, N = 80000 candidates, one image: about 2x what an H200 measured (1.60 ms, 2026-12-04)."""
PEAK_GBPS = {"H200": 4800, "H100 SXM": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "A100-SXM4-80GB": 2039,
             "A100-SXM4-40GB": 1555, "A100-PCIE-40GB": 1555, "L40S": 864, "L4": 300, "A10": 600, "T4": 320,
             "RTX 4090": 1008, "B200": 8000}
"""Datasheet DRAM bandwidth by name fragment, used when torch does not report clock and bus width."""


class Skip(Exception):
    """A step that cannot run here; the message is the reason."""


class Check:
    """Shared state of one run: torch, deadline, output folder, the exported model and engines."""

    def __init__(self, out_dir: Path, budget_s: float, int8_onnx: Path | None) -> None:
        self.out_dir, self.deadline, self.int8_onnx = out_dir, time.monotonic() + budget_s, int8_onnx
        self.cache: dict[str, Any] = {}

    def torch(self) -> Any:
        try:
            import torch
        except ImportError as exc:
            raise Skip(f"torch is not installed ({exc})") from None
        return torch

    def cuda(self) -> Any:
        torch = self.torch()
        if not torch.cuda.is_available():
            raise Skip("no NVIDIA GPU: torch.cuda.is_available() is False (CPU-only torch or no driver)")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return torch

    def tensorrt(self) -> Any:
        self.cuda()
        from frcnn.runtime.tensorrt_env import tensorrt_available

        if not tensorrt_available():
            raise Skip("TensorRT is not installed (pip install the tensorrt wheels: docs/gpu-deployment.md)")
        from frcnn.plugins.tensorrt import require_tensorrt

        return require_tensorrt()

    def model(self) -> tuple[Any, Any]:
        if "model" not in self.cache:
            sys.path.insert(0, str(REPO / "tests"))
            from model_utils import lively_model

            self.cache["model"] = lively_model()
        return self.cache["model"]


def env_step(ck: Check) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version()}
    for name in ("torch", "triton", "tensorrt", "onnxruntime"):
        try:
            info[name] = str(__import__(name).__version__)
        except Exception as exc:  # noqa: BLE001 - any import failure is the finding
            info[name] = f"unavailable ({type(exc).__name__}: {exc})"
    try:
        torch = ck.cuda()
    except Skip as exc:
        info["gpu"] = f"none ({exc})"
        return info
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}")
    try:
        info["peak_gbps"] = peak_bandwidth(torch) / 1e9
    except RuntimeError as exc:  # recorded here; kernel_time_vs_floor then errors with the same reason
        info["peak_gbps"] = str(exc)
    return info


def peak_bandwidth(torch: Any) -> float:
    """Peak DRAM bandwidth of device 0 in bytes/s (torch's clock x bus width, else the datasheet table)."""
    props = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2.0 * clock_khz * 1e3 * bus_bits / 8
    for fragment, gbps in PEAK_GBPS.items():
        if fragment in props.name:
            return gbps * 1e9
    raise RuntimeError(f"peak bandwidth of {props.name} unknown: torch reports no memory clock / bus width and "
                       f"it is not in bench/gpu_check.py PEAK_GBPS; add its datasheet value")


def _features(torch: Any, channels: int, hw: tuple[int, int], dtype: Any) -> list[Any]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, channels, hw[0] >> i, hw[1] >> i, generator=gen).to("cuda", dtype) for i in range(4)]


def _rois(torch: Any, count: int, hw: tuple[int, int]) -> Any:
    gen = torch.Generator().manual_seed(1)
    xy = torch.rand(1, count, 2, generator=gen) * torch.tensor([hw[1] * 4.0, hw[0] * 4.0])
    wh = torch.rand(1, count, 2, generator=gen) ** 2 * 400
    return torch.cat([xy, xy + wh], dim=-1).cuda()


def nms_configs() -> list[tuple[str, dict[str, Any]]]:
    """(name, constexprs) of the shipped NMS kernels (frcnn.plugins.ptx.default_specs: RPN and head)."""
    from frcnn.plugins.ptx import default_specs

    return [(s.name, dict(s.constexprs)) for s in default_specs() if s.kernel == "batched_nms_kernel"]


def _nms_inputs(torch: Any, n: int, groups: int, seed: int) -> tuple[Any, Any, Any]:
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(1, n, 2, generator=gen) * 800
    boxes = torch.cat([xy, xy + torch.rand(1, n, 2, generator=gen) * 200], -1)
    return boxes, torch.rand(1, n, generator=gen), torch.randint(0, groups, (1, n), generator=gen, dtype=torch.int32)


def _roi_errors(torch: Any, rois: Any, size: int, dtype: Any) -> tuple[float, float]:
    """(max |Triton - fp64 reference|, max |torch op in dtype on CPU - fp64 reference|) of one configuration."""
    from frcnn.plugins.roi_align_v2.torch_op import roi_align_v2
    from frcnn.plugins.roi_align_v2.triton_kernel import roi_align_v2_triton

    feats = _features(torch, 256, (200, 304), dtype)
    exact = roi_align_v2(rois.cpu().double(), [f.cpu().double() for f in feats], output_size=size)
    got = roi_align_v2_triton(rois, feats, output_size=size).cpu().double()
    torch_cpu = roi_align_v2(rois.cpu(), [f.cpu().float() for f in feats], output_size=size).to(dtype).double()
    return float((got - exact).abs().max()), float((torch_cpu - exact).abs().max())


def kernels_step(ck: Check) -> dict[str, Any]:
    """Every shipped kernel configuration on CUDA vs the float64 / exact references; all are run, then the
    failures are reported together."""
    torch = ck.cuda()
    from frcnn.plugins import KERNEL_COMPILE_OPTIONS
    from frcnn.plugins.batched_nms.torch_op import batched_nms
    from frcnn.plugins.batched_nms.triton_kernel import batched_nms_triton

    out: dict[str, Any] = {}
    bad: list[str] = []
    rois = _rois(torch, 1000, (200, 304))
    for size, dtype, tol in ((7, torch.float32, ROI_FP32_TOL), (7, torch.float16, ROI_FP16_TOL),
                             (14, torch.float32, ROI_FP32_TOL), (14, torch.float16, ROI_FP16_TOL)):
        name = f"roi_align_v2 {size}x{size} {str(dtype)[6:]}"
        err, ref_err = _roi_errors(torch, rois, size, dtype)
        out[f"{name} max_abs_err_vs_fp64"], out[f"{name} torch_cpu_max_abs_err_vs_fp64"] = err, ref_err
        if not err <= tol:
            bad.append(f"{name}: max |triton - fp64 reference| = {err:.3g} > {tol}")
    fused = dict(KERNEL_COMPILE_OPTIONS)
    KERNEL_COMPILE_OPTIONS["enable_fp_fusion"] = True  # diagnostic only: what FMA contraction would cost
    try:
        out["roi_align_v2 7x7 float32 with fp fusion (not shipped) max_abs_err_vs_fp64"] = _roi_errors(
            torch, rois, 7, torch.float32)[0]
    finally:
        KERNEL_COMPILE_OPTIONS.update(fused)
    for name, c in nms_configs():
        n = min(c["CAP"], 5000 if "rpn" in name else 4000)
        boxes, scores, groups = _nms_inputs(torch, n, 5 if "rpn" in name else 80, seed=2)
        args = (c["IOU_THRESHOLD"], c["SCORE_THRESHOLD"], c["MAX_OUTPUT"])
        num, idx = batched_nms_triton(boxes.cuda(), scores.cuda(), groups.cuda(), *args, max_candidates=c["CAP"])
        ref_num, ref_idx = batched_nms(boxes, scores, groups, *args)
        same = bool(torch.equal(num.cpu(), ref_num) and torch.equal(idx.cpu(), ref_idx))
        out[f"{name} N={n} exact"] = same
        if not same:
            bad.append(f"{name}: Triton NMS indices differ from the torch reference (N={n})")
    if bad:
        raise AssertionError("; ".join(bad) + f" (all results: {out})")
    return out


def time_ms(torch: Any, fn: Callable[[], Any], reps: int = 20) -> float:
    """Mean CUDA-event time of ``fn`` over ``reps`` calls after one warm-up."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return float(start.elapsed_time(end)) / reps


def floor_rows(torch: Any) -> list[dict[str, Any]]:
    """Kernel time, bytes the op must move, and the floor (bytes / peak bandwidth) per shipped kernel."""
    from frcnn.plugins.batched_nms.triton_kernel import batched_nms_triton
    from frcnn.plugins.roi_align_v2.triton_kernel import roi_align_v2_triton

    peak, rows = peak_bandwidth(torch), []
    rois = _rois(torch, 1000, (200, 304))
    for size in (7, 14):  # box pooler, mask pooler
        for dtype in (torch.float32, torch.float16):
            feats = _features(torch, 256, (200, 304), dtype)
            ms = time_ms(torch, lambda r=rois, f=feats, s=size: roi_align_v2_triton(r, f, output_size=s))
            moved = 1000 * 256 * size * size * feats[0].element_size() + rois.numel() * 4  # output + rois
            rows.append({"kernel": f"roi_align_v2 {size}x{size} {str(dtype)[6:]}", "ms": ms, "bytes": moved})
    head = dict(nms_configs())["batched_nms_head"]
    boxes, scores, groups = (t.cuda() for t in _nms_inputs(torch, 80000, 80, seed=4))
    ms = time_ms(torch, lambda: batched_nms_triton(boxes, scores, groups, head["IOU_THRESHOLD"],
                                                   head["SCORE_THRESHOLD"], head["MAX_OUTPUT"], head["CAP"]))
    rows.append({"kernel": "batched_nms_head N=80000", "ms": ms, "bytes": 80000 * (16 + 4 + 4) + 100 * 4})
    for row in rows:
        row["floor_ms"] = row["bytes"] / peak * 1e3
        row["ratio"] = row["ms"] / row["floor_ms"]
    return rows


def floor_failures(rows: list[dict[str, Any]]) -> list[str]:
    """What is wrong with :func:`floor_rows`: faster than physics, or over the budget (measured on an H200)."""
    bad = [f"{r['kernel']}: {r['ms']:.4f} ms is below the bandwidth floor {r['floor_ms']:.4f} ms (timer or "
           f"kernel broken)" for r in rows if r["ms"] < r["floor_ms"]]
    bad += [f"{r['kernel']}: {r['ratio']:.1f} x the floor > budget {FLOOR_BUDGET[r['kernel']]}" for r in rows
            if r["kernel"] in FLOOR_BUDGET and r["ratio"] > FLOOR_BUDGET[r["kernel"]]]
    bad += [f"{r['kernel']}: {r['ms']:.3f} ms > budget {NMS_BUDGET_MS} ms" for r in rows
            if r["kernel"].startswith("batched_nms") and r["ms"] > NMS_BUDGET_MS]
    return bad


def floor_step(ck: Check) -> dict[str, Any]:
    rows = floor_rows(ck.cuda())
    bad = floor_failures(rows)
    if bad:
        raise AssertionError("; ".join(bad))
    return {"rows": rows}


def _as_numpy(outputs: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().cpu().numpy() for k, v in outputs.items()}


def _cuda_vs_cpu(torch: Any, model: Any) -> dict[str, Any]:
    """The model on CPU and on CUDA (no TF32) on one mixed-size batch: detections (and masks) IoU-matched."""
    import copy

    from frcnn.export.polygraphy_runners import compare_detections
    from frcnn.runtime.preprocess import batch_images
    from model_utils import random_images

    images, sizes = batch_images(random_images([(320, 448), (288, 512)], 5), 32)
    with torch.no_grad():
        cpu = _as_numpy(model(torch.from_numpy(images), torch.from_numpy(sizes)))
        gpu_model = copy.deepcopy(model).cuda()
        gpu = _as_numpy(gpu_model(torch.from_numpy(images).cuda(), torch.from_numpy(sizes).cuda()))
    report = compare_detections(cpu, gpu, min_iou=0.99, score_atol=1e-3, mask_atol=1e-3, mask_min_iou=0.97)
    result = {"detections_cpu": int(cpu["num_detections"].sum()), "matched": report.matched,
              "masks_compared": report.masks_compared, "report": str(report)}
    if not report or result["detections_cpu"] == 0:
        raise AssertionError(f"PyTorch CUDA vs CPU: {report}")
    return result


def model_step(ck: Check) -> dict[str, Any]:
    torch = ck.cuda()
    _cfg, model = ck.model()  # puts tests/ on sys.path
    return _cuda_vs_cpu(torch, model)


def mask_model_step(ck: Check) -> dict[str, Any]:
    """Mask R-CNN (MODEL.MASK_ON, mask pooler 14x14): CUDA vs CPU, masks included."""
    torch = ck.cuda()
    ck.model()
    from model_utils import lively_model

    _cfg, model = lively_model("frcnn-small-R18.yaml", "MODEL.MASK_ON", "True", "MODEL.ROI_MASK_HEAD.CONV_DIM", "64")
    from frcnn.runtime.preprocess import batch_images
    from model_utils import random_images

    images, sizes = batch_images(random_images([(320, 448)], 6), 32)
    predictor = model.roi_heads.mask_head.predictor
    with torch.no_grad():  # mask probabilities spread around 0.5, so that pasted masks are not empty
        model.roi_heads.box_predictor.cls_score.weight.mul_(0.3)  # scores below 1: no ties at the top-100 cut
        predictor.weight.normal_(std=0.3)
        out = model(torch.from_numpy(images), torch.from_numpy(sizes))
        probs = out["masks"][0, : int(out["num_detections"][0])].clamp(1e-6, 1 - 1e-6)
        predictor.bias -= torch.logit(probs).median()
    result = _cuda_vs_cpu(torch, model)
    if result["masks_compared"] == 0:
        raise AssertionError("the mask model returned no masks to compare")
    return result


STEPS_A: list[tuple[str, Callable[[Check], dict[str, Any]]]] = [
    ("env", env_step), ("kernels_vs_torch", kernels_step), ("kernel_time_vs_floor", floor_step),
    ("model_cuda_vs_cpu", model_step), ("mask_model_cuda_vs_cpu", mask_model_step),
]


def run_step(ck: Check, part: str, name: str, fn: Callable[[Check], dict[str, Any]]) -> dict[str, Any]:
    """One step -> {part, name, status, reason, seconds, result}; never raises."""
    start = time.monotonic()
    record: dict[str, Any] = {"part": part, "name": name}
    if time.monotonic() > ck.deadline:
        record.update(status="skipped", reason="time budget of the check spent (--budget-s)")
        return record
    try:
        record.update(status="pass", result=fn(ck))
    except Skip as exc:
        record.update(status="skipped", reason=str(exc))
    except AssertionError as exc:
        record.update(status="fail", reason=str(exc))
    except Exception as exc:  # noqa: BLE001 - the check records every failure and goes on
        record.update(status="error", reason=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc()[-3000:])
    record["seconds"] = round(time.monotonic() - start, 2)
    ck.cache[f"status:{name}"] = record["status"]
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--int8-onnx", type=Path, default=None, help="a Q/DQ ONNX (export-engine --int8)")
    parser.add_argument("--budget-s", type=float, default=540.0, help="steps after this many seconds are skipped")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    ck = Check(args.out_dir, args.budget_s, args.int8_onnx)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.modules.setdefault("gpu_check", sys.modules[__name__])  # one Check / Skip class for both files
    from gpu_check_trt import STEPS_B

    records = []
    for part, steps in (("a", STEPS_A), ("b", STEPS_B)):
        for name, fn in steps:
            rec = run_step(ck, part, name, fn)
            records.append(rec)
            print(f"[{part}] {name:22} {rec['status']:8} {rec.get('reason', '')}"[:400], flush=True)
    summary = {s: sum(r["status"] == s for r in records) for s in ("pass", "fail", "error", "skipped")}
    from frcnn.runtime.fileio import atomic_write

    report = {"format": "frcnn-gpu-check/1", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "host": platform.node(), "summary": summary, "steps": records}
    atomic_write(args.out_dir / "gpu_check.json", json.dumps(report, indent=2, default=str).encode())
    print(f"summary: {summary}; wrote {args.out_dir / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
