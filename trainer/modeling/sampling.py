"""subsample_labels: pick a fixed-size, class-balanced training sample (detectron2 `subsample_labels`).

Given per-element labels (-1 ignore, `bg_label` background, anything else foreground):

    num_pos = min(#foreground, int(num_samples * positive_fraction))
    num_neg = min(#background, num_samples - num_pos)

then `num_pos` foreground and `num_neg` background indices are drawn uniformly without replacement with
`torch.randperm` (foreground permutation first, then background — the same random stream as detectron2, so
a seeded run samples the same elements). When foreground is scarce, background fills the sample.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["subsample_labels"]


def subsample_labels(
    labels: Tensor, num_samples: int, positive_fraction: float, bg_label: int
) -> tuple[Tensor, Tensor]:
    """labels: Tensor[N] integer (-1 = ignore, bg_label = background, other = foreground).

    Returns (pos_idx Tensor[P] int64, neg_idx Tensor[Q] int64), indices into `labels`, P + Q <= num_samples,
    in random order.
    """
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}.")
    positive = torch.nonzero((labels != -1) & (labels != bg_label), as_tuple=True)[0]
    negative = torch.nonzero(labels == bg_label, as_tuple=True)[0]

    num_pos = min(positive.numel(), int(num_samples * positive_fraction))
    num_neg = min(negative.numel(), num_samples - num_pos)

    perm1 = torch.randperm(positive.numel(), device=positive.device)[:num_pos]
    perm2 = torch.randperm(negative.numel(), device=negative.device)[:num_neg]
    return positive[perm1], negative[perm2]
