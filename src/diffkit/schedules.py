"""Noise schedules on one continuous time ``t`` in [0, 1] (DDPM's forward process, Ho et al. 2020).

Every schedule gives ``alpha(t)``, ``sigma(t)``, ``log_snr(t) = 2 log(alpha / sigma)`` and
its inverse ``t_of_log_snr``. ``t = 0`` is data and ``t = 1`` is (nearly) pure noise;
``log_snr`` is strictly decreasing (``Cosine`` holds it at ``min_log_snr`` on the last
stretch before ``t = 1``, where ``t_of_log_snr`` gives 1). Arithmetic is done in float64
and returned in the
dtype of ``t``, so schedules are exact whatever precision the model runs in.

Beta-schedule names, which other libraries use inconsistently:

| diffkit | betas | diffusers | LDM / sgm |
| --- | --- | --- | --- |
| `LinearBeta` | ``linspace(b0, b1)`` | ``"linear"`` | — (DDPM) |
| `SqrtLinearBeta` | ``linspace(√b0, √b1)²`` | ``"scaled_linear"`` | ``"linear"`` |

Both are the continuous-time limits of their ``num_steps``-step discrete schedules;
[`Discrete`][diffkit.schedules.Discrete] serves the exact discrete ones of a trained model.
"""

import itertools
import math
from typing import TYPE_CHECKING, Annotated, Any, Literal

import torch
from jaxtyping import Float
from pydantic import Field, PrivateAttr, SerializeAsAny, field_validator, model_validator
from torch import Tensor

from diffkit.config import Config, Registry, field_error
from diffkit.protocols import NoiseSchedule
from diffkit.typing import Time, checked, host_range

__all__ = [
    "EDM",
    "SCHEDULES",
    "Cosine",
    "Discrete",
    "LinearBeta",
    "RectifiedFlow",
    "ScheduleBase",
    "SqrtLinearBeta",
    "ZeroTerminalSNR",
    "discrete_betas",
    "rescale_zero_terminal_snr",
]

SCHEDULES: Registry[NoiseSchedule] = Registry("schedule")
"""``kind`` -> schedule class (each schedule is its own config)."""

_F64 = torch.float64


def _logit(p: Tensor) -> Tensor:
    return torch.log(p) - torch.log1p(-p)


def _check_t(t: Tensor) -> None:
    """Refuse times outside ``[0, 1]`` (or NaN), looked at only on the CPU (no device sync)."""
    ends = host_range(t)
    if ends is not None and not 0.0 <= ends[0] <= ends[1] <= 1.0:
        raise ValueError(
            f"t must be times in [0, 1], got values from {ends[0]:g} to {ends[1]:g} (or NaN)"
        )


