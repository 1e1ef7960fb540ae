"""The denoising training objective: ``DiffusionLoss`` (DDPM, Ho et al. 2020).

For data ``x0``, a time ``t`` drawn by the chosen time sampling, and noise ``eps``, the
denoiser sees ``x_t = alpha_t x0 + sigma_t eps`` and is scored by

``loss = w(t) · mean((pred_T - target_T)²)``

in the space ``T`` of the chosen target (``epsilon``, ``x0``, ``v`` or ``flow``; the
denoiser's own prediction is converted when they differ). Weightings are defined in
``x0`` space and carried to ``T`` by the exact factor between the two errors, so
``min_snr`` means the same thing whatever the target:

| weighting | weight on ``|x0_hat - x0|²`` |
| --- | --- |
| ``simple`` | (weight 1 in the target space) |
| ``min_snr`` | ``min(snr, gamma)`` (Hang et al., 2023) |
| ``edm`` | ``snr + 1 / sigma_data²`` (Karras et al., 2022) |
| ``v`` | ``snr + 1`` (the v-prediction MSE of a VP schedule) |
"""

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from diffkit.config import Config, Registry, field_error
from diffkit.forward import add_noise
from diffkit.prediction import convert, from_x0_eps
from diffkit.protocols import Conditioning, Denoiser, NoiseSchedule
from diffkit.typing import Prediction, Sample, Time, checked

__all__ = ["LOSSES", "DiffusionLoss"]

Weighting = Literal["simple", "min_snr", "edm", "v"]
TimeSampling = Literal["uniform", "log_normal", "logit_normal", "discrete"]


LOSSES: Registry["DiffusionLoss"] = Registry("loss")
"""``kind`` -> loss class (the loss is its own config)."""


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    device = like.device if generator is None else generator.device
    return torch.randn(shape, generator=generator, device=device).to(like.device, like.dtype)


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    device = like.device if generator is None else generator.device
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float64).to(
        like.device
    )


