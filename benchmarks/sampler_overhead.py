"""Per-step overhead of diffkit's samplers vs the matching diffusers schedulers.

The denoiser costs nothing (it returns its input as the epsilon prediction), the latent
is (1, 4, 64, 64) and each call samples 50 steps (``--steps``); what is timed is
everything else: the time grid, the coefficients, the loop and the tensor arithmetic.
diffkit runs with shape checks on (the default; ``DIFFKIT_SHAPE_CHECKS=0`` before the
run turns them off).

- diffkit: one ``sample`` call (time grid, plan, loop and the after-loop NaN check).
- diffusers: ``set_timesteps`` plus its ``scale_model_input`` / model / ``step`` loop,
  with the same zero-cost model, on a scheduler built beforehand (as diffkit's schedule
  and sampler are). Where diffusers offers diffkit's default spacing it is used (Karras
  sigmas for Euler, Heun and DPM++ 2M/3M; uniform log-SNR, ``use_lu_lambdas``, for the
  DPM++ SDE). Where diffusers has no such option the grids are matched the other way:
  diffkit's Euler-ancestral runs on diffusers' default uniform grid (``UniformTime``,
  diffusers' ``"linspace"``), and the row ``euler_anc_karras`` is diffkit's default
  (Karras) against the same diffusers scheduler. ``--peer-defaults`` keeps diffusers'
  own default spacings and diffkit's defaults instead.

Each round times every sampler and its peer once, back to back, in alternating order, so
a burst of load on a shared machine hits both sides; CPU time (``time.process_time``)
is used, which is steadier than wall time under load. Reported: the medians of
``--repeats`` rounds in µs per step (Heun: per Heun step, 2 evaluations) and the median
of the per-round ratios (with its quartiles).

    python benchmarks/sampler_overhead.py --repeats 41

``--breakdown`` splits each diffkit call into its phases instead (time grid, plan, model
wrapper, loop with its plan compilation, after-loop NaN check; the boundary argument
check is the full call minus the phases, timed in separate calls of the same round), and
times the call once more with the grid and plan built before the rounds: the share of
the per-call setup in the ratio. Every diffkit measurement follows a diffusers run, as in
the main table, so caches are as cold as there.

    python benchmarks/sampler_overhead.py --breakdown --only euler_ancestral --repeats 41
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
from diffkit.samplers import _base

warnings.filterwarnings("ignore")

STEPS = 50  # the default of --steps
SHAPE = (1, 4, 64, 64)
BETAS = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)


class Free:
    """A denoiser that costs nothing."""

    prediction = "epsilon"

    def __call__(self, x, t, cond=None):
        return x


def pairs(
    peer_defaults: bool,
) -> dict[str, tuple[Callable[[], samplers.SamplerBase], Callable[[], object]]]:
    import diffusers

    common = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
    karras = {} if peer_defaults else {"use_karras_sigmas": True}
    log_snr = {} if peer_defaults else {"use_lu_lambdas": True}
    reg = samplers.REGISTRY

    def ancestral() -> object:
        return diffusers.EulerAncestralDiscreteScheduler(**common)

    def uniform_ancestral() -> samplers.SamplerBase:
        return samplers.EulerAncestral(spacing=samplers.UniformTime())

    return {
        "ddim": (reg["ddim"], lambda: diffusers.DDIMScheduler(**common, clip_sample=False)),
        "ddpm": (reg["ddpm"], lambda: diffusers.DDPMScheduler(**common, clip_sample=False)),
        "euler": (reg["euler"], lambda: diffusers.EulerDiscreteScheduler(**common, **karras)),
        # diffusers' Euler-ancestral has no Karras option: matched, diffkit's runs on
        # diffusers' default grid ("linspace", diffkit's UniformTime); its own default
        # (Karras) is the row below.
        "euler_ancestral": (
            reg["euler_ancestral"] if peer_defaults else uniform_ancestral,
            ancestral,
        ),
        **({} if peer_defaults else {"euler_anc_karras": (reg["euler_ancestral"], ancestral)}),
        "heun": (reg["heun"], lambda: diffusers.HeunDiscreteScheduler(**common, **karras)),
        "dpmpp_2m": (
            reg["dpmpp_2m"],
            lambda: diffusers.DPMSolverMultistepScheduler(**common, solver_order=2, **karras),
        ),
        "dpmpp_3m": (
            reg["dpmpp_3m"],
            lambda: diffusers.DPMSolverMultistepScheduler(**common, solver_order=3, **karras),
        ),
        "dpmpp_sde": (
            reg["dpmpp_sde"],
            lambda: diffusers.DPMSolverMultistepScheduler(
                **common, solver_order=2, algorithm_type="sde-dpmsolver++", **log_snr
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


def time_diffkit(
    sampler: samplers.SamplerBase, schedule, noise: torch.Tensor, steps: int = STEPS
) -> float:
    model = Free()
    g = torch.Generator().manual_seed(0)
    start = time.process_time()
    sampler.sample(model, schedule, noise, steps=steps, generator=g)
    return time.process_time() - start


def time_diffusers(scheduler, noise: torch.Tensor, steps: int = STEPS) -> float:
    model = Free()
    g = torch.Generator().manual_seed(0)
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    kwargs = {"generator": g} if takes_generator else {}
    start = time.process_time()
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        x = scheduler.step(model(inp, t), t, x, **kwargs).prev_sample
    return time.process_time() - start


def phases(
    sampler: samplers.SamplerBase,
    schedule,
    noise: torch.Tensor,
    built: tuple[_base.Grid, list[_base.Step]] | None = None,
    steps: int = STEPS,
) -> dict[str, float]:
    """One diffkit call without its boundary check, each phase timed (CPU seconds).

    With ``built`` (a grid and its plan made beforehand) those two phases are skipped.
    """
    g = torch.Generator().manual_seed(0)
    clock = time.process_time
    t0 = clock()
    grid = sampler.grid(schedule, steps, noise.device) if built is None else built[0]
    t1 = clock()
    plan = sampler.plan(grid) if built is None else built[1]
    t2 = clock()
    model = _base._Model(Free(), grid, noise, None, 1.0, None)
    t3 = clock()
    x = _base.run_plan(plan, model, noise.to(model.dtype) * grid.sigma[0], g, None)
    t4 = clock()
    model.raise_if_nonfinite()
    x.to(noise.dtype)
    t5 = clock()
    return {"grid": t1 - t0, "plan": t2 - t1, "model": t3 - t2, "loop": t4 - t3, "check": t5 - t4}


def breakdown(cases, schedule, noise: torch.Tensor, repeats: int, steps: int = STEPS) -> None:
    """Per-phase medians of each diffkit call and the ratio without the per-call setup."""
    print(
        f"latent {SHAPE}, {steps} steps, zero-cost denoiser, shape checks "
        f"{'on' if dk.typing.CHECKS_ENABLED else 'off'}; CPU time, medians of {repeats} "
        "rounds, each diffkit measurement right after a diffusers run; µs per call"
    )
    names = ["grid", "plan", "model", "loop", "check", "boundary"]
    print(f"{'sampler':<18}" + "".join(f"{n:>9}" for n in names) + f"{'ratio':>8}{'prebuilt':>10}")
    for name, (make_ours, make_theirs) in cases.items():
        sampler = make_ours()
        grid = sampler.grid(schedule, steps, noise.device)
        built = (grid, sampler.plan(grid))
        rows: dict[str, list[float]] = {n: [] for n in [*names, "ratio", "prebuilt"]}
        for round_ in range(repeats + 2):
            peer = [time_diffusers(make_theirs(), noise, steps) for _ in range(3)]
            full = time_diffkit(sampler, schedule, noise, steps)
            time_diffusers(make_theirs(), noise, steps)
            parts = phases(sampler, schedule, noise, steps=steps)
            time_diffusers(make_theirs(), noise, steps)
            ready = sum(phases(sampler, schedule, noise, built, steps).values())
            if round_ < 2:
                continue
            ref = statistics.median(peer)
            for key, value in parts.items():
                rows[key].append(value)
            rows["boundary"].append(full - sum(parts.values()))
            rows["ratio"].append(full / ref)
            rows["prebuilt"].append(ready / ref)
        cells = "".join(f"{statistics.median(rows[n]) * 1e6:>9.0f}" for n in names)
        ratio, ready = statistics.median(rows["ratio"]), statistics.median(rows["prebuilt"])
        print(f"{name:<18}{cells}{ratio:>8.3f}{ready:>10.3f}")
    print("(loop includes compiling the plan; boundary = full call - phases, so it is noisy)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=21, help="timed rounds (after 2 warm-up)")
    parser.add_argument("--only", nargs="*", help="sampler names to run (default: all)")
    parser.add_argument("--peer-defaults", action="store_true", help="diffusers' default spacings")
    parser.add_argument("--steps", type=int, default=STEPS, help="steps per sampling call")
    parser.add_argument("--breakdown", action="store_true", help="diffkit's call phase by phase")
    args = parser.parse_args()
    torch.set_num_threads(1)
    schedule = dk.schedules.Discrete.from_betas(BETAS)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    cases = {k: v for k, v in pairs(args.peer_defaults).items() if not args.only or k in args.only}
    if args.breakdown:
        breakdown(cases, schedule, noise, args.repeats, args.steps)
        return
    ours: dict[str, list[float]] = {name: [] for name in cases}
    theirs: dict[str, list[float]] = {name: [] for name in cases}
    made = {name: make_ours() for name, (make_ours, _) in cases.items()}
    for round_ in range(args.repeats + 2):  # the first two rounds warm up
        for name, (_, make_theirs) in cases.items():
            scheduler = make_theirs()
            if round_ % 2:
                b = time_diffusers(scheduler, noise, args.steps)
                a = time_diffkit(made[name], schedule, noise, args.steps)
            else:
                a = time_diffkit(made[name], schedule, noise, args.steps)
                b = time_diffusers(scheduler, noise, args.steps)
            if round_ >= 2:
                ours[name].append(a)
                theirs[name].append(b)
    print(
        f"latent {SHAPE}, {args.steps} steps, zero-cost denoiser, shape checks "
        f"{'on' if dk.typing.CHECKS_ENABLED else 'off'}; diffusers "
        f"{'default' if args.peer_defaults else 'matched'} spacings; CPU time, median of "
        f"{args.repeats} interleaved rounds; µs per step"
    )
    print(f"{'sampler':<18}{'diffkit':>10}{'diffusers':>12}{'ratio':>8}{'ratio q1-q3':>14}")
    ratios = []
    for name in cases:
        a = statistics.median(ours[name]) / args.steps * 1e6
        b = statistics.median(theirs[name]) / args.steps * 1e6
        per_round = [x / y for x, y in zip(ours[name], theirs[name])]
        ratio = statistics.median(per_round)
        ratios.append(ratio)
        q1, _, q3 = statistics.quantiles(per_round, n=4)
        print(f"{name:<18}{a:>10.1f}{b:>12.1f}{ratio:>8.2f}{q1:>9.2f}-{q3:.2f}")
    print(f"{'geometric mean':<18}{'':>22}{statistics.geometric_mean(ratios):>8.2f}")


if __name__ == "__main__":
    main()
