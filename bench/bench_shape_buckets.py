"""Cost of opt-in shape bucketing on real photos: detections of the padded-to-32 input vs the bucket-padded input.

    pip install scikit-image   # the photos (bench only; the tests do not need it)
    python bench/bench_shape_buckets.py [--config COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml]
        [--weights model.pth] [--out JSON]

Photos: the colour photographs bundled in the scikit-image wheel (no network): astronaut, coffee, chelsea,
rocket, hubble_deep_field, retina, camera (grey -> 3 channels). Each is resized by detectron2's
ResizeShortestEdge of the config (frcnn.runtime.preprocess), padded to 32 (unbucketed) or to the default
bucket ladder (frcnn.runtime.shape_buckets), and run through the PyTorch model; the runtime backends are exact
to PyTorch on the same feed (tests/test_runtime.py, tests/test_shape_buckets.py), so this is the runtime's
difference too. Weights: ``--weights`` (a detectron2 / frcnn checkpoint, loaded strictly by
frcnn.trainer.checkpoint.load_checkpoint); without it -- as here, where no pretrained weights exist offline --
tests/model_utils.lively_model (random init, FrozenBN calibrated on one image, heads scaled to give
detections): the numbers then measure how much the padded area moves the outputs, not accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "camera")


def load_photos() -> dict[str, np.ndarray]:
    """name -> uint8 BGR [H, W, 3] (scikit-image gives RGB / grey)."""
    import skimage.data

    out = {}
    for name in PHOTOS:
        img = getattr(skimage.data, name)()
        img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
        out[name] = np.ascontiguousarray(img[..., ::-1])
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes a [N, 4] and b [M, 4] (x1, y1, x2, y2)."""
    lt, rb = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def compare(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, float]:
    """Greedy same-class matching of image 0's detections: counts at IoU >= 0.99 and >= 0.5, score deltas."""
    n, m = int(ref["num_detections"][0]), int(got["num_detections"][0])
    rb, gb = ref["boxes"][0, :n], got["boxes"][0, :m]
    iou = _iou(rb, gb) * (ref["classes"][0, :n, None] == got["classes"][0, None, :m])
    exact, loose, deltas, used = 0, 0, [], set()
    for i in np.argsort(-ref["scores"][0, :n]):
        order = [j for j in np.argsort(-iou[i]) if j not in used]
        if not order or iou[i, order[0]] < 0.5:
            continue
        j = order[0]
        used.add(j)
        loose += 1
        delta = abs(float(ref["scores"][0, i] - got["scores"][0, j]))
        deltas.append(delta)
        exact += int(iou[i, j] >= 0.99 and delta <= 1e-3)
    return {"n_unbucketed": n, "n_bucketed": m, "match_iou99_score1e-3": exact, "match_iou50": loose,
            "max_score_delta": max(deltas, default=0.0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml")
    parser.add_argument("--weights", type=Path, default=None, help="checkpoint to load (default: random)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "shape_buckets.json")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO / "tests"))
    import torch
    from frcnn.runtime.detector import MIN_PADDED_SIDE, pad_to_min_side
    from frcnn.runtime.fileio import atomic_write
    from frcnn.runtime.preprocess import Preprocessor
    from frcnn.runtime.shape_buckets import default_sides, pad_to_bucket
    from model_utils import lively_model

    cfg, model = lively_model(args.config)
    if args.weights is not None:
        from frcnn.trainer.checkpoint import load_checkpoint

        load_checkpoint(model, args.weights)
    short, max_size = cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
    prep, sides = Preprocessor(short, max_size), default_sides(short, max_size, 32)
    rows = []
    for name, img in load_photos().items():
        batch = prep([img])
        plain = pad_to_min_side(batch["images"], MIN_PADDED_SIDE, 32)
        bucketed = pad_to_bucket(plain, sides)
        outs = []
        start = time.perf_counter()
        for images in (plain, bucketed):
            with torch.no_grad():
                out = model(torch.from_numpy(images), torch.from_numpy(batch["image_sizes"]))
            outs.append({k: v.numpy() for k, v in out.items()})
        row = {"photo": name, "original": list(img.shape[:2]), "resized": batch["image_sizes"][0].tolist(),
               "padded": list(plain.shape[2:]), "bucket": list(bucketed.shape[2:]),
               **compare(outs[0], outs[1]), "seconds": round(time.perf_counter() - start, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    weights = str(args.weights) if args.weights else "tests/model_utils.lively_model (random, no pretrained weights)"
    result = {"config": args.config, "weights": weights, "ladder": list(sides), "torch": torch.__version__, "rows": rows}
    atomic_write(args.out, json.dumps(result, indent=2).encode())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
