"""The ``frcnn`` sub-commands this package provides (entry-point group ``frcnn.commands``; torch-free).

Each value is ``(module providing add_parser, one-line help, rank in `frcnn --help`)``; see
:class:`frcnn.runtime.cli.Command`.
"""

from __future__ import annotations

COMMANDS: dict[str, tuple[str, str, int]] = {
    "data": ("frcnn.trainer.data.cli", "make or inspect datasets (e.g. `frcnn data synth OUT`)", 10),
    "train": ("frcnn.trainer.train_cli", "train a detector from a config", 20),
    "eval": ("frcnn.trainer.eval_cli", "COCO AP of a checkpoint or a deployed model", 70),
}
