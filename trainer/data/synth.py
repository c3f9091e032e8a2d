"""Synthetic detection dataset: textured shapes of K classes on a cluttered background (COCO format).

``synthesize_dataset(out, num_images=N, size=S, num_classes=K, seed=X)`` writes::

    out/train/000001.png ...           out/val/0000xx.png ...          (RGB PNG, S x S)
    out/annotations/instances_train.json   out/annotations/instances_val.json

Each image: a low-frequency colour field + pixel noise + 4..``clutter`` random lines and arcs (distractors,
not a class; default up to 15), then 3..``max_shapes`` shapes drawn in turn (default 8). A shape is one of
``SHAPE_NAMES[:K]`` (COCO category id = index + 1), side log-uniform in [``min_side``, 0.8 S] px (default
8 px: tiny to large, every FPN level P2..P6 gets objects), mildly stretched, filled
with its own colour and a noise / stripe / checker texture, and may stick out of the image. Shapes are drawn
roughly large-to-small (with jitter), so later shapes occlude earlier ones. The box of an annotation is the
extent of the shape's *visible* pixels (COCO convention), ``area`` their count and ``segmentation`` their
exact mask (COCO RLE via pycocotools); a shape with less than 30 % of its pixels visible gets no annotation.

Deterministic: image ``i`` is rendered from ``numpy.random.default_rng([seed, i])``; PNG and JSON bytes
are identical for identical arguments. Needs numpy, Pillow and pycocotools (masks). Files are written to a
temporary name and renamed; the annotation files are written last.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from typing import Any, NamedTuple

import numpy as np
from frcnn.runtime.errors import UserError
from frcnn.runtime.fileio import atomic_write, atomic_writer
from PIL import Image, ImageDraw

__all__ = ["SHAPE_NAMES", "render_image", "synthesize_dataset"]

SHAPE_NAMES = ("circle", "square", "triangle", "ring", "cross", "diamond", "hexagon", "star")
MIN_SIDE = 8  # default smallest shape side (px)
MAX_SHAPES = 8  # default most shapes per image (at least min(3, max_shapes))
CLUTTER = 15  # default most distractor lines / arcs per image (at least min(4, clutter))
MIN_VISIBLE = 0.3


class _Style(NamedTuple):
    """How hard the images are (``render_image`` keyword arguments)."""

    min_side: int = MIN_SIDE
    max_shapes: int = MAX_SHAPES
    clutter: int = CLUTTER


# 256 unit-Gaussian values (Box-Muller on a 16 x 16 grid of midpoints): noise = _GAUSS[random uint8], which
# is ~5x faster than drawing normals and exactly reproducible.
_U = (np.arange(16, dtype=np.float64) + 0.5) / 16
_GAUSS = (np.sqrt(-2 * np.log(_U))[:, None] * np.cos(2 * np.pi * _U)[None, :]).astype(np.float32).ravel()


def _noise(shape: tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """float32 noise of standard deviation ~``sigma``."""
    return _GAUSS[rng.integers(0, 256, size=shape, dtype=np.uint8)] * np.float32(sigma)


def _shape_mask(name: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean [h, w] mask of a shape filling its h x w box (coordinates u, v in [-1, 1])."""
    v = ((np.arange(h, dtype=np.float32) + 0.5) / h * 2 - 1)[:, None]
    u = ((np.arange(w, dtype=np.float32) + 0.5) / w * 2 - 1)[None, :]
    if name == "circle":
        return u * u + v * v <= 1.0
    if name == "square":
        return np.ones((h, w), dtype=bool)
    if name == "triangle":
        v = v if rng.random() < 0.5 else -v  # apex up or down
        return np.abs(u) <= (v + 1.0) / 2.0
    if name == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= rng.uniform(0.3, 0.45))
    if name == "cross":
        t = rng.uniform(0.2, 0.35)
        return (np.abs(u) <= t) | (np.abs(v) <= t)
    if name == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if name == "hexagon":
        return (np.sqrt(3.0) * np.abs(u) + np.abs(v) * 0.866 <= np.sqrt(3.0)) & (np.abs(v) <= 1.0)
    if name == "star":
        theta = np.arctan2(v, u) + np.pi / 2  # one tip pointing up
        phase = np.abs(((theta * 5 / (2 * np.pi)) % 1.0) - 0.5) * 2  # 1 at the tips, 0 between them
        return np.sqrt(u * u + v * v) <= 0.42 + 0.58 * phase
    raise ValueError(name)


