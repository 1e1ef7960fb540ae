"""PNDM / PLMS (Liu et al., 2022): linear multistep on the noise estimate, DDIM's transfer.

Every step is DDIM's "transfer" from grid point ``i`` to ``i + 1`` with a noise estimate
``e`` in place of the model's (diffusers' ``PNDMScheduler._get_prev_sample``, which is
the same expression rationalised):

    T(x_i, e) = alpha_{i+1} (x_i - sigma_i e) / alpha_i + sigma_{i+1} e,

with ``E_k = (x_k - alpha_k D_k) / sigma_k`` the noise implied by the estimate ``D_k`` at
grid point ``k``. PLMS takes ``e`` from the Adams-Bashforth rule with the equal-step
weights, whatever the grid:

    e = E_i                                              (1 estimate)
    e = (3 E_i - E_{i-1}) / 2                            (2)
    e = (23 E_i - 16 E_{i-1} + 5 E_{i-2}) / 12            (3)
    e = (55 E_i - 59 E_{i-1} + 37 E_{i-2} - 9 E_{i-3}) / 24   (4 and on)

Its first steps, while the history builds up, are one of two warm-ups:

- ``warmup="plms"`` (diffusers' ``skip_prk_steps=True``, Stable Diffusion 1.x): the first
  step is a trapezoid on ``e``: ``x' = T(x_0, E_0)``, then
  ``x_1 = T(x_0, (E_0 + E(x', t_1)) / 2)`` (2 NFE); the estimate at ``x'`` is not kept.
- ``warmup="prk"`` (diffusers' default, ``skip_prk_steps=False``): the first three steps
  are the pseudo Runge-Kutta step, through the time midpoint ``t_m = (t_i + t_{i+1}) / 2``
  (diffusers' half-step timestep where its step ratio ``r = num_train // steps`` is even;
  with an odd ``r`` diffusers transfers to ``t - r // 2`` but evaluates the model at
  ``t - r + r // 2``, one training step apart, which is not reproduced):
  ``e_1 = E_i``, ``e_2 = E(T_m(x_i, e_1), t_m)``, ``e_3 = E(T_m(x_i, e_2), t_m)``,
  ``e_4 = E(T(x_i, e_3), t_{i+1})``, ``x_{i+1} = T(x_i, (e_1 + 2 e_2 + 2 e_3 + e_4) / 6)``
  (4 NFE per step; ``T_m`` transfers to ``t_m``).

``combine="v"`` is diffusers' PNDM for a v-prediction model: the rule (and the warm-ups'
averages) combine the velocities ``V_k = alpha_k E_k - sigma_k D_k`` instead, and the
combination ``v`` is read as noise at the step's start, ``e = (alpha_i v + sigma_i x_i) /
(alpha_i² + sigma_i²)``, as diffusers converts its combined model output. That reading
at the step's start, not where the velocities were taken, makes it first order (the error
falls 4x from 10 to 40 steps, against 17-70x with ``"epsilon"``): kept for parity only.

The step onto the data uses the rule as any other step (diffusers' last step lands on
``final_alpha_cumprod``: the data, or with ``set_alpha_to_one=False`` the first training
step, ``t_end = 1 / N``). A step from pure noise
(``alpha_i = 0``, where ``x_i - sigma_i e`` cannot be divided by ``alpha_i``) is DDIM's
first-order step, and that point's estimate is not reused. ``E`` is formed from ``D`` for
every prediction type, so PLMS serves x0-, v- and flow-predicting models as well.
``combine="v"`` combines ``v = alpha E - sigma D`` instead and converts the combination
to noise at the step's start (``E = (alpha v + sigma x) / (alpha² + sigma²)``), as
diffusers' ``PNDMScheduler`` does with a v-prediction model's raw outputs.
"""

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from diffkit.protocols import NoiseSchedule
from diffkit.samplers._base import (
    SAMPLERS,
    Grid,
    Plan,
    Point,
    StopsAt,
    _check_steps,
    alpha_sigma,
)
from diffkit.samplers.noise import Noise
from diffkit.samplers.spacing import SPACING, AnySpacing, LogSNR
from diffkit.samplers.stepping import History, StepModel, StepSampler

__all__ = ["PNDM", "plms_weights"]

_AB = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}
_RK_STEPS = 3


def plms_weights(p: int) -> tuple[float, ...]:
    """Adams-Bashforth weights of ``E_i, E_{i-1}, ...`` for ``p`` estimates (equal steps)."""
    return _AB[p]


def _noise_of(x: Tensor, d: Tensor, alpha: float, sigma: float) -> Tensor:
    """``E = (x - alpha D) / sigma``: the noise implied by the estimate ``D`` at ``x``."""
    return (x - d * alpha) / sigma


