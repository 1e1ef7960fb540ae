"""Attention layers and the transformer pieces built on them.

Token layers take ``(batch, tokens, dim)``; the pixel layers (the U-Net's
[`SpatialSelfAttention`][diffkit.nn.attention.SpatialSelfAttention] and
[`SpatialTransformer`][diffkit.nn.attention.SpatialTransformer]) take feature maps
``(batch, channels, height, width)`` and attend over their pixels;
[`TemporalTransformer`][diffkit.nn.attention.TemporalTransformer] takes the frames of
videos stacked on the batch and attends over each pixel's frames. Attention runs on
``torch.nn.functional.scaled_dot_product_attention``; layout changes use einops.
"""

from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Bool, Float
from torch import Tensor, nn

from diffkit.nn.embeddings import apply_rotary, rotary_angles, timestep_embedding
from diffkit.nn.resblocks import group_norm
from diffkit.typing import Image, ShapeError, Tokens, checked_layer

__all__ = [
    "Attention",
    "FeedForward",
    "FeedForwardKind",
    "JointAttention",
    "LocalFeedForward",
    "SpatialSelfAttention",
    "SpatialTransformer",
    "TemporalTransformer",
    "TransformerBlock",
    "attention_bias",
]

Context = Float[Tensor, "batch context context_dim"]
ContextMask = Bool[Tensor, "batch context"]
GroupContext = Float[Tensor, "groups context context_dim"]
"""A context whose items each serve a group of consecutive token sequences."""
GroupContextMask = Bool[Tensor, "groups context"]


def attention_bias(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Additive attention bias ``(batch, 1, 1, keys)`` from a keep-mask ``(batch, keys)``.

    Masked keys get a large negative finite bias (not ``-inf``), so an item whose keys are all
    masked attends uniformly instead of producing NaNs.
    """
    if mask is None:
        return None
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    bias = bias.masked_fill(~mask, torch.finfo(dtype).min / 2)
    return rearrange(bias, "b n -> b 1 1 n")


class Attention(nn.Module):
    """Multi-head attention over tokens: self-attention, or cross-attention to a context.

    Self-attention uses one fused ``qkv`` projection; cross-attention projects ``q`` from the
    tokens and a fused ``kv`` from the context (``context_dim``). ``scale`` multiplies the
    scores (default ``head_dim ** -0.5``); ``forward``'s ``bias`` is added to them (T5's
    relative positions and padding). ``qk_norm``: RMS-normalise each head's queries and
    keys (SD3.5); with ``qk_norm_across_heads`` the norm spans all heads' features at once,
    before they are split (Wan 2.1). ``forward``'s ``rotary`` angles rotate the queries and
    keys of a self-attention ([`apply_rotary`][diffkit.nn.embeddings.apply_rotary]).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int | None = None,
        *,
        context_dim: int | None = None,
        qkv_bias: bool = False,
        out_bias: bool = True,
        scale: float | None = None,
        qk_norm: bool = False,
        qk_norm_across_heads: bool = False,
    ) -> None:
        super().__init__()
        head_dim = head_dim or dim // heads
        inner = heads * head_dim
        self.heads = heads
        self.scale = scale  # None: head_dim ** -0.5; T5 uses 1 (its weights absorb it)
        self.norm_across = qk_norm_across_heads
        norm_dim = inner if qk_norm_across_heads else head_dim
        self.q_norm = nn.RMSNorm(norm_dim, eps=1e-6) if qk_norm else None
        self.k_norm = nn.RMSNorm(norm_dim, eps=1e-6) if qk_norm else None
        self.is_cross = context_dim is not None
        if context_dim is None:
            self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        else:
            self.q = nn.Linear(dim, inner, bias=qkv_bias)
            self.kv = nn.Linear(context_dim, 2 * inner, bias=qkv_bias)
        self.out = nn.Linear(inner, dim, bias=out_bias)

    @checked_layer
    def forward(
        self,
        x: Tokens,
        context: Context | None = None,
        mask: ContextMask | None = None,
        bias: Float[Tensor, "#batch #heads #tokens keys"] | None = None,
        rotary: Float[Tensor, "tokens half"] | None = None,
    ) -> Tokens:
        """Tokens ``(b, n, dim)``; context ``(b, m, context_dim)``, keep-mask ``(b, m)``;
        ``bias``: added to the scores, broadcast to ``(b, heads, n, keys)``; ``rotary``:
        angles ``(n, head_dim / 2)`` of the tokens (self-attention only)."""
        if self.is_cross:
            if context is None:
                raise ValueError("Attention: cross-attention needs a context (Conditioning.tokens)")
            q = self.q(x)
            k, v = self.kv(context).chunk(2, dim=-1)
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.norm_across and self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (rearrange(a, "b n (h d) -> b h n d", h=self.heads) for a in (q, k, v))
        if not self.norm_across and self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            if self.is_cross:
                raise ValueError("Attention: rotary positions are for self-attention")
            q, k = apply_rotary(q, rotary), apply_rotary(k, rotary)
        masked = attention_bias(mask, q.dtype) if self.is_cross else None
        if masked is not None:
            bias = masked if bias is None else bias + masked
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.out(rearrange(out, "b h n d -> b n (h d)"))


