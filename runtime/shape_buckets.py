"""Opt-in shape bucketing: pad each batch's H and W up to a small fixed ladder of sides.

Why: a TensorRT engine with a dynamic profile re-plans on every new input shape, and NVIDIA/TensorRT#4849
(open; 11.1-11.2) leaks CUDA modules of AOT plugins on such shape changes. A server that sees arbitrary image
sizes would keep leaking. With buckets the engine sees at most ``len(sides) ** 2`` shapes per batch size.

The ladder (:func:`default_sides`): ``max_size * k / 8`` for k = 1..8 plus ``short_edge``, each rounded up to
the size divisibility. For detectron2's ResizeShortestEdge(800, 1333) that is 192 352 512 672 800 864 1024
1184 1344: one side of a resized image is the short edge (800, an exact rung) unless the long side is capped,
and the other side pads by at most ``max_size / 8`` (167 px). Typical photos: 4:3 800x1067 -> 800x1184,
3:2 800x1200 -> 800x1344, 16:9 750x1333 -> 800x1344.

Cost: the zeros are outside ``image_sizes``, but detectron2 is not invariant to them. Convolutions over the
padded area feed features back into the image near its right/bottom border, and the RPN places anchors over
the whole padded feature map (their proposals are clipped to the image), so the pre-NMS top-k can change.
Results are exact to detectron2 run on the *padded* input, not to the unpadded one; docs/gpu-deployment.md
has the measured difference.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from frcnn.runtime.errors import UserError

__all__ = ["default_sides", "pad_to_bucket", "resolve_sides"]


def _round_up(value: float, div: int) -> int:
    return int(-(-int(np.ceil(value)) // div) * div)


def default_sides(short_edge: int, max_size: int, divisibility: int = 32) -> tuple[int, ...]:
    """The bucket ladder for a ResizeShortestEdge(short_edge, max_size) model (see the module docstring)."""
    div = max(int(divisibility), 1)
    sides = {_round_up(max_size * k / 8, div) for k in range(1, 9)} | {_round_up(short_edge, div)}
    return tuple(sorted(sides))


def resolve_sides(shape_buckets: bool | Sequence[int], short_edge: int, max_size: int,
                  divisibility: int) -> tuple[int, ...]:  # fmt: skip
    """``True`` -> :func:`default_sides`; a sequence of sides -> validated and sorted; ``False`` -> ``()``.

    Raises UserError when a side is not a positive multiple of ``divisibility`` or the largest side is smaller
    than a resized image can be (``max_size`` rounded up).
    """
    if shape_buckets is False or shape_buckets is None:
        return ()
    if shape_buckets is True:
        return default_sides(short_edge, max_size, divisibility)
    try:
        sides = tuple(sorted({int(s) for s in shape_buckets}))
    except (TypeError, ValueError):
        raise UserError(f"shape_buckets must be True or a list of sides such as [800, 1088, 1344], got "
                        f"{shape_buckets!r}") from None
    div = max(int(divisibility), 1)
    if not sides or any(s <= 0 or s % div for s in sides):
        raise UserError(f"shape_buckets sides must be positive multiples of {div} (the model's size "
                        f"divisibility), got {list(sides)}")
    if sides[-1] < _round_up(max_size, div):
        raise UserError(f"the largest shape_buckets side {sides[-1]} is smaller than a resized image can be "
                        f"({_round_up(max_size, div)}); add {_round_up(max_size, div)} to the list")
    return sides


def pad_to_bucket(images: np.ndarray, sides: Sequence[int]) -> np.ndarray:
    """Zero-pad uint8 ``[B, 3, H, W]`` so H and W are the smallest ladder sides >= them (no copy when equal).

    ``sides`` must be sorted ascending (:func:`resolve_sides`); H or W above the largest side is an error.
    """
    b, c, h, w = images.shape
    ladder = np.asarray(sides)
    if h > ladder[-1] or w > ladder[-1]:
        raise UserError(f"image batch {h}x{w} is larger than the largest shape bucket {ladder[-1]}; add a larger "
                        f"side to shape_buckets")
    bh, bw = int(ladder[np.searchsorted(ladder, h)]), int(ladder[np.searchsorted(ladder, w)])
    if (bh, bw) == (h, w):
        return images
    out = np.zeros((b, c, bh, bw), dtype=images.dtype)
    out[:, :, :h, :w] = images
    return out
