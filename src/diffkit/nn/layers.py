"""Building blocks shared by the networks: time embeddings, residual blocks, attention, adaLN.

Every layer is a plain ``nn.Module``. Image-shaped layers take ``(batch, channels, height,
width)``; token layers take ``(batch, tokens, dim)``. Attention runs on
``torch.nn.functional.scaled_dot_product_attention``; layout changes use einops.
"""

import math
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Bool, Float
from torch import Tensor, nn

from diffkit.protocols import Conditioning
from diffkit.typing import ShapeError, checked_layer, host_range

__all__ = [
    "Attention",
    "Downsample",
    "FeedForward",
    "ResBlock",
    "SpatialSelfAttention",
    "SpatialTransformer",
    "TimeEmbedding",
    "TransformerBlock",
    "Upsample",
    "attention_bias",
    "check_input_dtypes",
    "group_norm",
    "modulate",
    "network_timestep",
    "pointwise",
    "timestep_embedding",
    "validate_conditioning",
    "zero_linear",
]

ImageLike = Float[Tensor, "batch channels height width"]
TokensLike = Float[Tensor, "batch tokens dim"]
Context = Float[Tensor, "batch context context_dim"]
ContextMask = Bool[Tensor, "batch context"]
Embedding = Float[Tensor, "batch emb_dim"]


