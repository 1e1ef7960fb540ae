"""The patch-transformer core shared by DiT and VideoDiT (images and videos alike).

Data is cut into patches (spatial patches of an image, tubelets of a video), each linearly
embedded and given a fixed sin-cos position. Tokens are frame-major on a grid
``(frames, height, width)`` (an image is one frame). Every block modulates its LayerNorms
with a shift and a scale, and gates its residual branches, all regressed from the
conditioning vector ``c`` = time embedding (+ class-label embedding) (+ pooled-text
embedding); the regressions start at zero so each block starts as the identity (adaLN-Zero,
Peebles & Xie 2023). A block's self-attention mixes

- ``"full"``: all ``f * s`` tokens at once — cost ``O((f s)^2)`` (DiT: ``f = 1``), or
- ``"factorised"``: within each frame (space), then across frames at each position (time)
  — cost ``O(f s^2 + s f^2)`` for ``f`` frames of ``s`` tokens (as in Latte / TimeSformer),

followed, with ``context_dim`` set, by cross-attention to ``Conditioning.tokens``
(PixArt-style) and an MLP. A final adaLN layer maps tokens back to patches.

Options for the published families (defaults: diffkit's own network): ``modulation="single"``
regresses all blocks' shifts, scales and gates once from ``c`` and adds a learned table per
block (adaLN-single, PixArt-α); ``context_projection`` maps the caption tokens through a
two-layer GELU MLP before the cross-attentions (PixArt); ``learned_sigma`` doubles the output
head for a predicted variance (DiT, PixArt-α); ``size_conditions`` adds embeddings of
``Conditioning.micro`` (PixArt-α's resolution and aspect ratio); ``embeddings_per_block``
gives each block its own time and label embedding (a DiT trained in diffusers);
``freq_shift``, ``norm_eps`` and ``mlp_norm_eps`` are the numerical conventions of the
diffusers implementations.

``joint_attention`` makes the blocks MMDiT blocks (Stable Diffusion 3,
[`JointPatchTransformerBlock`][diffkit.nn.transformer.JointPatchTransformerBlock]): the caption
tokens, linearly embedded to ``dim``, are a second stream with its own adaLN-Zero
modulation, attention projections and MLP, attending jointly with the patch tokens; the
last block only updates the patches. ``qk_norm`` RMS-normalises queries and keys (SD3.5),
``dual_attention_layers`` adds a second, image-only self-attention to those blocks
(SD3.5's MMDiT-X). ``time_shift`` embeds the shifted time of a shifted rectified flow
(SD3 embeds ``1000 sigma``, ``sigma = shift t / (1 + (shift - 1) t)``).
"""

from typing import Generic, Literal, TypeVar, cast

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Bool, Float
from pydantic import Field, model_validator
from torch import Tensor, nn

from diffkit.config import Config
from diffkit.nn.attention import Attention, FeedForward, JointAttention, LocalFeedForward
from diffkit.nn.embeddings import (
    TimeEmbedding,
    add_condition_embeddings,
    network_timestep,
    timestep_embedding,
)
from diffkit.nn.inputs import validate_inputs
from diffkit.patches import SpatialPatches, TubeletPatches
from diffkit.protocols import Conditioning
from diffkit.typing import Prediction, ShapeError, Tokens, checked_layer

__all__ = [
    "JointPatchTransformerBlock",
    "Mixing",
    "Modulation",
    "PatchTransformer",
    "PatchTransformerBlock",
    "PatchTransformerConfig",
    "modulate",
    "self_attend",
    "zero_linear",
]

Mixing = Literal["full", "space", "time"]
"""Which tokens a self-attention mixes: all of them, those of one frame, or those of one
position across frames."""


