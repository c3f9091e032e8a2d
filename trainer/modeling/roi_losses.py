"""ROI-heads training losses (detectron2 `StandardROIHeads.label_and_sample_proposals` + `_forward_box` in
training + `FastRCNNOutputLayers.losses`).

Per image (`label_and_sample_proposals`):
1. the valid proposals (the first num_proposals rows; the RPN output is constant here) with the image's
   ground-truth boxes appended after them (PROPOSAL_APPEND_GT);
2. Matcher(IOU_THRESHOLDS [0.5], IOU_LABELS [0, 1]) on IoU(ground truth, proposals); a matched proposal
   takes the class of its ground truth, an unmatched one the background class K (all K without ground truth);
3. subsample_labels(BATCH_SIZE_PER_IMAGE 512, POSITIVE_FRACTION 0.25, bg_label K): sampled foreground
   first, then sampled background.

Then the sampled boxes of all images are pooled (ROIAlignV2) and run through the box head and predictor in
one batch (rows padded to the largest sample; padding rows are dropped before the loss). Over the N sampled
proposals of the batch (images concatenated in order):

    loss_cls     = mean over N of softmax cross-entropy(logits [K+1], gt class)
    loss_box_reg = sum over foreground of smooth_l1(deltas of the gt class - gt deltas, SMOOTH_L1_BETA)
                   / max(N, 1) * BBOX_REG_LOSS_WEIGHT

gt deltas = Box2BoxTransform(10, 10, 5, 5).get_deltas(proposal, matched ground-truth box).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from frcnn.runtime.errors import ConfigError
from torch import Tensor

from .matcher import Matcher, pairwise_iou
from .rpn_losses import smooth_l1_loss, target_boxes
from .sampling import subsample_labels

if TYPE_CHECKING:
    from .box_transform import Box2BoxTransform
    from .roi_heads import StandardROIHeads

__all__ = [
    "FastRCNNLossSettings",
    "ROISamplingSettings",
    "SampledProposals",
    "fast_rcnn_losses",
    "label_and_sample_proposals",
    "roi_head_losses",
]


@dataclass(frozen=True)
class ROISamplingSettings:
    """How the ROI heads label and sample proposals in training (detectron2 MODEL.ROI_HEADS.*; built by
    ``StandardROIHeads.from_config``)."""

    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    iou_thresholds: tuple[float, ...] = (0.5,)
    iou_labels: tuple[int, ...] = (0, 1)
    proposal_append_gt: bool = True


@dataclass(frozen=True)
class FastRCNNLossSettings:
    """The box predictor's training-only settings (detectron2 MODEL.ROI_BOX_HEAD.*; built by
    ``FastRCNNOutputLayers.from_config``). loss_weight: "loss_cls" / "loss_box_reg" -> factor."""

    smooth_l1_beta: float = 0.0
    box_reg_loss_type: str = "smooth_l1"
    loss_weight: Mapping[str, float] = field(default_factory=lambda: {"loss_cls": 1.0, "loss_box_reg": 1.0})


class SampledProposals(NamedTuple):
    """One image's training sample: boxes Tensor[R, 4], gt_classes Tensor[R] int64 in [0, K] (K =
    background), gt_boxes Tensor[R, 4] (matched ground truth; the proposal itself when the image has none),
    gt_index Tensor[R] int64 (row of the matched ground truth; 0 when the image has none)."""

    boxes: Tensor
    gt_classes: Tensor
    gt_boxes: Tensor
    gt_index: Tensor


def _target_classes(
    targets: Sequence[dict[str, Tensor]], gt_boxes: Sequence[Tensor], num_classes: int
) -> list[Tensor]:
    """Per image Tensor[G] int64 classes on the boxes' device; raises ValueError on a bad shape or range."""
    classes = []
    for i, (target, boxes) in enumerate(zip(targets, gt_boxes)):
        if "classes" not in target:
            raise ValueError(f"targets[{i}] has no 'classes' (Tensor[G] int64 in [0, {num_classes})).")
        c = torch.as_tensor(target["classes"]).reshape(-1).to(device=boxes.device, dtype=torch.int64)
        if c.shape[0] != boxes.shape[0]:
            raise ValueError(f"targets[{i}] has {boxes.shape[0]} boxes but {c.shape[0]} classes.")
        if c.numel() and bool(((c < 0) | (c >= num_classes)).any()):
            raise ValueError(
                f"targets[{i}]['classes'] {c.tolist()} has values outside [0, {num_classes}); "
                f"MODEL.ROI_HEADS.NUM_CLASSES is {num_classes} — set it to the dataset's number of classes."
            )
        classes.append(c)
    return classes