def timestep_embedding(
    timesteps: Tensor,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> Float[Tensor, "batch dim"]:
    """Sinusoidal embedding of (possibly fractional) timesteps ``(batch,)`` -> ``(batch, dim)``.

    Frequencies ``w_k = max_period^(-k / (dim/2 - freq_shift))``; features ``[cos, sin]``
    (or ``[sin, cos]`` when ``flip_sin_to_cos`` is false), computed in float32 (DDPM's
    embedding, with diffusers' ``flip_sin_to_cos`` / ``downscale_freq_shift`` conventions).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(
        half, dtype=torch.float32, device=timesteps.device
    )
    freqs = torch.exp(exponent / (half - freq_shift))
    args = timesteps[:, None].float() * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class TimeEmbedding(nn.Module):
    """Two-layer MLP ``linear_2(silu(linear_1(x)))`` used on time / pooled embeddings."""

    def __init__(self, in_dim: int, dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, out_dim or dim)

    @checked_layer
    def forward(self, x: Float[Tensor, "batch in_dim"]) -> Float[Tensor, "batch out_dim"]:
        """``(batch, in_dim) -> (batch, out_dim)``."""
        return self.linear_2(F.silu(self.linear_1(x)))


def group_norm(channels: int, groups: int, eps: float, where: str = "") -> nn.GroupNorm:
    """``nn.GroupNorm`` that says which layer has channels not divisible by the groups."""
    if channels % groups != 0:
        at = f" in {where}" if where else ""
        raise ValueError(
            f"GroupNorm{at}: {channels} channels are not divisible into {groups} groups; "
            "choose channel counts that are multiples of norm_groups"
        )
    return nn.GroupNorm(groups, channels, eps=eps)


class ResBlock(nn.Module):
    """Residual block ``x + conv(act(norm(conv(act(norm(x))) + emb)))`` with time conditioning.

    With ``scale_shift`` the embedding gives a scale and a shift applied after the second
    norm (``h * (1 + scale) + shift``, as in improved DDPM) instead of being added.
    ``emb_dim=None`` makes an unconditioned block (autoencoders).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int | None,
        *,
        groups: int = 32,
        eps: float = 1e-5,
        scale_shift: bool = False,
        dropout: float = 0.0,
        output_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.output_scale = output_scale
        self.norm1 = group_norm(in_channels, groups, eps, "ResBlock")
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = (
            nn.Linear(emb_dim, out_channels * (2 if scale_shift else 1)) if emb_dim else None
        )
        self.norm2 = group_norm(out_channels, groups, eps, "ResBlock")
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    @checked_layer
    def forward(self, x: ImageLike, emb: Embedding | None = None) -> Float[Tensor, "batch c h w"]:
        """``(batch, in_channels, h, w) -> (batch, out_channels, h, w)``."""
        h = self.conv1(F.silu(self.norm1(x)))
        if self.emb_proj is not None:
            if emb is None:
                raise ValueError("ResBlock: this block is time-conditioned but got no embedding")
            e = rearrange(self.emb_proj(F.silu(emb)), "b c -> b c 1 1")
            if self.scale_shift:
                scale, shift = e.chunk(2, dim=1)
                h = self.norm2(h) * (1 + scale) + shift
            else:
                h = self.norm2(h + e)
        else:
            h = self.norm2(h)
        h = self.conv2(self.dropout(F.silu(h)))
        skip = x if self.skip is None else pointwise(self.skip, x)
        out = skip + h
        return out if self.output_scale == 1.0 else out / self.output_scale


def pointwise(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """A 1x1 convolution computed as one matrix product over channels, in x's memory layout."""
    weight = conv.weight.flatten(1)
    if x.is_contiguous():  # (b, c, h, w): weight @ (b, c, h*w)
        h = torch.matmul(weight, x.flatten(2))
        if conv.bias is not None:
            h = h + conv.bias[:, None]
        return h.view(x.shape[0], conv.out_channels, *x.shape[2:])  # not -1: batch may be 0
    h = F.linear(rearrange(x, "b c y x -> b y x c"), weight, conv.bias)
    return rearrange(h, "b y x c -> b c y x")


class Downsample(nn.Module):
    """Strided 3x3 convolution halving height and width.

    ``padding=1`` pads symmetrically (U-Nets); ``padding=0`` pads one pixel on the right and
    bottom only (the latent autoencoder's convention).
    """

    def __init__(self, channels: int, padding: int = 1) -> None:
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    @checked_layer
    def forward(self, x: ImageLike) -> Float[Tensor, "batch channels h w"]:
        """``(b, c, 2h, 2w) -> (b, c, h, w)``."""
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


# Nearest x2 upsampling then a 3x3 convolution, per output phase: output row 2i + a reads
# input rows {i - 1, i} (a = 0) or {i, i + 1} (a = 1), with the kernel's rows summed
# onto those two taps. _PHASE_TAPS[a, tap, kernel row]; the same for columns.
_PHASE_TAPS = ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 convolution.

    Computed without forming the upsampled map: each of the four output phases is a 2x2
    convolution of the input with the 3x3 kernel's rows and columns summed onto two taps
    (equal to upsample-then-convolve up to float rounding, with 4/9 of its multiply-adds).
    The parameters are the 3x3 convolution's (``conv``), as in diffusers' checkpoints.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.register_buffer("taps", torch.tensor(_PHASE_TAPS), persistent=False)

    @checked_layer
    def forward(self, x: ImageLike) -> Float[Tensor, "batch channels h w"]:
        """``(b, c, h, w) -> (b, c, 2h, 2w)``, in the memory format of ``x``."""
        taps = self.taps.to(self.conv.weight.dtype)
        kernels = torch.einsum("apr,bqs,oirs->aboipq", taps, taps, self.conv.weight)
        n, _, h, w = x.shape
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        layout = "n h a w b c" if channels_last else "n c h a w b"
        out = x.new_empty(
            (n, h, 2, w, 2, self.conv.out_channels)
            if channels_last
            else (n, self.conv.out_channels, h, 2, w, 2)
        )
        for a in (0, 1):
            for b in (0, 1):
                phase = F.conv2d(F.pad(x, (1 - b, b, 1 - a, a)), kernels[a, b], self.conv.bias)
                if channels_last:
                    out[:, :, a, :, b] = rearrange(phase, "n c h w -> n h w c")
                else:
                    out[:, :, :, a, :, b] = phase
        return rearrange(out, f"{layout} -> n c (h a) (w b)")


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
    tokens and a fused ``kv`` from the context (``context_dim``).
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
    ) -> None:
        super().__init__()
        head_dim = head_dim or dim // heads
        inner = heads * head_dim
        self.heads = heads
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
        x: TokensLike,
        context: Context | None = None,
        mask: ContextMask | None = None,
    ) -> TokensLike:
        """Tokens ``(b, n, dim)``; context ``(b, m, context_dim)``, keep-mask ``(b, m)``."""
        if self.is_cross:
            if context is None:
                raise ValueError("Attention: cross-attention needs a context (Conditioning.tokens)")
            q = self.q(x)
            k, v = self.kv(context).chunk(2, dim=-1)
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (rearrange(a, "b n (h d) -> b h n d", h=self.heads) for a in (q, k, v))
        bias = attention_bias(mask, q.dtype) if self.is_cross else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.out(rearrange(out, "b h n d -> b n (h d)"))


class SpatialSelfAttention(nn.Module):
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

    @checked_layer
    def forward(
        self, x: ImageLike, context: Context | None = None, mask: ContextMask | None = None
    ) -> ImageLike:
        """``(b, c, h, w) -> (b, c, h, w)``; ``context`` and ``mask`` are ignored."""
        height = x.shape[2]
        h = rearrange(self.norm(x), "b c y x -> b (y x) c")
        q, k, v = (
            rearrange(a, "b n (h d) -> b h n d", h=self.heads) for a in self.qkv(h).chunk(3, dim=-1)
        )
        h = F.scaled_dot_product_attention(q, k, v)
        h = self.out(rearrange(h, "b h n d -> b n (h d)"))
        out = x + rearrange(h, "b (y x) c -> b c y x", y=height)
        return out if self.output_scale == 1.0 else out / self.output_scale


