"""Where frcnn keeps the files it derives from a user's inputs (PTX kernels, pre-optimised ONNX graphs).

One root for every cache, chosen in this order: ``$FRCNN_CACHE_DIR``, else ``$XDG_CACHE_HOME/frcnn``, else
``~/.cache/frcnn``; each kind of entry gets its own folder below it (``ptx``, ``ort``). Torch-free; the
runtime is the bottom layer, so the plugins take their cache folder from here too.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir", "cache_root"]


def cache_root() -> Path:
    """``$FRCNN_CACHE_DIR``, else ``$XDG_CACHE_HOME/frcnn``, else ``~/.cache/frcnn`` (not created here)."""
    if os.environ.get("FRCNN_CACHE_DIR"):
        return Path(os.environ["FRCNN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "frcnn"


def cache_dir(kind: str) -> Path:
    """The folder of one kind of cache entry, e.g. ``cache_dir("ort")`` -> ``<cache_root()>/ort``."""
    return cache_root() / kind
