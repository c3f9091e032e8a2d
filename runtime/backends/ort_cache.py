"""Pre-optimised ONNX Runtime graphs, cached per machine: what ``OnnxRuntimeBackend(low_memory=True)`` loads.

ONNX Runtime's graph optimiser holds a second copy of the weights while it rewrites the graph; that copy sets
a session's peak RSS (R50-FPN fp32 at 800x1216: docs/int8.md, "Memory options"). A graph optimised once at
``ORT_ENABLE_ALL``, saved, and loaded with optimisations off (``ORT_DISABLE_ALL``) never makes the copy.

Cache entry: ``<folder>/<key>.onnx``, folder ``cache_dir`` or ``frcnn.runtime.cache_dir.cache_dir("ort")``
(``$FRCNN_CACHE_DIR/ort``, ``$XDG_CACHE_HOME/frcnn/ort``, ``~/.cache/frcnn/ort``); never beside the user's
model. ``ORT_ENABLE_ALL`` output is specific to the hardware and the ORT build (layout transforms such as
NCHWc blocks sized to the CPU's vector width, kernels ORT picks by ISA), so the key is the SHA-256 of:

- the model file's bytes (a copy of the model elsewhere hits the same entry; any edit misses);
- the onnxruntime version;
- :func:`cpu_fingerprint`: the machine type and the CPU feature flags the kernel reports;
- the optimisation level, the execution provider and :data:`CACHE_FORMAT`.

A miss is built in a child process (``python -m frcnn.runtime.backends.ort_cache MODEL ENTRY``), so the
caller's own peak RSS never includes the optimiser's double copy; the child writes through
``frcnn.runtime.fileio.atomic_path`` (pid-tagged temp file + rename), so processes racing on one miss each end
with a complete entry. Models that keep weights in external data files are not cached (their bytes are not in
the key). Child exit codes: 0 built, 2 the model is not a loadable frcnn ONNX model, 3 not cacheable.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

from frcnn.runtime.cache_dir import cache_dir as frcnn_cache_dir
from frcnn.runtime.errors import UserError
from frcnn.runtime.fileio import atomic_path

CACHE_KIND = "ort"
CACHE_FORMAT = 1
"""Bumped whenever what this module writes changes, so older entries are never read."""
OPTIMIZATION_LEVEL = "ORT_ENABLE_ALL"
PROVIDER = "CPUExecutionProvider"
MODEL_REJECTED_EXIT = 2
NOT_CACHEABLE_EXIT = 3


class OptimizeError(UserError):
    """The pre-optimised graph could not be built or stored; ``model_rejected``: the model itself is bad."""

    def __init__(self, message: str, model_rejected: bool = False) -> None:
        super().__init__(message)
        self.model_rejected = model_rejected


class CacheEntry(NamedTuple):
    """A usable cache entry: its path, and whether this call built it (False: it was already there)."""

    path: Path
    built: bool


def cpu_fingerprint() -> str:
    """SHA-256 (16 hex digits) of the machine type and the CPU's feature flags.

    Linux: the first ``flags`` (x86) or ``Features`` (Arm) line of /proc/cpuinfo, as a sorted set, i.e. the
    ISA extensions ORT chooses kernels and layouts by (AVX2 / AVX-512 / VNNI / AMX ...). The flags also
    name a few kernel features, so a kernel upgrade may cost one rebuild; it never lets a different ISA hit.
    Elsewhere: ``platform.machine()`` and ``platform.processor()``.
    """
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() in ("flags", "Features"):
                    flags = " ".join(sorted(set(value.split())))
                    break
    except OSError:
        flags = platform.processor()
    return hashlib.sha256(f"{platform.machine()}|{flags}".encode()).hexdigest()[:16]


def cache_key(model_path: str | os.PathLike[str]) -> str:
    """The entry name for ``model_path`` on this machine and ORT build (module docstring)."""
    import onnxruntime

    with open(model_path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    parts = [f"format={CACHE_FORMAT}", f"model={digest}", f"onnxruntime={onnxruntime.__version__}",
             f"cpu={cpu_fingerprint()}", f"level={OPTIMIZATION_LEVEL}", f"provider={PROVIDER}"]  # fmt: skip
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def entry_path(model_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the pre-optimised graph of ``model_path`` is (or would be) cached."""
    folder = Path(cache_dir) if cache_dir is not None else frcnn_cache_dir(CACHE_KIND)
    return folder / f"{cache_key(model_path)}.onnx"


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first; OptimizeError if one is in the way."""
    missing: list[Path] = []
    probe = folder
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise OptimizeError(f"cache folder {folder} cannot be created: {probe} is not a folder; set "
                            "FRCNN_CACHE_DIR (or --cache-dir / cache_dir=) to a writable folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OptimizeError(f"cache folder {probe} is not writable; set FRCNN_CACHE_DIR (or --cache-dir / "
                            "cache_dir=) to a writable folder, or fill the cache with `frcnn optimize` as a user "
                            "who may write it")
    return missing


def child_command(model_path: str | os.PathLike[str], entry: Path) -> list[str]:
    """The command line of the child process that builds ``entry``."""
    return [sys.executable, "-m", __name__, os.fspath(model_path), os.fspath(entry)]


def build_in_child(model_path: str | os.PathLike[str], entry: Path) -> None:
    """Build ``entry`` in a child process; OptimizeError with the child's one-line reason if it fails.

    Folders this call creates are removed again when the build fails, so a failure leaves nothing behind.
    """
    created = _missing_folders(entry.parent)
    try:
        proc = subprocess.run(child_command(model_path, entry), capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, check=False)  # fmt: skip
    except BaseException:
        _remove_empty(created)
        raise
    if proc.returncode == 0 and entry.is_file():
        return
    _remove_empty(created)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    if proc.returncode in (MODEL_REJECTED_EXIT, NOT_CACHEABLE_EXIT) and lines:
        raise OptimizeError(lines[-1], model_rejected=proc.returncode == MODEL_REJECTED_EXIT)
    how = f"was killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exited {proc.returncode}"
    detail = f": {lines[-1]}" if lines else ""
    raise OptimizeError(f"the process optimising {os.fspath(model_path)} with ONNX Runtime {how}{detail}")


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            return


def ensure_optimized(model_path: str | os.PathLike[str],
                     cache_dir: str | os.PathLike[str] | None = None) -> CacheEntry:  # fmt: skip
    """The cache entry of ``model_path``, built in a child process on a miss (a hit needs no write access)."""
    entry = entry_path(model_path, cache_dir)
    if entry.is_file():
        return CacheEntry(entry, built=False)
    build_in_child(model_path, entry)
    return CacheEntry(entry, built=True)


def _external_data_tensors(model: Any) -> list[str]:
    """Names of the tensors ``model`` (loaded without external data) keeps in external files."""
    from onnx import TensorProto

    tensors = list(model.graph.initializer)
    for nodes in [model.graph.node, *(fn.node for fn in model.functions)]:
        tensors += [a.t for node in nodes for a in node.attribute if a.HasField("t")]
    return [t.name for t in tensors if t.data_location == TensorProto.EXTERNAL]


def build(model_path: str | os.PathLike[str], entry: str | os.PathLike[str]) -> None:
    """Optimise ``model_path`` at ORT_ENABLE_ALL on the CPU EP and save the graph to ``entry`` (atomically).

    Runs in the process that calls it: :func:`build_in_child` is the caller's way. OptimizeError with
    ``model_rejected`` when ONNX Runtime cannot load the model or it is not a frcnn detector.
    """
    import onnxruntime as ort
    from frcnn.runtime.backends.onnxruntime import check_signature, session_error

    try:
        import onnx
    except ImportError as exc:
        raise OptimizeError(f"building the pre-optimised graph needs the onnx package (`pip install onnx`, or "
                            f"the ort extra): {exc}") from None
    try:
        external = _external_data_tensors(onnx.load(os.fspath(model_path), load_external_data=False))
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends: not an ONNX file
        raise OptimizeError(session_error(os.fspath(model_path), exc), model_rejected=True) from None
    if external:
        raise OptimizeError(f"{os.fspath(model_path)} keeps {len(external)} weight tensors in external data files; "
                            "the pre-optimised graph cache keys on the .onnx file's bytes only, so it is not "
                            "cached (save the model with its weights inside, e.g. re-export with `frcnn export`)")
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION_LEVEL)
    options.intra_op_num_threads = 1
    options.enable_cpu_mem_arena = False
    options.log_severity_level = 3  # ORT warns that the saved graph is hardware-specific: that is the point
    with atomic_path(entry) as tmp:
        options.optimized_model_filepath = os.fspath(tmp)
        try:
            session = ort.InferenceSession(os.fspath(model_path), options, providers=[PROVIDER])
        except Exception as exc:  # noqa: BLE001 - ORT raises its own pybind exception types
            raise OptimizeError(session_error(os.fspath(model_path), exc), model_rejected=True) from None
        check_signature(os.fspath(model_path), session)
        if tmp.stat().st_size == 0:
            raise OptimizeError(f"ONNX Runtime {ort.__version__} wrote no optimised graph for {model_path}")


def _child_main(argv: list[str]) -> int:
    """``python -m frcnn.runtime.backends.ort_cache MODEL ENTRY``: exit codes in the module docstring."""
    model_path, entry = argv
    try:
        build(model_path, entry)
    except OptimizeError as exc:
        print(f"{exc}", file=sys.stderr)
        return MODEL_REJECTED_EXIT if exc.model_rejected else NOT_CACHEABLE_EXIT
    except UserError as exc:  # check_signature: a loadable ONNX file that is not a frcnn detector
        print(f"{exc}", file=sys.stderr)
        return MODEL_REJECTED_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
