"""Distributed data parallel in two lines: ``dist = ddp.init()`` and ``dist.prepare(...)``.

A single-process training script becomes a DDP one by adding::

    dist = ddp.init()
    model, loader = dist.prepare(model, dataset, batch_size=128, seed=0)

``init`` reads what ``torchrun`` puts in the environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and joins the process group: gloo on CPU,
nccl when CUDA is there. Outside ``torchrun`` it is a no-op with ``world_size == 1``, so the
same script runs both ways. ``prepare`` wraps the model in ``DistributedDataParallel`` and
returns a loader that shards the dataset with a ``DistributedSampler``, advances the
sampler's epoch each time it is iterated (a forgotten ``set_epoch`` silently repeats one
shuffle every epoch) and moves each batch to the process's device.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Sized
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Final

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

__all__ = [
    "Distributed",
    "ShardedLoader",
    "init",
    "seed_everything",
    "unwrap",
]

DEFAULT_TIMEOUT: Final = timedelta(minutes=10)
"""How long a collective waits for the other ranks before failing instead of hanging."""

Batch = Any
"""Whatever the dataset's collate function yields (tensors, tuples or dicts of tensors)."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, so a run with the same data and seed repeats itself."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a ``DistributedDataParallel`` wrapper (or the model itself).

    Export and ``state_dict`` want the plain model: DDP's keys carry a ``module.`` prefix.
    """
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    if not isinstance(inner, nn.Module):
        raise TypeError("DistributedDataParallel does not wrap a module")
    return inner


def _move(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple | list):
        return type(batch)(_move(item, device) for item in batch)
    if isinstance(batch, dict):
        return {key: _move(value, device) for key, value in batch.items()}
    return batch


class ShardedLoader:
    """A ``DataLoader`` over this rank's shard that starts a new epoch on each iteration."""

    def __init__(
        self, loader: DataLoader[Any], sampler: DistributedSampler[Any], device: torch.device
    ) -> None:
        self.loader = loader
        self.sampler = sampler
        self.device = device
        self.epoch = 0
        """The epoch the next iteration uses; ``set_epoch`` overrides it (e.g. on resume)."""

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration use ``epoch``'s shuffle."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        # Every rank shuffles with seed + epoch, so the shards stay disjoint and change per epoch.
        self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        for batch in self.loader:
            yield _move(batch, self.device)

    def __len__(self) -> int:
        return len(self.loader)


@dataclass
class Distributed:
    """This process's place in the job; ``world_size == 1`` when not under ``torchrun``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    """``gloo`` or ``nccl`` while a process group is open, else ``None``."""

    @property
    def is_distributed(self) -> bool:
        """Whether a process group with other ranks is open."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the only rank that logs, exports and registers."""
        return self.rank == 0

    def prepare(
        self,
        model: nn.Module,
        dataset: Dataset[Any],
        *,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        num_workers: int = 0,
    ) -> tuple[nn.Module, ShardedLoader]:
        """Move the model to this rank's device (DDP-wrapped when distributed) and shard data.

        Every rank gets the same number of batches (the sampler pads the last shard by
        repeating samples), so no rank waits forever in a gradient all-reduce.
        """
        model = model.to(self.device)
        if self.is_distributed:
            device_ids = [self.local_rank] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=device_ids)
        sampler: DistributedSampler[Any] = DistributedSampler(
            dataset,
            num_replicas=self.world_size,
            rank=self.rank,
            shuffle=shuffle,
            seed=seed,
        )
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
        )
        return model, ShardedLoader(loader, sampler, self.device)

    def shard(self, dataset: Dataset[Any]) -> Dataset[Any]:
        """This rank's share of ``dataset`` for evaluation: every item once, no padding.

        Sum counts over ranks with ``all_reduce_sum``; a mean of per-rank means would weigh
        unequal shards wrongly.
        """
        if not isinstance(dataset, Sized):
            raise TypeError("shard needs a dataset with a length")
        return Subset(dataset, range(self.rank, len(dataset), self.world_size))

    def all_reduce_mean(self, value: float | torch.Tensor) -> float:
        """The mean of ``value`` over all ranks (the value itself when not distributed)."""
        return self.all_reduce_sum(value) / self.world_size

    def all_reduce_sum(self, value: float | torch.Tensor) -> float:
        """The sum of ``value`` over all ranks (the value itself when not distributed)."""
        if not self.is_distributed:
            return float(value)
        tensor = torch.as_tensor(value, dtype=torch.float64, device=self.device).detach()
        # gloo and nccl both reduce float64; a clone keeps the caller's tensor unchanged.
        tensor = tensor.clone().reshape(1)
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        return float(tensor.item())

    def barrier(self) -> None:
        """Wait until every rank gets here (no-op when not distributed)."""
        if self.is_distributed:
            if self.device.type == "cuda":
                torch_dist.barrier(device_ids=[self.local_rank])
            else:
                torch_dist.barrier()

    def close(self) -> None:
        """Leave the process group; safe to call twice and when none was opened."""
        if self.is_distributed and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
        self.backend = None

    def __enter__(self) -> Distributed:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw not in (None, "") else default


def init(*, backend: str | None = None, timeout: timedelta = DEFAULT_TIMEOUT) -> Distributed:
    """Join the ``torchrun`` job this process belongs to, or return a single-process context.

    ``backend`` overrides the choice of nccl (CUDA available) or gloo (CPU). On CUDA each rank
    uses the GPU of its ``LOCAL_RANK``. CPU threads per rank follow ``OMP_NUM_THREADS``, which
    ``torchrun`` sets to 1 for several ranks per node so they do not fight over the cores.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size <= 1:
        return Distributed(device=device)
    if not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        raise RuntimeError("WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are not set: use torchrun")
    chosen = backend or ("nccl" if cuda else "gloo")
    torch_dist.init_process_group(
        backend=chosen,
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=timeout,
        device_id=device if cuda else None,
    )
    return Distributed(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=device,
        backend=chosen,
    )
