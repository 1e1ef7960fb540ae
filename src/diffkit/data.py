"""Generic data helpers for training: collation, deterministic shard batching, sample grids.

Batches are cut with [`shard_batches`][diffkit.data.shard_batches]: a
``torch.utils.data.DistributedSampler`` shuffles each epoch (``set_epoch``) and hands
every shard (one per process, or per gradient-accumulation micro-batch) its own
disjoint part of the epoch, so the data a run sees depends only on the seed.

[`save_grid`][diffkit.data.save_grid] writes samples as one PNG with the standard library
alone (training's sample grids need no imaging package). Datasets are registered by config
``kind`` in [`DATASETS`][diffkit.data.DATASETS]; the toy digits datasets of the demo live in
``diffkit_demo.datasets`` (the ``diffkit[demo]`` extra), found through their entry points.
"""

import dataclasses
import math
import struct
import zlib
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

from diffkit.config import Config, Registry
from diffkit.typing import Sample, ShapeError, checked

__all__ = [
    "DATASETS",
    "ENTRY_POINT_GROUP",
    "Batch",
    "DatasetRegistry",
    "collate",
    "grid_array",
    "save_grid",
    "shard_batches",
    "write_png",
]


@dataclasses.dataclass(frozen=True)
class Batch:
    """A collated batch: data ``x`` ``(batch, ...)``, optional labels and captions, and for
    joint image-video training which items are clips (``temporal``, bool ``(batch,)``: see
    [`Conditioning.temporal`][diffkit.protocols.Conditioning])."""

    x: Tensor
    labels: Tensor | None = None
    captions: list[str] | None = None
    temporal: Tensor | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])


def collate(items: Sequence[Any]) -> Batch:
    """Stack dataset items (``{"x", "label"?, "caption"?, "temporal"?}`` mappings, or bare
    tensors); ``"temporal"``: whether a video item's frames are one clip (``False``: a stack
    of independent images, for joint image-video training)."""
    if not items:
        raise ValueError("collate: empty batch")
    if isinstance(items[0], Tensor):
        return Batch(x=torch.stack(list(items)))
    if not all(isinstance(item, Mapping) and "x" in item for item in items):
        raise TypeError("collate: items must be tensors or mappings with an 'x' entry")
    x = torch.stack([item["x"] for item in items])
    labels = (
        torch.tensor([int(item["label"]) for item in items], dtype=torch.long)
        if all("label" in item for item in items)
        else None
    )
    captions = (
        [str(item["caption"]) for item in items]
        if all("caption" in item for item in items)
        else None
    )
    temporal = (
        torch.tensor([bool(item["temporal"]) for item in items], dtype=torch.bool)
        if all("temporal" in item for item in items)
        else None
    )
    return Batch(x=x, labels=labels, captions=captions, temporal=temporal)


