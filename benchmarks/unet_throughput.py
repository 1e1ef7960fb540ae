"""Train-step throughput and activation memory: diffkit's U-Net vs diffusers' UNet2DModel.

Both networks have the same architecture and the same weights (diffkit's is made with
``dk.interop.from_diffusers`` from the diffusers one, and their outputs are checked equal
first), see the same batch, run on the same number of threads, in the same run: the timed
steps alternate between the two libraries round by round, and the table reports medians
(images/s from the median step time; the ratio is the median, with quartiles, of the
per-round ratios, each from the two libraries timed back to back).
A train step is forward + MSE loss + backward + AdamW step.

Two clocks are reported: ``cpu`` is the process CPU time (with the default single thread, the
compute actually done, which stays stable on a shared, overloaded machine) and ``wall`` is the
elapsed time (what a user waits; noisy when other processes compete for the cores).

Shape checks (``DIFFKIT_SHAPE_CHECKS``) are read once at import, so each setting runs in its
own subprocess. Memory is measured in a fresh subprocess per library as the activation memory
of a train step: the bytes of the tensors autograd saves for backward (weights, gradients and
optimizer state are identical for the two, and process RSS is blurred by allocator caching).

``--profile`` prints instead where the CPU time of a step goes: the thread CPU time of every
ATen op (forward, backward and optimizer step separately, both libraries side by side,
alternating, medians). Thread CPU time, unlike the wall-clock spans of ``torch.profiler``,
is not inflated when other processes preempt this one. ``--diffusers-channels-last`` runs
the diffusers model and input in channels-last memory format (a one-line user option) to
check that the default layout is not the slower one for it.

``--compile diffkit|diffusers|both`` wraps that model in ``torch.compile(model, dynamic=False,
mode=--compile-mode)`` (TorchInductor; forward and backward are compiled through AOTAutograd,
the loss and the AdamW step stay eager). The first train step of each compiled model is
the compile and is reported (wall seconds), then excluded like every warm-up step; the
loss and the ``conv_in`` / ``conv_out`` weight gradients of that first step are compared
across the libraries (both start from the same weights and batch). Activation memory is
always measured eagerly. Compiling is slow on this machine's single thread (minutes per
model); ``TORCHINDUCTOR_COMPILE_THREADS`` sets inductor's parallel C++ compile workers.

    python benchmarks/unet_throughput.py                 # width 32, batch 8, 32x32, 1 thread
    python benchmarks/unet_throughput.py --width 64 --batch 16 --threads 2 --rounds 9
    python benchmarks/unet_throughput.py --profile --rounds 5
    python benchmarks/unet_throughput.py --compile both --rounds 15
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings


def _diffusers_unet(size: int, width: int = 64, seed: int = 0):
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=size,
        in_channels=3,
        out_channels=3,
        block_out_channels=(width, 2 * width, 2 * width),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=32,
    )


def _models(size: int, width: int = 64):
    import diffkit as dk

    reference = _diffusers_unet(size, width)
    return reference, dk.interop.from_diffusers(reference)


def _batch(args):
    import torch

    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    target = torch.randn(x.shape, generator=g)
    index = torch.randint(0, 1000, (args.batch,), generator=g)
    return x, target, index


def _steppers(args):
    """One train-step closure per library, on identical weights and data."""
    import torch

    import diffkit as dk

    reference, model = _models(args.size, args.width)
    x, target, index = _batch(args)
    x_ref = x
    if args.diffusers_channels_last:
        reference = reference.to(memory_format=torch.channels_last)
        x_ref = x.contiguous(memory_format=torch.channels_last)
    t = dk.schedules.Discrete.from_betas(torch.linspace(1e-4, 0.02, 1000)).t_from_index(index)
    t = t.float()
    with torch.no_grad():
        diff = (reference(x_ref, index).sample - model(x, t)).abs().max().item()

    def make(net, call, library):
        opt = torch.optim.AdamW(net.parameters(), lr=1e-6)
        if getattr(args, "compile", None) in (library, "both"):
            net = torch.compile(net, dynamic=False, mode=args.compile_mode)

        def step(phase=lambda name: None):
            opt.zero_grad(set_to_none=True)
            phase("forward")
            loss = torch.nn.functional.mse_loss(call(net), target)
            phase("backward")
            loss.backward()
            phase("optimizer")
            opt.step()
            return loss.detach()

        return step

    steps = {
        "diffusers": make(reference, lambda net: net(x_ref, index).sample, "diffusers"),
        "diffkit": make(model, lambda net: net(x, t), "diffkit"),
    }
    _MODULES["diffusers"], _MODULES["diffkit"] = reference, model
    _PARAMS["diffusers"], _PARAMS["diffkit"] = (
        list(reference.parameters()),
        list(model.parameters()),
    )
    return steps, diff


_PARAMS: dict = {}
_MODULES: dict = {}


def _params(steps, library: str) -> list:
    return _PARAMS[library]


def worker_time(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    steps, diff = _steppers(args)
    # The first step of a compiled model is its compile: timed, and its loss and gradients
    # (same weights, same batch for both libraries) compared before the optimizer moves on.
    first_s, losses, grads = {}, {}, {}
    for name, step in steps.items():
        start = time.perf_counter()
        losses[name] = step()
        first_s[name] = time.perf_counter() - start
        grads[name] = [
            getattr(_MODULES[name], layer).weight.grad.clone() for layer in ("conv_in", "conv_out")
        ]
        for _ in range(args.warmup - 1):
            step()
    step_diff = max(
        [(losses["diffusers"] - losses["diffkit"]).abs().item()]
        + [
            ((a - b).abs().max() / a.abs().max()).item()
            for a, b in zip(grads["diffusers"], grads["diffkit"], strict=True)
        ]
    )
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                steps[name]()
            wall[name].append((time.perf_counter() - start) / args.steps)
            cpu[name].append((time.process_time() - start_cpu) / args.steps)

    # Each round times both libraries back to back, so the per-round ratio cancels load
    # that drifts more slowly than a round; its median and quartiles are the ratio reported.
    def paired(clock: dict[str, list[float]]) -> list[float]:
        return sorted(r / d for r, d in zip(clock["diffusers"], clock["diffkit"], strict=True))

    print(
        json.dumps(
            {
                "wall_s": {name: statistics.median(ts) for name, ts in wall.items()},
                "cpu_s": {name: statistics.median(ts) for name, ts in cpu.items()},
                "ratio_wall": paired(wall),
                "ratio_cpu": paired(cpu),
                "max_abs_diff": diff,
                "first_step_s": first_s,
                "first_step_diff": step_diff,
            }
        )
    )


def worker_profile(args) -> None:
    """Median thread CPU time per ATen op and phase, the libraries alternating."""
    import collections

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpTimes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ms: collections.Counter = collections.Counter()
            self.phase = "forward"

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            start = time.thread_time_ns()
            out = func(*args, **(kwargs or {}))
            self.ms[(self.phase, func.overloadpacket.__name__)] += (
                time.thread_time_ns() - start
            ) / 1e6
            return out

        def set_phase(self, name: str) -> None:
            self.phase = name

    torch.set_num_threads(args.threads)
    steps, diff = _steppers(args)
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    samples: dict[str, list] = {name: [] for name in steps}
    names = list(steps)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            mode = OpTimes()
            with mode:
                steps[name](mode.set_phase)
            samples[name].append(mode.ms)
    keys = {key for runs in samples.values() for run in runs for key in run}
    table = {
        name: {key: statistics.median(run.get(key, 0.0) for run in runs) for key in keys}
        for name, runs in samples.items()
    }
    print(f"max|diff| {diff:.1e}; thread CPU ms per step (medians of {args.rounds})")
    print(f"{'phase':<10}{'op':<56}{'diffusers':>10}{'diffkit':>9}{'delta':>8}")
    for phase in ("forward", "backward", "optimizer"):
        rows = sorted(
            (key for key in keys if key[0] == phase),
            key=lambda key: -max(table["diffusers"][key], table["diffkit"][key]),
        )
        totals = [sum(table[name][key] for key in rows) for name in ("diffusers", "diffkit")]
        print(
            f"{phase:<10}{'(all ops)':<56}{totals[0]:>10.2f}{totals[1]:>9.2f}"
            f"{totals[1] - totals[0]:>8.2f}"
        )
        for key in rows:
            ref, dk_ = table["diffusers"][key], table["diffkit"][key]
            if max(ref, dk_) >= args.profile_min_ms:
                print(f"{'':<10}{key[1][:55]:<56}{ref:>10.2f}{dk_:>9.2f}{dk_ - ref:>8.2f}")


def worker_memory(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    args.compile = None  # activation memory of the eager models (a compile takes minutes)
    steps, _ = _steppers(args)
    step = steps[args.library]
    step()  # allocates optimizer state and gradients once
    # Activation memory: bytes of the distinct non-parameter storages the forward pass keeps
    # for backward. It is what grows a train step's peak beyond weights, gradients and
    # optimizer state (which are the same for both libraries), and unlike process RSS it is
    # exact and does not depend on the allocator's caching.
    params = {p.untyped_storage().data_ptr() for p in _params(steps, args.library)}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    print(json.dumps({"saved_mib": sum(saved.values()) / 2**20}))


def _run(args, extra: list[str], checks: str) -> dict:
    env = dict(os.environ, DIFFKIT_SHAPE_CHECKS=checks, PYTHONWARNINGS="ignore")
    cmd = [sys.executable, __file__, *extra, *_forward(args)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _forward(args) -> list[str]:
    return [
        f"--batch={args.batch}",
        f"--width={args.width}",
        f"--size={args.size}",
        f"--threads={args.threads}",
        f"--rounds={args.rounds}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        *(["--diffusers-channels-last"] if args.diffusers_channels_last else []),
        *([f"--compile={args.compile}"] if args.compile else []),
        *([f"--compile-mode={args.compile_mode}"] if args.compile_mode else []),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--width", type=int, default=32, help="channels (w, 2w, 2w)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--diffusers-channels-last", action="store_true")
    parser.add_argument(
        "--compile",
        choices=["diffkit", "diffusers", "both"],
        help="torch.compile these models (forward + backward; loss and AdamW stay eager)",
    )
    parser.add_argument("--compile-mode", help="e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--profile", action="store_true", help="per-op CPU time instead")
    parser.add_argument("--profile-min-ms", type=float, default=0.2)
    parser.add_argument("--worker", choices=["time", "memory", "profile"])
    parser.add_argument("--library", choices=["diffkit", "diffusers"])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.worker == "time":
        return worker_time(args)
    if args.worker == "memory":
        return worker_memory(args)
    if args.worker == "profile":
        return worker_profile(args)
    if args.profile:  # shape checks off: only the library's own ops
        env = dict(os.environ, DIFFKIT_SHAPE_CHECKS="0", PYTHONWARNINGS="ignore")
        extra = [f"--profile-min-ms={args.profile_min_ms}"]
        cmd = [sys.executable, __file__, "--worker=profile", *extra, *_forward(args)]
        subprocess.run(cmd, env=env, check=True)
        return None

    import torch

    print(
        f"U-Net train step (fwd + MSE + bwd + AdamW): channels ({args.width}, {2 * args.width}, "
        f"{2 * args.width}), batch {args.batch}, {args.size}x{args.size}x3, threads "
        f"{args.threads}, torch {torch.__version__}; {args.rounds} alternating rounds x "
        f"{args.steps} steps, medians"
        + (" (diffusers in channels-last)" if args.diffusers_channels_last else "")
        + (f"; torch.compile({args.compile}, mode={args.compile_mode})" if args.compile else "")
    )
    rows = []
    for checks in ("1", "0"):
        rows.append((checks, _run(args, ["--worker=time"], checks)))
    memory = {
        lib: _run(args, ["--worker=memory", f"--library={lib}"], "0")
        for lib in ("diffusers", "diffkit")
    }
    header = (
        "shape checks", "clock", "diffusers img/s", "diffkit img/s", "ratio", "quartiles",
        "max|diff|",
    )  # fmt: skip
    print("{:<13}{:<6}{:>16}{:>15}{:>8}{:>13}{:>11}".format(*header))
    for checks, res in rows:
        for clock in ("cpu", "wall"):
            t_ref, t_dk = res[f"{clock}_s"]["diffusers"], res[f"{clock}_s"]["diffkit"]
            ratios = res[f"ratio_{clock}"]
            q1, mid, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            print(
                f"{'on' if checks == '1' else 'off':<13}{clock:<6}{args.batch / t_ref:>16.1f}"
                f"{args.batch / t_dk:>15.1f}{mid:>7.2f}x{f'{q1:.2f}-{q3:.2f}':>13}"
                f"{res['max_abs_diff']:>11.1e}"
            )
    ref, dk_ = memory["diffusers"]["saved_mib"], memory["diffkit"]["saved_mib"]
    print(f"{'activations MiB':<19}{ref:>16.1f}{dk_:>15.1f}{dk_ / ref:>7.2f}x  (eager)")
    if args.compile:
        for checks, res in rows:
            first = res["first_step_s"]
            print(
                f"first step s, checks {'on' if checks == '1' else 'off':<4}"
                f"{first['diffusers']:>12.1f}{first['diffkit']:>15.1f}"
                f"   (the compile; loss/grad diff {res['first_step_diff']:.1e})"
            )


if __name__ == "__main__":
    main()
