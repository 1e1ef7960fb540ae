"""Samplers fitted to a model: a time grid and step coefficients chosen from the denoiser.

At 5-10 NFE a fixed grid (uniform, log-SNR, Karras) and coefficients from a Taylor
expansion leave much of the error on the table: where a model's trajectories bend, and
how far the last estimate is from the data, depend on the model. Both can be measured
from the denoiser alone, with no training data, once per model:

1. **Teacher.** From ``noise`` (calibration noise, independent of what is sampled later)
   a fine ``teacher_steps``-step UniPC-2 run on the log-SNR grid records the ODE states
   ``x(t_j)`` at every fine time and the endpoint (``teacher_steps`` NFE per sample).
2. **Grid.** The ``steps`` evaluation times are chosen among the teacher's times
   (``t_0 = t_max`` always) by coordinate search: from each of the log-SNR-uniform,
   uniform and trailing grids, each time moves by 16, 8, 4, 2, 1 fine points while the
   mean squared distance of the student's endpoint to the teacher's falls, and the
   lowest of the three ends wins (a search on
   the teacher's trajectories, as in GITS: Chen et al. 2024, "On the trajectory
   regularity of ODE-based diffusion sampling"). Each trial costs ``steps`` NFE per
   sample.
3. **Coefficients** ([`fit_solver`][diffkit.samplers.fit_solver]). On each trial grid the
   steps are fitted greedily, by least squares against the teacher's state at the next
   time: ``x_{i+1} = (sigma_{i+1}/sigma_i) x_i + sum_k c_k D_{i-k}`` with the linear part
   exact (the exponential integrator's) and ``sum_k c_k = alpha_{i+1}(1 - e^{-h})``, so
   a step is exact when ``D`` is constant (first-order consistency). Like UniPC, each
   step is corrected once with ``D_{i+1}`` evaluated at the prediction and reused, so it
   costs one NFE; the last step combines ``D_{N-1}, D_{N-2}, ...`` with weights summing
   to 1. (Fitted coefficients in the spirit of DPM-Solver-v3's empirical model
   statistics and of bespoke solvers.)

[`fit_grid`][diffkit.samplers.fit_grid] does step 2 for any sampler and returns a
[`FittedGrid`][diffkit.samplers.FittedGrid] spacing;
[`fit_solver`][diffkit.samplers.fit_solver] does steps 2 and 3 together and returns a
[`FittedSolver`][diffkit.samplers.FittedSolver] (whose ``spacing`` is the fitted grid).
Both are configs: they save and load like every sampler and spacing. Both are
deterministic (no random draws: the same noise gives the same fit), and report what the
fit cost in NFE per calibration sample (in the grid). The result holds for the model,
schedule, step count and conditioning it was fitted with; fit again for another. Both run under
``torch.no_grad()`` (the fit is least squares and a search, no gradients), as sampling does.
"""

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from diffkit.guidance import unused_uncond
from diffkit.protocols import Conditioning, Denoiser, NoiseSchedule
from diffkit.samplers._base import SAMPLERS, Grid, SamplerBase, Step, _Model, make_grid
from diffkit.samplers.spacing import SPACINGS, AnySpacing, Explicit, LogSNR, _check, _Listed
from diffkit.samplers.unipc import UniPC
from diffkit.typing import Prediction, Sample, Time

__all__ = ["FittedGrid", "FittedSolver", "fit_grid", "fit_solver"]

_F64 = torch.float64


@SPACINGS.register
class FittedGrid(_Listed):
    """A time grid fitted to a model by [`fit_grid`][diffkit.samplers.fit_grid]: a spacing.

    ``times`` are the ``steps`` evaluation times (``t = 0`` is appended, as for
    [`Explicit`][diffkit.samplers.Explicit]); ``teacher_nfe`` and ``search_nfe`` are the
    denoiser evaluations the fit cost per calibration sample, ``loss`` the mean squared
    distance of the fitted sampler's endpoint to the teacher's on the calibration noise
    (``None``: not known, or not finite).
    """

    kind: Literal["fitted_grid"] = "fitted_grid"
    teacher_nfe: int = Field(default=0, ge=0, description="teacher NFE per calibration sample")
    search_nfe: int = Field(default=0, ge=0, description="search NFE per calibration sample")
    loss: float | None = Field(default=None, description="endpoint MSE to the teacher's")
    _remedy: ClassVar[str] = " (it was fitted for that step count); fit one for this one"