class ScheduleBase(Config):
    """Shared plumbing: subclasses give ``_log_snr`` and ``_t_of_log_snr`` in float64.

    A schedule is a frozen config (its parameters are its fields, checked when it is made)
    with its maths as methods. ``alpha`` and ``sigma`` follow from ``log_snr`` for
    variance-preserving schedules (``alpha² + sigma² = 1``); other families override
    ``_alpha_sigma``.
    """

    def _log_snr(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _t_of_log_snr(self, log_snr: Tensor) -> Tensor:
        raise NotImplementedError

    def _alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        lam = self._log_snr(t)
        return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()

    @checked
    def alpha(self, t: Time) -> Time:
        """Signal scale ``alpha(t)``."""
        _check_t(t)
        return self._alpha_sigma(t.to(_F64))[0].to(t.dtype)

    @checked
    def sigma(self, t: Time) -> Time:
        """Noise scale ``sigma(t)``."""
        _check_t(t)
        return self._alpha_sigma(t.to(_F64))[1].to(t.dtype)

    @checked
    def alpha_sigma(self, t: Time) -> tuple[Time, Time]:
        """``(alpha(t), sigma(t))`` in one call."""
        _check_t(t)
        a, s = self._alpha_sigma(t.to(_F64))
        return a.to(t.dtype), s.to(t.dtype)

    @checked
    def log_snr(self, t: Time) -> Time:
        """``lambda(t) = log(alpha² / sigma²)``, strictly decreasing in ``t``."""
        _check_t(t)
        return self._log_snr(t.to(_F64)).to(t.dtype)

    @checked
    def t_of_log_snr(self, log_snr: Time) -> Time:
        """Inverse of ``log_snr``: the time at which the log-SNR takes the given value."""
        lam = log_snr.to(_F64)
        # The ends exactly (a formula may give inf / inf there): +inf is data, -inf noise.
        t = torch.where(torch.isinf(lam), (lam < 0).to(_F64), self._t_of_log_snr(lam))
        return t.clamp(0.0, 1.0).to(log_snr.dtype)


def _increasing_betas(owner: str, start: float, end: float) -> None:
    if end <= start:
        message = f"beta_end must be larger than beta_start (got {start}, {end})"
        raise field_error(owner, "beta_end", message, end)


# --------------------------------------------------------------------------------------
# Variance-preserving schedules defined by an integrated beta: alpha² = exp(-B(t)).
# log_snr = -log(expm1(B)), so B = softplus(-log_snr).
# --------------------------------------------------------------------------------------


class LinearBeta(ScheduleBase):
    """VP schedule with ``beta(t) = N (b0 + t (b1 - b0))`` (DDPM; diffusers ``"linear"``).

    The continuous limit of DDPM's ``linspace(beta_start, beta_end, num_steps)`` betas:
    ``alpha(t)² = exp(-∫₀ᵗ beta)``; with the defaults ``beta`` runs from 0.1 to 20 (Song
    et al.).
    """

    kind: Literal["linear_beta"] = "linear_beta"
    beta_start: float = Field(
        default=1e-4, gt=0, lt=1, description="beta of the first discrete step"
    )
    beta_end: float = Field(default=0.02, gt=0, lt=1, description="beta of the last discrete step")
    num_steps: int = Field(
        default=1000, ge=2, description="number of discrete steps the betas describe"
    )

    @model_validator(mode="after")
    def _increasing(self) -> "LinearBeta":
        _increasing_betas(type(self).__name__, self.beta_start, self.beta_end)
        return self

    def _log_snr(self, t: Tensor) -> Tensor:
        b0 = self.num_steps * self.beta_start
        db = self.num_steps * (self.beta_end - self.beta_start)
        integral = b0 * t + 0.5 * db * t * t
        return -torch.log(torch.expm1(integral))

    def _t_of_log_snr(self, log_snr: Tensor) -> Tensor:
        b0 = self.num_steps * self.beta_start
        db = self.num_steps * (self.beta_end - self.beta_start)
        integral = torch.nn.functional.softplus(-log_snr)
        # 0.5 db t² + b0 t - B = 0, the positive root written to avoid cancellation.
        return 2 * integral / (b0 + torch.sqrt(b0**2 + 2 * db * integral))


class SqrtLinearBeta(ScheduleBase):
    """VP schedule with ``√beta`` linear in ``t`` (diffusers "scaled_linear", LDM "linear").

    The continuous limit of ``linspace(√beta_start, √beta_end, num_steps)²`` (Stable
    Diffusion).
    """

    kind: Literal["sqrt_linear_beta"] = "sqrt_linear_beta"
    beta_start: float = Field(
        default=0.00085, gt=0, lt=1, description="beta of the first discrete step"
    )
    beta_end: float = Field(default=0.012, gt=0, lt=1, description="beta of the last discrete step")
    num_steps: int = Field(
        default=1000, ge=2, description="number of discrete steps the betas describe"
    )

    @model_validator(mode="after")
    def _increasing(self) -> "SqrtLinearBeta":
        _increasing_betas(type(self).__name__, self.beta_start, self.beta_end)
        return self

    def _roots(self) -> tuple[float, float]:
        r0 = math.sqrt(self.beta_start)
        return r0, math.sqrt(self.beta_end) - r0

    def _log_snr(self, t: Tensor) -> Tensor:
        # ∫ N (r0 + s dr)² ds = N ((r0 + t dr)³ - r0³) / (3 dr)
        r0, dr = self._roots()
        r = r0 + t * dr
        integral = self.num_steps * (r**3 - r0**3) / (3 * dr)
        return -torch.log(torch.expm1(integral))

    def _t_of_log_snr(self, log_snr: Tensor) -> Tensor:
        r0, dr = self._roots()
        integral = torch.nn.functional.softplus(-log_snr)
        r = torch.pow(r0**3 + 3 * dr * integral / self.num_steps, 1.0 / 3.0)
        return (r - r0) / dr


class Cosine(ScheduleBase):
    """``alpha(t)² = cos²(π/2 (t+s)/(1+s)) / cos²(π/2 s/(1+s))`` with the end log-SNR clamped.

    Nichol & Dhariwal's cosine schedule. The clamp keeps ``t = 1`` at a finite log-SNR
    (``min_log_snr``), so every sampler starts from a proper Gaussian; the betas of the
    discrete version are likewise clipped at 0.999.
    """

    kind: Literal["cosine"] = "cosine"
    offset: float = Field(default=0.008, ge=0, lt=1, description="the small offset s near t = 0")
    min_log_snr: float = Field(
        default=-20.0, description="log-SNR at t = 1 is clamped to at least this"
    )

    def _log_c0(self) -> float:
        u0 = math.pi / 2 * self.offset / (1 + self.offset)
        return 2 * math.log(math.cos(u0))

    def _log_snr(self, t: Tensor) -> Tensor:
        u = math.pi / 2 * (t + self.offset) / (1 + self.offset)
        log_a2 = (2 * torch.log(torch.cos(u).clamp_min(1e-300)) - self._log_c0()).clamp(max=0.0)
        lam = log_a2 - torch.log(-torch.expm1(log_a2))
        return torch.clamp(lam, min=self.min_log_snr)

    def _t_of_log_snr(self, log_snr: Tensor) -> Tensor:
        log_a2 = torch.nn.functional.logsigmoid(log_snr)
        u = torch.acos(torch.exp(0.5 * (log_a2 + self._log_c0())).clamp(max=1.0))
        t = u * 2 / math.pi * (1 + self.offset) - self.offset
        return torch.where(log_snr <= self.min_log_snr, torch.ones_like(t), t)


class EDM(ScheduleBase):
    """``alpha = 1``, ``sigma(t) = (σmin^(1/ρ) + t (σmax^(1/ρ) - σmin^(1/ρ)))^ρ`` (EDM).

    Karras et al.'s variance-exploding schedule: uniform ``t`` gives exactly the Karras
    sigmas; ``t = 0`` is ``sigma_min``, not 0, so samplers finish with a final denoising
    step.
    """

    kind: Literal["edm"] = "edm"
    sigma_min: float = Field(default=0.002, gt=0, description="noise level at t = 0")
    sigma_max: float = Field(default=80.0, gt=0, description="noise level at t = 1")
    rho: float = Field(
        default=7.0, gt=0, description="Karras' rho: larger puts more time at low noise"
    )

    @model_validator(mode="after")
    def _ordered(self) -> "EDM":
        if self.sigma_max <= self.sigma_min:
            message = (
                f"sigma_max must be larger than sigma_min (got sigma_min={self.sigma_min}, "
                f"sigma_max={self.sigma_max})"
            )
            raise field_error("EDM", "sigma_max", message, self.sigma_max)
        # the ramp runs in sigma^(1/rho): a float must hold both ends (rho 1e-3 overflows)
        try:
            lo, hi = self._ends()
        except OverflowError:
            lo = hi = math.inf
        if not (math.isfinite(hi) and 0 < lo < hi):
            message = (
                f"rho={self.rho} is too small for sigma_min={self.sigma_min}, "
                f"sigma_max={self.sigma_max}: sigma ** (1 / rho) leaves the float range"
            )
            raise field_error("EDM", "rho", message, self.rho)
        return self

    def _ends(self) -> tuple[float, float]:
        return self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)

    def _sigma_of_t(self, t: Tensor) -> Tensor:
        lo, hi = self._ends()
        return (lo + t * (hi - lo)) ** self.rho

    def _alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.ones_like(t), self._sigma_of_t(t)

    def _log_snr(self, t: Tensor) -> Tensor:
        return -2 * torch.log(self._sigma_of_t(t))

    def _t_of_log_snr(self, log_snr: Tensor) -> Tensor:
        lo, hi = self._ends()
        sigma = torch.exp(-0.5 * log_snr)
        return (sigma ** (1 / self.rho) - lo) / (hi - lo)


