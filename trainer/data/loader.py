"""Train and test data loaders: infinite shuffled stream, per-rank sharding, workers, aspect-ratio batches.

Train (detectron2 ``TrainingSampler`` + ``AspectRatioGroupedDataset``):

1. an infinite stream of dataset indices: epoch after epoch, a permutation from
   ``numpy.random.default_rng([seed, epoch])`` (the same on every rank, so ``seed`` must be shared);
2. rank ``r`` of ``W`` takes stream positions r, r + W, r + 2W, ... -> within an epoch ranks see disjoint
   images;
3. sample number ``n`` of a rank is mapped with ``rng = default_rng([seed, rank, n])``; worker ``k`` of ``K``
   maps the samples n = k, k + K, ... and ``torch.utils.data.DataLoader`` returns them round-robin, i.e. in
   stream order -> the batches are identical for any ``NUM_WORKERS``;
4. in the main process samples are grouped by orientation (bucket 0: width > height, 1: otherwise, like
   detectron2) and a batch is yielded when a bucket holds ``batch_size`` samples.

Test (detectron2 ``InferenceSampler``): each rank gets one contiguous, ordered shard; batches of
``batch_size`` in order (the last one may be smaller).

Batches are ``list[dict]`` (the mapper's dicts, see :class:`.mapper.DatasetMapper`).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from frcnn.runtime.errors import UserError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .coco import filter_images_without_annotations
from .mapper import DatasetMapper

__all__ = [
    "build_test_loader",
    "build_train_loader",
    "shared_seed",
    "train_indices",
    "trivial_batch_collator",
]

Mapper = Callable[..., dict[str, Any]]


def trivial_batch_collator(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Collate that keeps a batch as a list of dicts (images differ in size)."""
    return batch


def _identity(sample: Any) -> Any:
    return sample


def shared_seed(seed: int | None, world_size: int = 1) -> int:
    """``seed`` if given; else a random seed, broadcast from rank 0 when torch.distributed is initialized."""
    if seed is not None and seed >= 0:
        return int(seed)
    value = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    if world_size > 1:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise UserError(
                "a data-loader seed must be shared by all ranks: set SEED >= 0 (or pass seed=...) "
                "or initialize torch.distributed before building the loader."
            )
        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = int(box[0])
    return value


def train_indices(num_items: int, seed: int, rank: int = 0, world_size: int = 1) -> Iterator[int]:
    """Infinite stream of dataset indices seen by ``rank`` (steps 1-2 of the module docstring)."""
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is not in [0, world_size={world_size}).")

    def all_ranks() -> Iterator[int]:
        for epoch in itertools.count():
            yield from np.random.default_rng([seed, epoch]).permutation(num_items).tolist()

    return itertools.islice(all_ranks(), rank, None, world_size)


class _TrainStream(IterableDataset):
    """Mapped samples of one rank, split across DataLoader workers (step 3)."""

    def __init__(
        self, dataset_dicts: Sequence[dict[str, Any]], mapper: Mapper, seed: int, rank: int, world_size: int
    ) -> None:
        self.dataset_dicts, self.mapper = dataset_dicts, mapper
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        stream = train_indices(len(self.dataset_dicts), self.seed, self.rank, self.world_size)
        for n, index in enumerate(stream):
            if n % workers == worker:
                rng = np.random.default_rng([self.seed, self.rank, n])
                if info is None:
                    yield self.mapper(self.dataset_dicts[index], rng)
                    continue
                try:
                    yield self.mapper(self.dataset_dicts[index], rng)
                except UserError as exc:  # re-raised by the main process as itself, without the worker's traceback
                    yield WorkerUserError(type(exc), str(exc))
                    return


class WorkerUserError:
    """A UserError raised by the mapper inside a DataLoader worker, carried to the main process as a sample.

    torch would re-raise it with the worker's traceback pasted into the message; the batching step re-raises
    the original class with the original message instead (one clear line, e.g. naming the unreadable image).
    """

    def __init__(self, cls: type[UserError], message: str) -> None:
        self.cls, self.message = cls, message

    def reraise(self) -> None:
        raise self.cls(self.message)


