"""The shipped PTX launched on a GPU the way TensorRT's AOT plugin path launches it — without TensorRT.

What ``@trtp.aot_impl`` hands TensorRT (plugins/*/trt_plugin.py) is PTX text plus launch parameters: grid,
block = 32 * num_warps, dynamic shared memory, and the kernel arguments (inputs..., int32 extras...,
outputs...), with Triton's two hidden scratch pointers left for TensorRT to pad with null. This script builds
that PTX with ``frcnn.plugins.ptx`` (anywhere, no GPU) and, on a GPU, loads it with the CUDA driver (CuPy's
``RawModule``: cuModuleLoad of the PTX text, JIT-assembled by the driver), launches it with exactly those
parameters and null scratch pointers, and compares the outputs with the torch reference ops: ROIAlignV2
against a float64 reference (fp32 <= 1e-5, fp16 <= 1e-2), NMS indices exactly.

    python bench/ptx_launch_check.py build DIR [--arch 90]     # PTX of every shipped kernel + manifest.json
    python bench/ptx_launch_check.py run DIR [--json OUT]      # on the GPU: torch (CUDA) + cupy; exit 1 on a failure

``run`` without a GPU or without CuPy prints why and exits 0 (nothing was checked).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import ROI_FP16_TOL, ROI_FP32_TOL  # found through the path entry above

TOLERANCE = {"*fp32": ROI_FP32_TOL, "*fp16": ROI_FP16_TOL}
"""ROIAlignV2 max |PTX - float64 reference| by feature dtype: the tolerances of bench/gpu_check.py's JIT check."""


def build(out: Path, arch: int, only: list[str] | None) -> list[dict[str, Any]]:
    """Write ``out/<spec>.ptx`` for each shipped kernel (or the ``only`` ones) and ``out/manifest.json``."""
    from frcnn.plugins.ptx import compile_ptx, default_specs

    out.mkdir(parents=True, exist_ok=True)
    manifest = []
    for spec in default_specs():
        if only and spec.name not in only:
            continue
        compiled = compile_ptx(spec, arch)
        (out / f"{spec.name}.ptx").write_text(compiled.ptx)
        manifest.append({"spec": spec.name, "kernel": spec.kernel, "entry": compiled.kernel_name, "arch": arch,
                         "signature": dict(spec.signature), "constexprs": {k: repr(v) if isinstance(v, float)
                         else v for k, v in spec.constexprs.items()}, "num_warps": compiled.num_warps,
                         "shared_mem": compiled.shared_mem, "num_params": compiled.num_params})  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _pointer(t: Any) -> np.uint64:
    return np.uint64(t.data_ptr())


def _launch(cupy: Any, folder: Path, entry: dict[str, Any], args: list[Any], grid: tuple[int, int, int]) -> None:
    """Load the PTX and launch it as TensorRT would: hidden scratch parameters passed as null pointers."""
    kernel = cupy.RawModule(path=str(folder / f"{entry['spec']}.ptx")).get_function(entry["entry"])
    hidden = entry["num_params"] - len(entry["signature"])
    if entry["shared_mem"] > 48 * 1024:
        kernel.max_dynamic_shared_size_bytes = entry["shared_mem"]
    kernel(grid, (32 * entry["num_warps"], 1, 1), (*args, *[np.uint64(0)] * hidden), shared_mem=entry["shared_mem"])
    cupy.cuda.runtime.deviceSynchronize()


