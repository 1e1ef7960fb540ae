"""Time discretisation: where a sampler evaluates the denoiser (its time grid).

A spacing turns a schedule and a number of steps ``N`` into ``N + 1`` decreasing times
``t_0 = t_max > ... > t_{N-1} = t_min > t_N = 0``: the sampler evaluates the denoiser at
the first ``N`` and its last step lands on the data (``t = 0``, ``sigma = 0``).

Spacings are defined on the schedule's own scale, so the same spacing means the same
thing for every schedule: uniform in ``t``, uniform in log-SNR, Karras et al.'s ``rho``
ramp in ``sigma / alpha``, or an explicit list of times. Endpoints whose log-SNR is
infinite (``t = 1`` of rectified flow or a zero-terminal-SNR schedule) are kept as the
first time; the other points are then spread from the next uniform-in-t time.
"""

import abc
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BeforeValidator, Field, SerializeAsAny, model_validator
from torch import Tensor
from typing_extensions import Protocol, runtime_checkable

from diffkit.config import Config, Registry, field_error
from diffkit.protocols import NoiseSchedule, _ProtocolMeta

__all__ = [
    "SPACINGS",
    "AnySpacing",
    "Explicit",
    "Karras",
    "LCMSpacing",
    "Leading",
    "LogSNR",
    "Spacing",
    "SpacingBase",
    "Timesteps",
    "UniformTime",
    "diffusers_indices",
]

_F64 = torch.float64


@runtime_checkable
class Spacing(Protocol, metaclass=_ProtocolMeta):
    """``(schedule, steps) -> times``: ``steps + 1`` decreasing times ending at ``t = 0``."""

    def __call__(
        self, schedule: NoiseSchedule, steps: int, device: torch.device | None = None
    ) -> Tensor:
        """The time grid, float64 on the CPU, shape ``(steps + 1,)``."""
        ...


def _log_snr_at(schedule: NoiseSchedule, t: Sequence[float], device: torch.device | None) -> Tensor:
    values = schedule.log_snr(torch.tensor(list(t), dtype=_schedule_dtype(device), device=device))
    return values.to("cpu", _F64)


def _t_at(schedule: NoiseSchedule, log_snr: Tensor, device: torch.device | None) -> Tensor:
    t = schedule.t_of_log_snr(log_snr.to(device=device, dtype=_schedule_dtype(device)))
    return t.to("cpu", _F64)


def _schedule_dtype(device: torch.device | None) -> torch.dtype:
    # MPS has no float64; everywhere else the grid is computed in double precision.
    return torch.float32 if device is not None and device.type == "mps" else _F64


def _finish(t: Tensor, t_max: float, t_min: float) -> Tensor:
    """Pin the endpoints exactly, enforce monotonicity and append ``t = 0`` (data).

    On the grid's Python floats: a handful of tensor operations on a few dozen numbers
    would cost more than the arithmetic.
    """
    times = t.tolist()
    times[-1] = t_min
    times[0] = t_max  # with one step, the only evaluation is at t_max
    return torch.tensor([*itertools.accumulate(times, min), 0.0], dtype=_F64)


def _check(steps: int) -> None:
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")


def _spread(
    schedule: NoiseSchedule,
    steps: int,
    device: torch.device | None,
    t_max: float,
    t_min: float,
    ramp: Callable[[float, float, int], Tensor],
) -> Tensor:
    """``steps`` log-SNR values from ``ramp(lo, hi, n)`` mapped to times, plus ``t = 0``.

    An infinite log-SNR at ``t_max`` (pure noise) keeps ``t_max`` as the first time and
    spreads the other ``steps - 1`` from the next evenly spaced time.
    """
    hi, lo = _log_snr_at(schedule, [t_min, t_max], device).tolist()
    if math.isfinite(lo) or steps == 1:
        lo = lo if math.isfinite(lo) else hi - 1.0
        return _finish(_t_at(schedule, ramp(lo, hi, steps), device), t_max, t_min)
    t_next = t_max - (t_max - t_min) / (steps - 1)
    lo = _log_snr_at(schedule, [t_next], device).item()
    rest = _t_at(schedule, ramp(lo, hi, steps - 1), device)
    return _finish(torch.cat([rest.new_full((1,), t_max), rest]), t_max, t_min)