class RectifiedFlow(ScheduleBase):
    """``alpha = 1 - t'``, ``sigma = t'`` with ``t' = shift·t / (1 + (shift-1)·t)``.

    Rectified flow / flow matching: a straight line from data to noise. ``log_snr`` is
    ``+inf`` at ``t = 0`` and ``-inf`` at ``t = 1`` (pure noise).
    """

    kind: Literal["rectified_flow"] = "rectified_flow"
    shift: float = Field(
        default=1.0,
        ge=1e-6,  # a smaller shift rounds 1 + (shift - 1) t to 0 near t = 1: alpha = -inf
        le=1e6,
        description="SD3 time shift: t' = shift t / (1 + (shift - 1) t); 1 is none",
    )

    def _shifted(self, t: Tensor) -> Tensor:
        return self.shift * t / (1 + (self.shift - 1) * t)

    def _alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        s = self._shifted(t)
        return 1 - s, s

    def _log_snr(self, t: Tensor) -> Tensor:
        s = self._shifted(t)
        return 2 * (torch.log1p(-s) - torch.log(s))

    def _t_of_log_snr(self, log_snr: Tensor) -> Tensor:
        s = torch.sigmoid(-0.5 * log_snr)
        return s / (self.shift - (self.shift - 1) * s)


# --------------------------------------------------------------------------------------
# Discrete schedules of trained models.
# --------------------------------------------------------------------------------------

