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

``algorithm="dpmsolver"`` is the noise-prediction DPM-Solver (Lu et al., 2022a; diffusers'
``algorithm_type="dpmsolver"``, ``"sde-dpmsolver"`` with ``eta = 1``), on
``eps_j = (x_j - alpha_j D_j) / sigma_j`` and ``c = 1 + eta``:

    x_{i+1} = (alpha_{i+1} / alpha_i) x_i - c sigma_{i+1} (e^h - 1) eps_i
              + (higher-order terms) + sigma_{i+1} sqrt(e^{2h} - 1) z  (eta = 1).

Second order, with ``E1 = (eps_i - eps_{i-1}) / r``: ``"midpoint"`` adds
``-c sigma_{i+1} (e^h - 1) E1 / 2``, ``"heun"`` adds ``-c sigma_{i+1} psi_2 E1`` with
``psi_2 = (e^h - 1) / h - 1``; third order (ODE only) adds ``-sigma_{i+1} (psi_2 E1 +
psi_3 E2)`` with ``psi_3 = (e^h - 1 - h) / h² - 1/2`` and ``E1, E2`` the divided
differences of 3M above, on ``eps``. Its first-order step is DDIM, as DPM-Solver++'s;
``eps_{i-1}, eps_{i-2}`` bring the earlier samples into the step (``Step.past``). A step
from pure noise (``alpha_i = 0``) or onto the data, where ``eps`` form is undefined, is
that first-order step in data form.
"""

import math
from typing import Literal, Self

import torch
from pydantic import Field, model_validator

from diffkit.config import field_error
from diffkit.protocols import NoiseSchedule
from diffkit.samplers._base import SAMPLERS, Grid, Plan, Step, StopsAt, _check_steps, final_step
from diffkit.samplers.spacing import FINAL, SPACING, AnySpacing, LogSNR

__all__ = ["DPMSolverPP", "DPMSolverPPSinglestep", "multistep_order", "singlestep_orders"]


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
    algorithm: Literal["dpmsolver++", "dpmsolver"] = Field(
        default="dpmsolver++",
        description="data prediction (DPM-Solver++) or noise prediction (DPM-Solver)",
    )
    eta: float = Field(default=0.0, ge=0, description="SDE noise scale; 0 is the ODE solver")
    final: Literal["denoised", "extrapolated"] = Field(default="denoised", description=FINAL)
    solver_type: Literal["midpoint", "heun"] = Field(
        default="midpoint", description="second-order formula (diffusers' solver_type)"
    )
    lower_order_final: bool = Field(
        default=True, description="at most second order on the step before the last (< 15 steps)"
    )
    spacing: AnySpacing = Field(default_factory=LogSNR, description=SPACING)

    @model_validator(mode="after")
    def _noise_prediction_variants(self) -> Self:
        if self.algorithm == "dpmsolver" and self.eta not in (0.0, 1.0):
            message = f"eta with algorithm='dpmsolver' must be 0 or 1 (SDE), got {self.eta}"
            raise field_error("DPMSolverPP", "eta", message, self.eta)
        if self.algorithm == "dpmsolver" and self.eta > 0 and self.order == 3:
            message = "order with algorithm='dpmsolver' and eta=1 must be 1 or 2 (no 3rd-order SDE)"
            raise field_error("DPMSolverPP", "order", message, self.order)
        return self

    def plan(self, grid: Grid) -> list[Step]:
        """DPM-Solver++ (or DPM-Solver) coefficients on ``grid``."""
        plan = []
        for i in range(grid.steps):
            h = grid.h(i)
            p = multistep_order(grid, i, self.order, self.lower_order_final and grid.steps < 15)
            if self.algorithm == "dpmsolver" and math.isfinite(h) and grid.alpha[i] > 0:
                plan.append(self._noise_step(grid, i, p))
                continue
            a1, s1 = grid.alpha[i + 1], grid.sigma[i + 1]
            damp = math.exp(-self.eta * h) if self.eta > 0 else 1.0
            noise = s1 * math.sqrt(-math.expm1(-2 * self.eta * h)) if self.eta > 0 else 0.0
            keep = s1 / grid.sigma[i] * damp
            h_eta = (1 + self.eta) * h
            phi_1 = -math.expm1(-h_eta)
            phi_2 = math.expm1(-h_eta) / h_eta + 1 if math.isfinite(h_eta) else 1.0
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

    def _noise_step(self, grid: Grid, i: int, p: int) -> Step:
        """Step ``i`` of the noise-prediction DPM-Solver of order ``p``, in ``x`` and ``D``."""
        h, s1, c = grid.h(i), grid.sigma[i + 1], 1.0 + self.eta
        e_h = math.expm1(h)  # e^h - 1
        psi_2 = e_h / h - 1
        eps = [-c * s1 * e_h]  # weights of eps_i, eps_{i-1}, ...
        if p == 2:
            r = grid.h(i - 1) / h
            w = 0.5 * c * s1 * e_h / r if self.solver_type == "midpoint" else c * s1 * psi_2 / r
            eps = [eps[0] - w, w]
        elif p == 3:
            r0, r1 = grid.h(i - 1) / h, grid.h(i - 2) / h
            d1_0 = [1 / r0, -1 / r0, 0.0]
            d1_1 = [0.0, 1 / r1, -1 / r1]
            d1 = [u + r0 / (r0 + r1) * (u - v) for u, v in zip(d1_0, d1_1)]
            d2 = [(u - v) / (r0 + r1) for u, v in zip(d1_0, d1_1)]
            psi_3 = (e_h - h) / (h * h) - 0.5
            eps = [f - s1 * (psi_2 * u + psi_3 * v) for f, u, v in zip([eps[0], 0, 0], d1, d2)]
        # eps_j = (x_j - alpha_j D_j) / sigma_j
        a, s = grid.alpha, grid.sigma
        keep = a[i + 1] / a[i] + eps[0] / s[i]
        data = tuple(-w * a[i - k] / s[i - k] for k, w in enumerate(eps))
        past = tuple(w / s[i - k] for k, w in enumerate(eps) if k > 0)
        noise = s1 * math.sqrt(math.expm1(2 * h)) if self.eta > 0 else 0.0
        return Step(keep=keep, data=data, noise=noise, past=past)


def singlestep_orders(
    steps: int, order: int, lower_order_final: bool, onto_data: bool
) -> list[int]:
    """The order of each step of diffusers' ``DPMSolverSinglestepScheduler``.

    Groups ``1, 2, ..., order`` repeat; its ``set_timesteps`` turns ``lower_order_final``
    on when the last step lands on the data or ``steps`` is not a multiple of ``order``,
    which shortens the last group; a last step onto the data is first order.
    """
    group = list(range(1, order + 1))
    full, rest = divmod(steps, order)
    if order == 1 or not (lower_order_final or onto_data or rest):
        orders = group * full + group[:rest]
    elif rest == 0:  # the last group shortened by one, then a first-order step
        orders = group * (full - 1) + group[: order - 1] + [1]
    else:
        orders = group * full + group[:rest]
    if onto_data:
        orders[-1] = 1
    return orders


@SAMPLERS.register
class DPMSolverPPSinglestep(StopsAt):
    """DPM-Solver++ single-step (diffusers' ``DPMSolverSinglestepScheduler``), 1 NFE per step.

    The steps come in groups of ``1, 2, ..., order`` (``singlestep_orders``): a group's
    ``k``-th step goes from the group's first point ``g`` to the next grid point with the
    ``k``-th-order DPM-Solver++ update on the estimates ``D_g ... D_i`` of the group, from
    ``x_g``. As ``x_i`` is itself that group's update from ``x_g``, ``x_g`` is a linear
    combination of ``x_i`` and the group's estimates, so each step is a linear plan.
    ``solver_type`` is the second/third-order formula (diffusers' ``"midpoint"`` /
    ``"heun"``). ``algorithm="dpmsolver"`` (noise prediction, the multistep's formulas on
    ``eps`` from ``x_g``) and ``eta = 1`` (diffusers' ``"sde-dpmsolver++"``: the
    multistep SDE's weights with ``h = lambda_{i+1} - lambda_g``, order at most 2) refer
    to ``x_g`` itself among the earlier samples (``Step.past``).
    """

    kind: Literal["dpmpp_singlestep"] = "dpmpp_singlestep"
    order: Literal[1, 2, 3] = Field(default=2, description="largest order of a group")
    algorithm: Literal["dpmsolver++", "dpmsolver"] = Field(
        default="dpmsolver++",
        description="data prediction (DPM-Solver++) or noise prediction (DPM-Solver)",
    )
    eta: float = Field(default=0.0, description="0, or 1: the SDE (diffusers' sde-dpmsolver++)")
    solver_type: Literal["midpoint", "heun"] = Field(
        default="midpoint", description="second/third-order formula (diffusers' solver_type)"
    )
    lower_order_final: bool = Field(
        default=False, description="shorten the last group (diffusers' lower_order_final)"
    )
    spacing: AnySpacing = Field(default_factory=LogSNR, description=SPACING)

    @model_validator(mode="after")
    def _variants(self) -> Self:
        if self.eta not in (0.0, 1.0):
            message = f"eta must be 0 or 1 (the SDE), got {self.eta}"
            raise field_error("DPMSolverPPSinglestep", "eta", message, self.eta)
        if self.eta and self.algorithm == "dpmsolver":
            message = "eta=1 with algorithm='dpmsolver' has no single-step formula (diffusers')"
            raise field_error("DPMSolverPPSinglestep", "eta", message, self.eta)
        if self.eta and self.order == 3:
            message = "order with eta=1 must be 1 or 2 (no third-order SDE step)"
            raise field_error("DPMSolverPPSinglestep", "order", message, self.order)
        return self

    def prepare(
        self, schedule: NoiseSchedule, steps: int, device: torch.device | None = None
    ) -> Plan:
        """The grid and coefficients; a last step of zero length is a group step as any."""
        _check_steps(steps)
        grid = self.grid(schedule, steps, device)
        return Plan(self, grid, tuple(self.plan(grid)))

    def plan(self, grid: Grid) -> list[Step]:
        """Single-step DPM-Solver++ coefficients on ``grid``."""
        n = grid.steps
        orders = singlestep_orders(n, self.order, self.lower_order_final, grid.sigma[-1] == 0)
        if self.algorithm == "dpmsolver" or self.eta:
            return [self._from_past(grid, i, min(k, i + 1)) for i, k in enumerate(orders)]
        plan: list[Step] = []
        previous: dict[int, float] = {}  # the last step's coefficients from its group start
        for i, k in enumerate(orders):
            k = min(k, i + 1)
            own = self._from_start(grid, i, k)
            keep = grid.sigma[i + 1] / grid.sigma[i]
            data = dict(own)
            if k > 1:  # x_g = (sigma_g / sigma_i) (x_i - sum_m b_m D_m), b from step i - 1
                for m, b in previous.items():
                    data[m] = data.get(m, 0.0) - keep * b
            plan.append(Step(keep=keep, data=tuple(data.get(i - j, 0.0) for j in range(k))))
            previous = own
        return plan

    def _from_past(self, grid: Grid, i: int, k: int) -> Step:
        """Step ``i`` (order ``k``) from the group's start ``x_g``, an earlier sample."""
        g = i - k + 1
        h = grid.lam[i + 1] - grid.lam[g]
        a, s = grid.alpha, grid.sigma
        noise_form = self.algorithm == "dpmsolver" and math.isfinite(h)
        if noise_form:  # weights of eps_g, of E1 and of E2
            e_h = math.expm1(h)
            psi_2 = e_h / h - 1
            start = a[i + 1] / a[g]
            p0, p2 = -s[i + 1] * e_h, -s[i + 1] * ((e_h - h) / (h * h) - 0.5)
            p1 = 0.5 * p0 if k == 2 and self.solver_type == "midpoint" else -s[i + 1] * psi_2
        else:  # weights of D_g, of D1 and of D2 (data prediction), h_eta = (1 + eta) h
            h_eta = (1 + self.eta) * h
            phi = -math.expm1(-h_eta) if math.isfinite(h_eta) else 1.0
            phi_2 = 1 - phi / h_eta if math.isfinite(h_eta) else 1.0
            start = s[i + 1] / s[g] * (math.exp(-self.eta * h) if self.eta else 1.0)
            p0, p2 = a[i + 1] * phi, -a[i + 1] * (phi_2 / h_eta - 0.5) if k == 3 else 0.0
            p1 = 0.5 * p0 if k == 2 and self.solver_type == "midpoint" else a[i + 1] * phi_2
        weights = {g: p0}  # of the model outputs m_g ... m_i
        if k == 2:
            r0 = (grid.lam[i] - grid.lam[g]) / h
            weights[i] = p1 / r0
            weights[g] -= p1 / r0
        elif k == 3:
            r0, r1 = (grid.lam[i] - grid.lam[g]) / h, (grid.lam[i - 1] - grid.lam[g]) / h
            d1_1 = {i: 1 / r0, i - 1: 0.0, g: -1 / r0}  # (m_i - m_g) / r0
            d1_0 = {i: 0.0, i - 1: 1 / r1, g: -1 / r1}  # (m_{i-1} - m_g) / r1
            for m in (i, i - 1):
                weights[m] = 0.0
            for m in (i, i - 1, g):
                if self.solver_type == "midpoint":
                    weights[m] += p1 * d1_1[m]
                    continue
                d1 = (r0 * d1_0[m] - r1 * d1_1[m]) / (r0 - r1)
                d2 = 2 * (d1_1[m] - d1_0[m]) / (r0 - r1)
                weights[m] += p1 * d1 + p2 * d2
        samples = {g: start}  # coefficients of x_g ... x_i
        data = dict(weights)
        if noise_form:  # eps_m = (x_m - alpha_m D_m) / sigma_m
            data = {m: -w * a[m] / s[m] for m, w in weights.items()}
            for m, w in weights.items():
                samples[m] = samples.get(m, 0.0) + w / s[m]
        noise = s[i + 1] * math.sqrt(-math.expm1(-2 * h)) if self.eta else 0.0
        return Step(
            keep=samples.pop(i, 0.0),
            data=tuple(data.get(i - j, 0.0) for j in range(k)),
            noise=noise,
            past=tuple(samples.get(i - 1 - j, 0.0) for j in range(k - 1)),
        )

    def _from_start(self, grid: Grid, i: int, k: int) -> dict[int, float]:
        """``x_{i+1} = (sigma_{i+1} / sigma_g) x_g + sum_m c_m D_m``: the ``c`` (``g = i-k+1``)."""
        g, a_t = i - k + 1, grid.alpha[i + 1]
        h = grid.lam[i + 1] - grid.lam[g]
        phi = -math.expm1(-h) if math.isfinite(h) else 1.0  # 1 - e^{-h}
        c = {g: a_t * phi}
        if k == 1:
            return c
        psi = phi / h - 1 if math.isfinite(h) else -1.0  # (e^{-h} - 1) / h + 1, negated
        if k == 2:
            r0 = (grid.lam[i] - grid.lam[g]) / h
            w = 0.5 * a_t * phi / r0 if self.solver_type == "midpoint" else -a_t * psi / r0
            return {g: c[g] - w, i: w}
        r0, r1 = (grid.lam[i] - grid.lam[g]) / h, (grid.lam[i - 1] - grid.lam[g]) / h
        # D1_1 = (D_i - D_g) / r0, D1_0 = (D_{i-1} - D_g) / r1
        d1_1 = {i: 1 / r0, g: -1 / r0}
        d1_0 = {i - 1: 1 / r1, g: -1 / r1}
        out = dict(c)
        out.setdefault(i, 0.0)
        out.setdefault(i - 1, 0.0)
        if self.solver_type == "midpoint":
            for m, v in d1_1.items():
                out[m] += -a_t * psi * v
            return out
        phi_3 = (math.expm1(-h) + h) / (h * h) - 0.5
        for m in (i, i - 1, g):
            d1 = (r0 * d1_0.get(m, 0.0) - r1 * d1_1.get(m, 0.0)) / (r0 - r1)
            d2 = 2 * (d1_1.get(m, 0.0) - d1_0.get(m, 0.0)) / (r0 - r1)
            out[m] += -a_t * psi * d1 - a_t * phi_3 * d2
        return out
