"""PTX of every Triton kernel for sm_75/80/86/89/90/100/120, assembled by this machine's ``ptxas``.

Compilation runs in a child process without ``TRITON_INTERPRET`` (this file is also the child's script),
so the test does not depend on which mode other tests imported the kernels in.

- fast: both kernels, every arch, in small configurations (NMS candidate cap 256) -> ``ptxas -arch=sm_XX``
  (PTX ISA 8.0 up to sm_90, 8.6 for sm_100, 8.7 for sm_120); plus the cache (hit, key sensitivity,
  incomplete entries);
- launch safety: a deliberately bad kernel (a device-side TMA descriptor -> 128 B of global scratch on sm_90)
  must fail the build naming the kernel, the field and the fix; its twin without the descriptor builds;
  a Triton outside the checked range is refused; the ``plugins`` extra pins that range.
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

ARCHS = (75, 80, 86, 89, 90, 100, 120)
ISA = {75: "8.0", 80: "8.0", 86: "8.0", 89: "8.0", 90: "8.0", 100: "8.6", 120: "8.7"}


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
    # 600 s: the RPN NMS (cap 8192) takes ~15 s in ptxas on an idle 2-core CPU, over 120 s on a loaded one.
    proc = subprocess.run([PTXAS, f"-arch=sm_{arch}", str(path), "-o", str(tmp / "out.cubin")],
                          check=False, capture_output=True, text=True, timeout=600)
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
        assert f".version {ISA[r['arch']]}\n" in text
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

    with pytest.raises(UserError, match="supported compute capabilities"):
        ptx.compile_ptx(ptx.KernelSpec("x", "m", "k", {}, {}, 4), 70)
    with pytest.raises(UserError, match="supported compute capabilities"):
        ptx.compile_ptx(ptx.KernelSpec("x", "m", "k", {}, {}, 4), 110)  # Triton's LLVM would abort the process
    assert ptx.ptx_version_for(90) == 80 and ptx.ptx_version_for(100) == 86 and ptx.ptx_version_for(120, 88) == 88


BAD_KERNELS = '''
import triton
import triton.language as tl


@triton.jit
def tma_copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    desc = tl.make_tensor_descriptor(x_ptr, shape=[n], strides=[1], block_shape=[BLOCK])
    tl.store(y_ptr + tl.arange(0, BLOCK), desc.load([0]))


@triton.jit
def plain_copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)
'''
BAD_BUILD = '''
import sys
sys.path.insert(0, sys.argv[1])
from frcnn.plugins import ptx
from frcnn.runtime.errors import UserError
sig = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32"}
for kernel in ("plain_copy", "tma_copy"):
    spec = ptx.KernelSpec(kernel, "frcnn_test_bad_kernels", kernel, sig, {"BLOCK": 16}, 4)
    try:
        res = ptx.compile_ptx(spec, 90, cache_dir=sys.argv[2], ptx_version=86)
        print(kernel, "OK", res.kernel_name)
    except UserError as exc:
        print(kernel, "ERR", exc)
'''


def test_build_refuses_a_kernel_with_global_scratch(tmp_path):
    """tl.make_tensor_descriptor in the kernel body needs Triton's hidden global-scratch buffer (128 B on
    sm_90), which TensorRT's AOT launch passes as null: the build must stop with the field and the fix."""
    (tmp_path / "frcnn_test_bad_kernels.py").write_text(BAD_KERNELS)
    proc = subprocess.run([sys.executable, "-c", BAD_BUILD, str(tmp_path), str(tmp_path / "cache")],
                          env=_child_env(), check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
    assert lines["plain_copy"] == "OK plain_copy"  # same harness, no descriptor: builds
    assert lines["tma_copy"].startswith("ERR PTX build of tma_copy (frcnn_test_bad_kernels.tma_copy) for sm_90: "
                                        "global_scratch_size = 128, must be 0 for TensorRT's AOT plugin launch: "
                                        "TensorRT passes null"), lines["tma_copy"]
    assert "tl.make_tensor_descriptor" in lines["tma_copy"]
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1  # nothing cached for the refused kernel


@pytest.mark.parametrize(("field", "value"), [("global_scratch_size", 64), ("profile_scratch_size", 8),
                                              ("num_ctas", 2), ("launch_pdl", True),
                                              ("launch_cooperative_grid", True), ("tensordesc_meta", [{"x": 1}])])
def test_each_launch_field_is_checked(field, value):
    from frcnn.plugins.launch_safety import LAUNCH_FIELDS, check_launch_safety
    from frcnn.runtime.errors import UserError

    safe = {"global_scratch_size": 0, "profile_scratch_size": 0, "num_ctas": 1, "launch_pdl": False,
            "launch_cooperative_grid": False, "tensordesc_meta": []}
    assert set(safe) == set(LAUNCH_FIELDS)
    check_launch_safety(safe, "k")
    check_launch_safety({**safe, "tensordesc_meta": None}, "k")
    with pytest.raises(UserError, match=f"PTX build of k: {field} = "):
        check_launch_safety({**safe, field: value}, "k")
    with pytest.raises(UserError, match=f"launch field {field} was not recorded"):
        check_launch_safety({k: v for k, v in safe.items() if k != field}, "k")


def test_triton_version_range_is_enforced_and_pinned():
    import tomllib

    from frcnn.plugins.launch_safety import TRITON_REQUIREMENT, check_triton_version
    from frcnn.runtime.errors import UserError

    check_triton_version()  # the installed one (the suite's) is in range
    check_triton_version("3.5.0")
    check_triton_version("3.9.1")
    for bad in ("3.4.0", "3.10.0", "4.0.0"):
        with pytest.raises(UserError, match=f"Triton {bad} is outside the range .*triton>=3.5,<3.10"):
            check_triton_version(bad)
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    assert extras["plugins"] == [TRITON_REQUIREMENT] and TRITON_REQUIREMENT in extras["dev"]


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
