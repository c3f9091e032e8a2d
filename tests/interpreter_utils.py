"""Run a Triton test module's kernels under TRITON_INTERPRET=1 in a child process.

The interpreter flag must be set before triton is imported; other tests in the same pytest process may
already have imported it, so the kernels run in a fresh interpreter: the test module itself is the child's
script (``python MODULE IN.npz OUT.npz``) and exchanges cases and results through .npz files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np


def run_kernels_in_interpreter(script: str, cases: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Save ``cases``, run ``script IN OUT`` with TRITON_INTERPRET=1, return its ``results`` dict."""
    np.savez(workdir / "in.npz", cases=np.array(cases, dtype=object))
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, script, str(workdir / "in.npz"), str(workdir / "out.npz")], env=env,
                          check=False, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return np.load(workdir / "out.npz", allow_pickle=True)["results"].item()
