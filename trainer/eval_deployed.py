"""The deployed-model path of ``frcnn eval``: COCO AP of an ONNX / TensorRT model (torch-free).

``evaluate_deployed(model_path, data_dir, split, output=None, batch_size=1)`` runs a :class:`Detector` on
every image of the split (read like the trainer reads them: Pillow, EXIF orientation, channel order from
the model's metadata) and scores the detections with the trainer's ``COCOEvaluator`` (pycocotools). With
``frcnn eval MODEL --data DIR --weights W.pth --config CFG`` the PyTorch model is evaluated too and the
AP delta (deployed - PyTorch) is printed.
"""

from __future__ import annotations

import os
from typing import Any

from frcnn.runtime.errors import UserError


def evaluate_deployed(model_path: str, data_dir: str, split: str = "val", output: str | None = None,
                      batch_size: int = 1, backend: str = "auto") -> dict[str, float]:  # fmt: skip
    """COCO bbox metrics (0..1) of the deployed model on ``data_dir``'s ``split``."""
    from frcnn.runtime.detector import Detector
    from frcnn.runtime.image_io import read_rgb
    from frcnn.trainer.data.coco import load_coco_split
    from frcnn.trainer.evaluation import COCOEvaluator

    if not os.path.isdir(data_dir):
        raise UserError(f"dataset folder {data_dir} does not exist (expected annotations/instances_{split}.json "
                        f"and {split}/ inside)")
    dicts, meta = load_coco_split(data_dir, split)
    detector = Detector(model_path, backend=backend, max_batch=max(1, int(batch_size)), input_format="RGB")
    if len(detector.class_names) != meta.num_classes:
        raise UserError(f"the '{split}' split has {meta.num_classes} classes but {model_path} has "
                        f"{len(detector.class_names)} ({detector.class_names}); evaluate on the dataset the "
                        "model was trained for")
    evaluator = COCOEvaluator(meta, output_dir=output)
    evaluator.reset()
    for start in range(0, len(dicts), batch_size):
        records = dicts[start:start + batch_size]
        dets = detector([read_rgb(r["file_name"]) for r in records])
        evaluator.process([{"image_id": r["image_id"]} for r in records],
                          [{"boxes": d.boxes, "scores": d.scores, "classes": d.classes, "masks": d.masks}
                           for d in dets])  # fmt: skip
    return evaluator.evaluate()


def format_delta(deployed: dict[str, float], reference: dict[str, float]) -> str:
    """One line per main metric: deployed, PyTorch and the delta, in AP points (x100)."""
    lines = [f"{'metric':>9} | {'deployed':>8} | {'pytorch':>8} | {'delta':>7}"]
    for key in ("AP", "AP50", "AP75", "segm/AP", "segm/AP50", "segm/AP75"):
        if key in deployed and key in reference:
            d, r = 100 * deployed[key], 100 * reference[key]
            lines.append(f"{key:>9} | {d:>8.2f} | {r:>8.2f} | {d - r:>+7.2f}")
    return "\n".join(lines)


def run_deployed(args: Any, eval_checkpoint: Any, format_table: Any) -> dict[str, float]:
    """``frcnn eval MODEL ...``: deployed metrics; with ``--weights`` also PyTorch's and the delta table."""
    from frcnn.runtime.backends import check_model_file
    from frcnn.runtime.infer_output import check_output_folder

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_model_file(args.model)
    if args.output:
        check_output_folder(args.output)
    metrics = evaluate_deployed(args.model, args.data, args.split, args.output, args.batch_size)
    if args.weights:
        output, args.output = args.output, None  # the deployed model's results JSON is the one written
        reference = eval_checkpoint(args)
        args.output = output
        print(format_table(reference, title=f"COCO bbox AP (%) of {args.weights} (PyTorch) on {args.data} "
                                            f"[{args.split}]"))  # fmt: skip
        print(format_delta(metrics, reference))
        metrics = {**metrics, "delta_AP": metrics["AP"] - reference["AP"]}
        if "segm/AP" in metrics and "segm/AP" in reference:
            metrics["delta_segm/AP"] = metrics["segm/AP"] - reference["segm/AP"]
    return metrics
