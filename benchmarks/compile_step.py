"""``compile=True`` vs eager training: the losses, the first step (compilation) and later steps.

    OMP_NUM_THREADS=1 python benchmarks/compile_step.py [--backends inductor aot_eager]

Trains a small DiT on random 8x8 data for ``--steps`` steps, eager and with each
``compile_backend``, from the same weights and data. Prints per backend: the largest
loss difference to eager, the first step's time (compilation included) and the median
of the later steps, with the ratio to eager. inductor needs a C compiler on CPU.
"""

import argparse
import statistics
import time
from typing import Any, Literal, cast

import torch
from torch.utils.data import Dataset

from diffkit.nn.dit import DiT, DiTConfig
from diffkit.schedules import Cosine
from diffkit.training import DenoiserLoss, TrainConfig, finish, prepare, train_step

Backend = Literal["inductor", "aot_eager", "eager"]


def _run(backend: Backend | None, steps: int) -> tuple[list[float], list[float]]:
    """The losses and the wall time of each step."""
    torch.manual_seed(0)
    model = DiT(DiTConfig(in_channels=1, dim=64, depth=2, num_heads=2, prediction="v"))
    gen = torch.Generator().manual_seed(1)
    data = [{"x": torch.randn(1, 8, 8, generator=gen)} for _ in range(64)]
    fields: dict[str, Any] = {"steps": steps, "batch_size": 8, "lr": 1e-3, "progress": False}
    if backend is not None:
        fields.update(compile=True, compile_backend=backend)
    state = prepare(model, DenoiserLoss(Cosine()), cast(Dataset[Any], data), TrainConfig(**fields))
    losses, times = [], []
    try:
        for step in range(steps):
            start = time.perf_counter()
            losses.append(train_step(state, step).loss)
            times.append(time.perf_counter() - start)
    finally:
        finish(state)
    return losses, times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--backends", nargs="+", default=["inductor", "aot_eager"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    eager, eager_times = _run(None, args.steps)
    eager_step = statistics.median(eager_times[1:])
    print(
        f"torch {torch.__version__}, CPU, 1 thread, DiT dim 64 depth 2, batch 8, {args.steps} steps"
    )
    print("backend   | max |loss - eager| | first step s | later steps ms | later / eager")
    print(f"eager     | {0.0:18.2e} | {eager_times[0]:12.2f} | {eager_step * 1e3:14.2f} | 1.000")
    for backend in args.backends:
        losses, times = _run(backend, args.steps)
        diff = max(abs(a - b) for a, b in zip(losses, eager, strict=True))
        later = statistics.median(times[1:])
        print(
            f"{backend:9} | {diff:18.2e} | {times[0]:12.2f} | {later * 1e3:14.2f} | "
            f"{later / eager_step:.3f}"
        )


if __name__ == "__main__":
    main()
