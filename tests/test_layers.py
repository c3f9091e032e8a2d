"""The layer rule (docs/architecture.md), checked on the source with ``ast``: imports only point down.

    runtime/  (frcnn.runtime)  bottom: torch-free; imports no other frcnn layer
    plugins/  (frcnn.plugins)  may import frcnn.runtime only
    trainer/  (frcnn.trainer)  may import runtime + plugins
    export/   (frcnn.export)   may import all three

Every import counts: module level and inside functions, ``import x``, ``from x import y`` (``from frcnn import
trainer`` too), relative imports resolved against the file's package, ``importlib.import_module("...")`` /
``__import__("...")`` with a literal name, and any other string constant that is a bare dotted module path of
a forbidden layer (a dispatch table naming ``"frcnn.trainer.x"`` imports it just the same).
"""

from __future__ import annotations

import ast
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {
    "runtime": "frcnn.runtime",
    "plugins": "frcnn.plugins",
    "trainer": "frcnn.trainer",
    "export": "frcnn.export",
}
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "runtime": ("frcnn.trainer", "frcnn.export", "frcnn.plugins", "torch"),
    "plugins": ("frcnn.trainer", "frcnn.export"),
    "trainer": ("frcnn.export",),
}
"""folder -> module prefixes its code must not import (the layers above it; torch for the runtime)."""

KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {}
"""(file, imported module) pairs still to be fixed, each with its reason. Listed, not skipped: the test fails
on any other violation and on an entry here that no longer occurs (so the list only shrinks)."""

_MODULE_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
_IMPORTERS = {"import_module", "__import__"}


def _dotted(path: Path, root: Path) -> tuple[str, bool]:
    """(dotted module name, is a package __init__) of a file under ``root``."""
    rel = path.relative_to(root)
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:-1]]
    is_init = rel.name == "__init__.py"
    return ".".join(parts if is_init else [*parts, rel.stem]), is_init


def _resolve(module: str | None, level: int, here: str, is_init: bool) -> str:
    if level == 0:
        return module or ""
    base = here.split(".")
    base = base[: len(base) - level + (1 if is_init else 0)]
    return ".".join(base + ([module] if module else []))


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def imports_of(path: Path, root: Path) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import in the file (see the module docstring)."""
    here, is_init = _dotted(path, root)
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = _docstring_nodes(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module, node.level, here, is_init)
            yield node.lineno, base
            yield from ((node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in _IMPORTERS and isinstance(node.args[0].value, str):
                yield node.lineno, node.args[0].value
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
              and _MODULE_PATH.match(node.value.split(":")[0])):  # fmt: skip
            yield node.lineno, node.value.split(":")[0]


def _forbidden(module: str, prefixes: tuple[str, ...]) -> str | None:
    return next((p for p in prefixes if module == p or module.startswith(p + ".")), None)


def layer_violations(root: Path) -> list[tuple[str, int, str]]:
    """(file relative to root, line, imported name) of every import that points up a layer; one per line,
    the most specific name (``from frcnn.export.engine import f`` -> ``frcnn.export.engine.f``)."""
    found: dict[tuple[str, int], str] = {}
    for folder, prefixes in FORBIDDEN.items():
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            for line, module in imports_of(path, root):
                if _forbidden(module, prefixes) and len(module) > len(found.get((rel, line), "")):
                    found[(rel, line)] = module
    return sorted((rel, line, module) for (rel, line), module in found.items())


def _is_known(rel: str, module: str, known: tuple[str, str]) -> bool:
    return rel == known[0] and (module == known[1] or module.startswith(known[1] + "."))


def test_imports_point_down_only() -> None:
    found = layer_violations(REPO)
    new = [
        f"{f}:{line}: imports {m}"
        for f, line, m in found
        if not any(_is_known(f, m, k) for k in KNOWN_VIOLATIONS)
    ]
    assert not new, (
        "imports against the layer rule (docs/architecture.md): move the code up a layer, or "
        "have the upper layer register itself (see runtime/cli.py):\n  " + "\n  ".join(new)
    )
    stale = [k for k in KNOWN_VIOLATIONS if not any(_is_known(f, m, k) for f, _, m in found)]
    assert not stale, f"fixed: remove these from KNOWN_VIOLATIONS: {stale}"


def _plant(tmp_path: Path, rel: str, code: str) -> int:
    """Copy the repo's ``rel`` under tmp_path with ``code`` appended; returns the line of its last line."""
    lines = (REPO / rel).read_text().splitlines()
    target = tmp_path / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join([*lines, *code.splitlines()]) + "\n")
    return len(lines) + len(code.splitlines())


@pytest.mark.parametrize(
    ("rel", "planted", "module"),
    [
        ("runtime/errors.py", "import frcnn.trainer.modeling", "frcnn.trainer.modeling"),
        (
            "runtime/errors.py",
            "def f():\n    from frcnn.export import onnx_export",
            "frcnn.export.onnx_export",
        ),
        ("runtime/errors.py", "def f():\n    import torch.nn as nn", "torch.nn"),
        ("runtime/errors.py", "from frcnn import plugins", "frcnn.plugins"),
        ("runtime/backends/base.py", "from ...trainer import predictor", "frcnn.trainer.predictor"),
        (
            "runtime/errors.py",
            "X = __import__('importlib').import_module('frcnn.export.cli')",
            "frcnn.export.cli",
        ),
        (
            "runtime/errors.py",
            "TABLE = {'train': 'frcnn.trainer.train_cli:add_parser'}",
            "frcnn.trainer.train_cli",
        ),
        (
            "plugins/ptx.py",
            "def f():\n    from frcnn.trainer.config import get_cfg",
            "frcnn.trainer.config.get_cfg",
        ),
        ("plugins/batched_nms/__init__.py", "from ...export import engine", "frcnn.export.engine"),
    ],
)
def test_checker_reports_a_planted_import(tmp_path: Path, rel: str, planted: str, module: str) -> None:
    """The checker bites: a planted import in a copy of a real file is reported at its exact file:line."""
    line = _plant(tmp_path, rel, planted)
    found = layer_violations(tmp_path)
    assert (rel, line, module) in found, found
    shutil.copy(REPO / rel, tmp_path / rel)  # the unmodified file: nothing reported
    assert layer_violations(tmp_path) == []


def test_relative_imports_resolve_against_the_package(tmp_path: Path) -> None:
    (tmp_path / "runtime" / "backends").mkdir(parents=True)
    (tmp_path / "runtime" / "backends" / "__init__.py").write_text(
        "from . import base\nfrom .. import errors\n"
    )
    (tmp_path / "runtime" / "backends" / "x.py").write_text(
        "from ..contract import INPUTS\nfrom . import base\n"
    )
    got = {(p.relative_to(tmp_path).as_posix(), m) for p in (tmp_path / "runtime").rglob("*.py")
           for _, m in imports_of(p, tmp_path)}  # fmt: skip
    assert {
        ("runtime/backends/__init__.py", "frcnn.runtime.backends.base"),
        ("runtime/backends/__init__.py", "frcnn.runtime.errors"),
        ("runtime/backends/x.py", "frcnn.runtime.contract.INPUTS"),
        ("runtime/backends/x.py", "frcnn.runtime.backends.base"),
    } <= got


def test_docstrings_and_clean_files_are_not_reported(tmp_path: Path) -> None:
    (tmp_path / "runtime").mkdir()
    (tmp_path / "runtime" / "ok.py").write_text(
        '"""frcnn.trainer.predictor"""\nimport numpy as np\nfrom frcnn.runtime import errors\n'
    )
    assert layer_violations(tmp_path) == []
