"""Shared by test_export.py and test_parity.py: one calibrated small model, exported once per session.

``parity_model()``: frcnn-small-R18 with random weights made non-degenerate (tests/model_utils.py: FrozenBN
statistics calibrated, wider RPN / box-delta weights); the foreground class weights lean towards the box
features of textured images and the background bias is raised until near-white images have no detection
above 0.05, so textured images get ~10-20 detections with spread-out scores (no saturated ties). ``exported()`` saves it as a trainer-style checkpoint (config YAML under "cfg") and runs the
real CLI on it once (``--engine`` too, which exits 3 here: no TensorRT); export happens at 320x320.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from model_utils import lively_model, random_images

EXPORT_HW = (320, 320)
WHITE = 255
BLANK_SIZES = ((320, 288), (288, 320))


def white_image(h: int, w: int) -> np.ndarray:
    """Nearly white (250..255 noise): no detections with the parity weights, and no exact score ties (a
    perfectly uniform image gives thousands of equal RPN logits, whose order float rounding decides)."""
    rng = np.random.default_rng(h * 1000 + w)
    return (WHITE - rng.integers(0, 6, (h, w, 3))).astype(np.uint8)


def batch(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    from frcnn.runtime.preprocess import batch_images

    return batch_images(images)


def _box_features(model: torch.nn.Module, images: np.ndarray, sizes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Box-head features [B, R, D] of the proposals, and the valid-row mask [B, R]."""
    with torch.no_grad():
        img, hw = torch.from_numpy(images), torch.from_numpy(sizes)
        feats = model.backbone(model.preprocess(img, hw))
        proposals, num, _ = model.proposal_generator(feats, hw)
        heads = model.roi_heads
        pooled = heads.box_pooler([feats[f] for f in heads.box_in_features], proposals)
        x = heads.box_head(pooled.flatten(0, 1)).reshape(proposals.shape[0], proposals.shape[1], -1)
    return x, torch.arange(x.shape[1]).unsqueeze(0) < num.unsqueeze(1)


@functools.lru_cache(maxsize=1)
def parity_model() -> tuple[object, torch.nn.Module]:
    """Foreground class weights lean towards the direction that separates textured from near-white box
    features (+ noise), so textured images get many detections and the near-white ones none."""
    torch.manual_seed(0)
    cfg, model = lively_model()
    tex_x, tex_ok = _box_features(model, *batch(textured([(288, 352)], 11)))
    blank_x, blank_ok = _box_features(model, *batch([white_image(*hw) for hw in BLANK_SIZES]))
    # in a batch with a larger image the padded canvas changes the RPN's top-k: calibrate that context too
    ctx_x, ctx_ok = _box_features(model, *batch([white_image(*BLANK_SIZES[0]), *textured([(416, 416)], 12)]))
    blank_x, blank_ok = torch.cat([blank_x, ctx_x[:1]]), torch.cat([blank_ok, ctx_ok[:1]])
    direction = tex_x[tex_ok].mean(0) - blank_x[blank_ok].mean(0)
    cls = model.roi_heads.box_predictor.cls_score
    with torch.no_grad():
        cls.weight.normal_(std=0.05)
        cls.weight[:-1] += 3.0 * direction / direction.norm() ** 2  # mean margin gap of 3 logits
        cls.bias.zero_()
        logits = cls(blank_x[blank_ok])
        blank_margin = float((logits[:, :-1] - logits[:, -1:]).max())
        # a class needs margin > blank_margin + 0.5 for a score above 0.05: none on near-white images
        cls.bias[-1] = blank_margin + 0.5 - math.log(0.05)
    return cfg, model


@dataclass
class Exported:
    path: Path
    checkpoint: Path
    exit_code: int
    stdout: str
    stderr: str
    seconds: float


@functools.lru_cache(maxsize=1)
def exported() -> Exported:
    from frcnn.export.cli import main
    from frcnn.trainer.checkpoint import save_checkpoint

    cfg, model = parity_model()
    folder = Path(tempfile.mkdtemp(prefix="frcnn-export-test-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    checkpoint = folder / "model_final.pth"
    save_checkpoint(checkpoint, model, cfg=cfg.dump(), iteration=0)
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(checkpoint), "--output", str(folder / "model.onnx"), "--opt-size", *map(str, EXPORT_HW),
                     "--max-size", "640", "640", "--max-batch", "4", "--engine", str(folder / "model.engine")])
    return Exported(folder / "model.onnx", checkpoint, code, out.getvalue(), err.getvalue(),
                    time.perf_counter() - start)


def textured(shapes: list[tuple[int, int]], seed: int) -> list[np.ndarray]:
    return random_images(shapes, seed)