def _texture(h: int, w: int, colour: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """float32 [h, w, 3]: the shape's colour with a noise, stripe or checker texture."""
    kind = int(rng.integers(3))
    tex = np.broadcast_to(colour, (h, w, 3)).astype(np.float32)
    if kind == 1:
        period = rng.uniform(3.0, 10.0)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        angle = rng.uniform(0, np.pi)
        tex = tex + (25.0 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period))[..., None]
    elif kind == 2:
        cell = int(rng.integers(2, 6))
        yy, xx = np.mgrid[0:h, 0:w]
        tex = tex + np.where(((yy // cell + xx // cell) % 2)[..., None] == 1, 20.0, -20.0).astype(np.float32)
    return tex + _noise((h, w, 3), rng.uniform(4.0, 14.0), rng)


def _background(size: int, rng: np.random.Generator, clutter: int = CLUTTER) -> np.ndarray:
    """float32 [S, S, 3]: smooth colour field + noise + min(4, clutter)..clutter lines and arcs."""
    g = int(rng.integers(2, 6))
    grid = rng.uniform(30.0, 225.0, size=(g, g, 3)).astype(np.uint8)
    field = Image.fromarray(grid).resize((size, size), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(field)
    for _ in range(int(rng.integers(min(4, clutter), clutter + 1))):
        pts = rng.uniform(-0.1 * size, 1.1 * size, size=4).tolist()
        fill = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rng.random() < 0.6:
            draw.line(pts, fill=fill, width=int(rng.integers(1, 4)))
        else:
            x0, y0 = min(pts[0], pts[2]), min(pts[1], pts[3])
            box = [x0, y0, x0 + abs(pts[2] - pts[0]) + 4, y0 + abs(pts[3] - pts[1]) + 4]
            start = float(rng.uniform(0, 360))
            draw.arc(
                box, start, start + float(rng.uniform(40, 200)), fill=fill, width=int(rng.integers(1, 3))
            )
    bg = np.asarray(field, dtype=np.float32)
    return bg + _noise(bg.shape, rng.uniform(3.0, 12.0), rng)


def _pick_colour(bg_patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A colour that differs from the mean of the background under the shape (L1 > 120 when possible)."""
    mean = bg_patch.reshape(-1, 3).mean(axis=0)
    colour = rng.uniform(0.0, 255.0, size=3)
    for _ in range(8):
        if np.abs(colour - mean).sum() > 120.0:
            break
        colour = rng.uniform(0.0, 255.0, size=3)
    return colour.astype(np.float32)


def render_image(
    size: int,
    num_classes: int,
    rng: np.random.Generator,
    *,
    min_side: int = MIN_SIDE,
    max_shapes: int = MAX_SHAPES,
    clutter: int = CLUTTER,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Render one image -> (uint8 RGB [S, S, 3], annotations [{"category": int 0..K-1, "bbox": XYWH, "area"}])."""
    img = _background(size, rng, clutter)
    labels = np.full((size, size), -1, dtype=np.int32)
    n = int(rng.integers(min(3, max_shapes), max_shapes + 1))
    sides = np.exp(rng.uniform(np.log(min_side), np.log(0.8 * size), size=n))
    order = np.argsort(-(np.log(sides) + rng.normal(0.0, 0.4, size=n)), kind="stable")
    shapes = []
    for i, k in enumerate(order):
        cls = int(rng.integers(num_classes))
        stretch = 1.0 if SHAPE_NAMES[cls] in ("circle", "ring") else float(np.exp(rng.uniform(-0.25, 0.25)))
        h = max(min_side, round(float(sides[k]) * stretch))
        w = max(min_side, round(float(sides[k]) / stretch))
        y0 = int(rng.integers(-h // 5, size - h + h // 5 + 1))
        x0 = int(rng.integers(-w // 5, size - w + w // 5 + 1))
        mask = _shape_mask(SHAPE_NAMES[cls], h, w, rng)
        ys, xs = slice(max(y0, 0), min(y0 + h, size)), slice(max(x0, 0), min(x0 + w, size))
        local = (slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0))
        m = mask[local]
        tex = _texture(h, w, _pick_colour(img[ys, xs], rng), rng)[local]
        img[ys, xs][m] = tex[m]
        labels[ys, xs][m] = i
        shapes.append((cls, int(mask.sum()), ys, xs))
    annotations = []
    for i, (cls, total, ys, xs) in enumerate(shapes):
        vis = labels[ys, xs] == i
        count = int(vis.sum())
        if count < MIN_VISIBLE * total:
            continue
        rows, cols = np.nonzero(vis.any(axis=1))[0], np.nonzero(vis.any(axis=0))[0]
        x, y = xs.start + int(cols[0]), ys.start + int(rows[0])
        bw, bh = int(cols[-1]) - int(cols[0]) + 1, int(rows[-1]) - int(rows[0]) + 1
        annotations.append({"category": cls, "bbox": [float(x), float(y), float(bw), float(bh)],
                            "area": float(count), "segmentation": _visible_rle(vis, ys, xs, size)})  # fmt: skip
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), annotations


def _visible_rle(vis: np.ndarray, ys: slice, xs: slice, size: int) -> dict[str, Any]:
    """COCO RLE (pycocotools, counts as text) of exactly the shape's visible pixels in the S x S image."""
    from pycocotools import mask as mask_util

    full = np.zeros((size, size), dtype=np.uint8, order="F")
    full[ys, xs] = vis
    rle = mask_util.encode(full)
    return {"size": [size, size], "counts": rle["counts"].decode("ascii")}


def _check_args(num_images: int, size: int, num_classes: int, val_fraction: float, style: _Style) -> None:
    if num_images < 1:
        raise UserError(f"--images must be >= 1, got {num_images}.")
    if size < 64:
        raise UserError(
            f"--size must be >= 64 px (shapes range from --min-side {style.min_side} px to 0.8 x size), got {size}."
        )
    if not 1 <= num_classes <= len(SHAPE_NAMES):
        raise UserError(
            f"--classes must be in 1..{len(SHAPE_NAMES)} ({', '.join(SHAPE_NAMES)}), got {num_classes}."
        )
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}.")
    if round(num_images * val_fraction) >= num_images:
        raise UserError(
            f"--val-fraction {val_fraction} leaves no training image out of {num_images}; lower it."
        )
    if not 4 <= style.min_side <= 0.4 * size:
        raise UserError(
            f"--min-side must be in 4..{int(0.4 * size)} px (at most 0.4 x --size {size}), got {style.min_side}."
        )
    if style.max_shapes < 1:
        raise UserError(f"--max-shapes must be >= 1, got {style.max_shapes}.")
    if style.clutter < 0:
        raise UserError(f"--clutter must be >= 0 (0: no distractor lines), got {style.clutter}.")


def _prepare_out(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"output {out_dir} exists and is not a folder; choose another path.")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise UserError(f"output folder {out_dir} is not empty; choose a new folder or pass --overwrite.")
        for sub in ("train", "val", "annotations"):
            shutil.rmtree(os.path.join(out_dir, sub), ignore_errors=True)
    for sub in ("train", "val", "annotations"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)


def _write_image(job: tuple[str, int, int, int, int, _Style]) -> list[dict[str, Any]]:
    """Render image ``i`` and write it as PNG (temp file + rename); returns its annotations."""
    path, i, size, num_classes, seed, style = job
    image, annots = render_image(size, num_classes, np.random.default_rng([seed, i]), **style._asdict())
    with atomic_writer(path, "wb") as f:
        Image.fromarray(image).save(f, format="PNG", compress_level=1)
    return annots


def _render_all(
    jobs: list[tuple[str, int, int, int, int, _Style]], workers: int
) -> list[list[dict[str, Any]]]:
    """Run ``_write_image`` on every job, in worker processes when ``workers > 1`` (PNG encoding dominates)."""
    if workers <= 1:
        return [_write_image(job) for job in jobs]
    ctx = multiprocessing.get_context("spawn")  # safe even when the caller has torch / threads loaded
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(pool.map(_write_image, jobs, chunksize=max(1, len(jobs) // (4 * workers))))


def synthesize_dataset(
    out_dir: str | os.PathLike[str],
    *,
    num_images: int,
    size: int = 320,
    num_classes: int = 4,
    seed: int = 0,
    val_fraction: float = 0.2,
    overwrite: bool = False,
    workers: int = 0,
    min_side: int = MIN_SIDE,
    max_shapes: int = MAX_SHAPES,
    clutter: int = CLUTTER,
) -> dict[str, int]:
    """Write the dataset (layout in the module docstring); returns counts {train_images, val_images,
    train_annotations, val_annotations}. The last ``round(num_images * val_fraction)`` images form val.
    ``workers`` processes render the images (0: one per CPU core, up to 8, for >= 64 images); the output
    does not depend on it. ``min_side`` / ``max_shapes`` / ``clutter``: see the module docstring (larger
    ``min_side``, fewer shapes and less clutter make an easier set that a short training run learns)."""
    style = _Style(int(min_side), int(max_shapes), int(clutter))
    _check_args(num_images, size, num_classes, val_fraction, style)
    out_dir = os.fspath(out_dir)
    _prepare_out(out_dir, overwrite)
    num_val = round(num_images * val_fraction)
    categories = [{"id": c + 1, "name": SHAPE_NAMES[c], "supercategory": "shape"} for c in range(num_classes)]
    splits: dict[str, dict[str, list[dict[str, Any]]]] = {
        s: {"images": [], "annotations": []} for s in ("train", "val")
    }
    split_of = ["train" if i < num_images - num_val else "val" for i in range(num_images)]
    jobs = [
        (os.path.join(out_dir, split_of[i], f"{i + 1:06d}.png"), i, size, num_classes, seed, style)
        for i in range(num_images)
    ]
    if workers <= 0:
        workers = min(os.cpu_count() or 1, 8) if num_images >= 64 else 1
    ann_id = 0
    for i, annots in enumerate(_render_all(jobs, workers)):
        split = split_of[i]
        splits[split]["images"].append(
            {"id": i + 1, "file_name": f"{i + 1:06d}.png", "height": size, "width": size}
        )
        for a in annots:
            ann_id += 1
            ann = {"id": ann_id, "image_id": i + 1, "category_id": a["category"] + 1, "bbox": a["bbox"]}
            ann["segmentation"] = a["segmentation"]
            splits[split]["annotations"].append({**ann, "area": a["area"], "iscrowd": 0})
    info = {
        "description": "frcnn synthetic shapes",
        "seed": seed,
        "size": size,
        "num_images": num_images,
        **({} if style == _Style() else style._asdict()),
    }  # the default style keeps the old bytes
    for split, content in splits.items():
        doc = {"info": info, "licenses": [], **content, "categories": categories}
        atomic_write(
            os.path.join(out_dir, "annotations", f"instances_{split}.json"),
            json.dumps(doc, separators=(",", ":")).encode(),
        )
    return {f"{s}_{k}": len(v[k]) for s, v in splits.items() for k in ("images", "annotations")}
