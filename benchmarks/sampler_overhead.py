"""Per-step overhead of diffkit's samplers vs the matching diffusers schedulers.

The denoiser costs nothing (it returns its input as the epsilon prediction), the latent
is (1, 4, 64, 64) and each call samples 50 steps; what is timed is everything else: the
time grid, the coefficients, the loop and the tensor arithmetic. diffkit runs with shape
checks on (the default). diffusers is timed over ``set_timesteps`` plus its
``scale_model_input`` / ``step`` loop, diffkit over one ``sample`` call. Medians of
``--repeats`` runs, in microseconds per step (Heun: per Heun step, 2 evaluations).

    python benchmarks/sampler_overhead.py
"""

import argparse
import inspect
import statistics
import time
import warnings
from collections.abc import Callable

import torch

import diffkit as dk
from diffkit import samplers

warnings.filterwarnings("ignore")

STEPS = 50
SHAPE = (1, 4, 64, 64)
BETAS = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)


class Free:
    """A denoiser that costs nothing."""

    prediction = "epsilon"

    def __call__(self, x, t, cond=None):
        return x


def pairs() -> dict[str, tuple[Callable[[], samplers.SamplerBase], Callable[[], object]]]:
    import diffusers

    common = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
    reg = samplers.REGISTRY
    return {
        "ddim": (reg["ddim"], lambda: diffusers.DDIMScheduler(**common, clip_sample=False)),
        "ddpm": (reg["ddpm"], lambda: diffusers.DDPMScheduler(**common, clip_sample=False)),
        "euler": (reg["euler"], lambda: diffusers.EulerDiscreteScheduler(**common)),
        "euler_ancestral": (
            reg["euler_ancestral"],
            lambda: diffusers.EulerAncestralDiscreteScheduler(**common),
        ),
        "heun": (reg["heun"], lambda: diffusers.HeunDiscreteScheduler(**common)),
        "dpmpp_2m": (
            reg["dpmpp_2m"],
            lambda: diffusers.DPMSolverMultistepScheduler(**common, solver_order=2),
        ),
        "dpmpp_3m": (
            reg["dpmpp_3m"],
            lambda: diffusers.DPMSolverMultistepScheduler(**common, solver_order=3),
        ),
        "dpmpp_sde": (
            reg["dpmpp_sde"],
            lambda: diffusers.DPMSolverMultistepScheduler(
                **common, solver_order=2, algorithm_type="sde-dpmsolver++"
            ),
        ),
        "unipc": (
            reg["unipc"],
            lambda: diffusers.UniPCMultistepScheduler(**common, solver_order=2),
        ),
        "unipc_3": (
            reg["unipc_3"],
            lambda: diffusers.UniPCMultistepScheduler(**common, solver_order=3),
        ),
    }


def time_diffkit(sampler: samplers.SamplerBase, schedule, noise: torch.Tensor) -> float:
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    sampler.sample(Free(), schedule, noise, steps=STEPS, generator=g)
    return time.perf_counter() - start


def time_diffusers(scheduler, noise: torch.Tensor) -> float:
    g = torch.Generator().manual_seed(0)
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    kwargs = {"generator": g} if takes_generator else {}
    start = time.perf_counter()
    scheduler.set_timesteps(STEPS)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        x = scheduler.step(inp, t, x, **kwargs).prev_sample
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    schedule = dk.schedules.Discrete.from_betas(BETAS)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    print(
        f"latent {SHAPE}, {STEPS} steps, zero-cost denoiser, shape checks "
        f"{'on' if dk.typing.CHECKS_ENABLED else 'off'}; median of {args.repeats}; µs per step"
    )
    print(f"{'sampler':<18}{'diffkit':>10}{'diffusers':>12}{'ratio':>8}")
    ratios = []
    for name, (make_ours, make_theirs) in pairs().items():
        ours, theirs = [], []
        sampler = make_ours()
        for _ in range(args.repeats + 1):  # first round warms up
            ours.append(time_diffkit(sampler, schedule, noise))
            theirs.append(time_diffusers(make_theirs(), noise))
        a = statistics.median(ours[1:]) / STEPS * 1e6
        b = statistics.median(theirs[1:]) / STEPS * 1e6
        ratios.append(a / b)
        print(f"{name:<18}{a:>10.1f}{b:>12.1f}{a / b:>8.2f}")
    print(f"{'geometric mean':<18}{'':>22}{statistics.geometric_mean(ratios):>8.2f}")


if __name__ == "__main__":
    main()
