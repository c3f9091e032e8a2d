"""``frcnn infer MODEL IMAGE|DIR... --output DIR``: run a deployed model on image files.

Writes, into ``--output``:
- ``<image stem>.png`` per input: the image with boxes (>= 2 px wide), labels and scores on a filled label
  background (Pillow ImageDraw);
- ``results.json``: COCO results format ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``
  (``image_id`` = 1-based position of the image in the run, ``category_id`` = class index + 1), each entry
  also naming ``file_name`` and ``category_name``.
Mask R-CNN models: masks are blended into the drawing (half transparent) and each result has a COCO RLE
``segmentation``.
Detections below ``--score-threshold`` (default 0.5) are neither drawn nor written. Torch-free.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from frcnn.runtime.errors import UserError
from frcnn.runtime.fileio import atomic_write_json, atomic_writer
from frcnn.runtime.masks import masks_to_rle
from PIL import Image, ImageDraw, ImageFont, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40), (128, 0, 0)]  # fmt: skip


#: Opacity of the class colour over a mask's pixels.
MASK_ALPHA = 0.5


def collect_images(inputs: Sequence[str]) -> list[str]:
    """Image files named directly or found (non-recursively, sorted) in the given folders."""
    files: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(IMAGE_SUFFIXES))
            if not found:
                raise UserError(f"folder {item} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise UserError(f"input {item} is neither an image file nor a folder; check the path")
    return files


def read_rgb(path: str) -> np.ndarray:
    """uint8 [H, W, 3] RGB with EXIF orientation applied (as the trainer reads images)."""
    try:
        with Image.open(path) as f:
            return np.asarray(ImageOps.exif_transpose(f).convert("RGB"))
    except (OSError, SyntaxError) as exc:
        raise UserError(f"cannot read image {path}: {exc}; replace the file or leave it out") from None


def draw_detections(rgb: np.ndarray, boxes: np.ndarray, labels: Sequence[str], classes: np.ndarray,
                    masks: np.ndarray | None = None) -> Image.Image:  # fmt: skip
    """The image with each box outlined (width >= 2 px) and ``labels[i]`` on a filled background above it;
    ``masks`` (bool [N, H, W], Mask R-CNN) are blended in first, half transparent, in the box colour."""
    if masks is not None:
        rgb = rgb.astype(np.float32)
        for mask, cls in zip(masks, classes):
            color = np.array(PALETTE[int(cls) % len(PALETTE)], np.float32)
            rgb[mask] = MASK_ALPHA * color + (1 - MASK_ALPHA) * rgb[mask]
        rgb = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    h, w = rgb.shape[:2]
    width = max(2, round(min(h, w) / 300))
    font = ImageFont.load_default(size=max(11, round(min(h, w) / 40)))
    for box, label, cls in zip(boxes, labels, classes):
        color = PALETTE[int(cls) % len(PALETTE)]
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle((x1, y1, x2, y2), outline=color, width=width)
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        tw, th = right - left + 4, bottom - top + 4
        ty = y1 - th if y1 - th >= 0 else y1  # above the box, or inside it at the image top
        draw.rectangle((x1, ty, x1 + tw, ty + th), fill=color)
        draw.text((x1 + 2 - left, ty + 2 - top), label, fill=(255, 255, 255), font=font)
    return image


def _atomic_save(image: Image.Image, path: str) -> None:
    with atomic_writer(path, "wb") as f:
        image.save(f, format="PNG")


def _atomic_json(obj: Any, path: str) -> None:
    atomic_write_json(path, obj)


def _out_name(path: str, used: set[str]) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    name, k = f"{stem}.png", 1
    while name in used:
        name, k = f"{stem}_{k}.png", k + 1
    used.add(name)
    return name


def run_infer(args: argparse.Namespace) -> int:
    from frcnn.runtime.detector import Detector

    files = collect_images(args.inputs)
    os.makedirs(args.output, exist_ok=True)
    if args.batch < 1:
        raise UserError(f"--batch must be >= 1, got {args.batch}")
    detector = Detector(args.model, backend=args.backend, max_batch=args.batch, input_format="RGB")
    results: list[dict[str, Any]] = []
    used: set[str] = set()
    for start in range(0, len(files), args.batch):
        chunk = files[start:start + args.batch]
        images = [read_rgb(f) for f in chunk]
        for k, (path, rgb, dets) in enumerate(zip(chunk, images, detector(images))):
            keep = dets.scores >= args.score_threshold
            boxes, scores, classes = dets.boxes[keep], dets.scores[keep], dets.classes[keep]
            masks = dets.masks[keep] if dets.masks is not None else None
            rles = masks_to_rle(masks) if masks is not None else [None] * len(scores)
            names = [detector.class_names[int(c)] for c in classes]
            labels = [f"{n} {s:.2f}" for n, s in zip(names, scores)]
            out_path = os.path.join(args.output, _out_name(path, used))
            _atomic_save(draw_detections(rgb, boxes, labels, classes, masks), out_path)
            image_id = start + k + 1
            for box, score, cls, name, rle in zip(boxes, scores, classes, names, rles):
                x1, y1, x2, y2 = (float(v) for v in box)
                results.append({"image_id": image_id, "file_name": path, "category_id": int(cls) + 1,
                                "category_name": name, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "score": float(score), **({"segmentation": rle} if rle else {})})  # fmt: skip
            print(f"{path}: {len(scores)} detection(s) -> {out_path}")
    json_path = os.path.join(args.output, "results.json")
    _atomic_json(results, json_path)
    print(f"wrote {json_path} ({len(results)} detections on {len(files)} image(s))")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("infer", help="run an exported model on images",
                                   description=__doc__.split("\n\n")[0] if __doc__ else None)  # fmt: skip
    parser.add_argument("model", metavar="MODEL", help="exported model: .onnx, or .engine / .plan (TensorRT)")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE|DIR", help="image files or folders of images")
    parser.add_argument("--output", required=True, help="folder for the drawn PNGs and results.json")
    parser.add_argument("--score-threshold", type=float, default=0.5, help="minimum score kept (default 0.5)")
    parser.add_argument("--batch", type=int, default=1, help="images per model call (default 1)")
    parser.add_argument("--backend", default="auto", choices=("auto", "onnxruntime", "tensorrt"))
    parser.set_defaults(func=run_infer)
    return parser