class FeedForward(nn.Module):
    """Transformer MLP: GEGLU ``proj_out(a * gelu(g))`` with ``[a, g] = proj_in(x)``, or GELU."""

    def __init__(
        self, dim: int, mult: float = 4.0, kind: Literal["geglu", "gelu", "gelu_tanh"] = "geglu"
    ) -> None:
        super().__init__()
        inner = int(dim * mult)
        self.kind = kind
        self.proj_in = nn.Linear(dim, inner * 2 if kind == "geglu" else inner)
        self.proj_out = nn.Linear(inner, dim)

    @checked_layer
    def forward(self, x: TokensLike) -> TokensLike:
        """``(b, n, dim) -> (b, n, dim)``."""
        h = self.proj_in(x)
        if self.kind == "geglu":
            a, gate = h.chunk(2, dim=-1)
            h = a * F.gelu(gate)
        else:
            h = F.gelu(h, approximate="tanh" if self.kind == "gelu_tanh" else "none")
        return self.proj_out(h)


class TransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to the context (optional), GEGLU MLP."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        if context_dim is not None:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim)
        else:
            self.norm2 = self.attn2 = None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    @checked_layer
    def forward(
        self, x: TokensLike, context: Context | None = None, mask: ContextMask | None = None
    ) -> TokensLike:
        """``(b, n, dim) -> (b, n, dim)``, attending to ``context`` ``(b, m, context_dim)``."""
        x = x + self.attn1(self.norm1(x))
        if self.attn2 is not None and self.norm2 is not None:
            x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
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

    @checked_layer
    def forward(
        self, x: ImageLike, context: Context | None = None, mask: ContextMask | None = None
    ) -> ImageLike:
        """``(b, c, h, w) -> (b, c, h, w)``, attending to ``context`` ``(b, m, context_dim)``."""
        height = x.shape[2]
        # A 1x1 convolution is a linear map over channels: with channels-last activations
        # both projection kinds are one matrix product on a free (b, pixels, c) view.
        h = rearrange(self.norm(x), "b c y x -> b (y x) c")
        h = F.linear(h, self.proj_in.weight.flatten(1), self.proj_in.bias)
        for block in self.blocks:
            h = block(h, context, mask)
        h = F.linear(h, self.proj_out.weight.flatten(1), self.proj_out.bias)
        return x + rearrange(h, "b (y x) c -> b c y x", y=height)


def zero_linear(dim_in: int, dim_out: int) -> nn.Linear:
    """A ``Linear`` whose weight and bias start at zero (adaLN-Zero gates and output heads)."""
    layer = nn.Linear(dim_in, dim_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation ``x * (1 + scale) + shift``: ``x`` ``(b, n, d)``, shift/scale ``(b, d)``."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def network_timestep(
    t: Tensor, time_input: Literal["t", "index"], num_train_timesteps: int, time_scale: float
) -> Tensor:
    """What a network's timestep embedding receives for continuous times ``t`` ``(batch,)``.

    - ``"t"``: ``time_scale * t`` (a model trained on continuous time).
    - ``"index"``: the discrete training index ``N t - 1`` of a model trained on ``N`` steps
      (``Discrete.index_from_t``), computed in float64 and snapped to the nearest integer when
      within float32 rounding of it, so ``t = Discrete.t_from_index(i)`` gives exactly ``i``.

    Times outside ``[0, 1]`` (or NaN) are refused when ``t`` is on the CPU, where looking
    costs no device sync: the usual slip is a diffusers timestep (0-999) given as ``t``.
    """
    ends = host_range(t)
    if ends is not None and not 0.0 <= ends[0] <= ends[1] <= 1.0:
        raise ValueError(
            f"t must be continuous times in [0, 1], got values from {ends[0]:g} to "
            f"{ends[1]:g} (or NaN); a trained model's step index i is Discrete.t_from_index(i)"
        )
    if time_input == "t":
        return t * time_scale
    index = t.double() * num_train_timesteps - 1
    nearest = index.round()
    snap = (index - nearest).abs() <= 4e-6 * num_train_timesteps
    return torch.where(snap, nearest, index)


