"""Batch loaders: one index operation per step for in-memory data, a DataLoader with workers for image folders.

Sharding follows one rule set for both kinds (:class:`ShardSampler`):

* training (``shuffle=True``) uses ``DistributedSampler``'s semantics: one permutation seeded by
  ``seed + epoch``, padded by repeating its head so every rank gets the same count (or truncated with
  ``drop_last``), rank ``r`` taking positions ``r, r + world, ...``;
* evaluation (``shuffle=False``) gives rank ``r`` the contiguous slice ``[r * n // world, (r + 1) * n // world)``
  with **no padding**, so the shards cover every sample exactly once and concatenating them in rank order
  (:func:`headreg.engine.runtime.all_gather_variable`) restores dataset order. Ranks may then hold counts that
  differ by one sample, so do not run a DDP backward pass over an unshuffled loader.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from headreg._runtime import DistInfo, dist_info
from headreg.data._datasets import TensorImageDataset
from headreg.errors import DataFileError, InvalidValueError

__all__ = ["BatchLoader", "ShardSampler", "create_loader", "default_workers"]


class ShardSampler(Sampler[int]):
    """The sample indices one rank visits in one epoch; deterministic given ``seed`` and the epoch.

    Args:
        dataset_size: Samples in the dataset.
        shuffle: Permute every epoch (training) or keep dataset order (evaluation). See the module docstring.
        seed: Seed of the permutation and of the ``limit`` subset.
        rank: This process's rank.
        world_size: Number of processes.
        drop_last: Training only: truncate instead of padding so ranks hold equal counts.
        limit: Keep only this many samples: a subset drawn once from ``seed`` (the same every epoch), in
            dataset order when not shuffling. A random subset, not the first ``limit``, because image folders
            are sorted by class.
    """

    def __init__(
        self,
        dataset_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        limit: int | None = None,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise InvalidValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise InvalidValueError(f"limit must be a positive integer or None, got {limit!r}")
        self.dataset_size = dataset_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        if limit is not None and limit < dataset_size:
            pick = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed))[:limit]
            self.pool: torch.Tensor | None = pick.sort().values
        else:
            self.pool = None

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (``seed + epoch`` seeds it, as in DistributedSampler)."""
        self.epoch = int(epoch)

    @property
    def num_pool(self) -> int:
        return self.dataset_size if self.pool is None else int(self.pool.numel())

    def indices(self) -> torch.Tensor:
        """``(n_rank,)`` int64 dataset indices this rank visits this epoch, in visiting order."""
        n, world, rank = self.num_pool, self.world_size, self.rank
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
            if world > 1:
                if self.drop_last:
                    order = order[: (n // world) * world]
                elif n % world:
                    pad = world - n % world
                    order = torch.cat([order, order.repeat(pad // n + 1)[:pad]])
                order = order[rank::world]
        else:
            order = torch.arange(rank * n // world, (rank + 1) * n // world)
        return order if self.pool is None else self.pool[order]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        n, world = self.num_pool, self.world_size
        if not self.shuffle:
            return (self.rank + 1) * n // world - self.rank * n // world
        if world == 1:
            return n
        return n // world if self.drop_last else -(-n // world)


class BatchLoader:
    """An iterable of ``(images, labels)`` batches over one rank's shard, with ``set_epoch``.

    For a :class:`TensorImageDataset` each step is a single ``index_select`` on the (optionally device-resident)
    tensors, yielding ``(B, C, H, W)`` uint8 images and ``(B,)`` int64 labels. Otherwise it wraps a
    ``torch.utils.data.DataLoader`` whose sampler is the same :class:`ShardSampler`.

    Attributes:
        dataset: The dataset.
        sampler: The :class:`ShardSampler` deciding the indices.
        batch_size: Samples per batch.
    """

    def __init__(
        self,
        dataset: Any,
        sampler: ShardSampler,
        *,
        batch_size: int,
        drop_last: bool,
        num_workers: int,
        pin_memory: bool,
        device: torch.device | None,
    ) -> None:
        self.dataset = dataset
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.pin_memory = pin_memory
        self._dataloader: DataLoader | None = None
        if isinstance(dataset, TensorImageDataset):
            # A loader-local copy on the device: the caller's dataset is left where it is.
            target = device if device is not None else dataset.device
            self._images = dataset.images.to(target)
            self._labels = dataset.targets.to(target)
        else:
            self._generator = torch.Generator()
            self._dataloader = DataLoader(
                dataset,
                batch_size=batch_size,
                sampler=sampler,
                num_workers=num_workers,
                pin_memory=pin_memory,
                drop_last=drop_last,
                persistent_workers=num_workers > 0,
                generator=self._generator,
            )

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle (deterministically) for ``epoch``; call before iterating each epoch."""
        self.sampler.set_epoch(epoch)

    def sample_indices(self) -> torch.Tensor:
        """``(n,)`` int64 dataset indices this rank yields this epoch, in order (``drop_last`` not applied)."""
        return self.sampler.indices()

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch, after ``drop_last``."""
        n = len(self.sampler)
        return (n // self.batch_size) * self.batch_size if self.drop_last else n

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._dataloader is not None:
            # Worker seeds follow the epoch too, so per-sample augmentation is reproducible.
            self._generator.manual_seed(self.sampler.seed + self.sampler.epoch)
            try:
                yield from self._dataloader
            except DataFileError as exc:  # from a worker, whose traceback became the message: keep our line
                raise DataFileError(_worker_message(str(exc))) from None
            return
        idx = self.sampler.indices().to(self._images.device)
        stop = len(self) * self.batch_size if self.drop_last else idx.numel()
        for start in range(0, stop, self.batch_size):
            chunk = idx[start : start + self.batch_size]
            images, labels = self._images.index_select(0, chunk), self._labels.index_select(0, chunk)
            if self.pin_memory and images.device.type == "cpu":
                images, labels = images.pin_memory(), labels.pin_memory()
            yield images, labels

    def __repr__(self) -> str:
        return (
            f"BatchLoader(dataset={self.dataset!r}, batch_size={self.batch_size}, batches={len(self)}, "
            f"rank={self.sampler.rank}/{self.sampler.world_size}, shuffle={self.sampler.shuffle})"
        )


def create_loader(
    dataset: Any,
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    distributed: bool | DistInfo | None = None,
    pin_memory: bool | None = None,
    limit: int | None = None,
    device: torch.device | str | None = None,
) -> BatchLoader:
    """Create an iterable of ``(images, labels)`` batches, sharded across ranks under torch.distributed.

    Args:
        dataset: From :func:`~headreg.data.create_dataset` (or any map-style dataset).
        batch_size: Samples per batch (per rank).
        shuffle: True to train (reshuffled per :meth:`BatchLoader.set_epoch`), False to evaluate in order.
        num_workers: DataLoader workers for file-backed datasets; in-memory datasets need none and ignore it.
        seed: Seed of shuffling, the ``limit`` subset and DataLoader worker seeds.
        drop_last: Drop each rank's last incomplete batch (and, when shuffling under distributed, the samples
            that would otherwise be padded).
        distributed: ``None`` detects an initialised process group (:func:`headreg.engine.runtime.dist_info`);
            ``False`` reads the whole dataset; ``True`` requires a process group; a ``DistInfo`` shards as that
            rank would.
        pin_memory: Page-locked host batches for faster, asynchronous copies to a GPU; ``None`` means "if CUDA is
            available and the batches stay on the host".
        limit: Cap the number of samples (quick looks); see :class:`ShardSampler`.
        device: For in-memory datasets, hold the images on this device and index batches there (the whole of
            MNIST is 47 MB: no host-to-device copy per step). Ignored for file-backed datasets.

    Returns:
        A :class:`BatchLoader`.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise InvalidValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
    if len(dataset) == 0:
        raise InvalidValueError(f"dataset {dataset!r} is empty: nothing to load")
    rank, world = _rank_and_world(distributed)
    sampler = ShardSampler(
        len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world, drop_last=drop_last, limit=limit
    )
    dev = torch.device(device) if device is not None else None
    on_host = dev is None or dev.type == "cpu"
    if isinstance(dataset, TensorImageDataset) and dev is None:
        on_host = dataset.device.type == "cpu"
    if pin_memory is None:
        pin_memory = on_host and torch.cuda.is_available()
    return BatchLoader(
        dataset,
        sampler,
        batch_size=batch_size,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=bool(pin_memory),
        device=dev,
    )


def default_workers() -> int:
    """DataLoader workers for a file-backed dataset (image folders, ``rec:``) when the caller names none: up to 8."""
    import os

    return min(8, os.cpu_count() or 1)


def _worker_message(text: str) -> str:
    """The message of a :class:`DataFileError` raised in a DataLoader worker, without the worker's traceback.

    torch re-raises a worker's exception in the main process as ``type(exc)(text)``, where ``text`` is
    "Caught ... in DataLoader worker process N. Original Traceback ...", ending with the original line.
    """
    marker = f"{DataFileError.__module__}.{DataFileError.__qualname__}: "
    return text.rsplit(marker, 1)[1].strip() if marker in text else text


def _rank_and_world(distributed: bool | DistInfo | None) -> tuple[int, int]:
    if isinstance(distributed, DistInfo):
        return distributed.rank, distributed.world_size
    if distributed is False:
        return 0, 1
    info = dist_info()
    if distributed is True and not info.is_distributed:
        raise InvalidValueError(
            "distributed=True but no torch.distributed process group with more than one rank is initialised; "
            "launch with torchrun and call headreg.engine.runtime.init_distributed() first"
        )
    return (info.rank, info.world_size) if info.is_distributed else (0, 1)
