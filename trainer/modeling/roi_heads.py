"""ROI heads: FastRCNNConvFCHead, FastRCNNOutputLayers, StandardROIHeads.

Inference reproduces detectron2's `fast_rcnn_inference_single_image` per image, batched and fixed-size:
softmax over K+1 classes, drop the background (last) column; class-specific decode of the proposals with
Box2BoxTransform(10, 10, 5, 5); clip to the image; the [R, K] candidates are flattened row-major
(index r*K + k — the order of detectron2's `filter_mask.nonzero()`); rows that are padding (r >= num
proposals) or hold a non-finite box or score are excluded (detectron2 drops them); BatchedNMS with
groups = class, IoU NMS_THRESH_TEST, score > SCORE_THRESH_TEST, at most DETECTIONS_PER_IMAGE.

Training losses (proposal matching and sampling, softmax CE + box regression) plug in through
`StandardROIHeads.losses`; they live in their own files with the trainer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from frcnn.runtime.errors import ConfigError
from torch import Tensor, nn

from .box_transform import Box2BoxTransform
from .layers import Conv2d, ShapeSpec, c2_msra_fill, c2_xavier_fill, get_norm
from .mask_head import MaskRCNNConvUpsampleHead, build_mask_branch, mask_rcnn_inference
from .poolers import ROIPooler
from .roi_losses import FastRCNNLossSettings, ROISamplingSettings, roi_head_losses
from .rpn import clip_boxes

__all__ = [
    "FastRCNNConvFCHead",
    "FastRCNNOutputLayers",
    "ROIPooler",
    "StandardROIHeads",
    "build_roi_heads",
    "fast_rcnn_inference",
]


class FastRCNNConvFCHead(nn.Sequential):
    """Optional 3x3 convs (conv1..) then flatten and fully connected layers (fc1, fc2, ...), each + ReLU.

    Input Tensor[N, C, S, S] -> Tensor[N, fc_dims[-1]] (or the conv output when there is no fc).
    """

    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        conv_dims: Sequence[int] = (),
        fc_dims: Sequence[int] = (1024, 1024),
        conv_norm: str = "",
    ) -> None:
        super().__init__()
        if len(conv_dims) + len(fc_dims) == 0:
            raise ConfigError("MODEL.ROI_BOX_HEAD needs NUM_CONV + NUM_FC > 0.")
        if input_shape.channels is None or input_shape.height is None or input_shape.width is None:
            raise ValueError(f"FastRCNNConvFCHead needs channels, height and width, got {input_shape}.")
        channels, height, width = input_shape.channels, input_shape.height, input_shape.width
        for k, conv_dim in enumerate(conv_dims):
            conv = Conv2d(
                channels,
                conv_dim,
                kernel_size=3,
                padding=1,
                bias=not conv_norm,
                norm=get_norm(conv_norm, conv_dim),
                activation=nn.ReLU(),
            )
            c2_msra_fill(conv)
            self.add_module(f"conv{k + 1}", conv)
            channels = conv_dim
        self._output_dim: int = channels * height * width
        if fc_dims:
            self.add_module("flatten", nn.Flatten())
        for k, fc_dim in enumerate(fc_dims):
            fc = nn.Linear(self._output_dim, fc_dim)
            c2_xavier_fill(fc)  # type: ignore[arg-type]  # Caffe2 XavierFill applies to Linear too
            self.add_module(f"fc{k + 1}", fc)
            self.add_module(f"fc_relu{k + 1}", nn.ReLU())
            self._output_dim = fc_dim

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec) -> dict:
        head = cfg.MODEL.ROI_BOX_HEAD
        return {
            "input_shape": input_shape,
            "conv_dims": [head.CONV_DIM] * head.NUM_CONV,
            "fc_dims": [head.FC_DIM] * head.NUM_FC,
            "conv_norm": head.NORM,
        }

    @property
    def output_dim(self) -> int:
        return self._output_dim


class FastRCNNOutputLayers(nn.Module):
    """cls_score: Linear(D, K+1) and bbox_pred: Linear(D, K*4) (or 4 when class-agnostic).

    Test settings: score_thresh, nms_thresh, topk_per_image. Training settings (for the losses):
    loss_settings (FastRCNNLossSettings).
    """

    def __init__(
        self,
        input_dim: int,
        *,
        box2box_transform: Box2BoxTransform,
        num_classes: int,
        test_score_thresh: float = 0.05,
        test_nms_thresh: float = 0.5,
        test_topk_per_image: int = 100,
        cls_agnostic_bbox_reg: bool = False,
        loss_settings: FastRCNNLossSettings | None = None,
    ) -> None:
        super().__init__()
        if test_topk_per_image <= 0:
            raise ConfigError(
                f"TEST.DETECTIONS_PER_IMAGE must be > 0 (fixed-size outputs), got {test_topk_per_image}."
            )
        self.num_classes = int(num_classes)
        self.cls_score = nn.Linear(input_dim, num_classes + 1)
        num_bbox_reg_classes = 1 if cls_agnostic_bbox_reg else num_classes
        self.bbox_pred = nn.Linear(input_dim, num_bbox_reg_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        for layer in (self.cls_score, self.bbox_pred):
            nn.init.constant_(layer.bias, 0)
        self.box2box_transform = box2box_transform
        self.test_score_thresh = float(test_score_thresh)
        self.test_nms_thresh = float(test_nms_thresh)
        self.test_topk_per_image = int(test_topk_per_image)
        self.loss_settings = loss_settings or FastRCNNLossSettings()

    @classmethod
    def from_config(cls, cfg, input_dim: int) -> dict:
        head = cfg.MODEL.ROI_BOX_HEAD
        return {
            "input_dim": input_dim,
            "box2box_transform": Box2BoxTransform(weights=tuple(head.BBOX_REG_WEIGHTS)),
            "num_classes": cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            "test_score_thresh": cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
            "test_nms_thresh": cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST,
            "test_topk_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "cls_agnostic_bbox_reg": head.CLS_AGNOSTIC_BBOX_REG,
            "loss_settings": FastRCNNLossSettings(
                smooth_l1_beta=float(head.SMOOTH_L1_BETA), box_reg_loss_type=head.BBOX_REG_LOSS_TYPE,
                loss_weight={"loss_cls": 1.0, "loss_box_reg": head.BBOX_REG_LOSS_WEIGHT}),
        }

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: Tensor[N, D] (or [N, C, S, S], flattened) -> (class logits Tensor[N, K+1], deltas Tensor[N, C'*4])."""
        if x.dim() > 2:
            x = torch.flatten(x, start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


def fast_rcnn_inference(
    boxes: Tensor,
    scores: Tensor,
    num_proposals: Tensor,
    image_sizes: Tensor,
    score_thresh: float,
    nms_thresh: float,
    topk_per_image: int,
) -> dict[str, Tensor]:
    """Per-image detections from decoded boxes and class probabilities (see the module docstring).

    boxes: Tensor[B, R, C, 4] decoded, C = K (class-specific) or 1 (agnostic); scores: Tensor[B, R, K+1]
    probabilities; num_proposals: Tensor[B] (valid rows); image_sizes: Tensor[B, 2] (h, w).
    Returns num_detections [B] int32, boxes [B, T, 4] float32, scores [B, T], classes [B, T] int32 with
    T = topk_per_image (padding: boxes 0, scores 0, classes -1).
    """
    from frcnn.plugins.batched_nms.torch_op import batched_nms

    batch, num_rows = scores.shape[0], scores.shape[1]
    num_classes = scores.shape[2] - 1
    rows = torch.arange(num_rows, device=scores.device).unsqueeze(0)
    valid = rows < num_proposals.to(rows.dtype).unsqueeze(1)
    valid = valid & torch.isfinite(boxes).all(dim=-1).all(dim=-1) & torch.isfinite(scores).all(dim=-1)

    boxes = clip_boxes(boxes.reshape(batch, -1, 4), image_sizes).reshape(batch, num_rows, -1, 4)
    boxes = boxes.expand(-1, -1, num_classes, -1).reshape(batch, -1, 4)  # [B, R*K, 4]
    fg_scores = scores[..., :-1]
    fg_scores = torch.where(valid.unsqueeze(-1), fg_scores, torch.full_like(fg_scores, float("-inf")))
    fg_scores = fg_scores.reshape(batch, -1)  # [B, R*K], index r*K + k
    classes = torch.arange(num_classes, dtype=torch.int32, device=scores.device)
    groups = classes.view(1, 1, -1).expand(batch, num_rows, -1).reshape(batch, -1)

    # Default GPU candidate cap (4096): scores above SCORE_THRESH_TEST are typically far fewer than R*K;
    # beyond the cap the kernel keeps the top-4096 candidates (exact whenever K boxes survive among them).
    num, keep = batched_nms(boxes, fg_scores, groups, nms_thresh, score_thresh, topk_per_image)
    kept = keep >= 0
    keep64 = keep.clamp(min=0).long()
    out_boxes = torch.gather(boxes, 1, keep64.unsqueeze(-1).expand(-1, -1, 4))
    out_scores = torch.gather(fg_scores, 1, keep64)
    out_classes = (keep64 % num_classes).to(torch.int32)
    return {
        "num_detections": num.to(torch.int32),
        "boxes": torch.where(kept.unsqueeze(-1), out_boxes, torch.zeros_like(out_boxes)).float(),
        "scores": torch.where(kept, out_scores, torch.zeros_like(out_scores)),
        "classes": torch.where(kept, out_classes, torch.full_like(out_classes, -1)),
    }


class StandardROIHeads(nn.Module):
    """detectron2's StandardROIHeads: pooler -> box_head -> box_predictor, and with MASK_ON the mask branch
    (mask_pooler on the final detections -> mask_head -> probabilities of the predicted class). No keypoints.

    Args:
        box_in_features: feature names pooled, e.g. ["p2", "p3", "p4", "p5"].
        box_pooler: ROIPooler; box_head: FastRCNNConvFCHead; box_predictor: FastRCNNOutputLayers.
        num_classes: K; sampling: how `losses` labels and samples proposals (ROISamplingSettings).
        mask_in_features / mask_pooler / mask_head: the mask branch (None: box detection only).
    """

    def __init__(
        self,
        *,
        box_in_features: list[str],
        box_pooler: ROIPooler,
        box_head: FastRCNNConvFCHead,
        box_predictor: FastRCNNOutputLayers,
        num_classes: int,
        sampling: ROISamplingSettings | None = None,
        mask_in_features: list[str] | None = None,
        mask_pooler: ROIPooler | None = None,
        mask_head: MaskRCNNConvUpsampleHead | None = None,
    ) -> None:
        super().__init__()
        self.box_in_features = list(box_in_features)
        self.box_pooler = box_pooler
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.mask_on = mask_head is not None
        if self.mask_on:
            self.mask_in_features = list(mask_in_features or box_in_features)
            self.mask_pooler = mask_pooler
            self.mask_head = mask_head
        self.num_classes = int(num_classes)
        self.sampling = sampling or ROISamplingSettings()

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]) -> dict:
        heads, box = cfg.MODEL.ROI_HEADS, cfg.MODEL.ROI_BOX_HEAD
        in_features = list(heads.IN_FEATURES)
        missing = [f for f in in_features if f not in input_shape]
        if missing:
            raise ConfigError(
                f"MODEL.ROI_HEADS.IN_FEATURES {missing} are not backbone outputs {sorted(input_shape)}."
            )
        if box.POOLER_TYPE != "ROIAlignV2":
            raise ConfigError(
                f"MODEL.ROI_BOX_HEAD.POOLER_TYPE {box.POOLER_TYPE!r} is not supported; use 'ROIAlignV2'."
            )
        if box.NAME != "FastRCNNConvFCHead":
            raise ConfigError(
                f"MODEL.ROI_BOX_HEAD.NAME {box.NAME!r} is not supported; use 'FastRCNNConvFCHead'."
            )
        if any(input_shape[f].stride is None or input_shape[f].channels is None for f in in_features):
            raise ValueError(f"ROI head input shapes need channels and stride: {input_shape}.")
        channels = {int(input_shape[f].channels or 0) for f in in_features}
        if len(channels) != 1:
            raise ConfigError(
                f"ROI head input features must share one channel count, got {sorted(channels)}."
            )
        resolution, in_channels = box.POOLER_RESOLUTION, channels.pop()
        scales = [1.0 / int(input_shape[f].stride or 1) for f in in_features]
        pooler = ROIPooler(output_size=resolution, scales=scales, sampling_ratio=box.POOLER_SAMPLING_RATIO)
        box_head = FastRCNNConvFCHead(
            **FastRCNNConvFCHead.from_config(cfg, ShapeSpec(channels=in_channels, height=resolution, width=resolution))
        )
        predictor = FastRCNNOutputLayers(**FastRCNNOutputLayers.from_config(cfg, box_head.output_dim))
        return {
            "box_in_features": in_features,
            "box_pooler": pooler,
            "box_head": box_head,
            "box_predictor": predictor,
            "num_classes": heads.NUM_CLASSES,
            "sampling": ROISamplingSettings(
                batch_size_per_image=int(heads.BATCH_SIZE_PER_IMAGE),
                positive_fraction=float(heads.POSITIVE_FRACTION),
                iou_thresholds=tuple(float(t) for t in heads.IOU_THRESHOLDS),
                iou_labels=tuple(int(label) for label in heads.IOU_LABELS),
                proposal_append_gt=bool(heads.PROPOSAL_APPEND_GT),
            ),
            **(build_mask_branch(cfg, in_features, scales, in_channels) if cfg.MODEL.MASK_ON else {}),
        }

    def box_predictions(self, features: dict[str, Tensor], boxes: Tensor) -> tuple[Tensor, Tensor]:
        """features: name -> Tensor[B, C, H_l, W_l]; boxes: Tensor[B, R, 4] ->
        (class logits Tensor[B, R, K+1], box deltas Tensor[B, R, C'*4])."""
        batch, num_rows = boxes.shape[0], boxes.shape[1]
        pooled = self.box_pooler([features[f] for f in self.box_in_features], boxes)  # [B, R, C, S, S]
        x = self.box_head(pooled.flatten(0, 1))
        logits, deltas = self.box_predictor(x)
        return logits.reshape(batch, num_rows, -1), deltas.reshape(batch, num_rows, -1)

    def inference(
        self, features: dict[str, Tensor], proposals: Tensor, num_proposals: Tensor, image_sizes: Tensor
    ) -> dict[str, Tensor]:
        """proposals: Tensor[B, R, 4] (rows >= num_proposals are padding); image_sizes: Tensor[B, 2] (h, w).
        Returns the detections dict of `fast_rcnn_inference`."""
        logits, deltas = self.box_predictions(features, proposals)
        batch, num_rows = proposals.shape[0], proposals.shape[1]
        predictor = self.box_predictor
        boxes = predictor.box2box_transform.apply_deltas(deltas.flatten(0, 1), proposals.flatten(0, 1))
        boxes = boxes.reshape(batch, num_rows, -1, 4)
        probs = F.softmax(logits, dim=-1)
        out = fast_rcnn_inference(
            boxes,
            probs,
            num_proposals,
            image_sizes,
            predictor.test_score_thresh,
            predictor.test_nms_thresh,
            predictor.test_topk_per_image,
        )
        if self.mask_on:
            out["masks"] = self.mask_inference(features, out["boxes"], out["classes"])
        return out

    def mask_inference(self, features: dict[str, Tensor], boxes: Tensor, classes: Tensor) -> Tensor:
        """boxes: Tensor[B, T, 4] final detections; classes: Tensor[B, T] (-1 padding) ->
        mask probabilities Tensor[B, T, M, M] of each detection's class (0 on padding rows)."""
        batch, num_rows = boxes.shape[0], boxes.shape[1]
        pooled = self.mask_pooler([features[f] for f in self.mask_in_features], boxes)  # [B, T, C, S, S]
        logits = self.mask_head(pooled.flatten(0, 1))
        return mask_rcnn_inference(logits.reshape(batch, num_rows, *logits.shape[1:]), classes)

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: Tensor,
        num_proposals: Tensor,
        image_sizes: Tensor,
        targets: list[dict[str, Tensor]] | None = None,
    ) -> dict[str, Tensor]:
        """Eval: the detections dict. Training: the loss dict {"loss_cls", "loss_box_reg"} (needs targets)."""
        if self.training:
            if targets is None:
                raise ValueError("ROI heads in training mode need targets (per image boxes and classes).")
            return self.losses(features, proposals, num_proposals, image_sizes, targets)
        return self.inference(features, proposals, num_proposals, image_sizes)

    def losses(
        self,
        features: dict[str, Tensor],
        proposals: Tensor,
        num_proposals: Tensor,
        image_sizes: Tensor,
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        """Label and sample the proposals against the targets, then {"loss_cls", "loss_box_reg"} (+ "loss_mask")."""
        return roi_head_losses(self, features, proposals, num_proposals, image_sizes, targets)


def build_roi_heads(cfg, input_shape: dict[str, ShapeSpec]) -> StandardROIHeads:
    """The ROI heads named by cfg.MODEL.ROI_HEADS.NAME (only "StandardROIHeads")."""
    name = cfg.MODEL.ROI_HEADS.NAME
    if name != "StandardROIHeads":
        raise ConfigError(f"MODEL.ROI_HEADS.NAME {name!r} is not supported; use 'StandardROIHeads'.")
    return StandardROIHeads(**StandardROIHeads.from_config(cfg, input_shape))