class JointAttention(nn.Module):
    """Joint attention of two token streams (MMDiT, SD3): each has its own ``qkv`` projection
    (and RMS norms of queries and keys with ``qk_norm``); all tokens attend to all, and each
    stream's outputs go through its own ``out`` projection. ``context_out=False`` (SD3's last
    block) drops the context's output: only the first stream is returned updated.
    """

    def __init__(
        self, dim: int, heads: int, *, qk_norm: bool = False, context_out: bool = True
    ) -> None:
        super().__init__()
        head_dim = dim // heads
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.qkv_context = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.out_context = nn.Linear(dim, dim) if context_out else None
        norms = 4 if qk_norm else 0  # q, k of the tokens; q, k of the context
        self.norms = nn.ModuleList(nn.RMSNorm(head_dim, eps=1e-6) for _ in range(norms))

    def _heads(self, x: Tensor, qkv: nn.Linear, norms: list[nn.Module]) -> list[Tensor]:
        q, k, v = (rearrange(a, "b n (h d) -> b h n d", h=self.heads) for a in qkv(x).chunk(3, -1))
        if norms:
            q, k = norms[0](q), norms[1](k)
        return [q, k, v]

    @checked_layer
    def forward(
        self,
        x: Tokens,
        context: Float[Tensor, "batch context dim"],
        mask: ContextMask | None = None,
    ) -> tuple[Tokens, Float[Tensor, "batch context dim"] | None]:
        """Tokens ``(b, n, dim)`` and context ``(b, m, dim)`` (keep-mask ``(b, m)``) to the
        attention outputs of both (the context's ``None`` without ``out_context``)."""
        norms = list(self.norms)
        mine = self._heads(x, self.qkv, norms[:2])
        theirs = self._heads(context, self.qkv_context, norms[2:])
        q, k, v = (torch.cat([a, b], dim=2) for a, b in zip(mine, theirs, strict=True))
        bias = None
        if mask is not None:
            keep = torch.ones(x.shape[:2], dtype=torch.bool, device=mask.device)
            bias = attention_bias(torch.cat([keep, mask], dim=1), q.dtype)
        out = rearrange(
            F.scaled_dot_product_attention(q, k, v, attn_mask=bias), "b h n d -> b n (h d)"
        )
        n = x.shape[1]
        context_out = self.out_context(out[:, n:]) if self.out_context is not None else None
        return self.out(out[:, :n]), context_out


class _OverPixels(nn.Module):
    """A residual block over the pixels of a feature map as tokens:
    ``(x + mix(norm(x))) / output_scale``; subclasses define ``norm`` and ``_mix``."""

    norm: nn.GroupNorm
    output_scale: float = 1.0

    @checked_layer
    def forward(
        self, x: Image, context: Context | None = None, mask: ContextMask | None = None
    ) -> Image:
        """``(b, c, h, w) -> (b, c, h, w)``, the pixels mixed as ``_mix`` says."""
        height = x.shape[2]
        h = self._mix(rearrange(self.norm(x), "b c y x -> b (y x) c"), context, mask)
        out = x + rearrange(h, "b (y x) c -> b c y x", y=height)
        return out if self.output_scale == 1.0 else out / self.output_scale

    def _mix(self, h: Tensor, context: Context | None, mask: ContextMask | None) -> Tensor:
        """Normalised pixels ``(b, h * w, c)`` to the residual, ``(b, h * w, c)``."""
        raise NotImplementedError


class SpatialSelfAttention(_OverPixels):
    """Self-attention over the pixels of a feature map, with GroupNorm and a residual.

    ``(x + attn(norm(x))) / output_scale``; heads of ``head_dim`` channels (DDPM's attention
    block, diffusers' ``AttnDownBlock2D`` / mid-block attention).
    """

    def __init__(
        self,
        channels: int,
        head_dim: int,
        *,
        groups: int = 32,
        eps: float = 1e-5,
        output_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if channels % head_dim != 0:
            raise ValueError(
                f"SpatialSelfAttention: {channels} channels not divisible by head_dim {head_dim}"
            )
        self.heads = channels // head_dim
        self.output_scale = output_scale
        self.norm = group_norm(channels, groups, eps, "SpatialSelfAttention")
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)

    def _mix(self, h: Tensor, context: Context | None, mask: ContextMask | None) -> Tensor:
        """Self-attention over the pixels; ``context`` and ``mask`` are ignored."""
        q, k, v = (
            rearrange(a, "b n (h d) -> b h n d", h=self.heads) for a in self.qkv(h).chunk(3, dim=-1)
        )
        h = F.scaled_dot_product_attention(q, k, v)
        return self.out(rearrange(h, "b h n d -> b n (h d)"))


