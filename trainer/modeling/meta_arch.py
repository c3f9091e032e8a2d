"""GeneralizedRCNN (Faster R-CNN FPN) and `build_model`.

Model contract (plain tensors at the boundary, export-friendly):

    model.eval(); out = model(images, image_sizes)
    images:      Tensor[B, 3, H, W] uint8 or float (BGR, 0..255, already resized; padded area arbitrary)
    image_sizes: Tensor[B, 2] int (valid h, w of each image)
    out: num_detections [B] int32, boxes [B, T, 4] float32 (resized-image pixels), scores [B, T],
         classes [B, T] int32; T = TEST.DETECTIONS_PER_IMAGE; padding boxes 0, scores 0, classes -1.

Preprocessing follows detectron2: (x - pixel_mean) / pixel_std, and the area outside each image is 0 *after*
normalization (detectron2 pads its ImageList with 0); the batch is padded on the bottom/right to a multiple
of the backbone's size_divisibility (32). pixel_mean / pixel_std are non-persistent buffers: detectron2
state dicts do not hold them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from frcnn.runtime.errors import ConfigError
from torch import Tensor, nn

from .layers import ShapeSpec
from .roi_heads import StandardROIHeads, build_roi_heads
from .rpn import RPN, build_rpn

__all__ = ["GeneralizedRCNN", "build_model"]


class GeneralizedRCNN(nn.Module):
    """backbone (ResNet-FPN) -> proposal_generator (RPN) -> roi_heads (StandardROIHeads).

    Args:
        backbone: module with forward(Tensor[B, 3, H, W]) -> dict name -> Tensor, output_shape() and
            size_divisibility. proposal_generator: RPN. roi_heads: StandardROIHeads.
        pixel_mean / pixel_std: per channel, in the input's channel order (BGR).
    """

    pixel_mean: Tensor
    pixel_std: Tensor

    def __init__(
        self,
        *,
        backbone: nn.Module,
        proposal_generator: RPN,
        roi_heads: StandardROIHeads,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        input_format: str = "BGR",
    ) -> None:
        super().__init__()
        if len(pixel_mean) != len(pixel_std):
            raise ConfigError(
                f"MODEL.PIXEL_MEAN {list(pixel_mean)} and MODEL.PIXEL_STD {list(pixel_std)} differ in length."
            )
        self.backbone = backbone
        self.proposal_generator = proposal_generator
        self.roi_heads = roi_heads
        self.input_format = input_format
        self.register_buffer(
            "pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), persistent=False
        )

    @classmethod
    def from_config(cls, cfg) -> dict:
        from .fpn import build_backbone

        if cfg.MODEL.META_ARCHITECTURE != "GeneralizedRCNN":
            raise ConfigError(
                f"MODEL.META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE!r} is not supported; use 'GeneralizedRCNN'."
            )
        backbone = build_backbone(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))
        shapes = backbone.output_shape()
        return {
            "backbone": backbone,
            "proposal_generator": build_rpn(cfg, shapes),
            "roi_heads": build_roi_heads(cfg, shapes),
            "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": list(cfg.MODEL.PIXEL_STD),
            "input_format": cfg.INPUT.FORMAT,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess(self, images: Tensor, image_sizes: Tensor) -> Tensor:
        """images: Tensor[B, 3, H, W] (uint8 or float, 0..255); image_sizes: Tensor[B, 2] (h, w) ->
        normalized Tensor[B, 3, H', W'] with H', W' the next multiples of size_divisibility; 0 outside images."""
        if images.dim() != 4 or images.shape[1] != self.pixel_mean.shape[0]:
            raise ValueError(
                f"images must be [B, {self.pixel_mean.shape[0]}, H, W], got {list(images.shape)}."
            )
        if image_sizes.dim() != 2 or image_sizes.shape[1] != 2:
            raise ValueError(f"image_sizes must be [B, 2] (h, w), got {list(image_sizes.shape)}.")
        x = (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
        div = int(getattr(self.backbone, "size_divisibility", 0) or 1)
        height, width = x.shape[-2], x.shape[-1]
        pad_h = (height + div - 1) // div * div - height
        pad_w = (width + div - 1) // div * div - width
        x = F.pad(x, (0, pad_w, 0, pad_h), value=0.0)
        sizes = image_sizes.to(torch.int64)
        ys = torch.arange(x.shape[-2], device=x.device).view(1, -1, 1)
        xs = torch.arange(x.shape[-1], device=x.device).view(1, 1, -1)
        inside = (ys < sizes[:, 0].view(-1, 1, 1)) & (xs < sizes[:, 1].view(-1, 1, 1))
        return torch.where(inside.unsqueeze(1), x, torch.zeros_like(x))

    def inference(
        self, images: Tensor, image_sizes: Tensor, return_proposals: bool = False
    ) -> dict[str, Tensor]:
        """Detections per the model contract; with return_proposals also "proposals" Tensor[B, P, 4]
        (padding rows 0) and "num_proposals" Tensor[B] int32."""
        x = self.preprocess(images, image_sizes)
        features = self.backbone(x)
        proposals, num_proposals, _ = self.proposal_generator(features, image_sizes)
        out = self.roi_heads(features, proposals, num_proposals, image_sizes)
        if return_proposals:
            out = dict(out, proposals=proposals, num_proposals=num_proposals)
        return out

    def forward(
        self, images: Tensor, image_sizes: Tensor, targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor]:
        """Eval mode: `inference(images, image_sizes)`. Training mode: `losses(images, image_sizes, targets)`."""
        if not self.training:
            return self.inference(images, image_sizes)
        return self.losses(images, image_sizes, targets)

    def losses(
        self, images: Tensor, image_sizes: Tensor, targets: list[dict[str, Tensor]] | None
    ) -> dict[str, Tensor]:
        """Training losses. targets: per image {"boxes": Tensor[G, 4] (resized-image pixels, x1y1x2y2),
        "classes": Tensor[G] int64 in [0, K)}. Returns {"loss_rpn_cls", "loss_rpn_loc", "loss_cls",
        "loss_box_reg"} (scalars)."""
        if targets is None or len(targets) != images.shape[0]:
            raise ValueError("training needs one targets dict per image ({'boxes': [G, 4], 'classes': [G]}).")
        x = self.preprocess(images, image_sizes)
        features = self.backbone(x)
        proposals, num_proposals, rpn_losses = self.proposal_generator(features, image_sizes, targets)
        detector_losses = self.roi_heads(features, proposals, num_proposals, image_sizes, targets)
        return {**detector_losses, **rpn_losses}


def build_model(cfg) -> GeneralizedRCNN:
    """Build GeneralizedRCNN from a config (detectron2 `build_model`): checks that the config is supported,
    builds every module through `from_config`, returns the model on CPU in training mode (call .eval() for
    inference and .to(device) to move it)."""
    from frcnn.trainer.config import check_supported

    check_supported(cfg)
    return GeneralizedRCNN(**GeneralizedRCNN.from_config(cfg))
