"""The one mechanism every sampler shares.

A sampler is a *plan*: for each step ``i -> i + 1`` of its time grid, the coefficients of
a linear combination of the current sample ``x_i``, the denoised estimates
``D_i, D_{i-1}, ...`` (``D = E[x0 | x_t]``, the data prediction), optionally a
corrector that also uses ``D_{i+1}`` (UniPC, Heun), and fresh Gaussian noise
(ancestral / SDE samplers). Every solver here is such a linear multistep or
predictor-corrector method once written in data-prediction form, so each sampler only
writes down its coefficients, in float64 and from the paper's formula, and this module
runs the plan:

- the grid and every coefficient are computed once, before the loop;
- the denoiser is called through one helper that batches cond/uncond for
  classifier-free guidance, converts whatever it predicts to ``x0`` with
  [`diffkit.prediction`][diffkit.prediction] in float32/64 and passes the model its own
  dtype;
- the loop has no host-device synchronisation: no ``.item()``, no ``nonzero()``, no
  Python branching on tensor values; non-finite outputs are recorded as tensors and
  reported, naming the first bad step, after the loop;
- nothing is stored on the sampler object, so one sampler serves many threads.
"""

import abc
import dataclasses
import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from diffkit.prediction import to_x0_eps
from diffkit.protocols import Conditioning, Denoiser, NoiseSchedule, StepCallback
from diffkit.samplers.spacing import Spacing
from diffkit.typing import Sample, checked

__all__ = [
    "Grid",
    "NonFiniteError",
    "SamplerBase",
    "Step",
    "final_step",
    "make_grid",
    "work_dtype",
]

_F64 = torch.float64


class NonFiniteError(FloatingPointError):
    """The denoiser returned NaN or inf during sampling; the message names the step."""


@dataclasses.dataclass(frozen=True)
class Grid:
    """A time grid and its noise levels as Python floats (computed once, in float64).

    Point ``i`` has time ``t[i]``, ``alpha[i]``, ``sigma[i]`` and half log-SNR
    ``lam[i] = log(alpha / sigma)``. The last point is the data: ``alpha = 1``,
    ``sigma = 0``, ``lam = +inf``. ``lam[0]`` is ``-inf`` when ``t_max`` is pure noise.
    """

    t: tuple[float, ...]
    alpha: tuple[float, ...]
    sigma: tuple[float, ...]
    lam: tuple[float, ...]

    @property
    def steps(self) -> int:
        """Number of steps (one fewer than points)."""
        return len(self.t) - 1

    def h(self, i: int) -> float:
        """Step size in ``lam`` of step ``i -> i + 1`` (``+inf`` for a step onto the data)."""
        return self.lam[i + 1] - self.lam[i]

    def ratio(self, i: int) -> float:
        """``(sigma/alpha)_{i+1} / (sigma/alpha)_i = exp(-h)``: the EDM ``sigma`` ratio."""
        return math.exp(-self.h(i))


def make_grid(
    schedule: NoiseSchedule, spacing: Spacing, steps: int, device: torch.device | None = None
) -> Grid:
    """Evaluate ``spacing`` on ``schedule`` and tabulate ``alpha``, ``sigma``, ``lam``."""
    t = spacing(schedule, steps, device).to(_F64)
    if t.ndim != 1 or t.numel() != steps + 1:
        raise ValueError(f"spacing returned shape {tuple(t.shape)}, expected ({steps + 1},)")
    dtype = torch.float32 if device is not None and device.type == "mps" else _F64
    inner = t[:-1].to(device=device, dtype=dtype)
    alpha = schedule.alpha(inner).to("cpu", _F64).tolist()
    sigma = schedule.sigma(inner).to("cpu", _F64).tolist()
    lam = [_half_log_snr(a, s) for a, s in zip(alpha, sigma)]
    if any(b <= a for a, b in itertools.pairwise(lam)):
        raise ValueError("the time grid must run from noise to data (log-SNR increasing)")
    return Grid(
        t=tuple(t.tolist()),
        alpha=(*alpha, 1.0),
        sigma=(*sigma, 0.0),
        lam=(*lam, math.inf),
    )


