"""Inference of a Stable-Diffusion-shaped U-Net: diffkit's conversion vs diffusers' own.

The diffusers ``UNet2DConditionModel`` has SD 1.x's layout (three cross-attention levels and
a plain one, two resnets per level, a cross-attention middle block, 77 text tokens) at a small
width; diffkit's is ``dk.interop.from_diffusers`` of it, and their outputs are compared
first (a classifier-free-guidance batch: the same latents twice, two conditionings). Both
run under ``torch.inference_mode()`` on the same inputs and threads in one run; the timed
forward passes alternate between the libraries round by round, and the table reports median
times and the median (and quartiles) of the per-round ratios, on the process CPU clock (the
compute done, stable on a shared machine) and the wall clock.

Peak memory is measured in a fresh subprocess per library holding only its model: the
resident set sampled every 0.2 ms during one forward pass, minus the resident set before it
(the working memory of inference: activations and temporaries; the weights, equal for
both, are excluded). ``MALLOC_MMAP_THRESHOLD_`` is fixed so that glibc returns every large
freed block to the system and the resident set follows the live tensors.

    python benchmarks/sd_unet_inference.py                  # width 32, batch 2 (x2), 32x32
    python benchmarks/sd_unet_inference.py --width 64 --size 64 --rounds 9
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import warnings


def _reference(width: int, size: int, context_dim: int):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet = UNet2DConditionModel(
            sample_size=size,
            in_channels=4,
            out_channels=4,
            block_out_channels=(width, 2 * width, 4 * width, 4 * width),  # SD: 320 x (1, 2, 4, 4)
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=context_dim,
            attention_head_dim=8,  # SD 1.x: 8 heads per level
            norm_num_groups=min(32, width),
        )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # off the zero-initialised outputs
        for p in unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return unet.eval()


def _inputs(args):
    import torch

    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 4, args.size, args.size, generator=g).repeat(2, 1, 1, 1)
    tokens = torch.randn(2 * args.batch, 77, args.context, generator=g)
    index = torch.full((2 * args.batch,), 801)
    return x, tokens, index


def _callers(args, library: str | None = None):
    """Forward-pass closures on identical weights and inputs (one library, or both)."""
    import torch

    import diffkit as dk
    from diffkit.protocols import Conditioning

    reference = _reference(args.width, args.size, args.context)
    x, tokens, index = _inputs(args)
    callers = {}
    if library in (None, "diffusers"):
        callers["diffusers"] = lambda: reference(x, index, encoder_hidden_states=tokens).sample
    if library in (None, "diffkit"):
        model = dk.interop.from_diffusers(reference)
        t = ((index + 1) / 1000).float()
        cond = Conditioning(tokens=tokens)
        callers["diffkit"] = lambda: model(x, t, cond)
    if library == "diffkit":
        del reference  # the subprocess holds only diffkit's weights
    torch.set_num_threads(args.threads)
    return callers


def worker_time(args) -> None:
    import torch

    callers = _callers(args)
    with torch.inference_mode():
        outs = {name: call() for name, call in callers.items()}
        want = outs["diffusers"]
        diff = float((outs["diffkit"] - want).abs().max() / want.abs().max())
        for _ in range(args.warmup):
            for call in callers.values():
                call()
        wall: dict[str, list[float]] = {name: [] for name in callers}
        cpu: dict[str, list[float]] = {name: [] for name in callers}
        names = list(callers)
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                start, start_cpu = time.perf_counter(), time.process_time()
                callers[name]()
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)

    def paired(clock: dict[str, list[float]]) -> list[float]:
        return sorted(a / b for a, b in zip(clock["diffusers"], clock["diffkit"], strict=True))

    print(
        json.dumps(
            {
                "wall_s": {name: statistics.median(ts) for name, ts in wall.items()},
                "cpu_s": {name: statistics.median(ts) for name, ts in cpu.items()},
                "ratio_wall": paired(wall),
                "ratio_cpu": paired(cpu),
                "relative_diff": diff,
            }
        )
    )


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker_memory(args) -> None:
    import gc

    import torch

    (call,) = _callers(args, args.library).values()
    with torch.inference_mode():
        call()  # warm: lazily built buffers and caches are not inference memory
        gc.collect()
        before = _resident_bytes()
        peak = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _resident_bytes())
                time.sleep(0.0002)

        sampler = threading.Thread(target=sample)
        sampler.start()
        call()
        done.set()
        sampler.join()
    print(json.dumps({"peak_mib": (peak[0] - before) / 2**20}))


def _run(args, *extra: str) -> dict:
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)}
    command = [sys.executable, __file__, *sys.argv[1:], *extra]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _quartiles(ratios: list[float]) -> str:
    q = statistics.quantiles(ratios, n=4)
    return f"{q[0]:.2f}-{q[2]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--size", type=int, default=32, help="latent height and width")
    parser.add_argument("--batch", type=int, default=2, help="images (doubled for guidance)")
    parser.add_argument("--context", type=int, default=64, help="text token width")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--worker", choices=["time", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--library", choices=["diffkit", "diffusers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "time":
        return worker_time(args)
    if args.worker == "memory":
        return worker_memory(args)

    import torch

    timing = _run(args, "--worker", "time")
    memory = {
        name: _run(args, "--worker", "memory", "--library", name)["peak_mib"]
        for name in ("diffusers", "diffkit")
    }
    print(
        f"SD-shaped U-Net inference: channels {args.width} x (1, 2, 4, 4), 2 resnets per level, "
        f"batch {args.batch} x 2 (guidance), {args.size}x{args.size}x4 latents, 77 tokens of "
        f"{args.context}, threads {args.threads}, torch {torch.__version__}; "
        f"{args.rounds} alternating rounds, medians"
    )
    print(f"{'clock':<8}{'diffusers s':>13}{'diffkit s':>11}{'ratio':>9}{'quartiles':>13}")
    for clock in ("cpu", "wall"):
        times, ratios = timing[f"{clock}_s"], timing[f"ratio_{clock}"]
        print(
            f"{clock:<8}{times['diffusers']:>13.4f}{times['diffkit']:>11.4f}"
            f"{statistics.median(ratios):>8.2f}x{_quartiles(ratios):>13}"
        )
    ratio = memory["diffkit"] / memory["diffusers"]
    print(
        f"{'peak MiB':<8}{memory['diffusers']:>13.1f}{memory['diffkit']:>11.1f}{ratio:>8.2f}x"
        "  (inference working memory; lower is better)"
    )
    print(f"outputs: max|diffkit - diffusers| / max|diffusers| = {timing['relative_diff']:.1e}")


if __name__ == "__main__":
    main()