def shard_batches(
    dataset_size: int,
    *,
    batch_size: int,
    epoch: int,
    seed: int,
    shard: int = 0,
    num_shards: int = 1,
    shuffle: bool = True,
) -> list[list[int]]:
    """The index batches shard ``shard`` of ``num_shards`` reads in ``epoch``.

    A ``DistributedSampler`` (with ``set_epoch``) shuffles and splits the epoch; shards
    get disjoint indices and the same number of full batches (the rest is dropped).
    """
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is not in [0, {num_shards})")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    per_shard = dataset_size // num_shards
    if per_shard < batch_size:
        raise ValueError(
            f"a dataset of {dataset_size} items split into {num_shards} shards has "
            f"{per_shard} per shard, fewer than one batch of {batch_size}"
        )
    sampler = DistributedSampler(
        range(dataset_size),  # type: ignore[arg-type]  # only its length is used
        num_replicas=num_shards,
        rank=shard,
        shuffle=shuffle,
        seed=seed,
        drop_last=True,
    )
    sampler.set_epoch(epoch)
    indices = list(sampler)
    steps = len(indices) // batch_size
    return [indices[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def _check_values(owner: str, x: Tensor, value_range: tuple[float, float]) -> None:
    """Refuse a bad ``value_range``, or data on another scale (more than a range-width off).

    Values a little outside the range (a sampler's overshoot) are clamped later; data far
    outside it (``[0, 255]`` pixels against the default ``[-1, 1]``) would only give a
    saturated picture, so it is refused. Whether data in ``[0, 1]`` meant ``[-1, 1]`` is not
    guessed: pass ``value_range=(0, 1)``.
    """
    low, high = value_range
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(
            f"{owner}: value_range must be two finite numbers (low, high) with low < high, "
            f"got {value_range}"
        )
    if x.numel() == 0:
        return
    seen_low, seen_high = (float(v) for v in torch.aminmax(x.detach().float()))
    width = high - low
    if seen_low < low - width or seen_high > high + width:
        raise ValueError(
            f"{owner}: values span [{seen_low:g}, {seen_high:g}], far outside "
            f"value_range=({low:g}, {high:g}); pass the data's own scale as value_range "
            "(e.g. (0, 1) or (0, 255)), or rescale it"
        )


def _to_uint8(x: Tensor, value_range: tuple[float, float]) -> np.ndarray:
    low, high = value_range
    scaled = ((x.detach().float().cpu().clamp(low, high) - low) * (255 / (high - low))).round()
    return scaled.to(torch.uint8).numpy()


def _tile(
    owner: str, images: Tensor, nrow: int, padding: int, value_range: tuple[float, float]
) -> np.ndarray:
    b, c = images.shape[:2]
    if c not in (1, 3):
        raise ShapeError(f"{owner}: images need 1 or 3 channels, got {c}")
    if nrow < 1:
        raise ValueError(f"{owner}: nrow must be >= 1, got {nrow}")
    if padding < 0:
        raise ValueError(f"{owner}: padding must be >= 0, got {padding}")
    background = value_range[0]
    ncol = min(nrow, b)
    rows = -(-b // ncol)
    pad = rows * ncol - b
    if pad:
        images = torch.cat([images, images.new_full((pad, *images.shape[1:]), background)])
    # each tile takes a border on its top and left; the grid then gets one bottom and right
    tiles = F.pad(images, (padding, 0, padding, 0), value=background)
    grid = rearrange(tiles, "(r k) c h w -> c (r h) (k w)", k=ncol)
    grid = F.pad(grid, (0, padding, 0, padding), value=background)
    array = _to_uint8(rearrange(grid, "c h w -> h w c"), value_range)
    return array[..., 0] if c == 1 else array


@checked
def grid_array(
    samples: Sample,
    nrow: int = 8,
    padding: int = 1,
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> np.ndarray:
    """Tile images ``(b, c, h, w)`` (``nrow`` per row) or videos ``(b, f, c, h, w)`` (one row
    per video, one column per frame) into one ``uint8`` array, ``(H, W)`` grey or ``(H, W, 3)``.

    ``value_range`` ``(low, high)`` maps to black and white (default ``[-1, 1]``, like
    torchvision's ``make_grid``; ints such as ``(0, 255)`` are fine). Values slightly outside
    it are clamped; values off by more than the range's width (data on another scale) are
    refused. Tiles are separated, and framed, by ``padding`` pixels of the background value
    ``low`` (black), so an ``r x k`` grid of ``h x w`` images is ``k (w + p) + p`` pixels wide
    and ``r (h + p) + p`` high. Channels must be 1 or 3.
    """
    return _tile_samples("grid_array", samples, nrow, padding, value_range)


def _tile_samples(
    owner: str, samples: Tensor, nrow: int, padding: int, value_range: tuple[float, float]
) -> np.ndarray:
    """``grid_array``, with ``owner`` naming the caller in its errors."""
    if samples.ndim not in (4, 5):
        raise ShapeError(f"{owner}: expected images or videos, got shape {tuple(samples.shape)}")
    _check_values(owner, samples, value_range)
    if samples.ndim == 4:
        return _tile(owner, samples, nrow, padding, value_range)
    flat = rearrange(samples, "b f c h w -> (b f) c h w")
    return _tile(owner, flat, samples.shape[1], padding, value_range)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def write_png(array: np.ndarray, path: str | Path) -> Path:
    """Write a ``uint8`` array ``(H, W)`` (grey) or ``(H, W, 3)`` (RGB) as a PNG file.

    The standard library's ``zlib`` does the compression: no imaging package is needed.
    """
    grey_or_rgb = array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)
    if array.dtype != np.uint8 or not grey_or_rgb:
        raise ValueError(
            f"write_png: need a uint8 array (H, W) or (H, W, 3), got {array.dtype} "
            f"{tuple(array.shape)}"
        )
    height, width = array.shape[:2]
    colour = 0 if array.ndim == 2 else 2  # PNG colour types: grey, RGB
    rows = np.ascontiguousarray(array).reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 per row
    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    target = Path(path)
    target.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(raw, 6))
        + _png_chunk(b"IEND", b"")
    )
    return target


@checked
def save_grid(
    samples: Sample,
    path: str | Path,
    nrow: int = 8,
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> Path:
    """Save images ``(b, c, h, w)`` or videos ``(b, f, c, h, w)`` as one picture (a grid).

    Values are in ``value_range`` (default ``[-1, 1]``), as in
    [`grid_array`][diffkit.data.grid_array]: a slight overshoot is clamped, data on
    another scale refused. A ``.png`` path is written with the standard library; any other
    extension (``.jpg``, ``.webp``, ...) needs Pillow (``pip install 'diffkit[demo]'``).
    """
    array = _tile_samples("save_grid", samples, nrow, 1, value_range)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix.lower() == ".png":
        return write_png(array, target)
    try:
        from PIL import Image as PILImage
    except ImportError:
        raise ImportError(
            f"save_grid: writing {target.suffix or 'a file without an extension'} needs Pillow "
            "(pip install 'diffkit[demo]' or pip install pillow); .png needs nothing"
        ) from None
    PILImage.fromarray(array).save(target)
    return target


ENTRY_POINT_GROUP = "diffkit.datasets"
"""Installed packages name the module that registers a dataset kind here, by kind."""


class DatasetRegistry(Registry[Dataset[Any]]):
    """A [`Registry`][diffkit.config.Registry] that finds a kind it does not know yet among
    the installed ``diffkit.datasets`` entry points (``kind = "module"``) and imports that
    module, which registers it. So a run config may name a dataset of another installed
    package (``data: {kind: digits}``, from ``diffkit[demo]``) without importing it first.
    """

    def config_class(self, kind: str) -> type[Config]:
        """The config class registered for ``kind``, imported from its entry point if need be."""
        if kind not in self.kinds:
            for entry in entry_points(group=ENTRY_POINT_GROUP, name=kind):
                entry.load()
        return super().config_class(kind)


DATASETS: Registry[Dataset[Any]] = DatasetRegistry("dataset")
"""Datasets by config ``kind``. The demo's ``"digits"`` and ``"moving_digits"``
(``diffkit_demo.datasets``) are found through their entry points; register your own with
``DATASETS.register(MyConfig, builder)``."""