def _half_log_snr(alpha: float, sigma: float) -> float:
    if alpha <= 0:
        return -math.inf
    if sigma <= 0:
        return math.inf
    return math.log(alpha) - math.log(sigma)


@dataclasses.dataclass(frozen=True)
class Step:
    """Step ``i -> i + 1`` as a linear combination (all coefficients float64 scalars).

    ``x_{i+1} = keep * x_i + sum_k data[k] * D_{i-k} + noise * z`` with ``z ~ N(0, I)``.
    With ``correct`` set, ``D_{i+1}`` is evaluated at that prediction and the step is
    redone as ``keep * x_i + correct[0] * D_{i+1} + sum_k correct[k+1] * D_{i-k} +
    noise * z`` (same ``z``); ``reevaluate`` evaluates ``D_{i+1}`` again at the corrected
    point (PECE, e.g. Heun) instead of reusing the predictor's (PEC, e.g. UniPC).
    """

    keep: float
    data: tuple[float, ...]
    noise: float = 0.0
    correct: tuple[float, ...] | None = None
    reevaluate: bool = False

    def __post_init__(self) -> None:
        values = [self.keep, *self.data, self.noise, *(self.correct or ())]
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"non-finite sampler coefficient in {self}")


def final_step(grid: Grid, final: str) -> tuple[float, ...]:
    """Coefficients of ``D_{N-1}, D_{N-2}`` for the step onto the data.

    ``"denoised"`` lands on the last estimate ``D_{N-1}``. ``"extrapolated"`` uses that,
    along the ODE trajectory, ``D = x0 + O(s²)`` in ``s = sigma / alpha`` (Tweedie: the
    correction is ``s² grad log p``), and extrapolates the last two estimates to ``s = 0``
    (Richardson): ``(D_{N-1} - q D_{N-2}) / (1 - q)`` with ``q = (s_{N-1} / s_{N-2})²``.
    """
    n = grid.steps
    if final == "denoised" or n < 2 or not math.isfinite(grid.lam[n - 2]):
        return (1.0,)
    q = math.exp(-2 * grid.h(n - 2))
    return (1 / (1 - q), -q / (1 - q))


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the sampler integrates in: float64 stays, anything narrower becomes float32."""
    return _F64 if dtype == _F64 else torch.float32


class _Model:
    """The denoiser as the loop sees it: ``(x, point) -> D`` in the working dtype.

    Everything that depends only on the grid (times, guidance batching, the affine
    prediction -> x0 conversion) is prepared here, before the loop.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        grid: Grid,
        like: Tensor,
        cond: Conditioning | None,
        guidance: float,
        uncond: Conditioning | None,
    ) -> None:
        batch, device = like.shape[0], like.device
        self.denoiser, self.guidance = denoiser, float(guidance)
        self.model_dtype, self.dtype = like.dtype, work_dtype(like.dtype)
        self.guided = self.guidance != 1.0
        if self.guided and (cond is None or uncond is None):
            raise ValueError("classifier-free guidance (guidance != 1) needs cond and uncond")
        if cond is not None:
            cond = cond.map(lambda v: v.to(device)).expand(batch)
        if self.guided and cond is not None and uncond is not None:
            uncond = uncond.map(lambda v: v.to(device)).expand(batch)
            cond = cond.cat(uncond)
        self.cond = cond
        n = grid.steps
        t = torch.tensor(grid.t, dtype=self.dtype, device=device)
        calls = 2 * batch if self.guided else batch
        self.times = t[:, None].expand(n + 1, calls).unbind(0)
        self.callback_times = t[:, None].expand(n + 1, batch).unbind(0)
        # Every prediction kind is affine in (x_t, prediction): x0 = cx * x_t + cp * pred.
        # The coefficients come from diffkit.prediction itself, evaluated once on the grid.
        a = torch.tensor(grid.alpha[:n], dtype=_F64)
        s = torch.tensor(grid.sigma[:n], dtype=_F64)
        ones, zeros = torch.ones(n, 1, dtype=_F64), torch.zeros(n, 1, dtype=_F64)
        cx = to_x0_eps(zeros, denoiser.prediction, ones, a, s)[0].reshape(n)
        cp = to_x0_eps(ones, denoiser.prediction, zeros, a, s)[0].reshape(n)
        self.cx_float, self.cp_float = cx.tolist(), cp.tolist()
        self.cx = cx.to(device, self.dtype).unbind(0)
        self.cp = cp.to(device, self.dtype).unbind(0)
        self.sums: list[Tensor] = []
        self.points: list[int] = []
        self.grid = grid

    def predict(self, x: Tensor, i: int) -> Tensor:
        """The (guided) raw prediction at ``x``, grid point ``i``, in the working dtype."""
        x_in = x.to(self.model_dtype)
        if self.guided:
            out = self.denoiser(torch.cat([x_in, x_in]), self.times[i], self.cond)
            with_cond, without = out.to(self.dtype).chunk(2)
            return torch.lerp(without, with_cond, self.guidance)
        return self.denoiser(x_in, self.times[i], self.cond).to(self.dtype)

    def record(self, value: Tensor, i: int) -> None:
        """Keep a finiteness witness of evaluation ``i`` on the device (checked after the loop).

        A sum is finite iff every element is (barring float overflow): one reduction.
        """
        self.sums.append(value.sum())
        self.points.append(i)

    def __call__(self, x: Tensor, i: int) -> Tensor:
        d = torch.addcmul(x * self.cx[i], self.predict(x, i), self.cp[i])
        self.record(d, i)
        return d

    def raise_if_nonfinite(self) -> None:
        """Raise NonFiniteError naming the first evaluation that was not finite (one sync)."""
        if not self.sums:
            return
        ok = torch.isfinite(torch.stack(self.sums)).cpu()
        if bool(ok.all()):
            return
        first = int((~ok).nonzero()[0, 0])
        i = self.points[first]
        raise NonFiniteError(
            f"the denoiser output was NaN or inf at step {i} of {self.grid.steps} "
            f"(t = {self.grid.t[i]:.6g}, evaluation {first + 1}); check the model, its dtype "
            f"and its prediction type '{self.denoiser.prediction}'"
        )