@SAMPLERS.register
class FittedSolver(SamplerBase):
    """A one-NFE-per-step predictor-corrector whose grid and coefficients were fitted.

    Made by [`fit_solver`][diffkit.samplers.fit_solver]; its ``spacing`` is the fitted
    [`FittedGrid`][diffkit.samplers.FittedGrid] (with what the fit cost). Step ``i``
    predicts ``(sigma_{i+1}/sigma_i) x_i + sum_k data[i][k] D_{i-k}``, evaluates
    ``D_{i+1}`` there and keeps ``(sigma_{i+1}/sigma_i) x_i + correct[i][0] D_{i+1} +
    sum_k correct[i][k+1] D_{i-k}``; the last step is ``sum_k data[-1][k] D_{N-1-k}``.
    ``alpha`` and ``sigma`` at the fitted times are kept to check that it runs on the
    schedule it was fitted on.
    """

    kind: Literal["fitted"] = "fitted"
    spacing: AnySpacing = Field(description="the fitted time grid (a FittedGrid)")
    data: tuple[tuple[float, ...], ...] = Field(description="predictor coefficients per step")
    correct: tuple[tuple[float, ...], ...] = Field(description="corrector coefficients per step")
    alpha: tuple[float, ...] = Field(description="alpha(t) at the times it was fitted with")
    sigma: tuple[float, ...] = Field(description="sigma(t) at the times it was fitted with")

    @model_validator(mode="after")
    def _consistent(self) -> "FittedSolver":
        n = len(self.data)
        lengths = {len(self.correct) + 1, len(self.alpha), len(self.sigma)}
        if lengths != {n}:
            raise ValueError(
                f"FittedSolver: {n} steps need {n} data, {n - 1} correct, {n} alpha and "
                f"{n} sigma entries; got {len(self.data)}, {len(self.correct)}, "
                f"{len(self.alpha)}, {len(self.sigma)}"
            )
        return self

    @property
    def steps(self) -> int:
        """The step count it was fitted for (the only one it runs)."""
        return len(self.data)

    def plan(self, grid: Grid) -> list[Step]:
        """The fitted coefficients, after checking ``grid`` is the fitted schedule's."""
        n = grid.steps
        if n != self.steps:
            raise ValueError(f"this solver was fitted for steps={self.steps}, got steps={n}")
        for name, fitted, got in (
            ("alpha", self.alpha, grid.alpha[:n]),
            ("sigma", self.sigma, grid.sigma[:n]),
        ):
            if any(abs(a - b) > 1e-5 * max(abs(a), 1e-3) for a, b in zip(fitted, got)):
                raise ValueError(
                    f"schedule mismatch: {name} at the fitted times is {list(got)}, the solver "
                    f"was fitted with {list(fitted)}; fit it again on this schedule"
                )
        plan = []
        for i in range(n):
            keep = grid.sigma[i + 1] / grid.sigma[i]
            correct = self.correct[i] if i < n - 1 else None
            plan.append(Step(keep=keep, data=self.data[i], correct=correct))
        return plan


# --------------------------------------------------------------------------------------
# The teacher and the search
# --------------------------------------------------------------------------------------


class _Counter:
    """The denoiser, counting its calls (one call = one NFE for the whole batch)."""

    prediction: Prediction

    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser, self.prediction, self.calls = denoiser, denoiser.prediction, 0

    def __call__(self, x_t: Sample, t: Time, cond: Conditioning | None = None) -> Sample:
        self.calls += 1
        return self.denoiser(x_t, t, cond)


@dataclasses.dataclass
class _Teacher:
    """The fine grid, its evaluator and the teacher's states (index ``j``) and endpoint."""

    grid: Grid
    model: _Model
    states: list[Tensor]
    end: Tensor
    nfe: int


def _teacher(
    denoiser: _Counter,
    schedule: NoiseSchedule,
    noise: Tensor,
    teacher_steps: int,
    cond: Conditioning | None,
    guidance: float,
    uncond: Conditioning | None,
) -> _Teacher:
    times = LogSNR()(schedule, teacher_steps)[:-1]
    fine = Explicit(times=tuple(times.tolist()))
    grid = make_grid(schedule, fine, teacher_steps, noise.device)
    model = _Model(denoiser, grid, noise, cond, guidance, uncond)
    states = [noise.to(model.dtype) * grid.sigma[0]]

    def keep(i: int, t: Tensor, x: Tensor, x0: Tensor) -> None:
        states.append(x)

    teacher = UniPC(order=2, spacing=fine, final="extrapolated")
    kwargs: dict[str, Any] = {"cond": cond, "guidance": guidance, "uncond": uncond}
    end = teacher.sample(denoiser, schedule, noise, steps=teacher_steps, callback=keep, **kwargs)
    nfe, denoiser.calls = denoiser.calls, 0
    return _Teacher(grid, model, states[:teacher_steps], end.to(model.dtype), nfe)


