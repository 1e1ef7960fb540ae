"""DPM-Solver-2 (Lu et al., 2022) in Karras et al.'s (EDM) form: a midpoint method.

In the EDM variables ``x~ = x / alpha`` and ``s = sigma / alpha`` (k-diffusion's ``x``
and ``sigma``), step ``i`` takes an Euler step to the midpoint ``s_m = sqrt(s_i s_{i+1})``
(half way in log-SNR), evaluates the denoiser there, and takes the whole step with the
midpoint's slope:

    x~_m     = x~_i + (s_m - s_i) (x~_i - D_i) / s_i
    x~_{i+1} = x~_i + (s_{i+1} - s_i) (x~_m - D(x~_m, s_m)) / s_m

(2 NFE per step; k-diffusion's ``sample_dpm_2`` without churn). The step onto the data
(``s_{i+1} = 0``) and one from pure noise (``s_i = inf``) are Euler steps. The midpoint
is not a grid point, and the step is a Runge-Kutta stage rather than a combination of
past estimates, so it is written as a [`StepSampler`][diffkit.samplers.StepSampler].
"""

import math
from typing import Literal

from pydantic import Field
from torch import Tensor

from diffkit.samplers._base import SAMPLERS, Grid
from diffkit.samplers.spacing import SPACING, AnySpacing, Karras
from diffkit.samplers.stepping import History, Rng, StepModel, StepSampler

__all__ = ["DPMSolver2"]


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
