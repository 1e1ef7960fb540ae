"""The latent space: a KL autoencoder (Stable Diffusion's VAE) and the identity encoder.

[`KLAutoencoder`][diffkit.nn.vae.KLAutoencoder]: a convolutional encoder maps an image
``(b, c, h, w)`` to the mean and log-variance of a diagonal Gaussian posterior over latents
``(b, latent_channels, h / f, w / f)`` with ``f = 2 ** (levels - 1)``; the decoder maps a
latent back to an image. Latents handed to a denoiser are scaled:
``encode(x) = (mean - shift_factor) * scaling_factor`` (or a posterior sample instead of the
mean), ``decode(z) = decoder(z / scaling_factor + shift_factor)``. Videos ``(b, f, c, h, w)``
are coded frame by frame ([`CausalVideoAutoencoder`][diffkit.nn.video_vae.CausalVideoAutoencoder]
compresses time too).

[`IdentityEncoder`][diffkit.nn.vae.IdentityEncoder] is pixel space behind the same interface.
"""

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Literal, cast

import torch
from einops import rearrange
from jaxtyping import Float
from pydantic import Field, PositiveInt, model_validator
from torch import Tensor, nn

from diffkit.config import Config, NetworkConfig, field_error
from diffkit.nn._registry import ENCODERS
from diffkit.nn.layers import Downsample, ResBlock, SpatialSelfAttention, Upsample, group_norm
from diffkit.nn.resblocks import Level
from diffkit.pipeline_config import MAX_DATA_ELEMENTS
from diffkit.typing import Sample, ShapeError, checked

Latents = Float[Tensor, "batch *latent_shape"]

__all__ = [
    "DiagonalGaussian",
    "IdentityEncoder",
    "IdentityEncoderConfig",
    "KLAutoencoder",
    "KLAutoencoderConfig",
]