def _starts(times: Sequence[float], steps: int) -> list[tuple[int, ...]]:
    """The usual grids on the teacher's points: log-SNR uniform, uniform t, trailing t."""
    points = len(times)
    fine = torch.tensor(times, dtype=_F64)
    t_max, t_min = times[0], times[-1]
    starts = [tuple(round(i * (points - 1) / steps) for i in range(steps))]
    for last in (t_min, t_max / steps):
        wanted = torch.linspace(t_max, last, steps, dtype=_F64)
        index = [int((fine - t).abs().argmin()) for t in wanted.tolist()]
        for i in range(1, steps):  # strictly increasing, inside the fine grid
            index[i] = max(index[i], index[i - 1] + 1)
        if index[-1] < points:
            starts.append(tuple(index))
    return list(dict.fromkeys(starts))


def _search(
    points: int, starts: Sequence[tuple[int, ...]], loss: Callable[[tuple[int, ...]], float]
) -> tuple[int, ...]:
    """Coordinate search over increasing indices in ``[0, points)``, the first fixed at 0.

    From each of ``starts`` it moves one index at a time by halving strides while
    ``loss`` falls; the lowest loss over all starts wins. Every index set is evaluated at
    most once.
    """
    seen: dict[tuple[int, ...], float] = {}

    def value(index: tuple[int, ...]) -> float:
        if index not in seen:
            seen[index] = loss(index)
        return seen[index]

    ends = []
    for best in starts:
        steps = len(best)
        stride = 1 << max(0, int(math.log2(max(points / 8, 1))))
        while stride >= 1:
            improved = True
            while improved:
                improved = False
                for j in range(1, steps):
                    for move in (-stride, stride):
                        cand = list(best)
                        cand[j] += move
                        trial = tuple(cand)
                        if not 0 < trial[j] < points or any(
                            b <= a for a, b in itertools.pairwise(trial)
                        ):
                            continue
                        if value(trial) < value(best):
                            best, improved = trial, True
            stride //= 2
        ends.append(best)
    return min(ends, key=value)


def _mse(x: Tensor, y: Tensor) -> float:
    value = float((x.to(_F64) - y.to(_F64)).square().mean())
    return value if math.isfinite(value) else math.inf


def _finite(loss: float) -> float | None:
    return loss if math.isfinite(loss) else None


def _consistent_lstsq(features: Sequence[Tensor], target: Tensor, total: float) -> list[float]:
    """``argmin_c |target - sum_k c_k features[k]|²`` subject to ``sum_k c_k = total``."""
    if len(features) == 1:
        return [total]
    first = features[0].reshape(-1).to(_F64)
    rest = torch.stack([f.reshape(-1).to(_F64) - first for f in features[1:]], 1)
    rhs = target.reshape(-1).to(_F64) - total * first
    gram = rest.T @ rest
    ridge = 1e-12 * float(gram.diagonal().sum()) + 1e-300
    eye = torch.eye(gram.shape[0], dtype=_F64, device=gram.device)
    u = torch.linalg.solve(gram + ridge * eye, rest.T @ rhs).tolist()
    return [total - sum(u), *u]


def _combine(coefs: Sequence[float], features: Sequence[Tensor]) -> Tensor:
    out = features[0] * coefs[0]
    for c, f in zip(coefs[1:], features[1:]):
        out = out + f * c
    return out


@dataclasses.dataclass
class _Fit:
    data: list[tuple[float, ...]]
    correct: list[tuple[float, ...]]
    loss: float


def _fit_steps(teacher: _Teacher, index: tuple[int, ...], history: int) -> _Fit:
    """Greedy least-squares coefficients of every step on the grid ``index`` (K NFE)."""
    grid, model, steps = teacher.grid, teacher.model, len(index)
    x = teacher.states[0]
    past = [model(x, 0)]
    data: list[tuple[float, ...]] = []
    correct: list[tuple[float, ...]] = []
    for i in range(steps):
        j = index[i]
        if i == steps - 1:  # onto the data: weights of D_{N-1}, D_{N-2}, ... summing to 1
            coefs = _consistent_lstsq(past, teacher.end, 1.0)
            data.append(tuple(coefs))
            x = _combine(coefs, past)
            break
        k = index[i + 1]
        keep = grid.sigma[k] / grid.sigma[j]
        total = grid.alpha[k] - grid.sigma[k] * grid.alpha[j] / grid.sigma[j]
        base = x * keep
        target = teacher.states[k] - base
        coefs = _consistent_lstsq(past, target, total)
        new = model(base + _combine(coefs, past), k)
        fixed = _consistent_lstsq([new, *past], target, total)
        data.append(tuple(coefs))
        correct.append(tuple(fixed))
        x = base + _combine(fixed, [new, *past])
        past = [new, *past][:history]
    return _Fit(data, correct, _mse(x, teacher.end))


