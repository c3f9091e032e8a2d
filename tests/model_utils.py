"""Test helpers: models with random weights that still give non-degenerate outputs.

A freshly initialised FrozenBN is the identity, so random ResNet activations grow to ~1e3 and every score
collapses. `calibrate_frozen_bn` sets each FrozenBN's statistics to its input's batch statistics (unit-scale
activations, as with trained weights); `lively_heads` widens the head weights so proposals and class scores
spread out and detections above the 0.05 threshold exist.
"""

from __future__ import annotations

import torch
from frcnn.trainer.config import get_cfg, model_zoo_config
from frcnn.trainer.modeling import build_model
from frcnn.trainer.modeling.layers import FrozenBatchNorm2d


def calibrate_frozen_bn(model: torch.nn.Module, images: torch.Tensor, image_sizes: torch.Tensor) -> None:
    """One forward pass of the backbone; each FrozenBN pre-hook sets its statistics before its layer runs."""

    def set_stats(module, inputs):
        module.running_mean.copy_(inputs[0].mean((0, 2, 3)))
        module.running_var.copy_(inputs[0].var((0, 2, 3)))

    hooks = [m.register_forward_pre_hook(set_stats) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(hooks) > 10, "calibrate_frozen_bn needs a FrozenBN backbone (MODEL.RESNETS.NORM FrozenBN)"
    with torch.no_grad():
        model.backbone(model.preprocess(images, image_sizes))
    for h in hooks:
        h.remove()


def lively_heads(model: torch.nn.Module) -> None:
    """Wider RPN objectness / class-score / box-delta weights than detectron2's init (std 0.01 / 0.001)."""
    with torch.no_grad():
        model.proposal_generator.rpn_head.objectness_logits.weight.normal_(std=0.3)
        model.roi_heads.box_predictor.cls_score.weight.normal_(std=0.3)
        model.roi_heads.box_predictor.bbox_pred.weight.normal_(std=0.05)


def random_images(shapes: list[tuple[int, int]], seed: int) -> list:
    """uint8 HWC BGR images with smooth structure (blobs), deterministic for a seed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for h, w in shapes:
        img = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        img = np.repeat(np.repeat(img, 8, axis=0), 8, axis=1)[:h, :w]
        out.append(np.ascontiguousarray(img))
    return out


def lively_model(config: str = "frcnn-small-R18.yaml", *overrides: str, seed: int = 0,
                 calib_hw: tuple[int, int] = (224, 288)):
    """build_model(config + FrozenBN + overrides), calibrated on a random image, lively heads, eval mode."""
    torch.manual_seed(seed)
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo_config(config))
    cfg.merge_from_list(["MODEL.RESNETS.NORM", "FrozenBN", *overrides])
    model = build_model(cfg).eval()
    (img,) = random_images([calib_hw], seed + 99)
    images = torch.from_numpy(img).permute(2, 0, 1)[None].contiguous()
    calibrate_frozen_bn(model, images, torch.tensor([calib_hw], dtype=torch.int32))
    lively_heads(model)
    return cfg, model
