"""The forward (noising) process of any schedule, in closed form (DDPM, Ho et al. 2020).

- marginal ``q(x_t | x_0) = N(alpha_t x_0, sigma_t² I)``;
- transition ``q(x_t | x_s) = N(alpha_{t|s} x_s, sigma_{t|s}² I)`` for ``s < t``, with
  ``alpha_{t|s} = alpha_t / alpha_s`` and ``sigma_{t|s}² = sigma_t² - alpha_{t|s}² sigma_s²``;
- posterior ``q(x_s | x_t, x_0) = N(mu, var I)`` with
  ``mu = alpha_{t|s} sigma_s² / sigma_t² · x_t + alpha_s sigma_{t|s}² / sigma_t² · x_0`` and
  ``var = sigma_{t|s}² sigma_s² / sigma_t²``.

Variances are written through the log-SNR (``sigma_{t|s}² = -sigma_t² expm1(lambda_t -
lambda_s)``) so that they stay accurate when ``s`` and ``t`` are close.

``s == t`` is allowed: the transition is the identity ``(1, 0)`` and the posterior is the
point mass at ``x_t`` (mean ``x_t``, variance 0), exactly, even where ``sigma = 0``. ``s > t``
(usually swapped ``(t, t_prev)``) is refused with a ``ValueError`` when both are CPU tensors;
on an accelerator the values are not read, since that would be a host-device sync.
"""

import torch
from jaxtyping import Float
from torch import Tensor

from diffkit.protocols import NoiseSchedule
from diffkit.typing import Sample, Time, broadcast_to_sample, checked, host_range

__all__ = ["add_noise", "posterior", "q_sample", "transition"]


@checked
def add_noise(schedule: NoiseSchedule, x0: Sample, noise: Sample, t: Time) -> Sample:
    """``x_t = alpha(t) x0 + sigma(t) noise`` for given noise of ``x0``'s shape."""
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
    t64 = t.to(torch.float64)
    a = broadcast_to_sample(schedule.alpha(t64), x0)
    s = broadcast_to_sample(schedule.sigma(t64), x0)
    return (a * x0.to(torch.float64) + s * noise.to(torch.float64)).to(x0.dtype)


@checked
def q_sample(
    schedule: NoiseSchedule, x0: Sample, t: Time, generator: torch.Generator | None = None
) -> tuple[Sample, Sample]:
    """Draw ``x_t ~ q(x_t | x0)``; returns ``(x_t, noise)``."""
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return add_noise(schedule, x0, noise, t), noise


def _check_order(owner: str, s: Tensor, t: Tensor) -> None:
    """Refuse any ``s > t`` when both are CPU tensors (no values are read on an accelerator)."""
    if s.device.type != "cpu" or t.device.type != "cpu":
        return
    late = s.to(torch.float64) - t.to(torch.float64)
    ends = host_range(late)
    if ends is not None and ends[1] > 0:
        i = int(torch.argmax(late))
        raise ValueError(
            f"{owner}: s must not be later than t (s is the earlier, less noisy time), got "
            f"s={float(s[i]):g} > t={float(t[i]):g} at item {i}; swapped (t, t_prev)?"
        )


def _transition64(schedule: NoiseSchedule, s64: Tensor, t64: Tensor) -> tuple[Tensor, Tensor]:
    """Unchecked float64 ``(alpha_{t|s}, sigma_{t|s}²)``; ``s == t`` gives exactly ``(1, 0)``."""
    same = s64 == t64
    alpha_ts = torch.where(same, 1.0, schedule.alpha(t64) / schedule.alpha(s64))
    var_ts = -(schedule.sigma(t64) ** 2) * torch.expm1(
        schedule.log_snr(t64) - schedule.log_snr(s64)
    )
    return alpha_ts, torch.where(same, 0.0, var_ts.clamp_min(0))


@checked
def transition(
    schedule: NoiseSchedule, s: Time, t: Time
) -> tuple[Float[Tensor, " batch"], Float[Tensor, " batch"]]:
    """``(alpha_{t|s}, sigma_{t|s})`` of the one-step transition ``q(x_t | x_s)``, ``s <= t``."""
    _check_order("transition", s, t)
    alpha_ts, var_ts = _transition64(schedule, s.to(torch.float64), t.to(torch.float64))
    return alpha_ts.to(t.dtype), var_ts.sqrt().to(t.dtype)


@checked
def posterior(
    schedule: NoiseSchedule, x_t: Sample, x0: Sample, s: Time, t: Time
) -> tuple[Sample, Float[Tensor, " batch"]]:
    """Mean ``(batch, *shape)`` and variance ``(batch,)`` of ``q(x_s | x_t, x0)``, ``s <= t``."""
    _check_order("posterior", s, t)
    s64, t64 = s.to(torch.float64), t.to(torch.float64)
    alpha_ts, var_ts = _transition64(schedule, s64, t64)
    sigma_s2, sigma_t2 = schedule.sigma(s64) ** 2, schedule.sigma(t64) ** 2
    same = s64 == t64
    # s == t: the point mass at x_t (and no 0/0 where sigma_t = 0)
    coef_xt = torch.where(same, 1.0, alpha_ts * sigma_s2 / sigma_t2)
    coef_x0 = torch.where(same, 0.0, schedule.alpha(s64) * var_ts / sigma_t2)
    mean = broadcast_to_sample(coef_xt, x_t) * x_t.to(torch.float64) + broadcast_to_sample(
        coef_x0, x0
    ) * x0.to(torch.float64)
    var = torch.where(same, 0.0, var_ts * sigma_s2 / sigma_t2)
    return mean.to(x_t.dtype), var.to(s.dtype)
