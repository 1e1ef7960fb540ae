"""UniPC (Zhao et al., 2023): the unified predictor-corrector, data-prediction form.

Step ``i`` in ``lambda = log(alpha / sigma)``, ``h = lambda_{i+1} - lambda_i``:

- predictor UniP-p: ``x_{i+1} = (sigma_{i+1}/sigma_i) x_i + alpha_{i+1} (1 - e^{-h}) D_i
  - alpha_{i+1} B(h) sum_k rho_k (D_{i-k} - D_i) / r_k`` with ``r_k = (lambda_{i-k} -
  lambda_i) / h`` and ``rho`` solving the order conditions ``R rho = b`` (Vandermonde
  in ``r``, ``b`` from the phi-functions of ``h``);
- corrector UniC-p: evaluate ``D_{i+1}`` at the prediction and redo the step with it as
  one more point (``r = 1``). The corrected sample is kept, the evaluation reused, so the
  corrector raises the order by one at no extra NFE.

``B(h) = e^{h} - 1`` ("bh2", the default) or ``h`` ("bh1"). The step onto the data is a
first-order predictor with no corrector.
"""

import math
from typing import Literal

from pydantic import Field

from diffkit.samplers._base import SAMPLERS, Grid, Step, StopsAt, final_step
from diffkit.samplers.dpmsolver import multistep_order
from diffkit.samplers.spacing import FINAL, SPACING, AnySpacing, LogSNR

__all__ = ["UniPC"]


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float]:
    """``matrix @ x = rhs`` for the small (<= 3x3) order-condition systems, in float64.

    Gaussian elimination with partial pivoting on Python floats: a tensor round trip per
    step would cost more than the whole system.
    """
    n = len(rhs)
    rows = [[*row, b] for row, b in zip(matrix, rhs)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(rows[r][col]))
        rows[col], rows[pivot] = rows[pivot], rows[col]
        if rows[col][col] == 0.0:
            raise ValueError("singular order-condition system (repeated log-SNR points?)")
        for r in range(col + 1, n):
            f = rows[r][col] / rows[col][col]
            rows[r] = [u - f * v for u, v in zip(rows[r], rows[col])]
    x = [0.0] * n
    for r in reversed(range(n)):
        x[r] = (rows[r][n] - sum(rows[r][k] * x[k] for k in range(r + 1, n))) / rows[r][r]
    return x


@SAMPLERS.register
class UniPC(StopsAt):
    """UniPC multistep predictor-corrector of ``order`` 1-3 (1 NFE per step)."""

    kind: Literal["unipc"] = "unipc"
    order: Literal[1, 2, 3] = Field(default=2, description="predictor order")
    variant: Literal["bh1", "bh2"] = Field(default="bh2", description="B(h): h or e^h - 1")
    corrector: bool = Field(default=True, description="apply the UniC corrector")
    final: Literal["denoised", "extrapolated"] = Field(default="denoised", description=FINAL)
    spacing: AnySpacing = Field(default_factory=LogSNR, description=SPACING)

    def plan(self, grid: Grid) -> list[Step]:
        """UniPC coefficients on ``grid``."""
        plan = []
        n = grid.steps
        for i in range(n):
            h = grid.h(i)
            a1 = grid.alpha[i + 1]
            keep = grid.sigma[i + 1] / grid.sigma[i]
            p = min(multistep_order(grid, i, self.order, False), n - i)
            hh = -h
            phi_1 = math.expm1(hh)  # e^{-h} - 1
            if not math.isfinite(h):  # onto the data, or from pure noise: first order
                data = final_step(grid, self.final) if i == n - 1 else (-a1 * phi_1,)
                plan.append(Step(keep=keep, data=data))
                continue
            b_h = phi_1 if self.variant == "bh2" else hh
            rks = [(grid.lam[i - k] - grid.lam[i]) / h for k in range(1, p)] + [1.0]
            rows, b = [], []
            phi_k, factorial = phi_1 / hh - 1, 1
            for j in range(1, p + 1):
                rows.append([r ** (j - 1) for r in rks])
                b.append(phi_k * factorial / b_h)
                factorial *= j + 1
                phi_k = phi_k / hh - 1 / factorial
            # Predictor: D_i and the differences (D_{i-k} - D_i) / r_k, k = 1..p-1.
            if p == 1:
                rho_p: list[float] = []
            elif p == 2:
                rho_p = [0.5]
            else:
                rho_p = _solve([row[:-1] for row in rows[:-1]], b[:-1])
            data = self._combination(a1, phi_1, b_h, rks, rho_p)
            correct = None
            if self.corrector and i < n - 1:
                rho_c = [0.5] if p == 1 else _solve(rows, b)
                hist = self._combination(a1, phi_1, b_h, rks, rho_c[:-1])
                new = -a1 * b_h * rho_c[-1]
                correct = (new, hist[0] - new, *hist[1:])
            plan.append(Step(keep=keep, data=tuple(data), correct=correct))
        return plan

    @staticmethod
    def _combination(
        a1: float, phi_1: float, b_h: float, rks: list[float], rhos: list[float]
    ) -> list[float]:
        """Coefficients of ``D_i, D_{i-1}, ...`` in ``-a1 phi_1 D_i - a1 B(h) sum rho_k
        (D_{i-k} - D_i) / r_k``."""
        coefs = [-a1 * phi_1] + [0.0] * len(rhos)
        for k, rho in enumerate(rhos):
            w = -a1 * b_h * rho / rks[k]
            coefs[k + 1] += w
            coefs[0] -= w
        return coefs
