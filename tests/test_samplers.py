"""Properties of every sampler in ``diffkit.samplers.PRESETS`` (and ``REGISTRY``).

A new sampler is tested by adding it to the presets. The data are Gaussian, so the
exact denoiser and the exact probability-flow map are closed form.
"""

import dataclasses
import math
import threading
import warnings
from typing import Literal
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

import diffkit as dk
from diffkit import samplers
from diffkit.prediction import from_x0_eps, to_x0_eps
from diffkit.samplers import _base
from diffkit.schedules import EDM, Cosine, Discrete, RectifiedFlow, discrete_betas

F64 = torch.float64
DIM = 4
NAMES = sorted(samplers.REGISTRY)
STOCHASTIC = {
    "ddpm",
    "euler_ancestral",
    "dpmpp_sde",
    "dpmpp_2m_sde",
    "dpmpp_3m_sde",
    "dpmpp_2s_ancestral",
    "dpm_2_ancestral",
    "dpmpp_sde_single",
    "edm_stochastic",
    "lcm",
}
CONSISTENCY = {"lcm"}  # samplers for consistency models, not for the denoiser's ODE/SDE
FIRST_ORDER = {"ddpm", "ddim", "ddim_logsnr", "euler", "euler_ancestral"}
DETERMINISTIC = [n for n in NAMES if n not in STOCHASTIC]
DISCRETE = Discrete.from_betas(discrete_betas("linear_beta", 1000))


TWO_STAGE = (
    samplers.Heun,
    samplers.DPMSolver2,
    samplers.DPMSolverPP2SAncestral,
    samplers.DPMSolverPPSDE,
)  # 2 NFE per step, 1 onto the data


def _nfe_per_step(sampler: samplers.SamplerBase) -> int:
    if isinstance(sampler, samplers.EDMStochastic):
        return 2 if sampler.solver == "heun" else 1
    return 2 if isinstance(sampler, TWO_STAGE) else 1


def _evaluations(sampler: samplers.SamplerBase, steps: int) -> int:
    """Denoiser calls for ``steps`` steps (a first step of 2 NFE for PLMS' warm-up)."""
    if isinstance(sampler, samplers.PNDM):
        return steps + (1 if sampler.warmup == "plms" else 9)
    nfe = _nfe_per_step(sampler)
    return steps * nfe - (nfe - 1)


class Gaussian:
    """Exact denoiser of N(mean, diag(std²)) data, predicting ``prediction``."""

    def __init__(self, schedule, mean, std, prediction="epsilon", dtype=None):
        self.schedule, self.mean, self.std = schedule, mean, std
        self.prediction = prediction
        self.dtype = dtype
        self.calls = 0

    def x0(self, x, t):
        a = self.schedule.alpha(t.to(F64))[:, None]
        s = self.schedule.sigma(t.to(F64))[:, None]
        w2 = self.std**2
        return self.mean + a * w2 / (a * a * w2 + s * s) * (x.to(F64) - a * self.mean), a, s

    def __call__(self, x, t, cond=None):
        self.calls += 1
        if self.dtype is not None:
            assert x.dtype == self.dtype, f"model called with {x.dtype}"
        x0, a, s = self.x0(x, t)
        eps = (x.to(F64) - a * x0) / s
        return from_x0_eps(x0, eps, self.prediction, a[:, 0], s[:, 0]).to(x.dtype)

    def flow_map(self, noise, grid: samplers.Grid):
        """The exact ODE solution from ``sigma_0 * noise`` to ``t_min``, then denoised."""
        a0, s0 = grid.alpha[0], grid.sigma[0]
        a, s = grid.alpha[-2], grid.sigma[-2]
        w2 = self.std**2
        z = (s0 * noise.to(F64) - a0 * self.mean) / torch.sqrt(a0 * a0 * w2 + s0 * s0)
        return self.mean + a * w2 * z / torch.sqrt(a * a * w2 + s * s)


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(DIM, generator=g, dtype=F64)
    std = torch.tensor([0.1, 0.3, 1.0, 2.0], dtype=F64)
    return mean, std


@pytest.mark.parametrize("name", NAMES)
def test_every_registry_entry_satisfies_the_sampler_protocol(name: str) -> None:
    sampler = samplers.REGISTRY[name]()
    assert isinstance(sampler, dk.Sampler)
    assert sampler == samplers.REGISTRY[name]()  # plain data, no hidden state


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_converge_to_the_exact_flow_map(name: str) -> None:
    mean, std = _data()
    den = Gaussian(DISCRETE, mean, std)
    noise = torch.randn(64, DIM, generator=torch.Generator().manual_seed(1), dtype=F64)
    sampler = samplers.REGISTRY[name]()
    errors = []
    for steps in (8, 64):
        x = sampler.sample(den, DISCRETE, noise, steps=steps)
        exact = den.flow_map(noise, sampler.grid(DISCRETE, steps))
        errors.append(float((x - exact).abs().max()))
    assert errors[1] < 0.3, errors
    assert errors[1] < errors[0] / 4, errors


# Global order in steps of each deterministic method (UniPC's corrector adds one; 3M has
# the reference weights of diffusers and k-diffusion, which make it second order).
ORDER = {
    "ddim": 1,
    "euler": 1,
    "heun": 2,
    "dpm_2": 2,
    "lms": 3,
    # Adams-Bashforth with equal-step weights on a grid whose steps in sigma/alpha are
    # not equal: second order on log-SNR grids (slopes 2.1-2.2 at 12-96 steps).
    "pndm": 2,
    "dpmpp_2m": 2,
    "dpmpp_3m": 2,
    "unipc": 3,
}


@pytest.mark.parametrize("name", sorted(ORDER))
def test_error_falls_with_the_order_of_the_sampler(name: str) -> None:
    mean, std = _data()
    den = Gaussian(DISCRETE, mean, std)
    noise = torch.randn(64, DIM, generator=torch.Generator().manual_seed(1), dtype=F64)
    sampler = samplers.PRESETS[name].model_copy(update={"spacing": samplers.LogSNR()})
    errors = []
    steps = (24, 48)
    for n in steps:
        x = sampler.sample(den, DISCRETE, noise, steps=n)
        errors.append(float((x - den.flow_map(noise, sampler.grid(DISCRETE, n))).abs().max()))
    slope = math.log(errors[0] / errors[1]) / math.log(steps[1] / steps[0])
    assert slope > ORDER[name] - 0.75, (errors, slope)


# The noise-prediction DPM-Solver (algorithm="dpmsolver", diffusers' deprecated default
# before DPM-Solver++): order 1 is DDIM, 2 is second order with either formula, 3 has the
# reference weights (as 3M above: second order, slope 2.2 at 24-48 steps).
NOISE_PREDICTION_ORDER = {(1, "midpoint"): 1, (2, "midpoint"): 2, (2, "heun"): 2, (3, "heun"): 2}


@pytest.mark.parametrize(("order", "solver_type"), sorted(NOISE_PREDICTION_ORDER))
def test_noise_prediction_dpm_solver_error_falls_with_its_order(
    order: Literal[1, 2, 3], solver_type: Literal["midpoint", "heun"]
) -> None:
    mean, std = _data()
    den = Gaussian(DISCRETE, mean, std)
    noise = torch.randn(64, DIM, generator=torch.Generator().manual_seed(1), dtype=F64)
    sampler = samplers.DPMSolverPP(
        algorithm="dpmsolver", order=order, solver_type=solver_type, spacing=samplers.LogSNR()
    )
    errors = []
    steps = (24, 48)
    for n in steps:
        x = sampler.sample(den, DISCRETE, noise, steps=n)
        errors.append(float((x - den.flow_map(noise, sampler.grid(DISCRETE, n))).abs().max()))
    slope = math.log(errors[0] / errors[1]) / math.log(steps[1] / steps[0])
    assert slope > NOISE_PREDICTION_ORDER[order, solver_type] - 0.25, (errors, slope)
    assert errors[1] < 0.3, errors


