"""Sampler accuracy vs NFE on a Gaussian mixture with an exact denoiser: diffkit vs peers.

The data are a 64-dimensional mixture of 8 diagonal Gaussians whose widths span 50x
(0.03 .. 1.5), so ``E[x0 | x_t]`` is closed form at every noise level and the only
error left is the sampler's. Every sampler starts from the same standard-normal noise
and is scored by the sliced Wasserstein-2 distance (512 fixed random directions) of its
samples to an independent set of true samples; the floor is the same distance between
two true sets. Peers run in the same process on the same discrete VP schedule (linear
betas 1e-4..0.02, 1000 steps): diffusers' schedulers through their own
``set_timesteps`` / ``step`` API, with and without Karras sigmas, and k-diffusion's
sampling functions with its sigma spacings. diffkit uses
``Discrete.from_betas(the same betas)``. Each peer's denoiser is evaluated at exactly
the noise level the peer's step assumes (no timestep rounding), its most favourable case.

    python benchmarks/sampler_accuracy.py            # full table (n = 10000, a few minutes)
    python benchmarks/sampler_accuracy.py --quick    # n = 4000, NFE 5 / 10 / 20
    python benchmarks/sampler_accuracy.py --only 'unipc|DPM'   # a subset of the rows
    python benchmarks/sampler_accuracy.py --nfe 5,8,10          # some NFEs only

The ``fit_solver`` and ``unipc_3/fit_grid`` rows are fitted to the denoiser
(``diffkit.samplers.fit_solver`` / ``fit_grid``) on calibration noise with its own seed,
independent of the evaluation noise, and never see a true sample; the fit's cost in NFE
per calibration sample is printed after the table.
"""

import argparse
import math
import re
import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

import diffkit as dk
from diffkit import samplers

warnings.filterwarnings("ignore")

F64 = torch.float64
DIM, COMPONENTS = 64, 8
N_TRAIN = 1000
BETAS = torch.linspace(1e-4, 0.02, N_TRAIN, dtype=F64)
NFES = (5, 8, 10, 15, 20, 50)


# --------------------------------------------------------------------------------------
# The data: a Gaussian mixture with an exact denoiser
# --------------------------------------------------------------------------------------


