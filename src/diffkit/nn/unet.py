"""The U-Net denoiser: an encoder/decoder of residual blocks with skip connections.

Level ``i`` works at ``1 / 2**i`` of the input resolution with ``base_channels *
channel_mult[i]`` channels and ``blocks_per_level`` residual blocks (the decoder has one
more per level, to consume the extra skip). Attention sits at the levels whose
downsampling factor is in ``attention_resolutions``: pixel self-attention, or — when
``context_dim`` is set — transformer blocks with cross-attention to ``Conditioning.tokens``
(latent diffusion). A time embedding conditions every residual block; class labels and
pooled embeddings, when configured, are added to it.

With ``temporal`` set it is a space-time U-Net (Ho et al. 2022, *Video Diffusion Models*;
ModelScope text-to-video): it takes videos ``(batch, frames, channels, height, width)``,
runs every 2-D convolution and spatial (cross-)attention on each frame alone, and adds
layers that mix each pixel's frames: a [`TemporalConv`][diffkit.nn.resblocks.TemporalConv]
after every residual block, a [`TemporalTransformer`][diffkit.nn.attention.TemporalTransformer]
after every spatial attention, and one after the input convolution. For joint image-video
training, ``Conditioning.temporal`` marks the items whose frames are independent images:
for them every temporal layer is the identity, so they train the per-frame (image) network
only and give the temporal layers no gradient.

Weights of diffusers' ``UNet2DModel`` / ``UNet2DConditionModel`` / ``UNet3DConditionModel``
load with ``diffkit.interop.from_diffusers``.
"""

import dataclasses
from collections.abc import Callable, Iterable
from typing import Annotated, Literal, cast

import torch
from einops import rearrange, repeat
from jaxtyping import Float
from pydantic import Field, PositiveInt, model_validator
from torch import Tensor, nn

from diffkit.config import Config, NetworkConfig, field_error
from diffkit.nn._registry import DENOISERS
from diffkit.nn.attention import TemporalTransformer
from diffkit.nn.embeddings import add_condition_embeddings
from diffkit.nn.inputs import validate_inputs
from diffkit.nn.layers import (
    Downsample,
    ResBlock,
    SpatialSelfAttention,
    SpatialTransformer,
    TimeEmbedding,
    Upsample,
    network_timestep,
    timestep_embedding,
)
from diffkit.nn.resblocks import Level, TemporalConv
from diffkit.protocols import Conditioning
from diffkit.typing import Prediction, Sample, ShapeError, Time, checked

__all__ = ["TemporalConfig", "UNet", "UNetConfig"]

Mix = Callable[..., Tensor]
"""``mix(layer, h, attention=False)``: a temporal layer on the clips of ``h``."""
Output = Float[Tensor, "batch *out_shape"]
"""``(batch, out_channels, h, w)``; a space-time U-Net's ``(batch, frames, out_channels, h, w)``."""


class TemporalConfig(Config):
    """The temporal layers that make a [`UNet`][diffkit.nn.unet.UNet] a space-time U-Net."""

    kind: Literal["temporal"] = "temporal"
    conv: bool = Field(
        default=True, description="a temporal convolution stack after every residual block"
    )
    attention: bool = Field(
        default=True, description="a temporal attention after every spatial attention"
    )
    input_heads: int | None = Field(
        default=8,
        gt=0,
        le=256,
        description="heads (of attention_head_dim channels) of a temporal attention after the "
        "input convolution (ModelScope: 8); None: none",
    )
    dropout: float = Field(
        default=0.1, ge=0, lt=1, description="dropout inside the temporal convolutions"
    )
    positions: Literal["none", "rotary", "sinusoidal"] = Field(
        default="none",
        description="frame positions in the temporal attentions: 'none' (ModelScope: only "
        "the temporal convolutions give order), 'rotary' (relative, as VDM's) or "
        "'sinusoidal' (absolute, added to the tokens, as AnimateDiff's)",
    )
    cross_attention: bool = Field(
        default=False,
        description="temporal attentions attend to the text (self-attention over the frames, "
        "then cross-attention to Conditioning.tokens) instead of a second self-attention, "
        "as LVDM's temporal transformers can; needs context_dim",
    )
    frame_patch: int = Field(
        default=1,
        ge=1,
        le=16,
        description="consecutive frames stacked as channels before the first convolution "
        "and split after the last (a tubelet of this many frames and one pixel, as ViViT's "
        "in time): every layer sees each frame pair's motion, over frames / frame_patch "
        "frames; clips must have a multiple of it, and no image items",
    )

    @model_validator(mode="after")
    def _check_layers(self) -> "TemporalConfig":
        if not self.conv and not self.attention and self.input_heads is None:
            message = (
                "temporal: conv=False, attention=False and input_heads=None leave no layer "
                "that mixes frames; use temporal=None for an image U-Net"
            )
            raise field_error("TemporalConfig", "conv", message, self.conv)
        return self