class SpacingBase(Config):
    """A spacing that is its own config: frozen fields, validated once, and ``__call__``.

    Subclasses declare ``kind: Literal["name"] = "name"`` and register with
    ``SPACINGS.register(cls)``; a sampler's ``spacing`` field takes any of them.
    """

    @abc.abstractmethod
    def __call__(
        self, schedule: NoiseSchedule, steps: int, device: torch.device | None = None
    ) -> Tensor:
        """The time grid, float64 on the CPU, shape ``(steps + 1,)``."""

    def model_times(self, t: Tensor) -> Tensor | None:
        """The times the denoiser is told at the grid's times ``t`` (``None``: ``t`` itself)."""
        return None

    def t_floor(self) -> float:
        """A time no evaluation falls below, for any step count (0: not known)."""
        return 0.0

    def starting_at(self, t: float) -> "SpacingBase":
        """This spacing with its first evaluation at ``t`` (``sample(..., t_start=t)``).

        A spacing without a free first time refuses with a ``ValueError`` naming ``t_start``.
        """
        raise ValueError(
            f"t_start: {type(self).__name__} has no free first time; use a spacing with t_max "
            "(UniformTime, LogSNR, Karras) or Explicit times starting at t_start"
        )


_T_MAX = Field(default=1.0, description="first (noisiest) evaluation time, in (0, 1]")
_T_MIN = Field(default=1e-3, description="last evaluation time before the data, below t_max")


class _Ends(SpacingBase):
    """A ramp from ``t_max`` down to ``t_min``: ``0 < t_min < t_max <= 1``."""

    t_max: float = _T_MAX
    t_min: float = _T_MIN

    @model_validator(mode="after")
    def _valid_ends(self) -> "_Ends":
        owner, t_max, t_min = type(self).__name__, self.t_max, self.t_min
        if not 0 < t_max <= 1:
            message = f"{owner}: t_max (first evaluation time) must be in (0, 1], got {t_max}"
            raise field_error(owner, "t_max", message, t_max)
        if not 0 < t_min < 1:
            message = (
                f"{owner}: t_min (last evaluation time before the data) must be in (0, 1), "
                f"got {t_min}"
            )
            raise field_error(owner, "t_min", message, t_min)
        if t_min >= t_max:
            message = (
                f"{owner}: t_min ({t_min}, the last evaluation time) must be below "
                f"t_max ({t_max}, the first)"
            )
            raise field_error(owner, "t_min", message, t_min)
        return self

    def t_floor(self) -> float:
        """The last evaluation time, ``t_min``."""
        return self.t_min

    def starting_at(self, t: float) -> SpacingBase:
        """This spacing with ``t_max = t`` (validated: ``t_min < t <= 1``)."""
        if not self.t_min < t <= 1:
            raise ValueError(
                f"t_start ({t}) must be in (t_min, 1] = ({self.t_min}, 1] for {type(self).__name__}"
            )
        return type(self).model_validate({**self.model_dump(), "t_max": t})


class _Ramp(_Ends):
    """``steps`` log-SNR values from ``ramp``, mapped to times (see ``_spread``).

    ``snap = N`` tells the denoiser the nearest of ``N`` training steps' times
    ``(i + 1) / N`` (half to even, as numpy) while the noise levels stay the ramp's:
    diffusers' DPM-Solver and UniPC schedulers call the model at rounded Karras / Lu
    timesteps.
    """

    snap: int | None = Field(
        default=None, ge=1, description="tell the model the nearest of N training steps' times"
    )

    def model_times(self, t: Tensor) -> Tensor | None:
        """The grid's times rounded to the nearest training step (with ``snap``)."""
        if self.snap is None:
            return None
        n = self.snap
        return (torch.round(t * n - 1).clamp(min=0) + 1) / n

    def __call__(
        self, schedule: NoiseSchedule, steps: int, device: torch.device | None = None
    ) -> Tensor:
        """The time grid, float64 on the CPU, shape ``(steps + 1,)``."""
        _check(steps)
        return _spread(schedule, steps, device, self.t_max, self.t_min, self.ramp)

    @abc.abstractmethod
    def ramp(self, lo: float, hi: float, n: int) -> Tensor:
        """``n`` increasing log-SNR values from ``lo`` to ``hi`` (float64)."""


