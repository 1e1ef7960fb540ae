"""Single-step second-order DPM solvers, with a model evaluation off the grid.

All work in the EDM variables ``x~ = x / alpha`` and ``s = sigma / alpha`` (k-diffusion's
``x`` and ``sigma``), with ``lambda = -log s`` the half log-SNR, and evaluate the
denoiser at a point that is not a grid point; the step is a Runge-Kutta stage rather
than a combination of past estimates, so each is a
[`StepSampler`][diffkit.samplers.StepSampler]. The ancestral ones split ``s_{i+1}`` into
a deterministic target ``s_down`` and fresh noise ``s_up``
(``ancestral_split``; ``eta`` scales the noise).

DPM-Solver-2 (Lu et al., 2022, in Karras et al.'s form; k-diffusion's ``sample_dpm_2``
without churn, and ``sample_dpm_2_ancestral`` with ``eta > 0``) takes an Euler step to
the midpoint ``s_m = sqrt(s_i s_down)`` and the whole step with the midpoint's slope:

    x~_m     = x~_i + (s_m - s_i) (x~_i - D_i) / s_i
    x~_{i+1} = x~_i + (s_down - s_i) (x~_m - D(x~_m, s_m)) / s_m + s_up z

DPM-Solver++(2S) ancestral (Lu et al., 2022b; k-diffusion's
``sample_dpmpp_2s_ancestral``) takes the data-prediction exponential-integrator step to
``s_down`` through its midpoint ``lambda_m = (lambda_i + lambda_down) / 2``,
``h = lambda_down - lambda_i``:

    x~_m     = e^{-h/2} x~_i - (e^{-h/2} - 1) D_i
    x~_{i+1} = e^{-h} x~_i - (e^{-h} - 1) D(x~_m, s_m) + s_up z

DPM-Solver++ SDE (k-diffusion's ``sample_dpmpp_sde``, diffusers'
``DPMSolverSDEScheduler``): with ``h = lambda_{i+1} - lambda_i``, a stage to
``lambda_s = lambda_i + r h`` and the step, each an ancestral data-prediction step
(``q = s_down / s_i``), the second with the estimates mixed, ``f = 1 / (2 r)``:

    x~_s     = q_s x~_i + (1 - q_s) D_i + s_up,s z_1                 (to s_s)
    x~_{i+1} = q x~_i + (1 - q) ((1 - f) D_i + f D(x~_s, s_s)) + s_up z_2

its noise by default the increments of one Brownian tree in ``s``
([`BrownianTreeNoise`][diffkit.samplers.BrownianTreeNoise]).

Each takes 2 NFE per step. A step onto the data (``s_{i+1} = 0``) or from pure noise
(``s_i = inf``) is an Euler step (to ``s_down``, plus the noise).
"""

import abc
import math
from typing import Literal

from pydantic import Field
from torch import Tensor

from diffkit.samplers._base import SAMPLERS, Grid, ancestral_split
from diffkit.samplers.noise import BrownianTreeNoise, Noise
from diffkit.samplers.spacing import SPACING, AnySpacing, Karras
from diffkit.samplers.stepping import History, Rng, StepModel, StepSampler

__all__ = ["DPMSolver2", "DPMSolverPP2SAncestral", "DPMSolverPPSDE"]

_ETA = "share of each step's noise re-drawn (ancestral); 0 is the ODE solver"


def _midpoint(grid: Grid, i: int, down: float, r: float = 0.5) -> tuple[float, ...]:
    """``lambda_i + r (lambda_down - lambda_i)`` where that is finite, else none."""
    if not math.isfinite(grid.h(i)) or down == 0.0:
        return ()
    return (grid.lam[i] + r * (grid.h(i) - math.log(down)),)


