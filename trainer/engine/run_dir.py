"""The training output folder: checks before anything is written, the resume pointer, the one-writer lock.

``frcnn train --output OUT`` writes only after every check passed (config, data, weights, resume
checkpoint); these are the OUT-side checks:

- OUT must be a folder (or not exist yet) that can be written, and neither the dataset folder nor inside it;
  a ``config.yaml`` in it must be one ``frcnn train`` wrote (a full config dump), as it is replaced;
- ``--resume``: ``OUT/last_checkpoint`` must name an existing, readable frcnn training checkpoint; a pointer
  to a deleted file is refused (restarting from iteration 0 would overwrite the pointer: lost work). Without
  a pointer, training starts at iteration 0 (detectron2's behaviour) with a warning;
- one training per OUT at a time: ``OUT/.frcnn-train.lock`` holds the pid of the live run; a lock whose
  process is gone (a killed run) is taken over. The lock is removed when training ends, however it ends.

Some problems only show once training runs (an image whose pixel data is truncated, a non-finite loss).
:func:`claim_output` then undoes what the failed run wrote when it saved no checkpoint: files it created are
removed (OUT too, when it created it) and a ``config.yaml`` it replaced gets its old content back. A run that
saved a checkpoint keeps everything (it is resumable).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from frcnn.runtime.errors import CheckpointError, UserError

from .hooks import LAST_CHECKPOINT

__all__ = ["LOCK_NAME", "check_output_dir", "claim_output", "last_saved", "output_lock", "read_resume_state", "resolve_resume"]

logger = logging.getLogger(__name__)
LOCK_NAME = ".frcnn-train.lock"
_TRAINING_KEYS = ("iteration", "optimizer", "scheduler")


def check_output_dir(output_dir: str, data_dir: str | None = None) -> None:
    """UserError when OUT is a file, lies under a file, is not writable, or is (inside) the dataset folder."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {output_dir} is a file, not a folder; choose a folder for checkpoints and logs")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        raise UserError(f"--output {output_dir}: {parent} is a file, so the folder cannot be created there")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--output {output_dir}: {parent} is not writable; choose another --output")
    config = out / "config.yaml"
    if config.exists() and not _is_our_config(config):
        raise UserError(f"--output {output_dir} holds a config.yaml that `frcnn train` did not write (not a full "
                        "config dump); training would replace it. Move it or choose another --output")  # fmt: skip
    if data_dir is not None:
        data, resolved = Path(data_dir).resolve(), out.resolve()
        if resolved == data or data in resolved.parents:
            raise UserError(f"--output {output_dir} is inside the dataset folder {data_dir}; keep training outputs "
                            "apart from the data (e.g. --output runs/NAME)")  # fmt: skip


def _is_our_config(path: Path) -> bool:
    """``config.yaml`` as ``frcnn train`` writes it: a YAML mapping holding every top-level key of get_cfg()."""
    import yaml
    from frcnn.trainer.config import get_cfg

    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return path.is_file() and isinstance(loaded, dict) and set(get_cfg()) <= set(loaded)


def resolve_resume(output_dir: str) -> str | None:
    """The checkpoint ``OUT/last_checkpoint`` names; None when there is no pointer (nothing to resume).

    Raises CheckpointError when the pointer is unreadable or names a missing file.
    """
    pointer = os.path.join(output_dir, LAST_CHECKPOINT)
    if not os.path.exists(pointer):
        return None
    try:
        with open(pointer, encoding="utf-8") as f:
            name = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"--resume: cannot read {pointer} ({exc}); it should name a checkpoint file such as "
                              "model_final.pth") from None  # fmt: skip
    path = os.path.join(output_dir, name)
    if not name or "\n" in name or not os.path.isfile(path):
        found = sorted(p.name for p in Path(output_dir).glob("model_*.pth"))
        hint = (f"; checkpoints present: {', '.join(found)} - write the one to resume from into {pointer}"
                if found else "; no model_*.pth is left in that folder")  # fmt: skip
        raise CheckpointError(f"--resume: {pointer} names {name!r}, but {path} does not exist (deleted or moved?). "
                              f"Refusing to restart from iteration 0 over it{hint}, or train into a new "
                              "--output without --resume.")  # fmt: skip
    return path


def read_resume_state(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state_dict, meta) of a training checkpoint to resume; CheckpointError when it is not one."""
    from frcnn.trainer.checkpoint import load_checkpoint_state

    state, meta = load_checkpoint_state(path)
    missing = [k for k in _TRAINING_KEYS if k not in meta]
    if missing or not isinstance(meta.get("iteration"), int):
        raise CheckpointError(f"--resume: {path} is not a training checkpoint written by `frcnn train` (it lacks "
                              f"{', '.join(missing) or 'an integer iteration'}); to start a new training from "
                              "its weights, pass MODEL.WEIGHTS PATH into a new --output without --resume")  # fmt: skip
    return state, meta


def last_saved(output_dir: str) -> tuple[str, int | None] | None:
    """(path, iteration or None for model_final) of the checkpoint OUT/last_checkpoint names, if it exists."""
    try:
        path = resolve_resume(output_dir)
    except CheckpointError:
        return None
    if path is None:
        return None
    m = re.match(r"^model_(\d{7})\.pth$", os.path.basename(path))
    return path, int(m.group(1)) if m else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def output_lock(output_dir: str) -> Iterator[None]:
    """Hold ``OUT/.frcnn-train.lock`` (see the module docstring); UserError while another run holds it."""
    lock = os.path.join(output_dir, LOCK_NAME)
    for _attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                with open(lock, encoding="utf-8") as f:
                    pid = int(f.read().strip() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid > 0 and pid != os.getpid() and _pid_alive(pid):
                raise UserError(f"another `frcnn train` (pid {pid}) is writing into {output_dir}; wait for it, stop "
                                f"it, or choose another --output (lock file {lock})") from None  # fmt: skip
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)  # left by a killed run
    else:
        raise UserError(f"cannot take the lock {lock}; another run keeps creating it. Choose another --output")
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)


_OURS = re.compile(r"^(config\.yaml|metrics\.json|events\.out\.tfevents\..*|eval)$")


@contextlib.contextmanager
def claim_output(output_dir: str, config_text: str) -> Iterator[None]:
    """Create OUT, hold its lock, write ``config.yaml``; on failure before a checkpoint, undo (module doc)."""
    from frcnn.runtime.fileio import atomic_write

    created = not os.path.isdir(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    try:
        with output_lock(output_dir):
            before = set(os.listdir(output_dir))
            pointer = os.path.join(output_dir, LAST_CHECKPOINT)
            stamp = _stamp(pointer)
            config = os.path.join(output_dir, "config.yaml")
            old_config = Path(config).read_bytes() if os.path.isfile(config) else None
            try:
                atomic_write(config, config_text)
                yield
            except BaseException:
                if _stamp(pointer) == stamp:  # no checkpoint saved by this run: leave OUT as it was
                    _undo(output_dir, before, old_config)
                raise
    finally:
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(output_dir)  # only when empty: a failed first run leaves no folder behind


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


def _undo(output_dir: str, before: set[str], old_config: bytes | None) -> None:
    import shutil

    from frcnn.runtime.fileio import atomic_write

    for name in set(os.listdir(output_dir)) - before:
        if _OURS.match(name):
            path = os.path.join(output_dir, name)
            with contextlib.suppress(OSError):
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
    if old_config is not None:
        atomic_write(os.path.join(output_dir, "config.yaml"), old_config)
    logger.info("training failed before its first checkpoint: removed what it wrote in %s", output_dir)
