"""Deterministic DDIM / ODE inversion: data ``x0`` back to the noise that generates it.

Sampling with [`DDIM`][diffkit.samplers.DDIM] (``eta = 0``) takes
``x_{i+1} = alpha_{i+1} D(x_i) + sigma_{i+1} E(x_i)``. Inversion walks the same grid
backwards and needs ``x_i`` from ``x_{i+1}``; it starts from the usual approximation
``(D, E)(x_i) ~ (D, E)(x_{i+1})`` evaluated at time ``t_i`` and can refine it with
fixed-point iterations ``x_i <- g(x_i)`` whose fixed point inverts the sampling step
exactly (each refinement costs one more evaluation per step).
``DDIM(spacing=s).sample(denoiser, schedule, invert(...), steps=n)`` returns ``x0``.
"""

import torch
from pydantic import Field

from diffkit.config import Config
from diffkit.guidance import unused_uncond
from diffkit.protocols import Conditioning, Denoiser, NoiseSchedule, StepCallback
from diffkit.samplers._base import _Model, make_grid
from diffkit.samplers.spacing import SPACING, AnySpacing, UniformTime
from diffkit.typing import Sample, checked

__all__ = ["DDIMInversion"]


class DDIMInversion(Config):
    """Invert DDIM sampling on the grid of ``spacing``; ``refine`` fixed-point iterations."""

    spacing: AnySpacing = Field(default_factory=UniformTime, description=SPACING)
    refine: int = Field(default=0, ge=0, description="fixed-point refinements per step")

    @torch.no_grad()
    @checked
    def invert(
        self,
        denoiser: Denoiser,
        schedule: NoiseSchedule,
        x0: Sample,
        *,
        steps: int,
        cond: Conditioning | None = None,
        guidance: float = 1.0,
        uncond: Conditioning | None = None,
        callback: StepCallback | None = None,
    ) -> Sample:
        """The standard-normal-scale ``noise`` from which DDIM sampling returns ``x0``.

        Runs under ``torch.no_grad()``, as sampling does: the result carries no graph.
        """
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        grid = make_grid(schedule, self.spacing, steps, x0.device)
        a, s = grid.alpha, grid.sigma
        if steps == 1 and a[0] <= 0:
            raise ValueError(
                "DDIM inversion from pure noise (alpha = 0 at the first time) needs steps >= 2: "
                "one step lands on the denoised estimate E[x0 | x_T] whatever x_T, so x_T "
                "cannot be recovered"
            )
        uncond = unused_uncond(f"{type(self).__name__}.invert", guidance, uncond)
        model = _Model(denoiser, grid, x0, cond, guidance, uncond)
        y = x0.to(model.dtype)
        for j in range(steps - 1, -1, -1):  # from the data (point steps) to the noise (0)
            x = y
            d = model(x, j)
            for k in range(self.refine + 1):
                if k > 0:
                    d = model(x, j)
                if a[j] > 0:
                    # keep the noise estimate E(x_j); D follows from x_{j+1}
                    eps = (x - a[j] * d) / s[j]
                    x = (a[j] / a[j + 1]) * y + (s[j] - a[j] * s[j + 1] / a[j + 1]) * eps
                else:
                    # pure noise at t_j: E = x_j / sigma_j, solved from x_{j+1} and D
                    x = (s[j] / s[j + 1]) * (y - a[j + 1] * d)
            y = x
            if callback is not None:
                callback(steps - 1 - j, model.callback_times[j], y, d)
        model.raise_if_nonfinite()
        return (y / s[0]).to(x0.dtype)