BetaSchedule = Literal["linear_beta", "sqrt_linear_beta", "cosine"]


def discrete_betas(
    kind: BetaSchedule, num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> Float[Tensor, " steps"]:
    """The ``num_steps`` betas of a named discrete schedule, in float64.

    ``"linear_beta"`` is diffusers' ``"linear"``; ``"sqrt_linear_beta"`` is diffusers'
    ``"scaled_linear"`` and LDM's ``"linear"``; ``"cosine"`` is diffusers'
    ``"squaredcos_cap_v2"`` (betas clipped at 0.999).
    """
    if kind == "linear_beta":
        return torch.linspace(beta_start, beta_end, num_steps, dtype=_F64)
    if kind == "sqrt_linear_beta":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=_F64) ** 2
    if kind == "cosine":
        steps = torch.arange(num_steps + 1, dtype=_F64) / num_steps
        f = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {kind!r}; use one of {BetaSchedule.__args__}")


def rescale_zero_terminal_snr(
    alphas_cumprod: Float[Tensor, " steps"],
) -> Float[Tensor, " steps"]:
    """Lin et al. (2023): shift and scale ``√ᾱ`` so the last step has zero SNR, the first kept."""
    root = alphas_cumprod.to(_F64).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return root**2


_NAMED_FORM = ("beta_schedule", "num_steps", "beta_start", "beta_end", "zero_terminal_snr")
"""The keys of a ``Discrete`` given by its named betas instead of its table."""


