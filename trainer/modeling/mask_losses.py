"""Mask R-CNN's mask training loss (detectron2 ``StandardROIHeads._forward_mask`` in training +
``mask_rcnn_loss``), for ground-truth masks given as bitmasks.

Per image, the foreground proposals of the box sample (``gt_classes`` in [0, K)) are the mask head's
training ROIs (``select_foreground_proposals``). Their features are pooled with the mask pooler (ROIAlignV2,
14x14) on the *proposal* boxes, and the head predicts [N, K, 28, 28] logits. The target of a proposal is
detectron2's ``BitMasks.crop_and_resize``: its matched ground-truth mask (float 0/1, image pixels) pooled
with ROIAlign(28x28, spatial_scale 1, sampling_ratio 0, aligned=True) on the proposal box, then ``>= 0.5``.

    loss_mask = mean over N x 28 x 28 of BCE-with-logits(logits[n, gt_class[n]], target[n])

(channel 0 when class-agnostic); with no foreground proposal in the batch, 0 (connected to the logits).
detectron2's default ``INPUT.MASK_FORMAT`` "polygon" rasterises the polygons inside each box instead of
pooling a bitmask; this module implements the "bitmask" format's targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .roi_heads import StandardROIHeads
    from .roi_losses import SampledProposals

__all__ = ["mask_crop_and_resize", "mask_rcnn_loss", "mask_targets_and_losses"]


def mask_crop_and_resize(gt_masks: Tensor, gt_index: Tensor, boxes: Tensor, mask_size: int) -> Tensor:
    """detectron2 ``BitMasks.crop_and_resize`` of ``gt_masks[gt_index[n]]`` on ``boxes[n]``.

    Args:
        gt_masks: Tensor[G, H, W] bool / uint8 / float 0..1 (one image, resized-image pixels).
        gt_index: Tensor[N] int64 in [0, G); boxes: Tensor[N, 4] (x1, y1, x2, y2) in the same pixels.
    Returns:
        Tensor[N, mask_size, mask_size] bool.
    """
    from frcnn.plugins.roi_align_v2.torch_op import roi_align_v2

    num, num_gt = boxes.shape[0], gt_masks.shape[0]
    if num == 0:
        return torch.zeros((0, mask_size, mask_size), dtype=torch.bool, device=boxes.device)
    # Group the boxes by their ground truth: rois [G, R, 4], box r of group g pools mask g (padding rows 0).
    counts = torch.bincount(gt_index, minlength=num_gt)
    order = torch.argsort(gt_index, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(num, device=boxes.device) - starts[gt_index[order]]
    rois = boxes.new_zeros((num_gt, max(int(counts.max()), 1), 4), dtype=torch.float32)
    rois[gt_index[order], slot] = boxes[order].float()
    pooled = roi_align_v2(rois, [gt_masks.to(torch.float32).unsqueeze(1)], output_size=mask_size,
                          sampling_ratio=0, aligned=True, min_level=0)  # one level, stride 1  # fmt: skip
    out = torch.empty((num, mask_size, mask_size), dtype=torch.bool, device=boxes.device)
    out[order] = pooled[gt_index[order], slot, 0] >= 0.5
    return out


def mask_rcnn_loss(mask_logits: Tensor, gt_classes: Tensor, targets: Tensor) -> Tensor:
    """mask_logits: Tensor[N, C, M, M] (C = K, or 1 class-agnostic); gt_classes: Tensor[N] int64 in [0, K);
    targets: Tensor[N, M, M] bool -> scalar mean BCE-with-logits (0 when N == 0)."""
    if mask_logits.shape[0] == 0:
        return mask_logits.sum() * 0.0
    index = gt_classes if mask_logits.shape[1] > 1 else torch.zeros_like(gt_classes)
    logits = mask_logits[torch.arange(mask_logits.shape[0], device=mask_logits.device), index]
    return F.binary_cross_entropy_with_logits(logits.float(), targets.to(torch.float32), reduction="mean")


def mask_targets_and_losses(
    roi_heads: StandardROIHeads,
    features: dict[str, Tensor],
    samples: Sequence[SampledProposals],
    targets: Sequence[dict[str, Tensor]],
) -> dict[str, Tensor]:
    """{"loss_mask"} over the foreground proposals of ``samples`` (one per image, with ``gt_index``).

    targets[i]["masks"]: Tensor[G_i, H, W] (bool / uint8 / float 0..1), one per ground-truth box, in the same
    resized-image pixels as the boxes.
    """
    num_classes = roi_heads.num_classes
    fg_boxes, fg_classes, fg_targets = [], [], []
    for i, (sample, target) in enumerate(zip(samples, targets)):
        fg = (sample.gt_classes >= 0) & (sample.gt_classes < num_classes)
        if "masks" not in target:
            raise ValueError(f"targets[{i}] has no 'masks' (Tensor[G, H, W]); MODEL.MASK_ON training needs them.")
        masks = torch.as_tensor(target["masks"], device=sample.boxes.device)
        num_gt = int(torch.as_tensor(target["boxes"]).reshape(-1, 4).shape[0])
        if masks.dim() != 3 or masks.shape[0] != num_gt:
            raise ValueError(f"targets[{i}]['masks'] must be [G, H, W] with G = {num_gt} boxes, got "
                             f"{tuple(masks.shape)}.")
        boxes = sample.boxes[fg]
        fg_boxes.append(boxes)
        fg_classes.append(sample.gt_classes[fg])
        fg_targets.append(mask_crop_and_resize(masks, sample.gt_index[fg], boxes, _mask_side(roi_heads)))
    counts = [b.shape[0] for b in fg_boxes]
    rows = max(max(counts), 1)
    padded = fg_boxes[0].new_zeros((len(fg_boxes), rows, 4))
    for i, b in enumerate(fg_boxes):
        padded[i, : counts[i]] = b
    pooled = roi_heads.mask_pooler([features[f] for f in roi_heads.mask_in_features], padded)
    valid = torch.arange(rows, device=padded.device).unsqueeze(0) < torch.tensor(counts, device=padded.device)[:, None]
    logits = roi_heads.mask_head(pooled[valid])
    return {"loss_mask": mask_rcnn_loss(logits, torch.cat(fg_classes), torch.cat(fg_targets))}


def _mask_side(roi_heads: StandardROIHeads) -> int:
    """Side of the predicted masks: 2x the mask pooler's output (the deconv upsamples by 2)."""
    return 2 * int(roi_heads.mask_pooler.output_size)
