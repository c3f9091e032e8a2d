"""Feature Pyramid Network on a bottom-up backbone, detectron2's `backbone/fpn.py` semantics and names.

For each input feature res{k} (stride 2^k): lateral 1x1 conv `fpn_lateral{k}` and output 3x3 conv
`fpn_output{k}` (bias, no norm by default, Caffe2 Xavier init). Top-down, from the coarsest level:
    prev = lateral_5(res5);                      p5 = output_5(prev)
    prev = lateral_k(res_k) + upsample2x(prev);  p_k = output_k(prev)     (k = 4, 3, 2; nearest upsampling)
then `LastLevelMaxPool` adds p6 = max_pool(p5, kernel 1, stride 2) (i.e. p5[..., ::2, ::2]).
The bottom-up network is the `bottom_up` sub-module (keys `backbone.bottom_up.*` in a detectron2 checkpoint).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from frcnn.runtime.errors import ConfigError
from torch import Tensor, nn

from .layers import Backbone, Conv2d, ShapeSpec, c2_xavier_fill, get_norm
from .resnet import build_resnet_backbone

__all__ = ["FPN", "LastLevelMaxPool", "build_backbone", "build_resnet_fpn_backbone"]


class LastLevelMaxPool(nn.Module):
    """One extra level from p5: max-pool kernel 1, stride 2, padding 0.

    Tensor[B, C, H, W] -> [Tensor[B, C, ceil(H/2), ceil(W/2)]] (e.g. 25x42 -> 13x21).
    """

    def __init__(self) -> None:
        super().__init__()
        self.num_levels = 1
        self.in_feature = "p5"

    def forward(self, x: Tensor) -> list[Tensor]:
        return [F.max_pool2d(x, kernel_size=1, stride=2, padding=0)]


class FPN(Backbone):
    """forward(x: Tensor[B, 3, H, W], normalized, H and W multiples of `size_divisibility`) ->
    {"p2": [B, C, H/4, W/4], "p3": [.., H/8, W/8], "p4": [.., H/16, W/16], "p5": [.., H/32, W/32],
     "p6": [.., H/64 (rounded up), W/64 (rounded up)]} with C = out_channels (256 by default)."""

    def __init__(
        self,
        bottom_up: Backbone,
        in_features: Sequence[str],
        out_channels: int,
        norm: str = "",
        top_block: LastLevelMaxPool | None = None,
        fuse_type: str = "sum",
    ) -> None:
        super().__init__()
        input_shapes = bottom_up.output_shape()
        _check_fpn_inputs(input_shapes, in_features, fuse_type)
        strides = [int(input_shapes[f].stride or 0) for f in in_features]
        in_channels_per_feature = [int(input_shapes[f].channels or 0) for f in in_features]
        use_bias = norm == ""
        lateral_convs, output_convs = [], []
        for in_channels, stride in zip(in_channels_per_feature, strides):
            lateral_conv = Conv2d(
                in_channels, out_channels, kernel_size=1, bias=use_bias, norm=get_norm(norm, out_channels)
            )
            output_conv = Conv2d(
                out_channels,
                out_channels,
                kernel_size=3,
                stride=1,
                padding=1,
                bias=use_bias,
                norm=get_norm(norm, out_channels),
            )
            c2_xavier_fill(lateral_conv)
            c2_xavier_fill(output_conv)
            level = int(math.log2(stride))
            self.add_module(f"fpn_lateral{level}", lateral_conv)
            self.add_module(f"fpn_output{level}", output_conv)
            lateral_convs.append(lateral_conv)
            output_convs.append(output_conv)
        # Plain lists (not ModuleList) in top-down order, so that the state-dict keys are fpn_lateral{k} only.
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]
        self.top_block = top_block
        self.in_features = tuple(in_features)
        self.bottom_up = bottom_up

        self._out_feature_strides = {f"p{int(math.log2(s))}": s for s in strides}
        if top_block is not None:
            last = int(math.log2(strides[-1]))
            for level in range(last + 1, last + 1 + top_block.num_levels):
                self._out_feature_strides[f"p{level}"] = 2**level
        self._out_features = list(self._out_feature_strides)
        self._out_feature_channels = {k: out_channels for k in self._out_features}
        self._size_divisibility = strides[-1]
        self._fuse_type = fuse_type

    @property
    def size_divisibility(self) -> int:
        """Input H and W must be multiples of this (the stride of the coarsest input feature, 32)."""
        return self._size_divisibility

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: Tensor[B, 3, H, W] -> {"p2".."p6": Tensor[B, C, H/s, W/s]} (see the class docstring)."""
        bottom_up_features = self.bottom_up(x)
        prev = self.lateral_convs[0](bottom_up_features[self.in_features[-1]])
        results = [self.output_convs[0](prev)]
        for idx in range(1, len(self.lateral_convs)):
            features = bottom_up_features[self.in_features[-idx - 1]]
            top_down = F.interpolate(prev, scale_factor=2.0, mode="nearest")
            prev = self.lateral_convs[idx](features) + top_down
            if self._fuse_type == "avg":
                prev = prev / 2
            results.insert(0, self.output_convs[idx](prev))
        if self.top_block is not None:
            if self.top_block.in_feature in bottom_up_features:
                top_in = bottom_up_features[self.top_block.in_feature]
            else:
                top_in = results[self._out_features.index(self.top_block.in_feature)]
            results.extend(self.top_block(top_in))
        return dict(zip(self._out_features, results))


