"""Linear multistep (LMS) in Karras et al.'s ODE form (k-diffusion's ``sample_lms``).

The probability-flow ODE ``d x~ / d s = (x~ - D) / s`` (``x~ = x / alpha``,
``s = sigma / alpha``) is integrated by the Adams-Bashforth rule on the grid's ``s``:
the slope is interpolated through the last ``p`` points by Lagrange's polynomial and
integrated exactly over the step,

    x~_{i+1} = x~_i + sum_j c_j d_{i-j},
    c_j = ∫_{s_i}^{s_{i+1}} prod_{k != j} (s - s_{i-k}) / (s_{i-j} - s_{i-k}) ds,

``d_k = (x~_k - D_k) / s_k``, ``p = min(order, i + 1)`` (diffusers'
``LMSDiscreteScheduler`` and k-diffusion). The slopes are of past points, not a linear
combination of the current sample and past estimates, so LMS is a
[`StepSampler`][diffkit.samplers.StepSampler] whose history holds slopes (``record``).
"""

import math
from typing import ClassVar, Literal

import numpy as np
from numpy.polynomial import polynomial as P
from pydantic import Field
from torch import Tensor

from diffkit.samplers._base import SAMPLERS, Grid
from diffkit.samplers.noise import Noise
from diffkit.samplers.spacing import SPACING, AnySpacing, Karras
from diffkit.samplers.stepping import History, StepModel, StepSampler

__all__ = ["LMS", "lms_coefficients"]


def lms_coefficients(s: list[float], i: int, p: int) -> list[float]:
    """``c_j``, ``j < p``: the exact integrals over ``[s_i, s_{i+1}]`` of the Lagrange basis."""
    nodes = [s[i - k] for k in range(p)]
    out = []
    for j in range(p):
        others = [n for k, n in enumerate(nodes) if k != j]
        basis = P.polyfromroots(others) / np.prod([nodes[j] - n for n in others])
        integral = P.polyint(basis)
        out.append(float(P.polyval(s[i + 1], integral) - P.polyval(s[i], integral)))
    return out


@SAMPLERS.register
class LMS(StepSampler):
    """Linear multistep of ``order`` 1-4 on the EDM ODE (1 NFE per step)."""

    kind: Literal["lms"] = "lms"
    order: Literal[1, 2, 3, 4] = Field(default=4, description="number of past slopes used")
    spacing: AnySpacing = Field(default_factory=Karras, description=SPACING)
    memory: ClassVar[int] = 4

    def record(self, x: Tensor, d: Tensor, i: int, grid: Grid) -> Tensor:
        """The slope ``(x~ - D) / s = (x - alpha D) / sigma`` (``D`` itself at pure noise)."""
        if not math.isfinite(grid.lam[i]):
            return d
        return (x - d * grid.alpha[i]) / grid.sigma[i]

    def step(
        self, model: StepModel, x: Tensor, i: int, grid: Grid, history: History, noise: Noise
    ) -> Tensor:
        """The Adams-Bashforth step from grid point ``i`` to ``i + 1``."""
        a0, a1 = grid.alpha[i], grid.alpha[i + 1]
        if not math.isfinite(grid.lam[i]):  # from pure noise: Euler (history[0] is D)
            return x * (grid.sigma[i + 1] / grid.sigma[i]) + history[0] * a1
        p = 1
        while p < min(self.order, len(history)) and math.isfinite(grid.lam[i - p]):
            p += 1
        s = [sg / a if a > 0 else math.inf for a, sg in zip(grid.alpha, grid.sigma)]
        x_t = x / a0
        for c, slope in zip(lms_coefficients(s, i, p), history):
            x_t = x_t + slope * c
        return x_t * a1
