"""Shared test configuration.

``@pytest.mark.gpu`` tests need an NVIDIA GPU (and, where they say so, TensorRT); elsewhere they are skipped
with a reason naming what is missing. The check imports nothing heavy unless such tests were collected.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


def _gpu_missing_reason() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU here (nvidia-smi not found); run `pytest -m gpu` on a GPU machine"
    if importlib.util.find_spec("torch") is not None:
        import torch

        if not torch.cuda.is_available():
            return "torch.cuda.is_available() is False (CPU-only torch build or no driver)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    reason = _gpu_missing_reason()
    if reason is None:
        return
    for item in gpu_items:
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The project's shared/ folder (beside the repository root, in CI too)."""
    if not SHARED.is_dir():
        pytest.skip(f"shared/ folder not found at {SHARED}; it holds the detectron2 reference key list")
    return SHARED


@pytest.fixture(scope="session")
def d2_key_shapes(shared_dir: Path) -> dict[str, tuple[int, ...]]:
    """detectron2's R50-FPN state dict, in its order: name -> shape (shared/detectron2-r50fpn-keys.tsv)."""
    rows = {}
    for line in (shared_dir / "detectron2-r50fpn-keys.tsv").read_text().splitlines():
        name, shape = line.split("\t")
        rows[name] = tuple(int(d) for d in shape.strip("()").replace(" ", "").split(",") if d)
    return rows
