"""Box2BoxTransform: the R-CNN box parameterisation (dx, dy, dw, dh), detectron2's exact arithmetic.

With width = x2 - x1 (no +1) and centre = x1 + 0.5 * width,

    dx = wx * (tgt_ctr_x - src_ctr_x) / src_w        dw = ww * log(tgt_w / src_w)
    dy = wy * (tgt_ctr_y - src_ctr_y) / src_h        dh = wh * log(tgt_h / src_h)

and the inverse (apply_deltas) clamps dw, dh at `scale_clamp` = log(1000 / 16) before exp(). The operation
order follows detectron2's `Box2BoxTransform` line by line, so results are bit-identical in float32.
The RPN uses weights (1, 1, 1, 1); the box head (10, 10, 5, 5).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["DEFAULT_SCALE_CLAMP", "Box2BoxTransform"]

DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)
"""Largest dw / dh fed to exp(): a box grows at most 1000/16 = 62.5 times per side."""


class Box2BoxTransform:
    """Encode target boxes relative to source boxes and decode deltas back to boxes.

    Args:
        weights: (wx, wy, ww, wh) multipliers of the four deltas.
        scale_clamp: upper clamp of dw and dh when decoding.
    """

    def __init__(
        self, weights: tuple[float, float, float, float], scale_clamp: float = DEFAULT_SCALE_CLAMP
    ) -> None:
        if len(weights) != 4:
            raise ValueError(f"Box2BoxTransform needs 4 weights (wx, wy, ww, wh), got {weights!r}.")
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = float(scale_clamp)

    def get_deltas(self, src_boxes: Tensor, target_boxes: Tensor) -> Tensor:
        """Deltas that turn `src_boxes` into `target_boxes`.

        src_boxes, target_boxes: Tensor[N, 4] (x1, y1, x2, y2) -> Tensor[N, 4] (dx, dy, dw, dh).
        Source boxes must have positive width and height (training-time input; raises ValueError).
        """
        src_widths = src_boxes[:, 2] - src_boxes[:, 0]
        src_heights = src_boxes[:, 3] - src_boxes[:, 1]
        src_ctr_x = src_boxes[:, 0] + 0.5 * src_widths
        src_ctr_y = src_boxes[:, 1] + 0.5 * src_heights

        target_widths = target_boxes[:, 2] - target_boxes[:, 0]
        target_heights = target_boxes[:, 3] - target_boxes[:, 1]
        target_ctr_x = target_boxes[:, 0] + 0.5 * target_widths
        target_ctr_y = target_boxes[:, 1] + 0.5 * target_heights

        wx, wy, ww, wh = self.weights
        dx = wx * (target_ctr_x - src_ctr_x) / src_widths
        dy = wy * (target_ctr_y - src_ctr_y) / src_heights
        dw = ww * torch.log(target_widths / src_widths)
        dh = wh * torch.log(target_heights / src_heights)

        deltas = torch.stack((dx, dy, dw, dh), dim=1)
        if not bool((src_widths > 0).all()) or not bool((src_heights > 0).all()):
            raise ValueError("Box2BoxTransform.get_deltas: source boxes must have positive width and height.")
        return deltas

    def apply_deltas(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """Decode `deltas` relative to `boxes`.

        deltas: Tensor[N, k*4] (k >= 1 box sets per row, e.g. one per class); boxes: Tensor[N, 4].
        Returns Tensor[N, k*4] float32 (decoding always runs in float32, like detectron2).
        """
        deltas = deltas.float()
        boxes = boxes.to(deltas.dtype)

        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights

        wx, wy, ww, wh = self.weights
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = deltas[:, 2::4] / ww
        dh = deltas[:, 3::4] / wh

        # Prevent sending too large values into torch.exp().
        dw = torch.clamp(dw, max=self.scale_clamp)
        dh = torch.clamp(dh, max=self.scale_clamp)

        pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
        pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
        pred_w = torch.exp(dw) * widths[:, None]
        pred_h = torch.exp(dh) * heights[:, None]

        x1 = pred_ctr_x - 0.5 * pred_w
        y1 = pred_ctr_y - 0.5 * pred_h
        x2 = pred_ctr_x + 0.5 * pred_w
        y2 = pred_ctr_y + 0.5 * pred_h
        pred_boxes = torch.stack((x1, y1, x2, y2), dim=-1)
        return pred_boxes.reshape(deltas.shape)
