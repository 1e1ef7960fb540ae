"""Multistep consistency sampling of latent consistency models (Luo et al., 2023; diffusers' LCM).

A consistency model maps ``x_t`` straight to the data, through the boundary-condition
scalings of its training timestep ``tau = t * num_train - 1`` (diffusers'
``get_scalings_for_boundary_condition_discrete``), with ``u = timestep_scaling * tau``:

    c_skip = sigma_data² / (u² + sigma_data²),    c_out = u / sqrt(u² + sigma_data²),
    f(x_i) = c_skip x_i + c_out D_i,

``D_i`` the model's data estimate. Multistep sampling re-noises that estimate to the next
grid time with fresh noise and evaluates again; the last step returns it:

    x_{i+1} = alpha_{i+1} f(x_i) + sigma_{i+1} z,    z ~ N(0, I)

(``sigma_N = 0``: ``x_N = f(x_{N-1})``). That is a linear plan (``keep = alpha_{i+1}
c_skip``, ``data = alpha_{i+1} c_out``, ``noise = sigma_{i+1}``), run by the shared loop.
Its grid is [`LCMSpacing`][diffkit.samplers.LCMSpacing] (``original_steps`` = 50).
"""

import math
from typing import Literal

from pydantic import Field

from diffkit.samplers._base import SAMPLERS, Grid, SamplerBase, Step
from diffkit.samplers.spacing import SPACING, AnySpacing, LCMSpacing

__all__ = ["LCM", "consistency_scalings"]


def consistency_scalings(u: float, sigma_data: float) -> tuple[float, float]:
    """``(c_skip, c_out)`` at the scaled timestep ``u`` (the LCM boundary condition)."""
    r = math.hypot(u, sigma_data)  # sqrt(u² + sigma_data²) without overflow or underflow
    return (sigma_data / r) ** 2, u / r


@SAMPLERS.register
class LCM(SamplerBase):
    """Multistep latent-consistency sampling (diffusers' ``LCMScheduler``; 1 NFE per step)."""

    kind: Literal["lcm"] = "lcm"
    timestep_scaling: float = Field(
        default=10.0, gt=0, description="scale of the training timestep in c_skip, c_out"
    )
    sigma_data: float = Field(default=0.5, gt=0, description="data scale in c_skip, c_out")
    num_train: int = Field(
        default=1000, ge=1, description="training steps: timestep = t * num_train - 1"
    )
    spacing: AnySpacing = Field(default_factory=LCMSpacing, description=SPACING)

    def plan(self, grid: Grid) -> list[Step]:
        """Consistency estimate at each point, re-noised to the next one."""
        plan = []
        for i in range(grid.steps):
            tau = grid.t[i] * self.num_train - 1
            c_skip, c_out = consistency_scalings(tau * self.timestep_scaling, self.sigma_data)
            a1 = grid.alpha[i + 1]
            plan.append(Step(keep=a1 * c_skip, data=(a1 * c_out,), noise=grid.sigma[i + 1]))
        return plan