def _named_table(
    beta_schedule: Any = "linear_beta",
    num_steps: Any = 1000,
    beta_start: Any = 1e-4,
    beta_end: Any = 0.02,
    zero_terminal_snr: Any = False,
) -> tuple[float, ...]:
    """``alphas_cumprod`` of a named discrete schedule; a ValueError naming a bad argument."""
    if beta_schedule not in BetaSchedule.__args__:
        raise ValueError(
            f"beta_schedule must be one of {BetaSchedule.__args__}, got {beta_schedule!r}"
        )
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an int of at least 2, got {num_steps!r}")
    for name, beta in (("beta_start", beta_start), ("beta_end", beta_end)):
        if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 < beta < 1:
            raise ValueError(f"{name} must be a number in (0, 1), got {beta!r}")
    if beta_schedule != "cosine" and beta_end < beta_start:
        raise ValueError(
            f"beta_end ({beta_end}) must not be below beta_start ({beta_start}) "
            f"for beta_schedule '{beta_schedule}'"
        )
    if not isinstance(zero_terminal_snr, bool):
        raise ValueError(f"zero_terminal_snr must be a bool, got {zero_terminal_snr!r}")
    betas = discrete_betas(beta_schedule, num_steps, beta_start, beta_end)
    ac = torch.cumprod(1 - betas, dim=0)
    return tuple((rescale_zero_terminal_snr(ac) if zero_terminal_snr else ac).tolist())


