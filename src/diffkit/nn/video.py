"""Video denoiser: a transformer over spatio-temporal patches (tubelets), adaLN-Zero conditioned.

The video ``(b, f, c, h, w)`` is cut into ``pt x p1 x p2`` tubelets
([`TubeletPatches`][diffkit.patches.TubeletPatches]), embedded, and given fixed 3-D sin-cos
positions; tokens are frame-major, ``(b, f' * h' * w', dim)``. Each block attends either

- ``"factorised"``: within each frame (space), then across frames at each position (time) —
  cost ``O(f s^2 + s f^2)`` for ``f`` frames of ``s`` tokens (as in Latte / TimeSformer), or
- ``"full"``: over all ``f * s`` tokens at once — cost ``O((f s)^2)``,

followed by optional cross-attention to ``Conditioning.tokens`` and an MLP, every branch
modulated and gated from the conditioning vector (adaLN-Zero), as in
[`DiT`][diffkit.nn.dit.DiT]. With ``local_mlp`` each MLP also mixes neighbouring tokens
of the same temporal slot by a depthwise 3x3 convolution between its two linear layers
([`LocalFeedForward`][diffkit.nn.video.LocalFeedForward], SegFormer's Mix-FFN, applied
per frame slot): a spatial locality bias that a small transformer otherwise has to learn
from data (time is mixed by the attention only). Same interface as the image denoisers.
"""

import math
from typing import Literal

import torch
from einops import rearrange
from jaxtyping import Bool, Float
from pydantic import Field, model_validator
from torch import Tensor, nn

from diffkit.config import Config
from diffkit.nn._registry import DENOISERS
from diffkit.nn.dit import adaln_condition
from diffkit.nn.layers import (
    Attention,
    FeedForward,
    TimeEmbedding,
    modulate,
    network_timestep,
    timestep_embedding,
    validate_conditioning,
    zero_linear,
)
from diffkit.patches import TubeletPatches, sincos_pos_embed_3d
from diffkit.protocols import Conditioning
from diffkit.typing import Prediction, ShapeError, Time, Video, checked, checked_layer

__all__ = ["LocalFeedForward", "VideoBlock", "VideoDiT", "VideoDiTConfig"]


class VideoDiTConfig(Config):
    """Architecture of a [`VideoDiT`][diffkit.nn.video.VideoDiT]."""

    kind: Literal["video_dit"] = "video_dit"
    in_channels: int = Field(default=4, gt=0, description="channels of each frame")
    out_channels: int | None = Field(default=None, gt=0, description="default: in_channels")
    patch_size: tuple[int, int, int] = Field(
        default=(1, 2, 2), description="tubelet size (frames, height, width)"
    )
    dim: int = Field(default=384, gt=0, description="token width")
    depth: int = Field(default=12, gt=0, le=256, description="number of blocks")
    num_heads: int = Field(default=6, gt=0, description="attention heads")
    mlp_ratio: float = Field(default=4.0, gt=0, description="MLP hidden width / dim")
    local_mlp: bool = Field(
        default=False,
        description="a depthwise 3x3 convolution over each temporal slot's token grid "
        "inside each MLP (a per-frame spatial bias)",
    )
    attention: Literal["factorised", "full"] = Field(
        default="factorised", description="space-then-time attention, or full 3-D attention"
    )
    context_dim: int | None = Field(
        default=None, gt=0, description="dim of Conditioning.tokens (adds cross-attention)"
    )
    pooled_dim: int | None = Field(default=None, gt=0, description="dim of Conditioning.pooled")
    num_classes: int | None = Field(default=None, gt=0, description="class-label conditioning")
    freq_dim: int = Field(
        default=256, ge=2, description="size of the sinusoidal time features (1 would be all zero)"
    )
    prediction: Prediction = Field(default="epsilon", description="what the network predicts")
    time_input: Literal["t", "index"] = Field(
        default="t", description="embed time_scale * t, or the discrete index N t - 1"
    )
    time_scale: float = Field(default=1000.0, gt=0, description="multiplier of t")
    num_train_timesteps: int = Field(default=1000, gt=1, description="N for time_input='index'")

    @model_validator(mode="after")
    def _check(self) -> "VideoDiTConfig":
        if self.dim % self.num_heads != 0:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.dim % 4 != 0 or self.dim < 8:
            raise ValueError(
                f"dim {self.dim} must be a multiple of 4 and at least 8 (3-D sin-cos positions; "
                "with 4 no feature encodes the position within a frame)"
            )
        if any(p < 1 for p in self.patch_size):
            raise ValueError(f"patch_size must be positive, got {self.patch_size}")
        return self

    @property
    def downsampling_factor(self) -> int:
        """Height and width must be multiples of this (the tubelet's height and width)."""
        return math.lcm(self.patch_size[1], self.patch_size[2])

    @property
    def is_video(self) -> bool:
        """A VideoDiT takes videos."""
        return True