class Mixture:
    """``sum_k w_k N(mu_k, diag(std_k²))`` with ``E[x0 | alpha x0 + sigma eps = x]``."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.weights = torch.softmax(0.5 * torch.randn(COMPONENTS, generator=g, dtype=F64), 0)
        self.means = torch.randn(COMPONENTS, DIM, generator=g, dtype=F64)
        widths = torch.logspace(math.log10(0.03), math.log10(1.5), COMPONENTS, dtype=F64)
        jitter = torch.exp(0.3 * torch.randn(COMPONENTS, DIM, generator=g, dtype=F64))
        self.stds = widths[:, None] * jitter

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` exact samples."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, DIM, generator=generator, dtype=F64)
        return self.means[k] + self.stds[k] * eps

    def denoise(self, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """``E[x0 | x_t = x]`` for ``alpha``, ``sigma`` ``(batch,)`` shared by the batch."""
        a, s = float(alpha.reshape(-1)[0]), float(sigma.reshape(-1)[0])
        x = x.to(F64)
        var = a * a * self.stds**2 + s * s  # (k, d)
        inv = 1 / var
        # sum_d (x - a mu_k)² / var_kd as matrix products, no (batch, k, d) tensor
        quad = (x * x) @ inv.T - 2 * a * x @ (self.means * inv).T
        quad = quad + (a * a * self.means**2 * inv).sum(-1)
        log_p = -0.5 * (quad + torch.log(var).sum(-1)) + torch.log(self.weights)
        resp = torch.softmax(log_p, dim=-1)  # (b, k)
        gain = a * self.stds**2 * inv  # E[x0 | x, k] = mu_k + gain_k (x - a mu_k)
        return resp @ (self.means * (1 - a * gain)) + x * (resp @ gain)


def sliced_w2(x: Tensor, y: Tensor, directions: Tensor) -> float:
    """Sliced Wasserstein-2 distance of two equal-size sample sets."""
    px = torch.sort(x.to(F64) @ directions, dim=0).values
    py = torch.sort(y.to(F64) @ directions, dim=0).values
    return float(((px - py) ** 2).mean().sqrt())


# --------------------------------------------------------------------------------------
# diffkit
# --------------------------------------------------------------------------------------


class MixtureDenoiser:
    """The exact epsilon-predicting denoiser on a diffkit schedule."""

    prediction = "epsilon"

    def __init__(self, mixture: Mixture, schedule: dk.NoiseSchedule) -> None:
        self.mixture, self.schedule = mixture, schedule

    def __call__(self, x: Tensor, t: Tensor, cond: object = None) -> Tensor:
        a = self.schedule.alpha(t.to(F64))
        s = self.schedule.sigma(t.to(F64))
        x0 = self.mixture.denoise(x, a, s)
        return ((x.to(F64) - a[:, None] * x0) / s[:, None]).to(x.dtype)


Maker = Callable[[int, MixtureDenoiser, dk.NoiseSchedule], samplers.SamplerBase]
FIT_COSTS: dict[tuple[str, int], tuple[int, int, float]] = {}
"""(row, NFE) -> (teacher NFE, search NFE per calibration sample, CPU seconds of the fit)."""


def diffkit_runners(calibration: Tensor) -> dict[str, Maker]:
    """name -> ((NFE, denoiser, schedule) -> sampler): REGISTRY, spacing variants, fits.

    The fitted rows are fitted on ``calibration`` noise, drawn independently of the
    evaluation noise, with the denoiser alone (no true samples).
    """
    out: dict[str, Maker] = {
        name: (lambda nfe, den, sched, name=name: samplers.REGISTRY[name]())
        for name in samplers.REGISTRY
    }
    trailing = samplers.UniformTime(trailing=True)
    out["unipc_3/trailing/denoised"] = lambda *_: samplers.UniPC(order=3, spacing=trailing)
    out["dpmpp_3m/trailing"] = lambda *_: samplers.DPMSolverPP(order=3, spacing=trailing)
    out["unipc_3/uniform"] = lambda *_: samplers.UniPC(order=3, spacing=samplers.UniformTime())
    out["unipc_3/karras"] = lambda *_: samplers.UniPC(order=3, spacing=samplers.Karras())

    def fitted_solver(nfe: int, den: MixtureDenoiser, sched: dk.NoiseSchedule):
        start = time.process_time()
        solver = samplers.fit_solver(den, sched, calibration, nfe)
        fit = solver.spacing  # the FittedGrid holds what the fit cost
        assert isinstance(fit, samplers.FittedGrid)
        cost = (fit.teacher_nfe, fit.search_nfe, time.process_time() - start)
        FIT_COSTS["diffkit:fit_solver", nfe] = cost
        return solver

    def fitted_grid(nfe: int, den: MixtureDenoiser, sched: dk.NoiseSchedule):
        start = time.process_time()
        sampler = samplers.UniPC(order=3, final="extrapolated")
        grid = samplers.fit_grid(den, sched, calibration, nfe, sampler=sampler)
        cost = (grid.teacher_nfe, grid.search_nfe, time.process_time() - start)
        FIT_COSTS["diffkit:unipc_3/fit_grid", nfe] = cost
        return samplers.UniPC(order=3, final="extrapolated", spacing=grid)

    out["fit_solver"] = fitted_solver
    out["unipc_3/fit_grid"] = fitted_grid
    return out


def steps_for(sampler: samplers.SamplerBase, nfe: int) -> int:
    """Steps using at most ``nfe`` evaluations (two-stage samplers: 2 per step, 1 on the last).

    PLMS spends one evaluation more on its first step, its Runge-Kutta warm-up nine.
    """
    if isinstance(sampler, samplers.PNDM):
        return max(nfe - (1 if sampler.warmup == "plms" else 9), 1)
    two_stage = isinstance(
        sampler,
        samplers.Heun
        | samplers.DPMSolver2
        | samplers.DPMSolverPP2SAncestral
        | samplers.DPMSolverPPSDE,
    ) or (isinstance(sampler, samplers.EDMStochastic) and sampler.solver == "heun")
    return (nfe + 1) // 2 if two_stage else nfe


def run_diffkit(mixture: Mixture, noise: Tensor, nfe: int, make: Maker) -> Tensor:
    schedule = dk.schedules.Discrete.from_betas(BETAS)
    den = MixtureDenoiser(mixture, schedule)
    sampler = make(nfe, den, schedule)
    g = torch.Generator().manual_seed(123)
    return sampler.sample(den, schedule, noise, steps=steps_for(sampler, nfe), generator=g)


# --------------------------------------------------------------------------------------
# diffusers
# --------------------------------------------------------------------------------------


def diffusers_runners() -> dict[str, Callable[[], object]]:
    import diffusers

    common = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
    out: dict[str, Callable[[], object]] = {
        "DDIM": lambda: diffusers.DDIMScheduler(**common, clip_sample=False),
        "DDIM/trailing": lambda: diffusers.DDIMScheduler(
            **common, clip_sample=False, timestep_spacing="trailing"
        ),
    }
    for karras in (False, True):
        tag = "+karras" if karras else ""
        out[f"DPM++2M{tag}"] = lambda k=karras: diffusers.DPMSolverMultistepScheduler(
            **common, solver_order=2, use_karras_sigmas=k
        )
        out[f"DPM++3M{tag}"] = lambda k=karras: diffusers.DPMSolverMultistepScheduler(
            **common, solver_order=3, use_karras_sigmas=k
        )
        out[f"UniPC-2{tag}"] = lambda k=karras: diffusers.UniPCMultistepScheduler(
            **common, solver_order=2, use_karras_sigmas=k
        )
        out[f"UniPC-3{tag}"] = lambda k=karras: diffusers.UniPCMultistepScheduler(
            **common, solver_order=3, use_karras_sigmas=k
        )
        out[f"Euler{tag}"] = lambda k=karras: diffusers.EulerDiscreteScheduler(
            **common, use_karras_sigmas=k
        )
        out[f"Heun{tag}"] = lambda k=karras: diffusers.HeunDiscreteScheduler(
            **common, use_karras_sigmas=k
        )
    out["DPM++2M+lu_lambdas"] = lambda: diffusers.DPMSolverMultistepScheduler(
        **common, solver_order=2, use_lu_lambdas=True
    )
    return out


def run_diffusers(mixture: Mixture, noise: Tensor, nfe: int, make) -> Tensor:
    scheduler = make()
    heun = type(scheduler).__name__.startswith("Heun")
    scheduler.set_timesteps((nfe + 1) // 2 if heun else nfe)
    ac = scheduler.alphas_cumprod.to(F64)
    sigmas = getattr(scheduler, "sigmas", None)
    x = noise * float(scheduler.init_noise_sigma)
    for i, ts in enumerate(scheduler.timesteps):
        inp = scheduler.scale_model_input(x, ts)
        if sigmas is not None:  # the noise level this step assumes, sigma/alpha
            ratio = sigmas[i].to(F64)
            a = 1 / torch.sqrt(1 + ratio**2)
            s = ratio * a
        else:
            a, s = ac[int(ts)].sqrt(), (1 - ac[int(ts)]).sqrt()
        batch = x.shape[0]
        a, s = a.expand(batch), s.expand(batch)
        x0 = mixture.denoise(inp, a, s)
        eps = ((inp.to(F64) - a[:, None] * x0) / s[:, None]).to(x.dtype)
        x = scheduler.step(eps, ts, x).prev_sample
    return x


# --------------------------------------------------------------------------------------
# k-diffusion
# --------------------------------------------------------------------------------------


def kdiffusion_runners() -> dict[str, tuple[Callable, int]]:
    """name -> (sampler function, evaluations per step)."""
    from k_diffusion import sampling as ks

    return {
        "euler": (ks.sample_euler, 1),
        "heun": (ks.sample_heun, 2),
        "dpm_2": (ks.sample_dpm_2, 2),
        "lms": (ks.sample_lms, 1),
        "dpmpp_2m": (ks.sample_dpmpp_2m, 1),
        "dpmpp_3m": (lambda m, x, s: ks.sample_dpmpp_3m_sde(m, x, s, eta=0.0), 1),
        "dpmpp_2s": (lambda m, x, s: ks.sample_dpmpp_2s_ancestral(m, x, s, eta=0.0), 2),
    }


KD_SPACINGS = ("karras", "exponential", "vp")


def run_kdiffusion(mixture: Mixture, noise: Tensor, nfe: int, name: str, spacing: str) -> Tensor:
    from k_diffusion import sampling as ks

    ac = torch.cumprod(1 - BETAS, 0)
    all_sigmas = ((1 - ac) / ac).sqrt()
    s_min, s_max = float(all_sigmas[0]), float(all_sigmas[-1])

    def model(x: Tensor, sigma: Tensor, **_: object) -> Tensor:
        ones = torch.ones_like(sigma, dtype=F64)
        return mixture.denoise(x, ones, sigma.to(F64)).to(x.dtype)

    x = noise * s_max
    if name == "dpm_fast":
        return ks.sample_dpm_fast(model, x, s_min, s_max, nfe, disable=True)
    fn, per_step = kdiffusion_runners()[name]
    n = (nfe + 1) // 2 if per_step == 2 else nfe
    if spacing == "karras":
        sig = ks.get_sigmas_karras(n, s_min, s_max)
    elif spacing == "exponential":
        sig = ks.get_sigmas_exponential(n, s_min, s_max)
    else:  # the continuous VP schedule k-diffusion ships (beta 0.1..20, t >= 1e-3)
        sig = ks.get_sigmas_vp(n)
    return fn(model, x, sig.to(noise.dtype))


# --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="n=4000 and NFE 5/10/20")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--no-peers", action="store_true", help="diffkit only")
    parser.add_argument("--progress", action="store_true", help="print rows as they finish")
    parser.add_argument(
        "--only", default=None, help="regex: run only the rows ('lib:name') it matches"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--nfe", default=None, help="comma-separated NFEs (default: all)")
    parser.add_argument(
        "--calibration", type=int, default=1000, help="calibration samples for the fitted rows"
    )
    args = parser.parse_args()
    n = args.samples or (4000 if args.quick else 10000)
    nfes = (5, 10, 20) if args.quick else NFES
    if args.nfe is not None:
        nfes = tuple(int(k) for k in args.nfe.split(","))
    torch.set_num_threads(args.threads)
    if args.quick:
        global KD_SPACINGS
        KD_SPACINGS = ("karras", "exponential")

    mixture = Mixture(seed=0)
    g = torch.Generator().manual_seed(1)
    directions = torch.randn(DIM, 512, generator=g, dtype=F64)
    directions /= directions.norm(dim=0, keepdim=True)
    reference = mixture.sample(n, g)
    floor = sliced_w2(mixture.sample(n, g), reference, directions)
    noise = torch.randn(n, DIM, generator=g, dtype=torch.float32)
    # Calibration noise for the fitted rows: its own seed, independent of ``noise``.
    calibration = torch.randn(
        args.calibration, DIM, generator=torch.Generator().manual_seed(2), dtype=torch.float32
    )

    rows: dict[str, dict[int, float]] = {}
    start = time.perf_counter()

    def score(lib: str, name: str, fn: Callable[[int], Tensor]) -> None:
        if args.only is not None and not re.search(args.only, f"{lib}:{name}"):
            return
        row = {}
        for nfe in nfes:
            x = fn(nfe)
            row[nfe] = sliced_w2(x, reference, directions) if torch.isfinite(x).all() else math.inf
        rows[f"{lib}:{name}"] = row
        if args.progress:
            line = "".join(f"{row[k]:>10.4f}" for k in nfes)
            print(f"{lib + ':' + name:<40}{line}", flush=True)

    for name, make in diffkit_runners(calibration).items():
        score("diffkit", name, lambda nfe, make=make: run_diffkit(mixture, noise, nfe, make))
    if not args.no_peers:
        for name, make in diffusers_runners().items():
            score(
                "diffusers", name, lambda nfe, make=make: run_diffusers(mixture, noise, nfe, make)
            )
        for name in kdiffusion_runners():
            for spacing in KD_SPACINGS:
                score(
                    "k-diffusion",
                    f"{name}/{spacing}",
                    lambda nfe, name=name, sp=spacing: run_kdiffusion(
                        mixture, noise, nfe, name, sp
                    ),
                )
        score(
            "k-diffusion",
            "dpm_fast",
            lambda nfe: run_kdiffusion(mixture, noise, nfe, "dpm_fast", ""),
        )
    elapsed = time.perf_counter() - start

    print(f"sliced W2 to {n} true samples (512 directions); floor (two true sets) = {floor:.4f}")
    header = f"{'sampler':<40}" + "".join(f"{'NFE ' + str(k):>10}" for k in nfes)
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        print(f"{name:<40}" + "".join(f"{row[k]:>10.4f}" for k in nfes))
    print()
    best_line = f"{'':<40}" + "".join(f"{'NFE ' + str(k):>10}" for k in nfes)
    print(best_line)

    def best(prefix: str) -> dict[int, tuple[float, str]]:
        out = {}
        for k in nfes:
            cands = [(row[k], name) for name, row in rows.items() if name.startswith(prefix)]
            out[k] = min(cands) if cands else (math.inf, "-")
        return out

    ours = best("diffkit:")
    print(f"{'best diffkit':<40}" + "".join(f"{ours[k][0]:>10.4f}" for k in nfes))
    if not args.no_peers:
        peers = {k: min(best("diffusers:")[k], best("k-diffusion:")[k]) for k in nfes}
        print(f"{'best peer':<40}" + "".join(f"{peers[k][0]:>10.4f}" for k in nfes))
        print(
            f"{'ratio diffkit / peer':<40}"
            + "".join(f"{ours[k][0] / peers[k][0]:>10.3f}" for k in nfes)
        )
    print(f"{'ratio diffkit / floor':<40}" + "".join(f"{ours[k][0] / floor:>10.3f}" for k in nfes))
    for k in nfes:
        peer = "" if args.no_peers else f"; best peer {peers[k][1]}"
        print(f"NFE {k:>2}: best diffkit {ours[k][1]}{peer}")
    if FIT_COSTS:
        print(
            f"fitted rows: {args.calibration} calibration samples (seed 2, independent of the "
            "evaluation noise); fit cost per calibration sample, paid once per model and NFE:"
        )
        for (name, k), (teacher, search, cpu) in FIT_COSTS.items():
            print(
                f"  {name} NFE {k}: {teacher} teacher + {search} search = "
                f"{teacher + search} NFE, {cpu:.1f} s CPU"
            )
    print(f"({len(rows)} samplers, {elapsed:.0f} s)")


if __name__ == "__main__":
    main()
