"""``frcnn infer MODEL IMAGE|DIR... --output DIR``: run a deployed model on image files.

Writes, into ``--output``:
- ``<image stem>.png`` per input: the image with boxes (>= 2 px wide), labels and scores on a filled label
  background (Pillow ImageDraw);
- ``results.json``: COCO results format ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``
  (``image_id`` = 1-based position of the image in the run, ``category_id`` = class index + 1), each entry
  also naming ``file_name`` and ``category_name``;
- ``.frcnn-infer.json``: the files frcnn infer wrote there (only those may be replaced by a later run).
Mask R-CNN models: masks are blended into the drawing (half transparent) and each result has a COCO RLE
``segmentation``.
Detections below ``--score-threshold`` (default 0.5) are neither drawn nor written. Torch-free.

Order of work: the arguments, the model file, every image header and the output folder are checked before
the model loads and before anything is created (:mod:`frcnn.runtime.infer_output` has the output policy).
An image whose header is fine but whose pixels cannot be decoded (truncated data) is skipped and reported:
the others are written with a complete results.json, and the run exits with status 2 naming the skipped
images. Any other failure (model error, full disk, Ctrl-C) removes what the run had written.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from frcnn.runtime.backends import LOW_MEMORY_HELP, check_model_file, low_memory_options, resolve_backend
from frcnn.runtime.errors import INTERRUPTED_EXIT_CODE, UserError
from frcnn.runtime.fileio import atomic_write_json, atomic_writer
from frcnn.runtime.image_io import ImageError, probe_image, read_rgb
from frcnn.runtime.infer_output import RESULTS, OutputFolder, display, plan_outputs
from frcnn.runtime.masks import masks_to_rle
from PIL import Image, ImageDraw, ImageFont

__all__ = ["IMAGE_SUFFIXES", "add_parser", "collect_images", "draw_detections", "read_rgb", "run_infer"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40), (128, 0, 0)]  # fmt: skip


#: Opacity of the class colour over a mask's pixels.
MASK_ALPHA = 0.5


def _list_folder(folder: str) -> list[str]:
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        raise UserError(f"cannot list folder {display(folder)}: {exc.strerror or exc}; fix its permissions "
                        "or leave it out") from None  # fmt: skip
    found = []
    for name in names:
        path = os.path.join(folder, name)
        if not name.lower().endswith(IMAGE_SUFFIXES) or os.path.isdir(path):
            continue
        if not os.path.isfile(path):
            raise UserError(f"{display(path)} in folder {display(folder)} is a broken or looping symbolic link "
                            "(or not a regular file); fix or remove it")  # fmt: skip
        found.append(path)
    return found


def collect_images(inputs: Sequence[str]) -> list[str]:
    """Image files named directly or found (non-recursively, sorted) in the given folders.

    Raises UserError for a missing input, a folder without images, a broken symbolic link among a folder's
    images, or a file listed twice (directly or through its folder).
    """
    files: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = _list_folder(item)
            if not found:
                raise UserError(f"folder {display(item)} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise UserError(f"input {display(item)} is neither an image file nor a folder; check the path")
    seen: dict[str, str] = {}
    for path in files:
        real = os.path.realpath(path)
        if real in seen:
            raise UserError(f"image {display(path)} is given twice (also as {display(seen[real])}); name each "
                            "image once (a folder already includes its images)")  # fmt: skip
        seen[real] = path
    return files


def _probe_all(files: Sequence[str]) -> None:
    for k, path in enumerate(files, 1):
        try:
            probe_image(path)
        except ImageError as exc:
            where = f"image {k} of {len(files)}: " if len(files) > 1 else ""
            raise ImageError(f"{where}{exc}") from None


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


def _out_name(path: str, used: set[str]) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    name, k = f"{stem}.png", 1
    while name in used or name == RESULTS:
        name, k = f"{stem}_{k}.png", k + 1
    used.add(name)
    return name


def _check_args(args: argparse.Namespace) -> None:
    if args.batch < 1:
        raise UserError(f"--batch must be >= 1, got {args.batch}")
    if not (math.isfinite(args.score_threshold) and 0.0 <= args.score_threshold <= 1.0):
        raise UserError(f"--score-threshold must be a number in [0, 1], got {args.score_threshold}")
    check_model_file(args.model)
    resolve_backend(args.model, args.backend)


def _entries(path: str, image_id: int, dets: Any, names: list[str], keep: np.ndarray) -> list[dict[str, Any]]:
    """COCO result entries of the kept detections (with an RLE ``segmentation`` for Mask R-CNN models)."""
    masks = dets.masks[keep] if dets.masks is not None else None
    rles = masks_to_rle(masks) if masks is not None else [None] * int(keep.sum())
    out = []
    for box, score, cls, name, rle in zip(dets.boxes[keep], dets.scores[keep], dets.classes[keep], names, rles):
        x1, y1, x2, y2 = (float(v) for v in box)
        out.append({"image_id": image_id, "file_name": display(path), "category_id": int(cls) + 1,
                    "category_name": name, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score),
                    **({"segmentation": rle} if rle else {})})  # fmt: skip
    return out


def _run(args: argparse.Namespace, detector: Any, files: list[str], names: list[str], folder: OutputFolder,
         failed: list[str]) -> list[dict[str, Any]]:  # fmt: skip
    results: list[dict[str, Any]] = []
    for start in range(0, len(files), args.batch):
        chunk, images = [], []
        for k in range(start, min(start + args.batch, len(files))):
            try:
                images.append(read_rgb(files[k]))
                chunk.append(k)
            except ImageError as exc:
                failed.append(f"image {k + 1} of {len(files)}: {exc}")
                print(f"skipped {failed[-1]}", file=sys.stderr)
        for k, rgb, dets in zip(chunk, images, detector(images) if images else []):
            keep = dets.scores >= args.score_threshold
            labels = [detector.class_names[int(c)] for c in dets.classes[keep]]
            texts = [f"{n} {s:.2f}" for n, s in zip(labels, dets.scores[keep])]
            masks = dets.masks[keep] if dets.masks is not None else None
            drawn = draw_detections(rgb, dets.boxes[keep], texts, dets.classes[keep], masks)
            out_path = folder.path(names[k])
            _atomic_save(drawn, out_path)
            results += _entries(files[k], k + 1, dets, labels, keep)
            print(f"{display(files[k])}: {int(keep.sum())} detection(s) -> {display(out_path)}")
    return results


def run_infer(args: argparse.Namespace) -> int:
    from frcnn.runtime.detector import Detector

    _check_args(args)
    memory = low_memory_options([args.model], args.backend, args.low_memory)
    files = collect_images(args.inputs)
    _probe_all(files)
    used: set[str] = set()
    names = [_out_name(f, used) for f in files]
    previous = plan_outputs(args.output, args.inputs, files, names)
    detector = Detector(args.model, backend=args.backend, max_batch=args.batch, input_format="RGB", **memory)
    failed: list[str] = []
    try:
        with OutputFolder(args.output, previous) as folder:
            results = _run(args, detector, files, names, folder, failed)
            if len(failed) == len(files):
                raise UserError(f"no image could be read, nothing was written: {'; '.join(failed)}")
            json_path = folder.path(RESULTS)
            atomic_write_json(json_path, results)
            folder.finish()
    except KeyboardInterrupt:
        print("frcnn infer: interrupted; the files this run had written were removed", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except OSError as exc:  # full disk, file system gone read-only, ...
        raise UserError(f"cannot write into --output {display(args.output)}: {exc.strerror or exc}; the files "
                        "this run had written were removed: free space or pick another folder") from None
    finally:
        detector.close()
    print(f"wrote {display(json_path)} ({len(results)} detections on {len(files) - len(failed)} image(s))")
    if failed:
        raise UserError(f"{len(failed)} of {len(files)} image(s) could not be read and were skipped "
                        f"({'; '.join(failed)}); results.json holds the others")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("infer", help="run an exported model on images",
                                   description=__doc__.split("\n\n")[0] if __doc__ else None)  # fmt: skip
    parser.add_argument("model", metavar="MODEL", help="exported model: .onnx, or .engine / .plan (TensorRT), or a Triton URL "
                        "http://HOST:PORT/frcnn / grpc://HOST:PORT/frcnn (`frcnn serve`)")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE|DIR", help="image files or folders of images")
    parser.add_argument("--output", required=True, help="folder for the drawn PNGs and results.json")
    parser.add_argument("--score-threshold", type=float, default=0.5, help="minimum score kept (default 0.5)")
    parser.add_argument("--batch", type=int, default=1, help="images per model call (default 1)")
    parser.add_argument("--backend", default="auto", choices=("auto", "onnxruntime", "tensorrt", "triton"))
    parser.add_argument("--low-memory", action="store_true", help=LOW_MEMORY_HELP)
    parser.set_defaults(func=run_infer)
    return parser
