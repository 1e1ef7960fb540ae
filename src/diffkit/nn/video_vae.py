"""The latent space of videos: a causal 3-D KL autoencoder (Wan 2.1's video VAE).

[`CausalVideoAutoencoder`][diffkit.nn.video_vae.CausalVideoAutoencoder] is the
[`KLAutoencoder`][diffkit.nn.vae.KLAutoencoder]'s design for clips: the same levels of
residual blocks, strided downsampling and nearest-x2 upsampling (diffkit's
[`Downsample`][diffkit.nn.resblocks.Downsample] / [`Upsample`][diffkit.nn.resblocks.Upsample],
frame by frame), a middle block with self-attention over each frame's pixels, a diagonal
Gaussian posterior ([`DiagonalGaussian`][diffkit.nn.vae.DiagonalGaussian]), but with causal
3-D convolutions ([`CausalResBlock`][diffkit.nn.resblocks.CausalResBlock]) and channel RMS
norms, and with time compressed too: levels marked in ``temporal_downsample`` halve the
frames with a stride-2 causal time convolution, the decoder doubles them with a causal time
convolution giving two frames per frame.

The first frame is coded alone (no later frame reaches it, and the time resampling passes it
through), so a video of ``1 + r k`` frames (``r = temporal_downsampling_factor``, 4 for Wan)
has ``1 + k`` latent frames, and an image is a valid 1-frame video. Wan's reference code
(and diffusers' ``AutoencoderKLWan``) encodes chunks of 1, 4, 4, ... frames and decodes one
latent frame at a time, carrying the last frames of every causal convolution in a feature
cache; because every layer is causal, running the whole clip at once gives the same result,
and this module does that (tested against diffusers' chunked output).

Latents are normalised per channel: ``encode(x) = (mean - latents_mean) / latents_std *
scaling_factor`` (Wan's pipelines' normalisation; the statistics are part of the config).
"""

import itertools
from collections.abc import Iterable, Sequence
from typing import Literal, cast

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field, PositiveFloat, PositiveInt, model_validator
from torch import Tensor, nn

from diffkit.config import NetworkConfig, field_error
from diffkit.nn._registry import ENCODERS
from diffkit.nn.attention import Attention
from diffkit.nn.resblocks import (
    CausalConv3d,
    CausalResBlock,
    ChannelRMSNorm,
    Downsample,
    Upsample,
)
from diffkit.nn.vae import DiagonalGaussian, Latents
from diffkit.typing import Sample, ShapeError, checked

__all__ = ["CausalVideoAutoencoder", "CausalVideoAutoencoderConfig"]


