"""What [`train`][diffkit.training.train] minimises: one loss object per kind of model.

A training loss is any callable ``loss(model, batch, generator) -> scalar``
([`TrainingLoss`][diffkit.training.TrainingLoss]): ``model`` is the module being trained
(wrapped in ``DistributedDataParallel`` under ``torchrun``, so call it, not its methods),
``batch`` a [`Batch`][diffkit.data.Batch] already on the model's device, and
``generator`` the shard's own generator (seeded from ``(seed, step, shard)``) for every
random draw. The loop never looks at what kind of model it trains.

- a denoiser: [`DenoiserLoss`][diffkit.training.DenoiserLoss], the
  [`DiffusionLoss`][diffkit.losses.DiffusionLoss] on (encoded) data with condition dropout;
- a KL autoencoder: [`AutoencoderLoss`][diffkit.training.AutoencoderLoss], reconstruction
  MSE + ``kl_weight`` x KL per latent element;
- CLIP: [`CLIPLoss`][diffkit.training.CLIPLoss], symmetric InfoNCE of images against their
  captions, with the learned temperature.
"""

import dataclasses
from collections.abc import Callable
from typing import Literal, Protocol, cast

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from diffkit.config import Config
from diffkit.data import Batch
from diffkit.losses import DiffusionLoss
from diffkit.protocols import Conditioning, NoiseSchedule
from diffkit.tokenizers import Tokenizer
from diffkit.typing import Prediction

__all__ = ["AutoencoderLoss", "CLIPLoss", "DenoiserLoss", "TrainingLoss"]

LossFn = Callable[..., Tensor]
"""``loss(denoiser, schedule, x0, cond=, uncond=, generator=) -> scalar`` (a ``DiffusionLoss``)."""
ConditionFn = Callable[[Batch], Conditioning | None]
"""``condition(batch) -> Conditioning | None``: a micro-batch's condition."""
PREDICTIONS = ("epsilon", "x0", "v", "flow")


class TrainingLoss(Protocol):
    """``loss(model, batch, generator) -> scalar``: the objective of one training step."""

    def __call__(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> Tensor:
        """The mean loss of ``batch`` (a scalar to ``backward()``)."""
        ...


class DenoiserView:
    """Presents a (DDP-wrapped) module as a Denoiser: its ``prediction`` plus ``__call__``."""

    prediction: Prediction

    def __init__(self, module: nn.Module, prediction: Prediction) -> None:
        self.module = module
        self.prediction = prediction

    def __call__(self, x_t: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
        return self.module(x_t, t, cond)


def resolve_prediction(denoiser: nn.Module, prediction: Prediction | None) -> Prediction:
    """What ``denoiser`` predicts: its own ``prediction``, or ``prediction`` where it has none."""
    own = getattr(denoiser, "prediction", None)
    if prediction is not None and own is not None and prediction != own:
        raise ValueError(
            f"train: prediction={prediction!r} conflicts with the denoiser's own prediction "
            f"{own!r}; it would learn to predict {prediction!r} while samplers read its "
            f"output as {own!r}. Build the denoiser with prediction={prediction!r} "
            "(e.g. in its config) or drop prediction="
        )
    found = prediction or own
    if found not in PREDICTIONS:
        raise ValueError(
            "the denoiser needs a 'prediction' attribute ('epsilon', 'x0', 'v' or 'flow'), "
            "or pass prediction="
        )
    return cast(Prediction, found)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (else ``model``)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(model, nn.parallel.DistributedDataParallel) and inner else model


@dataclasses.dataclass(frozen=True)
class DenoiserLoss:
    """The diffusion objective on a batch: encode, condition, then ``loss`` at random times.

    - ``loss(denoiser, schedule, x0, cond=, uncond=, generator=) -> scalar``: a
      [`DiffusionLoss`][diffkit.losses.DiffusionLoss] (the default) or your own.
    - ``condition(batch) -> Conditioning | None`` builds each micro-batch's condition
      (e.g. a text conditioner on ``batch.captions``); ``uncond`` is the null condition
      substituted by condition dropout.
    - ``encode(x) -> z`` maps data to latents (a frozen encoder) before noising.
    - ``prediction`` names what a module without a ``prediction`` attribute predicts.

    A batch's ``temporal`` (joint image-video training: which items are clips, which
    stacks of independent images) goes to the denoiser as ``Conditioning.temporal``.

    Encoding and conditioning run without gradients' autocast (in the frozen parts' own
    precision); only the denoiser's forward runs under the run's mixed precision.
    """

    schedule: NoiseSchedule
    loss: LossFn = dataclasses.field(default_factory=DiffusionLoss)
    condition: ConditionFn | None = None
    uncond: Conditioning | None = None
    encode: Callable[[Tensor], Tensor] | None = None
    prediction: Prediction | None = None

    def __call__(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> Tensor:
        """The diffusion loss of ``model`` on ``batch``."""
        x = batch.x
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self.encode is not None:
                with torch.no_grad():
                    x = self.encode(x)
            cond = self.condition(batch) if self.condition is not None else None
        if batch.temporal is not None:  # joint image-video training: which items are clips
            cond = dataclasses.replace(cond or Conditioning(), temporal=batch.temporal)
        to = x.device
        cond = cond.map(lambda t: t.to(to)) if cond is not None else None
        uncond = self.uncond.map(lambda t: t.to(to)) if self.uncond is not None else None
        kind = self.prediction or resolve_prediction(_unwrapped(model), None)
        view = DenoiserView(model, kind)
        return self.loss(view, self.schedule, x, cond=cond, uncond=uncond, generator=generator)


class AutoencoderLoss(Config):
    """A KL autoencoder's objective: ``mse(decode(z), x) + kl_weight * KL / latent elements``.

    ``z`` is drawn from the posterior with the step's generator; the KL divergence to
    ``N(0, I)`` is averaged over the batch and divided by the latent elements per item,
    so ``kl_weight`` weighs nats per latent element against the per-pixel error. The model
    is called as ``model(x, generator=g) -> (reconstruction, posterior)``
    ([`KLAutoencoder`][diffkit.nn.vae.KLAutoencoder]).
    """

    kind: Literal["autoencoder"] = "autoencoder"
    kl_weight: float = Field(
        default=1e-3, ge=0, description="weight of the KL term per latent element"
    )

    def __call__(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> Tensor:
        """The reconstruction + KL loss of ``model`` on ``batch.x``."""
        x = batch.x
        recon, posterior = model(x, generator=generator)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        return F.mse_loss(recon.float(), x.float()) + self.kl_weight * kl.float()


@dataclasses.dataclass(frozen=True)
class CLIPLoss:
    """CLIP's objective: symmetric InfoNCE of ``batch.x`` against ``batch.captions``.

    The captions are tokenised by ``tokenizer``; the model is called as
    ``model(images, token_ids) -> logits`` ([`CLIP`][diffkit.nn.clip.CLIP], whose logits
    carry the learned temperature, clamped to ``[1, 100]``). Equal to ``CLIP.loss``, but
    through ``forward`` so that ``DistributedDataParallel`` sees the call. Row ``i`` of
    each side is the positive for row ``i``; the rest of the micro-batch are negatives.
    """

    tokenizer: Tokenizer

    def __call__(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> Tensor:
        """The contrastive loss of ``model`` on the (image, caption) pairs of ``batch``."""
        if batch.captions is None:
            raise ValueError("CLIPLoss needs captions in the data (items with a 'caption')")
        ids = self.tokenizer(batch.captions).to(batch.x.device)
        logits = model(batch.x, ids).float()
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
