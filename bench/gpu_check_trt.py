"""Part (b) of bench/gpu_check.py: TensorRT engines of the exported model (needs TensorRT and a GPU).

Steps: export the lively small model to ONNX; build fp32 / fp16 engines (int8 from ``--int8-onnx``, a Q/DQ
ONNX); parity of each engine against ONNX Runtime (CPU) on the same feed; latency; a shape-change memory
soak of 200 calls over 20 input sizes, device memory (cudaMemGetInfo through torch) before and after, run
plain and then with the runtime's shape buckets (frcnn.runtime.shape_buckets).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from gpu_check import Check, Skip

PROFILE_HW = ((64, 64), (320, 512), (512, 512))
SOAK_CALLS, SOAK_SIZES = 200, 20
SOAK_BUCKETS = (256, 512)
"""Shape buckets of the second soak: the 20 sizes collapse to 4 shapes."""
LEAK_LIMIT_MIB = 64.0
"""Device memory growth over the soak that counts as a leak (NVIDIA/TensorRT#4849 leaks per shape change)."""


def _needs(ck: Check, step: str) -> Any:
    if ck.cache.get(f"status:{step}") != "pass":
        raise Skip(f"needs step {step}, which did not pass")
    return ck.cache.get(step)


def tensorrt_step(ck: Check) -> dict[str, Any]:
    trt = ck.tensorrt()
    from frcnn.runtime.tensorrt_env import current_gpu

    gpu = current_gpu()
    return {"tensorrt": str(trt.__version__), "gpu": gpu.name, "compute_capability": gpu.cc_string()}


def export_step(ck: Check) -> dict[str, Any]:
    _needs(ck, "tensorrt")
    from frcnn.export.onnx_export import export_onnx

    cfg, model = ck.model()
    path = export_onnx(model, cfg, ck.out_dir / "model.onnx", max_batch=2, max_side=PROFILE_HW[2][1])
    ck.cache["export_onnx"] = path
    return {"onnx": str(path)}


def _build(ck: Check, onnx_path: Any, name: str, fp16: bool) -> dict[str, Any]:
    from frcnn.export.engine import build_engine, image_profile

    lo, opt, hi = image_profile(1, 1, 2, *PROFILE_HW)
    start = time.perf_counter()
    info = build_engine(onnx_path, ck.out_dir / f"{name}.engine", min_shapes=lo, opt_shapes=opt, max_shapes=hi,
                        fp16=fp16, timing_cache=ck.out_dir / "timing.cache")
    ck.cache[f"engine_{name}"] = info.engine_path
    return {"engine": str(info.engine_path), "build_s": round(time.perf_counter() - start, 1),
            "bytes": info.engine_path.stat().st_size, "tensorrt": info.tensorrt_version}


def engine_fp32_step(ck: Check) -> dict[str, Any]:
    return _build(ck, _needs(ck, "export_onnx"), "fp32", fp16=False)


def engine_fp16_step(ck: Check) -> dict[str, Any]:
    return _build(ck, _needs(ck, "export_onnx"), "fp16", fp16=True)


def engine_int8_step(ck: Check) -> dict[str, Any]:
    _needs(ck, "tensorrt")
    if ck.int8_onnx is None or not ck.int8_onnx.is_file():
        raise Skip("no Q/DQ ONNX given (--int8-onnx model.int8.onnx, written by export-engine --int8)")
    return _build(ck, ck.int8_onnx, "int8", fp16=False)


def _feed(ck: Check) -> dict[str, np.ndarray]:
    from frcnn.runtime.preprocess import batch_images

    ck.model()  # tests/ on sys.path
    from model_utils import random_images

    images, sizes = batch_images(random_images([(320, 448), (288, 512)], 6), 32)
    return {"images": images, "image_sizes": sizes}


def _parity(ck: Check, name: str, min_matched: float) -> dict[str, Any]:
    engine = _needs(ck, f"engine_{name}")
    from frcnn.export.polygraphy_runners import compare_detections
    from frcnn.runtime import Detector

    feed = _feed(ck)
    with Detector(engine) as trt_det, Detector(ck.cache["export_onnx"], providers=["cpu"]) as ort_det:
        got, want = trt_det.backend.infer(feed), ort_det.backend.infer(feed)
    report = compare_detections(want, got, min_iou=0.99, score_atol=1e-3)
    total = int(want["num_detections"].sum())
    rate = report.matched / total if total else 0.0
    result = {"detections_ort": total, "matched": report.matched, "match_rate": rate, "report": str(report)}
    if total == 0 or rate < min_matched:
        raise AssertionError(f"{name} engine vs ONNX Runtime: matched {report.matched}/{total} (< {min_matched})")
    return result


def parity_fp32_step(ck: Check) -> dict[str, Any]:
    return _parity(ck, "fp32", 1.0)


def parity_fp16_step(ck: Check) -> dict[str, Any]:
    return _parity(ck, "fp16", 0.9)  # provisional: fp16 moves scores near thresholds


def latency_step(ck: Check) -> dict[str, Any]:
    engine = _needs(ck, "engine_fp32")
    from frcnn.runtime import Detector

    feed = {k: v[:1] for k, v in _feed(ck).items()}
    out: dict[str, Any] = {"shape": list(feed["images"].shape)}
    for key, kwargs in (("plain", {}), ("cuda_graph", {"cuda_graph": True})):
        with Detector(engine, **kwargs) as det:
            for _ in range(5):
                det.backend.infer(feed)
            times = []
            for _ in range(50):
                start = time.perf_counter()
                det.backend.infer(feed)
                times.append((time.perf_counter() - start) * 1e3)
        out[key] = {"mean_ms": float(np.mean(times)), "p50_ms": float(np.percentile(times, 50)),
                    "p90_ms": float(np.percentile(times, 90))}
    return out


def soak_sizes() -> list[tuple[int, int]]:
    """20 distinct (H, W), multiples of 32 inside the engine profile."""
    hs, ws = (64, 128, 192, 256, 320), (160, 256, 352, 448)
    return [(h, w) for h in hs for w in ws][:SOAK_SIZES]


def _soak(ck: Check, engine: Any, sides: tuple[int, ...]) -> dict[str, Any]:
    torch = ck.cuda()
    from frcnn.runtime import Detector
    from frcnn.runtime.shape_buckets import pad_to_bucket

    rng = np.random.default_rng(0)
    sizes = soak_sizes()
    with Detector(engine) as det:
        det.backend.infer({"images": np.zeros((1, 3, 64, 64), np.uint8), "image_sizes": np.array([[64, 64]],
                                                                                                np.int32)})
        torch.cuda.synchronize()
        free_before = torch.cuda.mem_get_info()[0]
        shapes = set()
        for i in range(SOAK_CALLS):
            h, w = sizes[i % len(sizes)]
            images = rng.integers(0, 256, (1, 3, h, w), dtype=np.uint8)
            images = pad_to_bucket(images, sides) if sides else images
            shapes.add(images.shape)
            det.backend.infer({"images": images, "image_sizes": np.array([[h, w]], np.int32)})
        torch.cuda.synchronize()
        free_after = torch.cuda.mem_get_info()[0]
    return {"calls": SOAK_CALLS, "distinct_shapes": len(shapes),
            "device_free_mib_before": free_before / 2**20, "device_free_mib_after": free_after / 2**20,
            "growth_mib": (free_before - free_after) / 2**20}


def soak_step(ck: Check) -> dict[str, Any]:
    engine = _needs(ck, "engine_fp32")
    plain = _soak(ck, engine, ())
    bucketed = _soak(ck, engine, SOAK_BUCKETS)
    result = {"plain": plain, "shape_buckets": bucketed}
    if plain["growth_mib"] > LEAK_LIMIT_MIB:
        raise AssertionError(f"device memory fell by {plain['growth_mib']:.0f} MiB over {SOAK_CALLS} calls on "
                             f"{plain['distinct_shapes']} shapes (> {LEAK_LIMIT_MIB} MiB: leak, cf. "
                             f"NVIDIA/TensorRT#4849); with shape buckets: {bucketed['growth_mib']:.0f} MiB")
    return result


STEPS_B: list[tuple[str, Callable[[Check], dict[str, Any]]]] = [
    ("tensorrt", tensorrt_step), ("export_onnx", export_step), ("engine_fp32", engine_fp32_step),
    ("engine_fp16", engine_fp16_step), ("engine_int8", engine_int8_step), ("parity_fp32", parity_fp32_step),
    ("parity_fp16", parity_fp16_step), ("latency", latency_step), ("memory_soak", soak_step),
]
