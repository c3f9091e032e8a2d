"""Building blocks shared by the backbone and the heads, with detectron2's names and semantics.

- `ShapeSpec`: channels / height / width / stride of a feature map (detectron2.layers.ShapeSpec).
- `FrozenBatchNorm2d`: BatchNorm with fixed statistics and affine parameters, all four held as buffers
  (`weight`, `bias`, `running_mean`, `running_var`), eps 1e-5.
- `get_norm(norm, channels)`: "" | "FrozenBN" | "BN" | "GN" -> module or None.
- `Conv2d`: torch.nn.Conv2d with an optional `norm` and `activation` sub-module, so that the checkpoint keys
  are `conv1.weight`, `conv1.norm.weight`, ... exactly as detectron2's `layers.Conv2d` wrapper.
- `c2_msra_fill` / `c2_xavier_fill`: detectron2's (Caffe2-style) weight initialisations.
- `CNNBlockBase` / `Backbone`: the small base classes detectron2's ResNet and FPN derive from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from frcnn.runtime.errors import ConfigError
from torch import Tensor, nn

__all__ = [
    "Backbone",
    "CNNBlockBase",
    "Conv2d",
    "FrozenBatchNorm2d",
    "ShapeSpec",
    "c2_msra_fill",
    "c2_xavier_fill",
    "get_norm",
]


@dataclass(frozen=True)
class ShapeSpec:
    """Shape of a feature map; any field may be None when unknown (detectron2.layers.ShapeSpec)."""

    channels: int | None = None
    height: int | None = None
    width: int | None = None
    stride: int | None = None


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d whose batch statistics and affine parameters are fixed buffers (never trained).

    y = x * scale + shift with scale = weight * rsqrt(running_var + eps), shift = bias - running_mean * scale.
    The two per-channel vectors depend on buffers only, so an exporter folds them to constants and the graph
    holds one Mul and one Add.

    Input/output: Tensor[B, C, H, W] (any float dtype; the output has the input's dtype).
    """

    # Version 3: running_var is stored without eps (detectron2's convention). Saved in the state-dict metadata.
    _version = 3
    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        # detectron2 initialises running_var to 1 - eps, so that a fresh FrozenBN is exactly the identity.
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[B, C, H, W] -> Tensor[B, C, H, W]."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        scale = scale.reshape(1, -1, 1, 1).to(x.dtype)
        shift = shift.reshape(1, -1, 1, 1).to(x.dtype)
        return x * scale + shift

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # detectron2's version quirks: checkpoints of version < 2 (and Caffe2 model-zoo pickles, which carry no
        # version) may lack the statistics (identity then); versions 1-2 stored running_var with eps included.
        version = local_metadata.get("version", None)
        if version is None or version < 2:
            if prefix + "running_mean" not in state_dict:
                state_dict[prefix + "running_mean"] = torch.zeros_like(self.running_mean)
            if prefix + "running_var" not in state_dict:
                state_dict[prefix + "running_var"] = torch.ones_like(self.running_var)
        if version is not None and version < 3 and prefix + "running_var" in state_dict:
            state_dict[prefix + "running_var"] = state_dict[prefix + "running_var"] - self.eps
        # A checkpoint trained with BatchNorm carries a step counter that a frozen norm has no use for.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}, eps={self.eps}"

    @classmethod
    def convert_frozen_batchnorm(cls, module: nn.Module) -> nn.Module:
        """Replace every BatchNorm2d / SyncBatchNorm in `module` (or `module` itself) by a FrozenBatchNorm2d
        holding the same statistics and affine values. Returns the converted module."""
        if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            frozen = cls(module.num_features, eps=module.eps)
            with torch.no_grad():
                if module.affine:
                    frozen.weight.copy_(module.weight)
                    frozen.bias.copy_(module.bias)
                if module.running_mean is not None and module.running_var is not None:
                    frozen.running_mean.copy_(module.running_mean)
                    frozen.running_var.copy_(module.running_var)
            return frozen
        for name, child in module.named_children():
            new_child = cls.convert_frozen_batchnorm(child)
            if new_child is not child:
                module.add_module(name, new_child)
        return module


def get_norm(norm: str, out_channels: int) -> nn.Module | None:
    """Normalization module by detectron2 name: "" (none), "FrozenBN", "BN", "GN" (32 groups)."""
    if norm == "":
        return None
    if norm == "FrozenBN":
        return FrozenBatchNorm2d(out_channels)
    if norm == "BN":
        return nn.BatchNorm2d(out_channels)
    if norm == "GN":
        return nn.GroupNorm(32, out_channels)
    raise ConfigError(
        f"norm {norm!r} is not supported (MODEL.RESNETS.NORM / MODEL.FPN.NORM); "
        "use one of '', 'FrozenBN', 'BN', 'GN'."
    )


class Conv2d(nn.Conv2d):
    """torch.nn.Conv2d followed by an optional `norm` module and `activation` callable.

    Keyword-only extras: norm (nn.Module or None), activation (callable or None). The norm is a registered
    sub-module, so its entries appear as `<name>.norm.*` in the state dict, as in detectron2.
    Input Tensor[B, C_in, H, W] -> Tensor[B, C_out, H', W'].
    """

    def __init__(
        self,
        *args: Any,
        norm: nn.Module | None = None,
        activation: Callable[[Tensor], Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def c2_msra_fill(module: nn.Conv2d) -> None:
    """Caffe2 MSRAFill: weight ~ kaiming normal (fan_out, relu gain), bias 0. Used by ResNet convs."""
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


def c2_xavier_fill(module: nn.Conv2d) -> None:
    """Caffe2 XavierFill: weight ~ kaiming uniform with a=1 (U(-sqrt(3/fan_in), +)), bias 0. Used by FPN."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


class CNNBlockBase(nn.Module):
    """A block with `in_channels`, `out_channels` and `stride` attributes that can be frozen."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def freeze(self) -> CNNBlockBase:
        """Stop gradients to every parameter and turn BatchNorm into FrozenBatchNorm2d (as detectron2)."""
        for p in self.parameters():
            p.requires_grad = False
        FrozenBatchNorm2d.convert_frozen_batchnorm(self)
        return self


class Backbone(nn.Module):
    """Base class of backbones: forward(x: Tensor[B, C, H, W]) -> dict[name, Tensor[B, C_f, H/s_f, W/s_f]].

    Subclasses fill `_out_features` (ordered names), `_out_feature_channels` and `_out_feature_strides`.
    """

    _out_features: list[str]
    _out_feature_channels: dict[str, int]
    _out_feature_strides: dict[str, int]

    @property
    def size_divisibility(self) -> int:
        """The input height and width must be multiples of this (0: no constraint)."""
        return 0

    def output_shape(self) -> dict[str, ShapeSpec]:
        """{feature name: ShapeSpec(channels, stride)} for every output feature, in output order."""
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }
