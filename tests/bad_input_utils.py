"""Helpers of the bad-input tests: small image files of every kind, a COCO dataset, tree snapshots, and the
stand-in ONNX detector of test_runtime as a module fixture (no model export)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from test_runtime import make_fake_detector


def fake_model_file(factory: pytest.TempPathFactory) -> str:
    """The stand-in detector ONNX (test_runtime) in a fresh temp folder: for a module-scoped ``model`` fixture."""
    return make_fake_detector(factory.mktemp("badrt") / "fake.onnx")


def png(path: Path, h: int = 40, w: int = 60, value: int = 120) -> Path:
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)
    return path


def noise_png(path: Path, h: int = 64, w: int = 64) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png_header(path: Path, w: int, h: int) -> Path:
    """A PNG whose header says w x h (8-bit RGB) with a tiny IDAT: refused from the header, never decoded."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + _chunk(b"IEND", b""))  # fmt: skip
    return path


def truncated_png(path: Path) -> Path:
    data = noise_png(path).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def gif(path: Path, frames: int = 3) -> Path:
    images = [Image.fromarray(np.full((8, 8, 3), (40 * i, 0, 0), np.uint8)) for i in range(frames)]
    images[0].save(path, save_all=True, append_images=images[1:])
    return path


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(folder, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = "link:" + os.readlink(p)
            elif os.path.isdir(p):
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def image_folder(tmp: Path, n: int = 2) -> Path:
    folder = tmp / "imgs"
    folder.mkdir()
    for i in range(n):
        png(folder / f"im{i}.png", value=60 + 40 * i)
    return folder


def call_later(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """``fn(*args)`` later; the arguments (files) are made now, before the snapshot."""
    return lambda: fn(*args)


def coco_dataset(tmp: Path, second: bytes | np.ndarray) -> Path:
    """A 2-image COCO dataset whose second image file is ``second`` (bytes, or an array saved as TIFF data)."""
    (tmp / "imgs").mkdir()
    png(tmp / "imgs" / "a.png", 20, 40)
    if isinstance(second, bytes):
        write(tmp / "imgs" / "b.png", second)
    else:
        Image.fromarray(second).save(tmp / "imgs" / "b.png", format="TIFF")
    images = [{"id": i + 1, "file_name": n, "width": 40, "height": 20} for i, n in enumerate(["a.png", "b.png"])]
    anns = [{"id": i + 1, "image_id": i + 1, "bbox": [2, 2, 10, 10], "category_id": 1, "iscrowd": 0} for i in range(2)]
    data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "box"}]}
    write(tmp / "train.json", json.dumps(data).encode())
    return tmp


def load_dataset(root: Path) -> Any:
    from frcnn.trainer.data.coco import load_coco_json

    return load_coco_json(root / "train.json", root / "imgs")


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def save_array(path: Path, array: np.ndarray) -> str:
    Image.fromarray(array).save(path)
    return str(path)


def write_bytes_name(tmp: Path, name: bytes, data: bytes) -> str:
    path = os.path.join(os.fsencode(tmp), name)
    with open(path, "wb") as f:
        f.write(data)
    return os.fsdecode(path)


def broken_link_folder(tmp: Path) -> str:
    folder = image_folder(tmp)
    (folder / "gone.png").symlink_to(tmp / "does-not-exist.png")
    return str(folder)


def loop_folder(tmp: Path) -> str:
    folder = image_folder(tmp)
    (folder / "loop.png").symlink_to(folder / "loop.png")
    return str(folder)