def _check_args(steps: int, teacher_steps: int, noise: Tensor) -> None:
    _check(steps)
    if teacher_steps <= steps:
        raise ValueError(f"teacher_steps ({teacher_steps}) must exceed steps ({steps})")
    if not noise.is_floating_point() or noise.ndim < 2:
        shape = tuple(noise.shape)
        raise ValueError(f"noise must be a float tensor (batch, ...), got {noise.dtype} {shape}")


# --------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------


@torch.no_grad()
def fit_solver(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    noise: Sample,
    steps: int,
    *,
    teacher_steps: int = 150,
    history: int = 3,
    cond: Conditioning | None = None,
    guidance: float = 1.0,
    uncond: Conditioning | None = None,
) -> FittedSolver:
    """Fit a ``steps``-NFE solver's grid and coefficients to ``denoiser`` (module docstring).

    ``noise`` ``(batch, *shape)`` is standard-normal calibration noise (a few hundred to
    a few thousand samples), independent of the noise sampled with the result. The fit
    costs ``teacher_steps`` NFE per sample for the teacher and ``steps`` per search trial
    (reported as ``teacher_nfe`` / ``search_nfe``); ``history`` is how many past ``D``
    each step combines.
    """
    _check_args(steps, teacher_steps, noise)
    uncond = unused_uncond("fit_solver", guidance, uncond)
    if history < 1:
        raise ValueError(f"history must be at least 1, got {history}")
    counter = _Counter(denoiser)
    teacher = _teacher(counter, schedule, noise, teacher_steps, cond, guidance, uncond)
    fits: dict[tuple[int, ...], _Fit] = {}

    def loss(index: tuple[int, ...]) -> float:
        fits[index] = _fit_steps(teacher, index, history)
        return fits[index].loss

    best = _search(teacher_steps, _starts(teacher.grid.t[:-1], steps), loss)
    teacher.model.raise_if_nonfinite()
    fit, grid = fits[best], teacher.grid
    fitted = FittedGrid(
        times=tuple(grid.t[j] for j in best),
        teacher_nfe=teacher.nfe,
        search_nfe=counter.calls,
        loss=_finite(fit.loss),
    )
    return FittedSolver(
        spacing=fitted,
        data=tuple(fit.data),
        correct=tuple(fit.correct),
        alpha=tuple(grid.alpha[j] for j in best),
        sigma=tuple(grid.sigma[j] for j in best),
    )


@torch.no_grad()
def fit_grid(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    noise: Sample,
    steps: int,
    *,
    sampler: SamplerBase | None = None,
    teacher_steps: int = 150,
    cond: Conditioning | None = None,
    guidance: float = 1.0,
    uncond: Conditioning | None = None,
) -> FittedGrid:
    """Fit the ``steps`` evaluation times of ``sampler`` to ``denoiser`` (module docstring).

    ``sampler`` (default: UniPC-3 with the extrapolated last step) is any sampler config
    with a ``spacing`` field; the grid minimises its endpoint's mean squared distance to
    a ``teacher_steps``-step teacher from the calibration ``noise``. Use the result as
    that sampler's ``spacing`` with the same ``steps``.
    """
    _check_args(steps, teacher_steps, noise)
    uncond = unused_uncond("fit_grid", guidance, uncond)
    sampler = sampler if sampler is not None else UniPC(order=3, final="extrapolated")
    if not isinstance(sampler, SamplerBase) or "spacing" not in type(sampler).model_fields:
        raise ValueError(f"sampler must be a sampler with a 'spacing' field, got {sampler!r}")
    counter = _Counter(denoiser)
    teacher = _teacher(counter, schedule, noise, teacher_steps, cond, guidance, uncond)
    generator = torch.Generator(noise.device).manual_seed(0)
    kwargs: dict[str, Any] = {"cond": cond, "guidance": guidance, "uncond": uncond}

    losses: dict[tuple[int, ...], float] = {}

    def loss(index: tuple[int, ...]) -> float:
        spacing = Explicit(times=tuple(teacher.grid.t[j] for j in index))
        trial = sampler.model_copy(update={"spacing": spacing})
        generator.manual_seed(0)  # a stochastic sampler sees the same draws in every trial
        x = trial.sample(counter, schedule, noise, steps=steps, generator=generator, **kwargs)
        losses[index] = _mse(x, teacher.end)
        return losses[index]

    best = _search(teacher_steps, _starts(teacher.grid.t[:-1], steps), loss)
    return FittedGrid(
        times=tuple(teacher.grid.t[j] for j in best),
        teacher_nfe=teacher.nfe,
        search_nfe=counter.calls,
        loss=_finite(losses[best]),
    )