class Discrete(ScheduleBase):
    """A trained model's ``alphas_cumprod`` served on continuous ``t``.

    Training step index ``i`` (0-based, ``i = N-1`` the noisiest) sits at
    ``t = (i + 1) / N``; ``t = 0`` is clean data. Between steps the log-SNR is
    interpolated linearly in the index; below the first step ``alpha²`` goes linearly
    to 1 at ``t = 0``.

    Its one field is the table itself (float64 values, saved exactly in JSON); make one
    with [`from_betas`][diffkit.schedules.Discrete.from_betas],
    [`from_alphas_cumprod`][diffkit.schedules.Discrete.from_alphas_cumprod] or
    [`from_beta_schedule`][diffkit.schedules.Discrete.from_beta_schedule]. A config may
    also name the betas instead of listing the table: ``{kind: discrete, beta_schedule:
    sqrt_linear_beta, beta_start: 0.00085, beta_end: 0.012}`` (``num_steps``,
    ``zero_terminal_snr`` too); it is parsed into the table. The default is DDPM's
    1000 linear betas.

    ``interpolation`` says what is linear in the index between training steps: the
    log-SNR (``"log_snr"``, the default; k-diffusion's and diffusers' ``_sigma_to_t``), or
    ``sigma / alpha`` (``"sigma"``: diffusers' Euler, Heun, LMS and DPM-SDE schedulers,
    which ``np.interp`` their sigmas at fractional timesteps). Both agree at the steps.
    """

    kind: Literal["discrete"] = "discrete"
    alphas_cumprod: tuple[float, ...] = Field(
        default_factory=_named_table,
        description="ᾱ_i of the N training steps: in [0, 1), strictly decreasing, N >= 2",
    )
    interpolation: Literal["log_snr", "sigma"] = Field(
        default="log_snr",
        description="what is linear in the index between steps: log-SNR or sigma/alpha",
    )
    _cache: dict[Any, Any] = PrivateAttr(default_factory=dict)
    _first: float = PrivateAttr(default=0.0)  # the first step's log-SNR, on the host

    @model_validator(mode="before")
    @classmethod
    def _from_named_betas(cls, data: Any) -> Any:
        """A mapping that names its betas (``beta_schedule``, ...) becomes their table."""
        if not isinstance(data, dict) or not any(key in data for key in _NAMED_FORM):
            return data
        if "alphas_cumprod" in data:
            named = ", ".join(key for key in _NAMED_FORM if key in data)
            raise ValueError(f"give alphas_cumprod or the named betas ({named}), not both")
        named_args = {key: data[key] for key in _NAMED_FORM if key in data}
        rest = {key: value for key, value in data.items() if key not in _NAMED_FORM}
        return {**rest, "alphas_cumprod": _named_table(**named_args)}

    @field_validator("alphas_cumprod")
    @classmethod
    def _valid_table(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if len(value) < 2:
            raise ValueError(f"alphas_cumprod must be 1-D with ≥2 steps, got {len(value)}")
        if not all(0 <= a < 1 for a in value):
            raise ValueError("alphas_cumprod must lie in [0, 1)")
        if not all(b < a for a, b in itertools.pairwise(value)):
            raise ValueError("alphas_cumprod must be strictly decreasing")
        return value

    def model_post_init(self, context: Any, /) -> None:
        ac = torch.tensor(self.alphas_cumprod, dtype=_F64)
        table = _logit(ac)  # log-SNR per index, strictly decreasing (may end at -inf)
        self._first = float(table[0])
        # For the interpolation: the step from each entry to the next (0 after the last,
        # -inf onto a zero-terminal-SNR end), and 1 - ᾱ_0 for the stretch below the first.
        step = torch.cat([table[1:] - table[:-1], table.new_zeros(1)])
        if self.interpolation == "sigma":  # the same, in sigma / alpha = exp(-log_snr / 2)
            table = torch.exp(-0.5 * table)
            step = torch.cat([table[1:] - table[:-1], table.new_zeros(1)])
        self._cache[torch.device("cpu")] = (table, step, -table)

    def __eq__(self, other: object) -> bool:
        # The tables cached per device are derived: only the field counts.
        return (
            type(other) is type(self)
            and self.alphas_cumprod == other.alphas_cumprod
            and self.interpolation == other.interpolation
        )

    def __hash__(self) -> int:
        return hash((type(self), self.alphas_cumprod, self.interpolation))

    def __repr_args__(self) -> Any:
        yield "num_steps", self.num_steps  # not the N-value table
        if self.interpolation != "log_snr":
            yield "interpolation", self.interpolation

    @property
    def num_steps(self) -> int:
        """The number of training steps ``N``."""
        return len(self.alphas_cumprod)

    @property
    def _ends_at_zero_snr(self) -> bool:
        return self.alphas_cumprod[-1] == 0.0

    @property
    def _one_minus_ac0(self) -> float:
        return 1.0 - self.alphas_cumprod[0]

    @classmethod
    def from_betas(
        cls,
        betas: Float[Tensor, " steps"],
        *,
        zero_terminal_snr: bool = False,
        interpolation: Literal["log_snr", "sigma"] = "log_snr",
    ) -> "Discrete":
        """From the per-step betas: ``alphas_cumprod = cumprod(1 - betas)``."""
        betas = torch.as_tensor(betas, dtype=_F64)
        ac = torch.cumprod(1 - betas, dim=0)
        return cls.from_alphas_cumprod(
            ac, zero_terminal_snr=zero_terminal_snr, interpolation=interpolation
        )

    @classmethod
    def from_alphas_cumprod(
        cls,
        alphas_cumprod: Float[Tensor, " steps"],
        *,
        zero_terminal_snr: bool = False,
        interpolation: Literal["log_snr", "sigma"] = "log_snr",
    ) -> "Discrete":
        """From the cumulative products ``ᾱ_i`` (``alpha(t_i)² = ᾱ_i``)."""
        ac = torch.as_tensor(alphas_cumprod, dtype=_F64).detach().cpu()
        if ac.ndim != 1:
            raise ValueError(f"alphas_cumprod must be 1-D, got shape {tuple(ac.shape)}")
        ac = rescale_zero_terminal_snr(ac) if zero_terminal_snr else ac
        return cls(alphas_cumprod=tuple(ac.tolist()), interpolation=interpolation)

    @classmethod
    def from_beta_schedule(
        cls,
        beta_schedule: BetaSchedule = "linear_beta",
        *,
        num_steps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        zero_terminal_snr: bool = False,
    ) -> "Discrete":
        """The ``num_steps``-step schedule of named betas (see ``discrete_betas``)."""
        table = _named_table(beta_schedule, num_steps, beta_start, beta_end, zero_terminal_snr)
        return cls(alphas_cumprod=table)

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        # Cached per device so sampling loops never copy the tables host -> device.
        if device not in self._cache:
            self._cache[device] = tuple(x.to(device) for x in self._cache[torch.device("cpu")])
        return self._cache[device]

    @checked
    def t_from_index(self, index: Float[Tensor, " batch"] | Tensor | int) -> Time:
        """Continuous ``t = (i + 1) / N`` of training step index ``i`` (float64)."""
        last = self.num_steps - 1
        if isinstance(index, int) and not 0 <= index <= last:
            raise ValueError(f"Discrete.t_from_index: index {index} is outside [0, {last}]")
        i = torch.as_tensor(index, dtype=_F64)
        ends = host_range(i) if isinstance(index, Tensor) else None  # CPU tensors only
        if ends is not None and not 0 <= ends[0] <= ends[1] <= last:
            raise ValueError(
                f"Discrete.t_from_index: indices in [{ends[0]:g}, {ends[1]:g}] are outside "
                f"[0, {last}]"
            )
        return ((i + 1) / self.num_steps).reshape(-1)

    @checked
    def index_from_t(self, t: Time) -> Time:
        """Fractional training step index ``N t - 1`` of ``t``, in ``t``'s dtype, exact at steps.

        Computed in float64 (float32 on MPS); a value within the rounding error of ``t``'s
        dtype of an integer is that integer, so ``index_from_t(t_from_index(i).to(dtype))``
        is exactly ``i`` (for float32, every ``i`` below ``2**24``). Between steps it is the
        continuous inverse of ``t_from_index``; for integer indices use ``.round().long()``
        (``.long()`` alone truncates).
        """
        work = torch.float32 if t.device.type == "mps" else _F64
        scaled = t.to(work) * self.num_steps  # index + 1
        index = scaled - 1
        nearest = index.round()
        # |error of t| <= eps / 2 |t|, i.e. <= eps / 2 (index + 1) in the index: snap within 2x
        snap = (index - nearest).abs() <= torch.finfo(t.dtype).eps * scaled.abs()
        # index + (nearest - index) is exactly nearest, and keeps d index / d t = N
        fix = torch.where(snap, nearest - index, 0.0).detach()
        return (index + fix).to(t.dtype)

    def _log_snr(self, t: Tensor) -> Tensor:
        # Few, fused operations: a sampler evaluates this on a small grid every call,
        # where each tensor operation costs microseconds whatever its size.
        table, step, _ = self._on(t.device)
        scaled = t * self.num_steps  # the fractional index plus one
        index = scaled - 1
        lo = index.floor().clamp_(0, self.num_steps - 1)
        frac = (index - lo).clamp_(0.0, 1.0)
        lo_index = lo.long()
        at_lo = table[lo_index]
        # table[lo] + frac * (table[lo + 1] - table[lo]): exactly table[lo] at integer steps
        # (from the last one the step is 0), -inf between the last two of a zero-SNR end.
        inside = torch.addcmul(at_lo, frac, step[lo_index])
        if self._ends_at_zero_snr:  # 0 * -inf at the step before the end
            inside = torch.where(frac == 0, at_lo, inside)
        if self.interpolation == "sigma":  # the table held sigma / alpha
            inside = -2 * torch.log(inside)
        # Below the first step: alpha² linear from 1 (t = 0) to ᾱ_0 (t = 1/N), i.e.
        # 1 - alpha² = scaled (1 - ᾱ_0), and the log-SNR is log(alpha² / (1 - alpha²)),
        # i.e. -logit(1 - alpha²), computed from the small 1 - alpha² (no cancellation).
        below = scaled.clamp(0.0, 1.0).mul_(self._one_minus_ac0).logit_().neg_()
        return torch.where(index < 0, below, inside)

    def _t_of_log_snr(self, log_snr: Tensor) -> Tensor:
        table, step, neg_table = self._on(log_snr.device)
        n = self.num_steps
        neg = -log_snr
        # The entry at or below log_snr: index ``hi`` = lo + 1, interpolated from lo.
        # (In sigma / alpha, increasing with the index: the entry at or above it.)
        sigma = self.interpolation == "sigma"
        value = torch.exp(-0.5 * log_snr) if sigma else log_snr
        hi = torch.searchsorted(table if sigma else neg_table, value if sigma else neg)
        hi = hi.clamp_(1, n - 1)
        lo = hi - 1
        at_lo = table[lo]
        # An infinite step (onto a zero-SNR end) gives 0 here, as the step's start does.
        frac = (value - at_lo).div_(step[lo]).clamp_(0.0, 1.0)
        if self._ends_at_zero_snr:  # -inf / -inf: the end itself
            frac = torch.where(torch.isneginf(log_snr), 1.0, frac)
        inside = (hi + frac).div_(n)
        # Below the first step: t = (1 - alpha²) / (N (1 - ᾱ_0)), 1 - alpha² = sigmoid(-λ).
        below = torch.sigmoid(neg).div_(n * self._one_minus_ac0)
        return torch.where(log_snr > self._first, below, inside)


if TYPE_CHECKING:
    AnySchedule = ScheduleBase
else:
    AnySchedule = Annotated[ScheduleBase, SerializeAsAny()]
    """A schedule of any registered kind, serialised with all of its own fields."""


class ZeroTerminalSNR(ScheduleBase):
    """Wrap a variance-preserving schedule so that ``alpha(1) = 0`` (Lin et al., 2023).

    ``alpha'(t) = (alpha(t) - alpha(1)) · alpha(0) / (alpha(0) - alpha(1))`` and
    ``sigma' = √(1 - alpha'²)``. For a trained discrete schedule use
    ``Discrete.from_betas(betas, zero_terminal_snr=True)``, which rescales the table as
    diffusers does.
    """

    kind: Literal["zero_terminal_snr"] = "zero_terminal_snr"
    base: AnySchedule = Field(
        default_factory=lambda: LinearBeta(),
        description="the variance-preserving schedule rescaled (any registered kind)",
    )
    _ends: tuple[float, float] = PrivateAttr(default=(0.0, 1.0))

    @field_validator("base", mode="before")
    @classmethod
    def _parse_base(cls, value: Any) -> Any:
        if isinstance(value, ScheduleBase):
            base = value
        elif isinstance(value, dict | str):
            base = SCHEDULES.parse(value)
        else:
            raise ValueError(f"base must be a schedule config, got {type(value).__name__}")
        if not isinstance(base, ScheduleBase) or type(base)._alpha_sigma is not (
            ScheduleBase._alpha_sigma
        ):
            raise ValueError(
                f"ZeroTerminalSNR: base must be a variance-preserving schedule (alpha² + "
                f"sigma² = 1, e.g. LinearBeta, SqrtLinearBeta, Cosine, Discrete), got "
                f"{type(base).__name__}"
            )
        return base

    def model_post_init(self, context: Any, /) -> None:
        ends = torch.tensor([0.0, 1.0], dtype=_F64)
        a = self.base._alpha_sigma(ends)[0]
        self._ends = (float(a[0]), float(a[1]))

    def _scale(self) -> float:
        a0, a1 = self._ends
        return a0 / (a0 - a1)

    def _log_snr(self, t: Tensor) -> Tensor:
        a = (self.base._alpha_sigma(t)[0] - self._ends[1]) * self._scale()
        return _logit((a * a).clamp(0.0, 1.0))

    def _t_of_log_snr(self, log_snr: Tensor) -> Tensor:
        a = torch.sigmoid(log_snr).sqrt()
        base_alpha = a / self._scale() + self._ends[1]
        return self.base._t_of_log_snr(_logit((base_alpha**2).clamp(0.0, 1.0)))


for _schedule in (
    LinearBeta,
    SqrtLinearBeta,
    Cosine,
    EDM,
    RectifiedFlow,
    Discrete,
    ZeroTerminalSNR,
):
    SCHEDULES.register(_schedule)
