"""What the demo writes: sample grids as Pillow images and animated GIFs of clips.

The grids are [`diffkit.data.grid_array`][diffkit.data.grid_array]'s tiles as Pillow
images (so they can be shown in a notebook or saved in any format Pillow knows);
[`save_gif`][diffkit_demo.output.save_gif] animates clips side by side.
"""

import os
from pathlib import Path

import numpy as np
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from PIL import Image as PILImage
from torch import Tensor

from diffkit.data import grid_array
from diffkit.typing import checked

__all__ = ["image_grid", "save_gif", "to_unit", "video_grid"]


@checked
def image_grid(
    images: Float[Tensor, "batch channels height width"],
    nrow: int = 8,
    padding: int = 1,
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> PILImage.Image:
    """Tile images in ``value_range`` (1 or 3 channels) into one PIL image, ``nrow`` per row.

    ``value_range`` ``(low, high)`` maps to black and white (default ``[-1, 1]``, like
    torchvision's ``make_grid``; ints such as ``(0, 255)`` are fine). Values slightly outside
    it are clamped; values off by more than the range's width (data on another scale) are
    refused. Tiles are separated, and framed, by ``padding`` pixels of the background value
    ``low`` (black), so an ``r x k`` grid of ``h x w`` images is ``k (w + p) + p`` pixels wide
    and ``r (h + p) + p`` high.
    """
    return PILImage.fromarray(grid_array(images, nrow, padding, value_range=value_range))


@checked
def video_grid(
    videos: Float[Tensor, "batch frames channels height width"],
    padding: int = 1,
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> PILImage.Image:
    """One row per video, one column per frame, values in ``value_range`` (as ``image_grid``)."""
    return PILImage.fromarray(grid_array(videos, 1, padding, value_range=value_range))


def to_unit(x: Tensor) -> Tensor:
    """Samples in ``[-1, 1]`` as float32 values in ``[0, 1]`` on the CPU (clamped)."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2).contiguous()


def save_gif(
    videos: Tensor, path: str | os.PathLike[str], *, scale: int = 4, duration_ms: int = 150
) -> Path:
    """Animate clips ``(n, frames, c, h, w)``, c 1 (grey) or 3 (RGB), in [-1, 1] as a GIF.

    The clips play side by side, each framed by a grey pixel, and loop.
    """
    if videos.ndim != 5 or videos.shape[2] not in (1, 3):
        raise ValueError(
            "save_gif: videos must be (n, frames, channels, h, w) with 1 (grey) or 3 (RGB) "
            f"channels, got shape {tuple(videos.shape)}"
        )
    unit = to_unit(videos)
    padded = F.pad(unit, (1, 1, 1, 1), value=0.5)
    frames = rearrange(padded, "n f c h w -> f h (n w) c")
    if frames.shape[-1] == 1:
        frames = frames[..., 0]  # (f, h, n w): PIL's 8-bit grey
    pictures = []
    for frame in frames:
        array = (frame.numpy() * 255).round().astype(np.uint8)
        picture = PILImage.fromarray(array).resize(
            (array.shape[1] * scale, array.shape[0] * scale), PILImage.Resampling.NEAREST
        )
        pictures.append(picture)
    target = Path(path)
    pictures[0].save(
        target, save_all=True, append_images=pictures[1:], duration=duration_ms, loop=0
    )
    return target