def _combine(
    keep: float,
    keep_t: Tensor,
    x: Tensor,
    coefs: Sequence[float],
    coefs_t: Sequence[Tensor],
    history: Sequence[Tensor],
) -> Tensor:
    """``keep * x + sum_k coefs[k] * history[k]``, skipping terms whose coefficient is 0."""
    out = x * keep_t if keep != 0.0 else None
    for c, c_t, d in zip(coefs, coefs_t, history):
        if c == 0.0:
            continue
        out = d * c_t if out is None else torch.addcmul(out, d, c_t)
    return out if out is not None else torch.zeros_like(x)


def run_plan(
    plan: Sequence[Step],
    model: _Model,
    x: Tensor,
    generator: torch.Generator | None,
    callback: StepCallback | None,
) -> Tensor:
    """Integrate ``x`` (at grid point 0) through ``plan``; returns the sample at the last point."""
    if callback is None and all(len(s.data) == 1 and s.correct is None for s in plan):
        fused = _fused_first_order(plan, model)
        if fused is not None:
            return _run_first_order(fused, plan, model, x, generator)
    device, dtype = x.device, x.dtype

    # Every coefficient as a 0-d tensor on the device, made in one host -> device copy.
    flat = [v for s in plan for v in (s.keep, s.noise, *s.data, *(s.correct or ()))]
    values = torch.tensor(flat, dtype=dtype, device=device).unbind(0)
    keep_t, noise_t, data_t, corr_t = [], [], [], []
    at = 0
    for s in plan:
        n_data, n_corr = len(s.data), len(s.correct or ())
        keep_t.append(values[at])
        noise_t.append(values[at + 1])
        data_t.append(values[at + 2 : at + 2 + n_data])
        corr_t.append(values[at + 2 + n_data : at + 2 + n_data + n_corr])
        at += 2 + n_data + n_corr
    depth = max(max(len(s.data), len(s.correct or ()) - 1) for s in plan)

    history = [model(x, 0)]
    last = len(plan) - 1
    for i, step in enumerate(plan):
        z = None
        if step.noise != 0.0:
            z = torch.randn(x.shape, generator=generator, device=device, dtype=dtype)
        x_next = _combine(step.keep, keep_t[i], x, step.data, data_t[i], history)
        if z is not None:
            x_next = torch.addcmul(x_next, z, noise_t[i])
        if i < last:
            d_next = model(x_next, i + 1)
            if step.correct is not None:
                c, c_t = step.correct, corr_t[i]
                x_next = _combine(step.keep, keep_t[i], x, c[1:], c_t[1:], history)
                x_next = torch.addcmul(x_next, d_next, c_t[0])
                if z is not None:
                    x_next = torch.addcmul(x_next, z, noise_t[i])
                if step.reevaluate:
                    d_next = model(x_next, i + 1)
            history = [d_next, *history[: depth - 1]]
        x = x_next
        if callback is not None:
            callback(i, model.callback_times[i + 1], x, x if i == last else history[0])
    return x


