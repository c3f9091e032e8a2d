"""The ``frcnn`` sub-commands this package provides (entry-point group ``frcnn.commands``; torch-free).

Each value is ``(module providing add_parser, one-line help, rank in `frcnn --help`)``; see
:class:`frcnn.runtime.cli.Command`.
"""

from __future__ import annotations

COMMANDS: dict[str, tuple[str, str, int]] = {
    "plugins": ("frcnn.plugins.cli", "build the plugins' PTX for GPU targets", 40),
}
