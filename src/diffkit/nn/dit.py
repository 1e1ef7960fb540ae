"""DiT: a transformer denoiser over spatial patches, conditioned by adaLN-Zero.

The image ``(b, c, h, w)`` is cut into ``p x p`` patches
([`SpatialPatches`][diffkit.patches.SpatialPatches]), each linearly embedded and given a
fixed 2-D sin-cos position. Every block modulates its LayerNorms with a shift and a scale,
and gates its residual branches, all regressed from the conditioning vector ``c`` = time
embedding (+ class-label embedding) (+ pooled-text embedding); the regressions start at
zero so each block starts as the identity (adaLN-Zero, Peebles & Xie 2023). With
``context_dim`` set, each block also cross-attends to ``Conditioning.tokens`` (PixArt-style).
A final adaLN layer maps tokens back to patches.
"""

from typing import Literal

from jaxtyping import Bool, Float
from pydantic import Field, model_validator
from torch import Tensor, nn

from diffkit.config import Config
from diffkit.nn._registry import DENOISERS
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
from diffkit.patches import SpatialPatches, sincos_pos_embed_2d
from diffkit.protocols import Conditioning
from diffkit.typing import Image, Prediction, ShapeError, Time, checked, checked_layer

__all__ = ["DiT", "DiTBlock", "DiTConfig"]


class DiTConfig(Config):
    """Architecture of a [`DiT`][diffkit.nn.dit.DiT]."""

    kind: Literal["dit"] = "dit"
    in_channels: int = Field(default=4, gt=0, description="channels of x_t")
    out_channels: int | None = Field(default=None, gt=0, description="default: in_channels")
    patch_size: int = Field(default=2, gt=0, description="side of the square patches")
    dim: int = Field(default=384, gt=0, description="token width")
    depth: int = Field(default=12, gt=0, le=256, description="number of transformer blocks")
    num_heads: int = Field(default=6, gt=0, description="attention heads")
    mlp_ratio: float = Field(default=4.0, gt=0, description="MLP hidden width / dim")
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
    def _check(self) -> "DiTConfig":
        if self.dim % self.num_heads != 0:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.dim % 4 != 0:
            raise ValueError(f"dim {self.dim} must be a multiple of 4 (2-D sin-cos positions)")
        return self

    @property
    def downsampling_factor(self) -> int:
        """Height and width must be multiples of the patch size."""
        return self.patch_size

    @property
    def is_video(self) -> bool:
        """A DiT takes images."""
        return False