def _positive(owner: str, name: str, value: float) -> None:
    if not value > 0:
        raise field_error(owner, name, f"{owner}: {name} must be positive, got {value}", value)


class UniformTime(_Ends):
    """Evenly spaced times from ``t_max`` to ``t_min`` (diffusers' ``"linspace"``).

    ``trailing=True`` ends at ``t_min = t_max / steps`` instead, so the steps are
    ``t_max / steps`` apart all the way to the data (diffusers' ``"trailing"``): at low
    NFE no evaluation is spent at the lowest noise levels.
    """

    kind: Literal["uniform"] = "uniform"
    trailing: bool = Field(default=False, description="end at t_max / steps, not t_min")

    def t_floor(self) -> float:
        """``t_min``; trailing, ``t_max / steps`` has no floor (0)."""
        return 0.0 if self.trailing else self.t_min

    def __call__(
        self, schedule: NoiseSchedule, steps: int, device: torch.device | None = None
    ) -> Tensor:
        """The time grid, float64 on the CPU, shape ``(steps + 1,)``."""
        _check(steps)
        t_min = self.t_max / steps if self.trailing else self.t_min
        t = torch.linspace(self.t_max, t_min, steps, dtype=_F64)
        return _finish(t, self.t_max, t_min)


class Leading(SpacingBase):
    """diffusers' ``"leading"`` spacing of a model trained on ``num_train`` steps.

    Training indices ``k * (num_train // steps) + steps_offset`` for ``k = steps - 1 ... 0``
    (Stable Diffusion 1.x's DDIM / PNDM: ``steps_offset=1``), as times
    ``t = (index + 1) / num_train`` ([`Discrete`][diffkit.schedules.Discrete]'s
    ``t_from_index``). Its noisiest evaluation is below ``t = 1`` and its last at
    ``index = steps_offset``.
    """

    kind: Literal["leading"] = "leading"
    num_train: int = Field(default=1000, ge=1, description="training steps of the model")
    steps_offset: int = Field(default=0, ge=0, description="added to every index (diffusers)")

    def t_floor(self) -> float:
        """The first training step's time, ``1 / num_train``."""
        return 1 / self.num_train

    @model_validator(mode="after")
    def _valid_offset(self) -> "Leading":
        if self.steps_offset >= self.num_train:
            message = (
                f"Leading: steps_offset ({self.steps_offset}) must be below num_train "
                f"({self.num_train})"
            )
            raise field_error("Leading", "steps_offset", message, self.steps_offset)
        return self

    def __call__(
        self, schedule: NoiseSchedule, steps: int, device: torch.device | None = None
    ) -> Tensor:
        """The time grid, float64 on the CPU, shape ``(steps + 1,)``."""
        _check(steps)
        ratio = self.num_train // steps
        if ratio < 1:
            raise ValueError(
                f"Leading: steps ({steps}) must not exceed num_train ({self.num_train})"
            )
        index = diffusers_indices("leading", self.num_train, steps, self.steps_offset)
        times = [(min(i, self.num_train - 1) + 1) / self.num_train for i in index]
        return torch.tensor([*times, 0.0], dtype=_F64)


