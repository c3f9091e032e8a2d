"""Mask R-CNN's mask branch: detectron2's ``MaskRCNNConvUpsampleHead`` and its test-time inference.

Layers (attribute names = detectron2 checkpoint keys under ``roi_heads.mask_head.``), R50-FPN defaults:
``mask_fcn{1..NUM_CONV}``: Conv2d 3x3, CONV_DIM (256), padding 1, + ReLU; ``deconv``: ConvTranspose2d 2x2
stride 2 + ReLU; ``predictor``: Conv2d 1x1 to K channels (1 with CLS_AGNOSTIC_MASK). Input
Tensor[N, 256, 14, 14] (ROIAlignV2 on the FPN levels, ``POOLER_RESOLUTION`` 14, ``sampling_ratio`` 0) ->
mask logits Tensor[N, K, 28, 28]. Init as detectron2: ``c2_msra_fill`` for the convs and the deconv,
normal(std 0.001) / 0 for the predictor.

Inference (detectron2 ``mask_rcnn_inference``): the logits of each detection's predicted class (channel 0
when class-agnostic), sigmoid -> probabilities [B, T, 28, 28]. Pasting them into the image (bilinear,
threshold 0.5) is post-processing: ``frcnn.runtime.masks.paste_masks_in_image`` (numpy, shared with the
runtime).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from frcnn.runtime.errors import ConfigError
from torch import Tensor, nn

from .layers import Conv2d, ShapeSpec, c2_msra_fill, get_norm
from .poolers import ROIPooler

__all__ = ["MaskRCNNConvUpsampleHead", "build_mask_branch", "mask_rcnn_inference"]


class MaskRCNNConvUpsampleHead(nn.Sequential):
    """``mask_fcn1..n`` (3x3 conv + ReLU), ``deconv`` (2x2 stride 2) + ReLU, ``predictor`` (1x1).

    Args:
        input_shape: channels of the pooled features (height / width unused: fully convolutional).
        num_classes: predictor channels (K, or 1 for class-agnostic masks).
        conv_dims: NUM_CONV conv widths followed by the deconv width (detectron2: [CONV_DIM] * (NUM_CONV + 1)).
        conv_norm: normalization of the convs ("" = none, with bias).
    """

    def __init__(
        self, input_shape: ShapeSpec, *, num_classes: int, conv_dims: Sequence[int], conv_norm: str = ""
    ) -> None:
        super().__init__()
        if len(conv_dims) < 1:
            raise ConfigError("MaskRCNNConvUpsampleHead needs at least the deconv width (conv_dims).")
        if input_shape.channels is None:
            raise ValueError(f"MaskRCNNConvUpsampleHead needs the input channels, got {input_shape}.")
        channels = int(input_shape.channels)
        convs: list[nn.Module] = []
        for k, conv_dim in enumerate(conv_dims[:-1]):
            conv = Conv2d(channels, conv_dim, kernel_size=3, stride=1, padding=1, bias=not conv_norm,
                          norm=get_norm(conv_norm, conv_dim), activation=nn.ReLU())  # fmt: skip
            self.add_module(f"mask_fcn{k + 1}", conv)
            convs.append(conv)
            channels = conv_dim
        self.deconv = nn.ConvTranspose2d(channels, conv_dims[-1], kernel_size=2, stride=2, padding=0)
        self.add_module("deconv_relu", nn.ReLU())
        self.predictor = Conv2d(conv_dims[-1], num_classes, kernel_size=1, stride=1, padding=0)
        for layer in [*convs, self.deconv]:
            c2_msra_fill(layer)  # type: ignore[arg-type]  # MSRAFill applies to ConvTranspose2d too
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.constant_(self.predictor.bias, 0)

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec) -> dict:
        head = cfg.MODEL.ROI_MASK_HEAD
        return {
            "input_shape": input_shape,
            "num_classes": 1 if head.CLS_AGNOSTIC_MASK else cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            "conv_dims": [head.CONV_DIM] * (head.NUM_CONV + 1),
            "conv_norm": head.NORM,
        }


def mask_rcnn_inference(mask_logits: Tensor, classes: Tensor) -> Tensor:
    """Probabilities of each detection's class (detectron2 ``mask_rcnn_inference``), batched and padded.

    Args:
        mask_logits: Tensor[B, T, C, M, M], C = K or 1 (class-agnostic).
        classes: Tensor[B, T] int, -1 on padding rows.
    Returns:
        Tensor[B, T, M, M] float sigmoid probabilities; 0 on padding rows.
    """
    num_channels = mask_logits.shape[2]
    index = classes.long().clamp(min=0) if num_channels > 1 else torch.zeros_like(classes, dtype=torch.long)
    index = index.view(*index.shape, 1, 1, 1).expand(-1, -1, 1, *mask_logits.shape[-2:])
    probs = torch.gather(mask_logits, 2, index).squeeze(2).sigmoid()
    kept = (classes >= 0).view(*classes.shape, 1, 1)
    return torch.where(kept, probs, torch.zeros_like(probs))


def build_mask_branch(cfg, in_features: list[str], scales: list[float], channels: int) -> dict:
    """mask_in_features / mask_pooler / mask_head of detectron2's ``StandardROIHeads._init_mask_head``."""
    mask = cfg.MODEL.ROI_MASK_HEAD
    if mask.POOLER_TYPE != "ROIAlignV2":
        raise ConfigError(f"MODEL.ROI_MASK_HEAD.POOLER_TYPE {mask.POOLER_TYPE!r} is not supported; use 'ROIAlignV2'.")
    if mask.NAME != "MaskRCNNConvUpsampleHead":
        raise ConfigError(f"MODEL.ROI_MASK_HEAD.NAME {mask.NAME!r} is not supported; use 'MaskRCNNConvUpsampleHead'.")
    res = mask.POOLER_RESOLUTION
    pooler = ROIPooler(output_size=res, scales=scales, sampling_ratio=mask.POOLER_SAMPLING_RATIO)
    shape = ShapeSpec(channels=channels, height=res, width=res)
    head = MaskRCNNConvUpsampleHead(**MaskRCNNConvUpsampleHead.from_config(cfg, shape))
    return {"mask_in_features": in_features, "mask_pooler": pooler, "mask_head": head}
