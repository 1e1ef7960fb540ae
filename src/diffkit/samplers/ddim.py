"""DDIM (Song et al., 2021) with ``eta``, and DDPM ancestral sampling (Ho et al., 2020).

With ``D`` the denoised estimate and ``E = (x_i - alpha_i D) / sigma_i`` the implied noise,

    x_{i+1} = alpha_{i+1} D + sqrt(sigma_{i+1}² - c²) E + c z,
    c = eta · sigma_{i+1} · sqrt(1 - exp(-2 h)),   h = lambda_{i+1} - lambda_i.

``eta = 0`` is the deterministic DDIM ODE step (the first-order DPM-Solver++ step);
``eta = 1`` draws from the DDPM posterior ``q(x_{i+1} | x_i, x0 = D)``, which is DDPM's
ancestral sampler on any subsequence of times.

With ``clip`` set, ``D`` is clipped before the step. DDIM keeps the noise estimate of the
unclipped ``D`` (diffusers' ``DDIMScheduler``), ``E = (x_i - alpha_i D_raw) / sigma_i``;
DDPM's step is the posterior mean given the clipped ``D`` (diffusers' ``DDPMScheduler``),
i.e. ``E`` follows the clipped ``D``.
"""

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from diffkit.protocols import StepCallback
from diffkit.samplers._base import (
    SAMPLERS,
    Grid,
    Plan,
    SamplerBase,
    Step,
    StopsAt,
    _Model,
    gaussian,
)
from diffkit.samplers.spacing import SPACING, AnySpacing, UniformTime

__all__ = ["DDIM", "DDPM"]


def _ddim_plan(grid: Grid, eta: float) -> list[Step]:
    plan = []
    for i in range(grid.steps):
        a0, s0 = grid.alpha[i], grid.sigma[i]
        a1, s1 = grid.alpha[i + 1], grid.sigma[i + 1]
        # at most sigma_{i+1} (k-diffusion's sigma_up <= sigma_to): for eta > 1 the step
        # then draws x_{i+1} afresh around alpha_{i+1} D, never with more noise than that
        c = min(eta * s1 * math.sqrt(-math.expm1(-2 * grid.h(i))), s1)
        keep = math.sqrt(max(s1 * s1 - c * c, 0.0)) / s0  # coefficient of E, times 1/sigma_i
        plan.append(Step(keep=keep, data=(a1 - keep * a0,), noise=c))
    return plan


@SAMPLERS.register
class DDIM(StopsAt):
    """DDIM: ``eta = 0`` deterministic (1 NFE/step), ``eta > 0`` adds posterior noise."""

    kind: Literal["ddim"] = "ddim"
    eta: float = Field(default=0.0, ge=0, description="noise scale; 0 is the DDIM ODE step")
    spacing: AnySpacing = Field(default_factory=UniformTime, description=SPACING)

    def plan(self, grid: Grid) -> list[Step]:
        """DDIM coefficients on ``grid``."""
        return _ddim_plan(grid, self.eta)

    def _run(
        self,
        plan: Plan,
        model: _Model,
        x: Tensor,
        generator: torch.Generator | None,
        callback: StepCallback | None,
    ) -> Tensor:
        """The plan; with ``clip``, ``x_{i+1} = alpha_{i+1} D + keep (x_i - alpha_i D_raw)``."""
        clip = self.clip
        if clip is None:
            return super()._run(plan, model, x, generator, callback)
        grid, last = plan.grid, plan.grid.steps - 1
        raw = model.unclipped(x, 0)
        for i, (keep, data, noise, *_) in enumerate(plan.steps):
            d, from_raw = clip(raw), keep * grid.alpha[i]  # data[0] = alpha_{i+1} - keep alpha_i
            x_next = x * keep + d * (data[0] + from_raw) - raw * from_raw
            x = x_next + gaussian(x, generator, noise) if noise else x_next
            if i < last:
                raw = model.unclipped(x, i + 1)
            if callback is not None:
                callback(i, model.callback_times[i + 1], x, clip(raw) if i < last else x)
        return x


@SAMPLERS.register
class DDPM(SamplerBase):
    """DDPM ancestral sampling: each step draws from the posterior given ``x0 = D``."""

    kind: Literal["ddpm"] = "ddpm"
    spacing: AnySpacing = Field(default_factory=UniformTime, description=SPACING)

    def plan(self, grid: Grid) -> list[Step]:
        """DDPM (DDIM with ``eta = 1``) coefficients on ``grid``."""
        return _ddim_plan(grid, 1.0)
