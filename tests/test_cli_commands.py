"""The `frcnn` dispatcher finds the upper layers' commands through entry points, without importing them."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

from frcnn.runtime import cli

REPO = Path(__file__).resolve().parents[1]
NAMES = ["demo", "data", "train", "export", "plugins", "optimize", "infer", "parity", "eval", "bench", "serve", "triton-repo"]
"""Every `frcnn` sub-command, in the order `frcnn --help` lists them (as before the entry points)."""


def test_every_command_is_found_in_help_order() -> None:
    commands = cli.discover_commands()
    assert list(commands) == NAMES
    for name, command in commands.items():
        assert importlib.util.find_spec(command.module) is not None, (name, command.module)
        assert command.help


def test_installed_entry_points_match_pyproject() -> None:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"][
        cli.ENTRY_POINT_GROUP
    ]
    installed = {ep.name: ep.value for ep in entry_points(group=cli.ENTRY_POINT_GROUP)}
    assert installed == declared, "the installed metadata is stale: run `pip install -e .`"


def test_listing_commands_imports_no_command_module() -> None:
    code = (
        "import sys\nfrom frcnn.runtime.cli import discover_commands\nnames = discover_commands()\n"
        "loaded = [c.module for c in names.values() if c.module in sys.modules]\n"
        "bad = [m for m in ('torch', 'onnx', 'polygraphy') if m in sys.modules]\n"
        "assert not loaded and not bad, (loaded, bad)\nprint(len(names))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 0 and res.stdout.strip() == str(len(NAMES)), res.stderr


def test_missing_registrations_are_one_clear_error(monkeypatch, capsys) -> None:
    monkeypatch.setattr(cli, "entry_points", lambda group: [])
    assert cli.main(["train", "--config", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("frcnn: error: unknown command 'train'") and "pip install -e ." in err, err
    assert list(cli.discover_commands()) == ["optimize", "infer", "bench", "serve", "triton-repo"]  # the runtime's own commands still work
