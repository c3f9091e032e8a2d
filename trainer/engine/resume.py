"""A training loader that can start at iteration ``start_iter`` with exactly the batches an uninterrupted run
would have seen there.

``frcnn.trainer.data.build_train_loader`` makes every sample a pure function of (seed, rank, sample number
n) and groups samples into batches by orientation (width > height) in stream order (see its module
docstring). So the batches after ``start_iter`` are known without reading any image:

1. replay the index stream of this rank (``train_indices``) with the images' width/height from the dataset
   dicts and the same bucketing, counting batches, until ``start_iter`` batches are complete; the first
   sample a later batch needs is the smallest sample number left in a bucket (or the next one);
2. build the real loader with a mapper that returns a light ``{"height", "width"}`` stand-in (no image
   read) for every sample before that one, and discard ``start_iter`` batches from it.

Step 2 costs a dictionary per skipped sample; the batches afterwards are the uninterrupted run's, bit for
bit (the mapper's randomness comes from (seed, rank, n), not from the order of calls).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from frcnn.runtime.errors import UserError
from torch.utils.data import get_worker_info

__all__ = ["first_needed_sample", "resumable_train_loader"]


def _per_rank_batch(cfg: Any, world_size: int) -> int:
    total = int(cfg.SOLVER.IMS_PER_BATCH)
    if total <= 0 or total % world_size:
        raise UserError(
            f"SOLVER.IMS_PER_BATCH={total} must be a positive multiple of the number of processes ({world_size})."
        )
    return total // world_size


def first_needed_sample(
    dataset_dicts: Sequence[dict[str, Any]], start_iter: int, batch_size: int, seed: int,
    rank: int = 0, world_size: int = 1, group: bool = True,
) -> int:  # fmt: skip
    """Smallest sample number (of this rank's stream) that a batch after the first ``start_iter`` uses."""
    from frcnn.trainer.data.loader import train_indices

    if start_iter <= 0:
        return 0
    buckets: list[list[int]] = [[], []]
    done = 0
    stream = train_indices(len(dataset_dicts), seed, rank, world_size)
    for n, index in enumerate(stream):
        d = dataset_dicts[index]
        bucket = buckets[(0 if d["width"] > d["height"] else 1) if group else 0]
        bucket.append(n)
        if len(bucket) == batch_size:
            bucket.clear()
            done += 1
            if done == start_iter:
                return min([n + 1] + [m for b in buckets for m in b])
    raise AssertionError("unreachable: the index stream is infinite")


class _SkipMapper:
    """Mapper wrapper: light stand-ins for sample numbers < ``first``; the real mapping afterwards.

    The sample number is recovered as the loader documents it: worker k of K maps n = k, k + K, ...
    """

    def __init__(self, mapper: Callable[..., dict[str, Any]], first: int) -> None:
        self.mapper, self.first, self.calls = mapper, first, 0

    def __call__(self, dataset_dict: dict[str, Any], rng: Any = None) -> dict[str, Any]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        n = worker + self.calls * workers
        self.calls += 1
        if n < self.first:
            return {"height": dataset_dict["height"], "width": dataset_dict["width"], "skipped": True}
        return self.mapper(dataset_dict, rng)


def resumable_train_loader(
    cfg: Any, dataset_dicts: Sequence[dict[str, Any]], *, start_iter: int, seed: int,
    rank: int = 0, world_size: int = 1,
) -> Iterator[list[dict[str, Any]]]:  # fmt: skip
    """``build_train_loader`` positioned after ``start_iter`` batches (see the module docstring).

    ``seed`` must be the data seed of the run being resumed (>= 0). Empty-annotation images are filtered
    here (DATALOADER.FILTER_EMPTY_ANNOTATIONS), before the replay, so both see the same list.
    """
    from frcnn.trainer.data import DatasetMapper, build_train_loader, filter_images_without_annotations

    dicts = list(dataset_dicts)
    if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
        dicts = filter_images_without_annotations(dicts)
    batch_size = _per_rank_batch(cfg, world_size)
    group = bool(cfg.DATALOADER.ASPECT_RATIO_GROUPING)
    mapper: Callable[..., dict[str, Any]] = DatasetMapper.from_config(cfg, is_train=True)
    if start_iter > 0:
        first = first_needed_sample(dicts, start_iter, batch_size, seed, rank, world_size, group)
        mapper = _SkipMapper(mapper, first)
    loader = build_train_loader(cfg, dicts, mapper=mapper, batch_size=batch_size, seed=seed, rank=rank,
                                world_size=world_size, aspect_ratio_grouping=group, filter_empty=False)  # fmt: skip
    for _ in itertools.islice(loader, start_iter):
        pass
    return loader