def label_and_sample_proposals(
    settings: ROISamplingSettings,
    num_classes: int,
    proposals: Tensor,
    num_proposals: Tensor,
    targets: Sequence[dict[str, Tensor]],
) -> list[SampledProposals]:
    """Steps 1-3 of the module docstring. proposals: Tensor[B, P, 4] (rows >= num_proposals are padding);
    num_proposals: Tensor[B]; targets: per image {"boxes": [G, 4], "classes": [G]} -> one sample per image."""
    matcher = Matcher(settings.iou_thresholds, settings.iou_labels, allow_low_quality_matches=False)
    gt_boxes = target_boxes(targets, proposals.shape[0], proposals.device)
    gt_classes = _target_classes(targets, gt_boxes, num_classes)
    samples = []
    for i, count in enumerate(num_proposals.tolist()):
        boxes = proposals[i, : int(count)].detach().float()
        if settings.proposal_append_gt:
            boxes = torch.cat([boxes, gt_boxes[i]], dim=0)
        matched_idxs, matched_labels = matcher(pairwise_iou(gt_boxes[i], boxes))
        if gt_boxes[i].shape[0] > 0:
            classes = gt_classes[i][matched_idxs]
            classes = torch.where(matched_labels == 0, torch.full_like(classes, num_classes), classes)
            classes = torch.where(matched_labels == -1, torch.full_like(classes, -1), classes)
            matched_boxes = gt_boxes[i][matched_idxs]
        else:
            classes = torch.full_like(matched_idxs, num_classes)
            matched_boxes = boxes
        fg_idx, bg_idx = subsample_labels(
            classes, settings.batch_size_per_image, settings.positive_fraction, num_classes
        )
        idx = torch.cat([fg_idx, bg_idx], dim=0)
        samples.append(SampledProposals(boxes[idx], classes[idx], matched_boxes[idx], matched_idxs[idx]))
    return samples


def fast_rcnn_losses(
    settings: FastRCNNLossSettings,
    box2box_transform: Box2BoxTransform,
    num_classes: int,
    logits: Tensor,
    deltas: Tensor,
    proposal_boxes: Tensor,
    gt_classes: Tensor,
    gt_boxes: Tensor,
) -> dict[str, Tensor]:
    """{"loss_cls", "loss_box_reg"} (module docstring) over N sampled proposals.

    logits: Tensor[N, K+1]; deltas: Tensor[N, K*4] (or [N, 4] class-agnostic); proposal_boxes, gt_boxes:
    Tensor[N, 4]; gt_classes: Tensor[N] int64 in [0, K]; box2box_transform: the predictor's (10, 10, 5, 5).
    """
    if settings.box_reg_loss_type != "smooth_l1":
        raise ConfigError(
            f"MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE {settings.box_reg_loss_type!r} is not supported; "
            "use 'smooth_l1'."
        )
    num = gt_classes.numel()
    if num == 0:
        loss_cls = logits.sum() * 0.0
    else:
        loss_cls = F.cross_entropy(logits.float(), gt_classes, reduction="mean")

    fg = (gt_classes >= 0) & (gt_classes < num_classes)
    if deltas.shape[1] == 4:  # class-agnostic regression
        fg_deltas = deltas[fg]
    else:
        fg_rows = torch.nonzero(fg, as_tuple=True)[0]
        fg_deltas = deltas.view(num, num_classes, 4)[fg_rows, gt_classes[fg_rows]]
    gt_deltas = box2box_transform.get_deltas(proposal_boxes[fg], gt_boxes[fg])
    loss_box_reg = smooth_l1_loss(fg_deltas.float(), gt_deltas, settings.smooth_l1_beta, reduction="sum")
    loss_box_reg = loss_box_reg / max(num, 1)
    losses = {"loss_cls": loss_cls, "loss_box_reg": loss_box_reg}
    return {k: v * settings.loss_weight.get(k, 1.0) for k, v in losses.items()}


def roi_head_losses(
    roi_heads: StandardROIHeads,
    features: dict[str, Tensor],
    proposals: Tensor,
    num_proposals: Tensor,
    image_sizes: Tensor,
    targets: Sequence[dict[str, Tensor]],
) -> dict[str, Tensor]:
    """{"loss_cls", "loss_box_reg"} (+ "loss_mask" with MASK_ON, see mask_losses.py) for the ROI heads in
    training mode. Takes the module because it runs its
    ``box_predictions`` on the sampled proposals; the settings are its ``sampling`` and its predictor's
    ``loss_settings``.

    features: name -> Tensor[B, C, H_l, W_l]; proposals: Tensor[B, P, 4] (rows >= num_proposals padding);
    num_proposals: Tensor[B]; image_sizes: Tensor[B, 2] (unused: proposals are already clipped, ground truth
    is used as given); targets: per image {"boxes": [G, 4], "classes": [G]} (+ "masks" [G, H, W] with MASK_ON).
    """
    samples = label_and_sample_proposals(
        roi_heads.sampling, roi_heads.num_classes, proposals, num_proposals, targets
    )
    counts = [s.boxes.shape[0] for s in samples]
    rows = max(max(counts), 1)  # at least one (padding) row keeps the graph connected when nothing is sampled
    padded = proposals.new_zeros((len(samples), rows, 4), dtype=torch.float32)
    for i, s in enumerate(samples):
        padded[i, : counts[i]] = s.boxes
    logits, deltas = roi_heads.box_predictions(features, padded)  # [B, rows, K+1], [B, rows, C'*4]
    valid = torch.arange(rows, device=padded.device).unsqueeze(0) < torch.tensor(
        counts, device=padded.device
    ).unsqueeze(1)
    predictor = roi_heads.box_predictor
    losses = fast_rcnn_losses(
        predictor.loss_settings,
        predictor.box2box_transform,
        predictor.num_classes,
        logits[valid],
        deltas[valid],
        torch.cat([s.boxes for s in samples], dim=0),
        torch.cat([s.gt_classes for s in samples], dim=0),
        torch.cat([s.gt_boxes for s in samples], dim=0),
    )
    if roi_heads.mask_on:
        from .mask_losses import mask_targets_and_losses

        losses.update(mask_targets_and_losses(roi_heads, features, samples, targets))
    return losses
