"""The output folder of ``frcnn infer``: checked before the model loads, never overwriting a file the tool did
not write, and left as it was when a run fails.

Policy (docs/runtime.md):
- ``--output`` must be a folder or a path that can be created as one: an existing file, a path under a file
  or a folder that is not writable is refused up front. (``os.access`` decides writability; for root it
  only sees read-only file systems, since root ignores permission bits.)
- ``--output`` must not be one of the input folders, and no output may be an input image.
- A file is replaced only if an earlier ``frcnn infer`` wrote it: each successful run lists what it wrote in
  the hidden manifest ``.frcnn-infer.json`` of the folder. Any other existing file with a name the run
  would write (``<stem>.png``, ``results.json``) is a clash, refused before anything is written.
- Every file is written atomically (temp file + rename). When the run fails (an error, a full disk,
  Ctrl-C) the files it created are removed again, and the folders it created too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Self

from frcnn.runtime.errors import UserError
from frcnn.runtime.fileio import atomic_write_json
from frcnn.runtime.image_io import display

#: Hidden file in ``--output`` naming the files ``frcnn infer`` wrote there (they may be replaced later).
MANIFEST = ".frcnn-infer.json"
RESULTS = "results.json"


def _existing_ancestor(path: str) -> str:
    current = os.path.abspath(path)
    while not os.path.lexists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current


def check_output_folder(output: str, flag: str = "--output") -> None:
    """UserError unless ``output`` is (or can be created as) a writable folder. Creates nothing."""
    if not output.strip():
        raise UserError(f"{flag} is empty; pass a folder path")
    if os.path.lexists(output) and not os.path.isdir(output):
        raise UserError(f"{flag} {display(output)} is an existing file, not a folder; pass a folder path (it is "
                        "created if missing)")  # fmt: skip
    anchor = _existing_ancestor(output)
    if not os.path.isdir(anchor):
        raise UserError(f"{flag} {display(output)} cannot be created: {display(anchor)} is a file, not a "
                        "folder; pass a folder path")  # fmt: skip
    if not os.access(anchor, os.W_OK | os.X_OK):
        what = f"{flag} folder" if anchor == os.path.abspath(output) else f"folder {display(anchor)}"
        raise UserError(f"cannot write into the {what} (permission denied or a read-only file system); pass "
                        "an --output folder you can write to")  # fmt: skip


def _read_manifest(output: str) -> set[str] | None:
    """Names in the folder's manifest; empty without one; None when the file is not a manifest of ours."""
    path = os.path.join(output, MANIFEST)
    if not os.path.lexists(path):
        return set()
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("written_by") != "frcnn infer":
            return None
        return {str(name) for name in data["files"]}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return None


def plan_outputs(output: str, inputs: Sequence[str], images: Sequence[str], names: Sequence[str]) -> set[str]:
    """Check ``names`` (+ results.json) may be written into ``output``; returns the names written before.

    Args:
        output: the --output folder; inputs: the IMAGE|DIR arguments; images: the image files found;
        names: the output file name of each image.
    """
    check_output_folder(output)
    for item in inputs:
        if os.path.isdir(item) and os.path.isdir(output) and os.path.samefile(item, output):
            raise UserError(f"--output {display(output)} is the input folder {display(item)}: the drawn images "
                            "would mix with (or replace) your images; pass another folder, e.g. "
                            f"--output {display(os.path.join(item, 'detections'))}")  # fmt: skip
    if not os.path.isdir(output):
        return set()
    ours = _read_manifest(output)
    if ours is None:
        raise UserError(f"--output {display(output)} holds a file {MANIFEST} that frcnn infer did not write (or "
                        "that is damaged); nothing was overwritten: pass a new or empty --output folder")
    real_inputs = {os.path.realpath(p) for p in images}
    clashes = []
    for name in [*names, RESULTS]:
        target = os.path.join(output, name)
        if os.path.realpath(target) in real_inputs:
            raise UserError(f"writing {display(target)} would overwrite the input image {display(target)}; pass "
                            "another --output folder")  # fmt: skip
        if os.path.lexists(target) and (name not in ours or not os.path.isfile(target)):
            clashes.append(name)
    if clashes:
        shown = ", ".join(display(n) for n in clashes[:3]) + (f" and {len(clashes) - 3} more" if len(clashes) > 3
                                                              else "")  # fmt: skip
        raise UserError(f"--output {display(output)} already holds {shown}, not written by frcnn infer; nothing "
                        "was overwritten: pass a new or empty --output folder, or move those files away")
    return ours


def check_output_file(path: str, flag: str, written_by_us: Callable[[str], bool]) -> None:
    """UserError unless ``path`` can be written: not a folder, its folder creatable and writable, and an
    existing file only if ``written_by_us(path)`` says this tool wrote it. Creates nothing."""
    if not path.strip():
        raise UserError(f"{flag} is empty; pass a file path")
    if os.path.isdir(path):
        raise UserError(f"{flag} {display(path)} is a folder; pass a file path")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise UserError(f"{flag} {display(path)} cannot be created: {display(folder)} is a file, not a folder; "
                        "pass another path")  # fmt: skip
    check_output_folder(folder, f"the folder of {flag}")
    if os.path.lexists(path) and not written_by_us(path):
        raise UserError(f"{flag} {display(path)} exists and was not written by frcnn; nothing was overwritten: "
                        f"pass another {flag} path, or move the file away")


class OutputFolder:
    """Tracks what one run creates in ``output`` so a failed run can remove it again (context manager)."""

    def __init__(self, output: str, previous: set[str]) -> None:
        self.output = output
        self.previous = previous
        self.created_dirs: list[str] = []
        self.created_files: list[str] = []
        self.written: list[str] = []

    def __enter__(self) -> Self:
        missing = []
        current = os.path.abspath(self.output)
        while not os.path.lexists(current):
            missing.append(current)
            current = os.path.dirname(current)
        try:
            os.makedirs(self.output, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create --output {display(self.output)}: {exc.strerror or exc}") from None
        self.created_dirs = missing  # deepest first
        return self

    def path(self, name: str) -> str:
        """Where ``name`` goes; remembered as created when it did not exist before."""
        target = os.path.join(self.output, name)
        if not os.path.lexists(target):
            self.created_files.append(target)
        self.written.append(name)
        return target

    def finish(self) -> None:
        """Record this run's files (and the earlier runs') in the manifest."""
        target = os.path.join(self.output, MANIFEST)
        if not os.path.lexists(target):
            self.created_files.append(target)
        atomic_write_json(target, {"written_by": "frcnn infer", "files": sorted(self.previous | set(self.written))})

    def rollback(self) -> int:
        """Remove the files and folders this run created; returns the number of files removed."""
        removed = 0
        for target in self.created_files:
            try:
                os.unlink(target)
                removed += 1
            except FileNotFoundError:
                pass
        for folder in self.created_dirs:
            try:
                os.rmdir(folder)
            except OSError:
                break
        return removed

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.rollback()
