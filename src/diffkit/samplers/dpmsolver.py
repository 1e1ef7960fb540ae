"""DPM-Solver++ multistep (Lu et al., 2022): 2M, 3M and their SDE variants.

In the half log-SNR ``lambda = log(alpha / sigma)`` and data prediction ``D``, with
``h = lambda_{i+1} - lambda_i``, ``h_eta = (1 + eta) h`` and ``phi_1 = 1 - exp(-h_eta)``:

    x_{i+1} = (sigma_{i+1} / sigma_i) exp(-eta h) x_i
              + alpha_{i+1} [phi_1 D_i + (higher-order terms)]
              + sigma_{i+1} sqrt(1 - exp(-2 eta h)) z.

Second order (2M), with ``r = h_{i-1} / h``: ``solver_type="midpoint"`` (the default of
diffusers and k-diffusion) adds ``alpha_{i+1} phi_1 / (2 r) (D_i - D_{i-1})``, ``"heun"``
adds ``alpha_{i+1} phi_2 / r (D_i - D_{i-1})`` (the second-order warm-up step of
k-diffusion's 3M SDE).
3M: ``+ alpha_{i+1} (phi_2 D1 - phi_3 D2)`` with the divided differences ``D1 ~ h D'``
and ``D2 ~ h² D'' / 2`` of the last three estimates (``D'`` in ``lambda``),
``phi_2 = (exp(-h_eta) - 1)/h_eta + 1`` and ``phi_3 = phi_2 / h_eta - 1/2``: the weights
of the DPM-Solver reference code, diffusers and k-diffusion, kept for parity with them.
The Taylor weight of ``D2`` is ``-2 phi_3``, so this 3M integrates a linear ``D`` exactly
but not a quadratic one and is second order (global rate 2.0 where ``-2 phi_3`` gives 4.1,
on Gaussian data); with ``-2 phi_3`` it was less accurate on the sampler-accuracy
benchmark at 5-20 NFE (``benchmarks/RESULTS.md``), so the reference weights stay.
``eta = 0`` is the ODE solver; ``eta = 1`` the
DPM-Solver++(2M/3M) SDE. The first steps use lower orders while history builds up, the
step onto the data (``h = inf``) is first order, and with ``lower_order_final`` (the
default, as diffusers) and fewer than 15 steps the one before it is at most second
order. k-diffusion's ``sample_dpmpp_3m_sde`` is
``DPMSolverPP(order=3, eta=1, solver_type="heun", lower_order_final=False)``.
"""

import math
from typing import Literal

from pydantic import Field

from diffkit.samplers._base import SAMPLERS, Grid, Step, StopsAt, final_step
from diffkit.samplers.spacing import FINAL, SPACING, AnySpacing, LogSNR

__all__ = ["DPMSolverPP", "multistep_order"]


def multistep_order(grid: Grid, i: int, order: int, lower_second_last: bool) -> int:
    """The order a multistep method can use at step ``i``.

    Limited by the history available (points with finite ``lambda``), first order onto
    the data, and (``lower_second_last``) at most second order on the step before it and
    first order on the last (which matters where the last step stops short of the data).
    """
    if not math.isfinite(grid.h(i)) or (lower_second_last and i == grid.steps - 1):
        return 1
    p = 1
    while p < order and i - p >= 0 and math.isfinite(grid.lam[i - p]):
        p += 1
    if lower_second_last and i == grid.steps - 2:
        p = min(p, 2)
    return p


@SAMPLERS.register
class DPMSolverPP(StopsAt):
    """DPM-Solver++ multistep of ``order`` 1-3; ``eta > 0`` is the SDE variant."""

    kind: Literal["dpmpp"] = "dpmpp"
    order: Literal[1, 2, 3] = Field(default=2, description="multistep order")
    eta: float = Field(default=0.0, ge=0, description="SDE noise scale; 0 is the ODE solver")
    final: Literal["denoised", "extrapolated"] = Field(default="denoised", description=FINAL)
    solver_type: Literal["midpoint", "heun"] = Field(
        default="midpoint", description="second-order formula (diffusers' solver_type)"
    )
    lower_order_final: bool = Field(
        default=True, description="at most second order on the step before the last (< 15 steps)"
    )
    spacing: AnySpacing = Field(default_factory=LogSNR, description=SPACING)

    def plan(self, grid: Grid) -> list[Step]:
        """DPM-Solver++ coefficients on ``grid``."""
        plan = []
        for i in range(grid.steps):
            h = grid.h(i)
            a1, s1 = grid.alpha[i + 1], grid.sigma[i + 1]
            damp = math.exp(-self.eta * h) if self.eta > 0 else 1.0
            noise = s1 * math.sqrt(-math.expm1(-2 * self.eta * h)) if self.eta > 0 else 0.0
            keep = s1 / grid.sigma[i] * damp
            h_eta = (1 + self.eta) * h
            phi_1 = -math.expm1(-h_eta)
            phi_2 = math.expm1(-h_eta) / h_eta + 1 if math.isfinite(h_eta) else 1.0
            p = multistep_order(grid, i, self.order, self.lower_order_final and grid.steps < 15)
            if p == 1:
                data = [phi_1]
            elif p == 2:
                r = grid.h(i - 1) / h
                w = 0.5 * phi_1 / r if self.solver_type == "midpoint" else phi_2 / r
                data = [phi_1 + w, -w]
            else:
                r0, r1 = grid.h(i - 1) / h, grid.h(i - 2) / h
                d1_0 = [1 / r0, -1 / r0, 0.0]  # (D_i - D_{i-1}) / r0
                d1_1 = [0.0, 1 / r1, -1 / r1]  # (D_{i-1} - D_{i-2}) / r1
                d1 = [u + r0 / (r0 + r1) * (u - v) for u, v in zip(d1_0, d1_1)]
                d2 = [(u - v) / (r0 + r1) for u, v in zip(d1_0, d1_1)]
                phi_3 = phi_2 / h_eta - 0.5
                data = [
                    first + phi_2 * u - phi_3 * v for first, u, v in zip([phi_1, 0.0, 0.0], d1, d2)
                ]
            if not math.isfinite(h):  # onto the data
                data = list(final_step(grid, self.final))
            plan.append(Step(keep=keep, data=tuple(a1 * c for c in data), noise=noise))
        return plan
