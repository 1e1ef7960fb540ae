"""Training-checkpoint write / read time: diffkit (safetensors, atomic) vs torch.save / torch.load.

The same state both ways: a U-Net's weights, its EMA copy, the AdamW moments after one
step and the RNG states. diffkit writes one safetensors file (temporary file, fsync,
rename) and reads it without unpickling; the peer is what most training scripts do,
``torch.save`` of the nested state dicts and ``torch.load(weights_only=True)``. Prints
medians over ``--repeats`` rounds and the ratio diffkit / torch.
"""

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from diffkit.checkpoint import load_training_checkpoint, save_training_checkpoint
from diffkit.ema import EMA
from diffkit.nn import UNet, UNetConfig


def _state(base: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, EMA]:
    torch.manual_seed(0)
    model = UNet(
        UNetConfig(
            in_channels=4,
            base_channels=base,
            channel_mult=(1, 2, 2),
            attention_resolutions=(2, 4),
            blocks_per_level=2,
        )
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(1, 4, 16, 16), torch.rand(1)).square().mean().backward()
    opt.step()
    return model, opt, EMA(model)


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", type=int, default=64, help="U-Net base channels")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, opt, ema = _state(args.base)
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as folder:
        ours = Path(folder) / "checkpoint.safetensors"
        peer = Path(folder) / "checkpoint.pt"

        def save_ours() -> None:
            save_training_checkpoint(ours, model=model, step=1, optimizer=opt, ema=ema)

        def load_ours() -> None:
            load_training_checkpoint(ours, model=model, optimizer=opt, ema=ema)

        def save_peer() -> None:
            torch.save(
                {
                    "model": model.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": opt.state_dict(),
                    "step": 1,
                    "rng": torch.get_rng_state(),
                },
                peer,
            )

        def load_peer() -> None:
            state = torch.load(peer, weights_only=True)
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])

        save_ours()
        save_peer()
        rows = [
            ("write", _median_ms(save_ours, args.repeats), _median_ms(save_peer, args.repeats)),
            (
                "read + restore",
                _median_ms(load_ours, args.repeats),
                _median_ms(load_peer, args.repeats),
            ),
        ]
        size_ours, size_peer = os.path.getsize(ours), os.path.getsize(peer)
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, {platform.python_version()}; "
        f"U-Net of {params / 1e6:.1f}M parameters (+ EMA + AdamW moments); "
        f"median of {args.repeats}, ms"
    )
    print()
    print(
        "| operation | diffkit (safetensors, atomic) | torch.save / torch.load | diffkit / torch |"
    )
    print("| --- | ---: | ---: | ---: |")
    for name, a, b in rows:
        print(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
    print(
        f"| file size (MB) | {size_ours / 1e6:.1f} | {size_peer / 1e6:.1f} | "
        f"{size_ours / size_peer:.2f}x |"
    )


if __name__ == "__main__":
    main()
