"""Spatial (2-D) and spatio-temporal (3-D, tubelet) patches, and sin-cos positional embeddings.

A [`SpatialPatches`][diffkit.patches.SpatialPatches] cuts an image ``(b, c, h, w)`` into
non-overlapping ``p1 x p2`` patches, one token per patch, in row-major order::

    (b, c, h*p1, w*p2) -> (b, h*w, c*p1*p2)

A [`TubeletPatches`][diffkit.patches.TubeletPatches] does the same for a video
``(b, f, c, h, w)`` with ``pt x p1 x p2`` tubelets, tokens ordered frame-major::

    (b, f*pt, c, h*p1, w*p2) -> (b, f*h*w, c*pt*p1*p2)

Both satisfy [`Patchifier`][diffkit.protocols.Patchifier]: ``unpatchify`` is the exact
inverse of ``patchify`` (a pure permutation of elements, so bit for bit). Each is its own
frozen config (``kind`` ``spatial_patches`` / ``tubelet_patches``, one field
``patch_size``), registered in [`PATCHIFIERS`][diffkit.patches.PATCHIFIERS].
"""

import math
import operator
from collections.abc import Sequence
from typing import Any, Literal, SupportsIndex

import torch
from einops import rearrange
from jaxtyping import Float
from pydantic import Field, field_validator
from torch import Tensor

from diffkit.config import Config, Registry
from diffkit.protocols import Patchifier
from diffkit.typing import Image, ShapeError, Video, checked

__all__ = [
    "PATCHIFIERS",
    "SpatialPatches",
    "TubeletPatches",
    "sincos_pos_embed_1d",
    "sincos_pos_embed_2d",
    "sincos_pos_embed_3d",
]

PatchTokens = Float[Tensor, "batch tokens patch_dim"]


def _divide(size: int, patch: int, name: str, owner: str) -> int:
    if size % patch != 0:
        raise ShapeError(
            f"{owner}: {name} {size} is not a multiple of the patch size {patch} "
            f"(pad or resize to {math.ceil(size / patch) * patch})"
        )
    return size // patch


