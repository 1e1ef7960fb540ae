"""diffkit's samplers reproduce k-diffusion's sampling functions on the same grids."""

import pytest
import torch

from diffkit import samplers
from diffkit.schedules import EDM, Discrete, discrete_betas

pytestmark = pytest.mark.parity
ks = pytest.importorskip("k_diffusion.sampling")

F64 = torch.float64
SCHEDULE = Discrete.from_betas(discrete_betas("linear_beta", 1000))
WEIGHT = torch.randn(5, 5, generator=torch.Generator().manual_seed(0), dtype=F64) / 5**0.5


def denoised(x_tilde: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """A smooth data prediction D(x / alpha, sigma / alpha) that both libraries call."""
    return torch.tanh(x_tilde @ WEIGHT) / (1 + ratio.reshape(-1, 1))


class Model:
    prediction = "x0"

    def __call__(self, x, t, cond=None):
        a, s = SCHEDULE.alpha(t.to(F64)), SCHEDULE.sigma(t.to(F64))
        return denoised(x.to(F64) / a[:, None], s / a).to(x.dtype)


def _kd_model(x, sigma, **_):
    return denoised(x.to(F64), sigma.to(F64).expand(x.shape[0])).to(x.dtype)


CASES = {
    "euler/karras": (
        ks.sample_euler,
        ks.get_sigmas_karras,
        lambda spacing: samplers.Euler(spacing=spacing),
        samplers.Karras(),
    ),
    "heun/karras": (
        ks.sample_heun,
        ks.get_sigmas_karras,
        lambda spacing: samplers.Heun(spacing=spacing),
        samplers.Karras(),
    ),
    "dpm_2/karras": (
        ks.sample_dpm_2,
        ks.get_sigmas_karras,
        lambda spacing: samplers.DPMSolver2(spacing=spacing),
        samplers.Karras(),
    ),
    "dpm_2/exponential": (
        ks.sample_dpm_2,
        ks.get_sigmas_exponential,
        lambda spacing: samplers.DPMSolver2(spacing=spacing),
        samplers.LogSNR(),
    ),
    "dpmpp_2m/exponential": (
        ks.sample_dpmpp_2m,
        ks.get_sigmas_exponential,
        lambda spacing: samplers.DPMSolverPP(order=2, spacing=spacing),
        samplers.LogSNR(),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_sampler_matches_kdiffusion(name: str) -> None:
    kd_sampler, kd_sigmas, make, spacing = CASES[name]
    steps = 8
    ac = torch.tensor(SCHEDULE.alphas_cumprod, dtype=F64)
    ratios = ((1 - ac) / ac).sqrt()
    sigmas = kd_sigmas(steps, float(ratios[0]), float(ratios[-1])).to(F64)
    noise = torch.randn(4, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    reference = kd_sampler(_kd_model, noise * sigmas[0], sigmas, disable=True)
    sampler = make(spacing)
    grid = sampler.grid(SCHEDULE, steps)
    ours_ratios = torch.tensor(grid.sigma, dtype=F64) / torch.tensor(grid.alpha, dtype=F64)
    torch.testing.assert_close(ours_ratios, sigmas, rtol=1e-5, atol=0)
    ours = sampler.sample(Model(), SCHEDULE, noise, steps=steps)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("batch", [4, 8])  # 8 x 5 values: torch's vectorised normal_
def test_dpmpp_2s_ancestral_matches_kdiffusion_with_the_same_noise(eta: float, batch: int) -> None:
    steps = 8
    ac = torch.tensor(SCHEDULE.alphas_cumprod, dtype=F64)
    ratios = ((1 - ac) / ac).sqrt()
    sigmas = ks.get_sigmas_karras(steps, float(ratios[0]), float(ratios[-1])).to(F64)
    noise = torch.randn(batch, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    g = torch.Generator().manual_seed(5)

    def draws(sigma, sigma_next):
        return torch.empty_like(noise).normal_(generator=g)

    reference = ks.sample_dpmpp_2s_ancestral(
        _kd_model, noise * sigmas[0], sigmas, eta=eta, noise_sampler=draws, disable=True
    )
    sampler = samplers.DPMSolverPP2SAncestral(eta=eta, spacing=samplers.Karras())
    ours = sampler.sample(
        Model(), SCHEDULE, noise, steps=steps, generator=torch.Generator().manual_seed(5)
    )
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------
# Every k-diffusion sampler, float64, on k-diffusion's own sigmas, with the same draws
# --------------------------------------------------------------------------------------

EDM_SCHEDULE = EDM(sigma_min=1e-3, sigma_max=100.0)  # alpha = 1: x~ = x, s = sigma


class EDMModel:
    prediction = "x0"

    def __call__(self, x, t, cond=None):
        return denoised(x, EDM_SCHEDULE.sigma(t.to(F64)))


# k-diffusion name -> (its function, its keyword arguments, the diffkit sampler, noise)
# noise: None (deterministic), "gaussian" (a noise_sampler drawing from a generator) or
# "tree" (k-diffusion's BrownianTreeNoiseSampler seeded as diffkit seeds its own).
KDIFFUSION = {
    "euler": (ks.sample_euler, {}, samplers.Euler(), None),
    "euler_ancestral": (ks.sample_euler_ancestral, {}, samplers.EulerAncestral(), "gaussian"),
    "heun": (ks.sample_heun, {}, samplers.Heun(), None),
    "dpm_2": (ks.sample_dpm_2, {}, samplers.DPMSolver2(), None),
    "dpm_2_ancestral": (ks.sample_dpm_2_ancestral, {}, samplers.DPMSolver2(eta=1.0), "gaussian"),
    "lms": (ks.sample_lms, {}, samplers.LMS(), None),
    "dpmpp_2s_ancestral": (
        ks.sample_dpmpp_2s_ancestral,
        {},
        samplers.DPMSolverPP2SAncestral(),
        "gaussian",
    ),
    "dpmpp_sde": (ks.sample_dpmpp_sde, {}, samplers.DPMSolverPPSDE(), "tree"),
    "dpmpp_2m": (ks.sample_dpmpp_2m, {}, samplers.DPMSolverPP(order=2), None),
    "dpmpp_2m_sde": (
        ks.sample_dpmpp_2m_sde,
        {},
        samplers.DPMSolverPP(order=2, eta=1.0),
        "gaussian",
    ),
    "dpmpp_2m_sde_heun": (
        ks.sample_dpmpp_2m_sde,
        {"solver_type": "heun"},
        samplers.DPMSolverPP(order=2, eta=1.0, solver_type="heun"),
        "gaussian",
    ),
    "dpmpp_3m_sde": (
        ks.sample_dpmpp_3m_sde,
        {},
        samplers.DPMSolverPP(order=3, eta=1.0, solver_type="heun", lower_order_final=False),
        "gaussian",
    ),
}


@pytest.mark.parametrize("spacing", ["karras", "exponential"])
@pytest.mark.parametrize("name", sorted(KDIFFUSION))
def test_every_kdiffusion_sampler_is_matched_in_float64(name: str, spacing: str) -> None:
    kd_sampler, kwargs, sampler, noise_kind = KDIFFUSION[name]
    steps, batch = 7, 8  # 8 x 5 values: torch's vectorised normal_
    make_sigmas = ks.get_sigmas_karras if spacing == "karras" else ks.get_sigmas_exponential
    sigmas = make_sigmas(steps, 0.01, 80.0).to(F64)
    times = EDM_SCHEDULE.t_of_log_snr(-2 * sigmas[:-1].log())
    sampler = sampler.model_copy(update={"spacing": samplers.Explicit(times=times.tolist())})
    noise = torch.randn(batch, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    x_T = noise * sigmas[0]
    if noise_kind == "gaussian":
        draws = torch.Generator().manual_seed(5)
        kwargs = {
            **kwargs,
            "noise_sampler": lambda *_: torch.randn(x_T.shape, generator=draws, dtype=F64),
        }
    elif noise_kind == "tree":
        seed = int(torch.randint(0, 2**63 - 1, (), generator=torch.Generator().manual_seed(5)))
        tree = ks.BrownianTreeNoiseSampler(x_T, sigmas[-2], sigmas[0], seed)  # its default ends
        kwargs = {**kwargs, "noise_sampler": tree}
    reference = kd_sampler(_kd_model, x_T, sigmas, disable=True, **kwargs)
    g = torch.Generator().manual_seed(5)
    ours = sampler.sample(EDMModel(), EDM_SCHEDULE, noise, steps=steps, generator=g)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)


# EDM's churn: a schedule reaching above k-diffusion's sigma_max = 80, so that the churned
# first level (up to 80 sqrt(2)) exists on it; k-diffusion draws from torch's global
# generator, diffkit from the one it is given, seeded alike.
WIDE_EDM = EDM(sigma_min=1e-3, sigma_max=200.0)


class WideEDMModel:
    prediction = "x0"

    def __call__(self, x, t, cond=None):
        return denoised(x, WIDE_EDM.sigma(t.to(F64)))


CHURN = {  # (s_churn, s_tmin, s_tmax, s_noise): EDM's ImageNet-64, everywhere, a band
    "edm": (40.0, 0.05, 50.0, 1.003),
    "all": (3.0, 0.0, None, 1.0),
    "band": (80.0, 0.5, 5.0, 1.007),
}


@pytest.mark.parametrize("churn", sorted(CHURN))
@pytest.mark.parametrize("spacing", ["karras", "exponential"])
@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_edm_churn_matches_kdiffusion_in_float64(solver: str, spacing: str, churn: str) -> None:
    s_churn, s_tmin, s_tmax, s_noise = CHURN[churn]
    steps = 7
    make_sigmas = ks.get_sigmas_karras if spacing == "karras" else ks.get_sigmas_exponential
    sigmas = make_sigmas(steps, 0.01, 80.0).to(F64)
    times = WIDE_EDM.t_of_log_snr(-2 * sigmas[:-1].log())
    sampler = samplers.EDMStochastic(
        solver=solver,
        s_churn=s_churn,
        s_tmin=s_tmin,
        s_tmax=s_tmax,
        s_noise=s_noise,
        spacing=samplers.Explicit(times=times.tolist()),
    )
    assert any(sampler.prepare(WIDE_EDM, steps).points)  # some steps churn
    noise = torch.randn(8, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    kd_sampler = ks.sample_euler if solver == "euler" else ks.sample_heun
    with torch.random.fork_rng():
        torch.manual_seed(5)
        reference = kd_sampler(
            _kd_model,
            noise * sigmas[0],
            sigmas,
            disable=True,
            s_churn=s_churn,
            s_tmin=s_tmin,
            s_tmax=float("inf") if s_tmax is None else s_tmax,
            s_noise=s_noise,
        )
    g = torch.Generator().manual_seed(5)
    ours = sampler.sample(WideEDMModel(), WIDE_EDM, noise, steps=steps, generator=g)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)
