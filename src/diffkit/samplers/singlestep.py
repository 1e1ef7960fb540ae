"""Single-step second-order DPM solvers, with a model evaluation half way in log-SNR.

Both work in the EDM variables ``x~ = x / alpha`` and ``s = sigma / alpha`` (k-diffusion's
``x`` and ``sigma``), with ``lambda = -log s`` the half log-SNR, and evaluate the
denoiser at a midpoint that is not a grid point; the step is a Runge-Kutta stage rather
than a combination of past estimates, so each is a
[`StepSampler`][diffkit.samplers.StepSampler].

DPM-Solver-2 (Lu et al., 2022, in Karras et al.'s form; k-diffusion's ``sample_dpm_2``
without churn) takes an Euler step to the midpoint ``s_m = sqrt(s_i s_{i+1})`` and the
whole step with the midpoint's slope:

    x~_m     = x~_i + (s_m - s_i) (x~_i - D_i) / s_i
    x~_{i+1} = x~_i + (s_{i+1} - s_i) (x~_m - D(x~_m, s_m)) / s_m

DPM-Solver++(2S) ancestral (Lu et al., 2022b; k-diffusion's
``sample_dpmpp_2s_ancestral``) splits ``s_{i+1}`` into ``s_down`` and fresh noise
``s_up`` as Euler-ancestral does (``eta`` scales the noise), takes the data-prediction
exponential-integrator step to ``s_down`` through its midpoint
``lambda_m = (lambda_i + lambda_down) / 2``, ``h = lambda_down - lambda_i``:

    x~_m    = e^{-h/2} x~_i - (e^{-h/2} - 1) D_i
    x~_down = e^{-h} x~_i - (e^{-h} - 1) D(x~_m, s_m)
    x~_{i+1} = x~_down + s_up z

Both take 2 NFE per step. A step onto the data (``s_{i+1} = 0``) or from pure noise
(``s_i = inf``) is an Euler step (to ``s_down``, plus the noise).
"""

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from diffkit.samplers._base import SAMPLERS, Grid
from diffkit.samplers.spacing import SPACING, AnySpacing, Karras
from diffkit.samplers.stepping import History, Rng, StepModel, StepSampler

__all__ = ["DPMSolver2", "DPMSolverPP2SAncestral"]


@SAMPLERS.register
class DPMSolver2(StepSampler):
    """DPM-Solver-2: a midpoint step in log-SNR (2 NFE per step, 1 onto the data)."""

    kind: Literal["dpm_2"] = "dpm_2"
    spacing: AnySpacing = Field(default_factory=Karras, description=SPACING)

    def points(self, grid: Grid, i: int) -> tuple[float, ...]:
        """The midpoint in half log-SNR, for every step between finite noise levels."""
        if not math.isfinite(grid.h(i)):
            return ()
        return ((grid.lam[i] + grid.lam[i + 1]) / 2,)

    def step(
        self, model: StepModel, x: Tensor, i: int, grid: Grid, history: History, generator: Rng
    ) -> Tensor:
        """The midpoint step from grid point ``i`` to ``i + 1``."""
        d = history[0]
        a0, a1 = grid.alpha[i], grid.alpha[i + 1]
        if not model.points[i]:  # onto the data, or from pure noise: Euler
            keep = grid.sigma[i + 1] / grid.sigma[i]
            return x * keep + d * (a1 - keep * a0)
        mid = model.points[i][0]
        s0, s_m, s1 = grid.sigma[i] / a0, mid.sigma / mid.alpha, grid.sigma[i + 1] / a1
        x_t = x / a0
        x_m = x_t + (x_t - d) * ((s_m - s0) / s0)
        d_m = model.at(x_m * mid.alpha, i)
        return (x_t + (x_m - d_m) * ((s1 - s0) / s_m)) * a1


@SAMPLERS.register
class DPMSolverPP2SAncestral(StepSampler):
    """DPM-Solver++(2S) ancestral: a midpoint step to ``s_down``, then ``s_up`` fresh noise."""

    kind: Literal["dpmpp_2s_ancestral"] = "dpmpp_2s_ancestral"
    eta: float = Field(default=1.0, ge=0, description="share of each step's noise re-drawn")
    spacing: AnySpacing = Field(default_factory=Karras, description=SPACING)

    def _split(self, grid: Grid, i: int) -> tuple[float, float]:
        """``(s_up, s_down) / s_{i+1}``: the fresh noise and the deterministic target."""
        rho = grid.ratio(i)
        up = min(1.0, self.eta * math.sqrt(1 - rho * rho))
        return up, math.sqrt(1 - up * up)

    def points(self, grid: Grid, i: int) -> tuple[float, ...]:
        """Half way in log-SNR from point ``i`` to ``s_down``, where that is finite."""
        down = self._split(grid, i)[1]
        if not math.isfinite(grid.h(i)) or down == 0.0:
            return ()
        return ((grid.lam[i] + grid.lam[i + 1] - math.log(down)) / 2,)

    def step(
        self, model: StepModel, x: Tensor, i: int, grid: Grid, history: History, generator: Rng
    ) -> Tensor:
        """The 2S step from grid point ``i`` to ``s_down``, plus the noise to ``s_{i+1}``."""
        d = history[0]
        up, down = self._split(grid, i)
        a1, s1 = grid.alpha[i + 1], grid.sigma[i + 1] / grid.alpha[i + 1]
        if not model.points[i]:  # Euler to s_down, in x (alpha_i may be 0)
            to_down = down * grid.ratio(i)  # s_down / s_i
            x_t = x * (s1 * down / grid.sigma[i]) + d * (1 - to_down)
        else:
            h = grid.h(i) - math.log(down)  # lambda_down - lambda_i
            mid, x_t = model.points[i][0], x / grid.alpha[i]
            x_m = x_t * math.exp(-h / 2) - d * math.expm1(-h / 2)
            d_m = model.at(x_m * mid.alpha, i)
            x_t = x_t * math.exp(-h) - d_m * math.expm1(-h)
        if up * s1 > 0:
            x_t = x_t + torch.empty_like(x_t).normal_(generator=generator) * (up * s1)
        return x_t * a1