FeedForwardKind = Literal["geglu", "geglu_tanh", "reglu", "gelu", "gelu_tanh", "relu"]
"""An MLP's activation; the gated kinds (GEGLU with exact or tanh GELU, ReGLU) multiply by a
linear half."""

_ACTIVATIONS = {
    "gelu": lambda h: F.gelu(h),
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "relu": F.relu,
}
_GATED = {"geglu": "gelu", "geglu_tanh": "gelu_tanh", "reglu": "relu"}


class FeedForward(nn.Module):
    """Transformer MLP ``proj_out(act(proj_in(x)))``, or gated: ``proj_out(a * act(g))`` with
    ``[a, g] = proj_in(x)`` (GEGLU; T5 v1.1's gated-GELU is ``geglu_tanh``).

    ``inner`` (default ``int(dim * mult)``) is the hidden width; ``bias=False`` drops the
    biases (T5).
    """

    def __init__(
        self,
        dim: int,
        mult: float = 4.0,
        kind: FeedForwardKind = "geglu",
        *,
        inner: int | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        inner = inner or int(dim * mult)
        self.kind = kind
        gated = kind in _GATED
        self.proj_in = nn.Linear(dim, inner * 2 if gated else inner, bias=bias)
        self.proj_out = nn.Linear(inner, dim, bias=bias)

    @checked_layer
    def forward(self, x: Tokens) -> Tokens:
        """``(b, n, dim) -> (b, n, dim)``."""
        h = self.proj_in(x)
        if self.kind in _GATED:
            a, gate = h.chunk(2, dim=-1)
            h = a * _ACTIVATIONS[_GATED[self.kind]](gate)
        else:
            h = _ACTIVATIONS[self.kind](h)
        return self.proj_out(h)


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
        return self.proj_out(F.gelu(hidden, approximate="tanh"))


class TransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to the context (optional), GEGLU MLP.

    With ``double_self_attention`` the second attention is a second self-attention
    (diffusers' ``double_self_attention``, ModelScope's temporal blocks) instead.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        *,
        double_self_attention: bool = False,
    ) -> None:
        super().__init__()
        self.double_self_attention = double_self_attention
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        if double_self_attention:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = Attention(dim, heads, head_dim)  # ignores the context
        elif context_dim is not None:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim)
        else:
            self.norm2 = self.attn2 = None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    @checked_layer
    def forward(
        self,
        x: Tokens,
        context: GroupContext | None = None,
        mask: GroupContextMask | None = None,
        rotary: Float[Tensor, "tokens half"] | None = None,
        groups: int = 1,
    ) -> Tokens:
        """``(b, n, dim) -> (b, n, dim)``, attending to ``context`` ``(b / groups, m,
        context_dim)``: each context item serves ``groups`` consecutive sequences of ``x``
        (a temporal attention's pixels of one clip), which read it as one sequence of
        ``groups * n`` queries. ``rotary`` angles rotate the self-attention(s)' queries and keys.
        """
        x = x + self.attn1(self.norm1(x), rotary=rotary)
        if self.attn2 is not None and self.norm2 is not None:
            if self.double_self_attention:
                x = x + self.attn2(self.norm2(x), rotary=rotary)
            else:
                x = x + _grouped_cross(self.attn2, self.norm2(x), context, mask, groups)
        return x + self.ff(self.norm3(x))


def _grouped_cross(
    attention: nn.Module, h: Tensor, context: Tensor | None, mask: Tensor | None, groups: int
) -> Tensor:
    """A cross-attention of ``groups`` consecutive sequences at a time to their shared
    context item: each query attends alone, so this equals repeating the context ``groups``
    times (tested), without projecting each copy to keys and values."""
    if groups == 1 or context is None:  # (no context: the attention says what is wrong)
        return attention(h, context, mask)
    if h.shape[0] != groups * context.shape[0]:
        raise ShapeError(
            f"TransformerBlock: {h.shape[0]} token sequences are not {groups} per context "
            f"item for {context.shape[0]} context items"
        )
    folded = rearrange(h, "(b g) n d -> b (g n) d", g=groups)
    return rearrange(attention(folded, context, mask), "b (g n) d -> (b g) n d", g=groups)