Depth = Annotated[int, Field(gt=0, le=256)]
"""Transformer blocks per attention layer: at least 1, at most 256."""


class UNetConfig(NetworkConfig):
    """Architecture of a [`UNet`][diffkit.nn.unet.UNet]."""

    kind: Literal["unet"] = "unet"
    in_channels: int = Field(default=3, gt=0, description="channels of x_t")
    out_channels: int | None = Field(
        default=None, gt=0, description="output channels (default: in)"
    )
    base_channels: int = Field(
        default=64, gt=0, description="channel unit: level i has base_channels * channel_mult[i]"
    )
    channel_mult: tuple[PositiveInt, ...] = Field(
        default=(1, 2, 2, 2),
        min_length=1,
        max_length=16,
        description="channel multiplier of each level (at most 16 levels)",
    )
    blocks_per_level: int = Field(
        default=2, gt=0, le=64, description="residual blocks per encoder level"
    )
    attention_resolutions: tuple[int, ...] = Field(
        default=(2, 4),
        description="downsampling factors (1, 2, 4, ...) of the levels with attention",
    )
    attention_head_dim: int = Field(default=32, gt=0, description="channels per attention head")
    num_heads: int | None = Field(
        default=None,
        gt=0,
        description="fixed number of heads per level (overrides attention_head_dim)",
    )
    mid_attention: bool = Field(default=True, description="attention in the middle block")
    context_dim: int | None = Field(
        default=None, gt=0, description="dim of Conditioning.tokens; set for cross-attention levels"
    )
    transformer_depth: Depth | tuple[Depth, ...] = Field(
        default=1,
        description="transformer blocks per attention (at most 256): one number, or one per "
        "level (the middle block takes the last level's; SDXL: (1, 2, 10))",
    )
    linear_projection: bool = Field(
        default=False, description="linear (not 1x1 conv) projections around transformer blocks"
    )
    num_classes: int | None = Field(default=None, gt=0, description="class-label conditioning")
    pooled_dim: int | None = Field(default=None, gt=0, description="dim of Conditioning.pooled")
    micro_conditions: int = Field(
        default=0,
        ge=0,
        description="number of Conditioning.micro entries (SDXL: 6, original size, crop "
        "top-left, target size), each as micro_freq_dim sinusoidal features appended to "
        "Conditioning.pooled before its embedding (diffusers' addition_embed_type='text_time')",
    )
    micro_freq_dim: int = Field(
        default=256, ge=2, description="sinusoidal features per micro-condition"
    )
    norm_groups: int = Field(default=32, gt=0, description="GroupNorm groups")
    norm_eps: float = Field(default=1e-5, gt=0, description="GroupNorm epsilon")
    scale_shift: bool = Field(
        default=False, description="time embedding as scale-shift of the norm"
    )
    dropout: float = Field(default=0.0, ge=0, lt=1, description="dropout inside residual blocks")
    time_embed_dim: int | None = Field(
        default=None, gt=0, description="default: 4x the first level's channels"
    )
    flip_sin_to_cos: bool = Field(default=True, description="sinusoid order [cos, sin]")
    freq_shift: float = Field(
        default=0.0, description="frequency shift of the sinusoidal embedding"
    )
    mid_scale: float = Field(default=1.0, gt=0, description="output divisor of the middle block")
    downsample_padding: int = Field(default=1, ge=0, le=1, description="padding of strided convs")
    center_input: bool = Field(default=False, description="map x_t from [0, 1] to [-1, 1] first")
    prediction: Prediction = Field(default="epsilon", description="what the network predicts")
    time_input: Literal["t", "index"] = Field(
        default="t", description="embed time_scale * t, or the discrete index N t - 1"
    )
    time_scale: float = Field(
        default=1000.0,
        gt=0,
        le=1e6,  # 1e300 t is inf in float32, and its sinusoid NaN
        description="multiplier of t when time_input='t' (at most 1e6)",
    )
    num_train_timesteps: int = Field(default=1000, gt=1, description="N when time_input='index'")
    temporal: TemporalConfig | None = Field(
        default=None,
        description="temporal layers: a space-time U-Net on videos (batch, frames, c, h, w)",
    )

    @model_validator(mode="after")
    def _check(self) -> "UNetConfig":
        features = self.base_channels * self.channel_mult[0]  # the sinusoidal time features
        if features < 2:
            message = (
                f"base_channels * channel_mult[0] = {features} is also the size of the "
                "sinusoidal time features and must be at least 2 (with 1 they are all zero: "
                "the network would ignore time)"
            )
            raise field_error("UNetConfig", "base_channels", message, self.base_channels)
        if features // 2 == self.freq_shift:
            message = (
                f"freq_shift {self.freq_shift} equals half the {features} sinusoidal time "
                "features (base_channels * channel_mult[0]): the frequencies would be NaN"
            )
            raise field_error("UNetConfig", "freq_shift", message, self.freq_shift)
        for i, mult in enumerate(self.channel_mult):
            channels = self.base_channels * mult
            if channels % self.norm_groups != 0:
                message = (
                    f"level {i} has {channels} channels, not divisible into "
                    f"norm_groups={self.norm_groups}"
                )
                raise field_error("UNetConfig", "norm_groups", message, self.norm_groups)
            if self._has_attention(i) or (self.mid_attention and i == len(self.channel_mult) - 1):
                self._check_heads(channels)
        input_heads = self.temporal.input_heads if self.temporal is not None else None
        if self._rotary and input_heads is not None and self.attention_head_dim % 2:
            message = (
                f"temporal.positions 'rotary' turns feature pairs, but the input temporal "
                f"attention's heads have attention_head_dim={self.attention_head_dim} (odd) "
                "channels"
            )
            raise field_error("UNetConfig", "attention_head_dim", message, self.attention_head_dim)
        self._check_levels()
        return self

    def _check_heads(self, channels: int) -> None:
        field = "attention_head_dim" if self.num_heads is None else "num_heads"
        try:
            _, head_dim = self.heads_at(channels)
        except ValueError as err:
            raise field_error("UNetConfig", field, str(err), getattr(self, field)) from None
        if self._rotary and head_dim % 2:
            message = (
                f"temporal.positions 'rotary' turns feature pairs, but {channels} channels "
                f"give heads of {head_dim} (odd) channels"
            )
            raise field_error("UNetConfig", field, message, getattr(self, field))

    @property
    def _rotary(self) -> bool:
        return self.temporal is not None and self.temporal.positions == "rotary"

    def _check_levels(self) -> None:
        levels = len(self.channel_mult)
        if self.temporal is not None and self.temporal.cross_attention and not self.context_dim:
            message = "temporal.cross_attention attends to the text tokens: set context_dim"
            raise field_error("UNetConfig", "temporal", message, self.temporal)
        if isinstance(self.transformer_depth, tuple) and len(self.transformer_depth) != levels:
            message = (
                f"transformer_depth {self.transformer_depth} must give one depth per level "
                f"({levels} levels)"
            )
            raise field_error("UNetConfig", "transformer_depth", message, self.transformer_depth)
        if self.micro_conditions and self.pooled_dim is None:
            message = "micro_conditions are appended to Conditioning.pooled: set pooled_dim"
            raise field_error("UNetConfig", "micro_conditions", message, self.micro_conditions)
        allowed = {2**i for i in range(levels)}
        if not set(self.attention_resolutions) <= allowed:
            message = (
                f"attention_resolutions {self.attention_resolutions} must be among the "
                f"downsampling factors of the {levels} levels: {sorted(allowed)}"
            )
            raise field_error(
                "UNetConfig", "attention_resolutions", message, self.attention_resolutions
            )

    def parameter_estimate(self) -> int:
        """A lower bound on the U-Net's parameters: its 3x3 convolutions, time projections,
        embeddings and attention projections (norms and biases left out)."""
        widths = [self.base_channels * m for m in self.channel_mult]
        emb = self.time_embed_dim or 4 * widths[0]
        out = self.out_channels or self.in_channels
        total = 9 * widths[0] * (self.in_channels + out) + widths[0] * emb + emb * emb
        total += (self.num_classes or 0) * emb
        if self.pooled_dim:
            total += (self.pooled_dim + self.micro_conditions * self.micro_freq_dim) * emb
        blocks = 2 * self.blocks_per_level + 1  # encoder and decoder blocks of a level
        for i, width in enumerate(widths):
            total += blocks * (9 * width * width + emb * width)  # conv2 and time projection
            if self._has_attention(i):
                total += blocks * self._attention_estimate(width, self.depth_at(i))
        last = widths[-1]
        total += 2 * (9 * last * last + emb * last)
        if self.mid_attention:
            total += self._attention_estimate(last, self.depth_at(-1))
        return total

    def _attention_estimate(self, channels: int, depth: int) -> int:
        """Parameters of one attention layer: projections (and feed-forward) of each block."""
        if self.context_dim is None:
            return 4 * channels * channels
        return depth * (14 * channels * channels + 2 * self.context_dim * channels)

    def _has_attention(self, level: int) -> bool:
        return 2**level in self.attention_resolutions

    def depth_at(self, level: int) -> int:
        """Transformer blocks per attention at ``level`` (``-1``: the last, and the middle)."""
        depth = self.transformer_depth
        return depth[level] if isinstance(depth, tuple) else depth

    def heads_at(self, channels: int) -> tuple[int, int]:
        """``(heads, head_dim)`` of an attention layer with ``channels`` channels."""
        if self.num_heads is not None:
            if channels % self.num_heads != 0:
                raise ValueError(f"{channels} channels are not divisible by {self.num_heads} heads")
            return self.num_heads, channels // self.num_heads
        if channels % self.attention_head_dim != 0:
            raise ValueError(
                f"{channels} channels are not divisible by attention_head_dim "
                f"{self.attention_head_dim}"
            )
        return channels // self.attention_head_dim, self.attention_head_dim

    @property
    def frame_patch(self) -> int:
        """Consecutive frames stacked as channels (``temporal.frame_patch``; 1 for images)."""
        return self.temporal.frame_patch if self.temporal is not None else 1

    @property
    def downsampling_factor(self) -> int:
        """Height and width must be multiples of this (``2 ** (levels - 1)``)."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def patch_size(self) -> None:
        """A U-Net works on pixels (or latents), not patches."""
        return None

    @property
    def is_video(self) -> bool:
        """A U-Net takes images; a space-time U-Net (``temporal`` set), videos."""
        return self.temporal is not None


@dataclasses.dataclass(frozen=True)
class _Layers:
    """Builds a U-Net's layers with the options its config gives them."""

    c: UNetConfig
    emb_dim: int

    def res(self, cin: int, cout: int, scale: float = 1.0) -> ResBlock:
        """A residual block ``cin -> cout`` conditioned on the embedding."""
        c = self.c
        return ResBlock(
            cin,
            cout,
            self.emb_dim,
            groups=c.norm_groups,
            eps=c.norm_eps,
            scale_shift=c.scale_shift,
            dropout=c.dropout,
            output_scale=scale,
        )

    def attn(self, channels: int, level: int, scale: float = 1.0) -> nn.Module:
        """Self-attention, or a transformer with cross-attention when there is context."""
        c = self.c
        heads, head_dim = c.heads_at(channels)
        if c.context_dim is None:
            return SpatialSelfAttention(
                channels, head_dim, groups=c.norm_groups, eps=c.norm_eps, output_scale=scale
            )
        return SpatialTransformer(
            channels,
            heads,
            head_dim,
            context_dim=c.context_dim,
            depth=c.depth_at(level),
            groups=c.norm_groups,
            linear_projection=c.linear_projection,
        )

    def time_layers(self, width: int, count: int, attention: bool) -> tuple[list[nn.Module], ...]:
        """``(temporal convs, temporal attentions)`` of ``count`` residual blocks (and
        attentions, when ``attention``); empty for an image U-Net."""
        c, tc = self.c, self.c.temporal
        if tc is None:
            return [], []
        heads, head_dim = c.heads_at(width) if attention and tc.attention else (0, 0)
        convs: list[nn.Module] = [
            TemporalConv(width, groups=c.norm_groups, dropout=tc.dropout)
            for _ in range(count if tc.conv else 0)
        ]
        attns: list[nn.Module] = [
            TemporalTransformer(
                width,
                heads,
                head_dim,
                groups=c.norm_groups,
                positions=tc.positions,
                context_dim=c.context_dim if tc.cross_attention else None,
            )
            for _ in range(count if heads else 0)
        ]
        return convs, attns

    def down(self, widths: list[int]) -> tuple[nn.ModuleList, list[int]]:
        """The encoder's levels, and the channels of the skips they leave, in order."""
        c, levels = self.c, nn.ModuleList()
        skip_channels, cin = [widths[0]], widths[0]
        for i, width in enumerate(widths):
            blocks, attns = [], []
            for _ in range(c.blocks_per_level):
                blocks.append(self.res(cin, width))
                if c._has_attention(i):
                    attns.append(self.attn(width, i))
                cin = width
                skip_channels.append(width)
            down = Downsample(width, c.downsample_padding) if i < len(widths) - 1 else None
            if down is not None:
                skip_channels.append(width)
            tconv, tattn = self.time_layers(width, len(blocks), bool(attns))
            levels.append(
                Level(blocks, attns, downsample=down, temporal_conv=tconv, temporal_attn=tattn)
            )
        return levels, skip_channels

    def mid(self, cin: int) -> Level:
        """The middle block: two residual blocks around one attention."""
        c, scale = self.c, self.c.mid_scale
        mid_attn = [self.attn(cin, -1, scale)] if c.mid_attention else []
        tconv, tattn = self.time_layers(cin, 2, c.mid_attention)
        return Level(
            [self.res(cin, cin, scale), self.res(cin, cin, scale)],
            mid_attn,
            temporal_conv=tconv,
            temporal_attn=tattn[:1],  # the middle block has one attention
        )

    def up(self, widths: list[int], skip_channels: list[int]) -> nn.ModuleList:
        """The decoder's levels, each block taking one skip (``skip_channels`` is consumed)."""
        c, levels, cin = self.c, nn.ModuleList(), widths[-1]
        for i, width in reversed(list(enumerate(widths))):
            blocks, attns = [], []
            for _ in range(c.blocks_per_level + 1):
                blocks.append(self.res(cin + skip_channels.pop(), width))
                if c._has_attention(i):
                    attns.append(self.attn(width, i))
                cin = width
            up = Upsample(width) if i > 0 else None
            tconv, tattn = self.time_layers(width, len(blocks), bool(attns))
            levels.append(
                Level(blocks, attns, upsample=up, temporal_conv=tconv, temporal_attn=tattn)
            )
        return levels