def _check_fpn_inputs(input_shapes: dict[str, ShapeSpec], in_features: Sequence[str], fuse_type: str) -> None:
    """ConfigError unless ``in_features`` are bottom-up outputs with strides doubling level by level and
    ``fuse_type`` is "sum" or "avg"."""
    missing = [f for f in in_features if f not in input_shapes]
    if missing or not in_features:
        raise ConfigError(
            f"MODEL.FPN.IN_FEATURES {list(in_features)} must be a non-empty subset of the bottom-up "
            f"outputs {list(input_shapes)}; add the missing ones {missing} to MODEL.RESNETS.OUT_FEATURES."
        )
    if fuse_type not in ("sum", "avg"):
        raise ConfigError(f"MODEL.FPN.FUSE_TYPE {fuse_type!r} is not supported; use 'sum' or 'avg'.")
    strides = [int(input_shapes[f].stride or 0) for f in in_features]
    for s0, s1 in itertools.pairwise(strides):
        if s1 != 2 * s0:
            raise ConfigError(
                f"MODEL.FPN.IN_FEATURES {list(in_features)} have strides {strides}; they must be "
                "consecutive powers of two in increasing order (e.g. res2, res3, res4, res5)."
            )


def build_resnet_fpn_backbone(cfg: Any, input_shape: ShapeSpec) -> FPN:
    """ResNet (cfg.MODEL.RESNETS.*) + FPN (cfg.MODEL.FPN.*) + LastLevelMaxPool: outputs p2..p6."""
    bottom_up = build_resnet_backbone(cfg, input_shape)
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


def build_backbone(cfg: Any, input_shape: ShapeSpec | None = None) -> FPN:
    """The backbone named by cfg.MODEL.BACKBONE.NAME (only "build_resnet_fpn_backbone" is supported).

    input_shape defaults to ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)).
    """
    name = cfg.MODEL.BACKBONE.NAME
    if name != "build_resnet_fpn_backbone":
        raise ConfigError(
            f"MODEL.BACKBONE.NAME {name!r} is not supported; this project builds "
            "'build_resnet_fpn_backbone' (ResNet + FPN, Base-RCNN-FPN)."
        )
    if input_shape is None:
        input_shape = ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN))
    return build_resnet_fpn_backbone(cfg, input_shape)
