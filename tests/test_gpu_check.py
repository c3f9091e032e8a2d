"""bench/gpu_check.sh on a machine without an NVIDIA GPU: exits 0, writes the JSON + log, and records every
GPU step as skipped with its reason (the same script runs the checks on a GPU machine)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = {"a": ["env", "kernels_vs_torch", "kernel_time_vs_floor", "model_cuda_vs_cpu", "mask_model_cuda_vs_cpu"],
         "b": ["tensorrt", "export_onnx", "engine_fp32", "engine_fp16", "engine_int8", "parity_fp32",
               "parity_fp16", "latency", "memory_soak"]}


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None,
                    reason="an NVIDIA GPU is present: run `bash bench/gpu_check.sh` itself (about 10 minutes)")
def test_gpu_check_without_gpu_skips_each_step_with_its_reason(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    steps = {(s["part"], s["name"]): s for s in report["steps"]}
    assert list(steps) == [(p, n) for p, names in STEPS.items() for n in names]
    assert steps[("a", "env")]["status"] == "pass" and "no NVIDIA GPU" in steps[("a", "env")]["result"]["gpu"]
    for (part, name), step in steps.items():
        if name == "env":
            continue
        assert step["status"] == "skipped", step
        first = name in ("kernels_vs_torch", "kernel_time_vs_floor", "model_cuda_vs_cpu", "mask_model_cuda_vs_cpu",
                        "tensorrt")
        want = "no NVIDIA GPU" if first else "needs step "
        assert step["reason"].startswith(want), step
        assert f"[{part}] {name}" in log and step["reason"] in log
    assert report["summary"] == {"pass": 1, "fail": 0, "error": 0, "skipped": sum(map(len, STEPS.values())) - 1}


def test_ptx_launch_check_builds_what_tensorrt_gets_and_skips_without_a_gpu(tmp_path: Path) -> None:
    """bench/ptx_launch_check.py: `build` writes the plugin's PTX (the same compile_ptx the TensorRT AOT plugin
    calls) with the launch facts a launcher needs; `run` without a GPU or CuPy checks nothing and says why."""
    script = str(REPO / "bench" / "ptx_launch_check.py")
    built = subprocess.run([sys.executable, script, "build", str(tmp_path), "--arch", "90", "--only",
                            "batched_nms_head"], capture_output=True, text=True, timeout=600, check=False)
    assert built.returncode == 0, built.stderr[-2000:]
    (entry,) = json.loads((tmp_path / "manifest.json").read_text())
    ptx = (tmp_path / "batched_nms_head.ptx").read_text()
    assert entry["spec"] == "batched_nms_head" and f".entry {entry['entry']}(" in ptx
    assert ".target sm_90\n" in ptx
    # inputs, the int32 extra and outputs of the signature, then Triton's two hidden scratch pointers (null)
    assert entry["num_params"] == len(entry["signature"]) + 2
    if shutil.which("nvidia-smi") is None:
        ran = subprocess.run([sys.executable, script, "run", str(tmp_path)], capture_output=True, text=True,
                             timeout=300, check=False)
        assert ran.returncode == 0 and "ptx_launch_check: skipped:" in ran.stdout, ran.stdout + ran.stderr