class DiTBlock(nn.Module):
    """adaLN-Zero block: gated self-attention, optional cross-attention, gated MLP."""

    def __init__(
        self, dim: int, heads: int, mlp_ratio: float = 4.0, context_dim: int | None = None
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, qkv_bias=True)
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
            self.cross = Attention(dim, heads, context_dim=context_dim, qkv_bias=True)
        else:
            self.norm_cross = self.cross = None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(dim, mlp_ratio, kind="gelu_tanh")
        self.ada = zero_linear(dim, 6 * dim)

    @checked_layer
    def forward(
        self,
        x: Float[Tensor, "batch tokens dim"],
        c: Float[Tensor, "batch dim"],
        context: Float[Tensor, "batch context context_dim"] | None = None,
        mask: Bool[Tensor, "batch context"] | None = None,
    ) -> Float[Tensor, "batch tokens dim"]:
        """Tokens ``(b, n, dim)`` conditioned on ``c`` ``(b, dim)``; context ``(b, m, d_ctx)``."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(nn.functional.silu(c)).chunk(6, 1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        if self.cross is not None and self.norm_cross is not None:
            x = x + self.cross(self.norm_cross(x), context, mask)
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


def adaln_condition(
    time_features: Tensor,
    cond: Conditioning | None,
    time_embed: nn.Module,
    label_embed: nn.Module | None,
    pooled_embed: nn.Module | None,
) -> Tensor:
    """The adaLN input ``c`` ``(batch, dim)``: time embedding plus label and pooled embeddings."""
    c = time_embed(time_features)
    if cond is not None:
        if label_embed is not None and cond.labels is not None:
            c = c + label_embed(cond.labels)
        if pooled_embed is not None and cond.pooled is not None:
            c = c + pooled_embed(cond.pooled)
    return c


class DiT(nn.Module):
    """Diffusion transformer ``(x_t, t, cond) -> prediction`` on images ``(b, c, h, w)``."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        self.prediction: Prediction = config.prediction
        c = config
        self.patches = SpatialPatches(c.patch_size)
        out_channels = c.out_channels or c.in_channels
        self.embed = nn.Linear(self.patches.patch_dim(c.in_channels), c.dim)
        self.time_embed = TimeEmbedding(c.freq_dim, c.dim)
        self.label_embed = nn.Embedding(c.num_classes, c.dim) if c.num_classes else None
        self.pooled_embed = TimeEmbedding(c.pooled_dim, c.dim) if c.pooled_dim else None
        self.blocks = nn.ModuleList(
            DiTBlock(c.dim, c.num_heads, c.mlp_ratio, c.context_dim) for _ in range(c.depth)
        )
        self.norm_out = nn.LayerNorm(c.dim, elementwise_affine=False, eps=1e-6)
        self.ada_out = zero_linear(c.dim, 2 * c.dim)
        self.proj_out = zero_linear(c.dim, self.patches.patch_dim(out_channels))
        self._out_channels = out_channels

    @classmethod
    def from_config(cls, config: DiTConfig) -> "DiT":
        """Build a freshly initialised DiT (adaLN-Zero: it starts by predicting zeros)."""
        return cls(config)

    def condition_vector(self, t: Tensor, cond: Conditioning | None) -> Tensor:
        """``c`` ``(batch, dim)``: time embedding plus label and pooled embeddings."""
        cfg = self.config
        steps = network_timestep(t, cfg.time_input, cfg.num_train_timesteps, cfg.time_scale)
        features = timestep_embedding(steps, cfg.freq_dim).to(self.embed.weight.dtype)
        return adaln_condition(features, cond, self.time_embed, self.label_embed, self.pooled_embed)

    @checked
    def forward(
        self, x_t: Image, t: Time, cond: Conditioning | None = None
    ) -> Float[Tensor, "batch out_channels height width"]:
        """Predict ``self.prediction`` for ``x_t`` ``(b, c, h, w)`` at times ``t`` ``(b,)``."""
        cfg = self.config
        if x_t.shape[1] != cfg.in_channels:
            raise ShapeError(f"DiT: x_t has {x_t.shape[1]} channels, expected {cfg.in_channels}")
        grid_h, grid_w = self.patches.grid(x_t.shape[1:])
        validate_conditioning(
            "DiT",
            x_t,
            cond,
            context_dim=cfg.context_dim,
            pooled_dim=cfg.pooled_dim,
            num_classes=cfg.num_classes,
            dtype=self.embed.weight.dtype,
        )
        context = cond.tokens if cond is not None and cfg.context_dim is not None else None
        mask = cond.mask if context is not None and cond is not None else None

        pos = sincos_pos_embed_2d(grid_h, grid_w, cfg.dim).to(x_t.device, x_t.dtype)
        h = self.embed(self.patches.patchify(x_t)) + pos
        c = self.condition_vector(t, cond)
        for block in self.blocks:
            h = block(h, c, context, mask)
        shift, scale = self.ada_out(nn.functional.silu(c)).chunk(2, dim=1)
        h = self.proj_out(modulate(self.norm_out(h), shift, scale))
        out_shape = (self._out_channels, *x_t.shape[2:])
        return self.patches.unpatchify(h, out_shape)


DENOISERS.register(DiTConfig, DiT.from_config)
