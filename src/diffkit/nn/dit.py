"""DiT: a transformer denoiser over spatial patches, conditioned by adaLN-Zero.

The image ``(b, c, h, w)`` is cut into ``p x p`` patches
([`SpatialPatches`][diffkit.patches.SpatialPatches]), each linearly embedded and given a
fixed 2-D sin-cos position, and run through the
[patch-transformer core][diffkit.nn.transformer] with full self-attention: adaLN-Zero
blocks conditioned on time (+ class label) (+ pooled text), cross-attending to
``Conditioning.tokens`` when ``context_dim`` is set (PixArt-style).
"""

from typing import Literal

from jaxtyping import Float
from pydantic import Field, model_validator
from torch import Tensor

from diffkit.nn._registry import DENOISERS
from diffkit.nn.transformer import PatchTransformer, PatchTransformerConfig
from diffkit.patches import SpatialPatches, sincos_pos_embed_2d
from diffkit.protocols import Conditioning
from diffkit.typing import Image, Time, checked

__all__ = ["DiT", "DiTConfig"]


class DiTConfig(PatchTransformerConfig):
    """Architecture of a [`DiT`][diffkit.nn.dit.DiT]."""

    kind: Literal["dit"] = "dit"
    patch_size: int = Field(default=2, gt=0, description="side of the square patches")

    @model_validator(mode="after")
    def _check_positions(self) -> "DiTConfig":
        if self.dim % 4 != 0:
            raise ValueError(f"dim {self.dim} must be a multiple of 4 (2-D sin-cos positions)")
        return self


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
        self._check_inputs(x_t, t, cond, channels=x_t.shape[1])
        grid_h, grid_w = self.patches.grid(x_t.shape[1:])
        pos = sincos_pos_embed_2d(grid_h, grid_w, self.config.dim)
        h = self._transform(x_t, t, cond, pos, (1, grid_h, grid_w))
        return self.patches.unpatchify(h, (self._out_channels, *x_t.shape[2:]))


DENOISERS.register(DiTConfig, DiT.from_config)