class SpatialTransformer(_OverPixels):
    """Transformer blocks over the pixels of a feature map (latent-diffusion cross-attention).

    ``x + proj_out(blocks(proj_in(norm(x))))``; ``proj_in`` / ``proj_out`` are 1x1
    convolutions, or linear layers with ``linear_projection``.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        head_dim: int,
        *,
        context_dim: int | None,
        depth: int = 1,
        groups: int = 32,
        linear_projection: bool = False,
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        self.linear_projection = linear_projection
        self.norm = group_norm(channels, groups, 1e-6, "SpatialTransformer")
        if linear_projection:
            self.proj_in: nn.Linear | nn.Conv2d = nn.Linear(channels, inner)
            self.proj_out: nn.Linear | nn.Conv2d = nn.Linear(inner, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1)
            self.proj_out = nn.Conv2d(inner, channels, 1)
        self.blocks = nn.ModuleList(
            TransformerBlock(inner, heads, head_dim, context_dim) for _ in range(depth)
        )

    def _mix(self, h: Tensor, context: Context | None, mask: ContextMask | None) -> Tensor:
        """The transformer blocks, attending to ``context`` ``(b, m, context_dim)``."""
        # A 1x1 convolution is a linear map over channels: with channels-last activations
        # both projection kinds are one matrix product on a free (b, pixels, c) view.
        h = F.linear(h, self.proj_in.weight.flatten(1), self.proj_in.bias)
        for block in self.blocks:
            h = block(h, context, mask)
        return F.linear(h, self.proj_out.weight.flatten(1), self.proj_out.bias)


class TemporalTransformer(nn.Module):
    """Transformer blocks over the frames at each pixel of a clip (temporal attention).

    ``x + proj_out(blocks(proj_in(norm(x))))`` with the frames of each pixel as the tokens,
    the GroupNorm's statistics taken over the whole clip, and each block two
    self-attentions and a GEGLU MLP (ModelScope's / diffusers' ``TransformerTemporalModel``;
    VDM's temporal attention); with ``context_dim`` the second attention is a
    cross-attention to the text instead (LVDM's option). ``positions`` says what the
    frames know of their order:
    ``"none"``: nothing (the temporal convolutions give order, as in ModelScope);
    ``"rotary"``: each self-attention rotates queries and keys by the frame index
    (relative positions, as VDM's temporal attention has), which holds for clips longer
    than trained; ``"sinusoidal"``: the frame index's sinusoidal embedding is added to the
    tokens (absolute positions, as AnimateDiff's motion modules), so each frame knows
    where in the clip it is.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        head_dim: int,
        *,
        depth: int = 1,
        groups: int = 32,
        positions: Literal["none", "rotary", "sinusoidal"] = "none",
        context_dim: int | None = None,
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        self.positions = positions
        self.head_dim = head_dim
        self.norm = group_norm(channels, groups, 1e-6, "TemporalTransformer")
        self.proj_in = nn.Linear(channels, inner)
        cross = context_dim is not None  # self-attention, then cross-attention to the text
        self.blocks = nn.ModuleList(
            TransformerBlock(inner, heads, head_dim, context_dim, double_self_attention=not cross)
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels)

    @checked_layer
    def forward(
        self,
        x: Image,
        frames: int,
        context: Context | None = None,
        mask: ContextMask | None = None,
    ) -> Image:
        """``(b * frames, c, h, w) -> (b * frames, c, h, w)``, frames of a clip consecutive;
        ``context`` ``(b * frames, m, context_dim)`` (one per frame, as the spatial layers
        get it) is what blocks with cross-attention attend to."""
        height, pixels = x.shape[2], x.shape[2] * x.shape[3]
        h = self.norm(rearrange(x, "(b f) c y x -> b c f (y x)", f=frames))
        h = self.proj_in(rearrange(h, "b c f n -> (b n) f c"))
        if context is not None:  # each clip's text, read by all its pixels' frames at once
            context = context[::frames]
            mask = mask[::frames] if mask is not None else None
        if self.positions == "sinusoidal":
            index = torch.arange(frames, device=h.device)
            h = h + timestep_embedding(index, h.shape[-1]).to(h.dtype)
        angles = rotary_angles(frames, self.head_dim) if self.positions == "rotary" else None
        for block in self.blocks:
            h = block(h, context, mask, rotary=angles, groups=pixels)
        h = rearrange(
            self.proj_out(h), "(b y x) f c -> (b f) c y x", f=frames, y=height, x=x.shape[3]
        )
        return x + h
