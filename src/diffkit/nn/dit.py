"""DiT: a transformer denoiser over spatial patches, conditioned by adaLN-Zero.

The image ``(b, c, h, w)`` is cut into ``p x p`` patches
([`SpatialPatches`][diffkit.patches.SpatialPatches]), each linearly embedded and given a
fixed 2-D sin-cos position, and run through the
[patch-transformer core][diffkit.nn.transformer] with full self-attention: adaLN-Zero
blocks conditioned on time (+ class label) (+ pooled text), cross-attending to
``Conditioning.tokens`` when ``context_dim`` is set (PixArt-style).

The positions follow diffkit's layout by default (the first half of the features encodes
the row); ``pos_order="wh"``, ``pos_base_size``, ``pos_interpolation_scale`` and
``pos_max_size`` give the layout, resolution scaling and cropping of the published DiT /
PixArt / SD3 models (diffusers' ``PatchEmbed``), which ``diffkit.interop.from_diffusers``
sets. With ``joint_attention`` the blocks are SD3's MMDiT blocks (see the
[patch-transformer core][diffkit.nn.transformer]).
"""

from typing import Literal

import torch
from jaxtyping import Float
from pydantic import Field, model_validator
from torch import Tensor

from diffkit.nn._registry import DENOISERS
from diffkit.nn.transformer import PatchTransformer, PatchTransformerConfig
from diffkit.patches import SpatialPatches, sincos_pos_embed_1d, sincos_pos_embed_2d
from diffkit.protocols import Conditioning
from diffkit.typing import Image, ShapeError, Time, checked

__all__ = ["DiT", "DiTConfig", "dit_positions"]


class DiTConfig(PatchTransformerConfig):
    """Architecture of a [`DiT`][diffkit.nn.dit.DiT]."""

    kind: Literal["dit"] = "dit"
    patch_size: int = Field(default=2, gt=0, description="side of the square patches")
    pos_order: Literal["hw", "wh"] = Field(
        default="hw",
        description="which half of the 2-D sin-cos position features encodes the row: the "
        "first ('hw'), or the second ('wh': MAE / DiT / PixArt as published)",
    )
    pos_base_size: int | None = Field(
        default=None,
        gt=0,
        description="positions on a grid of n patches are scaled by pos_base_size / n, so "
        "every resolution spans the training grid (diffusers' PatchEmbed: sample_size / "
        "patch_size); None: integer positions",
    )
    pos_interpolation_scale: float = Field(
        default=1.0, gt=0, description="positions are divided by this (PixArt: sample_size // 64)"
    )
    pos_max_size: int | None = Field(
        default=None,
        gt=0,
        le=4096,
        description="the positions of a grid of patches are the centre crop of those of a "
        "pos_max_size x pos_max_size grid, scaled by pos_base_size / pos_max_size (SD3's "
        "pos_embed_max_size); larger grids are refused; None: no crop",
    )

    @model_validator(mode="after")
    def _check_positions(self) -> "DiTConfig":
        if self.dim % 4 != 0:
            raise ValueError(f"dim {self.dim} must be a multiple of 4 (2-D sin-cos positions)")
        if self.pos_max_size is not None and self.pos_base_size is None:
            raise ValueError("pos_max_size needs pos_base_size (the scale of the positions)")
        return self

    @property
    def downsampling_factor(self) -> int:
        """Height and width must be multiples of the patch size."""
        return self.patch_size

    @property
    def is_video(self) -> bool:
        """A DiT takes images."""
        return False


def _axis(n: int, config: DiTConfig) -> torch.Tensor:
    """Positions of ``n`` patches along one axis, in float32 as diffusers' ``PatchEmbed``."""
    size = config.pos_max_size or n
    if n > size:
        raise ShapeError(
            f"DiT: {n} patches along an axis, more than pos_max_size {config.pos_max_size}"
        )
    positions = torch.arange(size, dtype=torch.float32)
    if config.pos_base_size is not None:
        positions = positions / (size / config.pos_base_size)
    start = (size - n) // 2  # the centre crop of the larger grid (SD3)
    return positions[start : start + n] / config.pos_interpolation_scale


def dit_positions(grid_h: int, grid_w: int, config: DiTConfig) -> Float[Tensor, "tokens dim"]:
    """The fixed 2-D sin-cos positions ``(grid_h * grid_w, dim)`` of a DiT's patches."""
    c = config
    if c.pos_order == "hw" and c.pos_base_size is None and c.pos_interpolation_scale == 1.0:
        return sincos_pos_embed_2d(grid_h, grid_w, c.dim)
    rows, cols = torch.meshgrid(_axis(grid_h, c), _axis(grid_w, c), indexing="ij")
    halves = [sincos_pos_embed_1d(a.reshape(-1), c.dim // 2) for a in (rows, cols)]
    if c.pos_order == "wh":
        halves.reverse()
    return torch.cat(halves, dim=1)


class DiT(PatchTransformer[DiTConfig]):
    """Diffusion transformer ``(x_t, t, cond) -> prediction`` on images ``(b, c, h, w)``."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__(config, SpatialPatches(config.patch_size), attention="full")

    @classmethod
    def from_config(cls, config: DiTConfig) -> "DiT":
        """Build a freshly initialised DiT (adaLN-Zero: it starts by predicting zeros)."""
        return cls(config)

    @checked
    def forward(
        self, x_t: Image, t: Time, cond: Conditioning | None = None
    ) -> Float[Tensor, "batch out_channels height width"]:
        """Predict ``self.prediction`` for ``x_t`` ``(b, c, h, w)`` at times ``t`` ``(b,)``."""
        return self.predict_all(x_t, t, cond)[:, : self._out_channels]

    @checked
    def predict_all(
        self, x_t: Image, t: Time, cond: Conditioning | None = None
    ) -> Float[Tensor, "batch head_channels height width"]:
        """Every output channel: the prediction, then (``learned_sigma``) the variance
        channels (diffusers' DiT / PixArt output)."""
        self._check_inputs(x_t, t, cond, channels=x_t.shape[1])
        grid_h, grid_w = self.patches.grid(x_t.shape[1:])
        pos = dit_positions(grid_h, grid_w, self.config)
        h = self._transform(x_t, t, cond, pos, (1, grid_h, grid_w))
        return self.patches.unpatchify(h, (self._head_channels, *x_t.shape[2:]))


DENOISERS.register(DiTConfig, DiT.from_config)
