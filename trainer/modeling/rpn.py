"""Region Proposal Network: StandardRPNHead, batched fixed-size proposal selection, the RPN module.

Proposal selection reproduces detectron2's `find_top_rpn_proposals` per image, in a batched fixed-size form
that exports to a static graph (no .item(), no boolean indexing, no data-dependent Python branches):

1. per level, the top min(pre_nms_topk, H*W*A) anchors by objectness logit (descending);
2. decode their deltas with Box2BoxTransform(1, 1, 1, 1);
3. a candidate is invalid when its box or logit is not finite (detectron2 drops it), or when its box, clipped
   to the image (h, w), has width or height <= min_box_size (detectron2's `nonempty`); invalid candidates get
   score -inf and BatchedNMS (score_threshold = -inf) never considers them;
4. BatchedNMS with groups = level index, IoU nms_thresh, max_output = post_nms_topk (per image, as detectron2
   does since v0.1: the top-k is taken per image, not over the batch) and max_candidates (the GPU kernel's
   cap) = the next power of two >= pre_nms_topk * levels, so the TensorRT engine is exact too;
5. proposals are gathered by the returned indices (sorted by logit); padding rows are 0.

Training losses (anchor matching, sampling, BCE + L1) plug in through `RPN.losses`; they live in their own
files with the trainer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from frcnn.runtime.errors import ConfigError
from torch import Tensor, nn

from .anchors import DefaultAnchorGenerator, build_anchor_generator
from .box_transform import Box2BoxTransform
from .layers import ShapeSpec
from .rpn_losses import RPNLossSettings, rpn_losses

__all__ = ["RPN", "StandardRPNHead", "build_rpn", "clip_boxes", "find_top_rpn_proposals"]


class StandardRPNHead(nn.Module):
    """Shared 3x3 conv + ReLU, then 1x1 convs for objectness logits (A) and anchor deltas (A * 4).

    Keys: conv.{weight,bias}, objectness_logits.{weight,bias}, anchor_deltas.{weight,bias}.
    """

    def __init__(self, *, in_channels: int, num_anchors: int, box_dim: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)
        self.objectness_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1, stride=1)
        self.anchor_deltas = nn.Conv2d(in_channels, num_anchors * box_dim, kernel_size=1, stride=1)
        for layer in (self.conv, self.objectness_logits, self.anchor_deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.constant_(layer.bias, 0)  # type: ignore[arg-type]

    @classmethod
    def from_config(cls, cfg, input_shape: list[ShapeSpec], anchor_generator: DefaultAnchorGenerator) -> dict:
        in_channels = {int(s.channels or 0) for s in input_shape}
        if len(in_channels) != 1:
            raise ConfigError(
                f"RPN input features must all have the same channels, got {sorted(in_channels)}."
            )
        channels = in_channels.pop()
        conv_dims = list(cfg.MODEL.RPN.CONV_DIMS)
        if conv_dims not in ([-1], [channels]):
            raise ConfigError(
                f"MODEL.RPN.CONV_DIMS {conv_dims} is not supported; use [-1] (one conv with the input width)."
            )
        num_anchors = set(anchor_generator.num_cell_anchors)
        if len(num_anchors) != 1:
            raise ConfigError(
                "every level must have the same number of anchors per location for the RPN head."
            )
        return {
            "in_channels": channels,
            "num_anchors": num_anchors.pop(),
            "box_dim": anchor_generator.box_dim,
        }

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """features: per level Tensor[B, C, H, W] ->
        (per level logits Tensor[B, A, H, W], per level deltas Tensor[B, A*4, H, W])."""
        logits, deltas = [], []
        for x in features:
            t = F.relu(self.conv(x))
            logits.append(self.objectness_logits(t))
            deltas.append(self.anchor_deltas(t))
        return logits, deltas


def clip_boxes(boxes: Tensor, image_sizes: Tensor) -> Tensor:
    """Clip boxes to their image, x to [0, w] and y to [0, h] (detectron2 `Boxes.clip`).

    boxes: Tensor[B, N, 4] float; image_sizes: Tensor[B, 2] (h, w) -> Tensor[B, N, 4].
    """
    sizes = image_sizes.to(boxes.dtype)
    h = sizes[:, 0].view(-1, 1)
    w = sizes[:, 1].view(-1, 1)
    x1 = torch.minimum(boxes[..., 0].clamp(min=0), w)
    y1 = torch.minimum(boxes[..., 1].clamp(min=0), h)
    x2 = torch.minimum(boxes[..., 2].clamp(min=0), w)
    y2 = torch.minimum(boxes[..., 3].clamp(min=0), h)
    return torch.stack((x1, y1, x2, y2), dim=-1)


def _top_candidates(
    anchors: Sequence[Tensor],
    logits: Sequence[Tensor],
    deltas: Sequence[Tensor],
    box2box: Box2BoxTransform,
    pre_nms_topk: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-level top-k by logit, decoded. Returns boxes [B, M, 4], scores [B, M], level ids [M] int32."""
    boxes_all, scores_all, levels_all = [], [], []
    for level, (anchors_l, logits_l, deltas_l) in enumerate(zip(anchors, logits, deltas)):
        batch = logits_l.shape[0]
        k = torch.sym_min(pre_nms_topk, logits_l.shape[1])
        scores_l, idx = logits_l.topk(k, dim=1)  # [B, k], sorted descending
        deltas_k = torch.gather(deltas_l, 1, idx.unsqueeze(-1).expand(-1, -1, 4))
        anchors_k = anchors_l[idx]  # [B, k, 4]
        boxes_k = box2box.apply_deltas(deltas_k.reshape(-1, 4), anchors_k.reshape(-1, 4)).view(batch, -1, 4)
        boxes_all.append(boxes_k)
        scores_all.append(scores_l)
        levels_all.append(torch.full_like(idx[0], level, dtype=torch.int32))
    return torch.cat(boxes_all, dim=1), torch.cat(scores_all, dim=1), torch.cat(levels_all, dim=0)