class LocalFeedForward(nn.Module):
    """MLP ``proj_out(gelu(h + dwconv(h)))``, ``h = proj_in(x)``, with a depthwise 3x3
    convolution over each temporal slot's ``(height, width)`` token grid (zero-padded)."""

    def __init__(self, dim: int, mult: float = 4.0) -> None:
        super().__init__()
        inner = int(dim * mult)
        self.proj_in = nn.Linear(dim, inner)
        self.conv = nn.Conv2d(inner, inner, 3, padding=1, groups=inner)
        self.proj_out = nn.Linear(inner, dim)

    @checked_layer
    def forward(
        self, x: Float[Tensor, "batch tokens dim"], grid: tuple[int, int, int]
    ) -> Float[Tensor, "batch tokens dim"]:
        """Frame-major tokens ``(b, f * h * w, dim)`` on the grid ``(f, h, w)``."""
        f, h, w = grid
        if x.shape[1] != f * h * w:
            raise ShapeError(
                f"LocalFeedForward: {x.shape[1]} tokens do not fill the grid {grid} "
                f"({f * h * w} tokens)"
            )
        hidden = self.proj_in(x)
        maps = rearrange(hidden, "b (f h w) d -> (b f) d h w", f=f, h=h, w=w)
        maps = self.conv(maps.contiguous(memory_format=torch.channels_last))
        hidden = hidden + rearrange(maps, "(b f) d h w -> b (f h w) d", f=f)
        return self.proj_out(nn.functional.gelu(hidden, approximate="tanh"))


class VideoBlock(nn.Module):
    """adaLN-Zero block over frame-major tokens with factorised or full self-attention."""

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        attention: Literal["factorised", "full"] = "factorised",
        mlp_ratio: float = 4.0,
        context_dim: int | None = None,
        local_mlp: bool = False,
    ) -> None:
        super().__init__()
        self.factorised = attention == "factorised"
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, qkv_bias=True)
        if self.factorised:
            self.norm_time = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.attn_time = Attention(dim, heads, qkv_bias=True)
        else:
            self.norm_time = self.attn_time = None
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
            self.cross = Attention(dim, heads, context_dim=context_dim, qkv_bias=True)
        else:
            self.norm_cross = self.cross = None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp: nn.Module = (
            LocalFeedForward(dim, mlp_ratio)
            if local_mlp
            else FeedForward(dim, mlp_ratio, kind="gelu_tanh")
        )
        self.ada = zero_linear(dim, (9 if self.factorised else 6) * dim)

    @checked_layer
    def forward(
        self,
        x: Float[Tensor, "batch tokens dim"],
        c: Float[Tensor, "batch dim"],
        frames: int,
        context: Float[Tensor, "batch context context_dim"] | None = None,
        mask: Bool[Tensor, "batch context"] | None = None,
        grid: tuple[int, int, int] | None = None,
    ) -> Float[Tensor, "batch tokens dim"]:
        """Tokens ``(b, frames * s, dim)`` conditioned on ``c`` ``(b, dim)``; ``grid``
        ``(frames, h, w)`` is needed by a local MLP."""
        mods = self.ada(nn.functional.silu(c)).chunk(9 if self.factorised else 6, dim=1)
        shift, scale, gate = mods[0:3]
        h = modulate(self.norm1(x), shift, scale)
        if self.factorised:
            h = rearrange(h, "b (f s) d -> (b f) s d", f=frames)
            h = rearrange(self.attn(h), "(b f) s d -> b (f s) d", f=frames)
        else:
            h = self.attn(h)
        x = x + gate.unsqueeze(1) * h
        if self.attn_time is not None and self.norm_time is not None:
            shift, scale, gate = mods[6:9]
            h = modulate(self.norm_time(x), shift, scale)
            spatial = x.shape[1] // frames  # s, not b: an empty batch leaves b undetermined
            h = rearrange(h, "b (f s) d -> (b s) f d", f=frames)
            h = rearrange(self.attn_time(h), "(b s) f d -> b (f s) d", s=spatial)
            x = x + gate.unsqueeze(1) * h
        if self.cross is not None and self.norm_cross is not None:
            x = x + self.cross(self.norm_cross(x), context, mask)
        shift, scale, gate = mods[3:6]
        h = modulate(self.norm2(x), shift, scale)
        if isinstance(self.mlp, LocalFeedForward):
            if grid is None:
                raise ValueError("VideoBlock: a local MLP needs the token grid (frames, h, w)")
            h = self.mlp(h, grid)
        else:
            h = self.mlp(h)
        return x + gate.unsqueeze(1) * h


