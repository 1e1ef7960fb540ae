"""diffkit's samplers reproduce k-diffusion's sampling functions on the same grids."""

import pytest
import torch

from diffkit import samplers
from diffkit.schedules import Discrete, discrete_betas

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
    ac = SCHEDULE.alphas_cumprod
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
    ac = SCHEDULE.alphas_cumprod
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
