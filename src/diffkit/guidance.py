"""Classifier-free guidance (Ho & Salimans, 2022), for every sampler alike.

``guided = uncond + scale * (cond - uncond)``: scale 1 is the conditional model, 0 the
unconditional one. Samplers apply it inside their one denoiser helper, with the
conditional and unconditional inputs concatenated into one batched call;
[`Guided`][diffkit.guidance.Guided] wraps a denoiser the same way for code that wants a
guided ``Denoiser`` object.

An ``uncond`` given with scale 1 has no effect; samplers and ``Guided`` say so with a
``UserWarning`` (a guidance sweep through 1 is legitimate, so it is not an error).
"""

import dataclasses

import torch
from torch import Tensor

from diffkit.protocols import Conditioning, Denoiser
from diffkit.typing import Prediction, Sample, Time, checked, warn_at_caller

__all__ = ["Guided", "classifier_free", "unused_uncond"]


@checked
def classifier_free(cond: Sample, uncond: Sample, scale: float) -> Sample:
    """``uncond + scale * (cond - uncond)``, computed in float32 (or wider)."""
    dtype = torch.promote_types(cond.dtype, torch.float32)
    return torch.lerp(uncond.to(dtype), cond.to(dtype), scale).to(cond.dtype)


def unused_uncond(where: str, guidance: float, uncond: Conditioning | None) -> Conditioning | None:
    """``uncond``, or ``None`` with a ``UserWarning`` when ``guidance == 1`` leaves it unused."""
    if uncond is None or guidance != 1.0:
        return uncond
    warn_at_caller(
        f"{where}: uncond is unused with guidance 1 (classifier-free guidance at scale 1 is "
        "the conditional model alone); pass guidance other than 1 for uncond to take effect, "
        "or leave uncond out"
    )
    return None


@dataclasses.dataclass(frozen=True)
class Guided:
    """A denoiser with classifier-free guidance: one batched call on cond and uncond."""

    denoiser: Denoiser
    uncond: Conditioning
    scale: float

    def __post_init__(self) -> None:
        if self.scale == 1.0:
            warn_at_caller(
                "Guided: scale 1 is the conditional model alone: uncond is unused, yet every "
                "call still evaluates it (twice the compute); call the denoiser itself for "
                "scale 1, or pass a scale other than 1"
            )

    @property
    def prediction(self) -> Prediction:
        """The wrapped denoiser's prediction type (guidance is linear, so it is kept)."""
        return self.denoiser.prediction

    @checked
    def __call__(self, x_t: Sample, t: Time, cond: Conditioning | None = None) -> Sample:
        """Guided prediction at ``x_t`` ``(batch, *shape)``, ``t`` ``(batch,)``."""
        if cond is None:
            raise ValueError("Guided: a conditioning is required")
        batch = x_t.shape[0]
        both = cond.expand(batch).cat(self.uncond.expand(batch))
        out: Tensor = self.denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), both)
        with_cond, without = out.chunk(2)
        return classifier_free(with_cond, without, self.scale)
