"""``frcnn plugins build``: PTX of every Triton kernel for every GPU architecture, plus a manifest.

    frcnn plugins build [--arch 75 80 86 89 90 100 120] [--output DIR] [--cache-dir DIR] [--ptx-version 80]

Writes ``DIR/<kernel config>.sm_<arch>.ptx`` and ``DIR/manifest.json`` (one entry per file: kernel entry
name, arch, sha256, size, shared memory, num_warps, signature, constexprs, PTX ISA version, Triton version)
and prints a table arch x kernel with the PTX size and whether it came from the cache. No GPU needed.
Before compiling anything it checks every ``--arch`` and the Triton version; every kernel's launch fields are
checked as it is compiled (frcnn.plugins.launch_safety). ``--ptx-version`` is raised per arch where the arch
needs a newer PTX ISA (sm_100: 8.6, sm_120: 8.7).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from frcnn.runtime.errors import UserError
from frcnn.runtime.fileio import atomic_write

__all__ = ["add_parser", "build"]

DEFAULT_OUTPUT = Path("build") / "frcnn-ptx"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``plugins`` (with its ``build`` sub-command) on the ``frcnn`` dispatcher."""
    from frcnn.plugins.ptx import DEFAULT_PTX_VERSION, SUPPORTED_ARCHS

    parser = subparsers.add_parser("plugins", help="build the plugins' PTX for GPU targets")
    sub = parser.add_subparsers(dest="plugins_command", metavar="ACTION")
    build_p = sub.add_parser("build", help="compile every Triton kernel to PTX for every --arch")
    build_p.add_argument("--arch", type=int, nargs="+", default=list(SUPPORTED_ARCHS),
                         help=f"compute capabilities (default: {' '.join(map(str, SUPPORTED_ARCHS))})")
    build_p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                         help=f"folder for the .ptx files and manifest.json (default: {DEFAULT_OUTPUT})")
    build_p.add_argument("--cache-dir", type=Path, default=None,
                         help="PTX cache folder (default: $FRCNN_CACHE_DIR/ptx or ~/.cache/frcnn/ptx)")
    build_p.add_argument("--ptx-version", type=int, default=DEFAULT_PTX_VERSION,
                         help=f"PTX ISA version, 10 * major + minor (default: {DEFAULT_PTX_VERSION})")
    build_p.set_defaults(func=_run_build)
    return parser


def build(archs: list[int], output: Path, cache_dir: Path | None = None, ptx_version: int | None = None) -> dict:
    """Compile :func:`frcnn.plugins.ptx.default_specs` for ``archs`` into ``output``; returns the manifest."""
    import triton
    from frcnn.plugins import ptx as ptxmod
    from frcnn.plugins.launch_safety import check_triton_version

    version = ptxmod.DEFAULT_PTX_VERSION if ptx_version is None else ptx_version
    for arch in archs:
        ptxmod.ptx_version_for(arch, version)
    check_triton_version()
    output.mkdir(parents=True, exist_ok=True)
    entries = []
    for spec in ptxmod.default_specs():
        for arch in archs:
            res = ptxmod.compile_ptx(spec, arch, cache_dir=cache_dir, ptx_version=version)
            fname = f"{spec.name}.sm_{arch}.ptx"
            data = res.ptx.encode()
            atomic_write(output / fname, data)
            entries.append({
                "spec": spec.name, "module": spec.module, "kernel_name": res.kernel_name, "arch": arch,
                "file": fname, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                "shared_mem": res.shared_mem, "num_warps": res.num_warps, "num_params": res.num_params,
                "signature": spec.signature,
                "constexprs": {k: ptxmod._json_value(v) for k, v in spec.constexprs.items()},
                "ptx_version": res.ptx_version, "cache_hit": res.cache_hit,
            })
    manifest = {"triton_version": triton.__version__, "archs": archs, "kernels": entries}
    atomic_write(output / "manifest.json", json.dumps(manifest, indent=2).encode())
    return manifest


def _print_table(manifest: dict) -> None:
    archs = manifest["archs"]
    specs = list(dict.fromkeys(e["spec"] for e in manifest["kernels"]))
    cell = {(e["spec"], e["arch"]): f"{e['bytes'] / 1024:.0f} KiB {'hit' if e['cache_hit'] else 'new'}"
            for e in manifest["kernels"]}
    width = max(len(s) for s in specs)
    print(f"{'kernel':<{width}}  " + "  ".join(f"{'sm_' + str(a):>12}" for a in archs))
    for s in specs:
        print(f"{s:<{width}}  " + "  ".join(f"{cell[(s, a)]:>12}" for a in archs))


def _run_build(args: argparse.Namespace) -> int:
    from frcnn.plugins.ptx import SUPPORTED_ARCHS

    unknown = [a for a in args.arch if a not in SUPPORTED_ARCHS]
    if unknown:
        raise UserError(f"--arch {' '.join(map(str, unknown))}: not a supported compute capability; use some of "
                        f"{' '.join(map(str, SUPPORTED_ARCHS))}")
    manifest = build(list(args.arch), args.output, args.cache_dir, args.ptx_version)
    _print_table(manifest)
    print(f"wrote {len(manifest['kernels'])} PTX files and manifest.json to {args.output}")
    return 0