class _Grouped:
    """Aspect-ratio grouped (or plain) batching of an infinite sample iterator (step 4)."""

    def __init__(self, samples: Any, batch_size: int, group: bool) -> None:
        self.samples, self.batch_size, self.group = samples, batch_size, group

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        buckets: list[list[dict[str, Any]]] = [[], []]
        for d in self.samples:
            if isinstance(d, WorkerUserError):
                d.reraise()
            bucket = buckets[(0 if d["width"] > d["height"] else 1) if self.group else 0]
            bucket.append(d)
            if len(bucket) == self.batch_size:
                batch = bucket[:]
                del bucket[:]
                yield batch


def build_train_loader(
    cfg: Any,
    dataset_dicts: Sequence[dict[str, Any]],
    *,
    mapper: Mapper | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    seed: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    aspect_ratio_grouping: bool | None = None,
    filter_empty: bool | None = None,
) -> Iterator[list[dict[str, Any]]]:
    """Infinite iterator of training batches (``list[dict]`` of ``batch_size`` mapped samples) for ``rank``.

    Defaults from cfg: ``batch_size = SOLVER.IMS_PER_BATCH // world_size`` (per rank),
    ``num_workers = DATALOADER.NUM_WORKERS``, ``seed = SEED`` (random when < 0, shared across ranks),
    ``aspect_ratio_grouping = DATALOADER.ASPECT_RATIO_GROUPING``,
    ``filter_empty = DATALOADER.FILTER_EMPTY_ANNOTATIONS``, ``mapper = DatasetMapper.from_config(cfg, True)``.
    """
    if batch_size is None:
        total = int(cfg.SOLVER.IMS_PER_BATCH)
        if total % world_size:
            raise UserError(
                f"SOLVER.IMS_PER_BATCH={total} must be divisible by the number of processes ({world_size})."
            )
        batch_size = total // world_size
    if batch_size <= 0:
        raise UserError(f"batch size per process must be >= 1, got {batch_size}.")
    num_workers = int(cfg.DATALOADER.NUM_WORKERS) if num_workers is None else num_workers
    group = (
        bool(cfg.DATALOADER.ASPECT_RATIO_GROUPING) if aspect_ratio_grouping is None else aspect_ratio_grouping
    )
    filter_empty = bool(cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS) if filter_empty is None else filter_empty
    dicts = list(dataset_dicts)
    if filter_empty:
        dicts = filter_images_without_annotations(dicts)
    if not dicts:
        raise UserError("the training dataset is empty: there is nothing to train on.")
    seed = shared_seed(int(getattr(cfg, "SEED", -1)) if seed is None else seed, world_size)
    mapper = DatasetMapper.from_config(cfg, is_train=True) if mapper is None else mapper
    stream = _TrainStream(dicts, mapper, seed, rank, world_size)
    samples: Any = stream
    if num_workers > 0:
        # batch_size=None: one sample at a time; collate_fn=_identity keeps it as the mapper made it (the
        # default would turn tuples into lists and arrays into tensors)
        samples = DataLoader(
            stream,
            batch_size=None,
            num_workers=num_workers,
            persistent_workers=True,
            prefetch_factor=2 * batch_size,
            collate_fn=_identity,
        )
    return iter(_Grouped(samples, batch_size, group))


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, dataset_dicts: Sequence[dict[str, Any]], mapper: Mapper) -> None:
        self.dataset_dicts, self.mapper = dataset_dicts, mapper

    def __len__(self) -> int:
        return len(self.dataset_dicts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.mapper(self.dataset_dicts[index])


def inference_shard(num_items: int, rank: int = 0, world_size: int = 1) -> range:
    """Contiguous indices of ``rank`` (detectron2 ``InferenceSampler``: shards of ceil(N / W))."""
    shard = (num_items - 1) // world_size + 1
    return range(min(shard * rank, num_items), min(shard * (rank + 1), num_items))


def build_test_loader(
    cfg: Any,
    dataset_dicts: Sequence[dict[str, Any]],
    *,
    mapper: Mapper | None = None,
    batch_size: int = 1,
    num_workers: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """Ordered loader over this rank's shard; batches are ``list[dict]`` (mapper: test mode, no flip)."""
    if not dataset_dicts:
        raise UserError("the evaluation dataset is empty: there is nothing to evaluate.")
    mapper = DatasetMapper.from_config(cfg, is_train=False) if mapper is None else mapper
    num_workers = int(cfg.DATALOADER.NUM_WORKERS) if num_workers is None else num_workers
    shard = [dataset_dicts[i] for i in inference_shard(len(dataset_dicts), rank, world_size)]
    return DataLoader(
        _ListDataset(shard, mapper),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=trivial_batch_collator,
    )
