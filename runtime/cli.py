"""The ``frcnn`` command: one entry point, one sub-command per job.

Sub-commands live beside the code they drive and are imported only when chosen, so ``frcnn infer`` never
imports torch. A sub-command module provides ``add_parser(subparsers) -> argparse.ArgumentParser`` whose
parser sets ``func`` (called with the parsed namespace, returns an exit code).

runtime/ is the bottom layer and knows no command of the layers above it: each package publishes a table of
its commands (``{name: Command}`` in a torch-free ``commands`` module) under the entry-point group
``frcnn.commands`` in pyproject.toml, and this dispatcher discovers the tables with importlib.metadata. Only
the chosen command's module is imported (see docs/architecture.md).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import NamedTuple

from frcnn.runtime.errors import USER_ERROR_EXIT_CODE, UserError, run_command

ENTRY_POINT_GROUP = "frcnn.commands"


class Command(NamedTuple):
    """One ``frcnn`` sub-command: the module providing ``add_parser``, its one-line help, its place in
    ``frcnn --help`` (ascending: the order a user meets the commands)."""

    module: str
    help: str
    rank: int


COMMANDS: dict[str, Command] = {
    "optimize": Command("frcnn.runtime.optimize_cli",
                        "pre-optimise an ONNX model for low-memory ONNX Runtime (CPU)", 45),
    "infer": Command("frcnn.runtime.infer_cli", "run an exported model on images", 50),
    "bench": Command("frcnn.runtime.bench_cli", "latency / throughput of a deployed model", 80),
    "serve": Command("frcnn.runtime.serving.serve_cli",
                     "serve a deployed model on Triton Inference Server (PyTriton)", 90),
    "triton-repo": Command("frcnn.runtime.serving.triton_repo_cli",
                           "write a model repository for a stock tritonserver", 100),
}
"""The runtime's own commands; the other layers' come from the ``frcnn.commands`` entry points."""


def discover_commands() -> dict[str, Command]:
    """Every installed sub-command, ordered by rank: the runtime's plus each ``frcnn.commands`` table."""
    found = dict(COMMANDS)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        for name, command in ep.load().items():
            if name in found:
                raise RuntimeError(f"`frcnn {name}` is registered twice ({found[name].module} and "
                                   f"{command.module}); rename one of them")  # fmt: skip
            found[name] = Command(*command)
    return dict(sorted(found.items(), key=lambda item: item[1].rank))


def _build_parser(commands: dict[str, Command], chosen: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="frcnn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in commands.items():
        if name == chosen:
            try:
                mod = importlib.import_module(command.module)
            except ImportError as exc:
                raise UserError(
                    f"`frcnn {name}` needs a dependency that is not installed ({exc}). "
                    "Install the matching extra, e.g. `pip install frcnn-deploy[dev]`."
                ) from exc
            mod.add_parser(sub)
        else:
            sub.add_parser(name, help=command.help)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``frcnn``: exit 0 done, 2 bad input (one line), 130 Ctrl-C (``errors.run_command``)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    return run_command("frcnn", lambda: _dispatch(args_list))


def _dispatch(args_list: list[str]) -> int:
    """Discover the commands, import only the chosen one, parse and run it."""
    commands = discover_commands()
    chosen = next((a for a in args_list if not a.startswith("-")), None)
    if chosen is not None and chosen not in commands and commands.keys() == COMMANDS.keys():
        raise UserError(f"unknown command {chosen!r}, and no package registered its commands (entry "
                        f"points '{ENTRY_POINT_GROUP}'): the installed metadata is older than "
                        "pyproject.toml; reinstall: `pip install -e .` (or the wheel).")
    chosen = chosen if chosen in commands else None
    parser = _build_parser(commands, chosen)
    args = parser.parse_args(args_list)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return USER_ERROR_EXIT_CODE
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
