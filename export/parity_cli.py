"""``frcnn parity WEIGHTS.pth MODEL.onnx|.engine --images DIR [--config CFG]``: PyTorch vs the deployed model.

Both models get the very same pre-processed batches (detectron2 test-time resize from the deployed model's
metadata, padding, batching) through polygraphy's ``Comparator`` with two runners: ``TorchRunner``
(frcnn.export.polygraphy_runners) and :class:`BackendRunner` (our ONNX Runtime / TensorRT backend). Two
checks per batch, both printed as a table:

1. raw tensors — polygraphy ``SimpleCompareFunc`` per output: ``num_detections`` exactly; ``boxes``,
   ``scores``, ``classes`` over the valid rows only (rows ``< num_detections``; the padding is not
   compared), with ``--box-atol`` / ``--score-atol`` and exact classes. Ties in score may legitimately
   reorder rows, so this check is reported but only ``--strict-raw`` makes it part of the verdict;
2. detection-aware — every detection of one side matched to one of the other (same class, IoU >=
   ``--min-iou``, |score delta| <= ``--score-atol``), per-class counts equal;
3. Mask R-CNN models (a ``masks`` output): each matched detection's raw 28x28 probabilities within
   ``--mask-atol`` and its two masks, pasted on their boxes (threshold 0.5), with IoU >= ``--mask-min-iou``.

Exit code 0 when every check of the verdict passes, 1 otherwise. Needs torch (the PyTorch side).
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from frcnn.runtime.contract import COUNT_OUTPUT, DETECTION_OUTPUT_NAMES, MASK_OUTPUT_NAMES
from frcnn.runtime.contract import OUTPUT_NAMES as RAW_OUTPUTS
from frcnn.runtime.errors import UserError
from frcnn.runtime.tolerances import (
    PARITY_BOX_ATOL,
    PARITY_MASK_ATOL,
    PARITY_MASK_MIN_IOU,
    PARITY_MIN_IOU,
    PARITY_SCORE_ATOL,
)


def _base_runner() -> Any:
    from polygraphy.backend.base import BaseRunner

    return BaseRunner


def make_backend_runner(path: str, backend: str = "auto", name: str | None = None, **options: Any) -> Any:
    """A polygraphy runner around :func:`frcnn.runtime.backends.create_backend` (ONNX Runtime / TensorRT)."""
    from frcnn.runtime.backends import create_backend, resolve_backend
    from frcnn.runtime.backends.base import polygraphy_input_metadata
    from polygraphy.common import TensorMetadata

    kind = resolve_backend(path, backend)

    class BackendRunner(_base_runner()):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(name=name or kind, prefix=f"frcnn-{kind}")
            self.backend = create_backend(path, kind, **options)

        def activate_impl(self) -> None:
            self.backend.activate()

        def get_input_metadata_impl(self) -> TensorMetadata:
            return polygraphy_input_metadata()

        def infer_impl(self, feed_dict: Mapping[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
            start = time.perf_counter()
            out = self.backend.infer(dict(feed_dict))
            self.inference_time = time.perf_counter() - start
            return OrderedDict((k, out[k]) for k in (*RAW_OUTPUTS, *MASK_OUTPUT_NAMES) if k in out)

        def deactivate_impl(self) -> None:
            self.backend.deactivate()

    return BackendRunner()


def valid_rows(outputs: Mapping[str, np.ndarray], counts: np.ndarray) -> OrderedDict[str, np.ndarray]:
    """num_detections as is; boxes / scores / classes as the concatenated first ``counts[i]`` rows of image i."""
    out: OrderedDict[str, np.ndarray] = OrderedDict([(COUNT_OUTPUT, np.asarray(outputs[COUNT_OUTPUT]))])
    for key in DETECTION_OUTPUT_NAMES:
        arr = np.asarray(outputs[key])
        out[key] = np.concatenate([arr[i, : int(n)] for i, n in enumerate(counts)], axis=0)
    return out


class ValidRowsCompareFunc:
    """polygraphy compare_func: ``SimpleCompareFunc`` on the valid rows (see the module docstring)."""

    def __init__(self, box_atol: float, score_atol: float) -> None:
        from polygraphy.comparator import SimpleCompareFunc

        atol = {"num_detections": 0.0, "boxes": box_atol, "scores": score_atol, "classes": 0.0}
        rtol = {"num_detections": 0.0, "boxes": 0.0, "scores": 0.0, "classes": 0.0}
        self.atol = atol
        self.simple = SimpleCompareFunc(check_shapes=True, atol=atol, rtol=rtol)

    def __call__(self, result0: Any, result1: Any) -> Any:
        from polygraphy.comparator.struct import IterationResult

        a = {k: np.asarray(result0[k].load() if hasattr(result0[k], "load") else result0[k]) for k in RAW_OUTPUTS}
        b = {k: np.asarray(result1[k].load() if hasattr(result1[k], "load") else result1[k]) for k in RAW_OUTPUTS}
        counts = np.minimum(a["num_detections"], b["num_detections"])
        r0 = IterationResult(valid_rows(a, counts), result0.runtime, result0.runner_name)
        r1 = IterationResult(valid_rows(b, counts), result1.runtime, result1.runner_name)
        return self.simple(r0, r1)


def class_count_problems(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> list[str]:
    """Per image, classes whose detection counts differ between the two sides."""
    problems = []
    for i in range(len(a["num_detections"])):
        ca = Counter(a["classes"][i, : int(a["num_detections"][i])].tolist())
        cb = Counter(b["classes"][i, : int(b["num_detections"][i])].tolist())
        problems += [f"image {i}: class {c}: {ca[c]} vs {cb[c]} detections" for c in sorted(set(ca) | set(cb))
                     if ca[c] != cb[c]]  # fmt: skip
    return problems


def load_feeds(images_dir: str, backend: Any, batch: int, limit: int | None) -> list[dict[str, np.ndarray]]:
    """Pre-processed batches of the images in ``images_dir`` (resize rule from the deployed model)."""
    from frcnn.runtime.detector import model_feed, parse_metadata
    from frcnn.runtime.image_io import read_rgb
    from frcnn.runtime.infer_cli import collect_images

    files = collect_images([images_dir])[:limit]
    info = parse_metadata(backend.metadata, backend.path)
    pre = info.preprocessor("RGB")
    return [model_feed(pre([read_rgb(f) for f in files[start:start + batch]]), info.size_divisibility)
            for start in range(0, len(files), batch)]  # fmt: skip


def _load_torch_model(weights: str, config: str | None, opts: Sequence[str]) -> Any:
    from frcnn.trainer.checkpoint import load_checkpoint
    from frcnn.trainer.modeling import build_model
    from frcnn.trainer.train_cli import build_config

    if not os.path.isfile(weights):
        raise UserError(f"checkpoint {weights} does not exist; pass the .pth / .pkl the model was exported from")
    if config is None:
        beside = os.path.join(os.path.dirname(os.path.abspath(weights)), "config.yaml")
        if not os.path.isfile(beside):
            raise UserError(f"no --config given and no config.yaml beside {weights}; pass --config CFG (the config "
                            "the checkpoint was trained / exported with)")
        config = beside
    cfg = build_config(config, list(opts))
    model = build_model(cfg).eval()
    load_checkpoint(model, weights, strict=True)
    return model


def _rows(raw: Any, det: Any, a: dict[str, np.ndarray], b: dict[str, np.ndarray], atol: dict[str, float],
          strict_raw: bool) -> Iterator[tuple[str, str, str, bool | None]]:  # fmt: skip
    """(check, result, tolerance, verdict) rows; verdict None: differs, but not part of the verdict."""
    for name in RAW_OUTPUTS:
        res = raw[name]
        counted = strict_raw or name == "num_detections"
        yield (f"raw {name}", f"max |diff| {float(res.max_absdiff):.3g}", f"atol {atol[name]:g}",
               True if bool(res) else (False if counted else None))  # fmt: skip
    rep = det["detections"]
    yield ("detections", f"{rep.matched} matched, min IoU {rep.min_iou:.4f}",
           f"max |dscore| {rep.max_score_delta:.2e}", len(rep.problems) == rep.mask_failures)  # fmt: skip
    if "masks" in a or "masks" in b:
        yield ("masks", f"{rep.masks_compared} compared, min IoU {rep.min_mask_iou:.4f}",
               f"max |dprob| {rep.max_mask_delta:.2e}", rep.mask_failures == 0)  # fmt: skip
    problems = class_count_problems(a, b)
    yield ("per-class counts", "equal" if not problems else "; ".join(problems[:3]), "exact", not problems)


def run_parity(args: argparse.Namespace) -> int:
    from frcnn.export.polygraphy_runners import DetectionCompareFunc, TorchRunner
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.CRITICAL  # our table reports the failures
    deployed = make_backend_runner(args.model, args.backend)
    deployed.backend.activate()
    feeds = load_feeds(args.images, deployed.backend, args.batch, args.max_images)
    model = _load_torch_model(args.weights, args.config, args.opts)
    runners = [TorchRunner(model, name="pytorch"), deployed]
    results = Comparator.run(runners, data_loader=feeds)
    raw_func = ValidRowsCompareFunc(args.box_atol, args.score_atol)
    det_func = DetectionCompareFunc(min_iou=args.min_iou, score_atol=args.score_atol, proposal_atol=args.box_atol,
                                    mask_atol=args.mask_atol, mask_min_iou=args.mask_min_iou)
    (_, torch_iters), (_, deployed_iters) = results[0], results[1]
    if args.precision != "fp32":
        from frcnn.runtime.match_rate import run_match_rate

        return run_match_rate(args, torch_iters, deployed_iters, deployed.name, len(feeds))
    print(f"parity: {args.weights} (pytorch) vs {args.model} ({deployed.name}) on {len(feeds)} batch(es) "
          f"from {args.images}")
    print(f"{'batch':>5}  {'check':<18} {'result':<42} {'tolerance':<20} verdict")
    passed = True
    for k, (r0, r1) in enumerate(zip(torch_iters, deployed_iters)):
        a = {n: np.asarray(r0[n]) for n in r0}
        b = {n: np.asarray(r1[n]) for n in r1}
        for check, result, tol, ok in _rows(raw_func(r0, r1), det_func(r0, r1), a, b, raw_func.atol,
                                            args.strict_raw):  # fmt: skip
            passed &= ok is not False
            verdict = {True: "PASS", False: "FAIL", None: "differs (row order; see --strict-raw)"}[ok]
            print(f"{k:>5}  {check:<18} {result:<42} {tol:<20} {verdict}")
        for problem in det_func.reports[-1].problems[:5]:
            print(f"       {problem}")
    print("PARITY PASSED" if passed else "PARITY FAILED")
    return 0 if passed else 1


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("parity", help="compare PyTorch with the deployed model",
                                   description=__doc__.split("\n\n")[0] if __doc__ else None)  # fmt: skip
    parser.add_argument("weights", metavar="WEIGHTS", help="PyTorch checkpoint (.pth / .pkl)")
    parser.add_argument("model", metavar="MODEL", help="deployed model (.onnx, .engine / .plan)")
    parser.add_argument("--images", required=True, help="folder of images to compare on")
    parser.add_argument("--config", help="config of the checkpoint (default: config.yaml beside WEIGHTS)")
    parser.add_argument("--backend", default="auto", choices=("auto", "onnxruntime", "tensorrt"))
    parser.add_argument("--batch", type=int, default=1, help="images per batch (default 1)")
    parser.add_argument("--max-images", type=int, default=None, help="compare at most this many images")
    parser.add_argument("--box-atol", type=float, default=PARITY_BOX_ATOL,
                        help=f"box tolerance in pixels (default {PARITY_BOX_ATOL:g})")
    parser.add_argument("--score-atol", type=float, default=PARITY_SCORE_ATOL,
                        help=f"score tolerance (default {PARITY_SCORE_ATOL:g})")
    parser.add_argument("--min-iou", type=float, default=PARITY_MIN_IOU,
                        help=f"IoU for a detection match (default {PARITY_MIN_IOU:g})")
    parser.add_argument("--mask-atol", type=float, default=PARITY_MASK_ATOL,
                        help=f"Mask R-CNN: raw mask probability tolerance (default {PARITY_MASK_ATOL:g})")
    parser.add_argument("--mask-min-iou", type=float, default=PARITY_MASK_MIN_IOU,
                        help=f"Mask R-CNN: minimum IoU of pasted masks (default {PARITY_MASK_MIN_IOU:g})")
    parser.add_argument("--strict-raw", action="store_true",
                        help="also fail on raw boxes/scores/classes row differences (not only num_detections)")
    parser.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                        help="int8: IoU-matched detections, looser scores; reports the match rate (docs/int8.md)")
    parser.add_argument("--min-score", type=float, default=0.0,
                        help="--precision int8: count only reference detections scoring >= this (default 0: all)")
    parser.add_argument("--opts", nargs="*", default=[], metavar="KEY VALUE", help="config overrides")
    parser.set_defaults(func=run_parity)
    return parser