def _euler_down(x: Tensor, d: Tensor, grid: Grid, i: int, down: float) -> Tensor:
    """Euler from grid point ``i`` to ``s_down = down s_{i+1}``, in ``x`` units of point ``i + 1``.

    ``alpha_{i+1} (x~_i s_down / s_i + (1 - s_down / s_i) D)``, whose coefficient of ``x``
    is ``down sigma_{i+1} / sigma_i``: finite when ``alpha_i = 0`` (pure noise).
    """
    to_down = down * grid.ratio(i)
    return x * (down * grid.sigma[i + 1] / grid.sigma[i]) + d * (grid.alpha[i + 1] * (1 - to_down))


def _add_noise(x_t: Tensor, noise: Noise, grid: Grid, i: int, std: float) -> Tensor:
    """``x~ + std z`` with ``z`` the noise of step ``i`` (none when ``std = 0``)."""
    if not std > 0:
        return x_t
    s0 = grid.sigma[i] / grid.alpha[i] if grid.alpha[i] > 0 else math.inf
    return x_t + noise(x_t, s0, grid.sigma[i + 1] / grid.alpha[i + 1]) * std


class _MidpointToDown(StepSampler):
    """A step to ``s_down`` through the model half way in log-SNR, then ``s_up`` of noise."""

    eta: float
    spacing: AnySpacing = Field(default_factory=Karras, description=SPACING)

    def points(self, grid: Grid, i: int) -> tuple[float, ...]:
        """Half way in log-SNR from point ``i`` to ``s_down``, where that is finite."""
        return _midpoint(grid, i, ancestral_split(grid, i, self.eta)[1])

    def step(
        self, model: StepModel, x: Tensor, i: int, grid: Grid, history: History, noise: Noise
    ) -> Tensor:
        """The step from grid point ``i`` to ``s_down``, plus the noise to ``i + 1``."""
        up, down = ancestral_split(grid, i, self.eta)
        a1 = grid.alpha[i + 1]
        if model.points[i]:
            x_t = self._to_down(model, x, history[0], grid, i, down)
        else:  # onto the data, or from pure noise: Euler to s_down, in x (alpha_i may be 0)
            x_t = _euler_down(x, history[0], grid, i, down) / a1
        return _add_noise(x_t, noise, grid, i, up * grid.sigma[i + 1] / a1) * a1

    @abc.abstractmethod
    def _to_down(
        self, model: StepModel, x: Tensor, d: Tensor, grid: Grid, i: int, down: float
    ) -> Tensor:
        """``x~ = x / alpha`` at ``s_down = down * s_{i+1}``, through the midpoint."""


@SAMPLERS.register
class DPMSolver2(_MidpointToDown):
    """DPM-Solver-2: a midpoint step in log-SNR (2 NFE per step, 1 onto the data).

    ``eta > 0`` is k-diffusion's ``sample_dpm_2_ancestral``: the step goes to ``s_down``
    and ``s_up`` of fresh noise is added.
    """

    kind: Literal["dpm_2"] = "dpm_2"
    eta: float = Field(default=0.0, ge=0, description=_ETA)

    def _to_down(
        self, model: StepModel, x: Tensor, d: Tensor, grid: Grid, i: int, down: float
    ) -> Tensor:
        """The midpoint rule in ``s = sigma / alpha``: the slope at the midpoint, to ``s_down``."""
        mid, a0 = model.points[i][0], grid.alpha[i]
        s0, s_m = grid.sigma[i] / a0, mid.sigma / mid.alpha
        s_down = down * grid.sigma[i + 1] / grid.alpha[i + 1]
        x_t = x / a0
        x_m = x_t + (x_t - d) * ((s_m - s0) / s0)
        d_m = model.at(x_m * mid.alpha, i)
        return x_t + (x_m - d_m) * ((s_down - s0) / s_m)