def find_top_rpn_proposals(
    anchors: Sequence[Tensor],
    logits: Sequence[Tensor],
    deltas: Sequence[Tensor],
    image_sizes: Tensor,
    box2box: Box2BoxTransform,
    nms_thresh: float,
    pre_nms_topk: int,
    post_nms_topk: int,
    min_box_size: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Select proposals per image (see the module docstring for the exact rule).

    anchors: per level Tensor[N_l, 4]; logits: per level Tensor[B, N_l]; deltas: per level Tensor[B, N_l, 4];
    image_sizes: Tensor[B, 2] (h, w).
    Returns proposals Tensor[B, post_nms_topk, 4] (rows >= num are 0), objectness logits
    Tensor[B, post_nms_topk] (rows >= num are -inf), num_proposals Tensor[B] int32.
    """
    from frcnn.plugins.batched_nms.torch_op import batched_nms

    boxes, scores, levels = _top_candidates(anchors, logits, deltas, box2box, pre_nms_topk)
    finite = torch.isfinite(boxes).all(dim=-1) & torch.isfinite(scores)
    boxes = clip_boxes(boxes, image_sizes)
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    valid = finite & (widths > min_box_size) & (heights > min_box_size)
    scores = torch.where(valid, scores, torch.full_like(scores, float("-inf")))
    groups = levels.unsqueeze(0).expand(scores.shape[0], -1).contiguous()

    # Candidate cap of the GPU kernel (the torch op ignores it): every candidate, pre_nms_topk per level
    # (5 levels x 1000 -> 8192), so the TensorRT engine's NMS is exact like this one.
    max_candidates = 1 << (pre_nms_topk * len(logits) - 1).bit_length()
    num, keep = batched_nms(boxes, scores, groups, nms_thresh, float("-inf"), post_nms_topk, max_candidates)
    kept = keep >= 0
    keep64 = keep.clamp(min=0).long()
    proposals = torch.gather(boxes, 1, keep64.unsqueeze(-1).expand(-1, -1, 4))
    proposals = torch.where(kept.unsqueeze(-1), proposals, torch.zeros_like(proposals))
    logits_kept = torch.gather(scores, 1, keep64)
    logits_kept = torch.where(kept, logits_kept, torch.full_like(logits_kept, float("-inf")))
    return proposals, logits_kept, num.to(torch.int32)


class RPN(nn.Module):
    """Region Proposal Network (detectron2 `RPN`): head, anchors, proposal selection; losses via a hook.

    Args:
        in_features: names of the feature maps it reads, e.g. ["p2", ..., "p6"].
        head: StandardRPNHead; anchor_generator: DefaultAnchorGenerator.
        box2box_transform: Box2BoxTransform with weights (1, 1, 1, 1).
        nms_thresh: IoU threshold of the per-level NMS.
        pre_nms_topk / post_nms_topk: (train, test) candidates per level before NMS / proposals per image after.
        min_box_size: proposals with clipped width or height <= this are dropped.
        loss_settings: the training-only settings `losses` uses (RPNLossSettings; defaults: detectron2's).
    """

    def __init__(
        self,
        *,
        in_features: list[str],
        head: StandardRPNHead,
        anchor_generator: DefaultAnchorGenerator,
        box2box_transform: Box2BoxTransform,
        nms_thresh: float,
        pre_nms_topk: tuple[int, int],
        post_nms_topk: tuple[int, int],
        min_box_size: float = 0.0,
        loss_settings: RPNLossSettings | None = None,
    ) -> None:
        super().__init__()
        self.in_features = list(in_features)
        self.rpn_head = head
        self.anchor_generator = anchor_generator
        self.box2box_transform = box2box_transform
        self.nms_thresh = float(nms_thresh)
        self.pre_nms_topk = {True: int(pre_nms_topk[0]), False: int(pre_nms_topk[1])}
        self.post_nms_topk = {True: int(post_nms_topk[0]), False: int(post_nms_topk[1])}
        self.min_box_size = float(min_box_size)
        self.loss_settings = loss_settings or RPNLossSettings()

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]) -> dict:
        rpn = cfg.MODEL.RPN
        in_features = list(rpn.IN_FEATURES)
        missing = [f for f in in_features if f not in input_shape]
        if missing:
            raise ConfigError(
                f"MODEL.RPN.IN_FEATURES {missing} are not backbone outputs {sorted(input_shape)}."
            )
        shapes = [input_shape[f] for f in in_features]
        anchor_generator = build_anchor_generator(cfg, shapes)
        if rpn.HEAD_NAME != "StandardRPNHead":
            raise ConfigError(
                f"MODEL.RPN.HEAD_NAME {rpn.HEAD_NAME!r} is not supported; use 'StandardRPNHead'."
            )
        head = StandardRPNHead(**StandardRPNHead.from_config(cfg, shapes, anchor_generator))
        return {
            "in_features": in_features,
            "head": head,
            "anchor_generator": anchor_generator,
            "box2box_transform": Box2BoxTransform(weights=tuple(rpn.BBOX_REG_WEIGHTS)),
            "nms_thresh": rpn.NMS_THRESH,
            "pre_nms_topk": (rpn.PRE_NMS_TOPK_TRAIN, rpn.PRE_NMS_TOPK_TEST),
            "post_nms_topk": (rpn.POST_NMS_TOPK_TRAIN, rpn.POST_NMS_TOPK_TEST),
            "min_box_size": cfg.MODEL.PROPOSAL_GENERATOR.MIN_SIZE,
            "loss_settings": RPNLossSettings(
                iou_thresholds=tuple(float(t) for t in rpn.IOU_THRESHOLDS),
                iou_labels=tuple(int(label) for label in rpn.IOU_LABELS),
                batch_size_per_image=int(rpn.BATCH_SIZE_PER_IMAGE),
                positive_fraction=float(rpn.POSITIVE_FRACTION),
                loss_weight={
                    "loss_rpn_cls": rpn.LOSS_WEIGHT,
                    "loss_rpn_loc": rpn.BBOX_REG_LOSS_WEIGHT * rpn.LOSS_WEIGHT,
                },
                anchor_boundary_thresh=float(rpn.BOUNDARY_THRESH),
                box_reg_loss_type=rpn.BBOX_REG_LOSS_TYPE,
                smooth_l1_beta=float(rpn.SMOOTH_L1_BETA),
            ),
        }

    def predict(self, features: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Run the head. Returns anchors (per level Tensor[N_l, 4]), objectness logits (per level
        Tensor[B, N_l]) and anchor deltas (per level Tensor[B, N_l, 4]), with N_l = H_l*W_l*A in (H, W, A) order."""
        feats = [features[f] for f in self.in_features]
        anchors = self.anchor_generator(feats)
        logits, deltas = self.rpn_head(feats)
        logits = [x.permute(0, 2, 3, 1).flatten(1) for x in logits]
        deltas = [
            x.reshape(x.shape[0], -1, 4, x.shape[-2], x.shape[-1]).permute(0, 3, 4, 1, 2).flatten(1, -2)
            for x in deltas
        ]
        return anchors, logits, deltas

    def forward(
        self,
        features: dict[str, Tensor],
        image_sizes: Tensor,
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """features: name -> Tensor[B, C, H_l, W_l]; image_sizes: Tensor[B, 2] (h, w);
        targets (training only): per image {"boxes": Tensor[G, 4], "classes": Tensor[G]}.
        Returns proposals Tensor[B, P, 4] (P = post_nms_topk of the mode; rows >= num are 0),
        num_proposals Tensor[B] int32, losses (empty in eval mode)."""
        anchors, logits, deltas = self.predict(features)
        # Proposals are treated as constants for the ROI heads (detectron2 decodes them under no_grad).
        proposals, _, num = find_top_rpn_proposals(
            anchors,
            [x.detach() for x in logits],
            [x.detach() for x in deltas],
            image_sizes,
            self.box2box_transform,
            self.nms_thresh,
            self.pre_nms_topk[self.training],
            self.post_nms_topk[self.training],
            self.min_box_size,
        )
        losses: dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("RPN in training mode needs targets (per image boxes and classes).")
            losses = self.losses(anchors, logits, deltas, image_sizes, targets)
        return proposals, num, losses

    def losses(
        self,
        anchors: list[Tensor],
        logits: list[Tensor],
        deltas: list[Tensor],
        image_sizes: Tensor,
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        """{"loss_rpn_cls", "loss_rpn_loc"} from the head outputs (shapes as `predict` returns)."""
        settings, transform = self.loss_settings, self.box2box_transform
        return rpn_losses(settings, transform, anchors, logits, deltas, image_sizes, targets)


def build_rpn(cfg, input_shape: dict[str, ShapeSpec]) -> RPN:
    """The proposal generator named by cfg.MODEL.PROPOSAL_GENERATOR.NAME (only "RPN")."""
    name = cfg.MODEL.PROPOSAL_GENERATOR.NAME
    if name != "RPN":
        raise ConfigError(f"MODEL.PROPOSAL_GENERATOR.NAME {name!r} is not supported; use 'RPN'.")
    return RPN(**RPN.from_config(cfg, input_shape))