def diffusers_indices(
    spacing: Literal["linspace", "leading", "trailing"],
    num_train: int,
    steps: int,
    offset: int = 0,
    rounded: bool = True,
    drop_last: bool = False,
) -> list[float]:
    """diffusers' training-step indices for ``steps`` steps, noisiest first (float64).

    ``drop_last``: spread ``steps + 1`` points and drop the last (its DPM-Solver, UniPC);
    ``rounded=False`` keeps ``"linspace"``'s fractional indices (its Euler, Heun, LMS).
    """
    n = steps + 1 if drop_last else steps
    if spacing == "linspace":
        index = torch.linspace(0, num_train - 1, n, dtype=_F64)
        index = index.round() if rounded else index.to(torch.float32).to(_F64)
    elif spacing == "leading":
        index = torch.arange(n, dtype=_F64) * (num_train // n) + offset
    else:
        index = torch.arange(float(num_train), 0, -num_train / steps, dtype=_F64).round() - 1
        return index.tolist()
    return index.flip(0)[:steps].tolist()


class Timesteps(SpacingBase):
    """diffusers' ``timestep_spacing`` of a model trained on ``num_train`` steps.

    The training-step indices of ``"linspace"``, ``"leading"`` (plus ``steps_offset``) or
    ``"trailing"``, as diffusers' scheduler of that family computes them (see
    ``diffusers_indices``), at times ``t = (index + 1) / num_train``
    ([`Discrete`][diffkit.schedules.Discrete]'s ``t_from_index``).
    """

    kind: Literal["timesteps"] = "timesteps"
    spacing: Literal["linspace", "leading", "trailing"] = Field(
        default="leading", description="diffusers' timestep_spacing"
    )
    num_train: int = Field(default=1000, ge=2, description="training steps of the model")
    steps_offset: int = Field(default=0, ge=0, description="added to leading indices")
    rounded: bool = Field(default=True, description="integer indices (False: Euler's linspace)")
    drop_last: bool = Field(
        default=False, description="spread steps + 1 points, drop the last (DPM-Solver, UniPC)"
    )

    def t_floor(self) -> float:
        """The first training step's time, ``1 / num_train``."""
        return 1 / self.num_train

    def __call__(
        self, schedule: NoiseSchedule, steps: int, device: torch.device | None = None
    ) -> Tensor:
        """The time grid, float64 on the CPU, shape ``(steps + 1,)``."""
        _check(steps)
        if steps > self.num_train:
            raise ValueError(f"Timesteps: steps ({steps}) exceeds num_train ({self.num_train})")
        index = diffusers_indices(
            self.spacing, self.num_train, steps, self.steps_offset, self.rounded, self.drop_last
        )
        index = [min(i, self.num_train - 1) for i in index]
        return torch.tensor([(i + 1) / self.num_train for i in index] + [0.0], dtype=_F64)


class LCMSpacing(SpacingBase):
    """The grid of a latent consistency model: ``steps`` of its ``original_steps`` times.

    diffusers' ``LCMScheduler.set_timesteps``: the distillation grid is the training
    indices ``j * k - 1``, ``k = num_train // original_steps``, for
    ``j = 1 ... int(original_steps * strength)``, noisiest first; ``steps`` of them are
    taken at the positions ``floor(linspace(0, n, steps, endpoint=False))``, as times
    ``t = (index + 1) / num_train``. ``steps`` may not exceed ``original_steps`` or the
    ``n`` indices that ``strength`` leaves (diffusers' image-to-image ``strength``).
    """

    kind: Literal["lcm"] = "lcm"
    num_train: int = Field(default=1000, ge=1, description="training steps of the model")
    original_steps: int = Field(default=50, ge=1, description="the distillation grid's steps")
    strength: float = Field(default=1.0, gt=0, le=1, description="share of that grid used")

    @model_validator(mode="after")
    def _valid_steps(self) -> "LCMSpacing":
        if self.original_steps > self.num_train:
            message = (
                f"LCMSpacing: original_steps ({self.original_steps}) must not exceed "
                f"num_train ({self.num_train})"
            )
            raise field_error("LCMSpacing", "original_steps", message, self.original_steps)
        if int(self.original_steps * self.strength) < 1:
            message = f"LCMSpacing: strength ({self.strength}) leaves none of the original steps"
            raise field_error("LCMSpacing", "strength", message, self.strength)
        return self

    def _indices(self) -> list[int]:
        """The distillation grid's training indices, noisiest first."""
        k = self.num_train // self.original_steps
        n = int(self.original_steps * self.strength)  # diffusers' int(), not round()
        return [j * k - 1 for j in range(n, 0, -1)]

    def __call__(
        self, schedule: NoiseSchedule, steps: int, device: torch.device | None = None
    ) -> Tensor:
        """The time grid, float64 on the CPU, shape ``(steps + 1,)``."""
        _check(steps)
        origin = self._indices()
        if steps > min(self.original_steps, len(origin)):
            raise ValueError(
                f"LCMSpacing: steps ({steps}) must not exceed the {len(origin)} steps of its "
                f"original grid (original_steps={self.original_steps}, strength={self.strength})"
            )
        positions = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False))
        times = [(origin[int(p)] + 1) / self.num_train for p in positions]
        return torch.tensor([*times, 0.0], dtype=_F64)

    def starting_at(self, t: float) -> SpacingBase:
        """The grid of the ``strength`` whose first time is ``t``, a time of the original grid."""
        k = self.num_train // self.original_steps
        n = round(t * self.num_train / k)
        if not (1 <= n <= self.original_steps and math.isclose(n * k / self.num_train, t)):
            raise ValueError(
                f"t_start ({t}) must be a time of the LCM grid, j * {k} / {self.num_train} for "
                f"j = 1 ... {self.original_steps}"
            )
        # half a step above n / original_steps, so that diffusers' int() gives n exactly
        strength = min((n + 0.5) / self.original_steps, 1.0)
        return self.model_copy(update={"strength": strength})


