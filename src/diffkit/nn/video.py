"""Video denoiser: a transformer over spatio-temporal patches (tubelets), adaLN-Zero conditioned.

The video ``(b, f, c, h, w)`` is cut into ``pt x p1 x p2`` tubelets
([`TubeletPatches`][diffkit.patches.TubeletPatches]), embedded, and given fixed 3-D sin-cos
positions; tokens are frame-major, ``(b, f' * h' * w', dim)``. They run through the
[patch-transformer core][diffkit.nn.transformer] shared with [`DiT`][diffkit.nn.dit.DiT],
whose blocks attend either

- ``"factorised"``: within each frame (space), then across frames at each position (time) —
  cost ``O(f s^2 + s f^2)`` for ``f`` frames of ``s`` tokens (as in Latte / TimeSformer), or
- ``"full"``: over all ``f * s`` tokens at once — cost ``O((f s)^2)``.

With ``local_mlp`` each MLP also mixes neighbouring tokens of the same temporal slot by a
depthwise 3x3 convolution between its two linear layers
([`LocalFeedForward`][diffkit.nn.attention.LocalFeedForward], SegFormer's Mix-FFN, applied
per frame slot): a spatial locality bias that a small transformer otherwise has to learn
from data (time is mixed by the attention only). Same interface as the image denoisers.

With ``positions="rotary"`` no position is added to the tokens: each self-attention rotates
its queries and keys by 3-D rotary angles
([`rotary_angles_3d`][diffkit.nn.embeddings.rotary_angles_3d]: frame, row and column, each
on its own share of every head's features), so attention sees relative positions in space
and time (Wan 2.1, with ``attention="full"``).
"""

import math
from typing import Literal, cast

from jaxtyping import Float
from pydantic import Field, model_validator
from torch import Tensor

from diffkit.nn._registry import DENOISERS
from diffkit.nn.attention import LocalFeedForward as LocalFeedForward
from diffkit.nn.embeddings import rotary_angles_3d
from diffkit.nn.transformer import PatchTransformer, PatchTransformerConfig
from diffkit.patches import TubeletPatches, sincos_pos_embed_3d
from diffkit.protocols import Conditioning
from diffkit.typing import ShapeError, Time, Video, checked

__all__ = ["VideoDiT", "VideoDiTConfig"]


class VideoDiTConfig(PatchTransformerConfig):
    """Architecture of a [`VideoDiT`][diffkit.nn.video.VideoDiT]."""

    kind: Literal["video_dit"] = "video_dit"
    patch_size: tuple[int, int, int] = Field(
        default=(1, 2, 2), description="tubelet size (frames, height, width)"
    )
    local_mlp: bool = Field(
        default=False,
        description="a depthwise 3x3 convolution over each temporal slot's token grid "
        "inside each MLP (a per-frame spatial bias)",
    )
    attention: Literal["factorised", "full"] = Field(
        default="factorised", description="space-then-time attention, or full 3-D attention"
    )
    positions: Literal["sincos", "rotary"] = Field(
        default="sincos",
        description="fixed 3-D sin-cos positions added to the tokens, or 3-D rotary positions "
        "in every self-attention (Wan 2.1; needs attention='full', an even head size >= 6)",
    )
    rotary_theta: float = Field(
        default=10000.0, gt=1, le=1e9, description="base of the rotary frequencies"
    )
    rotary_max_len: int | None = Field(
        default=None,
        gt=0,
        le=1 << 20,
        description="grids longer than this along an axis are refused (diffusers' "
        "rope_max_seq_len); None: no bound",
    )

    @model_validator(mode="after")
    def _check_positions(self) -> "VideoDiTConfig":
        if self.positions == "rotary":
            head_dim = self.dim // self.num_heads
            if self.attention != "full" or head_dim % 2 or head_dim < 6:
                raise ValueError(
                    f"positions='rotary' needs attention='full' and an even head size >= 6; "
                    f"got attention={self.attention!r}, head size {head_dim}"
                )
        elif self.dim % 4 != 0 or self.dim < 8:
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


class VideoDiT(PatchTransformer[VideoDiTConfig]):
    """Video denoiser ``(x_t, t, cond) -> prediction`` on videos ``(b, f, c, h, w)``."""

    def __init__(self, config: VideoDiTConfig) -> None:
        super().__init__(
            config,
            TubeletPatches(config.patch_size),
            attention=config.attention,
            local_mlp=config.local_mlp,
        )

    @classmethod
    def from_config(cls, config: VideoDiTConfig) -> "VideoDiT":
        """Build a freshly initialised video transformer (it starts by predicting zeros)."""
        return cls(config)

    @checked
    def forward(
        self, x_t: Video, t: Time, cond: Conditioning | None = None
    ) -> Float[Tensor, "batch frames out_channels height width"]:
        """Predict ``self.prediction`` for ``x_t`` ``(b, f, c, h, w)`` at times ``t`` ``(b,)``."""
        self._check_inputs(x_t, t, cond, channels=x_t.shape[2])
        grid = cast(tuple[int, int, int], tuple(self.patches.grid(x_t.shape[1:])))
        h = self._transform(x_t, t, cond, *self._positions(grid))
        out = self.patches.unpatchify(h, (x_t.shape[1], self._head_channels, *x_t.shape[3:]))
        return out[:, :, : self._out_channels]  # learned_sigma: the variance half dropped

    def _positions(
        self, grid: tuple[int, int, int]
    ) -> tuple[Tensor | None, tuple[int, int, int], Tensor | None]:
        """The added positions, the grid and the rotary angles of a token grid."""
        c = self.config
        if c.positions == "sincos":
            return sincos_pos_embed_3d(*grid, c.dim), grid, None
        if c.rotary_max_len is not None and max(grid) > c.rotary_max_len:
            raise ShapeError(
                f"VideoDiT: a token grid {grid} exceeds rotary_max_len {c.rotary_max_len}"
            )
        return None, grid, rotary_angles_3d(grid, c.dim // c.num_heads, c.rotary_theta)


DENOISERS.register(VideoDiTConfig, VideoDiT.from_config)
