"""RPN training losses (detectron2 `RPN.label_and_sample_anchors` + `RPN.losses`).

Per image:
1. IoU of every ground-truth box with every anchor (all levels concatenated, (H, W, A) order per level);
2. Matcher(IOU_THRESHOLDS [0.3, 0.7], IOU_LABELS [0, -1, 1], allow_low_quality_matches=True): background,
   ignored, foreground; an image without ground truth is all background;
3. with BOUNDARY_THRESH >= 0, anchors reaching further than that outside the image are ignored (-1 ignores
   nothing — the default);
4. subsample_labels(BATCH_SIZE_PER_IMAGE 256, POSITIVE_FRACTION 0.5): the sampled anchors keep label 1 / 0,
   every other anchor becomes -1.

Then, over the batch, with normalizer = BATCH_SIZE_PER_IMAGE * num_images (not the number actually sampled):

    loss_rpn_cls = sum over sampled anchors of BCE-with-logits(logit, label) / normalizer * LOSS_WEIGHT
    loss_rpn_loc = sum over foreground anchors of smooth_l1(pred_delta - gt_delta, SMOOTH_L1_BETA)
                   / normalizer * BBOX_REG_LOSS_WEIGHT * LOSS_WEIGHT

gt_delta = Box2BoxTransform(1, 1, 1, 1).get_deltas(anchor, matched ground-truth box); SMOOTH_L1_BETA 0 is L1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from frcnn.runtime.errors import ConfigError
from torch import Tensor

from .matcher import Matcher, pairwise_iou
from .sampling import subsample_labels

if TYPE_CHECKING:
    from .box_transform import Box2BoxTransform

__all__ = ["RPNLossSettings", "label_and_sample_anchors", "rpn_losses", "smooth_l1_loss", "target_boxes"]


@dataclass(frozen=True)
class RPNLossSettings:
    """The RPN's training-only settings (detectron2 MODEL.RPN.*; built by ``RPN.from_config``).

    loss_weight maps "loss_rpn_cls" / "loss_rpn_loc" to their final factor (LOSS_WEIGHT, and
    BBOX_REG_LOSS_WEIGHT * LOSS_WEIGHT for the box term).
    """

    iou_thresholds: tuple[float, ...] = (0.3, 0.7)
    iou_labels: tuple[int, ...] = (0, -1, 1)
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    loss_weight: Mapping[str, float] = field(
        default_factory=lambda: {"loss_rpn_cls": 1.0, "loss_rpn_loc": 1.0}
    )
    anchor_boundary_thresh: float = -1.0
    box_reg_loss_type: str = "smooth_l1"
    smooth_l1_beta: float = 0.0


def smooth_l1_loss(input: Tensor, target: Tensor, beta: float, reduction: str = "sum") -> Tensor:
    """Elementwise smooth L1 (fvcore's formula): |d| if beta < 1e-5, else 0.5 d^2 / beta for |d| < beta and
    |d| - 0.5 beta otherwise. input, target: Tensor[...] -> summed scalar ("sum") or Tensor[...] ("none")."""
    if beta < 1e-5:
        loss = torch.abs(input - target)
    else:
        n = torch.abs(input - target)
        loss = torch.where(n < beta, 0.5 * n**2 / beta, n - 0.5 * beta)
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"smooth_l1_loss reduction must be 'sum' or 'none', got {reduction!r}.")


def target_boxes(targets: Sequence[dict[str, Tensor]], num_images: int, device: torch.device) -> list[Tensor]:
    """Per image ground-truth boxes as Tensor[G, 4] float32 on `device`; raises ValueError on a bad shape."""
    if len(targets) != num_images:
        raise ValueError(f"got {len(targets)} targets for {num_images} images; give one dict per image.")
    boxes = []
    for i, target in enumerate(targets):
        if "boxes" not in target:
            raise ValueError(f"targets[{i}] has no 'boxes' (Tensor[G, 4] x1y1x2y2 in resized-image pixels).")
        b = torch.as_tensor(target["boxes"])
        if b.numel() == 0:
            b = b.reshape(0, 4)
        if b.dim() != 2 or b.shape[1] != 4:
            raise ValueError(f"targets[{i}]['boxes'] must be [G, 4] (x1, y1, x2, y2), got {list(b.shape)}.")
        boxes.append(b.to(device=device, dtype=torch.float32))
    return boxes


def _inside_image(anchors: Tensor, height: Tensor, width: Tensor, boundary_thresh: float) -> Tensor:
    """Anchors [A, 4] lying within the image grown by boundary_thresh on every side -> Tensor[A] bool."""
    return (
        (anchors[:, 0] >= -boundary_thresh)
        & (anchors[:, 1] >= -boundary_thresh)
        & (anchors[:, 2] < width + boundary_thresh)
        & (anchors[:, 3] < height + boundary_thresh)
    )


def label_and_sample_anchors(
    settings: RPNLossSettings, anchors: Tensor, image_sizes: Tensor, gt_boxes: Sequence[Tensor]
) -> tuple[Tensor, Tensor]:
    """Steps 1-4 of the module docstring.

    anchors: Tensor[A, 4] (all levels); image_sizes: Tensor[B, 2] (h, w); gt_boxes: per image Tensor[G_i, 4].
    Returns gt_labels Tensor[B, A] int8 (1 sampled foreground, 0 sampled background, -1 not sampled) and
    matched_gt_boxes Tensor[B, A, 4] (the matched ground-truth box of each anchor; 0 for images without any).
    """
    matcher = Matcher(settings.iou_thresholds, settings.iou_labels, allow_low_quality_matches=True)
    sizes = image_sizes.to(device=anchors.device, dtype=anchors.dtype)
    gt_labels, matched_gt_boxes = [], []
    for i, gt_boxes_i in enumerate(gt_boxes):
        matched_idxs, labels = matcher(pairwise_iou(gt_boxes_i, anchors))
        if settings.anchor_boundary_thresh >= 0:
            inside = _inside_image(anchors, sizes[i, 0], sizes[i, 1], settings.anchor_boundary_thresh)
            labels = torch.where(inside, labels, torch.full_like(labels, -1))
        pos_idx, neg_idx = subsample_labels(
            labels, settings.batch_size_per_image, settings.positive_fraction, 0
        )
        sampled = torch.full_like(labels, -1)
        sampled[pos_idx] = 1
        sampled[neg_idx] = 0
        gt_labels.append(sampled)
        if gt_boxes_i.shape[0] == 0:
            matched_gt_boxes.append(torch.zeros_like(anchors))
        else:
            matched_gt_boxes.append(gt_boxes_i[matched_idxs])
    return torch.stack(gt_labels), torch.stack(matched_gt_boxes)


def rpn_losses(
    settings: RPNLossSettings,
    box2box_transform: Box2BoxTransform,
    anchors: list[Tensor],
    logits: list[Tensor],
    deltas: list[Tensor],
    image_sizes: Tensor,
    targets: Sequence[dict[str, Tensor]],
) -> dict[str, Tensor]:
    """{"loss_rpn_cls", "loss_rpn_loc"} scalars (module docstring).

    box2box_transform: the RPN's (weights 1, 1, 1, 1).

    anchors: per level Tensor[N_l, 4]; logits: per level Tensor[B, N_l]; deltas: per level Tensor[B, N_l, 4]
    (the RPN's `predict` outputs); image_sizes: Tensor[B, 2] (h, w); targets: per image {"boxes": [G, 4]}.
    """
    if settings.box_reg_loss_type != "smooth_l1":
        raise ConfigError(
            f"MODEL.RPN.BBOX_REG_LOSS_TYPE {settings.box_reg_loss_type!r} is not supported; use 'smooth_l1'."
        )
    all_anchors = torch.cat(list(anchors), dim=0)
    pred_logits = torch.cat(list(logits), dim=1)  # [B, A]
    pred_deltas = torch.cat(list(deltas), dim=1)  # [B, A, 4]
    num_images = pred_logits.shape[0]
    gt_boxes = target_boxes(targets, num_images, all_anchors.device)
    gt_labels, matched_gt_boxes = label_and_sample_anchors(settings, all_anchors, image_sizes, gt_boxes)

    pos_mask = gt_labels == 1  # [B, A]
    fg_anchors = all_anchors.unsqueeze(0).expand(num_images, -1, -1)[pos_mask]
    gt_deltas = box2box_transform.get_deltas(fg_anchors, matched_gt_boxes[pos_mask])
    beta = settings.smooth_l1_beta
    loss_loc = smooth_l1_loss(pred_deltas[pos_mask].float(), gt_deltas, beta, reduction="sum")

    valid_mask = gt_labels >= 0
    loss_cls = F.binary_cross_entropy_with_logits(
        pred_logits[valid_mask].float(), gt_labels[valid_mask].to(torch.float32), reduction="sum"
    )
    normalizer = settings.batch_size_per_image * num_images
    losses = {"loss_rpn_cls": loss_cls / normalizer, "loss_rpn_loc": loss_loc / normalizer}
    return {k: v * settings.loss_weight.get(k, 1.0) for k, v in losses.items()}