def test_noise_prediction_dpm_solver_first_order_is_ddim() -> None:
    # (alpha_{i+1} / alpha_i) x - sigma_{i+1} (e^h - 1) eps is DDIM's step, in other words
    grid = samplers.DDIM().grid(DISCRETE, 9)
    ours = samplers.DPMSolverPP(algorithm="dpmsolver", order=1).plan(grid)
    ddim = samplers.DPMSolverPP(order=1).plan(grid)
    for a, b in zip(ours, ddim):
        assert a.keep == pytest.approx(b.keep, rel=1e-12)
        assert a.data == pytest.approx(b.data, rel=1e-12)
        assert a.past == ()


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("order", [2, 3])
def test_noise_prediction_dpm_solver_fast_path_equals_the_reference(eta: float, order: int) -> None:
    # its steps combine earlier samples (Step.past): the compiled loop keeps them as the
    # thirty-line reference does, noise included
    if eta and order == 3:
        with pytest.raises(ValueError, match="order"):
            samplers.DPMSolverPP(algorithm="dpmsolver", order=3, eta=eta)
        return
    sampler = samplers.DPMSolverPP(algorithm="dpmsolver", order=order, eta=eta)
    den = Gaussian(DISCRETE, *_data())
    noise = torch.randn(6, DIM, generator=torch.Generator().manual_seed(0), dtype=F64)
    fast = sampler.sample(den, DISCRETE, noise, steps=7, generator=torch.manual_seed(3))
    plan = sampler.prepare(DISCRETE, 7)
    assert any(step.past for step in plan.steps)
    model = _base._Model(den, plan.grid, noise, None, 1.0, None)
    x = noise * plan.grid.sigma[0]
    reference = _base.run_reference(plan.steps, model, x, torch.manual_seed(3))
    if not eta:
        assert torch.equal(fast, reference)
    torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("algorithm", "eta", "order", "solver_type"),
    [
        ("dpmsolver", 0.0, 2, "midpoint"),
        ("dpmsolver", 0.0, 3, "heun"),
        ("dpmsolver", 0.0, 3, "midpoint"),
        ("dpmsolver++", 1.0, 2, "heun"),
    ],
)
def test_singlestep_from_earlier_samples_converges_and_matches_the_reference(
    algorithm: Literal["dpmsolver++", "dpmsolver"],
    eta: float,
    order: Literal[1, 2, 3],
    solver_type: Literal["midpoint", "heun"],
) -> None:
    # noise prediction and the SDE step from the group's start x_g (Step.past); the ODE
    # variants are second order at least (groups 1, 2(, 3)), as DPM-Solver++'s
    sampler = samplers.DPMSolverPPSinglestep(
        algorithm=algorithm, eta=eta, order=order, solver_type=solver_type
    )
    den = Gaussian(DISCRETE, *_data())
    noise = torch.randn(64, DIM, generator=torch.Generator().manual_seed(1), dtype=F64)
    plan = sampler.prepare(DISCRETE, 12)
    assert any(step.past for step in plan.steps)
    fast = sampler.sample(den, DISCRETE, noise, steps=12, generator=torch.manual_seed(3))
    model = _base._Model(den, plan.grid, noise, None, 1.0, None)
    x = noise * plan.grid.sigma[0]
    reference = _base.run_reference(plan.steps, model, x, torch.manual_seed(3))
    torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-10)
    if eta:
        return
    errors = []
    for n in (24, 48):
        x = sampler.sample(den, DISCRETE, noise, steps=n)
        errors.append(float((x - den.flow_map(noise, sampler.grid(DISCRETE, n))).abs().max()))
    assert math.log(errors[0] / errors[1]) / math.log(2) > 1.75, errors


def test_noise_prediction_dpm_solver_refuses_an_eta_it_has_no_formula_for() -> None:
    with pytest.raises(ValueError, match="eta"):
        samplers.DPMSolverPP(algorithm="dpmsolver", eta=0.5)
    with pytest.raises(ValueError, match="eta"):
        samplers.DPMSolverPPSinglestep(algorithm="dpmsolver", eta=1.0)
    with pytest.raises(ValueError, match="order"):
        samplers.DPMSolverPPSinglestep(eta=1.0, order=3)


# Multistep plans in data prediction are exponential integrators: a step of order p
# integrates exactly a denoised estimate D(lambda) that is a polynomial of degree < p.
# (DPM-Solver++ 2M and UniPC's order-2 predictor use the midpoint weight 1/2 of diffusers
# and k-diffusion: second order globally, but not exact for a linear D, so not listed.
# 3M weights its second difference D2 ~ h² D''/2 by -phi_3 as the references do, half
# its Taylor weight: exact for a linear D only, see diffkit.samplers.dpmsolver.)
EXACT_DEGREE = {
    "dpmpp_3m": (samplers.DPMSolverPP(order=3), 1),
    "dpmpp_3m_sde": (samplers.DPMSolverPP(order=3, eta=1.0), 1),
    "dpmpp_2m_heun": (samplers.DPMSolverPP(order=2, solver_type="heun"), 1),
    "dpmpp_2m_sde_heun": (samplers.DPMSolverPP(order=2, eta=1.0, solver_type="heun"), 1),
    "unipc_3_predictor": (samplers.UniPC(order=3, corrector=False), 2),
    "unipc_3_bh1_predictor": (samplers.UniPC(order=3, variant="bh1", corrector=False), 2),
}


@pytest.mark.parametrize("name", sorted(EXACT_DEGREE))
def test_multistep_step_integrates_polynomials_of_its_degree_exactly(name: str) -> None:
    sampler, degree = EXACT_DEGREE[name]
    eta = getattr(sampler, "eta", 0.0)
    grid = samplers.make_grid(dk.schedules.LinearBeta(), samplers.LogSNR(), 30)
    i = 10  # three estimates of history, far from both ends
    step = sampler.plan(grid)[i]
    h, lam = grid.h(i), grid.lam[i]
    # The data term of the exact step: alpha_{i+1} (1 + eta) int_0^h e^{-(1+eta)(h-u)} D du,
    # by Gauss-Legendre quadrature (exact to rounding for this smooth integrand).
    nodes, weights = np.polynomial.legendre.leggauss(24)
    u = (nodes + 1) * h / 2
    kernel = (1 + eta) * np.exp(-(1 + eta) * (h - u)) * weights * h / 2
    for k in range(degree + 1):

        def estimate(lam_: float | np.ndarray, k: int = k) -> float | np.ndarray:
            return (0.5 + (lam_ - lam) / h) ** k

        exact = grid.alpha[i + 1] * float(np.sum(kernel * estimate(lam + u)))
        planned = sum(c * estimate(grid.lam[i - j]) for j, c in enumerate(step.data))
        assert planned == pytest.approx(exact, rel=1e-12, abs=1e-15), (k, planned, exact)


@pytest.mark.slow
@settings(max_examples=10)
@given(
    seed=st.integers(0, 2**16),
    scale=st.floats(0.2, 3.0),
    name=st.sampled_from(DETERMINISTIC),
    prediction=st.sampled_from(["epsilon", "x0", "v", "flow"]),
)
def test_samples_match_the_gaussian_mean_and_covariance(seed, scale, name, prediction) -> None:
    mean, std = _data(seed)
    std = std * scale
    den = Gaussian(DISCRETE, mean, std, prediction)
    noise = torch.randn(2000, DIM, generator=torch.Generator().manual_seed(seed), dtype=F64)
    steps = 150 if name in FIRST_ORDER else 40
    x = samplers.REGISTRY[name]().sample(den, DISCRETE, noise, steps=steps)
    tol = 4 * std / math.sqrt(2000) + 0.06 * std + 1e-3
    assert ((x.mean(0) - mean).abs() < tol).all()
    assert ((x.std(0) - std).abs() < 2 * tol).all()


SCHEDULES = {
    "discrete": DISCRETE,
    "cosine": Cosine(),
    "edm": EDM(),
    "rectified_flow": RectifiedFlow(),
    "discrete_zsnr": Discrete.from_betas(
        discrete_betas("sqrt_linear_beta", 1000, 0.00085, 0.012), zero_terminal_snr=True
    ),
}


BUILT_IN_SCHEDULES = {
    **SCHEDULES,
    "linear_beta": dk.schedules.LinearBeta(),
    "sqrt_linear_beta": dk.schedules.SqrtLinearBeta(),
    "discrete_sd": Discrete.from_betas(discrete_betas("sqrt_linear_beta", 1000, 0.00085, 0.012)),
    "discrete_cosine": Discrete.from_betas(discrete_betas("cosine", 1000)),
    "rectified_flow_shift3": RectifiedFlow(shift=3.0),
    "cosine_zsnr": dk.schedules.ZeroTerminalSNR(base=Cosine()),
}


@pytest.mark.parametrize("schedule", sorted(BUILT_IN_SCHEDULES))
@pytest.mark.parametrize("name", NAMES)
def test_no_preset_spends_most_of_ten_steps_at_pure_noise(name: str, schedule: str) -> None:
    # Karras on Cosine once put 7 of 10 steps at t > 0.98 (the Karras-on-Cosine trap).
    grid = samplers.PRESETS[name].grid(BUILT_IN_SCHEDULES[schedule], 10)
    noisy = [t for t in grid.t[:-1] if t > 0.95]
    assert len(noisy) <= 5, f"{name} on {schedule}: {grid.t}"


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("name", NAMES)
def test_every_sampler_gives_finite_samples_on_every_schedule(name: str, schedule: str) -> None:
    sched = SCHEDULES[schedule]
    pred = "v" if schedule in {"rectified_flow", "discrete_zsnr"} else "epsilon"
    den = Gaussian(sched, *_data(), pred)
    noise = torch.randn(8, DIM, generator=torch.Generator().manual_seed(0), dtype=F64)
    g = torch.Generator().manual_seed(0)
    for steps in (1, 2, 5):
        x = samplers.REGISTRY[name]().sample(den, sched, noise, steps=steps, generator=g)
        assert torch.isfinite(x).all()