@dataclasses.dataclass(frozen=True)
class DiagonalGaussian:
    """A Gaussian ``N(mean, exp(logvar))`` with diagonal covariance, one per batch item."""

    mean: Tensor
    logvar: Tensor

    @property
    def std(self) -> Tensor:
        """Standard deviation ``exp(logvar / 2)``."""
        return torch.exp(0.5 * self.logvar)

    def mode(self) -> Tensor:
        """The most likely value (the mean)."""
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """A reparameterised sample ``mean + std * eps`` (differentiable in mean and logvar)."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(
            self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps.to(self.mean.device)

    def kl(self) -> Tensor:
        """``KL(self || N(0, I))`` summed over all but the batch dimension, ``(batch,)``."""
        # expm1(v) - v >= 0 in floating point too (exp(v) - 1 - v rounds below 0 near v = 0).
        terms = self.mean.pow(2) + (torch.expm1(self.logvar) - self.logvar).clamp_min(0.0)
        return 0.5 * terms.flatten(1).sum(dim=1)


class KLAutoencoderConfig(NetworkConfig):
    """Architecture and latent scaling of a [`KLAutoencoder`][diffkit.nn.vae.KLAutoencoder]."""

    kind: Literal["kl_autoencoder"] = "kl_autoencoder"
    in_channels: int = Field(default=3, gt=0, description="image channels")
    out_channels: int | None = Field(
        default=None, gt=0, description="decoded channels (default: in)"
    )
    base_channels: int = Field(default=64, gt=0, description="channels of the first level")
    channel_mult: tuple[PositiveInt, ...] = Field(
        default=(1, 2, 4, 4), min_length=1, max_length=16, description="per level (at most 16)"
    )
    blocks_per_level: int = Field(
        default=2, gt=0, le=64, description="residual blocks per encoder level"
    )
    latent_channels: int = Field(default=4, gt=0, description="channels of the latent")
    norm_groups: int = Field(default=32, gt=0, description="GroupNorm groups")
    mid_attention: bool = Field(default=True, description="self-attention in the middle blocks")
    quant_conv: bool = Field(default=True, description="1x1 conv on the posterior parameters")
    post_quant_conv: bool = Field(
        default=True, description="1x1 conv on the latent before decoding"
    )
    scaling_factor: float = Field(
        default=0.18215,
        ge=1e-6,  # decode divides by it: 1e-300 turns every latent into inf
        le=1e6,
        description="latents are multiplied by this",
    )
    shift_factor: float = Field(
        default=0.0,
        ge=-1e6,  # decode adds it back: 1e300 turns every image into NaN
        le=1e6,
        description="subtracted from latents before scaling",
    )

    @model_validator(mode="after")
    def _check(self) -> "KLAutoencoderConfig":
        for i, mult in enumerate(self.channel_mult):
            if (self.base_channels * mult) % self.norm_groups != 0:
                message = (
                    f"level {i} has {self.base_channels * mult} channels, not divisible into "
                    f"norm_groups={self.norm_groups}"
                )
                raise field_error("KLAutoencoderConfig", "norm_groups", message, self.norm_groups)
        return self

    def parameter_estimate(self) -> int:
        """A lower bound on the autoencoder's parameters: its convolutions and middle
        attentions (norms, biases and shortcuts left out)."""
        widths = [self.base_channels * m for m in self.channel_mult]
        first, last = widths[0], widths[-1]
        out = self.out_channels or self.in_channels
        total = 9 * first * (self.in_channels + out) + 9 * last * 3 * self.latent_channels
        total += (2 * self.blocks_per_level + 1) * sum(9 * w * w for w in widths)
        mid = 2 * 9 * last * last + (4 * last * last if self.mid_attention else 0)
        n = self.latent_channels  # the 1x1 convolutions on the posterior and the latent
        quant = (4 * n * n if self.quant_conv else 0) + (n * n if self.post_quant_conv else 0)
        return total + 2 * mid + quant  # the encoder's middle and the decoder's

    @property
    def downsampling_factor(self) -> int:
        """Latent height = image height / this (``2 ** (levels - 1)``)."""
        return 2 ** (len(self.channel_mult) - 1)


def _mid(channels: int, groups: int, attention: bool) -> Level:
    res = [ResBlock(channels, channels, None, groups=groups, eps=1e-6) for _ in range(2)]
    attn: list[nn.Module] = []
    if attention:
        attn = [SpatialSelfAttention(channels, channels, groups=groups, eps=1e-6)]
    return Level(res, attn)


def _run_mid(mid: Level, h: Tensor) -> Tensor:
    h = mid.res[0](h)
    for attn in mid.attn:
        h = attn(h)
    return mid.res[1](h)


class _Encoder(nn.Module):
    def __init__(self, c: KLAutoencoderConfig) -> None:
        super().__init__()
        widths = [c.base_channels * m for m in c.channel_mult]
        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        cin = widths[0]
        for i, width in enumerate(widths):
            res = []
            for _ in range(c.blocks_per_level):
                res.append(ResBlock(cin, width, None, groups=c.norm_groups, eps=1e-6))
                cin = width
            down = Downsample(width, padding=0) if i < len(widths) - 1 else None
            self.down.append(Level(res, downsample=down))
        self.mid: Level = _mid(cin, c.norm_groups, c.mid_attention)
        self.norm_out = group_norm(cin, c.norm_groups, 1e-6, "encoder")
        self.conv_out = nn.Conv2d(cin, 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in cast("Iterable[Level]", self.down):
            for block in level.res:
                h = block(h)
            if level.downsample is not None:
                h = level.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(torch.nn.functional.silu(self.norm_out(h)))


class _Decoder(nn.Module):
    def __init__(self, c: KLAutoencoderConfig) -> None:
        super().__init__()
        widths = [c.base_channels * m for m in c.channel_mult]
        cin = widths[-1]
        self.conv_in = nn.Conv2d(c.latent_channels, cin, 3, padding=1)
        self.mid: Level = _mid(cin, c.norm_groups, c.mid_attention)
        self.up = nn.ModuleList()
        for i, width in reversed(list(enumerate(widths))):
            res = []
            for _ in range(c.blocks_per_level + 1):
                res.append(ResBlock(cin, width, None, groups=c.norm_groups, eps=1e-6))
                cin = width
            self.up.append(Level(res, upsample=Upsample(width) if i > 0 else None))
        self.norm_out = group_norm(cin, c.norm_groups, 1e-6, "decoder")
        self.conv_out = nn.Conv2d(cin, c.out_channels or c.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for level in cast("Iterable[Level]", self.up):
            for block in level.res:
                h = block(h)
            if level.upsample is not None:
                h = level.upsample(h)
        return self.conv_out(torch.nn.functional.silu(self.norm_out(h)))


def _frames_to_batch(x: Tensor) -> tuple[Tensor, int | None]:
    if x.ndim == 5:
        return rearrange(x, "b f c h w -> (b f) c h w"), x.shape[1]
    if x.ndim == 4:
        return x, None
    raise ShapeError(
        f"expected images (batch, channels, height, width) or videos (batch, frames, channels, "
        f"height, width), got shape {tuple(x.shape)}"
    )


def _batch_to_frames(x: Tensor, frames: int | None) -> Tensor:
    return x if frames is None else rearrange(x, "(b f) c h w -> b f c h w", f=frames)


class KLAutoencoder(nn.Module):
    """KL-regularised autoencoder: [`Encoder`][diffkit.protocols.Encoder] of a latent space."""

    def __init__(self, config: KLAutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        self.latent_channels: int = config.latent_channels
        n = config.latent_channels
        self.encoder = _Encoder(config)
        self.decoder = _Decoder(config)
        self.quant_conv = nn.Conv2d(2 * n, 2 * n, 1) if config.quant_conv else None
        self.post_quant_conv = nn.Conv2d(n, n, 1) if config.post_quant_conv else None

    @classmethod
    def from_config(cls, config: KLAutoencoderConfig) -> "KLAutoencoder":
        """Build a freshly initialised autoencoder."""
        return cls(config)

    # The latent scaling is part of the config (the one truth a saved pipeline records);
    # setting it on the module records it there.
    @property
    def scaling_factor(self) -> float:
        """Latents are ``(mean - shift_factor) * scaling_factor`` (``config.scaling_factor``)."""
        return self.config.scaling_factor

    @scaling_factor.setter
    def scaling_factor(self, value: float) -> None:
        self.config = self.config.model_validate(
            {**self.config.model_dump(), "scaling_factor": value}
        )

    @property
    def shift_factor(self) -> float:
        """Subtracted from latents before scaling (``config.shift_factor``)."""
        return self.config.shift_factor

    @shift_factor.setter
    def shift_factor(self, value: float) -> None:
        self.config = self.config.model_validate(
            {**self.config.model_dump(), "shift_factor": value}
        )

    def latent_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """``(c, h, w) -> (latent_channels, h/f, w/f)``; ``(frames, c, h, w)`` keeps frames."""
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (3, 4):
            raise ShapeError(
                f"KLAutoencoder: shape must be (channels, height, width) or (frames, channels, "
                f"height, width), got {shape}"
            )
        channels, height, width = shape[-3:]
        if channels != self.config.in_channels:
            raise ShapeError(
                f"KLAutoencoder: {channels} channels, expected {self.config.in_channels}"
            )
        f = self.config.downsampling_factor
        for name, size in (("height", height), ("width", width)):
            if size % f != 0:
                raise ShapeError(
                    f"KLAutoencoder: {name} {size} is not a multiple of {f} (the encoder "
                    f"downsamples {len(self.config.channel_mult) - 1} times)"
                )
        return (*shape[:-3], self.latent_channels, height // f, width // f)

    @checked
    def posterior(self, x: Sample) -> DiagonalGaussian:
        """The posterior ``q(z | x)`` over *unscaled* latents, for images or videos."""
        self.latent_shape(x.shape[1:])
        images, frames = _frames_to_batch(x)
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        return DiagonalGaussian(_batch_to_frames(mean, frames), _batch_to_frames(logvar, frames))

    @checked
    def encode(
        self, x: Sample, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> Latents:
        """Scaled latents ``(mean - shift) * scale``; with ``sample=True`` a posterior draw."""
        posterior = self.posterior(x)
        z = posterior.sample(generator) if sample else posterior.mean
        return (z - self.shift_factor) * self.scaling_factor

    @checked
    def decode(self, z: Latents) -> Sample:
        """Scaled latents ``(b, [f,] latent_channels, h', w')`` back to data."""
        latents, frames = _frames_to_batch(z)
        if latents.shape[1] != self.latent_channels:
            raise ShapeError(
                f"KLAutoencoder.decode: latents have {latents.shape[1]} channels, expected "
                f"{self.latent_channels}"
            )
        latents = latents / self.scaling_factor + self.shift_factor
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return _batch_to_frames(self.decoder(latents), frames)

    def forward(
        self, x: Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruction from a posterior sample, and the posterior (for the KL term)."""
        posterior = self.posterior(x)
        z = posterior.sample(generator)
        latents, frames = _frames_to_batch(z)
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return _batch_to_frames(self.decoder(latents), frames), posterior