@SAMPLERS.register
class PNDM(StepSampler, StopsAt):
    """PNDM / PLMS: fourth-order Adams-Bashforth on the noise estimate (1 NFE per step).

    ``warmup`` chooses the first steps: ``"plms"`` (a trapezoid first step, 2 NFE:
    diffusers' ``skip_prk_steps=True``, as Stable Diffusion 1.x runs it) or ``"prk"``
    (three pseudo Runge-Kutta steps of 4 NFE: diffusers' default). Stable Diffusion's
    grid is ``Leading(steps_offset=1)``; the default, ``LogSNR()``, is where the
    equal-step weights keep second order on every schedule (a uniform-in-t grid from
    ``t = 1`` of ``Cosine`` starts with a step from ``sigma / alpha = e^10``).
    """

    kind: Literal["pndm"] = "pndm"
    warmup: Literal["plms", "prk"] = Field(
        default="plms", description="first steps: a trapezoid step (plms) or 3 Runge-Kutta (prk)"
    )
    combine: Literal["epsilon", "v"] = Field(
        default="epsilon",
        description="what the rule combines: the noise, or velocities (diffusers' v-prediction)",
    )
    spacing: AnySpacing = Field(default_factory=LogSNR, description=SPACING)
    memory: ClassVar[int] = 4

    def _of(self, x: Tensor, d: Tensor, alpha: float, sigma: float) -> Tensor:
        """The combined quantity at ``x`` from ``D`` there: ``E``, or ``V = alpha E - sigma D``."""
        e = _noise_of(x, d, alpha, sigma)
        return e if self.combine == "epsilon" else e * alpha - d * sigma

    def _transfer(self, x: Tensor, q: Tensor, grid: Grid, i: int, a1: float, s1: float) -> Tensor:
        """``T``: DDIM's step from grid point ``i`` to ``(alpha, sigma) = (a1, s1)`` with ``q``."""
        a0, s0 = grid.alpha[i], grid.sigma[i]
        e = q if self.combine == "epsilon" else (q * a0 + x * s0) / (a0 * a0 + s0 * s0)
        return x * (a1 / a0) + e * (s1 - a1 * s0 / a0)

    def _runge_kutta(self, grid: Grid, i: int) -> bool:
        return self.warmup == "prk" and i < min(_RK_STEPS, grid.steps - 1)

    def prepare(
        self, schedule: NoiseSchedule, steps: int, device: torch.device | None = None
    ) -> Plan:
        """The grid and, for ``warmup="prk"``, the time midpoint of each Runge-Kutta step."""
        _check_steps(steps)
        grid = self.grid(schedule, steps, device)
        rk = [i for i in range(grid.steps) if self._runge_kutta(grid, i)]
        if not rk:
            return Plan(self, grid, (), tuple(() for _ in range(grid.steps)))
        t = torch.tensor([(grid.t[i] + grid.t[i + 1]) / 2 for i in rk], dtype=torch.float64)
        alpha, sigma = alpha_sigma(schedule, t, device)
        mids = {
            i: (Point(t=ti, alpha=a, sigma=s, lam=math.log(a) - math.log(s)),)
            for i, ti, a, s in zip(rk, t.tolist(), alpha, sigma)
        }
        return Plan(self, grid, (), tuple(mids.get(i, ()) for i in range(grid.steps)))

    def record(self, x: Tensor, d: Tensor, i: int, grid: Grid) -> Tensor:
        """``E_i`` (or ``V_i``; ``D`` itself at pure noise, which no later step reads)."""
        if not math.isfinite(grid.lam[i]):
            return d
        return self._of(x, d, grid.alpha[i], grid.sigma[i])

    def step(
        self, model: StepModel, x: Tensor, i: int, grid: Grid, history: History, noise: Noise
    ) -> Tensor:
        """The PLMS (or warm-up) step from grid point ``i`` to ``i + 1``."""
        a1, s1 = grid.alpha[i + 1], grid.sigma[i + 1]
        if not math.isfinite(grid.lam[i]):  # from pure noise: DDIM (history[0] is D)
            return history[0] * a1 + x * (s1 / grid.sigma[i])
        if model.points[i]:
            return self._prk_step(model, x, i, grid, history[0])
        if i == 0 and self.warmup == "plms" and i < grid.steps - 1:
            e0 = history[0]
            trial = self._transfer(x, e0, grid, i, a1, s1)
            e1 = self._of(trial, model(trial, i + 1), a1, s1)
            return self._transfer(x, (e0 + e1) * 0.5, grid, i, a1, s1)
        p = 1
        while p < min(4, len(history)) and math.isfinite(grid.lam[i - p]):
            p += 1
        e = history[0] * _AB[p][0]
        for w, older in zip(_AB[p][1:], history[1:p]):
            e = e + older * w
        return self._transfer(x, e, grid, i, a1, s1)

    def _prk_step(self, model: StepModel, x: Tensor, i: int, grid: Grid, e1: Tensor) -> Tensor:
        """The pseudo Runge-Kutta step through the time midpoint (4 NFE)."""
        mid = model.points[i][0]
        a1, s1 = grid.alpha[i + 1], grid.sigma[i + 1]
        x_a = self._transfer(x, e1, grid, i, mid.alpha, mid.sigma)
        e2 = self._of(x_a, model.at(x_a, i), mid.alpha, mid.sigma)
        x_b = self._transfer(x, e2, grid, i, mid.alpha, mid.sigma)
        e3 = self._of(x_b, model.at(x_b, i), mid.alpha, mid.sigma)
        x_c = self._transfer(x, e3, grid, i, a1, s1)
        e4 = self._of(x_c, model(x_c, i + 1), a1, s1)
        return self._transfer(x, (e1 + (e2 + e3) * 2 + e4) / 6, grid, i, a1, s1)
