"""ResNet-18/34/50/101/152 bottom-up network, detectron2's `backbone/resnet.py` semantics and names.

Structure: `stem` (7x7/2 conv + norm + ReLU, 3x3/2 max-pool), then stages `res2`..`res5`, each an
nn.Sequential of blocks (state-dict keys `res2.0.conv1.weight`, `res2.0.shortcut.norm.running_var`, ...).
The first block of res3..res5 downsamples by 2; with STRIDE_IN_1X1 (MSRA / Caffe2 weights) the stride sits
in the first 1x1 conv of the bottleneck, otherwise in the 3x3 conv.
`freeze_at` k: k >= 1 freezes the stem, k >= i freezes stage res{i} (no gradients, BN -> FrozenBN).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from frcnn.runtime.errors import ConfigError
from torch import Tensor, nn

from .layers import Backbone, CNNBlockBase, Conv2d, ShapeSpec, c2_msra_fill, get_norm

__all__ = [
    "BLOCKS_PER_STAGE",
    "BasicBlock",
    "BasicStem",
    "BottleneckBlock",
    "ResNet",
    "build_resnet_backbone",
]

# Number of blocks in res2..res5 for each depth.
BLOCKS_PER_STAGE: dict[int, list[int]] = {
    18: [2, 2, 2, 2],
    34: [3, 4, 6, 3],
    50: [3, 4, 6, 3],
    101: [3, 4, 23, 3],
    152: [3, 8, 36, 3],
}
_STAGE_INDEX = {"stem": 0, "res2": 1, "res3": 2, "res4": 3, "res5": 4}


class BasicStem(CNNBlockBase):
    """conv1 (7x7, stride 2, pad 3, no bias, norm) -> ReLU -> max-pool 3x3 stride 2 pad 1. Total stride 4.

    Input Tensor[B, C_in, H, W] -> Tensor[B, C_out, ceil(H/4), ceil(W/4)] (H/4, W/4 for multiples of 4).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 64, norm: str = "FrozenBN") -> None:
        super().__init__(in_channels, out_channels, 4)
        self.conv1 = Conv2d(
            in_channels,
            out_channels,
            kernel_size=7,
            stride=2,
            padding=3,
            bias=False,
            norm=get_norm(norm, out_channels),
        )
        c2_msra_fill(self.conv1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = F.relu_(x)
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


def conv_norm(in_channels: int, out_channels: int, kernel_size: int, norm: str, **kwargs: int) -> Conv2d:
    """Bias-free conv + norm with detectron2's MSRA init: the one conv layer of every ResNet block."""
    layer = Conv2d(in_channels, out_channels, kernel_size=kernel_size, bias=False,
                   norm=get_norm(norm, out_channels), **kwargs)  # fmt: skip
    c2_msra_fill(layer)
    return layer


class BasicBlock(CNNBlockBase):
    """Two 3x3 convs with a residual connection (ResNet-18/34); `shortcut` is a 1x1 conv + norm when the
    channel count changes. Input Tensor[B, C_in, H, W] -> Tensor[B, C_out, H/stride, W/stride]."""

    def __init__(
        self, in_channels: int, out_channels: int, *, stride: int = 1, norm: str = "FrozenBN"
    ) -> None:
        super().__init__(in_channels, out_channels, stride)
        self.shortcut: Conv2d | None = None
        if in_channels != out_channels:
            self.shortcut = conv_norm(in_channels, out_channels, 1, norm, stride=stride)
        self.conv1 = conv_norm(in_channels, out_channels, 3, norm, stride=stride, padding=1)
        self.conv2 = conv_norm(out_channels, out_channels, 3, norm, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu_(self.conv1(x))
        out = self.conv2(out)
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        out = out + shortcut
        return F.relu_(out)


class BottleneckBlock(CNNBlockBase):
    """1x1 (reduce) -> 3x3 -> 1x1 (expand) with a residual connection (ResNet-50/101/152).

    stride_in_1x1=True puts the block's stride in conv1 (1x1), else in conv2 (3x3). `shortcut` is a strided
    1x1 conv + norm when the channel count changes.
    Input Tensor[B, C_in, H, W] -> Tensor[B, C_out, H/stride, W/stride].
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        bottleneck_channels: int,
        stride: int = 1,
        num_groups: int = 1,
        norm: str = "FrozenBN",
        stride_in_1x1: bool = False,
        dilation: int = 1,
    ) -> None:
        super().__init__(in_channels, out_channels, stride)
        self.shortcut: Conv2d | None = None
        if in_channels != out_channels:
            self.shortcut = conv_norm(in_channels, out_channels, 1, norm, stride=stride)
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv_norm(in_channels, bottleneck_channels, 1, norm, stride=stride_1x1)
        self.conv2 = conv_norm(bottleneck_channels, bottleneck_channels, 3, norm, stride=stride_3x3,
                               padding=dilation, dilation=dilation, groups=num_groups)  # fmt: skip
        self.conv3 = conv_norm(bottleneck_channels, out_channels, 1, norm)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        out = out + shortcut
        return F.relu_(out)


class ResNet(Backbone):
    """Stem + stages res2..res5 (only as many stages as `out_features` needs are built).

    forward(x: Tensor[B, C_in, H, W]) -> {name: Tensor} for name in out_features, where "stem" and "res2"
    are [B, C, H/4, W/4], "res3" [.., H/8, W/8], "res4" [.., H/16, W/16], "res5" [.., H/32, W/32]
    (ResNet-50: channels 256, 512, 1024, 2048).
    """

    def __init__(
        self,
        stem: CNNBlockBase,
        stages: Sequence[Sequence[CNNBlockBase]],
        out_features: Sequence[str],
        freeze_at: int = 0,
    ) -> None:
        super().__init__()
        unknown = [f for f in out_features if f not in _STAGE_INDEX]
        if unknown or not out_features:
            raise ConfigError(
                f"MODEL.RESNETS.OUT_FEATURES {list(out_features)} is invalid: names must be among "
                f"{list(_STAGE_INDEX)} (e.g. ['res2', 'res3', 'res4', 'res5'])."
            )
        self.stem = stem
        current_stride = stem.stride
        self._out_feature_strides = {"stem": current_stride}
        self._out_feature_channels = {"stem": stem.out_channels}
        num_stages = max(_STAGE_INDEX[f] for f in out_features)
        self.stage_names: tuple[str, ...] = tuple(f"res{i + 2}" for i in range(num_stages))
        self.stages: list[nn.Sequential] = []
        for name, blocks in zip(self.stage_names, stages[:num_stages]):
            stage = nn.Sequential(*blocks)
            self.add_module(name, stage)
            self.stages.append(stage)
            for block in blocks:
                current_stride *= block.stride
            self._out_feature_strides[name] = current_stride
            self._out_feature_channels[name] = blocks[-1].out_channels
        self._out_features = list(out_features)
        self.freeze(freeze_at)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: Tensor[B, C_in, H, W] -> {feature name: Tensor[B, C_f, H/stride_f, W/stride_f]}."""
        outputs: dict[str, Tensor] = {}
        x = self.stem(x)
        if "stem" in self._out_features:
            outputs["stem"] = x
        for name, stage in zip(self.stage_names, self.stages):
            x = stage(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs

    def freeze(self, freeze_at: int = 0) -> ResNet:
        """Freeze the stem when freeze_at >= 1 and stage res{i} when freeze_at >= i (detectron2 semantics:
        freeze_at=2 freezes stem + res2). Frozen blocks get requires_grad=False and BN -> FrozenBN."""
        if freeze_at >= 1:
            self.stem.freeze()
        for idx, stage in enumerate(self.stages, start=2):
            if freeze_at >= idx:
                for block in stage.children():
                    block.freeze()  # type: ignore[operator]
        return self

    @staticmethod
    def make_stage(
        block_class: type[CNNBlockBase],
        num_blocks: int,
        *,
        in_channels: int,
        out_channels: int,
        first_stride: int,
        **kwargs: Any,
    ) -> list[CNNBlockBase]:
        """`num_blocks` blocks; the first has stride `first_stride` and maps in -> out channels."""
        blocks = []
        for i in range(num_blocks):
            blocks.append(
                block_class(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    stride=first_stride if i == 0 else 1,
                    **kwargs,
                )
            )
        return blocks


def _check_resnet_cfg(r: Any, depth: int) -> None:
    if depth not in BLOCKS_PER_STAGE:
        raise ConfigError(
            f"MODEL.RESNETS.DEPTH {depth} is not supported; use one of {sorted(BLOCKS_PER_STAGE)}."
        )
    if r.NUM_GROUPS != 1:
        raise ConfigError(f"MODEL.RESNETS.NUM_GROUPS {r.NUM_GROUPS} is not supported (ResNeXt); set it to 1.")
    if any(r.DEFORM_ON_PER_STAGE):
        raise ConfigError(
            "MODEL.RESNETS.DEFORM_ON_PER_STAGE enables deformable convolutions, which are not supported; "
            "set it to [False, False, False, False]."
        )
    if r.RES5_DILATION not in (1, 2):
        raise ConfigError(f"MODEL.RESNETS.RES5_DILATION {r.RES5_DILATION} must be 1 or 2.")
    if depth in (18, 34) and (r.RES2_OUT_CHANNELS != 64 or r.RES5_DILATION != 1):
        raise ConfigError(
            f"ResNet-{depth} needs MODEL.RESNETS.RES2_OUT_CHANNELS 64 and RES5_DILATION 1 "
            f"(got {r.RES2_OUT_CHANNELS} and {r.RES5_DILATION})."
        )


def build_resnet_backbone(cfg: Any, input_shape: ShapeSpec) -> ResNet:
    """ResNet from cfg.MODEL.RESNETS.* and cfg.MODEL.BACKBONE.FREEZE_AT; input_shape.channels = image channels."""
    r = cfg.MODEL.RESNETS
    depth = int(r.DEPTH)
    _check_resnet_cfg(r, depth)
    norm = r.NORM
    stem = BasicStem(in_channels=input_shape.channels or 3, out_channels=r.STEM_OUT_CHANNELS, norm=norm)
    in_channels = r.STEM_OUT_CHANNELS
    out_channels = r.RES2_OUT_CHANNELS
    bottleneck_channels = r.NUM_GROUPS * r.WIDTH_PER_GROUP
    stages = []
    for idx, num_blocks in enumerate(BLOCKS_PER_STAGE[depth]):
        dilation = r.RES5_DILATION if idx == 3 else 1
        first_stride = 1 if idx == 0 or dilation == 2 else 2
        if depth in (18, 34):
            blocks = ResNet.make_stage(
                BasicBlock,
                num_blocks,
                in_channels=in_channels,
                out_channels=out_channels,
                first_stride=first_stride,
                norm=norm,
            )
        else:
            blocks = ResNet.make_stage(
                BottleneckBlock,
                num_blocks,
                in_channels=in_channels,
                out_channels=out_channels,
                first_stride=first_stride,
                bottleneck_channels=bottleneck_channels,
                num_groups=r.NUM_GROUPS,
                norm=norm,
                stride_in_1x1=r.STRIDE_IN_1X1,
                dilation=dilation,
            )
        stages.append(blocks)
        in_channels = out_channels
        out_channels *= 2
        bottleneck_channels *= 2
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)