class UNet(nn.Module):
    """U-Net denoiser ``(x_t, t, cond) -> prediction`` on images ``(batch, channels, h, w)``."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        self.prediction: Prediction = config.prediction
        c = config
        widths = [c.base_channels * m for m in c.channel_mult]
        emb_dim = c.time_embed_dim or 4 * widths[0]
        layers = _Layers(c, emb_dim)

        tc = c.temporal
        k = c.frame_patch
        self.conv_in = nn.Conv2d(c.in_channels * k, widths[0], 3, padding=1)
        self.temporal_in = (
            TemporalTransformer(
                widths[0],
                tc.input_heads,
                c.attention_head_dim,
                groups=c.norm_groups,
                positions=tc.positions,
                context_dim=c.context_dim if tc.cross_attention else None,
            )
            if tc is not None and tc.input_heads is not None
            else None
        )
        self.time_embed = TimeEmbedding(widths[0], emb_dim)  # sinusoid of widths[0] features
        self.label_embed = nn.Embedding(c.num_classes, emb_dim) if c.num_classes else None
        pooled_in = (c.pooled_dim or 0) + c.micro_conditions * c.micro_freq_dim
        self.pooled_embed = TimeEmbedding(pooled_in, emb_dim) if c.pooled_dim else None

        self.down, skip_channels = layers.down(widths)
        self.mid: Level = layers.mid(widths[-1])
        self.up = layers.up(widths, skip_channels)
        self.norm_out = nn.GroupNorm(c.norm_groups, widths[0], eps=c.norm_eps)
        self.conv_out = nn.Conv2d(widths[0], k * (c.out_channels or c.in_channels), 3, padding=1)

    @classmethod
    def from_config(cls, config: UNetConfig) -> "UNet":
        """Build a freshly initialised U-Net."""
        return cls(config)

    def _validate(self, x: Tensor, t: Tensor, cond: Conditioning | None) -> None:
        c = self.config
        video = c.temporal is not None
        if x.ndim != (5 if video else 4):
            takes = "videos (batch, frames, channels, h, w)" if video else "images (b, c, h, w)"
            raise ShapeError(
                f"UNet.forward: argument 'x_t' has {x.ndim} dimensions {tuple(x.shape)}, "
                f"expected {5 if video else 4}: this U-Net takes {takes}"
                + ("" if video else " (UNetConfig.temporal makes a space-time U-Net)")
            )
        k = c.frame_patch
        if video and x.shape[1] % k:
            raise ShapeError(
                f"UNet: {x.shape[1]} frames do not split into temporal.frame_patch={k} "
                "frame patches"
            )
        if k > 1 and cond is not None and cond.temporal is not None and not cond.temporal.all():
            raise ValueError(
                f"UNet: temporal.frame_patch={k} stacks frames into channels, so it takes "
                "no image items (Conditioning.temporal false)"
            )
        channels = x.shape[-3]
        if channels != c.in_channels:
            raise ShapeError(f"UNet: x_t has {channels} channels, expected {c.in_channels}")
        factor = c.downsampling_factor
        for name, size in (("height", x.shape[-2]), ("width", x.shape[-1])):
            if size % factor != 0:
                raise ShapeError(
                    f"UNet: {name} {size} is not a multiple of {factor} (the U-Net downsamples "
                    f"{len(c.channel_mult) - 1} times); pad or resize to "
                    f"{-(-size // factor) * factor}"
                )
        validate_inputs("UNet", x, t, cond, c, self.conv_in.weight.dtype, temporal=video)
        if c.micro_conditions:
            micro = cond.micro if cond is not None else None
            if micro is None or micro.shape[1] != c.micro_conditions:
                raise ShapeError(
                    f"UNet: micro_conditions={c.micro_conditions} needs Conditioning.micro of "
                    f"shape (batch, {c.micro_conditions}) (SDXL: original height, width, crop "
                    f"top, left, target height, width), got "
                    f"{None if micro is None else tuple(micro.shape)}"
                )

    def embed_time(self, t: Tensor, cond: Conditioning | None) -> Tensor:
        """The conditioning embedding ``(batch, emb_dim)``: time, plus labels and pooled."""
        c = self.config
        steps = network_timestep(t, c.time_input, c.num_train_timesteps, c.time_scale)
        emb = timestep_embedding(
            steps,
            c.base_channels * c.channel_mult[0],
            flip_sin_to_cos=c.flip_sin_to_cos,
            freq_shift=c.freq_shift,
        )
        emb = self.time_embed(emb.to(self.conv_in.weight.dtype))
        if (
            c.micro_conditions
            and cond is not None
            and cond.micro is not None
            and cond.pooled is not None
        ):
            micro = timestep_embedding(
                cond.micro.reshape(-1),
                c.micro_freq_dim,
                flip_sin_to_cos=c.flip_sin_to_cos,
                freq_shift=c.freq_shift,
            )
            micro = rearrange(micro, "(b n) d -> b (n d)", n=c.micro_conditions)
            pooled = torch.cat([cond.pooled, micro.to(cond.pooled.dtype)], dim=1)
            cond = dataclasses.replace(cond, pooled=pooled)  # SDXL's text_time embedding input
        return add_condition_embeddings(emb, cond, self.label_embed, self.pooled_embed)

    @checked
    def forward(self, x_t: Sample, t: Time, cond: Conditioning | None = None) -> Output:
        """Predict ``self.prediction`` for ``x_t`` ``(b, c, h, w)`` (a space-time U-Net:
        ``(b, frames, c, h, w)``) at times ``t`` ``(b,)``."""
        self._validate(x_t, t, cond)
        emb = self.embed_time(t, cond)
        context = cond.tokens if cond is not None else None
        mask = cond.mask if cond is not None else None
        if context is not None and self.config.context_dim is None:
            context = mask = None  # an unconditional U-Net ignores tokens
        if self.config.center_input:
            x_t = 2 * x_t - 1.0
        k = self.config.frame_patch
        if k > 1:  # k frames stacked as the channels of one
            x_t = rearrange(x_t, "b (f k) c h w -> b f (k c) h w", k=k)
        frames = x_t.shape[1] if x_t.ndim == 5 else 1
        if x_t.ndim == 5:  # a clip's frames run as a batch of images, consecutive
            x_t = rearrange(x_t, "b f c h w -> (b f) c h w")
            emb = repeat(emb, "b d -> (b f) d", f=frames)
            if context is not None:
                context = repeat(context, "b n d -> (b f) n d", f=frames)
                mask = repeat(mask, "b n -> (b f) n", f=frames) if mask is not None else None
        mix = self._time_mixer(frames, cond, context, mask)

        # Activations run channels-last (NHWC): oneDNN convolutions and GroupNorm take it
        # natively, and pixels-as-tokens for attention become a free view instead of a copy.
        # (Weights stay contiguous, so state dicts save as they are.)
        h = self.conv_in(x_t.contiguous(memory_format=torch.channels_last))
        if self.temporal_in is not None:
            h = mix(self.temporal_in, h, attention=True)
        skips = [h]
        for level in cast("Iterable[Level]", self.down):
            for j in range(len(level.res)):
                h = _block(level, j, h, emb, context, mask, mix)
                skips.append(h)
            if level.downsample is not None:
                h = level.downsample(h)
                skips.append(h)

        for j in range(2):  # res, (temporal conv), attention, (temporal attention), res, ...
            h = _block(self.mid, j, h, emb, context, mask, mix)

        for level in cast("Iterable[Level]", self.up):
            for j in range(len(level.res)):
                h = _block(level, j, torch.cat([h, skips.pop()], dim=1), emb, context, mask, mix)
            if level.upsample is not None:
                h = level.upsample(h)

        h = self.conv_out(torch.nn.functional.silu(self.norm_out(h)))
        # back to (b, c, h, w) order; a clone, not .contiguous(), which torch.compile's
        # stride propagation may take for a no-op on a convolution that returns channels-last
        h = h.clone(memory_format=torch.contiguous_format)
        if self.config.temporal is None:
            return h
        return rearrange(h, "(b f) (k c) h w -> b (f k) c h w", f=frames, k=k)

    def _time_mixer(
        self,
        frames: int,
        cond: Conditioning | None,
        context: Tensor | None,
        mask: Tensor | None,
    ) -> Mix:
        """``mix(layer, h)``: a temporal layer applied to the clips; identity on image items.

        ``Conditioning.temporal`` ``(batch,)`` is false for items whose frames are
        independent images (joint image-video training): their output is ``h`` itself, so
        they neither mix frames nor give the temporal layers any gradient.
        """
        clips = cond.temporal if cond is not None else None
        if clips is not None:
            clips = repeat(clips, "b -> (b f) 1 1 1", f=frames)
        tc = self.config.temporal
        text = (context, mask) if tc is not None and tc.cross_attention else ()

        def mix(layer: nn.Module, h: Tensor, attention: bool = False) -> Tensor:
            out = layer(h, frames, *text) if attention else layer(h, frames)
            return out if clips is None else torch.where(clips, out, h)

        return mix


def _block(
    level: Level,
    j: int,
    h: Tensor,
    emb: Tensor,
    context: Tensor | None,
    mask: Tensor | None,
    mix: Mix,
) -> Tensor:
    """Residual block ``j`` of ``level`` and what follows it: temporal convolution, attention,
    temporal attention (each where the level has it)."""
    h = level.res[j](h, emb)
    if j < len(level.temporal_conv):
        h = mix(level.temporal_conv[j], h)
    if j < len(level.attn):
        h = level.attn[j](h, context, mask)
        if j < len(level.temporal_attn):
            h = mix(level.temporal_attn[j], h, attention=True)
    return h


DENOISERS.register(UNetConfig, UNet.from_config)