def _as_size(value: object) -> int | None:
    """``value`` as an int when it is an integer (not a bool, not a float), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, SupportsIndex):
        return None
    try:
        return operator.index(value)
    except TypeError:  # e.g. a float tensor
        return None


def _patch_sizes(
    owner: str, patch_size: object, names: tuple[str, ...], hint: str
) -> tuple[int, ...]:
    """Positive integer sizes, one per name, or a ``ValueError`` naming the bad one."""
    form = f"({', '.join(names)})"
    if isinstance(patch_size, str) or not isinstance(patch_size, Sequence):
        raise ValueError(f"{owner}: patch_size must be {form}{hint}, got {patch_size!r}")
    if len(patch_size) != len(names):
        raise ValueError(
            f"{owner}: patch_size must be {form}{hint}, got {len(patch_size)} sizes "
            f"{tuple(patch_size)!r}"
        )
    sizes = []
    for name, p in zip(names, patch_size, strict=True):
        size = _as_size(p)
        if size is None or size < 1:
            raise ValueError(
                f"{owner}: patch_size {name} must be a positive int, got {p!r} in "
                f"{tuple(patch_size)!r}"
            )
        sizes.append(size)
    return tuple(sizes)


PATCHIFIERS: Registry[Patchifier] = Registry("patchifier")
"""``kind`` -> patchifier class (each patchifier is its own config)."""


class SpatialPatches(Config):
    """Non-overlapping ``(p1, p2)`` patches of images ``(batch, channels, height, width)``.

    ``SpatialPatches(2)`` is ``SpatialPatches(patch_size=(2, 2))``.
    """

    kind: Literal["spatial_patches"] = "spatial_patches"
    patch_size: tuple[int, int] = Field(
        default=(2, 2), description="patch (height, width) in pixels, or one int for both"
    )

    def __init__(self, patch_size: int | Sequence[int] = (2, 2), **data: Any) -> None:
        super().__init__(**{**data, "patch_size": patch_size})

    @field_validator("patch_size", mode="before")
    @classmethod
    def _sizes(cls, value: Any) -> tuple[int, ...]:
        size = _as_size(value)
        if size is not None:
            value = (size, size)
        return _patch_sizes("SpatialPatches", value, ("height", "width"), " or one positive int")

    def grid(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The token grid ``(height', width')`` for an image shape ``(channels, height, width)``."""
        if len(shape) != 3:
            raise ShapeError(
                f"SpatialPatches: shape must be (channels, height, width), got {tuple(shape)}"
            )
        p1, p2 = self.patch_size
        return _divide(int(shape[1]), p1, "height", "SpatialPatches"), _divide(
            int(shape[2]), p2, "width", "SpatialPatches"
        )

    def patch_dim(self, channels: int) -> int:
        """Features per token: ``channels * p1 * p2``."""
        return channels * self.patch_size[0] * self.patch_size[1]

    @checked
    def patchify(self, x: Image) -> PatchTokens:
        """Image ``(b, c, h*p1, w*p2)`` to tokens ``(b, h*w, c*p1*p2)``, row-major."""
        self.grid(x.shape[1:])
        p1, p2 = self.patch_size
        return rearrange(x, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=p1, p2=p2)

    @checked
    def unpatchify(self, tokens: PatchTokens, shape: Sequence[int]) -> Image:
        """Tokens ``(b, h*w, c*p1*p2)`` back to the image of ``shape = (c, h*p1, w*p2)``."""
        h, w = self.grid(shape)
        c = int(shape[0])
        if tokens.shape[1] != h * w or tokens.shape[2] != self.patch_dim(c):
            raise ShapeError(
                f"SpatialPatches.unpatchify: tokens {tuple(tokens.shape)} do not fit shape "
                f"{tuple(shape)}: expected (batch, {h * w}, {self.patch_dim(c)})"
            )
        p1, p2 = self.patch_size
        return rearrange(tokens, "b (h w) (c p1 p2) -> b c (h p1) (w p2)", h=h, p1=p1, p2=p2)


