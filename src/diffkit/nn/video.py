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
and time (Wan 2.1, with ``attention="full"``). ``attention="alternating"`` with
``positions="space_then_time"`` is Latte: ``depth`` pairs of a spatial block and a temporal
block, 2-D positions within each frame added at the input and 1-D positions of the frames
added before the first temporal block.
"""

import math
from typing import Literal, cast

import torch
from jaxtyping import Float
from pydantic import Field, model_validator
from torch import Tensor

from diffkit.config import field_error
from diffkit.nn._registry import DENOISERS
from diffkit.nn.attention import LocalFeedForward as LocalFeedForward
from diffkit.nn.dit import patch_positions
from diffkit.nn.embeddings import rotary_angles_3d
from diffkit.nn.transformer import NetworkAttention, PatchTransformer, PatchTransformerConfig
from diffkit.patches import TubeletPatches, sincos_pos_embed_1d, sincos_pos_embed_3d
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
    attention: NetworkAttention = Field(
        default="factorised",
        description="space-then-time attention in each block, full 3-D attention, or "
        "'alternating': depth pairs of a spatial block (with the cross-attention) and a "
        "temporal block (Latte)",
    )
    positions: Literal["sincos", "rotary", "space_then_time"] = Field(
        default="sincos",
        description="fixed 3-D sin-cos positions added to the tokens; 3-D rotary positions "
        "in every self-attention (Wan 2.1; needs attention='full', an even head size >= 6); "
        "or 2-D sin-cos positions within each frame at the input and 1-D sin-cos positions "
        "of the frames before the first temporal block (Latte; needs attention='alternating')",
    )
    max_frames: int | None = Field(
        default=None,
        gt=0,
        le=1 << 16,
        description="videos of more frames (after the tubelet's depth) are refused (Latte's "
        "video_length); None: no bound",
    )
    pos_order: Literal["hw", "wh"] = Field(
        default="hw",
        description="positions='space_then_time': which half of the 2-D features encodes the "
        "row (as DiTConfig.pos_order)",
    )
    pos_base_size: int | None = Field(
        default=None,
        gt=0,
        le=1 << 16,
        description="positions='space_then_time': 2-D positions scaled by pos_base_size / n "
        "(as DiTConfig.pos_base_size)",
    )
    pos_interpolation_scale: float = Field(
        default=1.0,
        gt=0,
        le=1e6,
        description="positions='space_then_time': 2-D positions divided by this",
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
        owner = "VideoDiTConfig"
        layout = (self.pos_order, self.pos_base_size, self.pos_interpolation_scale)
        if self.positions != "space_then_time" and layout != ("hw", None, 1.0):
            message = (
                "pos_order, pos_base_size and pos_interpolation_scale need "
                f"positions='space_then_time', not {self.positions!r}"
            )
            raise field_error(owner, "positions", message, self.positions)
        if (self.positions == "space_then_time") != (self.attention == "alternating"):
            message = (
                "positions='space_then_time' and attention='alternating' go together, got "
                f"positions={self.positions!r}, attention={self.attention!r}"
            )
            raise field_error(owner, "positions", message, self.positions)
        if self.attention == "alternating" and (self.local_mlp or self.embeddings_per_block):
            message = "attention='alternating' supports neither local_mlp nor embeddings_per_block"
            raise field_error(owner, "attention", message, self.attention)
        if self.positions == "rotary":
            head_dim = self.dim // self.num_heads
            if self.attention != "full" or head_dim % 2 or head_dim < 6:
                message = (
                    f"positions='rotary' needs attention='full' and an even head size >= 6; "
                    f"got attention={self.attention!r}, head size {head_dim}"
                )
                raise field_error(owner, "positions", message, self.positions)
        elif self.dim % 4 != 0 or self.dim < 8:
            message = (
                f"dim {self.dim} must be a multiple of 4 and at least 8 (3-D sin-cos positions; "
                "with 4 no feature encodes the position within a frame)"
            )
            raise field_error(owner, "dim", message, self.dim)
        if any(p < 1 for p in self.patch_size):
            message = f"patch_size must be positive, got {self.patch_size}"
            raise field_error("VideoDiTConfig", "patch_size", message, self.patch_size)
        return self

    def patch_elements(self) -> int:
        """Numbers in one tubelet of one channel: ``frames * height * width``."""
        return math.prod(self.patch_size)

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
        if self.config.max_frames is not None and grid[0] > self.config.max_frames:
            raise ShapeError(
                f"VideoDiT: {grid[0]} token frames, more than max_frames {self.config.max_frames}"
            )
        if self.config.positions == "space_then_time":
            h = self._transform(x_t, t, cond, *self._space_then_time(grid))
        else:
            h = self._transform(x_t, t, cond, *self._positions(grid))
        out = self.patches.unpatchify(h, (x_t.shape[1], self._head_channels, *x_t.shape[3:]))
        return out[:, :, : self._out_channels]  # learned_sigma: the variance half dropped

    def _space_then_time(
        self, grid: tuple[int, int, int]
    ) -> tuple[Tensor, tuple[int, int, int], None, Tensor | None]:
        """Latte's positions: 2-D within each frame, added at the input; 1-D of the frames
        (none for a single frame, as diffusers), added before the first temporal block."""
        c = self.config
        frames, grid_h, grid_w = grid
        space = patch_positions(
            grid_h,
            grid_w,
            c.dim,
            order=c.pos_order,
            base_size=c.pos_base_size,
            interpolation_scale=c.pos_interpolation_scale,
        )
        time = sincos_pos_embed_1d(torch.arange(frames), c.dim) if frames > 1 else None
        return space.repeat(frames, 1), grid, None, time

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
