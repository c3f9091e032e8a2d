"""Atomic file writes: a reader sees the old file or the complete new one, never a partial file.

Torch-free; every package writes its outputs through these (checkpoints use `atomic_writer` with torch.save).

Temporary files are named ``.<target name>.<pid>.<random>.tmp`` beside the target. A process killed while
writing (SIGKILL, power loss) cannot remove its temp file, so every writer first removes the leftovers of
earlier runs for the same target (:func:`remove_stale_temps`): only files matching that exact pattern, and
only those whose writer process is gone (a concurrent live writer's file is left alone). Temp files of the
pid-less pattern ``.<name>.<random>.tmp`` written by earlier versions are removed when they are older than
this process. A successful or failed (exception, Ctrl-C) write leaves no temp file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_path", "atomic_write", "atomic_write_json", "atomic_writer", "remove_stale_temps", "temp_prefix"]

_STARTED = time.time()  # this process's writes begin after this; older pid-less temp files are leftovers
_CLEANED: set[str] = set()  # targets whose folder was already searched for leftovers by this process


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def temp_prefix(target: str | os.PathLike[str]) -> str:
    """The name prefix of this process's temp files for ``target``: ``.<name>.<pid>.``."""
    return f".{Path(target).name}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(target: str | os.PathLike[str]) -> list[Path]:
    """Remove temp files that killed runs left beside ``target``; returns the removed paths.

    Matches only ``.<name>.<pid>.<random>.tmp`` whose ``pid`` is not a live process (and not this one), and
    the older pid-less ``.<name>.<8 random chars>.tmp`` when last modified before this process started.
    Nothing else in the folder is touched.
    """
    path = Path(target)
    folder = path.parent if str(path.parent) else Path(".")
    name = re.escape(path.name)
    with_pid = re.compile(rf"^\.{name}\.(\d+)\.[a-z0-9_]{{8}}\.tmp$")
    legacy = re.compile(rf"^\.{name}\.[a-z0-9_]{{8}}\.tmp$")
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = with_pid.match(entry.name)
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            if m:
                pid = int(m.group(1))
                stale = pid != os.getpid() and not _pid_alive(pid)
            else:
                stale = bool(legacy.match(entry.name)) and entry.stat().st_mtime < _STARTED
            if stale:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:  # vanished meanwhile or not ours to remove: leave it
            continue
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that opens the file by name itself (ONNX Runtime's
    ``optimized_model_filepath``, a child process); on success it replaces ``path``, on error it is removed.

    The folder is created if missing; the file gets the permissions a plain ``open`` would give it (0666 less
    the umask), not mkstemp's 0600. Leftover temp files of killed earlier runs for the same target are removed
    first (once per target and process). The yielded file exists (empty) when the block starts.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    key = os.path.abspath(target)
    if key not in _CLEANED:
        remove_stale_temps(target)
        _CLEANED.add(key)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=temp_prefix(target), suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _default_mode())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: str = "wb", fsync: bool = False) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success it replaces ``path``, on error it is removed.

    The folder is created if missing. ``mode`` is "wb" or "w" (text is written as UTF-8). Temp file naming,
    permissions and the removal of earlier runs' leftovers are those of :func:`atomic_path`.
    """
    encoding = None if "b" in mode else "utf-8"
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as f:
        yield f
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def atomic_write(path: str | os.PathLike[str], data: bytes | str, fsync: bool = False) -> None:
    """Write bytes or text to ``path`` atomically (``fsync``: flushed to disk before the rename)."""
    with atomic_writer(path, "wb" if isinstance(data, bytes) else "w", fsync=fsync) as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = None) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    atomic_write(path, json.dumps(obj, indent=indent))
