"""Checkpoint formats: one safetensors file (rank 0) vs a sharded folder (DCP), same state.

Writes and reads the training state of a U-Net (weights, AdamW moments, EMA) in both
formats in one process, alternately, and prints the median times, their ratio and the
bytes on disk. Under ``torchrun --nproc_per_node N`` the sharded folder is written by
every rank (rank 0 prints what each rank wrote); the single file by rank 0 alone.

    PYTHONPATH=src python benchmarks/sharded_checkpoints.py --rounds 5
    PYTHONPATH=src torchrun --standalone --nproc_per_node 2 benchmarks/sharded_checkpoints.py
"""

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from diffkit.checkpoint import load_training_checkpoint, save_training_checkpoint
from diffkit.ema import EMA
from diffkit.nn.unet import UNet, UNetConfig
from diffkit.training import distributed, load_sharded_checkpoint, save_sharded_checkpoint


def state(base: int) -> tuple[UNet, torch.optim.AdamW, EMA]:
    """A U-Net with one AdamW step taken (so the moments exist) and its EMA."""
    torch.manual_seed(0)
    net = UNet(
        UNetConfig(
            in_channels=4,
            base_channels=base,
            channel_mult=(1, 2, 4),
            attention_resolutions=(2, 4),
            attention_head_dim=32,
        )
    )
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    return net, optimizer, EMA(net, 0.999)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", type=int, default=64, help="U-Net base channels")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with distributed() as info:
        net, optimizer, ema = state(args.base)
        device = torch.device("cpu")
        params = sum(p.numel() for p in net.parameters())
        root = Path(tempfile.mkdtemp()) if info.is_main else None
        times: dict[str, list[float]] = {
            k: [] for k in ("file save", "file load", "sharded save", "sharded load")
        }
        sizes: dict[str, int] = {}
        for r in range(args.rounds):
            if info.is_main and root is not None:
                t = time.perf_counter()
                file = save_training_checkpoint(
                    root / f"checkpoint-{r:08d}.safetensors",
                    model=net,
                    step=r,
                    optimizer=optimizer,
                    ema=ema,
                )
                times["file save"].append(time.perf_counter() - t)
                t = time.perf_counter()
                load_training_checkpoint(file, model=net, optimizer=optimizer, ema=ema)
                times["file load"].append(time.perf_counter() - t)
                sizes["file"] = file.stat().st_size
            folder = Path(tempfile.gettempdir()) / "diffkit-bench-sharded" / f"checkpoint-{r:08d}"
            t = time.perf_counter()
            save_sharded_checkpoint(
                folder, model=net, step=r, info=info, device=device, optimizer=optimizer, ema=ema
            )
            times["sharded save"].append(time.perf_counter() - t)
            t = time.perf_counter()
            load_sharded_checkpoint(
                folder, model=net, info=info, device=device, seed=0, optimizer=optimizer, ema=ema
            )
            times["sharded load"].append(time.perf_counter() - t)
            if info.is_main:
                sizes.update({p.name: p.stat().st_size for p in folder.glob("*.safetensors")})
        if info.is_main:
            print(
                f"U-Net base {args.base}: {params / 1e6:.1f} M parameters, "
                f"{info.world_size} process(es), {args.rounds} rounds, medians"
            )
            median = {key: statistics.median(values) for key, values in times.items()}
            for key, value in median.items():
                print(f"{key:14s} {value * 1e3:9.1f} ms")
            save = median["sharded save"] / median["file save"]
            load = median["sharded load"] / median["file load"]
            print(f"sharded / file: save {save:.2f}x, load {load:.2f}x")
            for name, size in sorted(sizes.items()):
                print(f"{name:48s} {size / 2**20:8.1f} MiB")
            shutil.rmtree(Path(tempfile.gettempdir()) / "diffkit-bench-sharded", ignore_errors=True)
            if root is not None:
                shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