class CausalVideoAutoencoderConfig(NetworkConfig):
    """Architecture and latent normalisation of a
    [`CausalVideoAutoencoder`][diffkit.nn.video_vae.CausalVideoAutoencoder] (defaults: the
    Wan 2.1 VAE's architecture, without its latent statistics)."""

    kind: Literal["causal_video_autoencoder"] = "causal_video_autoencoder"
    in_channels: int = Field(default=3, gt=0, description="video channels")
    out_channels: int | None = Field(
        default=None, gt=0, description="decoded channels (default: in)"
    )
    base_channels: int = Field(default=96, gt=0, description="encoder channels of level 0")
    decoder_base_channels: int | None = Field(
        default=None, gt=0, description="decoder's (default: base_channels)"
    )
    channel_mult: tuple[PositiveInt, ...] = Field(
        default=(1, 2, 4, 4), min_length=1, max_length=16, description="per level (at most 16)"
    )
    blocks_per_level: int = Field(
        default=2, gt=0, le=64, description="residual blocks per encoder level"
    )
    temporal_downsample: tuple[bool, ...] = Field(
        default=(False, True, True),
        description="per downsampling (levels - 1): also halve the frames there",
    )
    latent_channels: int = Field(default=16, gt=0, description="channels of the latent")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="in the residual blocks")
    scaling_factor: float = Field(
        default=1.0, ge=1e-6, le=1e6, description="normalised latents are multiplied by this"
    )
    latents_mean: tuple[float, ...] | None = Field(
        default=None, description="per latent channel, subtracted (None: 0)"
    )
    latents_std: tuple[PositiveFloat, ...] | None = Field(
        default=None, description="per latent channel, divided by (None: 1)"
    )
    clamp_output: bool = Field(default=True, description="decode clamps to [-1, 1] (Wan)")

    @model_validator(mode="after")
    def _check(self) -> "CausalVideoAutoencoderConfig":
        owner = type(self).__name__
        if len(self.temporal_downsample) != len(self.channel_mult) - 1:
            message = (
                f"temporal_downsample has {len(self.temporal_downsample)} entries; it needs one "
                f"per downsampling, len(channel_mult) - 1 = {len(self.channel_mult) - 1}"
            )
            raise field_error(owner, "temporal_downsample", message, self.temporal_downsample)
        for name in ("latents_mean", "latents_std"):
            stats = getattr(self, name)
            if stats is not None and len(stats) != self.latent_channels:
                message = (
                    f"{name} has {len(stats)} entries, expected latent_channels="
                    f"{self.latent_channels}"
                )
                raise field_error(owner, name, message, stats)
        decoder = self.decoder_base_channels or self.base_channels
        for i, mult in enumerate(self.channel_mult[1:]):
            if decoder * mult % 2:
                message = (
                    f"decoder level {len(self.channel_mult) - 2 - i} has {decoder * mult} "
                    "channels; its upsampling halves them, so it must be even "
                    "(decoder_base_channels * channel_mult)"
                )
                raise field_error(owner, "decoder_base_channels", message, decoder)
        return self

    def parameter_estimate(self) -> int:
        """A lower bound on the autoencoder's parameters: the 3x3x3 convolutions of the
        encoder's and decoder's residual blocks, and those in and out of the latent."""
        decoder = self.decoder_base_channels or self.base_channels
        encoder_widths = [self.base_channels * m for m in self.channel_mult]
        decoder_widths = [decoder * m for m in self.channel_mult]
        blocks = 2 * 27 * self.blocks_per_level * sum(w * w for w in encoder_widths)
        blocks += 2 * 27 * (self.blocks_per_level + 1) * sum(w * w for w in decoder_widths)
        out = self.out_channels or self.in_channels
        ends = 27 * (self.in_channels * encoder_widths[0] + out * decoder_widths[0])
        latent = 27 * self.latent_channels * (2 * encoder_widths[-1] + decoder_widths[-1])
        return blocks + ends + latent

    @property
    def downsampling_factor(self) -> int:
        """Latent height = video height / this (``2 ** (levels - 1)``)."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def temporal_downsampling_factor(self) -> int:
        """Latent frames = ``1 + (frames - 1) / this`` (``2 ** sum(temporal_downsample)``)."""
        return 2 ** sum(self.temporal_downsample)


def _per_frame(layer: nn.Module, x: Tensor) -> Tensor:
    """Apply a 2-D layer to each frame of ``(b, c, f, h, w)``."""
    frames = x.shape[2]
    y = layer(rearrange(x, "b c f h w -> (b f) c h w"))
    return rearrange(y, "(b f) c h w -> b c f h w", f=frames)


class _FrameAttention(nn.Module):
    """Single-head self-attention over each frame's pixels, after a channel RMS norm."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = ChannelRMSNorm(channels)
        self.attn = Attention(channels, 1, qkv_bias=True)

    def forward(self, x: Tensor) -> Tensor:
        _, _, frames, height, _ = x.shape
        tokens = rearrange(self.norm(x), "b c f h w -> (b f) (h w) c")
        out = rearrange(self.attn(tokens), "(b f) (h w) c -> b c f h w", f=frames, h=height)
        return x + out


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        blocks = [CausalResBlock(channels, channels, dropout=dropout) for _ in range(2)]
        self.res = nn.ModuleList(blocks)
        self.attn = _FrameAttention(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.res[1](self.attn(self.res[0](x)))


class _DownLevel(nn.Module):
    """Residual blocks, then (except at the last level) a spatial and maybe a time halving."""

    def __init__(
        self, cin: int, width: int, blocks: int, dropout: float, down: bool, time: bool
    ) -> None:
        super().__init__()
        widths = [cin] + [width] * blocks
        self.res = nn.ModuleList(
            CausalResBlock(a, b, dropout=dropout) for a, b in itertools.pairwise(widths)
        )
        self.downsample = Downsample(width, padding=0) if down else None
        self.temporal = nn.Conv3d(width, width, (3, 1, 1), stride=(2, 1, 1)) if time else None

    def forward(self, h: Tensor) -> Tensor:
        for block in self.res:
            h = block(h)
        if self.downsample is not None:
            h = _per_frame(self.downsample, h)
        if self.temporal is not None and h.shape[2] > 1:
            # frame 0 alone; then frames (2k-2, 2k-1, 2k) -> k: 1 + 2m frames to 1 + m
            h = torch.cat([h[:, :, :1], self.temporal(h)], dim=2)
        return h


class _UpLevel(nn.Module):
    """Residual blocks, then (except at the last level) a time doubling and a spatial one."""

    def __init__(
        self, cin: int, width: int, blocks: int, dropout: float, up: bool, time: bool
    ) -> None:
        super().__init__()
        widths = [cin] + [width] * (blocks + 1)
        self.res = nn.ModuleList(
            CausalResBlock(a, b, dropout=dropout) for a, b in itertools.pairwise(widths)
        )
        self.temporal = CausalConv3d(width, 2 * width, (3, 1, 1)) if time else None
        self.upsample = Upsample(width, width // 2) if up else None

    def forward(self, h: Tensor) -> Tensor:
        for block in self.res:
            h = block(h)
        if self.temporal is not None and h.shape[2] > 1:
            # frame 0 stays one frame; each later frame becomes two (a causal conv over
            # frames 1.. gives both), so 1 + m frames become 1 + 2m
            later = self.temporal(h[:, :, 1:])
            later = rearrange(later, "b (two c) f h w -> b c (f two) h w", two=2)
            h = torch.cat([h[:, :, :1], later], dim=2)
        if self.upsample is not None:
            h = _per_frame(self.upsample, h)
        return h


class _Encoder(nn.Module):
    def __init__(self, c: CausalVideoAutoencoderConfig) -> None:
        super().__init__()
        widths = [c.base_channels * m for m in c.channel_mult]
        last = len(widths) - 1
        self.conv_in = CausalConv3d(c.in_channels, c.base_channels)
        cins = [c.base_channels, *widths[:-1]]
        time = (*c.temporal_downsample, False)
        self.down = nn.ModuleList(
            _DownLevel(cin, w, c.blocks_per_level, c.dropout, i < last, time[i])
            for i, (cin, w) in enumerate(zip(cins, widths, strict=True))
        )
        self.mid = _Mid(widths[-1], c.dropout)
        self.norm_out = ChannelRMSNorm(widths[-1])
        self.conv_out = CausalConv3d(widths[-1], 2 * c.latent_channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in cast("Iterable[_DownLevel]", self.down):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class _Decoder(nn.Module):
    def __init__(self, c: CausalVideoAutoencoderConfig) -> None:
        super().__init__()
        base = c.decoder_base_channels or c.base_channels
        widths = [base * m for m in reversed(c.channel_mult)]
        time = (*reversed(c.temporal_downsample), False)
        last = len(widths) - 1
        self.conv_in = CausalConv3d(c.latent_channels, widths[0])
        self.mid = _Mid(widths[0], c.dropout)
        # each upsampling halves the channels, so level i > 0 starts from widths[i - 1] // 2
        cins = [widths[0], *(w // 2 for w in widths[:-1])]
        self.up = nn.ModuleList(
            _UpLevel(cin, w, c.blocks_per_level, c.dropout, i < last, time[i])
            for i, (cin, w) in enumerate(zip(cins, widths, strict=True))
        )
        self.norm_out = ChannelRMSNorm(widths[-1])
        self.conv_out = CausalConv3d(widths[-1], c.out_channels or c.in_channels)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in cast("Iterable[_UpLevel]", self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class CausalVideoAutoencoder(nn.Module):
    """Causal 3-D KL autoencoder: an [`Encoder`][diffkit.protocols.Encoder] of videos
    ``(b, frames, c, h, w)`` (``frames = 1 + r k``) and of images (1-frame videos)."""

    def __init__(self, config: CausalVideoAutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        self.latent_channels: int = config.latent_channels
        n = config.latent_channels
        self.encoder = _Encoder(config)
        self.decoder = _Decoder(config)
        self.quant_conv = nn.Conv3d(2 * n, 2 * n, 1)
        self.post_quant_conv = nn.Conv3d(n, n, 1)

    @classmethod
    def from_config(cls, config: CausalVideoAutoencoderConfig) -> "CausalVideoAutoencoder":
        """Build a freshly initialised autoencoder."""
        return cls(config)

    @property
    def scaling_factor(self) -> float:
        """Normalised latents are multiplied by this (``config.scaling_factor``)."""
        return self.config.scaling_factor

    def latent_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """``(frames, c, h, w) -> (1 + (frames - 1) / r, latent_channels, h / f, w / f)``;
        an image ``(c, h, w)`` gives ``(latent_channels, h / f, w / f)``."""
        shape = tuple(int(s) for s in shape)
        name = type(self).__name__
        if len(shape) not in (3, 4):
            raise ShapeError(
                f"{name}: shape must be (frames, channels, height, width) or (channels, height, "
                f"width), got {shape}"
            )
        c = self.config
        channels, height, width = shape[-3:]
        if channels != c.in_channels:
            raise ShapeError(f"{name}: {channels} channels, expected {c.in_channels}")
        f, r = c.downsampling_factor, c.temporal_downsampling_factor
        for what, size in (("height", height), ("width", width)):
            if size % f:
                raise ShapeError(f"{name}: {what} {size} is not a multiple of {f}")
        latent = (self.latent_channels, height // f, width // f)
        if len(shape) == 3:
            return latent
        if shape[0] < 1 or (shape[0] - 1) % r:
            raise ShapeError(
                f"{name}: {shape[0]} frames; the first frame is coded alone and then groups "
                f"of {r}, so frames must be 1 + {r} k"
            )
        return (1 + (shape[0] - 1) // r, *latent)

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """``latents_mean`` and ``latents_std`` as ``(channels, 1, 1)`` tensors."""
        c, n = self.config, self.latent_channels
        mean = torch.tensor(c.latents_mean or [0.0] * n, dtype=like.dtype, device=like.device)
        std = torch.tensor(c.latents_std or [1.0] * n, dtype=like.dtype, device=like.device)
        return mean.view(n, 1, 1), std.view(n, 1, 1)

    @checked
    def posterior(self, x: Sample) -> DiagonalGaussian:
        """The posterior ``q(z | x)`` over *unnormalised* latents ``(b, [f',] n, h', w')``."""
        self.latent_shape(x.shape[1:])
        image = x.ndim == 4
        clip = rearrange(x, "b c h w -> b c 1 h w" if image else "b f c h w -> b c f h w")
        moments = self.quant_conv(self.encoder(clip))
        layout = "b c 1 h w -> b c h w" if image else "b c f h w -> b f c h w"
        mean, logvar = (rearrange(m, layout) for m in moments.chunk(2, dim=1))
        return DiagonalGaussian(mean, logvar.clamp(-30.0, 20.0))

    @checked
    def encode(
        self, x: Sample, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> Latents:
        """Normalised latents ``(mean - latents_mean) / latents_std * scaling_factor``
        (``sample=True``: of a posterior draw)."""
        posterior = self.posterior(x)
        z = posterior.sample(generator) if sample else posterior.mean
        mean, std = self._stats(z)
        return (z - mean) / std * self.scaling_factor

    def _decode(self, z: Tensor) -> Tensor:
        """Unnormalised latents ``(b, [f',] n, h', w')`` to data (no clamp)."""
        if z.ndim not in (4, 5) or z.shape[-3] != self.latent_channels:
            raise ShapeError(
                f"{type(self).__name__}.decode: latents must be (batch, [frames,] "
                f"{self.latent_channels}, height, width), got {tuple(z.shape)}"
            )
        image = z.ndim == 4
        clip = rearrange(z, "b c h w -> b c 1 h w" if image else "b f c h w -> b c f h w")
        out = self.decoder(self.post_quant_conv(clip))
        return rearrange(out, "b c 1 h w -> b c h w" if image else "b c f h w -> b f c h w")

    @checked
    def decode(self, z: Latents) -> Sample:
        """Normalised latents back to data (clamped to [-1, 1] with ``clamp_output``)."""
        mean, std = self._stats(z)
        out = self._decode(z / self.scaling_factor * std + mean)
        return out.clamp(-1.0, 1.0) if self.config.clamp_output else out

    def forward(
        self, x: Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruction (unclamped) from a posterior sample, and the posterior."""
        posterior = self.posterior(x)
        return self._decode(posterior.sample(generator)), posterior


ENCODERS.register(CausalVideoAutoencoderConfig, CausalVideoAutoencoder.from_config)