class LogSNR(_Ramp):
    """Evenly spaced log-SNR from ``t_max`` to ``t_min`` (DPM-Solver's ``"logSNR"``).

    ``power != 1`` warps the ramp, ``u -> u ** power`` on ``[0, 1]``: above 1 it puts more
    of the steps at high noise (a polynomial in log-sigma, k-diffusion's
    ``polyexponential``).
    """

    kind: Literal["logsnr"] = "logsnr"
    power: float = Field(default=1.0, description="ramp exponent (> 0); >1 favours high noise")

    @model_validator(mode="after")
    def _valid_power(self) -> "LogSNR":
        _positive(type(self).__name__, "power", self.power)
        return self

    def ramp(self, lo: float, hi: float, n: int) -> Tensor:
        """Evenly spaced in ``u``, warped as ``u ** power``."""
        return lo + torch.linspace(0.0, 1.0, n, dtype=_F64) ** self.power * (hi - lo)


class Karras(_Ramp):
    """Karras et al. (2022): ``(sigma/alpha) ** (1/rho)`` evenly spaced, ``rho = 7``.

    The ramp starts at ``min(sigma/alpha at t_max, sigma_max)``. Some schedules end at a
    huge ``sigma/alpha`` (``Cosine`` clamps log-SNR at -20: ``e^10 ≈ 22026``; diffusers'
    ``squaredcos_cap_v2`` betas reach 20291), and a ``rho = 7`` ramp from there spends most
    of its steps where ``x_t`` is noise for any unit-scale data (7 of 10 at ``t > 0.98``
    on ``Cosine``). The default ceiling, 200, is above the terminal value of the schedules
    k-diffusion and diffusers use Karras sigmas with (EDM 80, DDPM linear 157, Stable
    Diffusion 14.6), so those grids are unchanged; ``sigma_max=None`` removes it. A capped
    ramp starts at the time where ``sigma/alpha = sigma_max``, below ``t_max``; an
    infinite ``sigma/alpha`` at ``t_max`` (pure noise) is kept as the first point.
    """

    kind: Literal["karras"] = "karras"
    rho: float = Field(default=7.0, description="ramp exponent (> 0; 7 in Karras et al.)")
    sigma_max: float | None = Field(
        default=200.0,
        description="ceiling on the first finite sigma/alpha (> 0); None: the schedule's",
    )

    @model_validator(mode="after")
    def _valid_rho(self) -> "Karras":
        _positive(type(self).__name__, "rho", self.rho)
        if self.sigma_max is not None:
            _positive(type(self).__name__, "sigma_max", self.sigma_max)
        return self

    def __call__(
        self, schedule: NoiseSchedule, steps: int, device: torch.device | None = None
    ) -> Tensor:
        """The time grid, float64 on the CPU, shape ``(steps + 1,)``."""
        _check(steps)
        t_max = self.t_max
        if self.sigma_max is not None:
            lo = _log_snr_at(schedule, [t_max], device).item()
            floor = -2 * math.log(self.sigma_max)
            if math.isfinite(lo) and lo < floor:
                t_cap = _t_at(schedule, torch.tensor([floor], dtype=_F64), device).item()
                t_max = t_cap if self.t_min < t_cap < t_max else t_max
        return _spread(schedule, steps, device, t_max, self.t_min, self.ramp)

    def starting_at(self, t: float) -> SpacingBase:
        """This spacing from ``t_max = t``, uncapped: a given start is kept."""
        spacing = super().starting_at(t)
        return spacing.model_copy(update={"sigma_max": None})

    def ramp(self, lo: float, hi: float, n: int) -> Tensor:
        """``sigma / alpha = exp(-log_snr / 2)`` spaced evenly in its ``1/rho``-th power."""
        # in logs: (sigma/alpha)^(1/rho) overflows a float for a small rho (1e-3)
        a_max, a_min = -lo / (2 * self.rho), -hi / (2 * self.rho)
        u = torch.linspace(0.0, 1.0, n, dtype=_F64)
        mixed = torch.logaddexp(torch.log1p(-u) + a_max, torch.log(u) + a_min)
        return -2 * self.rho * mixed


