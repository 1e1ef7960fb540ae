"""Convolutional building blocks: residual blocks with time conditioning, down- and upsampling.

Every layer is a plain ``nn.Module`` on feature maps ``(batch, channels, height, width)``,
used by the U-Net and the latent autoencoder; [`TemporalConv`][diffkit.nn.resblocks.TemporalConv]
takes the frames of videos stacked on the batch, ``(batch * frames, channels, height, width)``
(the space-time U-Net). [`CausalConv3d`][diffkit.nn.resblocks.CausalConv3d] and
[`CausalResBlock`][diffkit.nn.resblocks.CausalResBlock] take clips ``(batch, channels, frames,
height, width)`` and never look at later frames (the causal video autoencoder).
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

from diffkit.typing import Image, checked_layer

__all__ = [
    "CausalConv3d",
    "CausalResBlock",
    "ChannelRMSNorm",
    "Downsample",
    "Level",
    "ResBlock",
    "TemporalConv",
    "Upsample",
    "group_norm",
    "pointwise",
]

Embedding = Float[Tensor, "batch emb_dim"]


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
    def forward(self, x: Image, emb: Embedding | None = None) -> Float[Tensor, "batch c h w"]:
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
    def forward(self, x: Image) -> Float[Tensor, "batch channels h w"]:
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

    def __init__(self, channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)
        self.register_buffer("taps", torch.tensor(_PHASE_TAPS), persistent=False)

    @checked_layer
    def forward(self, x: Image) -> Float[Tensor, "batch out_channels h w"]:
        """``(b, c, h, w) -> (b, out_channels, 2h, 2w)``, in the memory format of ``x``."""
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


class TemporalConv(nn.Module):
    """Residual stack of four temporal convolutions, mixing each pixel's frames.

    ``x + conv4(...conv1(x))`` where each stage is ``Conv(act(norm(h)))`` over the frames
    (kernel 3, zero-padded; dropout before the last three), the norms' statistics taken
    over the whole clip (ModelScope's / diffusers' ``TemporalConvLayer``). The last
    convolution starts at zero, so a new layer is the identity: an image network extended
    to video starts as the image network, frame by frame.
    """

    def __init__(self, channels: int, *, groups: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        self.norms = nn.ModuleList(
            group_norm(channels, groups, 1e-5, "TemporalConv") for _ in range(4)
        )
        convs = [nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0)) for _ in range(4)]
        last = convs[-1]
        nn.init.zeros_(last.weight)
        if last.bias is not None:
            nn.init.zeros_(last.bias)
        self.convs = nn.ModuleList(convs)
        self.dropout = nn.Dropout(dropout)

    @checked_layer
    def forward(self, x: Image, frames: int) -> Float[Tensor, "batch channels h w"]:
        """``(b * frames, c, h, w) -> (b * frames, c, h, w)``, frames of a clip consecutive."""
        h = rearrange(x, "(b f) c y x -> b c f y x", f=frames)
        for i, (norm, conv) in enumerate(zip(self.norms, self.convs, strict=True)):
            h = F.silu(norm(h))
            h = conv(self.dropout(h) if i else h)
        return x + rearrange(h, "b c f y x -> (b f) c y x")


class Level(nn.Module):
    """One resolution of a U-Net or an autoencoder: residual blocks, each optionally followed
    by attention, then an optional resampling.

    A space-time U-Net adds, after each residual block, a temporal convolution
    (``temporal_conv[j]``) and, after each attention, a temporal attention
    (``temporal_attn[j]``).
    """

    res: nn.ModuleList
    attn: nn.ModuleList
    temporal_conv: nn.ModuleList
    temporal_attn: nn.ModuleList
    downsample: Downsample | None
    upsample: Upsample | None

    def __init__(
        self,
        res: list[ResBlock],
        attn: list[nn.Module] | None = None,
        downsample: Downsample | None = None,
        upsample: Upsample | None = None,
        *,
        temporal_conv: list[nn.Module] | None = None,
        temporal_attn: list[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn or [])
        self.temporal_conv = nn.ModuleList(temporal_conv or [])
        self.temporal_attn = nn.ModuleList(temporal_attn or [])
        self.downsample = downsample
        self.upsample = upsample


class ChannelRMSNorm(nn.Module):
    """RMS norm over the channels (dim 1) of a feature map: ``x / rms(x) * weight``.

    Computed as ``normalize(x, dim=1) * sqrt(channels) * weight`` (``normalize`` divides by
    ``max(||x||, 1e-12)``), Wan's normalisation; each pixel of each frame on its own.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = channels**0.5
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        """``(b, c, ...) -> (b, c, ...)``."""
        weight = self.weight.view(-1, *([1] * (x.ndim - 2)))
        low = x.dtype in (torch.float16, torch.bfloat16)  # sum of squares in float32 there
        normalized = F.normalize(x.float() if low else x, dim=1).to(x.dtype)
        return normalized * self.scale * weight


class CausalConv3d(nn.Conv3d):
    """3-D convolution over ``(b, c, frames, h, w)`` that sees only the current and earlier
    frames: the time axis is zero-padded by ``kernel - 1`` frames in front (none behind),
    height and width symmetrically. Frames in = frames out."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel: tuple[int, int, int] = (3, 3, 3)
    ) -> None:
        super().__init__(in_channels, out_channels, kernel)
        kt, kh, kw = kernel
        self.causal_padding = (kw // 2, kw // 2, kh // 2, kh // 2, kt - 1, 0)

    def forward(self, input: Tensor) -> Tensor:
        """``(b, in, f, h, w) -> (b, out, f, h, w)``; output frame ``i`` reads frames ``<= i``."""
        return super().forward(F.pad(input, self.causal_padding))


class CausalResBlock(nn.Module):
    """Residual block of causal 3-D convolutions, ``skip(x) + conv2(act(norm2(conv1(act(
    norm1(x))))))`` with channel RMS norms: [`ResBlock`][diffkit.nn.resblocks.ResBlock]'s
    shape for clips ``(b, c, frames, h, w)`` (Wan's video autoencoder)."""

    def __init__(self, in_channels: int, out_channels: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = ChannelRMSNorm(in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = ChannelRMSNorm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        self.skip = (
            CausalConv3d(in_channels, out_channels, (1, 1, 1))
            if in_channels != out_channels
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(b, in, f, h, w) -> (b, out, f, h, w)``."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + (x if self.skip is None else self.skip(x))
