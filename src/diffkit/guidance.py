"""Classifier-free guidance (Ho & Salimans, 2022), for every sampler alike.

``guided = uncond + scale * (cond - uncond)``: scale 1 is the conditional model, 0 the
unconditional one. [`predict`][diffkit.guidance.predict] is the one implementation: the
conditional and unconditional inputs concatenated into one batched call, split and
combined. Samplers call it inside their denoiser helper (with the conditioning batched
once, before the loop); [`Guided`][diffkit.guidance.Guided] wraps a denoiser with it for
code that wants a guided ``Denoiser`` object.

An ``uncond`` given with scale 1 has no effect; samplers, ``Guided`` and the pipeline say
so with one ``UserWarning`` ([`warn_unused`][diffkit.guidance.warn_unused]): a guidance
sweep through 1 is legitimate, so it is not an error.
"""

import dataclasses

import torch
from torch import Tensor

from diffkit.protocols import Conditioning, Denoiser
from diffkit.typing import Prediction, Sample, ShapeError, Time, checked, warn_at_caller

__all__ = [
    "Guided",
    "OutputShapeError",
    "classifier_free",
    "predict",
    "unused_uncond",
    "warn_unused",
]


def _combine(cond: Tensor, uncond: Tensor, scale: float, rescale: float = 0.0) -> Tensor:
    """``uncond + scale * (cond - uncond)``: the guidance formula, once; optionally rescaled.

    ``rescale = phi > 0`` is Lin et al. (2024, Sec. 3.4; diffusers' ``guidance_rescale``):
    the guided prediction ``g`` is scaled to the per-sample standard deviation of the
    conditional one, ``g' = g std(cond) / std(g)`` (over all but the batch dimension,
    unbiased, as diffusers), and mixed back, ``phi g' + (1 - phi) g``, which undoes the
    over-exposure of high guidance scales with zero-terminal-SNR schedules.
    """
    guided = torch.lerp(uncond, cond, scale)
    if not rescale:
        return guided
    dims = list(range(1, guided.ndim))
    ratio = cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return torch.lerp(guided, guided * ratio, rescale)


@checked
def classifier_free(cond: Sample, uncond: Sample, scale: float) -> Sample:
    """``uncond + scale * (cond - uncond)``, computed in float32 (or wider)."""
    dtype = torch.promote_types(cond.dtype, torch.float32)
    return _combine(cond.to(dtype), uncond.to(dtype), scale).to(cond.dtype)


class OutputShapeError(ShapeError):
    """The denoiser's output does not have the shape of its input ``x_t``."""

    def __init__(self, out: object, x_in: Tensor, guided: bool, where: str = "") -> None:
        self.out, self.x_in = out, x_in
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        both = " (cond and uncond in one batch, for guidance)" if guided else ""
        super().__init__(
            f"the denoiser output is {got}{where}, expected the shape of its input x_t, "
            f"{tuple(x_in.shape)}{both}"
        )


def predict(
    denoiser: Denoiser,
    x_t: Tensor,
    t: Tensor,
    cond: Conditioning | None,
    scale: float,
    dtype: torch.dtype | None = None,
    rescale: float = 0.0,
) -> Tensor:
    """The denoiser's prediction at ``x_t``, classifier-free guided when ``scale != 1``.

    Guided, ``cond`` holds the conditional and the unconditional conditioning in one
    batch (``cond.cat(uncond)``) and ``t`` the times of that doubled batch: one call on
    ``[x_t; x_t]``, split, and ``uncond + scale * (cond - uncond)``. The output must have
    the shape of the model's input (a plain tuple comparison, ``OutputShapeError``
    otherwise); it is cast to ``dtype`` (if given) before the combination. ``rescale``
    (0 to 1) is the guidance rescale of Lin et al. (see ``_combine``), on the prediction
    the model makes (epsilon or v, as diffusers applies it).
    """
    guided = scale != 1.0
    x_in = torch.cat([x_t, x_t]) if guided else x_t
    out = denoiser(x_in, t, cond)
    if not isinstance(out, Tensor) or out.shape != x_in.shape:
        raise OutputShapeError(out, x_in, guided)
    if dtype is not None and out.dtype != dtype:
        out = out.to(dtype)
    if not guided:
        return out
    with_cond, without = out.chunk(2)
    return _combine(with_cond, without, scale, rescale)


def warn_unused(where: str, name: str = "uncond") -> None:
    """The one warning for an unconditional input that guidance 1 leaves unused."""
    warn_at_caller(
        f"{where}: {name} is unused with guidance 1 (classifier-free guidance at scale 1 is "
        f"the conditional model alone); pass guidance other than 1 for {name} to take "
        f"effect, or leave {name} out"
    )


def unused_uncond(where: str, guidance: float, uncond: Conditioning | None) -> Conditioning | None:
    """``uncond``, or ``None`` with a ``UserWarning`` when ``guidance == 1`` leaves it unused."""
    if uncond is None or guidance != 1.0:
        return uncond
    warn_unused(where)
    return None


@dataclasses.dataclass(frozen=True)
class Guided:
    """A denoiser with classifier-free guidance: one batched call on cond and uncond.

    At scale 1 the ``uncond`` is unused (a ``UserWarning`` says so) and each call is the
    conditional model alone.
    """

    denoiser: Denoiser
    uncond: Conditioning
    scale: float

    def __post_init__(self) -> None:
        unused_uncond("Guided", self.scale, self.uncond)

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
        if self.scale == 1.0:
            return predict(self.denoiser, x_t, t, cond.expand(batch), 1.0)
        both = cond.expand(batch).cat(self.uncond.expand(batch))
        dtype = torch.promote_types(x_t.dtype, torch.float32)
        out = predict(self.denoiser, x_t, torch.cat([t, t]), both, self.scale, dtype)
        return out.to(x_t.dtype)