def check_input_dtypes(
    owner: str,
    dtype: torch.dtype,
    x_t: Tensor,
    cond: Conditioning | None,
    *,
    tokens: bool,
    pooled: bool,
) -> None:
    """Refuse, before any compute, ``x_t`` or used embeddings of ``cond`` not in ``dtype``.

    ``dtype`` is the network's parameter dtype; ``tokens`` / ``pooled`` say which fields it
    reads. Dtype comparisons only (no device sync). Under ``torch.autocast``, which casts
    each op's inputs itself, float32 and the autocast dtype are let through.
    """
    if x_t.dtype != dtype:
        _check_dtype(owner, "x_t", x_t, dtype)
    if cond is None:
        return
    if tokens and cond.tokens is not None and cond.tokens.dtype != dtype:
        _check_dtype(owner, "Conditioning.tokens", cond.tokens, dtype)
    if pooled and cond.pooled is not None and cond.pooled.dtype != dtype:
        _check_dtype(owner, "Conditioning.pooled", cond.pooled, dtype)


def _check_dtype(owner: str, name: str, value: Tensor, dtype: torch.dtype) -> None:
    device = value.device.type
    if torch.is_autocast_enabled(device) and value.dtype in (
        torch.float32,
        torch.get_autocast_dtype(device),
    ):
        return
    if name == "x_t":  # a sampler calls the model in the dtype of its noise
        fix = f"pass x_t.to({dtype}) (to a sampler: noise.to({dtype}))"
    else:
        fix = f"pass it .to({dtype})"
    raise ShapeError(
        f"{owner}: {name} is {value.dtype} but the model's parameters are {dtype}; {fix}, "
        f"or convert the model with .to({value.dtype})"
    )


def validate_conditioning(
    owner: str,
    x_t: Tensor,
    cond: Conditioning | None,
    *,
    context_dim: int | None,
    pooled_dim: int | None,
    num_classes: int | None,
    dtype: torch.dtype | None = None,
) -> None:
    """Raise before any compute when ``cond`` lacks what a network was configured to use.

    ``x_t`` ``(batch, ...)`` is the network's input; with ``dtype`` (the network's
    parameter dtype) it and the embeddings the network reads must be in that dtype
    ([`check_input_dtypes`][diffkit.nn.layers.check_input_dtypes]).
    """
    batch = x_t.shape[0]
    if cond is not None and cond.batch_size not in (None, batch):
        raise ShapeError(f"{owner}: Conditioning has batch {cond.batch_size}, x_t has {batch}")
    tokens = cond.tokens if cond is not None else None
    if context_dim is not None:
        if tokens is None:
            raise ValueError(f"{owner}: cross-attention needs Conditioning(tokens=...)")
        if tokens.shape[-1] != context_dim:
            raise ShapeError(
                f"{owner}: Conditioning.tokens has dim {tokens.shape[-1]}, expected "
                f"context_dim={context_dim}"
            )
    if num_classes is not None:
        labels = cond.labels if cond is not None else None
        if labels is None:
            raise ValueError(
                f"{owner}: class-conditioned (num_classes set); pass Conditioning(labels=)"
            )
        # CPU labels only (host_range): on an accelerator a bad label fails inside the
        # embedding instead, since reading them back would sync every sampling step.
        ends = host_range(labels)
        if ends is not None and not 0 <= ends[0] <= ends[1] < num_classes:
            raise ValueError(
                f"{owner}: Conditioning.labels must be in [0, num_classes={num_classes}) "
                f"(a null label for guidance counts among the classes), got labels from "
                f"{ends[0]:g} to {ends[1]:g}"
            )
    if pooled_dim is not None:
        pooled = cond.pooled if cond is not None else None
        if pooled is None:
            raise ValueError(f"{owner}: pooled-conditioned; pass Conditioning(pooled=...)")
        if pooled.shape[-1] != pooled_dim:
            raise ShapeError(
                f"{owner}: Conditioning.pooled has dim {pooled.shape[-1]}, expected "
                f"pooled_dim={pooled_dim}"
            )
    if cond is not None:
        # A field the network has no input for is ignored; that is fine while it uses another
        # (a CLIP conditioner gives tokens and pooled to a cross-attention-only U-Net), but a
        # Conditioning it ignores entirely would silently make conditional sampling unconditional.
        options = {
            "tokens": ("context_dim", context_dim),
            "pooled": ("pooled_dim", pooled_dim),
            "labels": ("num_classes", num_classes),
        }
        given = [name for name in options if getattr(cond, name) is not None]
        if given and all(options[name][1] is None for name in given):
            missing = ", ".join(options[name][0] for name in given)
            raise ValueError(
                f"{owner}: got Conditioning with {', '.join(given)} but the network uses none "
                f"of them (built without {missing}); build it with "
                f"{options[given[0]][0]}=... or pass cond=None"
            )
    if dtype is not None:
        check_input_dtypes(
            owner,
            dtype,
            x_t,
            cond,
            tokens=context_dim is not None,
            pooled=pooled_dim is not None,
        )