@pytest.mark.slow
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("name", NAMES)
def test_every_sampler_works_on_every_schedule(name: str, schedule: str) -> None:
    sched = SCHEDULES[schedule]
    mean, std = _data()[0], torch.tensor([0.3, 0.6, 1.0, 2.0], dtype=F64)
    # epsilon cannot give x0 where alpha = 0 (pure-noise start); v and flow can.
    pred = "v" if schedule in {"rectified_flow", "discrete_zsnr"} else "epsilon"
    den = Gaussian(sched, mean, std, pred)
    noise = torch.randn(1000, DIM, generator=torch.Generator().manual_seed(0), dtype=F64)
    steps = 100 if name in FIRST_ORDER else 30
    x = samplers.REGISTRY[name]().sample(
        den, sched, noise, steps=steps, generator=torch.Generator().manual_seed(0)
    )
    # a smoke test of every pairing, with loose tolerances
    assert torch.isfinite(x).all()
    assert ((x.mean(0) - mean).abs() < 0.3 * std + 0.05).all()
    if name in CONSISTENCY:
        # Consistency sampling expects a model that maps x_t to a sample; fed the
        # posterior mean E[x0 | x_t], every re-noising loses the posterior's variance.
        assert ((x.std(0) / std) < 1).all()
        return
    assert ((x.std(0) / std - 1).abs() < 0.35).all()