def zero_linear(dim_in: int, dim_out: int) -> nn.Linear:
    """A ``Linear`` whose weight and bias start at zero (adaLN-Zero gates and output heads)."""
    layer = nn.Linear(dim_in, dim_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation ``x * (1 + scale) + shift``: ``x`` ``(b, n, d)``, shift/scale ``(b, d)``."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def self_attend(attn: Attention, x: Tokens, over: Mixing, frames: int) -> Tokens:
    """Self-attention of frame-major tokens ``(b, frames * s, dim)`` over ``over`` tokens."""
    if over == "full":
        return attn(x)
    if over == "space":
        x = rearrange(x, "b (f s) d -> (b f) s d", f=frames)
        return rearrange(attn(x), "(b f) s d -> b (f s) d", f=frames)
    spatial = x.shape[1] // frames  # s, not b: an empty batch leaves b undetermined
    x = rearrange(x, "b (f s) d -> (b s) f d", f=frames)
    return rearrange(attn(x), "(b s) f d -> b (f s) d", s=spatial)


Modulation = Literal["zero", "single"]
"""adaLN-Zero (each block regresses its own shifts, scales and gates from ``c``) or
adaLN-single (one regression for all blocks, plus a learned table per block; PixArt-α)."""


class PatchTransformerBlock(nn.Module):
    """adaLN-Zero block: gated self-attention, optional cross-attention, gated MLP.

    ``attention="full"`` attends over all tokens (``attn``); ``"factorised"`` attends within
    each frame (``attn``), then across frames (``attn_time``), each its own gated branch.
    ``local_mlp`` swaps the MLP for a [`LocalFeedForward`][diffkit.nn.attention.LocalFeedForward].
    The adaLN regression ``ada`` gives ``(shift, scale, gate)`` for the first self-attention,
    the MLP, then the time attention (the order of the saved weights). With
    ``modulation="single"`` the block has no regression: it adds its table ``ada_table`` to
    the shared one it is given. ``cross_norm=False`` drops the LayerNorm before the
    cross-attention (PixArt). With ``embeddings`` the block has its own ``time_embed`` and
    ``label_embed`` (diffusers' DiT layout), from which its network computes its ``c``.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        attention: Literal["factorised", "full"] = "full",
        mlp_ratio: float = 4.0,
        context_dim: int | None = None,
        local_mlp: bool = False,
        modulation: Modulation = "zero",
        cross_norm: bool = True,
        norm_eps: float = 1e-6,
        mlp_norm_eps: float = 1e-6,
        embeddings: tuple[int, int | None] | None = None,
    ) -> None:
        super().__init__()
        # embeddings=(freq_dim, num_classes): this block's own time (and label) embedding
        self.time_embed = TimeEmbedding(embeddings[0], dim) if embeddings else None
        self.label_embed = (
            nn.Embedding(embeddings[1], dim) if embeddings and embeddings[1] else None
        )
        self.mixing: Mixing = "space" if attention == "factorised" else "full"
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
        self.attn = Attention(dim, heads, qkv_bias=True)
        if attention == "factorised":
            self.norm_time = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
            self.attn_time = Attention(dim, heads, qkv_bias=True)
        else:
            self.norm_time = self.attn_time = None
        self.norm_cross = self.cross = None
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(dim, eps=1e-6) if cross_norm else None
            self.cross = Attention(dim, heads, context_dim=context_dim, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp: FeedForward | LocalFeedForward = (
            LocalFeedForward(dim, mlp_ratio)
            if local_mlp
            else FeedForward(dim, mlp_ratio, kind="gelu_tanh")
        )
        self.branches = 3 if self.attn_time is not None else 2
        if modulation == "zero":
            self.ada: nn.Linear | None = zero_linear(dim, 3 * self.branches * dim)
            self.ada_table = None
        else:
            self.ada = None
            self.ada_table = nn.Parameter(torch.zeros(3 * self.branches, dim))

    def modulations(self, c: Tensor) -> tuple[Tensor, ...]:
        """The ``3 * branches`` shifts, scales and gates ``(b, dim)``: regressed from ``c``
        ``(b, dim)``, or (adaLN-single) the shared regression ``c`` ``(b, 3 * branches * dim)``
        plus this block's table."""
        if self.ada is not None:
            return self.ada(F.silu(c)).chunk(3 * self.branches, dim=1)
        if self.ada_table is None:  # pragma: no cover - one of the two is built
            raise RuntimeError("PatchTransformerBlock: no modulation")
        return (self.ada_table + c.unflatten(1, (3 * self.branches, -1))).unbind(1)

    @checked_layer
    def forward(
        self,
        x: Float[Tensor, "batch tokens dim"],
        c: Float[Tensor, "batch cond"],
        grid: tuple[int, int, int],
        context: Float[Tensor, "batch context context_dim"] | None = None,
        mask: Bool[Tensor, "batch context"] | None = None,
    ) -> Float[Tensor, "batch tokens dim"]:
        """Frame-major tokens ``(b, f * h * w, dim)`` on the grid ``(f, h, w)``, conditioned
        on ``c`` (see ``modulations``); context ``(b, m, context_dim)``, keep-mask ``(b, m)``."""
        frames = grid[0]
        mods = self.modulations(c)
        shift, scale, gate = mods[0:3]
        h = modulate(self.norm1(x), shift, scale)
        x = x + gate.unsqueeze(1) * self_attend(self.attn, h, self.mixing, frames)
        if self.attn_time is not None and self.norm_time is not None:
            shift, scale, gate = mods[6:9]
            h = modulate(self.norm_time(x), shift, scale)
            x = x + gate.unsqueeze(1) * self_attend(self.attn_time, h, "time", frames)
        if self.cross is not None:
            h = self.norm_cross(x) if self.norm_cross is not None else x
            x = x + self.cross(h, context, mask)
        shift, scale, gate = mods[3:6]
        h = modulate(self.norm2(x), shift, scale)
        h = self.mlp(h, grid) if isinstance(self.mlp, LocalFeedForward) else self.mlp(h)
        return x + gate.unsqueeze(1) * h


class JointPatchTransformerBlock(nn.Module):
    """MMDiT block (SD3): patch tokens ``x`` and context tokens attend jointly, each stream
    with its own adaLN-Zero modulation (``ada``, ``ada_context``), projections and MLP.

    ``ada`` gives ``(shift, scale, gate)`` for the attention and the MLP (and, with
    ``dual``, for a second image-only self-attention ``attn2`` on the same normalised
    input). With ``context_last`` (the last block) the context is only read: ``ada_context``
    gives ``(shift, scale)`` of its norm and the block returns no context.
    """

    def __init__(
        self, dim: int, heads: int, *, context_last: bool, qk_norm: bool, dual: bool
    ) -> None:
        super().__init__()
        self.context_last = context_last
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm1_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = JointAttention(dim, heads, qk_norm=qk_norm, context_out=not context_last)
        self.attn2 = Attention(dim, heads, qkv_bias=True, qk_norm=qk_norm) if dual else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(dim, 4.0, kind="gelu_tanh")
        self.ada = zero_linear(dim, (9 if dual else 6) * dim)
        self.ada_context = zero_linear(dim, (2 if context_last else 6) * dim)
        if context_last:
            self.norm2_context = self.mlp_context = None
        else:
            self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp_context = FeedForward(dim, 4.0, kind="gelu_tanh")

    @checked_layer
    def forward(
        self,
        x: Float[Tensor, "batch tokens dim"],
        context: Float[Tensor, "batch context dim"],
        c: Float[Tensor, "batch dim"],
        mask: Bool[Tensor, "batch context"] | None = None,
    ) -> tuple[Float[Tensor, "batch tokens dim"], Float[Tensor, "batch context dim"] | None]:
        """Patch tokens ``(b, n, dim)`` and context ``(b, m, dim)`` conditioned on ``c``."""
        mods = self.ada(F.silu(c)).chunk(9 if self.attn2 is not None else 6, dim=1)
        cmods = self.ada_context(F.silu(c)).chunk(2 if self.context_last else 6, dim=1)
        normed = self.norm1(x)
        attended, context_attended = self.attn(
            modulate(normed, mods[0], mods[1]),
            modulate(self.norm1_context(context), cmods[0], cmods[1]),
            mask,
        )
        x = x + mods[2].unsqueeze(1) * attended
        if self.attn2 is not None:
            x = x + mods[8].unsqueeze(1) * self.attn2(modulate(normed, mods[6], mods[7]))
        x = x + mods[5].unsqueeze(1) * self.mlp(modulate(self.norm2(x), mods[3], mods[4]))
        if context_attended is None or self.norm2_context is None or self.mlp_context is None:
            return x, None
        context = context + cmods[2].unsqueeze(1) * context_attended
        h = self.mlp_context(modulate(self.norm2_context(context), cmods[3], cmods[4]))
        return x, context + cmods[5].unsqueeze(1) * h


class PatchTransformerConfig(Config):
    """The fields every patch transformer has ([`DiTConfig`][diffkit.nn.dit.DiTConfig],
    [`VideoDiTConfig`][diffkit.nn.video.VideoDiTConfig] add their patches and attention)."""

    in_channels: int = Field(default=4, gt=0, description="channels of x_t (of each frame)")
    out_channels: int | None = Field(default=None, gt=0, description="default: in_channels")
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
    freq_shift: float = Field(
        default=0.0,
        ge=0,
        description="time sinusoid frequencies max_period^(-k / (freq_dim/2 - freq_shift)) "
        "(diffusers' downscale_freq_shift; its DiT uses 1)",
    )
    learned_sigma: bool = Field(
        default=False,
        description="the output head also predicts out_channels variance channels (DiT, "
        "PixArt-α); forward returns the prediction, predict_all both",
    )
    modulation: Modulation = Field(
        default="zero",
        description="'zero': each block regresses its shifts, scales and gates from the "
        "conditioning (adaLN-Zero); 'single': one shared regression plus a learned table per "
        "block and for the output (adaLN-single, PixArt-α)",
    )
    context_projection: bool = Field(
        default=False,
        description="map Conditioning.tokens (context_dim) to dim by a two-layer GELU MLP "
        "before the cross-attentions (PixArt's caption projection)",
    )
    cross_norm: bool = Field(
        default=True, description="a LayerNorm before each cross-attention (PixArt: none)"
    )
    embeddings_per_block: bool = Field(
        default=False,
        description="every block but the first has its own time and label embeddings (a DiT "
        "trained in diffusers, whose blocks each hold a copy); the first block and the output "
        "read the network's",
    )
    size_conditions: bool = Field(
        default=False,
        description="add embeddings of Conditioning.micro = (height, width, aspect ratio) to "
        "the conditioning (PixArt-α's micro-conditions; dim a multiple of 3)",
    )
    norm_eps: float = Field(
        default=1e-6, gt=0, description="epsilon of the LayerNorms before the self-attentions"
    )
    mlp_norm_eps: float = Field(
        default=1e-6, gt=0, description="epsilon of the LayerNorm before each MLP"
    )
    joint_attention: bool = Field(
        default=False,
        description="MMDiT blocks (SD3): Conditioning.tokens, embedded linearly to dim, are a "
        "second stream attending jointly with the patches, with its own modulation, "
        "projections and MLP (needs context_dim; replaces cross-attention)",
    )
    qk_norm: bool = Field(
        default=False, description="RMS-normalise attention queries and keys (SD3.5; joint only)"
    )
    dual_attention_layers: tuple[int, ...] = Field(
        default=(),
        description="blocks with a second, image-only self-attention (SD3.5's MMDiT-X; joint only)",
    )
    time_shift: float = Field(
        default=1.0,
        gt=0,
        le=1e6,
        description="embed time_scale * shift t / (1 + (shift - 1) t): the sigma of "
        "RectifiedFlow(shift), what SD3 embeds; 1: no shift",
    )

    @model_validator(mode="after")
    def _check_heads(self) -> "PatchTransformerConfig":
        if self.dim % self.num_heads != 0:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.embeddings_per_block and (
            self.modulation != "zero" or self.pooled_dim or self.size_conditions
        ):
            raise ValueError(
                "embeddings_per_block needs modulation='zero' and conditioning by time and "
                "labels only (no pooled_dim, no size_conditions)"
            )
        if self.size_conditions and self.dim % 3 != 0:
            raise ValueError(f"size_conditions: dim {self.dim} is not a multiple of 3")
        if self.joint_attention:
            self._check_joint()
        elif self.qk_norm or self.dual_attention_layers:
            raise ValueError("qk_norm and dual_attention_layers need joint_attention")
        return self

    def _check_joint(self) -> None:
        problems = [
            name
            for name, bad in (
                ("context_dim", self.context_dim is None),
                ("modulation", self.modulation != "zero"),
                ("context_projection", self.context_projection),
                ("embeddings_per_block", self.embeddings_per_block),
                ("size_conditions", self.size_conditions),
                ("learned_sigma", self.learned_sigma),
                ("mlp_ratio", self.mlp_ratio != 4.0),
            )
            if bad
        ]
        if problems:
            raise ValueError(
                f"joint_attention needs context_dim, modulation='zero', mlp_ratio 4 and none of "
                f"context_projection, embeddings_per_block, size_conditions, learned_sigma; "
                f"got {', '.join(problems)}"
            )
        if any(not 0 <= i < self.depth for i in self.dual_attention_layers):
            raise ValueError(
                f"dual_attention_layers {self.dual_attention_layers} must be block indices "
                f"below depth {self.depth}"
            )


ConfigT = TypeVar("ConfigT", bound=PatchTransformerConfig)


class PatchTransformer(nn.Module, Generic[ConfigT]):
    """Patch embedding, conditioning vector, adaLN-Zero blocks and output head of a patch
    transformer; a subclass cuts its data into ``patches`` and gives their positions."""

    def __init__(
        self,
        config: ConfigT,
        patches: SpatialPatches | TubeletPatches,
        *,
        attention: Literal["factorised", "full"] = "full",
        local_mlp: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.prediction: Prediction = config.prediction
        c = config
        self.patches = patches
        self._out_channels = c.out_channels or c.in_channels
        self._head_channels = self._out_channels * (2 if c.learned_sigma else 1)
        self.embed = nn.Linear(patches.patch_dim(c.in_channels), c.dim)
        self.time_embed = TimeEmbedding(c.freq_dim, c.dim)
        self.label_embed = nn.Embedding(c.num_classes, c.dim) if c.num_classes else None
        self.pooled_embed = TimeEmbedding(c.pooled_dim, c.dim) if c.pooled_dim else None
        # PixArt-α: height and width each get dim/3 features, the aspect ratio the last third
        self.resolution_embed = TimeEmbedding(c.freq_dim, c.dim // 3) if c.size_conditions else None
        self.aspect_embed = TimeEmbedding(c.freq_dim, c.dim // 3) if c.size_conditions else None
        self.context_embed: TimeEmbedding | nn.Linear | None = (
            TimeEmbedding(c.context_dim, c.dim, activation="gelu_tanh")
            if c.context_projection and c.context_dim
            else None
        )
        if c.joint_attention and c.context_dim:
            self.context_embed = nn.Linear(c.context_dim, c.dim)
            self.blocks = nn.ModuleList(
                JointPatchTransformerBlock(
                    c.dim,
                    c.num_heads,
                    context_last=i == c.depth - 1,
                    qk_norm=c.qk_norm,
                    dual=i in c.dual_attention_layers,
                )
                for i in range(c.depth)
            )
        else:
            self.blocks = self._blocks(attention, local_mlp)
        branches = 3 if attention == "factorised" else 2
        # adaLN-single: the shared regression, and the output's table in place of ada_out
        self.ada = zero_linear(c.dim, 3 * branches * c.dim) if c.modulation == "single" else None
        self.norm_out = nn.LayerNorm(c.dim, elementwise_affine=False, eps=1e-6)
        if c.modulation == "zero":
            self.ada_out: nn.Linear | None = zero_linear(c.dim, 2 * c.dim)
            self.ada_out_table = None
        else:
            self.ada_out = None
            self.ada_out_table = nn.Parameter(torch.zeros(2, c.dim))
        self.proj_out = zero_linear(c.dim, patches.patch_dim(self._head_channels))

    def _blocks(self, attention: Literal["factorised", "full"], local_mlp: bool) -> nn.ModuleList:
        """The adaLN blocks (everything but MMDiT)."""
        c = self.config
        return nn.ModuleList(
            PatchTransformerBlock(
                c.dim,
                c.num_heads,
                attention=attention,
                mlp_ratio=c.mlp_ratio,
                context_dim=c.dim if self.context_embed is not None else c.context_dim,
                local_mlp=local_mlp,
                modulation=c.modulation,
                cross_norm=c.cross_norm,
                norm_eps=c.norm_eps,
                mlp_norm_eps=c.mlp_norm_eps,
                embeddings=(c.freq_dim, c.num_classes) if c.embeddings_per_block and i else None,
            )
            for i in range(c.depth)
        )

    def time_features(self, t: Tensor) -> Float[Tensor, "batch freq_dim"]:
        """The sinusoidal features of the times ``t`` ``(batch,)``, before any embedding MLP."""
        cfg = self.config
        if cfg.time_shift != 1.0:  # in float64: SD3's timesteps are 1000 sigma rounded once
            t = cfg.time_shift * t.double() / (1 + (cfg.time_shift - 1) * t.double())
        steps = network_timestep(t, cfg.time_input, cfg.num_train_timesteps, cfg.time_scale)
        features = timestep_embedding(steps, cfg.freq_dim, freq_shift=cfg.freq_shift)
        return features.to(self.embed.weight.dtype)

    def condition_vector(self, t: Tensor, cond: Conditioning | None) -> Tensor:
        """``c`` ``(batch, dim)``: time embedding plus label and pooled embeddings."""
        cfg = self.config
        dtype = self.embed.weight.dtype
        c = self.time_embed(self.time_features(t))
        if self.resolution_embed is not None and self.aspect_embed is not None:
            micro = cond.micro if cond is not None else None
            if micro is None:  # _check_inputs refused it already
                raise ValueError(f"{type(self).__name__}: size_conditions needs Conditioning.micro")
            sizes = timestep_embedding(micro[:, :2].reshape(-1), cfg.freq_dim).to(dtype)
            ratio = timestep_embedding(micro[:, 2], cfg.freq_dim).to(dtype)
            sizes = rearrange(self.resolution_embed(sizes), "(b n) d -> b (n d)", n=2)
            c = c + torch.cat([sizes, self.aspect_embed(ratio)], dim=1)
        return add_condition_embeddings(c, cond, self.label_embed, self.pooled_embed)

    def _check_inputs(
        self, x_t: Tensor, t: Tensor, cond: Conditioning | None, *, channels: int
    ) -> None:
        """Refuse, before any compute, inputs this network was not built for."""
        cfg = self.config
        owner = type(self).__name__
        if channels != cfg.in_channels:
            raise ShapeError(f"{owner}: x_t has {channels} channels, expected {cfg.in_channels}")
        validate_inputs(owner, x_t, t, cond, cfg, self.embed.weight.dtype)
        if cfg.size_conditions:
            micro = cond.micro if cond is not None else None
            if micro is None or micro.shape[1] != 3:
                raise ShapeError(
                    f"{owner}: size_conditions needs Conditioning.micro = (height, width, "
                    f"aspect ratio) per item, got {None if micro is None else tuple(micro.shape)}"
                )

    def _transform(
        self,
        x_t: Tensor,
        t: Tensor,
        cond: Conditioning | None,
        positions: Float[Tensor, "tokens dim"],
        grid: tuple[int, int, int],
    ) -> Float[Tensor, "batch tokens patch_dim"]:
        """Patches of ``x_t`` on the token ``grid`` to output patches (before unpatchify):
        ``patch_dim(out_channels)`` features, twice that with ``learned_sigma``."""
        context = cond.tokens if cond is not None and self.config.context_dim is not None else None
        mask = cond.mask if context is not None and cond is not None else None
        if context is not None and self.context_embed is not None:
            context = self.context_embed(context)
        h = self.embed(self.patches.patchify(x_t)) + positions.to(x_t.device, x_t.dtype)
        c = self.condition_vector(t, cond)
        shared = self.ada(F.silu(c)) if self.ada is not None else c
        features = self.time_features(t) if self.config.embeddings_per_block else None
        if self.config.joint_attention and context is not None:
            for block in cast(list[JointPatchTransformerBlock], self.blocks):
                h, next_context = block(h, context, c, mask)
                context = next_context if next_context is not None else context
            return self._head(h, c)
        for block in cast(list[PatchTransformerBlock], self.blocks):
            block_c = shared
            if block.time_embed is not None and features is not None:
                block_c = block.time_embed(features)
                block_c = add_condition_embeddings(block_c, cond, block.label_embed, None)
            h = block(h, block_c, grid, context, mask)
        return self._head(h, c)

    def _head(self, h: Tensor, c: Tensor) -> Tensor:
        """The final modulated norm and the output projection of the tokens ``h``."""
        if self.ada_out is not None:
            shift, scale = self.ada_out(F.silu(c)).chunk(2, dim=1)
        elif self.ada_out_table is not None:
            shift, scale = (self.ada_out_table + c.unsqueeze(1)).unbind(1)
        else:  # pragma: no cover - one of the two is built
            raise RuntimeError("PatchTransformer: no output modulation")
        return self.proj_out(modulate(self.norm_out(h), shift, scale))