def check_roi(cupy: Any, torch: Any, folder: Path, entry: dict[str, Any]) -> dict[str, Any]:
    from frcnn.plugins.roi_align_v2.torch_op import roi_align_v2
    from gpu_check import _features, _rois

    c = entry["constexprs"]
    size, block = int(c["OUTPUT_SIZE"]), int(c["BLOCK_SIZE"])
    dtype = {"*fp32": torch.float32, "*fp16": torch.float16}[entry["signature"]["p2_ptr"]]
    feats, rois = _features(torch, 256, (200, 304), dtype), _rois(torch, 1000, (200, 304))
    b, r, ch = 1, rois.shape[1], feats[0].shape[1]
    out = torch.full((b, r, ch, size, size), float("nan"), dtype=dtype, device="cuda")
    sizes = [np.int32(d) for f in feats for d in f.shape[2:]]
    grid = (b * r, -(-ch * size * size // block), 1)
    _launch(cupy, folder, entry, [_pointer(rois), *map(_pointer, feats), np.int32(r), np.int32(ch), *sizes,
                                  _pointer(out)], grid)  # fmt: skip
    exact = roi_align_v2(rois.cpu().double(), [f.cpu().double() for f in feats], output_size=size)
    err = float((out.cpu().double() - exact).abs().max())
    tol = TOLERANCE[entry["signature"]["p2_ptr"]]
    return {"max_abs_err_vs_fp64": err, "tolerance": tol, "pass": err <= tol}


def check_nms(cupy: Any, torch: Any, folder: Path, entry: dict[str, Any]) -> dict[str, Any]:
    from frcnn.plugins.batched_nms.torch_op import batched_nms
    from gpu_check import _nms_inputs

    c = entry["constexprs"]
    rpn = "rpn" in entry["spec"]
    n = min(int(c["CAP"]), 5000 if rpn else 4000)
    boxes, scores, groups = _nms_inputs(torch, n, 5 if rpn else 80, seed=2)
    num = torch.full((1,), -7, dtype=torch.int32, device="cuda")
    idx = torch.full((1, int(c["MAX_OUTPUT"])), -7, dtype=torch.int32, device="cuda")
    on_gpu = [t.cuda().contiguous() for t in (boxes, scores, groups)]
    _launch(cupy, folder, entry, [*map(_pointer, on_gpu), np.int32(n), _pointer(num), _pointer(idx)], (1, 1, 1))
    ref_num, ref_idx = batched_nms(boxes, scores, groups, float(c["IOU_THRESHOLD"]), float(c["SCORE_THRESHOLD"]),
                                   int(c["MAX_OUTPUT"]))  # fmt: skip
    same = bool(torch.equal(num.cpu(), ref_num) and torch.equal(idx.cpu(), ref_idx))
    return {"candidates": n, "kept": int(ref_num[0]), "exact": same, "pass": same}


def run(folder: Path) -> tuple[list[dict[str, Any]], str | None]:
    """(one record per kernel, None) or ([], why nothing was checked)."""
    try:
        import cupy
        import torch
    except ImportError as exc:
        return [], f"needs torch and cupy ({exc})"
    if not torch.cuda.is_available():
        return [], "no NVIDIA GPU (torch.cuda.is_available() is False)"
    records = []
    for entry in json.loads((folder / "manifest.json").read_text()):
        entry["constexprs"] = {k: float(v) if isinstance(v, str) else v for k, v in entry["constexprs"].items()}
        check = check_roi if entry["kernel"] == "roi_align_v2_kernel" else check_nms
        try:
            result = check(cupy, torch, folder, entry)
        except Exception as exc:  # noqa: BLE001 - a launch failure is the finding, recorded per kernel
            result = {"pass": False, "error": f"{type(exc).__name__}: {exc}"}
        records.append({"spec": entry["spec"], "arch": entry["arch"], "hidden_null_params":
                        entry["num_params"] - len(entry["signature"]), **result})  # fmt: skip
        print(f"{entry['spec']:24} sm_{entry['arch']}  {'PASS' if result['pass'] else 'FAIL'}  "
              f"{ {k: v for k, v in result.items() if k != 'pass'} }", flush=True)
    return records, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="PTX of the shipped kernels + manifest.json (no GPU needed)")
    b.add_argument("dir", type=Path)
    b.add_argument("--arch", type=int, default=90)
    b.add_argument("--only", nargs="*", help="spec names (default: all of frcnn.plugins.ptx.default_specs)")
    r = sub.add_parser("run", help="launch them on the GPU and compare with the torch references")
    r.add_argument("dir", type=Path)
    r.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.command == "build":
        for e in build(args.dir, args.arch, args.only):
            print(f"{e['spec']:24} sm_{e['arch']}  {e['entry']}  shared {e['shared_mem']} B  params {e['num_params']}")
        return 0
    records, skipped = run(args.dir)
    if skipped:
        print(f"ptx_launch_check: skipped: {skipped}")
        return 0
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    return 0 if all(rec["pass"] for rec in records) else 1


if __name__ == "__main__":
    sys.exit(main())