class TubeletPatches(Config):
    """Non-overlapping ``(frames, height, width)`` tubelets of videos ``(b, f, c, h, w)``."""

    kind: Literal["tubelet_patches"] = "tubelet_patches"
    patch_size: tuple[int, int, int] = Field(
        default=(1, 2, 2), description="tubelet (frames, height, width)"
    )

    def __init__(self, patch_size: Sequence[int] = (1, 2, 2), **data: Any) -> None:
        super().__init__(**{**data, "patch_size": patch_size})

    @field_validator("patch_size", mode="before")
    @classmethod
    def _sizes(cls, value: Any) -> tuple[int, ...]:
        p = _as_size(value)
        if p is not None:
            raise ValueError(
                f"TubeletPatches: patch_size must be (frames, height, width), got the int {p}; "
                f"pass ({p}, {p}, {p}) for cubic tubelets or (1, {p}, {p}) for per-frame patches"
            )
        return _patch_sizes("TubeletPatches", value, ("frames", "height", "width"), "")

    def grid(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The token grid ``(frames', height', width')`` for ``(frames, channels, h, w)``."""
        if len(shape) != 4:
            raise ShapeError(
                "TubeletPatches: shape must be (frames, channels, height, width), "
                f"got {tuple(shape)}"
            )
        pt, p1, p2 = self.patch_size
        return (
            _divide(int(shape[0]), pt, "frames", "TubeletPatches"),
            _divide(int(shape[2]), p1, "height", "TubeletPatches"),
            _divide(int(shape[3]), p2, "width", "TubeletPatches"),
        )

    def patch_dim(self, channels: int) -> int:
        """Features per token: ``channels * pt * p1 * p2``."""
        pt, p1, p2 = self.patch_size
        return channels * pt * p1 * p2

    @checked
    def patchify(self, x: Video) -> PatchTokens:
        """Video ``(b, f*pt, c, h*p1, w*p2)`` to tokens ``(b, f*h*w, c*pt*p1*p2)``."""
        self.grid(x.shape[1:])
        pt, p1, p2 = self.patch_size
        return rearrange(
            x, "b (f pt) c (h p1) (w p2) -> b (f h w) (c pt p1 p2)", pt=pt, p1=p1, p2=p2
        )

    @checked
    def unpatchify(self, tokens: PatchTokens, shape: Sequence[int]) -> Video:
        """Tokens ``(b, f*h*w, c*pt*p1*p2)`` back to the video of ``shape = (f, c, h, w)``."""
        f, h, w = self.grid(shape)
        c = int(shape[1])
        if tokens.shape[1] != f * h * w or tokens.shape[2] != self.patch_dim(c):
            raise ShapeError(
                f"TubeletPatches.unpatchify: tokens {tuple(tokens.shape)} do not fit shape "
                f"{tuple(shape)}: expected (batch, {f * h * w}, {self.patch_dim(c)})"
            )
        pt, p1, p2 = self.patch_size
        return rearrange(
            tokens,
            "b (f h w) (c pt p1 p2) -> b (f pt) c (h p1) (w p2)",
            f=f,
            h=h,
            pt=pt,
            p1=p1,
            p2=p2,
        )


def sincos_pos_embed_1d(positions: Tensor, dim: int) -> Float[Tensor, "n dim"]:
    """Sin-cos embedding of ``(n,)``: ``[sin(p w_k), cos(p w_k)]``, ``w_k = 1e4^(-2k/dim)``."""
    if dim <= 0 or dim % 2 != 0:
        raise ValueError(
            f"sincos_pos_embed_1d: dim must be a positive multiple of 2 (a sin and a cos "
            f"feature per frequency), got {dim}"
        )
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()


def sincos_pos_embed_2d(grid_h: int, grid_w: int, dim: int) -> Float[Tensor, "tokens dim"]:
    """Fixed 2-D sin-cos embedding ``(grid_h*grid_w, dim)``, rows in patchify's row-major order.

    Half the features encode the row, half the column (as in MAE / DiT); ``dim % 4 == 0``.
    """
    if dim <= 0 or dim % 4 != 0:
        raise ValueError(
            f"sincos_pos_embed_2d: dim must be a positive multiple of 4 (a sin-cos half for the "
            f"rows and one for the columns), got {dim}"
        )
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    emb_h = sincos_pos_embed_1d(rows.reshape(-1), dim // 2)
    emb_w = sincos_pos_embed_1d(cols.reshape(-1), dim // 2)
    return torch.cat([emb_h, emb_w], dim=1)


def sincos_pos_embed_3d(
    frames: int, grid_h: int, grid_w: int, dim: int
) -> Float[Tensor, "tokens dim"]:
    """Fixed 3-D sin-cos embedding ``(frames*grid_h*grid_w, dim)``, frame-major like tubelets.

    About three quarters of the features encode the 2-D position (rows, columns), the rest
    the frame; ``dim % 4 == 0`` and ``dim >= 8``.
    """
    if dim < 0 or dim % 4 != 0:
        raise ValueError(
            f"sincos_pos_embed_3d: dim must be a multiple of 4, at least 8 (sin-cos features "
            f"for the rows, columns and frames), got {dim}"
        )
    space_dim = (3 * dim // 4) // 4 * 4
    if space_dim == 0 or dim - space_dim == 0:
        raise ValueError(
            f"sincos_pos_embed_3d: dim {dim} leaves {space_dim} features for the 2-D position "
            f"and {dim - space_dim} for the frame; a 3-D sin-cos embedding needs dim >= 8"
        )
    space = sincos_pos_embed_2d(grid_h, grid_w, space_dim)
    time = sincos_pos_embed_1d(torch.arange(frames), dim - space_dim)
    space = space.unsqueeze(0).expand(frames, -1, -1)
    time = time.unsqueeze(1).expand(-1, grid_h * grid_w, -1)
    return rearrange(torch.cat([time, space], dim=-1), "f s d -> (f s) d")


PATCHIFIERS.register(SpatialPatches)
PATCHIFIERS.register(TubeletPatches)