class VideoDiT(nn.Module):
    """Video denoiser ``(x_t, t, cond) -> prediction`` on videos ``(b, f, c, h, w)``."""

    def __init__(self, config: VideoDiTConfig) -> None:
        super().__init__()
        self.config = config
        self.prediction: Prediction = config.prediction
        c = config
        self.patches = TubeletPatches(c.patch_size)
        self._out_channels = c.out_channels or c.in_channels
        self.embed = nn.Linear(self.patches.patch_dim(c.in_channels), c.dim)
        self.time_embed = TimeEmbedding(c.freq_dim, c.dim)
        self.label_embed = nn.Embedding(c.num_classes, c.dim) if c.num_classes else None
        self.pooled_embed = TimeEmbedding(c.pooled_dim, c.dim) if c.pooled_dim else None
        self.blocks = nn.ModuleList(
            VideoBlock(
                c.dim,
                c.num_heads,
                attention=c.attention,
                mlp_ratio=c.mlp_ratio,
                context_dim=c.context_dim,
                local_mlp=c.local_mlp,
            )
            for _ in range(c.depth)
        )
        self.norm_out = nn.LayerNorm(c.dim, elementwise_affine=False, eps=1e-6)
        self.ada_out = zero_linear(c.dim, 2 * c.dim)
        self.proj_out = zero_linear(c.dim, self.patches.patch_dim(self._out_channels))

    @classmethod
    def from_config(cls, config: VideoDiTConfig) -> "VideoDiT":
        """Build a freshly initialised video transformer (it starts by predicting zeros)."""
        return cls(config)

    def condition_vector(self, t: Tensor, cond: Conditioning | None) -> Tensor:
        """``c`` ``(batch, dim)``: time embedding plus label and pooled embeddings."""
        cfg = self.config
        steps = network_timestep(t, cfg.time_input, cfg.num_train_timesteps, cfg.time_scale)
        features = timestep_embedding(steps, cfg.freq_dim).to(self.embed.weight.dtype)
        return adaln_condition(features, cond, self.time_embed, self.label_embed, self.pooled_embed)

    @checked
    def forward(
        self, x_t: Video, t: Time, cond: Conditioning | None = None
    ) -> Float[Tensor, "batch frames out_channels height width"]:
        """Predict ``self.prediction`` for ``x_t`` ``(b, f, c, h, w)`` at times ``t`` ``(b,)``."""
        cfg = self.config
        if x_t.shape[2] != cfg.in_channels:
            raise ShapeError(
                f"VideoDiT: x_t has {x_t.shape[2]} channels, expected {cfg.in_channels}"
            )
        frames, grid_h, grid_w = self.patches.grid(x_t.shape[1:])
        validate_conditioning(
            "VideoDiT",
            x_t,
            cond,
            context_dim=cfg.context_dim,
            pooled_dim=cfg.pooled_dim,
            num_classes=cfg.num_classes,
            dtype=self.embed.weight.dtype,
        )
        context = cond.tokens if cond is not None and cfg.context_dim is not None else None
        mask = cond.mask if context is not None and cond is not None else None

        pos = sincos_pos_embed_3d(frames, grid_h, grid_w, cfg.dim).to(x_t.device, x_t.dtype)
        h = self.embed(self.patches.patchify(x_t)) + pos
        c = self.condition_vector(t, cond)
        for block in self.blocks:
            h = block(h, c, frames, context, mask, (frames, grid_h, grid_w))
        shift, scale = self.ada_out(nn.functional.silu(c)).chunk(2, dim=1)
        h = self.proj_out(modulate(self.norm_out(h), shift, scale))
        out_shape = (x_t.shape[1], self._out_channels, *x_t.shape[3:])
        return self.patches.unpatchify(h, out_shape)


DENOISERS.register(VideoDiTConfig, VideoDiT.from_config)
