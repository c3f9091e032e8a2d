"""Multi-level ROIAlignV2 pooler (detectron2 ``modeling/poolers.py``): one box per row, pooled from the FPN
level its size selects, through the ``frcnn::roi_align_v2`` op (plugins/roi_align_v2)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from frcnn.plugins.roi_align_v2 import DEFAULTS
from frcnn.runtime.errors import ConfigError
from torch import Tensor, nn

__all__ = ["ROIPooler"]


class ROIPooler(nn.Module):
    """Multi-level ROIAlignV2 over consecutive pyramid levels (detectron2 `ROIPooler`), via frcnn::roi_align_v2.

    Args:
        output_size: side of the pooled grid (7).
        scales: per level 1 / stride, consecutive powers of 1/2 (e.g. 1/4 .. 1/32).
        sampling_ratio: samples per bin and axis, 0 = adaptive.
        canonical_box_size / canonical_level: level-assignment constants (224, 4).
    """

    def __init__(
        self,
        output_size: int,
        scales: Sequence[float],
        sampling_ratio: int,
        canonical_box_size: float = float(DEFAULTS["canonical_box_size"]),
        canonical_level: int = int(DEFAULTS["canonical_level"]),
    ) -> None:
        super().__init__()
        levels = [-math.log2(s) for s in scales]
        if any(abs(lv - round(lv)) > 1e-6 for lv in levels) or [round(lv) for lv in levels] != list(
            range(round(levels[0]), round(levels[0]) + len(levels))
        ):
            raise ConfigError(
                f"pooler scales {list(scales)} must be consecutive powers of 1/2 (strides 4, 8, ...)."
            )
        self.output_size = int(output_size)
        self.sampling_ratio = int(sampling_ratio)
        self.canonical_box_size = float(canonical_box_size)
        self.canonical_level = int(canonical_level)
        self.min_level = round(levels[0])
        self.max_level = round(levels[-1])

    def forward(self, features: Sequence[Tensor], boxes: Tensor) -> Tensor:
        """features: per level Tensor[B, C, H_l, W_l]; boxes: Tensor[B, R, 4] (input pixels) ->
        Tensor[B, R, C, output_size, output_size]."""
        from frcnn.plugins.roi_align_v2.torch_op import roi_align_v2

        if len(features) != self.max_level - self.min_level + 1:
            raise ValueError(
                f"ROIPooler expects {self.max_level - self.min_level + 1} levels, got {len(features)}."
            )
        return roi_align_v2(
            boxes,
            list(features),
            output_size=self.output_size,
            sampling_ratio=self.sampling_ratio,
            aligned=True,
            canonical_box_size=self.canonical_box_size,
            canonical_level=self.canonical_level,
            min_level=self.min_level,
        )
