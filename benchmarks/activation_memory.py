"""Peak memory of a training step with and without ``activation_checkpointing`` (CPU, RSS).

    OMP_NUM_THREADS=1 python benchmarks/activation_memory.py

For a U-Net and a DiT, each setting runs in a fresh process: ``prepare``, one warm-up
step (AdamW's moments are allocated there), then the peak resident set size is reset
(``/proc/self/clear_refs``, Linux) and one more step runs. Blocks over 64 KiB are their
own mappings (``MALLOC_MMAP_THRESHOLD_``), so the RSS follows the live tensors. The
figure is that step's peak RSS above the RSS before it: what the step's activations,
gradients and temporaries add. Prints the medians over ``--repeats`` processes, the
losses of both settings (they agree) and the ratio checkpointed / plain.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import Dataset

from diffkit.nn.dit import DiT, DiTConfig
from diffkit.nn.unet import UNet, UNetConfig
from diffkit.schedules import Cosine
from diffkit.training import DenoiserLoss, TrainConfig, finish, prepare, train_step


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "unet":
        return UNet(
            UNetConfig(
                in_channels=4,
                base_channels=32,
                channel_mult=(1, 2, 2),
                attention_resolutions=(2, 4),
                blocks_per_level=2,
                prediction="v",
            )
        )
    return DiT(DiTConfig(in_channels=4, dim=192, depth=6, num_heads=3, prediction="v"))


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory figure in bytes (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def child(name: str, checkpointing: bool) -> None:
    """One setting in this process: print the step's peak RSS increase and its loss."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1)
    data = [{"x": torch.randn(4, 32, 32, generator=gen)} for _ in range(32)]
    config = TrainConfig(
        steps=2,
        batch_size=16,
        lr=1e-4,
        ema_decay=None,
        progress=False,
        activation_checkpointing=checkpointing,
    )
    state = prepare(_model(name), DenoiserLoss(Cosine()), cast(Dataset[Any], data), config)
    try:
        train_step(state, 0)
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to now
        before = _status("VmRSS")
        loss = train_step(state, 1).loss
        peak = _status("VmHWM")
    finally:
        finish(state)
    print(json.dumps({"extra": peak - before, "loss": loss}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1] == "1")
        return
    print(f"torch {torch.__version__}, CPU, 1 thread, batch 16, 32x32x4 inputs")
    print("model | plain MiB | checkpointed MiB | ratio | loss plain | loss checkpointed")
    # glibc: every block over 64 KiB is its own mapping, given back when freed, so the RSS
    # follows the live tensors instead of what malloc keeps cached
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for name in ("unet", "dit"):
        runs: dict[str, list[dict[str, float]]] = {"0": [], "1": []}
        for _ in range(args.repeats):
            for flag in ("0", "1"):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", name, flag],
                    capture_output=True,
                    text=True,
                    check=True,
                    env=env,
                )
                runs[flag].append(json.loads(out.stdout.strip().splitlines()[-1]))
        plain = statistics.median(r["extra"] for r in runs["0"])
        ckpt = statistics.median(r["extra"] for r in runs["1"])
        print(
            f"{name:5} | {plain / 2**20:9.1f} | {ckpt / 2**20:16.1f} | {ckpt / plain:.3f} | "
            f"{runs['0'][0]['loss']:.6f} | {runs['1'][0]['loss']:.6f}"
        )


if __name__ == "__main__":
    main()