class DiffusionLoss(Config):
    """The diffusion training loss: time sampling, noising, target, weighting, CFG dropout.

    A frozen config: its fields say how the loss is formed, ``loss(denoiser, schedule, x0,
    ...)`` computes it.
    """

    kind: Literal["diffusion"] = "diffusion"
    target: Prediction | None = Field(
        default=None,
        description="space the error is measured in; None: the denoiser's own prediction",
    )
    weighting: Weighting = Field(
        default="simple", description="per-time weight, see the module table"
    )
    min_snr_gamma: float = Field(default=5.0, gt=0, description="gamma of min-SNR weighting")
    sigma_data: float = Field(
        default=0.5, gt=0, description="data standard deviation for EDM weighting"
    )
    time_sampling: TimeSampling = Field(
        default="uniform", description="how training times are drawn"
    )
    t_min: float = Field(default=1e-3, ge=0, lt=1, description="smallest t for uniform sampling")
    t_max: float = Field(default=1.0, gt=0, le=1, description="largest t for uniform sampling")
    log_normal_mean: float = Field(default=-1.2, description="EDM P_mean: mean of log sigma")
    log_normal_std: float = Field(default=1.2, gt=0, description="EDM P_std: std of log sigma")
    logit_normal_mean: float = Field(default=0.0, description="mean of logit(t) (SD3)")
    logit_normal_std: float = Field(default=1.0, gt=0, description="std of logit(t) (SD3)")
    num_steps: int = Field(
        default=1000, ge=1, description="steps N for 'discrete': t = (i + 1) / N"
    )
    cond_dropout: float = Field(
        default=0.0, ge=0, lt=1, description="probability of dropping the condition (for CFG)"
    )

    @model_validator(mode="after")
    def _check(self) -> "DiffusionLoss":
        if self.t_min > self.t_max:
            message = f"t_min ({self.t_min}) must not exceed t_max ({self.t_max})"
            raise field_error("DiffusionLoss", "t_min", message, self.t_min)
        return self

    def sample_time(
        self,
        schedule: NoiseSchedule,
        batch: int,
        generator: torch.Generator | None = None,
        like: Tensor | None = None,
    ) -> Time:
        """Draw ``batch`` training times in float64 by the configured time sampling."""
        c = self
        ref = like if like is not None else torch.zeros(())
        if c.time_sampling == "uniform":
            u = _rand((batch,), generator, ref)
            return c.t_min + (c.t_max - c.t_min) * u
        if c.time_sampling == "discrete":
            u = _rand((batch,), generator, ref)
            index = torch.floor(u * c.num_steps).clamp(max=c.num_steps - 1)
            return (index + 1) / c.num_steps
        n = _randn((batch,), generator, ref).to(torch.float64)
        if c.time_sampling == "logit_normal":
            return torch.sigmoid(c.logit_normal_mean + c.logit_normal_std * n)
        log_sigma = c.log_normal_mean + c.log_normal_std * n
        return schedule.t_of_log_snr(-2 * log_sigma).clamp(1e-5, 1.0)

    def weight(self, alpha: Time, sigma: Time, target: Prediction) -> Time:
        """Per-item weight in the ``target`` space for noise levels ``(alpha, sigma)``."""
        c = self
        if c.weighting == "simple":
            return torch.ones_like(alpha)
        snr = (alpha / sigma) ** 2
        if c.weighting == "min_snr":
            x0_weight = snr.clamp(max=c.min_snr_gamma)
        elif c.weighting == "edm":
            x0_weight = snr + 1 / c.sigma_data**2
        else:
            x0_weight = snr + 1
        return x0_weight / _error_factor(alpha, sigma, target)

    @checked
    def per_sample(
        self,
        denoiser: Denoiser,
        schedule: NoiseSchedule,
        x0: Sample,
        *,
        cond: Conditioning | None = None,
        uncond: Conditioning | None = None,
        generator: torch.Generator | None = None,
        t: Time | None = None,
    ) -> Time:
        """The weighted loss of each item, ``(batch,)``; ``t`` overrides the time sampling."""
        batch = x0.shape[0]
        times = self.sample_time(schedule, batch, generator, x0) if t is None else t
        times = times.to(device=x0.device, dtype=torch.float64)
        eps = _randn(tuple(x0.shape), generator, x0)
        x_t = add_noise(schedule, x0, eps, times)
        if cond is not None and self.cond_dropout > 0:
            _check_null(self.cond_dropout, cond, uncond)
            keep = _rand((batch,), generator, x0) >= self.cond_dropout
            null = uncond.expand(batch) if uncond is not None else Conditioning()
            cond = cond.where(keep, null)
        # As the samplers do: float32 times (float64 for float64 data), never rounded to bf16.
        model_t = times.to(torch.float64 if x0.dtype == torch.float64 else torch.float32)
        out = denoiser(x_t, model_t, cond)
        alpha, sigma = schedule.alpha(times), schedule.sigma(times)
        target_kind: Prediction = self.target or denoiser.prediction
        pred = convert(out.float(), denoiser.prediction, target_kind, x_t.float(), alpha, sigma)
        target = from_x0_eps(x0.float(), eps.float(), target_kind, alpha, sigma)
        err = (pred - target).pow(2).flatten(1).mean(dim=1)
        return err * self.weight(alpha, sigma, target_kind).to(err.dtype)

    def __call__(
        self,
        denoiser: Denoiser,
        schedule: NoiseSchedule,
        x0: Sample,
        *,
        cond: Conditioning | None = None,
        uncond: Conditioning | None = None,
        generator: torch.Generator | None = None,
        t: Time | None = None,
    ) -> Tensor:
        """The mean weighted loss over the batch (a scalar to ``backward()``)."""
        return self.per_sample(
            denoiser, schedule, x0, cond=cond, uncond=uncond, generator=generator, t=t
        ).mean()


def _check_null(rate: float, cond: Conditioning, uncond: Conditioning | None) -> None:
    """Refuse condition dropout whose null lacks a field of ``cond`` (it would be zeros)."""
    if cond.labels is not None and (uncond is None or uncond.labels is None):
        # A dropped label would become class 0, a real class.
        raise ValueError(
            f"DiffusionLoss: cond_dropout={rate} on labels needs "
            "uncond=Conditioning(labels=torch.tensor([null_label])) with a 'no label' "
            "class (num_classes one more than the data's classes); without it the "
            "dropped labels would become class 0"
        )
    fields = ("tokens", "pooled", "mask")
    missing = [
        name
        for name in fields
        if getattr(cond, name) is not None and (uncond is None or getattr(uncond, name) is None)
    ]
    if missing:
        # Zero tokens and an all-False mask are a null that sampling never guides against.
        lacks = "no uncond" if uncond is None else f"uncond without {'/'.join(missing)}"
        raise ValueError(
            f"DiffusionLoss: cond_dropout={rate} on {'/'.join(missing)} needs an uncond "
            "with the same fields: the null condition that guidance uses at sampling, for "
            'text the conditioner\'s empty prompt, e.g. uncond=text.condition([""]) (what '
            f"train_pipeline and Pipeline.generate use); with {lacks} the dropped items "
            "would get zeros (and an all-False mask), a null the sampler never gives"
        )


def _error_factor(alpha: Tensor, sigma: Tensor, target: Prediction) -> Tensor:
    """``|pred_T - target_T|² / |x0_hat - x0|²`` at fixed ``x_t`` for each target space."""
    if target == "x0":
        return torch.ones_like(alpha)
    if target == "epsilon":
        return (alpha / sigma) ** 2
    if target == "v":
        return ((alpha**2 + sigma**2) / sigma) ** 2
    return ((alpha + sigma) / sigma) ** 2


LOSSES.register(DiffusionLoss)
