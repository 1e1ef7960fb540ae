"""Samplers whose step is ordinary code over an explicit history of estimates.

A [`SamplerBase`][diffkit.samplers.SamplerBase] writes each step as a linear
combination of grid values, which one shared loop runs fast. Methods that do not fit
that form (a Runge-Kutta stage at a point off the grid, as in DPM-Solver-2 and DPM++ 2S;
thresholding; churn) subclass [`StepSampler`][diffkit.samplers.StepSampler] and write
the step itself::

    def step(self, model, x, i, grid, history, noise) -> x_next

``x`` is the sample at grid point ``i``, ``history`` the tuple ``(D_i, D_{i-1}, ...)``
of the last ``memory`` denoised estimates (``D_i`` evaluated at ``x`` by the loop),
``model`` the denoiser as a [`StepModel`][diffkit.samplers.StepModel]: ``model(x, i)``
is ``D`` at grid point ``i`` and ``model.at(x, i, k)`` at the ``k``-th point off the grid
that step ``i`` asked for in ``points(grid, i)`` (by half log-SNR, evaluated on the
schedule before the loop), and ``noise(like, s_from, s_to)`` a standard normal tensor for
a step between those noise levels (a [`Noise`][diffkit.samplers.Noise], made once per
call by ``noise_source``: independent draws from the caller's generator unless the
sampler asks for a Brownian tree). ``record`` chooses what ``history`` keeps of each
point (``D`` unless a method integrates another quantity, as LMS does its slopes).
Everything else is shared with the linear samplers: the
spacing, guidance, prediction types, working precision, the callback, the NaN check
after the loop and [`prepare`][diffkit.samplers.SamplerBase.prepare]'s reusable plan.
"""

import abc
import dataclasses
import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from diffkit.protocols import NoiseSchedule, StepCallback
from diffkit.samplers._base import (
    Grid,
    Plan,
    Point,
    SamplerBase,
    Step,
    _check_steps,
    _Model,
    alpha_sigma,
)
from diffkit.samplers.noise import Noise

__all__ = ["History", "Noise", "Rng", "StepModel", "StepSampler"]

_F64 = torch.float64

History = tuple[Tensor, ...]
"""The last denoised estimates, newest first: ``(D_i, D_{i-1}, ...)``."""
Rng = torch.Generator | None
"""The random generator a step draws its noise from (``None``: torch's global one)."""


@dataclasses.dataclass(frozen=True)
class StepModel:
    """The denoiser as a step sees it: ``D`` on the grid and at the step's points off it.

    ``points[i]`` are step ``i``'s points off the grid (``t``, ``alpha``, ``sigma``,
    ``lam``), in the order ``points(grid, i)`` asked for them.
    """

    model: _Model
    points: tuple[tuple[Point, ...], ...]

    def __call__(self, x: Tensor, i: int) -> Tensor:
        """``D = E[x0 | x_t = x]`` at grid point ``i``."""
        return self.model(x, i)

    def at(self, x: Tensor, i: int, k: int = 0) -> Tensor:
        """``D`` at ``x`` and the ``k``-th point off the grid of step ``i``."""
        return self.model.at(x, self.points[i][k], i)


def _points(
    schedule: NoiseSchedule, wanted: Sequence[tuple[float, ...]], device: torch.device | None
) -> tuple[tuple[Point, ...], ...]:
    """The points at half log-SNR ``wanted[i]`` for each step ``i``, on ``schedule``."""
    lam = [value for values in wanted for value in values]
    if not lam:
        return tuple(() for _ in wanted)
    if not all(map(math.isfinite, lam)):
        raise ValueError(f"a step's points off the grid must have a finite log-SNR, got {lam}")
    t = schedule.t_of_log_snr(2 * torch.tensor(lam, dtype=_F64)).to("cpu", _F64)
    alpha, sigma = alpha_sigma(schedule, t, device)
    made = iter(
        Point(t=ti, alpha=a, sigma=s, lam=math.log(a) - math.log(s))
        for ti, a, s in zip(t.tolist(), alpha, sigma)
    )
    return tuple(tuple(next(made) for _ in values) for values in wanted)