@SAMPLERS.register
class DPMSolverPP2SAncestral(_MidpointToDown):
    """DPM-Solver++(2S) ancestral: a midpoint step to ``s_down``, then ``s_up`` fresh noise."""

    kind: Literal["dpmpp_2s_ancestral"] = "dpmpp_2s_ancestral"
    eta: float = Field(default=1.0, ge=0, description=_ETA)

    def _to_down(
        self, model: StepModel, x: Tensor, d: Tensor, grid: Grid, i: int, down: float
    ) -> Tensor:
        """The DPM-Solver++(2S) step in ``lambda``, through the estimate at its midpoint."""
        h = grid.h(i) - math.log(down)  # lambda_down - lambda_i
        mid, x_t = model.points[i][0], x / grid.alpha[i]
        x_m = x_t * math.exp(-h / 2) - d * math.expm1(-h / 2)
        d_m = model.at(x_m * mid.alpha, i)
        return x_t * math.exp(-h) - d_m * math.expm1(-h)


@SAMPLERS.register
class DPMSolverPPSDE(StepSampler):
    """DPM-Solver++ SDE, single-step (k-diffusion ``sample_dpmpp_sde``; 2 NFE per step).

    ``noise="brownian_tree"`` (the default, as k-diffusion's) draws every step's noise
    from one Brownian tree seeded from the generator; ``"gaussian"`` draws independent
    Gaussians.
    """

    kind: Literal["dpmpp_sde_single"] = "dpmpp_sde_single"
    eta: float = Field(default=1.0, ge=0, description=_ETA)
    r: float = Field(default=0.5, ge=1e-3, lt=1, description="stage position, a share of h")
    noise: Literal["brownian_tree", "gaussian"] = Field(
        default="brownian_tree", description="step noise: one Brownian tree, or independent"
    )
    seed: int | None = Field(
        default=None,
        ge=0,
        lt=2**63,
        description="the Brownian tree's seed (None: drawn from the generator); diffusers' "
        "noise_sampler_seed",
    )
    spacing: AnySpacing = Field(default_factory=Karras, description=SPACING)

    def points(self, grid: Grid, i: int) -> tuple[float, ...]:
        """The stage at ``lambda_i + r h``, for every step between finite noise levels."""
        return _midpoint(grid, i, 1.0, self.r)

    def noise_source(self, x: Tensor, grid: Grid, generator: Rng) -> Noise:
        """One Brownian tree over the grid's finite noise levels (or plain Gaussians)."""
        s = [sg / a for a, sg in zip(grid.alpha[:-1], grid.sigma[:-1]) if a > 0]
        if self.noise == "gaussian" or len(s) < 2:  # a tree needs an interval
            return Noise(generator)
        return BrownianTreeNoise(x, min(s), max(s), generator, self.seed)

    def step(
        self, model: StepModel, x: Tensor, i: int, grid: Grid, history: History, noise: Noise
    ) -> Tensor:
        """The two-stage SDE step from grid point ``i`` to ``i + 1``."""
        d = history[0]
        up, down = ancestral_split(grid, i, self.eta)
        a0, a1 = grid.alpha[i], grid.alpha[i + 1]
        s1 = grid.sigma[i + 1] / a1
        if not model.points[i]:  # onto the data, or from pure noise: Euler-ancestral
            return _add_noise(_euler_down(x, d, grid, i, down) / a1, noise, grid, i, up * s1) * a1
        h, s0, x_t = grid.h(i), grid.sigma[i] / a0, x / a0
        rho_s = math.exp(-self.r * h)
        s_s = s0 * rho_s
        up_s = min(1.0, self.eta * math.sqrt(1 - rho_s * rho_s))
        q_s = math.sqrt(1 - up_s * up_s) * rho_s
        x_s = x_t * q_s + d * (1 - q_s)
        if up_s > 0:
            x_s = x_s + noise(x_t, s0, s_s) * (s_s * up_s)
        mid = model.points[i][0]
        d_s = model.at(x_s * mid.alpha, i)
        f = 1 / (2 * self.r)
        q = down * grid.ratio(i)
        x_t = x_t * q + (d * (1 - f) + d_s * f) * (1 - q)
        return _add_noise(x_t, noise, grid, i, up * s1) * a1