def _fused_first_order(plan: Sequence[Step], model: _Model) -> list[tuple[float, float]] | None:
    """For one-step plans, ``keep x + c D`` with ``D = cx x + cp pred`` as ``A x + B pred``.

    Saves the explicit ``x0`` per step; ``None`` when a coefficient is not finite (e.g. an
    epsilon model at ``alpha = 0``), where the general path reports the bad step.
    """
    out = []
    for i, step in enumerate(plan):
        c = step.data[0]
        a, b = step.keep + c * model.cx_float[i], c * model.cp_float[i]
        if not (math.isfinite(a) and math.isfinite(b)):
            return None
        out.append((a, b))
    return out


def _run_first_order(
    fused: list[tuple[float, float]],
    plan: Sequence[Step],
    model: _Model,
    x: Tensor,
    generator: torch.Generator | None,
) -> Tensor:
    """The loop of first-order plans: ``x_{i+1} = A_i x_i + B_i pred_i + noise_i z``."""
    device, dtype = x.device, x.dtype
    flat = [v for (a, b), s in zip(fused, plan) for v in (a, b, s.noise)]
    values = torch.tensor(flat, dtype=dtype, device=device).unbind(0)
    for i, step in enumerate(plan):
        pred = model.predict(x, i)
        model.record(pred, i)
        a, b = values[3 * i], values[3 * i + 1]
        x_next = torch.addcmul(x * a, pred, b) if fused[i][0] != 0.0 else pred * b
        if step.noise != 0.0:
            z = torch.randn(x.shape, generator=generator, device=device, dtype=dtype)
            x_next = torch.addcmul(x_next, z, values[3 * i + 2])
        x = x_next
    return x


class SamplerBase(abc.ABC):
    """Shared ``sample``: a subclass provides ``spacing`` and ``plan(grid)``."""

    spacing: Spacing

    @abc.abstractmethod
    def plan(self, grid: Grid) -> list[Step]:
        """The coefficients of every step on ``grid`` (Python floats, computed in float64)."""

    def grid(self, schedule: NoiseSchedule, steps: int, device: torch.device | None = None) -> Grid:
        """The time grid this sampler uses for ``steps`` steps on ``schedule``."""
        return make_grid(schedule, self.spacing, steps, device)

    @checked
    def sample(
        self,
        denoiser: Denoiser,
        schedule: NoiseSchedule,
        noise: Sample,
        *,
        steps: int,
        cond: Conditioning | None = None,
        guidance: float = 1.0,
        uncond: Conditioning | None = None,
        generator: torch.Generator | None = None,
        callback: StepCallback | None = None,
    ) -> Sample:
        """Sample ``x0`` ``(batch, *shape)`` from standard normal ``noise`` in ``steps`` steps.

        ``noise`` is scaled to ``sigma(t_max)``; the model is called in ``noise.dtype``
        while the sampler integrates in float32 (float64 if ``noise`` is float64).
        """
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if not noise.is_floating_point():
            raise ValueError(f"noise must be a floating-point tensor, got {noise.dtype}")
        grid = self.grid(schedule, steps, noise.device)
        plan = self.plan(grid)
        model = _Model(denoiser, grid, noise, cond, guidance, uncond)
        x = noise.to(model.dtype) * grid.sigma[0]
        x = run_plan(plan, model, x, generator, callback)
        model.raise_if_nonfinite()
        return x.to(noise.dtype)