class _Listed(SpacingBase):
    """Evaluation times given as a list: non-empty, strictly decreasing, in ``(0, 1]``."""

    times: tuple[float, ...] = Field(description="decreasing evaluation times; t=0 is appended")
    _remedy: ClassVar[str] = ""

    @model_validator(mode="after")
    def _valid_times(self) -> "_Listed":
        owner, times = type(self).__name__, self.times
        if not times:
            message = f"{owner}: times must hold at least one evaluation time"
            raise field_error(owner, "times", message, times)
        if not all(0 < t <= 1 for t in times):
            message = f"{owner}: times must lie in (0, 1] (t = 0 is appended), got {times}"
            raise field_error(owner, "times", message, times)
        if not all(a > b for a, b in itertools.pairwise(times)):
            message = f"{owner}: times must be strictly decreasing, got {times}"
            raise field_error(owner, "times", message, times)
        return self

    def __call__(
        self, schedule: NoiseSchedule, steps: int, device: torch.device | None = None
    ) -> Tensor:
        """The time grid, float64 on the CPU, shape ``(steps + 1,)``."""
        n = len(self.times)
        if steps != n:
            raise ValueError(
                f"{type(self).__name__} has {n} times (steps={n}); asked for steps={steps}"
                f"{self._remedy}"
            )
        return torch.tensor([*self.times, 0.0], dtype=_F64)

    def t_floor(self) -> float:
        """The last listed time."""
        return self.times[-1]

    def starting_at(self, t: float) -> SpacingBase:
        """Itself, when its first time is ``t`` (a listed grid is not moved)."""
        if self.times[0] != t:
            raise ValueError(f"t_start ({t}) must be the first listed time, {self.times[0]}")
        return self


class Explicit(_Listed):
    """A fixed list of decreasing evaluation times (e.g. a model's trained timesteps)."""

    kind: Literal["explicit"] = "explicit"


SPACINGS: Registry[SpacingBase] = Registry("spacing")
"""``kind`` -> spacing (each spacing is its own config)."""

SPACINGS.register(UniformTime)
SPACINGS.register(LogSNR)
SPACINGS.register(Karras)
SPACINGS.register(Explicit)
SPACINGS.register(Leading)
SPACINGS.register(Timesteps)
SPACINGS.register(LCMSpacing)


def _spacing(value: Any) -> Any:
    """A sampler's ``spacing`` field: a spacing, or its dict / JSON form (by ``kind``)."""
    if isinstance(value, SpacingBase):
        return value
    if isinstance(value, Mapping | str):
        parsed = SPACINGS.parse(value if isinstance(value, str) else dict(value))
        return parsed
    raise ValueError(
        "spacing must be a spacing config (UniformTime(), LogSNR(), Karras(), Explicit(...) or "
        f"a registered SpacingBase subclass) or its dict with a 'kind'; got {type(value).__name__}"
    )


SPACING = "time grid: uniform t, uniform log-SNR, Karras rho ramp or explicit times"
"""The description of every sampler's ``spacing`` field."""
FINAL = "last step: the last denoised estimate, or two extrapolated to sigma=0"
"""The description of a multistep sampler's ``final`` field."""

if TYPE_CHECKING:
    AnySpacing = SpacingBase
else:
    AnySpacing = Annotated[SpacingBase, SerializeAsAny(), BeforeValidator(_spacing)]
    """Any registered spacing, parsed from its dict by ``kind``, saved with all its fields."""
