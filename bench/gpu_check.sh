#!/usr/bin/env bash
# One-command GPU check (docs/gpu-deployment.md, "GPU check"): part (a) CUDA torch + Triton, part (b) TensorRT.
#
#   bash bench/gpu_check.sh [OUT_DIR] [--int8-onnx model.int8.onnx]
#
# Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.log (default OUT_DIR: build/gpu-check). Every step that
# cannot run is recorded as skipped with its reason; the script exits 0 unless the JSON could not be written.
# Hard limit: 570 s of wall time for the Python part (steps are skipped once 540 s are spent).
set -u
cd "$(dirname "$0")/.."
out_dir="build/gpu-check"
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then out_dir="$1"; shift; fi
mkdir -p "$out_dir" || { echo "gpu_check: cannot create $out_dir" >&2; exit 2; }
log="$out_dir/gpu_check.log"
python="${PYTHON:-python}"
{
  echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader
  else
    echo "nvidia-smi: not found (no NVIDIA driver on this machine)"
  fi
  timeout -k 10 570 "$python" bench/gpu_check.py --out-dir "$out_dir" --budget-s 540 "$@"
  echo "gpu_check.py exit status $?"
} 2>&1 | tee "$log"
if [ ! -s "$out_dir/gpu_check.json" ]; then
  echo "gpu_check: $out_dir/gpu_check.json was not written (see $log)" >&2
  exit 1
fi
exit 0