class IdentityEncoderConfig(Config):
    """Pixel space: the [`IdentityEncoder`][diffkit.nn.vae.IdentityEncoder]."""

    kind: Literal["identity"] = "identity"
    channels: int = Field(
        default=3,
        gt=0,
        le=MAX_DATA_ELEMENTS,
        description="data channels (= latent channels), at most MAX_DATA_ELEMENTS",
    )

    @property
    def in_channels(self) -> int:
        """Data channels."""
        return self.channels

    @property
    def out_channels(self) -> int:
        """Decoded channels (the data's)."""
        return self.channels

    @property
    def latent_channels(self) -> int:
        """Latent channels (the data's)."""
        return self.channels

    @property
    def downsampling_factor(self) -> int:
        """Pixel space: 1."""
        return 1


class IdentityEncoder(nn.Module):
    """The identity latent space (pixel-space diffusion) behind the Encoder interface."""

    scaling_factor: float = 1.0

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.config = IdentityEncoderConfig(channels=channels)
        self.latent_channels: int = channels

    @classmethod
    def from_config(cls, config: IdentityEncoderConfig) -> "IdentityEncoder":
        """Build from its config."""
        return cls(config.channels)

    def latent_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The data shape itself (after checking its channels)."""
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (3, 4) or shape[-3] != self.latent_channels:
            raise ShapeError(
                f"IdentityEncoder: expected ({self.latent_channels}, height, width) or (frames, "
                f"{self.latent_channels}, height, width), got {shape}"
            )
        return shape

    @checked
    def encode(self, x: Sample) -> Sample:
        """``x`` itself."""
        self.latent_shape(x.shape[1:])
        return x

    @checked
    def decode(self, z: Sample) -> Sample:
        """``z`` itself."""
        self.latent_shape(z.shape[1:])
        return z


ENCODERS.register(KLAutoencoderConfig, KLAutoencoder.from_config)
ENCODERS.register(IdentityEncoderConfig, IdentityEncoder.from_config)
