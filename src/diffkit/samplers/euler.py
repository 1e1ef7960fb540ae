"""Euler, Euler-ancestral and Heun in Karras et al.'s (EDM) ODE form.

The probability-flow ODE in ``x~ = x / alpha`` and ``s = sigma / alpha`` is
``d x~ / d s = (x~ - D) / s`` for every schedule. One step from ``s_i`` to ``s_{i+1}``
with ``rho = s_{i+1} / s_i = exp(-h)``:

- Euler: ``x~_{i+1} = rho x~_i + (1 - rho) D_i``;
- Heun: Euler to ``x~'``, evaluate ``D' = D(x~', s_{i+1})``, then the trapezoid rule
  ``x~_{i+1} = x~_i + (s_{i+1} - s_i) (d_i + d') / 2`` with ``d = (x~ - D) / s`` (2 NFE per
  step; the step onto the data is an Euler step);
- Euler-ancestral: step to ``s_down`` and add ``s_up`` of fresh noise,
  ``s_up = min(s_{i+1}, eta s_{i+1} sqrt(1 - rho²))``, ``s_down = sqrt(s_{i+1}² - s_up²)``.

Back in ``x = alpha x~`` the coefficient of ``x_i`` is ``alpha_{i+1} rho / alpha_i =
sigma_{i+1} / sigma_i``, which stays finite when ``alpha_0 = 0`` (pure-noise start).
"""

from typing import Literal

from pydantic import Field

from diffkit.samplers._base import SAMPLERS, Grid, SamplerBase, Step, StopsAt, ancestral_split
from diffkit.samplers.spacing import SPACING, AnySpacing, Karras

__all__ = ["Euler", "EulerAncestral", "Heun"]


@SAMPLERS.register
class Euler(StopsAt):
    """Euler's method on the EDM ODE (1 NFE per step)."""

    kind: Literal["euler"] = "euler"
    spacing: AnySpacing = Field(default_factory=Karras, description=SPACING)

    def plan(self, grid: Grid) -> list[Step]:
        """Euler coefficients on ``grid``."""
        plan = []
        for i in range(grid.steps):
            rho = grid.ratio(i)
            keep = grid.sigma[i + 1] / grid.sigma[i]
            plan.append(Step(keep=keep, data=(grid.alpha[i + 1] * (1 - rho),)))
        return plan


@SAMPLERS.register
class EulerAncestral(SamplerBase):
    """Euler-ancestral: an Euler step to ``s_down`` plus ``s_up`` fresh noise."""

    kind: Literal["euler_ancestral"] = "euler_ancestral"
    eta: float = Field(default=1.0, ge=0, description="share of each step's noise re-drawn")
    spacing: AnySpacing = Field(default_factory=Karras, description=SPACING)

    def plan(self, grid: Grid) -> list[Step]:
        """Euler-ancestral coefficients on ``grid``."""
        plan = []
        for i in range(grid.steps):
            rho = grid.ratio(i)
            up, down = ancestral_split(grid, i, self.eta)  # s_up, s_down over s_{i+1}
            a1, s1 = grid.alpha[i + 1], grid.sigma[i + 1]
            keep = s1 / grid.sigma[i] * down
            plan.append(Step(keep=keep, data=(a1 * (1 - rho * down),), noise=s1 * up))
        return plan


@SAMPLERS.register
class Heun(SamplerBase):
    """Heun's second-order method on the EDM ODE (Karras et al., 2022, Algorithm 1).

    ``steps`` counts Heun steps: ``2 * steps - 1`` denoiser evaluations.
    """

    kind: Literal["heun"] = "heun"
    spacing: AnySpacing = Field(default_factory=Karras, description=SPACING)

    def plan(self, grid: Grid) -> list[Step]:
        """Heun coefficients on ``grid``."""
        plan = []
        for i in range(grid.steps):
            rho = grid.ratio(i)
            a1 = grid.alpha[i + 1]
            keep = grid.sigma[i + 1] / grid.sigma[i]
            euler = (a1 * (1 - rho),)
            if rho <= 0.0 or rho >= 1.0:  # onto the data, or from pure noise: Euler
                plan.append(Step(keep=keep, data=euler))
                continue
            # x~_{i+1} = rho x~_i + (1-rho)(2 rho - 1)/(2 rho) D_i + (1-rho)/(2 rho) D'
            new = a1 * (1 - rho) / (2 * rho)
            old = a1 * (1 - rho) * (2 * rho - 1) / (2 * rho)
            plan.append(Step(keep=keep, data=euler, correct=(new, old), reevaluate=True))
        return plan
