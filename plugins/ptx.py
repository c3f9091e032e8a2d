"""Ahead-of-time PTX of the Triton kernels, one per (kernel configuration, GPU architecture).

No GPU is needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32), options=...)``
lowers to PTX for any target. Choices (docs/ops.md, "Triton kernel"):

- ``ptx_version`` is pinned (default 8.0, CUDA 12.0 drivers and newer) so that both the CUDA 13.0 ``ptxas``
  of the build machine and older deployment drivers accept the text;
- ``enable_fp_fusion=False``: no mul+add contraction, so the kernels round like the CPU references;
- Triton targets ``sm_90a`` for arch 90; the kernels use no arch-specific instructions, so the target line
  is written as ``sm_90`` (runs on every sm_90 part and stays forward-compatible; ``ptxas`` checks it);
- results are cached under :func:`default_cache_dir`, keyed by a SHA-256 of the kernel module's source,
  arch, Triton version, signature, constexprs and options; entries are written atomically.

- Blackwell: sm_100 needs PTX ISA 8.6 and sm_120 ISA 8.7 (Triton's LLVM aborts the process on a lower
  version, so :func:`ptx_version_for` raises the version per arch before compiling).

Kernel entry points follow TensorRT's AOT plugin convention ``(inputs..., int32 extras..., outputs...)``;
Triton (>= 3.3) appends two hidden pointer parameters (global and profile scratch) after them. TensorRT's AOT
launch does not pass them (it pads missing arguments with null), so every compiled kernel is checked by
:func:`check_launch_safety` (frcnn.plugins.launch_safety): zero scratch, one CTA per cluster, no PDL, no
cooperative launch, no host tensor descriptors — else the build fails naming the kernel, field and fix.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from frcnn.plugins import KERNEL_COMPILE_OPTIONS
from frcnn.plugins.launch_safety import check_launch_safety, check_triton_version, launch_fields
from frcnn.runtime.cache_dir import cache_dir
from frcnn.runtime.errors import UserError
from frcnn.runtime.fileio import atomic_write

__all__ = [
    "DEFAULT_PTX_VERSION",
    "SUPPORTED_ARCHS",
    "CompiledPTX",
    "KernelSpec",
    "batched_nms_spec",
    "compile_ptx",
    "default_cache_dir",
    "default_specs",
    "ptx_version_for",
    "roi_align_v2_spec",
]

SUPPORTED_ARCHS = (75, 80, 86, 89, 90, 100, 120)
DEFAULT_PTX_VERSION = 80
MIN_PTX_VERSION = {75: 80, 80: 80, 86: 80, 89: 80, 90: 80, 100: 86, 120: 87}
"""Lowest PTX ISA (10 * major + minor) this build uses per arch: 8.0 up to sm_90, 8.6 for sm_100, 8.7 for
sm_120 (the first ISA versions that know those targets; checked with CUDA 13.0's ptxas)."""
_ROI_MODULE = "frcnn.plugins.roi_align_v2.triton_kernel"
_NMS_MODULE = "frcnn.plugins.batched_nms.triton_kernel"


@dataclass(frozen=True)
class KernelSpec:
    """One kernel configuration: the Triton function, its argument types and its compile-time constants."""

    name: str
    module: str
    kernel: str
    signature: dict[str, str]
    constexprs: dict[str, int | float | bool]
    num_warps: int


@dataclass(frozen=True)
class CompiledPTX:
    """PTX of one spec for one arch, with what a launcher needs (block = 32 * num_warps threads)."""

    spec: str
    arch: int
    kernel_name: str
    ptx: str
    shared_mem: int
    num_warps: int
    ptx_version: int
    cache_hit: bool
    num_params: int = field(default=0)


def _module(name: str):
    return importlib.import_module(name)


def roi_align_v2_spec(feature_dtype: str = "fp32", rois_dtype: str = "fp32", name: str = "roi_align_v2",
                      **attrs) -> KernelSpec:  # fmt: skip
    """ROIAlignV2 kernel for features of ``feature_dtype`` ("fp32" / "fp16"); attrs as the op's (defaults)."""
    if feature_dtype not in ("fp32", "fp16") or rois_dtype not in ("fp32", "fp16"):
        raise UserError(f"roi_align_v2: dtypes must be fp32 or fp16, got {feature_dtype}, {rois_dtype}")
    mod = _module(_ROI_MODULE)
    return KernelSpec(
        name=f"{name}_{feature_dtype}", module=_ROI_MODULE, kernel="roi_align_v2_kernel",
        signature=mod.signature(feature_dtype, rois_dtype), constexprs=mod.constexprs(**attrs),
        num_warps=mod.NUM_WARPS,
    )


def batched_nms_spec(
    iou_threshold: float, score_threshold: float, max_output: int, max_candidates: int | None = None,
    name: str = "batched_nms",
) -> KernelSpec:
    """BatchedNMS kernel with the op's attributes baked in (fp32 boxes/scores, int32 groups)."""
    mod = _module(_NMS_MODULE)
    cap = mod.MAX_CANDIDATES if max_candidates is None else max_candidates
    return KernelSpec(
        name=name, module=_NMS_MODULE, kernel="batched_nms_kernel", signature=mod.signature(),
        constexprs=mod.constexprs(iou_threshold, score_threshold, max_output, cap), num_warps=mod.NUM_WARPS,
    )


def default_specs() -> list[KernelSpec]:
    """The configurations of the R50-FPN detector: ROIAlignV2 fp32/fp16 (box pooler 7x7, Mask R-CNN's mask
    pooler 14x14), NMS of the RPN and of the head."""
    return [
        roi_align_v2_spec("fp32"),
        roi_align_v2_spec("fp16"),
        roi_align_v2_spec("fp32", name="roi_align_v2_mask", output_size=14),
        roi_align_v2_spec("fp16", name="roi_align_v2_mask", output_size=14),
        # RPN: 5 levels x PRE_NMS_TOPK_TEST 1000 candidates -> cap 8192 (what trainer/modeling/rpn.py writes).
        batched_nms_spec(0.7, float("-inf"), 1000, max_candidates=8192, name="batched_nms_rpn"),
        batched_nms_spec(0.5, 0.05, 100, name="batched_nms_head"),
    ]


def default_cache_dir() -> Path:
    """``$FRCNN_CACHE_DIR/ptx``, else ``$XDG_CACHE_HOME/frcnn/ptx``, else ``~/.cache/frcnn/ptx``
    (:func:`frcnn.runtime.cache_dir.cache_dir`)."""
    return cache_dir("ptx")


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    return v


def ptx_version_for(arch: int, requested: int = DEFAULT_PTX_VERSION) -> int:
    """The PTX ISA version used for ``sm_<arch>``: ``requested``, raised to :data:`MIN_PTX_VERSION` of the arch.

    Raises UserError for an arch outside :data:`SUPPORTED_ARCHS` (Triton would abort the process on an ISA
    version that does not know the target).
    """
    if not isinstance(arch, int) or arch not in MIN_PTX_VERSION:
        raise UserError(f"PTX arch must be one of the supported compute capabilities "
                        f"{' '.join(map(str, SUPPORTED_ARCHS))} (e.g. 80 or 90), got {arch!r}")
    return max(int(requested), MIN_PTX_VERSION[arch])


def _options(spec: KernelSpec, ptx_version: int) -> dict:
    return {"num_warps": spec.num_warps, "ptx_version": ptx_version, **KERNEL_COMPILE_OPTIONS}


def cache_key(spec: KernelSpec, arch: int, ptx_version: int = DEFAULT_PTX_VERSION) -> str:
    """SHA-256 of everything the PTX depends on."""
    import triton

    source = Path(_module(spec.module).__file__).read_bytes()
    meta = {
        "kernel": spec.kernel, "arch": arch, "triton": triton.__version__, "signature": spec.signature,
        "constexprs": {k: _json_value(v) for k, v in spec.constexprs.items()},
        "options": _options(spec, ptx_version), "ptx_rewrite": 1, "launch_checked": 1,
    }
    h = hashlib.sha256(source)
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()


def _triton_compile(spec: KernelSpec, arch: int, ptx_version: int) -> tuple[str, str, int, dict]:
    """(ptx, kernel name, shared memory bytes, launch fields) from Triton; UserError for an unsafe kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = getattr(_module(spec.module), spec.kernel)
    if not isinstance(fn, JITFunction):
        raise UserError(
            f"{spec.module}.{spec.kernel} was imported with TRITON_INTERPRET=1 (interpreter mode); PTX needs "
            "the compiler: unset TRITON_INTERPRET and run again."
        )
    src = ASTSource(fn, dict(spec.signature), dict(spec.constexprs))
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=_options(spec, ptx_version))
    ptx = compiled.asm["ptx"]
    # Arch-specific ("a") target -> portable target; valid because the kernels use no sm_XXa instructions.
    ptx = re.sub(rf"^\.target sm_{arch}a\b", f".target sm_{arch}", ptx, count=1, flags=re.MULTILINE)
    fields = launch_fields(compiled.metadata, f"{spec.name} ({spec.module}.{spec.kernel}) for sm_{arch}")
    check_launch_safety(fields, f"{spec.name} ({spec.module}.{spec.kernel}) for sm_{arch}")
    return ptx, compiled.metadata.name, int(compiled.metadata.shared), fields


def compile_ptx(
    spec: KernelSpec, arch: int, cache_dir: Path | str | None = None, ptx_version: int = DEFAULT_PTX_VERSION
) -> CompiledPTX:
    """PTX of ``spec`` for ``sm_<arch>``, from the cache when present.

    Args:
        arch: compute capability as an int (75 = sm_75), one of :data:`SUPPORTED_ARCHS`.
        cache_dir: cache folder (default :func:`default_cache_dir`).
        ptx_version: PTX ISA version, raised per arch by :func:`ptx_version_for`.
    Raises:
        UserError: unsupported arch, a Triton outside the checked range, or a kernel whose launch TensorRT's AOT
            path cannot honour (:func:`frcnn.plugins.launch_safety.check_launch_safety`; cache hits re-checked).
    """
    ptx_version = ptx_version_for(arch, ptx_version)
    check_triton_version()
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = cache_key(spec, arch, ptx_version)
    ptx_path, meta_path = folder / f"{key}.ptx", folder / f"{key}.json"
    if meta_path.is_file() and ptx_path.is_file():
        meta = json.loads(meta_path.read_text())
        ptx, hit = ptx_path.read_text(), True
        check_launch_safety(meta.get("launch", {}), f"{spec.name} for sm_{arch} (cached {meta_path})")
    else:
        ptx, name, shared, fields = _triton_compile(spec, arch, ptx_version)
        meta = {"kernel_name": name, "shared_mem": shared, "launch": fields}
        atomic_write(ptx_path, ptx)
        atomic_write(meta_path, json.dumps(meta))  # written last: its presence marks a complete entry
        hit = False
    entry = re.search(r"\.entry\s+\w+\s*\((.*?)\)", ptx, flags=re.DOTALL)
    params = len(re.findall(r"\.param\s", entry.group(1))) if entry else 0
    return CompiledPTX(
        spec=spec.name, arch=arch, kernel_name=meta["kernel_name"], ptx=ptx, shared_mem=meta["shared_mem"],
        num_warps=spec.num_warps, ptx_version=ptx_version, cache_hit=hit, num_params=params,
    )
