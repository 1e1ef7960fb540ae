"""Distributed set-up: join a ``torchrun`` job (DDP over ``torch.distributed``), per-rank state.

Nothing home-made: the processes of a job are ``torch.distributed`` ranks, the model is
wrapped in ``DistributedDataParallel``, and rank 0 writes files. Each rank's torch RNG
state travels with a checkpoint (gathered to rank 0) so that a resumed run continues
every rank's draws where the interrupted one left them.
"""

import contextlib
import dataclasses
import functools
import gc
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ParamSpec, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from diffkit.typing import warn_at_caller

__all__ = ["DistributedInfo", "distributed", "init_distributed"]


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """Where this process stands in a ``torch.distributed`` job (1 process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the one that logs and writes checkpoints)."""
        return self.rank == 0


def init_distributed(backend: str | None = None) -> DistributedInfo:
    """Join the ``torchrun`` job described by the environment (``RANK``, ``WORLD_SIZE``, ...).

    Uses ``nccl`` when CUDA is available, else ``gloo``. Without those variables (a plain
    ``python`` run) nothing is initialised and rank 0 of 1 is returned.
    """
    if dist.is_available() and dist.is_initialized():
        return _current_distributed()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return DistributedInfo(local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, init_method="env://")
    return _current_distributed()


@contextlib.contextmanager
def distributed(backend: str | None = None) -> Iterator[DistributedInfo]:
    """``with distributed() as info:``: join the ``torchrun`` job and leave it on exit.

    The process group is destroyed on exit when this block created it (a group that
    already existed is left to its owner). A process that exits with its group still
    alive can abort in gloo's or NCCL's destructors after its work is done, so a
    ``torchrun`` script should train inside this block (or call
    ``torch.distributed.destroy_process_group()`` itself).
    """
    created = not (dist.is_available() and dist.is_initialized())
    try:
        yield init_distributed(backend)
        if created and dist.is_available() and dist.is_initialized():
            gc.collect()  # sharded tensors' device meshes hold the group: free them first
            dist.barrier()  # no rank tears the group down under another's last collective
    finally:
        if created and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


_P = ParamSpec("_P")
_R = TypeVar("_R")


def leaves_what_it_joins(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``fn`` inside [`distributed`][diffkit.training.distributed]."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with distributed():
            return fn(*args, **kwargs)

    return wrapper


def _current_distributed() -> DistributedInfo:
    if not (dist.is_available() and dist.is_initialized()):
        return DistributedInfo()
    return DistributedInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", str(dist.get_rank()))),
    )


def resolve_device(name: str | None, info: DistributedInfo) -> torch.device:
    """The device ``name`` (``TrainConfig.device``) is on this rank; bare ``cuda``: its GPU."""
    if name is not None:
        device = torch.device(name)
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", info.local_rank)  # each rank its own GPU
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def seed_rank(seed: int, info: DistributedInfo) -> None:
    """Seed the global torch RNG from ``(seed, rank)``: dropout differs per rank, reproducibly."""
    torch.manual_seed(int(np.random.SeedSequence([seed, info.rank]).generate_state(1)[0]))


def mean_over_ranks(value: Tensor, info: DistributedInfo) -> Tensor:
    """The mean of ``value`` over the ranks (itself in one process)."""
    if info.world_size == 1:
        return value
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def barrier(info: DistributedInfo) -> None:
    """Wait for every rank (nothing in one process)."""
    if info.world_size > 1:
        dist.barrier()


def gather_rank_rng(info: DistributedInfo, device: torch.device) -> dict[str, Tensor]:
    """Every rank's torch CPU (and CUDA) RNG state, stacked by rank on rank 0 ({} elsewhere)."""
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    if info.world_size == 1:
        return {k: v[None] for k, v in states.items()}
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    stacked: dict[str, Tensor] = {}
    for key, state in states.items():
        state = state.to(on)
        parts = [torch.empty_like(state) for _ in range(info.world_size)] if info.is_main else None
        dist.gather(state, parts, dst=0)
        if parts is not None:
            stacked[key] = torch.stack(parts).cpu()
    return stacked


def reseed_rank(saved: int, path: Path, info: DistributedInfo, seed: int, step: int) -> None:
    """Warn that ``saved`` processes wrote ``path``; reseed this rank from (seed, rank, step)."""
    warn_at_caller(
        f"{path} holds the RNG states of {saved} process(es) but this run has "
        f"{info.world_size}: each process's global torch RNG is reseeded from "
        f"(seed, rank, step), so its draws (dropout) differ from an uninterrupted run's"
    )
    torch.manual_seed(int(np.random.SeedSequence([seed, info.rank, step]).generate_state(1)[0]))


def restore_rank_rng(
    rank_rng: dict[str, Tensor],
    path: Path,
    info: DistributedInfo,
    device: torch.device,
    seed: int,
    step: int,
) -> None:
    """Give each rank back its own RNG state; reseed per rank when the world size changed."""
    saved = rank_rng["torch"].shape[0] if "torch" in rank_rng else 1  # older files: rank 0's
    if saved != info.world_size:
        reseed_rank(saved, path, info, seed, step)
        return
    # clone(): a row of the stacked states is a view, and set_rng_state reads its storage
    if "torch" in rank_rng:
        torch.set_rng_state(rank_rng["torch"][info.rank].to(torch.uint8).clone())
    if "cuda" in rank_rng and device.type == "cuda":
        torch.cuda.set_rng_state(rank_rng["cuda"][info.rank].to(torch.uint8).clone(), device)