class StepSampler(SamplerBase):
    """A sampler whose step is code: a subclass writes ``step`` (module docstring).

    A subclass declares its ``kind``, its fields and a ``spacing`` field, as every sampler
    does, and writes ``step``; ``points`` (none by default) names the points off the grid
    a step evaluates the model at, ``memory`` how many past estimates ``history`` holds,
    ``reads_estimate`` whether a step uses ``D`` at its own grid point (EDM's churn moves
    off it first, so the loop does not evaluate it there).
    """

    memory: ClassVar[int] = 1
    """How many estimates ``history`` holds: ``D_i`` and ``memory - 1`` older ones."""

    def points(self, grid: Grid, i: int) -> tuple[float, ...]:
        """Half log-SNR ``log(alpha / sigma)`` of the points off the grid step ``i`` uses."""
        return ()

    def noise_source(self, x: Tensor, grid: Grid, generator: Rng) -> Noise:
        """Where this call's step noise comes from (made once per call, before the loop)."""
        return Noise(generator)

    def reads_estimate(self, grid: Grid, i: int) -> bool:
        """Whether step ``i`` reads ``D_i`` at its grid point (the loop evaluates it): yes.

        A step that evaluates the model elsewhere instead (EDM's churn moves ``x_i`` off
        the grid first) says no: the loop then skips that evaluation, and ``history``
        holds only the older estimates ``(D_{i-1}, ...)``, at most ``memory - 1``.
        """
        return True

    def record(self, x: Tensor, d: Tensor, i: int, grid: Grid) -> Tensor:
        """What ``history`` keeps of grid point ``i``, from ``x`` there and ``D`` at it: ``D``."""
        return d

    @abc.abstractmethod
    def step(
        self, model: StepModel, x: Tensor, i: int, grid: Grid, history: History, noise: Noise
    ) -> Tensor:
        """The sample at grid point ``i + 1`` from ``x`` at point ``i``."""

    def plan(self, grid: Grid) -> list[Step]:
        """A step sampler has no linear plan: its steps are code; this raises ``TypeError``."""
        raise TypeError(
            f"{type(self).__name__} is a StepSampler: its steps are code (step), not a "
            "linear plan; use prepare(schedule, steps) for its grid and points"
        )

    def prepare(
        self, schedule: NoiseSchedule, steps: int, device: torch.device | None = None
    ) -> Plan:
        """The grid and each step's points off it for ``steps`` steps on ``schedule``."""
        _check_steps(steps)
        grid = self.grid(schedule, steps, device)
        wanted = [self.points(grid, i) for i in range(grid.steps)]
        return Plan(self, grid, (), _points(schedule, wanted, device))

    def _run(
        self,
        plan: Plan,
        model: _Model,
        x: Tensor,
        generator: torch.Generator | None,
        callback: StepCallback | None,
    ) -> Tensor:
        """``x = step(model, x, i, grid, history)`` for every step; ``D`` at each new point.

        ``D`` at a point whose step does not read it (``reads_estimate``) is evaluated only
        for a callback, which then costs one evaluation more.
        """
        grid, last, stepper = plan.grid, plan.grid.steps - 1, StepModel(model, plan.points)
        noise = self.noise_source(x, grid, generator)
        d = model(x, 0) if self.reads_estimate(grid, 0) else None
        history: History = ()
        for i in range(grid.steps):
            if d is None:
                history = history[: self.memory - 1]
            else:
                history = (self.record(x, d, i, grid), *history)[: self.memory]
            x = self.step(stepper, x, i, grid, history, noise)
            d = model(x, i + 1) if i < last and self.reads_estimate(grid, i + 1) else None
            if callback is not None:
                shown = x if i == last else d if d is not None else model(x, i + 1)
                callback(i, model.callback_times[i + 1], x, shown)
        return x
