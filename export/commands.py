"""The ``frcnn`` sub-commands this package provides (entry-point group ``frcnn.commands``; torch-free).

Each value is ``(module providing add_parser, one-line help, rank in `frcnn --help`)``; see
:class:`frcnn.runtime.cli.Command`.
"""

from __future__ import annotations

COMMANDS: dict[str, tuple[str, str, int]] = {
    "demo": (
        "frcnn.export.demo_cli",
        "the main job end to end: synthetic data -> train -> export -> infer -> parity",
        0,
    ),
    "export": ("frcnn.export.cli", "checkpoint -> ONNX (-> TensorRT engine); same as `export-engine`", 30),
    "parity": ("frcnn.export.parity_cli", "compare PyTorch with the deployed model", 60),
}
