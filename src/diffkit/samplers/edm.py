"""EDM's stochastic sampler (Karras et al., 2022, Algorithm 2): churn, then Euler or Heun.

In ``x~ = x / alpha`` and ``s = sigma / alpha`` (k-diffusion's ``x`` and ``sigma``), step
``i`` of ``N`` first raises the noise level of the sample ("churn") and then integrates
the probability-flow ODE ``d x~ / d s = (x~ - D) / s`` back down to ``s_{i+1}``:

    gamma_i = min(S_churn / N, sqrt(2) - 1)   if S_tmin <= s_i <= S_tmax, else 0
    s^_i    = (1 + gamma_i) s_i
    x~^_i   = x~_i + sqrt(s^_i² - s_i²) S_noise z,       z ~ N(0, I)
    d_i     = (x~^_i - D(x~^_i, s^_i)) / s^_i
    x~_{i+1} = x~^_i + (s_{i+1} - s^_i) d_i                              (Euler)

and with ``solver="heun"`` (Algorithm 2 itself; not onto the data, ``s_{i+1} = 0``) the
trapezoid rule with the slope ``d'`` at that Euler point:
``x~_{i+1} = x~^_i + (s_{i+1} - s^_i) (d_i + d') / 2``. This is k-diffusion's
``sample_euler`` / ``sample_heun`` with ``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``: as
there, ``z`` is drawn from the generator at every step when ``S_churn > 0`` (also on steps
outside ``[S_tmin, S_tmax]``), so the same generator gives the same draws.
A churned step evaluates the model at ``s^_i``, off the grid, instead of at its grid
point (1 NFE per step for Euler, 2 for Heun, 1 onto the data); ``s_churn=0`` is the
deterministic [`Euler`][diffkit.samplers.Euler] / [`Heun`][diffkit.samplers.Heun]. A
step from pure noise (``s_i = inf``) is not churned.

diffusers' ``EulerDiscreteScheduler.step(s_churn=...)`` is a different method: it adds
the churn noise *after* the model was evaluated at the un-churned sample, and steps
from ``s^_i`` with that output; it is not reproduced here.
"""

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from diffkit.config import field_error
from diffkit.protocols import NoiseSchedule
from diffkit.samplers._base import SAMPLERS, Grid, Plan
from diffkit.samplers.noise import Noise
from diffkit.samplers.spacing import SPACING, AnySpacing, Karras
from diffkit.samplers.stepping import History, StepModel, StepSampler

__all__ = ["EDMStochastic"]

_MAX_GAMMA = math.sqrt(2.0) - 1.0


@SAMPLERS.register
class EDMStochastic(StepSampler):
    """EDM's stochastic sampler: churn ``x`` up to ``(1 + gamma) s``, then an Euler or Heun step.

    The defaults are EDM's ImageNet-64 settings (``S_churn=40``, ``S_tmin=0.05``,
    ``S_tmax=50``, ``S_noise=1.003``); k-diffusion's defaults are ``s_churn=0``,
    ``s_tmin=0``, ``s_tmax=inf`` (``None`` here) and ``s_noise=1``. ``s_tmin`` and
    ``s_tmax`` are noise levels ``sigma / alpha``.
    """

    kind: Literal["edm_stochastic"] = "edm_stochastic"
    solver: Literal["euler", "heun"] = Field(
        default="heun", description="the ODE step after the churn: Euler, or Heun (2 NFE)"
    )
    s_churn: float = Field(default=40.0, ge=0, description="total churn; gamma = s_churn / N")
    s_tmin: float = Field(default=0.05, ge=0, description="lowest sigma/alpha that is churned")
    s_tmax: float | None = Field(
        default=50.0, description="highest sigma/alpha that is churned; None: no bound"
    )
    s_noise: float = Field(
        default=1.003, gt=0, le=10, description="scale of the churn noise (EDM: 1 to 1.007)"
    )
    spacing: AnySpacing = Field(default_factory=Karras, description=SPACING)

    @model_validator(mode="after")
    def _valid_range(self) -> "EDMStochastic":
        if self.s_tmax is not None and not self.s_tmax >= self.s_tmin:
            message = (
                f"EDMStochastic: s_tmax ({self.s_tmax}) must be at least s_tmin ({self.s_tmin})"
            )
            raise field_error("EDMStochastic", "s_tmax", message, self.s_tmax)
        return self

    def gamma(self, grid: Grid, i: int) -> float:
        """``gamma_i``: the churn of step ``i`` (0 outside ``[s_tmin, s_tmax]``, at pure noise)."""
        if not math.isfinite(grid.lam[i]):
            return 0.0
        s = math.exp(-grid.lam[i])
        if s < self.s_tmin or (self.s_tmax is not None and s > self.s_tmax):
            return 0.0
        return min(self.s_churn / grid.steps, _MAX_GAMMA)

    def points(self, grid: Grid, i: int) -> tuple[float, ...]:
        """The churned level ``s^_i = (1 + gamma_i) s_i`` where step ``i`` churns."""
        gamma = self.gamma(grid, i)
        return (grid.lam[i] - math.log1p(gamma),) if gamma > 0 else ()

    def reads_estimate(self, grid: Grid, i: int) -> bool:
        """A churned step evaluates the model at ``s^_i`` instead of its grid point."""
        return not self.gamma(grid, i) > 0

    def prepare(
        self, schedule: NoiseSchedule, steps: int, device: torch.device | None = None
    ) -> Plan:
        """The grid and the churned levels; refused where the schedule cannot reach one."""
        plan = super().prepare(schedule, steps, device)
        for i, points in enumerate(plan.points):
            for p in points:
                wanted = math.exp(-plan.grid.lam[i]) * (1 + self.gamma(plan.grid, i))
                if not math.isclose(p.sigma / p.alpha, wanted, rel_tol=1e-6):
                    message = (
                        f"EDMStochastic: step {i} churns to sigma/alpha = {wanted:.6g}, beyond "
                        f"the schedule's noisiest level; lower s_tmax (now {self.s_tmax}) "
                        "below the grid's first sigma/alpha, or start the spacing lower"
                    )
                    raise field_error("EDMStochastic", "s_tmax", message, self.s_tmax)
        return plan

    def step(
        self, model: StepModel, x: Tensor, i: int, grid: Grid, history: History, noise: Noise
    ) -> Tensor:
        """Churn, then the Euler or Heun step from ``s^_i`` to ``s_{i+1}``."""
        a0, a1 = grid.alpha[i], grid.alpha[i + 1]
        s1 = grid.sigma[i + 1] / a1
        z = noise(x, math.exp(-grid.lam[i]), s1) if self.s_churn > 0 else None
        if not math.isfinite(grid.lam[i]):  # from pure noise: Euler in x (alpha_i = 0)
            return x * (grid.sigma[i + 1] / grid.sigma[i]) + history[0] * a1
        if model.points[i] and z is not None:  # churned (which needs s_churn > 0)
            hat = model.points[i][0]
            s0, s_hat = grid.sigma[i] / a0, hat.sigma / hat.alpha
            x_t = x / a0 + z * (self.s_noise * math.sqrt(s_hat * s_hat - s0 * s0))
            d = model.at(x_t * hat.alpha, i)
        else:
            s_hat, x_t, d = grid.sigma[i] / a0, x / a0, history[0]
        slope = (x_t - d) / s_hat
        x_next = x_t + slope * (s1 - s_hat)
        if self.solver == "heun" and s1 > 0:
            slope_2 = (x_next - model(x_next * a1, i + 1)) / s1
            x_next = x_t + (slope + slope_2) * ((s1 - s_hat) / 2)
        return x_next * a1
