"""Batching: the shards of a global batch, their epochs, and their random generators.

One optimizer step draws a *global batch* of ``batch_size`` items, cut into
``batch_size / micro_batch_size`` *shards*. Each shard reads its own slice of every epoch
([`shard_batches`][diffkit.data.shard_batches]: a ``DistributedSampler`` over shards,
reshuffled by ``set_epoch``) and draws from its own generator, a pure function of
``(seed, step, shard)``. The ranks of a job share the shards out and accumulate the rest,
so what a run computes depends on its config, not on how many processes run it.
"""

import dataclasses
from collections.abc import Generator, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from diffkit.data import Batch, collate, shard_batches
from diffkit.training._config import TrainConfig
from diffkit.training._distributed import DistributedInfo

__all__ = ["step_generator"]


def step_generator(
    seed: int, step: int, shard: int, device: str | torch.device = "cpu"
) -> torch.Generator:
    """The generator for one shard of one step, a pure function of ``(seed, step, shard)``."""
    words = np.random.SeedSequence([seed, step, shard]).generate_state(2, dtype=np.uint32)
    value = (int(words[0]) << 31) ^ int(words[1])
    return torch.Generator(device=device).manual_seed(value)


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """How one rank's part of a global batch is cut: its shards, run one after another."""

    micro: int
    """Items per forward/backward pass."""
    num_shards: int
    """Shards of the global batch, over all ranks."""
    shards: tuple[int, ...]
    """This rank's shards (accumulated in one step)."""

    @classmethod
    def of(cls, config: TrainConfig, info: DistributedInfo) -> "ShardPlan":
        """The plan of ``config``'s batch on ``info``'s rank; refuses an uneven split."""
        micro = config.micro_batch_size or config.batch_size // info.world_size
        if micro < 1 or config.batch_size % micro:
            raise ValueError(
                f"batch_size {config.batch_size} cannot be split over {info.world_size} processes"
            )
        num_shards = config.batch_size // micro
        if num_shards % info.world_size:
            raise ValueError(
                f"{num_shards} shards (batch_size / micro_batch_size) cannot be shared evenly "
                f"by {info.world_size} processes"
            )
        accum = num_shards // info.world_size
        return cls(micro, num_shards, tuple(info.rank * accum + j for j in range(accum)))

    @property
    def accum(self) -> int:
        """Micro-batches accumulated per step on this rank."""
        return len(self.shards)


class EpochBatches:
    """Index batches of this process's shards, cut per epoch and cached for the current one."""

    def __init__(self, size: int, plan: ShardPlan, seed: int) -> None:
        self.size, self.micro, self.shards = size, plan.micro, list(plan.shards)
        self.num_shards, self.seed = plan.num_shards, seed
        self.steps_per_epoch = (size // self.num_shards) // self.micro
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the dataset ({size} items) is smaller than one global batch "
                f"({self.num_shards} x {self.micro}); lower batch_size"
            )
        self._epoch = -1
        self._batches: dict[int, list[list[int]]] = {}

    def at(self, step: int) -> Iterator[tuple[int, list[int]]]:
        """This process's ``(shard, indices)`` pairs of step ``step``."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._batches = {
                s: shard_batches(
                    self.size,
                    batch_size=self.micro,
                    epoch=epoch,
                    seed=self.seed,
                    shard=s,
                    num_shards=self.num_shards,
                )
                for s in self.shards
            }
        for s in self.shards:
            yield s, self._batches[s][position]

    def stream(
        self, dataset: Dataset[Any], start: int, stop: int, num_workers: int, pin: bool
    ) -> Generator[list[tuple[int, Batch]], None, None]:
        """For each step from ``start`` to ``stop``: this process's ``(shard, batch)`` pairs.

        With workers, one ``DataLoader`` reads every step (its workers start once, not
        once per epoch), in the same order as the inline path.
        """
        if num_workers == 0:
            for k in range(start, stop):
                yield [(s, collate([dataset[i] for i in idx])) for s, idx in self.at(k)]
            return
        loader = DataLoader(
            dataset,
            batch_sampler=_StepBatches(self, start, stop),
            collate_fn=collate,
            num_workers=num_workers,
            pin_memory=pin,
            # its own generator: worker seeding must not draw from the global RNG
            generator=torch.Generator().manual_seed(self.seed + start // self.steps_per_epoch),
        )
        items = iter(loader)
        try:
            for _ in range(start, stop):
                yield [(s, next(items)) for s in self.shards]
        finally:
            del items  # shuts the workers down now, not when the generator is collected


class _StepBatches:
    """A ``batch_sampler``: the index batches of steps ``start`` to ``stop``, shard by shard."""

    def __init__(self, batches: EpochBatches, start: int, stop: int) -> None:
        self.batches, self.start, self.stop = batches, start, stop

    def __iter__(self) -> Iterator[list[int]]:
        for k in range(self.start, self.stop):
            for _, idx in self.batches.at(k):
                yield idx

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * len(self.batches.shards)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """``batch`` with its tensors on ``device`` (captions stay as they are)."""
    labels = batch.labels.to(device, non_blocking=True) if batch.labels is not None else None
    temporal = batch.temporal.to(device) if batch.temporal is not None else None
    return dataclasses.replace(
        batch, x=batch.x.to(device, non_blocking=True), labels=labels, temporal=temporal
    )