@pytest.mark.parametrize("name", NAMES)
def test_same_generator_seed_gives_identical_samples(name: str) -> None:
    mean, std = _data()
    den = Gaussian(DISCRETE, mean, std)
    noise = torch.randn(8, DIM, generator=torch.Generator().manual_seed(0))
    sampler = samplers.REGISTRY[name]()
    a = sampler.sample(den, DISCRETE, noise, steps=6, generator=torch.Generator().manual_seed(5))
    b = sampler.sample(den, DISCRETE, noise, steps=6, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    if name in STOCHASTIC:
        c = sampler.sample(
            den, DISCRETE, noise, steps=6, generator=torch.Generator().manual_seed(6)
        )
        assert not torch.equal(a, c)


class ImageGaussian:
    """Exact epsilon of zero-mean per-channel Gaussian images, answered in ``layout``."""

    prediction = "epsilon"

    def __init__(self, schedule, layout: torch.memory_format) -> None:
        self.schedule, self.layout = schedule, layout
        self.var = torch.tensor([0.2, 1.0, 2.0], dtype=F64)[:, None, None]

    def __call__(self, x, t, cond=None):
        a = self.schedule.alpha(t.to(F64))[:, None, None, None]
        s = self.schedule.sigma(t.to(F64))[:, None, None, None]
        eps = s / (a * a * self.var + s * s) * x.to(F64)
        return eps.to(x.dtype).contiguous(memory_format=self.layout)


@pytest.mark.parametrize("name", NAMES)
def test_samples_do_not_depend_on_the_memory_layout(name: str) -> None:
    # Step noise is drawn by logical index, so a channels-last or permuted noise tensor
    # (and a model answering channels-last) gives the same samples, element for element.
    noise = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    sampler = samplers.REGISTRY[name]()

    def run(x, layout=torch.contiguous_format):
        den = ImageGaussian(DISCRETE, layout)
        g = torch.Generator().manual_seed(3)
        return sampler.sample(den, DISCRETE, x, steps=4, generator=g)

    reference = run(noise)
    channels_last = noise.contiguous(memory_format=torch.channels_last)
    permuted = noise.permute(3, 1, 0, 2).contiguous().permute(2, 1, 3, 0)
    assert not channels_last.is_contiguous() and not permuted.is_contiguous()
    for x, layout in [
        (channels_last, torch.contiguous_format),
        (permuted, torch.contiguous_format),
        (noise, torch.channels_last),
        (channels_last, torch.channels_last),
    ]:
        torch.testing.assert_close(run(x, layout), reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_sampling_starts_from_given_latents_or_from_x_t_at_any_time(name: str) -> None:
    mean, std = _data()
    den = Gaussian(DISCRETE, mean, std)
    noise = torch.randn(8, DIM, generator=torch.Generator().manual_seed(0), dtype=F64)
    sampler = samplers.REGISTRY[name]()

    def run(x, steps=5, **kw):
        g = torch.Generator().manual_seed(4)
        return sampler.sample(den, DISCRETE, x, steps=steps, generator=g, **kw)

    # given latents x_T at the grid's first time, used as they are
    x_T = noise * sampler.grid(DISCRETE, 5).sigma[0]
    torch.testing.assert_close(run(x_T, start="sample"), run(noise), rtol=1e-12, atol=1e-12)
    # a given x_t at t = 0.5 (image-to-image): the grid starts there
    t = torch.full((8,), 0.5, dtype=F64)
    x0 = mean + std * torch.randn(8, DIM, generator=torch.Generator().manual_seed(2), dtype=F64)
    x_t = DISCRETE.alpha(t)[:, None] * x0 + DISCRETE.sigma(t)[:, None] * noise
    calls: list[float] = []
    out = run(x_t, start="sample", t_start=0.5, callback=lambda i, t, x, d: calls.append(i))
    started = sampler.model_copy(update={"spacing": sampler.spacing.starting_at(0.5)})
    assert started.grid(DISCRETE, 5).t[0] == 0.5 and len(calls) == 5
    assert torch.isfinite(out).all()
    if name not in STOCHASTIC:  # the flow from x_t converges to the exact flow map
        out = run(x_t, steps=40, start="sample", t_start=0.5)
        exact = den.flow_map(x_t / DISCRETE.sigma(t[:1]), started.grid(DISCRETE, 40))
        assert float((out - exact).abs().max()) < 0.1
    with pytest.raises(ValueError, match="t_start"):
        run(x_t, t_start=1e-4)
    with pytest.raises(ValueError, match="start"):
        run(x_t, start="latents")


@pytest.mark.parametrize("name", NAMES)
def test_one_sampler_shared_by_threads_matches_sequential_calls(name: str) -> None:
    mean, std = _data()
    sampler = samplers.REGISTRY[name]()
    noises = [torch.randn(16, DIM, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    steps = [5, 7, 9, 11]

    def run(i: int) -> torch.Tensor:
        den = Gaussian(DISCRETE, mean, std)
        g = torch.Generator().manual_seed(i)
        return sampler.sample(den, DISCRETE, noises[i], steps=steps[i], generator=g)

    sequential = [run(i) for i in range(4)]
    results: list[torch.Tensor | None] = [None] * 4

    def worker(i: int) -> None:
        for _ in range(3):
            results[i] = run(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for seq, par in zip(sequential, results):
        assert par is not None and torch.equal(seq, par)


_SYNCING = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
    torch.Tensor.any,
    torch.Tensor.all,
}


class _RecordSyncs(TorchFunctionMode):
    """Records host-syncing tensor calls made between the first and last denoiser call."""

    def __init__(self) -> None:
        super().__init__()
        self.in_loop = False
        self.syncs: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.in_loop and func in _SYNCING:
            self.syncs.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", NAMES)
def test_sampling_loop_makes_no_host_sync(name: str) -> None:
    mean, std = _data()
    inner = Gaussian(DISCRETE, mean, std)
    recorder = _RecordSyncs()
    sampler = samplers.REGISTRY[name]()
    steps = 6
    expected_calls = _evaluations(sampler, steps)
    calls = 0

    def denoiser(x, t, cond=None):
        # the exact model itself is not under test: evaluate it with the recorder paused
        nonlocal calls
        calls += 1
        recorder.in_loop = False
        out = inner(x, t, cond)
        recorder.in_loop = calls < expected_calls
        return out

    denoiser.prediction = "epsilon"  # type: ignore[attr-defined]
    noise = torch.randn(4, DIM)
    with recorder:
        sampler.sample(
            denoiser, DISCRETE, noise, steps=steps, generator=torch.Generator().manual_seed(0)
        )
    assert calls == expected_calls
    assert recorder.syncs == []


def test_sync_recorder_catches_item() -> None:
    recorder = _RecordSyncs()
    with recorder:
        recorder.in_loop = True
        torch.ones(2).sum().item()
    assert recorder.syncs == ["item"]


@pytest.mark.parametrize("name", NAMES)
def test_nan_from_the_denoiser_raises_naming_the_step(name: str) -> None:
    mean, std = _data()
    inner = Gaussian(DISCRETE, mean, std)
    calls = 0

    def denoiser(x, t, cond=None):
        nonlocal calls
        calls += 1
        out = inner(x, t, cond)
        return out * float("nan") if calls == 3 else out

    denoiser.prediction = "epsilon"  # type: ignore[attr-defined]
    sampler = samplers.REGISTRY[name]()
    with pytest.raises(samplers.NonFiniteError, match=r"step \d+ of 6") as info:
        sampler.sample(denoiser, DISCRETE, torch.randn(2, DIM), steps=6)
    # the third call is in step 1 where step 0 makes two (two-stage samplers, PLMS)
    step = 1 if _evaluations(sampler, 2) > 2 else 2
    assert f"step {step} of 6" in str(info.value)


@pytest.mark.parametrize("name", NAMES)
def test_an_epsilon_model_at_pure_noise_is_refused_before_any_call(name: str) -> None:
    # x0 = (x - sigma eps) / alpha is undefined where alpha = 0 (rectified flow's t = 1):
    # the error says so before the loop instead of blaming the (finite) model output.
    calls = []
    inner = Gaussian(RectifiedFlow(), *_data(), "epsilon")

    def denoiser(x, t, cond=None):
        calls.append(t)
        return inner(x, t, cond)

    denoiser.prediction = "epsilon"  # type: ignore[attr-defined]
    sampler = samplers.REGISTRY[name]()
    with pytest.raises(ValueError, match=r"'epsilon' does not determine x0 at step 0 of 4"):
        sampler.sample(denoiser, RectifiedFlow(), torch.randn(2, DIM), steps=4)
    assert calls == []


def test_inversion_in_one_step_from_pure_noise_is_refused() -> None:
    den = Gaussian(RectifiedFlow(), *_data(), "flow")
    with pytest.raises(ValueError, match="needs steps >= 2"):
        samplers.DDIMInversion(spacing=samplers.UniformTime()).invert(
            den, RectifiedFlow(), torch.randn(2, DIM, dtype=F64), steps=1
        )


@pytest.mark.parametrize("name", NAMES)
def test_bf16_denoiser_works_and_sampler_integrates_in_float32(name: str) -> None:
    mean, std = _data()
    den = Gaussian(DISCRETE, mean, std, dtype=torch.bfloat16)
    noise = torch.randn(500, DIM, generator=torch.Generator().manual_seed(0)).bfloat16()
    x = samplers.REGISTRY[name]().sample(
        den, DISCRETE, noise, steps=20, generator=torch.Generator().manual_seed(0)
    )
    assert x.dtype == torch.bfloat16 and torch.isfinite(x).all()
    assert ((x.float().mean(0) - mean.float()).abs() < 0.2 * std.float() + 0.05).all()


class _Learnable(torch.nn.Module):
    """An epsilon model with a parameter (a graph would reach its output); logs grad mode."""

    prediction = "epsilon"

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))
        self.grad_modes: list[bool] = []

    def forward(self, x, t, cond=None):
        self.grad_modes.append(torch.is_grad_enabled())
        return x * self.scale


def _assert_no_graph(x: torch.Tensor, model: _Learnable) -> None:
    assert not x.requires_grad and x.grad_fn is None
    assert model.grad_modes and not any(model.grad_modes), model.grad_modes


@pytest.mark.parametrize("name", NAMES)
def test_sample_records_no_graph_whatever_the_callers_grad_mode(name: str) -> None:
    model = _Learnable()
    noise = torch.randn(3, DIM, generator=torch.Generator().manual_seed(0)).requires_grad_()
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "Converting a tensor with requires_grad=True"
        x = samplers.REGISTRY[name]().sample(
            model, DISCRETE, noise, steps=3, generator=torch.Generator().manual_seed(0)
        )
    _assert_no_graph(x, model)
    assert torch.is_grad_enabled()  # the caller's mode is restored


def test_inversion_and_fitting_record_no_graph() -> None:
    noise = torch.randn(8, DIM, generator=torch.Generator().manual_seed(0))
    model = _Learnable()
    x = samplers.DDIMInversion(refine=1).invert(model, DISCRETE, noise, steps=3)
    _assert_no_graph(x, model)
    model = _Learnable()
    fitted = samplers.fit_solver(model, DISCRETE, noise, 2, teacher_steps=6)
    _assert_no_graph(fitted.sample(model, DISCRETE, noise, steps=2), model)
    model = _Learnable()
    grid = samplers.fit_grid(model, DISCRETE, noise, 2, teacher_steps=6)
    _assert_no_graph(samplers.UniPC(spacing=grid).sample(model, DISCRETE, noise, steps=2), model)


def test_a_denoiser_can_enable_gradients_for_itself_during_sampling() -> None:
    """Gradient guidance: the denoiser turns gradients on locally, the sampler keeps none."""
    base = Gaussian(DISCRETE, *_data())

    def guided(x, t, cond=None):
        with torch.enable_grad():
            leaf = x.detach().requires_grad_()
            (push,) = torch.autograd.grad(leaf.square().sum(), leaf)
        return base(x, t) + 0.1 * push

    guided.prediction = "epsilon"  # type: ignore[attr-defined]
    noise = torch.randn(3, DIM, generator=torch.Generator().manual_seed(0))
    x = samplers.DDIM().sample(guided, DISCRETE, noise, steps=4)
    plain = samplers.DDIM().sample(base, DISCRETE, noise, steps=4)
    assert x.grad_fn is None and torch.isfinite(x).all() and not torch.allclose(x, plain)


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_conditioning_embeddings_reach_the_model_in_the_noise_dtype(guidance: float) -> None:
    seen: list[tuple[torch.dtype, ...]] = []

    def model(x, t, cond=None):
        seen.append((x.dtype, cond.tokens.dtype, cond.pooled.dtype, cond.mask.dtype))
        seen.append((cond.labels.dtype,))
        return torch.zeros_like(x)

    model.prediction = "epsilon"  # type: ignore[attr-defined]

    def cond(n: int) -> dk.Conditioning:  # a float32 text encoder's output, int32 labels
        return dk.Conditioning(
            tokens=torch.randn(n, 3, 2),
            pooled=torch.randn(n, 2),
            mask=torch.ones(n, 3, dtype=torch.bool),
            labels=torch.zeros(n, dtype=torch.int32),
        )

    noise = torch.randn(2, DIM, dtype=torch.bfloat16)
    kwargs = {"uncond": cond(1), "guidance": guidance} if guidance != 1.0 else {}
    samplers.DDIM().sample(model, DISCRETE, noise, steps=2, cond=cond(2), **kwargs)
    bf16 = torch.bfloat16
    assert set(seen) == {(bf16, bf16, bf16, torch.bool), (torch.int32,)}


def test_a_float32_text_encoder_conditions_a_bf16_dit_through_the_sampler() -> None:
    from diffkit.nn.dit import DiT, DiTConfig

    dit = DiT(DiTConfig(in_channels=1, dim=16, depth=1, num_heads=2, context_dim=6)).eval()
    cond = dk.Conditioning(tokens=torch.randn(1, 3, 6))  # float32
    noise = torch.randn(2, 1, 8, 8)
    x = samplers.DDIM().sample(dit.bfloat16(), DISCRETE, noise.bfloat16(), steps=2, cond=cond)
    assert x.dtype == torch.bfloat16 and torch.isfinite(x).all()
    with pytest.raises(dk.typing.ShapeError, match=r"DiT: x_t is torch.float32 .* noise\.to\("):
        samplers.DDIM().sample(dit, DISCRETE, noise, steps=2, cond=cond)


class _Conditional:
    """Gaussian data whose mean moves with the label: the conditional model."""

    prediction = "epsilon"

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, x, t, cond=None):
        self.calls.append(x.shape[0])
        shift = torch.zeros(x.shape[0], 1) if cond is None else cond.pooled[:, :1]
        den = Gaussian(DISCRETE, torch.zeros(DIM, dtype=F64), torch.ones(DIM, dtype=F64))
        return den(x - shift * DISCRETE.alpha(t)[:, None].float(), t)


@pytest.mark.parametrize("name", NAMES)
def test_guidance_one_equals_the_conditional_model(name: str) -> None:
    model = _Conditional()
    cond = dk.Conditioning(pooled=torch.full((1, 3), 2.0))
    uncond = dk.Conditioning(pooled=torch.zeros(1, 3))
    noise = torch.randn(5, DIM, generator=torch.Generator().manual_seed(0))
    sampler = samplers.REGISTRY[name]()

    def run(**kw):
        return sampler.sample(
            model, DISCRETE, noise, steps=5, generator=torch.Generator().manual_seed(0), **kw
        )

    plain = run(cond=cond)
    assert set(model.calls) == {5}
    model.calls.clear()
    with pytest.warns(
        UserWarning, match=f"{type(sampler).__name__}.sample: uncond is unused"
    ) as seen:
        guided = run(cond=cond, uncond=uncond, guidance=1.0)
    assert [w.filename for w in seen] == [__file__]  # the warning points at the caller
    assert set(model.calls) == {5}  # the unused uncond is not evaluated
    torch.testing.assert_close(plain, guided)
    strong = run(cond=cond, uncond=uncond, guidance=3.0)
    assert set(model.calls) == {5, 10}  # one batched call on cond and uncond together
    assert not torch.allclose(plain, strong)
    # guidance rescale: none at 0 or at guidance 1 (std(cond) / std(cond) = 1)
    torch.testing.assert_close(run(cond=cond, guidance_rescale=0.7), plain)
    torch.testing.assert_close(
        run(cond=cond, uncond=uncond, guidance=3.0, guidance_rescale=0.0), strong
    )
    # this model's cond shifts its prediction by the same amount in every dimension, which
    # leaves the per-sample std as it is: rescaling is then the identity (the formula is
    # tested in test_guidance.py and against diffusers in tests/parity).
    rescaled = run(cond=cond, uncond=uncond, guidance=3.0, guidance_rescale=0.7)
    torch.testing.assert_close(rescaled, strong, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="guidance_rescale"):
        run(cond=cond, guidance_rescale=1.5)


def test_guidance_needs_uncond() -> None:
    model = _Conditional()
    cond = dk.Conditioning(pooled=torch.ones(1, 3))
    with pytest.raises(ValueError, match="uncond"):
        samplers.DDIM().sample(model, DISCRETE, torch.randn(2, DIM), steps=3, cond=cond, guidance=2)


@pytest.mark.parametrize("name", NAMES)
def test_callback_sees_every_step(name: str) -> None:
    mean, std = _data()
    den = Gaussian(DISCRETE, mean, std)
    seen: list[tuple[int, float, tuple[int, ...]]] = []

    def callback(i, t, x, x0):
        assert t.shape == (3,) and x0.shape == x.shape
        seen.append((i, float(t[0]), tuple(x.shape)))

    out = samplers.REGISTRY[name]().sample(
        den,
        DISCRETE,
        torch.randn(3, DIM),
        steps=4,
        callback=callback,
        generator=torch.Generator().manual_seed(0),
    )
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert seen[-1][1] == 0.0 and all(s[2] == tuple(out.shape) for s in seen)
    assert [s[1] for s in seen] == sorted((s[1] for s in seen), reverse=True)


def test_euler_is_ddim_in_the_edm_variables() -> None:
    mean, std = _data()
    den = Gaussian(DISCRETE, mean, std)
    noise = torch.randn(10, DIM, dtype=F64)
    sp = samplers.Karras()
    a = samplers.Euler(spacing=sp).sample(den, DISCRETE, noise, steps=7)
    b = samplers.DDIM(spacing=sp).sample(den, DISCRETE, noise, steps=7)
    torch.testing.assert_close(a, b)


@settings(max_examples=5)
@given(seed=st.integers(0, 1000), steps=st.integers(30, 50))
def test_ddim_inversion_then_sampling_returns_x0(seed: int, steps: int) -> None:
    mean, std = _data(seed)
    den = Gaussian(DISCRETE, mean, std)
    g = torch.Generator().manual_seed(seed)
    x0 = mean + std * torch.randn(16, DIM, generator=g, dtype=F64)
    spacing = samplers.LogSNR()
    noise = samplers.DDIMInversion(spacing=spacing, refine=8).invert(den, DISCRETE, x0, steps=steps)
    back = samplers.DDIM(spacing=spacing).sample(den, DISCRETE, noise, steps=steps)
    torch.testing.assert_close(back, x0, atol=1e-3 * (1 + float(x0.abs().max())), rtol=0)


def test_inversion_refinement_reduces_round_trip_error() -> None:
    mean, std = _data()
    den = Gaussian(DISCRETE, mean, std)
    x0 = mean + std * torch.randn(16, DIM, generator=torch.Generator().manual_seed(0), dtype=F64)
    errors = []
    spacing = samplers.LogSNR()
    for refine in (0, 2, 8):
        inv = samplers.DDIMInversion(spacing=spacing, refine=refine)
        noise = inv.invert(den, DISCRETE, x0, steps=50)
        back = samplers.DDIM(spacing=spacing).sample(den, DISCRETE, noise, steps=50)
        errors.append(float((back - x0).abs().max()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-5


def test_inversion_from_pure_noise_schedule() -> None:
    mean, std = _data()
    sched = RectifiedFlow()
    den = Gaussian(sched, mean, std, "flow")
    x0 = mean + std * torch.randn(8, DIM, generator=torch.Generator().manual_seed(0), dtype=F64)
    noise = samplers.DDIMInversion(spacing=samplers.UniformTime(), refine=8).invert(
        den, sched, x0, steps=30
    )
    back = samplers.DDIM().sample(den, sched, noise, steps=30)
    torch.testing.assert_close(back, x0, atol=1e-3, rtol=0)


# Samplers whose fields have no defaults (a fitted solver is data): an example instance.
CONFIG_EXAMPLES = {
    "fitted": {
        "spacing": {"kind": "fitted_grid", "times": (1.0,)},
        "data": ((1.0,),),
        "correct": (),
        "alpha": (0.1,),
        "sigma": (1.0,),
    }
}


@pytest.mark.parametrize("kind", samplers.SAMPLERS.kinds)
def test_every_kind_is_its_own_config_and_round_trips(kind: str) -> None:
    sampler = samplers.SAMPLERS.config_class(kind).model_validate(CONFIG_EXAMPLES.get(kind, {}))
    assert isinstance(sampler, dk.Sampler) and isinstance(sampler, samplers.SamplerBase)
    assert samplers.SAMPLERS.build(sampler) is sampler  # the config is the component
    again = samplers.SAMPLERS.build(sampler.to_json())
    assert again == sampler and type(again) is type(sampler)
    assert samplers.SAMPLERS.parse(sampler.to_dict()) == sampler


@pytest.mark.parametrize("name", NAMES)
def test_every_preset_round_trips_and_its_factory_gives_it(name: str) -> None:
    preset = samplers.PRESETS[name]
    assert samplers.REGISTRY[name]() == preset
    assert samplers.SAMPLERS.parse(preset.to_dict()) == preset
    assert samplers.SAMPLERS.parse(preset.to_json()) == preset


def test_sampler_rejects_unknown_fields_and_bad_values_once_everywhere() -> None:
    # Validation lives in the sampler itself: built directly or parsed, the same rules.
    with pytest.raises(ValueError, match="eta"):
        samplers.DDIM(eta=-1)
    with pytest.raises(ValueError, match="eta"):
        samplers.SAMPLERS.parse({"kind": "ddim", "eta": -1})
    with pytest.raises(ValueError, match="eta"):
        samplers.EulerAncestral(eta=-0.5)
    with pytest.raises(ValueError):
        samplers.SAMPLERS.parse({"kind": "dpmpp", "order": 4})
    with pytest.raises(ValueError, match="order"):
        samplers.UniPC(order=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nope"):
        samplers.SAMPLERS.parse({"kind": "unipc", "spacing": {"kind": "nope"}})
    with pytest.raises(ValueError, match="spacing must be a spacing config"):
        samplers.DDIM(spacing=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="etaa"):
        samplers.DDIM(etaa=0.5)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="refine"):
        samplers.DDIMInversion(refine=-1)
    cfg = samplers.SAMPLERS.parse({"kind": "dpmpp", "order": 3, "spacing": {"kind": "karras"}})
    assert cfg == samplers.DPMSolverPP(order=3, spacing=samplers.Karras())
    assert samplers.DDIM(spacing={"kind": "logsnr"}) == samplers.DDIM(spacing=samplers.LogSNR())  # type: ignore[arg-type]


def test_wrong_noise_shape_or_steps_is_an_error() -> None:
    den = Gaussian(DISCRETE, *_data())
    with pytest.raises(ValueError):
        samplers.DDIM().sample(den, DISCRETE, torch.randn(2, DIM), steps=0)
    with pytest.raises(dk.ShapeError):
        samplers.DDIM().sample(den, DISCRETE, torch.randn(()), steps=2)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", NAMES)
def test_steps_true_and_non_finite_guidance_are_named_before_any_step(name: str) -> None:
    calls: list[int] = []

    def den(x, t, cond=None):
        calls.append(1)
        return torch.zeros_like(x)

    den.prediction = "epsilon"  # type: ignore[attr-defined]
    sampler = samplers.REGISTRY[name]()
    noise = torch.randn(2, DIM)
    with pytest.raises(TypeError, match="steps must be an int, got bool"):
        sampler.sample(den, DISCRETE, noise, steps=True)
    c = dk.Conditioning(pooled=torch.ones(1, 3))
    for guidance in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="guidance must be finite"):
            sampler.sample(den, DISCRETE, noise, steps=2, cond=c, uncond=c, guidance=guidance)
    assert not calls


@pytest.mark.parametrize(
    "name", ["ddim", "ddpm", "euler", "euler_ancestral", "ddim_logsnr", "heun"]
)
def test_fused_path_matches_the_general_loop(name: str) -> None:
    # Plans that only combine x_i with D_i (and Heun's re-evaluated D_{i+1}) fold the x0
    # conversion into their coefficients and never form D; the general loop forms D.
    den = Gaussian(DISCRETE, *_data())
    noise = torch.randn(6, DIM, generator=torch.Generator().manual_seed(0), dtype=F64)
    sampler = samplers.REGISTRY[name]()
    grid = sampler.grid(DISCRETE, 7)
    plan = sampler.plan(grid)
    assert _base._fusable(plan)

    def run(fused: bool) -> torch.Tensor:
        model = _base._Model(den, grid, noise, None, 1.0, None)
        with mock.patch.object(_base, "_fusable", lambda plan: fused):
            x = noise * grid.sigma[0]
            return _base.run_plan(plan, model, x, torch.Generator().manual_seed(3), None)

    torch.testing.assert_close(run(True), run(False), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("batch", [2, 8])  # 8 rows: torch's vectorised normal_ (>= 16 values)
def test_euler_ancestral_is_k_diffusions_algorithm_with_the_generators_draws(batch: int) -> None:
    # Karras et al.'s Euler-ancestral written out in the EDM variables x~ = x / alpha,
    # s = sigma / alpha, with z_i = torch.randn from the same generator: the sampler's
    # noise, drawn straight into each step's output, is the same draws.
    den = Gaussian(DISCRETE, *_data())
    noise = torch.randn(batch, DIM, generator=torch.Generator().manual_seed(0), dtype=F64)
    sampler = samplers.EulerAncestral()
    grid = sampler.grid(DISCRETE, 7)
    ours = sampler.sample(den, DISCRETE, noise, steps=7, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    s = [sig / a for sig, a in zip(grid.sigma, grid.alpha)]
    xt = noise * grid.sigma[0] / grid.alpha[0]
    for i in range(grid.steps):
        t = torch.full((batch,), grid.t[i], dtype=F64)
        d = den.x0(xt * grid.alpha[i], t)[0]
        s_up = min(s[i + 1], math.sqrt(s[i + 1] ** 2 * (s[i] ** 2 - s[i + 1] ** 2) / s[i] ** 2))
        s_down = math.sqrt(s[i + 1] ** 2 - s_up**2)
        xt = xt + (xt - d) / s[i] * (s_down - s[i])
        if s[i + 1] > 0:
            xt = xt + torch.randn(xt.shape, generator=g, dtype=F64) * s_up
    torch.testing.assert_close(ours, xt, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_a_callback_does_not_change_the_samples(name: str) -> None:
    # A progress bar must not change what is sampled: the same path runs with or without
    # a callback, bit for bit, in float32 (where two paths would differ at rounding level).
    den = Gaussian(DISCRETE, *_data())
    noise = torch.randn(6, DIM, generator=torch.Generator().manual_seed(0))
    sampler = samplers.REGISTRY[name]()
    shown: list[torch.Tensor] = []

    def run(callback):
        g = torch.Generator().manual_seed(3)
        return sampler.sample(den, DISCRETE, noise, steps=7, generator=g, callback=callback)

    quiet = run(None)
    watched = run(lambda i, t, x, x0: shown.append(x0))
    assert torch.equal(quiet, watched)
    assert len(shown) == 7 and torch.equal(shown[-1], watched)
    # On a fused path the D shown is formed for the callback: it is the general loop's D.
    general: list[torch.Tensor] = []
    with mock.patch.object(_base, "_fusable", lambda plan: False):
        run(lambda i, t, x, x0: general.append(x0))
    torch.testing.assert_close(torch.stack(shown), torch.stack(general), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_denoiser_output_of_another_shape_is_a_shape_error(name: str, guidance: float) -> None:
    # (1, DIM) would broadcast against a batch of 3 and silently give wrong samples.
    inner = Gaussian(DISCRETE, *_data())

    def denoiser(x, t, cond=None):
        return inner(x, t, cond)[:1]

    denoiser.prediction = "epsilon"  # type: ignore[attr-defined]
    cond = dk.Conditioning(pooled=torch.ones(1, 3))
    uncond = dk.Conditioning(pooled=torch.zeros(1, 3))
    batch = "6" if guidance != 1.0 else "3"
    with pytest.raises(
        dk.ShapeError, match=rf"denoiser output is \(1, 4\) at step 0 .*\({batch}, 4\)"
    ):
        samplers.REGISTRY[name]().sample(
            denoiser,
            DISCRETE,
            torch.randn(3, DIM),
            steps=4,
            cond=cond,
            uncond=uncond if guidance != 1.0 else None,
            guidance=guidance,
            generator=torch.Generator().manual_seed(0),
        )


def test_schedule_returning_another_shape_is_a_shape_error() -> None:
    class Scalar:
        """A user schedule (not a diffkit one) whose alpha ignores the shape of t."""

        def alpha(self, t):
            return DISCRETE.alpha(t)[:1]

        def sigma(self, t):
            return DISCRETE.sigma(t)

        def log_snr(self, t):
            return DISCRETE.log_snr(t)

        def t_of_log_snr(self, log_snr):
            return DISCRETE.t_of_log_snr(log_snr)

    den = Gaussian(DISCRETE, *_data())
    with pytest.raises(dk.ShapeError, match=r"schedule.alpha returned \(1,\) for times of shape"):
        samplers.DDIM().sample(den, Scalar(), torch.randn(2, DIM), steps=4)


@pytest.mark.parametrize("name", NAMES)
def test_denoiser_answering_in_another_dtype_is_cast_to_the_working_dtype(name: str) -> None:
    inner = Gaussian(DISCRETE, *_data())

    def wide(x, t, cond=None):  # float64 values that float32 cannot hold exactly
        return inner(x.double(), t, cond)

    def cast(x, t, cond=None):
        return inner(x.double(), t, cond).float()

    wide.prediction = cast.prediction = "epsilon"  # type: ignore[attr-defined]
    noise = torch.randn(3, DIM, generator=torch.Generator().manual_seed(0))

    def run(denoiser):
        g = torch.Generator().manual_seed(1)
        return samplers.REGISTRY[name]().sample(denoiser, DISCRETE, noise, steps=5, generator=g)

    x = run(wide)
    assert x.dtype == torch.float32 and torch.equal(x, run(cast))


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v", "flow"])
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_prediction_coefficients_are_diffkit_predictions_own(prediction: str, seed: int) -> None:
    # The loop's x0 = cx x_t + cp pred is prediction.to_x0_eps, evaluated once on the grid.
    sampler = samplers.REGISTRY["ddim"]()
    grid = sampler.grid(DISCRETE, 9)
    g = torch.Generator().manual_seed(seed)
    x, pred = torch.randn(2, 9, DIM, generator=g, dtype=F64)
    den = Gaussian(DISCRETE, *_data(), prediction=prediction)
    model = _base._Model(den, grid, x[:1], None, 1.0, None)
    alpha = torch.tensor(grid.alpha[:-1], dtype=F64)
    sigma = torch.tensor(grid.sigma[:-1], dtype=F64)
    x0 = to_x0_eps(pred, prediction, x, alpha, sigma)[0]  # type: ignore[arg-type]
    cx = torch.tensor(model.cx_float, dtype=F64)[:, None]
    cp = torch.tensor(model.cp_float, dtype=F64)[:, None]
    torch.testing.assert_close(cx * x + cp * pred, x0, rtol=1e-12, atol=1e-12)


def test_unknown_prediction_type_is_named() -> None:
    den = Gaussian(DISCRETE, *_data(), prediction="eps")
    with pytest.raises(ValueError, match=r"denoiser.prediction must be one of .* got 'eps'"):
        samplers.DDIM().sample(den, DISCRETE, torch.randn(2, DIM), steps=3)


def test_a_plan_with_a_non_finite_coefficient_is_rejected_naming_the_step() -> None:
    class Broken(samplers.SamplerBase):
        spacing: samplers.AnySpacing = samplers.UniformTime()

        def plan(self, grid: samplers.Grid) -> list[samplers.Step]:
            good = samplers.DDIM().plan(grid)
            return [*good[:2], good[2]._replace(noise=math.nan), *good[3:]]

    den = Gaussian(DISCRETE, *_data())
    with pytest.raises(ValueError, match=r"step 2 of the sampler's plan has a non-finite"):
        Broken().sample(den, DISCRETE, torch.randn(2, DIM), steps=5)


def test_finite_outputs_whose_witnesses_overflow_together_are_not_an_error() -> None:
    # The after-loop check first adds up every evaluation's sum; when only that total
    # overflows (each sum is finite), nothing was NaN or inf and nothing is raised.
    class Huge:
        prediction = "x0"

        def __call__(self, x, t, cond=None):
            return torch.full_like(x, 1.5e38)

    noise = torch.randn(1, 2, generator=torch.Generator().manual_seed(0))
    x = samplers.DDIM().sample(Huge(), DISCRETE, noise, steps=4)
    assert torch.isfinite(x).all() and float(x.sum()) > 2e38


def _guided_call(guidance: float) -> dict:
    if guidance == 1.0:
        return {"cond": dk.Conditioning(pooled=torch.full((1, 3), 2.0))}
    return {
        "cond": dk.Conditioning(pooled=torch.full((1, 3), 2.0)),
        "uncond": dk.Conditioning(pooled=torch.zeros(1, 3)),
        "guidance": guidance,
    }


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("guidance", [1.0, 2.5])
@pytest.mark.parametrize("name", NAMES)
def test_fast_path_equals_the_reference_executor(name: str, guidance: float, dtype) -> None:
    # The fused, compiled loop against the thirty-line x = keep x + sum c D + noise z, on
    # the same plan, model and seeded generator (so the same noise draws).
    sampler = samplers.PRESETS[name]
    den = _Conditional()
    kwargs = _guided_call(guidance)
    noise = torch.randn(6, DIM, generator=torch.Generator().manual_seed(0), dtype=dtype)
    fast = sampler.sample(
        den, DISCRETE, noise, steps=7, generator=torch.Generator().manual_seed(3), **kwargs
    )
    plan = sampler.prepare(DISCRETE, 7)
    args = (kwargs["cond"], guidance, kwargs.get("uncond"))
    model = _base._Model(den, plan.grid, noise, *args, _base._off_grid(plan))
    x = noise.to(model.dtype) * plan.grid.sigma[0]
    g = torch.Generator().manual_seed(3)
    if isinstance(sampler, samplers.StepSampler):
        # Its step is the reference: one path, the same arithmetic, bit for bit.
        assert torch.equal(fast, sampler._run(plan, model, x, g, None).to(dtype))
        return
    reference = _base.run_reference(plan.steps, model, x, g).to(dtype)
    if not _base._fusable(plan.steps) and not any(step.noise for step in plan.steps):
        # The general loop, noise-free: the same operations in the same order.
        assert torch.equal(fast, reference)
    tol = 1e-10 if dtype == F64 else 1e-5
    torch.testing.assert_close(fast, reference, rtol=tol, atol=tol)


def test_reference_and_fast_path_are_bit_identical_where_the_arithmetic_is() -> None:
    # A plan with no fusion, no noise and a single estimate per step (DDIM forced onto
    # the general loop) runs the same operations in the same order on both paths.
    den = Gaussian(DISCRETE, *_data())
    noise = torch.randn(6, DIM, generator=torch.Generator().manual_seed(0), dtype=F64)
    plan = samplers.DDIM().prepare(DISCRETE, 7)
    x = noise * plan.grid.sigma[0]
    model = _base._Model(den, plan.grid, noise, None, 1.0, None)
    with mock.patch.object(_base, "_fusable", lambda plan: False):
        fast = _base.run_plan(plan.steps, model, x, None, None)
    reference = _base.run_reference(plan.steps, model, x, None)
    assert torch.equal(fast, reference)


@pytest.mark.parametrize("name", NAMES)
def test_a_prepared_plan_reused_across_calls_and_threads_gives_the_same_samples(
    name: str,
) -> None:
    sampler = samplers.PRESETS[name]
    mean, std = _data()
    plan = sampler.prepare(DISCRETE, 6)
    assert isinstance(plan, samplers.Plan) and plan.grid.steps == 6 and plan.sampler == sampler
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.steps = ()  # type: ignore[misc]
    noises = [torch.randn(8, DIM, generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def run(i: int, reuse: bool) -> torch.Tensor:
        den = Gaussian(DISCRETE, mean, std)
        g = torch.Generator().manual_seed(i)
        kwargs = {"plan": plan} if reuse else {}
        return sampler.sample(den, DISCRETE, noises[i], steps=6, generator=g, **kwargs)

    fresh = [run(i, reuse=False) for i in range(4)]
    assert all(torch.equal(run(i, reuse=True), fresh[i]) for i in range(4))
    results: list[torch.Tensor | None] = [None] * 4

    def worker(i: int) -> None:
        for _ in range(3):
            results[i] = run(i, reuse=True)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for seq, par in zip(fresh, results):
        assert par is not None and torch.equal(seq, par)
    assert sampler.prepare(DISCRETE, 6) == plan  # nothing in it changed


def test_a_plan_for_other_steps_or_another_sampler_is_refused_by_name() -> None:
    den = Gaussian(DISCRETE, *_data())
    noise = torch.randn(2, DIM)
    plan = samplers.DDIM().prepare(DISCRETE, 5)
    with pytest.raises(ValueError, match=r"prepared for steps=5, but sample was called with"):
        samplers.DDIM().sample(den, DISCRETE, noise, steps=6, plan=plan)
    with pytest.raises(ValueError, match="not by this sampler"):
        samplers.Euler().sample(den, DISCRETE, noise, steps=5, plan=plan)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        samplers.DDIM().prepare(DISCRETE, 0)


def test_a_step_sampler_has_no_linear_plan_but_a_grid_and_points() -> None:
    sampler = samplers.DPMSolver2()
    plan = sampler.prepare(DISCRETE, 4)
    assert plan.steps == () and len(plan.points) == 4
    assert [len(p) for p in plan.points] == [1, 1, 1, 0]  # no midpoint onto the data
    for i, (mid,) in enumerate(plan.points[:3]):
        # half way in log-SNR, where the schedule puts it
        assert mid.lam == pytest.approx((plan.grid.lam[i] + plan.grid.lam[i + 1]) / 2, rel=1e-6)
        assert plan.grid.t[i] > mid.t > plan.grid.t[i + 1]
    with pytest.raises(TypeError, match="StepSampler"):
        sampler.plan(plan.grid)


def test_a_user_step_sampler_reads_its_history() -> None:
    # A two-step Adams-Bashforth-like extrapolation of D: not a preset, written as code.
    class Extrapolating(samplers.StepSampler):
        memory = 2
        spacing: samplers.AnySpacing = samplers.LogSNR()

        def step(self, model, x, i, grid, history, generator):
            d = history[0] if len(history) == 1 else 1.5 * history[0] - 0.5 * history[1]
            keep = grid.sigma[i + 1] / grid.sigma[i]
            seen.append(len(history))
            return x * keep + d * (grid.alpha[i + 1] - keep * grid.alpha[i])

    seen: list[int] = []
    den = Gaussian(DISCRETE, *_data())
    noise = torch.randn(64, DIM, generator=torch.Generator().manual_seed(1), dtype=F64)
    x = Extrapolating().sample(den, DISCRETE, noise, steps=30)
    assert seen == [1] + [2] * 29
    exact = den.flow_map(noise, Extrapolating().grid(DISCRETE, 30))
    assert float((x - exact).abs().max()) < 0.05


# --------------------------------------------------------------------------------------
# PNDM / PLMS
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_plms_weights_integrate_polynomials_of_degree_below_p_on_equal_steps(p: int) -> None:
    # Adams-Bashforth: sum_j w_j f(-j) = int_0^1 f(u) du for f a polynomial of degree < p
    weights = samplers.pndm.plms_weights(p)
    for k in range(p):
        planned = sum(w * (-j) ** k for j, w in enumerate(weights))
        assert planned == pytest.approx(1 / (k + 1), rel=1e-12)


@pytest.mark.parametrize("warmup", ["plms", "prk"])
def test_pndm_warmups_call_the_model_as_diffusers_does(warmup: str) -> None:
    # plms: a trapezoid first step (one extra call); prk: three Runge-Kutta steps of four
    # calls through the time midpoint, then one call per step.
    sampler = samplers.PNDM(warmup=warmup, spacing=samplers.Leading(steps_offset=1))
    den = Gaussian(DISCRETE, *_data())
    times: list[float] = []

    def model(x, t, cond=None):
        times.append(round(float(t[0]) * 1000) - 1)  # the training index
        return den(x, t)

    model.prediction = "epsilon"  # type: ignore[attr-defined]
    sampler.sample(model, DISCRETE, torch.randn(2, DIM, dtype=F64), steps=10)
    if warmup == "plms":
        assert times == [901, 801, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    else:  # diffusers' prk_timesteps, then its plms_timesteps
        rk = [901, 851, 851, 801, 801, 751, 751, 701, 701, 651, 651, 601]
        assert times == [*rk, 601, 501, 401, 301, 201, 101, 1]
    plan = sampler.prepare(DISCRETE, 10)
    assert [len(p) for p in plan.points] == ([1, 1, 1] if warmup == "prk" else [0] * 3) + [0] * 7


@pytest.mark.parametrize("combine", ["epsilon", "v"])
def test_pndm_from_pure_noise_takes_a_first_order_step_and_converges(combine: str) -> None:
    schedule = RectifiedFlow()
    den = Gaussian(schedule, *_data(), "flow")
    noise = torch.randn(64, DIM, generator=torch.Generator().manual_seed(1), dtype=F64)
    for warmup in ("plms", "prk"):
        sampler = samplers.PNDM(warmup=warmup, combine=combine)
        errors = []
        for steps in (10, 40):
            x = sampler.sample(den, schedule, noise, steps=steps)
            exact = den.flow_map(noise, sampler.grid(schedule, steps))
            errors.append(float((x - exact).abs().max()))
        if combine == "v":  # diffusers' velocity combination is first order (pndm.py)
            assert errors[1] < errors[0] / 3, (warmup, errors)
        else:
            assert errors[1] < errors[0] / 4 and errors[1] < 0.05, (warmup, errors)


# --------------------------------------------------------------------------------------
# EDM's stochastic sampler (churn)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_edm_without_churn_is_the_deterministic_euler_or_heun(solver: str) -> None:
    den = Gaussian(DISCRETE, *_data())
    noise = torch.randn(16, DIM, generator=torch.Generator().manual_seed(1), dtype=F64)
    churnless = samplers.EDMStochastic(solver=solver, s_churn=0.0)
    plain = samplers.Euler() if solver == "euler" else samplers.Heun()
    ours = churnless.sample(den, DISCRETE, noise, steps=9, generator=torch.Generator())
    torch.testing.assert_close(ours, plain.sample(den, DISCRETE, noise, steps=9))
    assert all(not p for p in churnless.prepare(DISCRETE, 9).points)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_edm_churn_evaluates_at_the_churned_level_instead_of_the_grid_point(solver: str) -> None:
    # k-diffusion's NFE: one model call per step (two for Heun, not onto the data), the
    # churned steps at s^ = (1 + gamma) s, where gamma = min(s_churn / N, sqrt(2) - 1).
    schedule = EDM(sigma_min=1e-3, sigma_max=100.0)
    den = Gaussian(schedule, *_data())
    sampler = samplers.EDMStochastic(solver=solver, s_churn=2.0, s_tmin=0.1, s_tmax=10.0)
    seen: list[float] = []

    def model(x, t, cond=None):
        seen.append(float(schedule.sigma(t[:1].double())))
        return den(x, t)

    model.prediction = "epsilon"  # type: ignore[attr-defined]
    steps = 8
    grid = sampler.grid(schedule, steps)
    noise = torch.randn(4, DIM, dtype=F64)
    sampler.sample(model, schedule, noise, steps=steps, generator=torch.Generator())
    s = [sg / a for sg, a in zip(grid.sigma, grid.alpha)]
    expected: list[float] = []
    for i in range(steps):
        churned = 0.1 <= s[i] <= 10.0
        expected.append(s[i] * (1 + 2.0 / steps) if churned else s[i])
        if solver == "heun" and i < steps - 1:
            expected.append(s[i + 1])
    assert any(0.1 <= v <= 10.0 for v in s) and any(v > 10.0 for v in s)
    assert seen == pytest.approx(expected, rel=1e-9)


def test_edm_churn_beyond_the_schedule_is_refused_naming_s_tmax() -> None:
    schedule = EDM(sigma_min=1e-3, sigma_max=80.0)  # the grid starts at 80: no room above
    sampler = samplers.EDMStochastic(s_tmax=None)
    with pytest.raises(ValueError, match="s_tmax"):
        sampler.sample(Gaussian(schedule, *_data()), schedule, torch.randn(2, DIM), steps=5)
    with pytest.raises(ValueError, match="s_tmax"):
        samplers.EDMStochastic(s_tmin=1.0, s_tmax=0.5)
    with pytest.raises(ValueError, match="s_churn"):
        samplers.EDMStochastic(s_churn=-1.0)


def test_edm_stochastic_samples_have_the_data_distribution() -> None:
    # The churned SDE keeps the marginals: the samples' moments match the Gaussian data.
    mean, std = _data(3)
    den = Gaussian(DISCRETE, mean, std)
    noise = torch.randn(4000, DIM, generator=torch.Generator().manual_seed(0), dtype=F64)
    sampler = samplers.EDMStochastic(s_churn=20.0, s_tmin=0.01, s_tmax=None)
    sampler = sampler.model_copy(update={"spacing": samplers.Karras(sigma_max=100.0)})
    x = sampler.sample(den, DISCRETE, noise, steps=40, generator=torch.Generator().manual_seed(1))
    tol = 4 * std / math.sqrt(4000) + 0.02 * std + 1e-3
    assert ((x.mean(0) - mean).abs() < tol).all(), (x.mean(0), mean)
    assert ((x.std(0) - std).abs() < 2 * tol).all(), (x.std(0), std)


# --------------------------------------------------------------------------------------
# LCM (multistep consistency sampling)
# --------------------------------------------------------------------------------------


def test_consistency_scalings_meet_the_boundary_condition() -> None:
    # f(x, tau = 0) = x: c_skip = 1, c_out = 0; far from it f is the data estimate.
    from diffkit.samplers.lcm import consistency_scalings

    assert consistency_scalings(0.0, 0.5) == (1.0, 0.0)
    assert consistency_scalings(0.0, 1e-300) == (1.0, 0.0)  # no 0 / 0 for a tiny sigma_data
    assert consistency_scalings(1e4, 1e300) == (1.0, 1e-296)  # no overflow in u² + sigma²
    c_skip, c_out = consistency_scalings(9990.0, 0.5)
    assert c_skip == pytest.approx(0.25 / 9990.0**2) and c_out == pytest.approx(1.0, abs=1e-8)
    for u in (0.1, 1.0, 7.0):  # c_skip + c_out² = 1 (unit-variance data at sigma_data)
        c_skip, c_out = consistency_scalings(u, 1.0)
        assert c_skip + c_out**2 == pytest.approx(1.0)


def test_lcm_step_renoises_the_consistency_estimate_with_the_generators_draws() -> None:
    den = Gaussian(DISCRETE, *_data())
    noise = torch.randn(8, DIM, generator=torch.Generator().manual_seed(0), dtype=F64)
    sampler = samplers.LCM()
    grid = sampler.grid(DISCRETE, 3)
    g = torch.Generator().manual_seed(2)
    x = noise * grid.sigma[0]
    for i in range(3):  # written out: f = c_skip x + c_out D, then re-noised
        tau = grid.t[i] * 1000 - 1
        u2 = (10 * tau) ** 2
        t = torch.full((8,), grid.t[i], dtype=F64)
        d = den.x0(x, t)[0]
        f = 0.25 / (u2 + 0.25) * x + (10 * tau) / math.sqrt(u2 + 0.25) * d
        z = torch.randn(x.shape, generator=g, dtype=F64) if i < 2 else 0.0
        x = grid.alpha[i + 1] * f + grid.sigma[i + 1] * z
    ours = sampler.sample(den, DISCRETE, noise, steps=3, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ours, x, rtol=1e-12, atol=1e-12)


def test_lcm_spacing_refuses_more_steps_than_its_original_grid_and_off_grid_starts() -> None:
    spacing = samplers.LCMSpacing(original_steps=8)
    assert len(spacing(DISCRETE, 8)) == 9
    with pytest.raises(ValueError, match="original_steps=8"):
        spacing(DISCRETE, 9)
    with pytest.raises(ValueError, match="original_steps"):
        samplers.LCMSpacing(original_steps=2000)
    with pytest.raises(ValueError, match="strength"):
        samplers.LCMSpacing(strength=0.01)
    started = samplers.LCMSpacing().starting_at(0.62)
    assert float(started(DISCRETE, 4)[0]) == 0.62
    with pytest.raises(ValueError, match="t_start"):
        samplers.LCMSpacing().starting_at(0.61)


# Configurations that are not presets, checked for what every preset is checked for.
VARIANTS = {
    "pndm_prk": samplers.PNDM(warmup="prk", spacing=samplers.Leading(steps_offset=1)),
    "pndm_v": samplers.PNDM(combine="v"),
    "edm_euler": samplers.EDMStochastic(solver="euler", s_churn=3.0, s_tmin=0.0),
    "lcm_strength": samplers.LCM(spacing=samplers.LCMSpacing(strength=0.6)),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variants_keep_no_state_make_no_host_sync_and_serve_threads(name: str) -> None:
    sampler = VARIANTS[name]
    assert samplers.SAMPLERS.parse(sampler.to_json()) == sampler
    mean, std = _data()
    steps = 7
    plan = sampler.prepare(DISCRETE, steps)
    noises = [torch.randn(8, DIM, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    def run(i: int, **kw) -> torch.Tensor:
        den = Gaussian(DISCRETE, mean, std)
        g = torch.Generator().manual_seed(i)
        return sampler.sample(den, DISCRETE, noises[i], steps=steps, generator=g, **kw)

    fresh = [run(i) for i in range(3)]
    assert all(torch.isfinite(x).all() for x in fresh)
    results: list[torch.Tensor | None] = [None] * 3
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, run(i, plan=plan)))
        for i in range(3)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(r is not None and torch.equal(r, f) for r, f in zip(results, fresh))
    # no host sync between the first and the last denoiser call
    inner, recorder, calls = Gaussian(DISCRETE, mean, std), _RecordSyncs(), 0
    expected = _evaluations(sampler, steps)

    def denoiser(x, t, cond=None):
        nonlocal calls
        calls += 1
        recorder.in_loop = False
        out = inner(x, t, cond)
        recorder.in_loop = calls < expected
        return out

    denoiser.prediction = "epsilon"  # type: ignore[attr-defined]
    with recorder:
        sampler.sample(denoiser, DISCRETE, noises[0], steps=steps, generator=torch.Generator())
    assert calls == expected and recorder.syncs == []
    # guidance: one batched call on cond and uncond
    model = _Conditional()
    cond, uncond = (
        dk.Conditioning(pooled=torch.full((1, 3), 2.0)),
        dk.Conditioning(pooled=torch.zeros(1, 3)),
    )
    g = torch.Generator().manual_seed(0)
    sampler.sample(
        model, DISCRETE, noises[0], steps=steps, cond=cond, uncond=uncond, guidance=3.0, generator=g
    )
    assert set(model.calls) == {16}


def test_t_end_above_the_spacings_last_time_is_refused_by_field() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="t_end"):
        samplers.DDIM(t_end=0.5)  # UniformTime's last evaluation is at t_min = 1e-3
    with pytest.raises(ValidationError, match="t_end"):
        samplers.Euler(t_end=1e-3, spacing=samplers.UniformTime(trailing=True))
    sampler = samplers.DPMSolverPP(t_end=1e-3)  # at t_min: a last step of zero length
    plan = sampler.prepare(dk.schedules.Cosine(), 5)
    assert plan.grid.t[-1] == plan.grid.t[-2] == 1e-3
    assert plan.steps[-1] == samplers.Step(keep=1.0, data=(0.0,))  # the identity
