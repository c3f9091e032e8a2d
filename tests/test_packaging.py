"""The wheel must contain every sub-package, and the torch-free layers must stay torch-free."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOP = {"trainer": "frcnn.trainer", "export": "frcnn.export", "runtime": "frcnn.runtime", "plugins": "frcnn.plugins"}


def _package_folders() -> set[str]:
    found = set()
    for folder, dotted in TOP.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([dotted, *rel.parts]))
    return found


def test_pyproject_lists_every_package() -> None:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    listed = set(meta["tool"]["setuptools"]["packages"])
    folders = _package_folders()
    assert folders - listed == set(), f"add these to [tool.setuptools] packages: {sorted(folders - listed)}"
    assert listed - folders == set(), f"listed packages without a folder: {sorted(listed - folders)}"


def test_no_frcnn_init_anywhere() -> None:
    # `frcnn` is an implicit namespace package: an __init__.py would shadow the mapped folders.
    assert not (REPO / "frcnn").exists()


def test_runtime_and_plugins_import_without_torch() -> None:
    code = (
        "import sys, frcnn.runtime, frcnn.runtime.cli, frcnn.plugins, "
        "frcnn.plugins.roi_align_v2, frcnn.plugins.batched_nms\n"
        "bad = [m for m in ('torch', 'tensorrt', 'triton') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
