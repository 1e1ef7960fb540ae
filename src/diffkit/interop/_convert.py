"""``dk.interop.from_diffusers``: one entry for diffusers networks, schedulers and pipelines.

Networks and schedulers convert in ``diffkit.interop._diffusers``; whole pipelines, which
convert their parts through it, in ``diffkit.interop._pipelines``.
"""

from typing import TYPE_CHECKING, Any, overload

from torch import nn

from diffkit.interop import _diffusers
from diffkit.interop._pipelines import PIPELINES, pipeline_from_diffusers
from diffkit.interop._schedulers import SchedulerParts
from diffkit.typing import Prediction

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from diffkit.pipeline import Pipeline

__all__ = ["from_diffusers"]


@overload
def from_diffusers(
    module: nn.Module,
    *,
    prediction: Prediction | None = None,
    num_train_timesteps: int | None = None,
    micro_conditions: int | None = None,
    time_shift: float | None = None,
) -> nn.Module: ...


@overload
def from_diffusers(module: "DiffusionPipeline") -> "Pipeline": ...  # pyright: ignore[reportOverlappingOverload]


@overload
def from_diffusers(module: object) -> SchedulerParts: ...


def from_diffusers(
    module: Any,
    *,
    prediction: Prediction | None = None,
    num_train_timesteps: int | None = None,
    micro_conditions: int | None = None,
    time_shift: float | None = None,
) -> "nn.Module | SchedulerParts | Pipeline":
    """The diffkit equivalent (same weights) of a diffusers U-Net (2-D, or the 3-D
    ``UNet3DConditionModel``: a space-time U-Net), ``AutoencoderKL``, ``AutoencoderKLWan``
    (a [`CausalVideoAutoencoder`][diffkit.nn.video_vae.CausalVideoAutoencoder]),
    ``DiTTransformer2DModel``, ``PixArtTransformer2DModel`` or ``SD3Transformer2DModel`` (the
    last three: a [`DiT`][diffkit.nn.dit.DiT]), ``WanTransformer3DModel`` or
    ``LatteTransformer3DModel`` (a [`VideoDiT`][diffkit.nn.video.VideoDiT], taking videos
    ``(batch, frames, channels, h, w)``); of a diffusers scheduler, its
    [`SchedulerParts`][diffkit.interop.SchedulerParts] ``(schedule, sampler)`` (see
    [`scheduler_parts`][diffkit.interop.scheduler_parts]); of a whole diffusers pipeline, a
    [`Pipeline`][diffkit.pipeline.Pipeline] drawing the same images (a ``Pipeline`` is an
    ``nn.Module``; see the guide "Bring your model").

    ``prediction`` (default ``"epsilon"``) and ``num_train_timesteps`` (default: the model's
    config, else 1000) describe the U-Net's training, which diffusers keeps in the scheduler;
    for a model ``to_diffusers`` exported, the defaults are the exported model's settings.
    ``micro_conditions``: how many size conditions an SDXL-style U-Net
    (``addition_embed_type="text_time"``) embeds beside the pooled text, ``Conditioning.micro``
    (6 for SDXL base: original size, crop top-left, target size; 5 for the refiner); default:
    what ``to_diffusers`` recorded, else 6.
    ``time_shift``: an ``SD3Transformer2DModel``'s scheduler ``shift`` (SD3: 3.0; for a
    ``WanTransformer3DModel`` its scheduler's ``flow_shift``), so the
    converted network takes [`RectifiedFlow`][diffkit.schedules.RectifiedFlow]``(shift)``'s
    ``t`` and embeds ``1000 sigma(t)`` as diffusers does (default 1: ``t`` is sigma).
    """
    name = type(module).__name__
    if name in PIPELINES or name.endswith("Pipeline"):
        return pipeline_from_diffusers(module)
    return _diffusers.from_diffusers(
        module,
        prediction=prediction,
        num_train_timesteps=num_train_timesteps,
        micro_conditions=micro_conditions,
        time_shift=time_shift,
    )
