"""What each rank holds under FSDP2 (``strategy="fsdp"``) vs DDP: parameters, AdamW, EMA.

Run it under ``torchrun`` (2 gloo processes on CPU)::

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node=2 \\
        benchmarks/fsdp_shards.py

For a U-Net and a DiT it runs two optimizer steps with ``strategy="fsdp"``, then each rank
counts the elements and bytes it holds locally (a DTensor's local shard) of the
parameters, the AdamW moments and the EMA copy. The peer is DDP (``strategy="ddp"``),
where each rank holds all of them. Rank 0 prints one row per rank and the fraction
fsdp / ddp.
"""

import platform
from typing import Any, Literal, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset

from diffkit.nn.dit import DiT, DiTConfig
from diffkit.nn.unet import UNet, UNetConfig
from diffkit.schedules import Cosine
from diffkit.training import DenoiserLoss, TrainConfig, distributed, finish, prepare, train_step


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    unet = UNet(
        UNetConfig(
            in_channels=4,
            base_channels=32,
            channel_mult=(1, 2, 2),
            attention_resolutions=(2, 4),
            blocks_per_level=2,
            prediction="v",
        )
    )
    dit = DiT(DiTConfig(in_channels=4, dim=192, depth=6, num_heads=3, prediction="v"))
    return {"unet": unet, "dit": dit}


def _local(tensors: list[Tensor]) -> tuple[int, int]:
    """(elements, bytes) this rank holds of ``tensors``."""
    parts = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]  # type: ignore[operator]
    return sum(p.numel() for p in parts), sum(p.numel() * p.element_size() for p in parts)


def _held(model: nn.Module, strategy: Literal["ddp", "fsdp"]) -> dict[str, tuple[int, int]]:
    data = [{"x": torch.randn(4, 16, 16)} for _ in range(16)]
    config = TrainConfig(
        steps=2, batch_size=4, lr=1e-4, ema_decay=0.99, progress=False, strategy=strategy
    )
    state = prepare(model, DenoiserLoss(Cosine()), cast(Dataset[Any], data), config)
    try:
        for step in range(2):
            train_step(state, step)
        moments = [v for s in state.optimizer.state.values() for k, v in s.items() if k != "step"]
        assert state.ema is not None
        return {
            "params": _local(list(model.parameters())),
            "adamw": _local(moments),
            "ema": _local(list(state.ema.module.parameters())),
        }
    finally:
        finish(state)


def main() -> None:
    torch.set_num_threads(1)
    with distributed() as info:
        rows = []
        for name in ("unet", "dit"):
            ddp = _held(_models()[name], "ddp")
            fsdp = _held(_models()[name], "fsdp")
            rows.append((name, ddp, fsdp))
        gathered: list[object] = [None] * info.world_size
        dist.all_gather_object(gathered, (info.rank, rows))
    if not info.is_main:
        return
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{info.world_size} gloo processes on CPU"
    )
    print("model | rank | what   | ddp elements | fsdp elements | fsdp MiB | fsdp / ddp")
    for rank, rows in sorted(gathered):  # type: ignore[arg-type]
        for name, ddp, fsdp in rows:
            for what in ("params", "adamw", "ema"):
                (n_ddp, _), (n_fsdp, b_fsdp) = ddp[what], fsdp[what]
                print(
                    f"{name:5} | {rank:4} | {what:6} | {n_ddp:12d} | {n_fsdp:13d} | "
                    f"{b_fsdp / 2**20:8.3f} | {n_fsdp / n_ddp:.4f}"
                )


if __name__ == "__main__":
    main()
