"""PTX of every Triton kernel for sm_75/80/86/89/90, assembled by this machine's ``ptxas``.

Compilation runs in a child process without ``TRITON_INTERPRET`` (this file is also the child's script),
so the test does not depend on which mode other tests imported the kernels in.

- fast: both kernels, every arch, in small configurations (NMS candidate cap 256) -> ``ptxas -arch=sm_XX``;
  plus the cache (hit, key sensitivity, incomplete entries).
- slow: ``frcnn plugins build`` of the shipped configurations (cap 4096 head NMS ~20 s, cap 8192 RPN NMS ~25-40 s per arch on
  a 2-core CPU when the cache is cold) -> manifest + ``ptxas`` on every file.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ARCHS = (75, 80, 86, 89, 90)


def _ptxas() -> str | None:
    found = shutil.which("ptxas")
    if found:
        return found
    candidates = sorted(glob.glob("/usr/local/cuda*/bin/ptxas"))
    return candidates[-1] if candidates else None


PTXAS = _ptxas()
needs_ptxas = pytest.mark.skipif(PTXAS is None, reason="ptxas not found (PATH or /usr/local/cuda*/bin): "
                                                        "install the CUDA toolkit to assemble PTX")


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _small_specs():
    from frcnn.plugins import ptx

    return [ptx.roi_align_v2_spec("fp16"), ptx.roi_align_v2_spec("fp32", output_size=5, sampling_ratio=2),
            ptx.batched_nms_spec(0.5, 0.05, 100, max_candidates=256, name="batched_nms_small")]


def _worker(out_dir: str) -> None:
    """Child: compile the small specs for every arch into out_dir, twice (cold, then from the cache)."""
    from frcnn.plugins import ptx

    out = Path(out_dir)
    cache = out / "cache"
    records = []
    for spec in _small_specs():
        for arch in ARCHS:
            first = ptx.compile_ptx(spec, arch, cache_dir=cache)
            again = ptx.compile_ptx(spec, arch, cache_dir=cache)
            fname = f"{spec.name}.sm_{arch}.ptx"
            (out / fname).write_text(first.ptx)
            records.append({"file": fname, "arch": arch, "kernel": first.kernel_name, "hit": [first.cache_hit,
                            again.cache_hit], "same": first.ptx == again.ptx, "params": first.num_params,
                            "key": ptx.cache_key(spec, arch), "warps": first.num_warps})
    (out / "records.json").write_text(json.dumps(records))


def _assemble(path: Path, arch: int, tmp: Path) -> None:
    proc = subprocess.run([PTXAS, f"-arch=sm_{arch}", str(path), "-o", str(tmp / "out.cubin")],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"ptxas -arch=sm_{arch} {path.name}: {proc.stderr[-2000:]}"


@pytest.fixture(scope="module")
def small_build(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("ptx_small")
    proc = subprocess.run([sys.executable, __file__, str(out)], env=_child_env(), check=False, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads((out / "records.json").read_text())


@needs_ptxas
def test_every_kernel_every_arch_assembles(small_build, tmp_path):
    out, records = small_build
    assert {(r["kernel"], r["arch"]) for r in records} == {
        (k, a) for k in ("roi_align_v2_kernel", "batched_nms_kernel") for a in ARCHS}
    for r in records:
        text = (out / r["file"]).read_text()
        assert f".target sm_{r['arch']}\n" in text  # portable target (no sm_90a)
        assert ".version 8.0" in text
        _assemble(out / r["file"], r["arch"], tmp_path)


def test_cache_hits_and_keys(small_build):
    _, records = small_build
    assert all(r["hit"] == [False, True] and r["same"] for r in records)
    assert len({r["key"] for r in records}) == len(records)  # arch / dtype / constexprs all change the key
    for r in records:
        # TensorRT AOT order: ROIAlign 5 inputs + 10 int32 extras + 1 output; NMS 3 + 1 + 2; Triton adds 2.
        assert r["params"] == (16 if r["kernel"] == "roi_align_v2_kernel" else 6) + 2
        assert r["warps"] == (4 if r["kernel"] == "roi_align_v2_kernel" else 32)


def test_incomplete_cache_entry_is_rebuilt(small_build):
    out, records = small_build
    cache = out / "cache"
    key = records[0]["key"]
    meta = cache / f"{key}.json"
    meta.unlink()  # an interrupted write leaves the .ptx without its .json
    code = ("import sys; from frcnn.plugins import ptx; s = ptx.roi_align_v2_spec('fp16'); "
            f"r = ptx.compile_ptx(s, {records[0]['arch']}, cache_dir=sys.argv[1]); print(r.cache_hit)")
    proc = subprocess.run([sys.executable, "-c", code, str(cache)], env=_child_env(), check=False, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False" and meta.is_file()


def test_bad_arch_is_a_user_error():
    from frcnn.plugins import ptx
    from frcnn.runtime.errors import UserError

    with pytest.raises(UserError, match="compute capability"):
        ptx.compile_ptx(ptx.KernelSpec("x", "m", "k", {}, {}, 4), 70)


@pytest.mark.slow
@needs_ptxas
def test_cli_build_of_shipped_configs(tmp_path):
    out = tmp_path / "ptx"
    cmd = [sys.executable, "-m", "frcnn.runtime.cli", "plugins", "build", "--output", str(out), "--arch",
           *map(str, ARCHS)]
    proc = subprocess.run(cmd, env=_child_env(), check=False, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "sm_90" in proc.stdout and "batched_nms_rpn" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    specs = {"roi_align_v2_fp32", "roi_align_v2_fp16", "roi_align_v2_mask_fp32", "roi_align_v2_mask_fp16",
             "batched_nms_rpn", "batched_nms_head"}
    assert {(e["spec"], e["arch"]) for e in manifest["kernels"]} == {(s, a) for s in specs for a in ARCHS}
    for e in manifest["kernels"]:
        assert (out / e["file"]).stat().st_size == e["bytes"]
        _assemble(out / e["file"], e["arch"], tmp_path)


if __name__ == "__main__":
    _worker(sys.argv[1])
