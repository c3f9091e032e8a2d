"""DefaultAnchorGenerator: detectron2's anchors, one set of cell anchors per feature level.

Cell anchors of a level (sizes x aspect ratios, in that order): area = size**2, w = sqrt(area / ratio),
h = ratio * w, anchor = [-w/2, -h/2, w/2, h/2] (computed in float64, stored as float32 like detectron2's
`torch.tensor(list_of_floats)`). Grid anchors of a level with feature map H x W and stride s: the cell anchors
shifted by (x*s + offset*s, y*s + offset*s) for every grid point, ordered (H, W, A) — the order of the RPN
head's flattened predictions.

The cell anchors are non-persistent buffers: they follow `.to(device)` but are not in the state dict
(detectron2 checkpoints have no anchor keys). Grid sizes come from the feature shapes, so an exported graph
computes anchors for whatever input size it is given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from frcnn.runtime.errors import ConfigError
from torch import Tensor, nn

from .layers import ShapeSpec

__all__ = ["DefaultAnchorGenerator", "build_anchor_generator", "generate_cell_anchors"]


def generate_cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """Anchors centred at (0, 0) for every (size, aspect ratio) pair, sizes outer, ratios inner.

    Returns Tensor[len(sizes) * len(aspect_ratios), 4] float32 (x1, y1, x2, y2).
    """
    anchors = []
    for size in sizes:
        area = size**2.0
        for aspect_ratio in aspect_ratios:
            w = math.sqrt(area / aspect_ratio)
            h = aspect_ratio * w
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(anchors, dtype=torch.float32)


def _broadcast_params(params: Sequence, num_features: int, name: str) -> list[list[float]]:
    """detectron2's rule: a list of one list applies to every level; otherwise one list per level."""
    params = [list(p) if isinstance(p, (list, tuple)) else [p] for p in params]
    if len(params) == 1:
        return params * num_features
    if len(params) != num_features:
        raise ConfigError(
            f"MODEL.ANCHOR_GENERATOR.{name} has {len(params)} entries but there are {num_features} feature "
            f"levels; give one list per level or a single list for all levels."
        )
    return params


class DefaultAnchorGenerator(nn.Module):
    """Anchors for every level of a feature pyramid.

    Args:
        sizes: per level, the anchor sizes (sqrt of area) in input pixels, e.g. [[32], [64], ...].
        aspect_ratios: per level (or one list for all), height / width ratios, e.g. [[0.5, 1.0, 2.0]].
        strides: per level, the feature stride in input pixels.
        offset: anchor centre offset in units of the stride (detectron2 default 0.0).
    """

    box_dim: int = 4

    def __init__(
        self,
        sizes: Sequence[Sequence[float]],
        aspect_ratios: Sequence[Sequence[float]],
        strides: Sequence[int],
        offset: float = 0.0,
    ) -> None:
        super().__init__()
        self.strides = [int(s) for s in strides]
        self.num_features = len(self.strides)
        sizes = _broadcast_params(sizes, self.num_features, "SIZES")
        aspect_ratios = _broadcast_params(aspect_ratios, self.num_features, "ASPECT_RATIOS")
        if not 0.0 <= offset < 1.0:
            raise ConfigError(f"MODEL.ANCHOR_GENERATOR.OFFSET must be in [0, 1), got {offset}.")
        self.offset = float(offset)
        for i, (s, a) in enumerate(zip(sizes, aspect_ratios)):
            self.register_buffer(f"cell_anchors_{i}", generate_cell_anchors(s, a), persistent=False)

    @classmethod
    def from_config(cls, cfg, input_shape: list[ShapeSpec]) -> dict:
        return {
            "sizes": cfg.MODEL.ANCHOR_GENERATOR.SIZES,
            "aspect_ratios": cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS,
            "strides": [x.stride for x in input_shape],
            "offset": cfg.MODEL.ANCHOR_GENERATOR.OFFSET,
        }

    @property
    def cell_anchors(self) -> list[Tensor]:
        """Per level Tensor[A_l, 4]."""
        return [getattr(self, f"cell_anchors_{i}") for i in range(self.num_features)]

    @property
    def num_cell_anchors(self) -> list[int]:
        """Anchors per grid point, per level (detectron2's `num_anchors`)."""
        return [int(c.shape[0]) for c in self.cell_anchors]

    def grid_anchors(self, grid_sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        """Per level Tensor[H*W*A, 4] for grid sizes [(H, W), ...], order (H, W, A)."""
        anchors = []
        for (grid_h, grid_w), stride, base in zip(grid_sizes, self.strides, self.cell_anchors):
            # Integers times the stride are exact in float32: equals detectron2's arange(0, W*s, step=s).
            shifts_x = torch.arange(grid_w, dtype=torch.float32, device=base.device) * stride
            shifts_y = torch.arange(grid_h, dtype=torch.float32, device=base.device) * stride
            shifts_x = shifts_x + self.offset * stride
            shifts_y = shifts_y + self.offset * stride
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            shift_x = shift_x.reshape(-1)
            shift_y = shift_y.reshape(-1)
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
            anchors.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4))
        return anchors

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """features: per level Tensor[B, C, H_l, W_l] -> per level Tensor[H_l*W_l*A_l, 4] (shared by the batch)."""
        if len(features) != self.num_features:
            raise ValueError(f"expected {self.num_features} feature maps, got {len(features)}.")
        return self.grid_anchors([(f.shape[-2], f.shape[-1]) for f in features])


def build_anchor_generator(cfg, input_shape: list[ShapeSpec]) -> DefaultAnchorGenerator:
    """DefaultAnchorGenerator from cfg.MODEL.ANCHOR_GENERATOR (the only generator Base-RCNN-FPN uses)."""
    name = cfg.MODEL.ANCHOR_GENERATOR.NAME
    if name != "DefaultAnchorGenerator":
        raise ConfigError(
            f"MODEL.ANCHOR_GENERATOR.NAME {name!r} is not supported; use 'DefaultAnchorGenerator'."
        )
    return DefaultAnchorGenerator(**DefaultAnchorGenerator.from_config(cfg, input_shape))
