"""Small real datasets for examples and tests, deterministic batching, and sample grids.

Both datasets are built from scikit-learn's bundled handwritten digits (1797 images of
8x8 pixels, no download): [`DigitsDataset`][diffkit.data.DigitsDataset] upscales them
to ``size x size`` images in ``[-1, 1]`` with a caption per image drawn from several
templates, and [`MovingDigitsDataset`][diffkit.data.MovingDigitsDataset] slides a digit
across a larger canvas, bouncing off the borders, for ``frames`` frames, captioned with
the digit and its direction. Everything is a pure function of a seed.

Batches are cut with [`shard_batches`][diffkit.data.shard_batches]: a
``torch.utils.data.DistributedSampler`` shuffles each epoch (``set_epoch``) and hands
every shard (one per process, or per gradient-accumulation micro-batch) its own
disjoint part of the epoch, so the data a run sees depends only on the seed.
"""

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float, Int
from PIL import Image as PILImage
from pydantic import Field
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

from diffkit.config import SEED_MAX, Config, Registry
from diffkit.typing import Sample, ShapeError, checked

__all__ = [
    "DATASETS",
    "DIGIT_NAMES",
    "IMAGE_TEMPLATES",
    "VIDEO_TEMPLATES",
    "Batch",
    "DigitsConfig",
    "DigitsDataset",
    "MovingDigitsConfig",
    "MovingDigitsDataset",
    "collate",
    "image_grid",
    "load_digits",
    "save_grid",
    "shard_batches",
    "video_grid",
]

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE_TEMPLATES = (
    "a handwritten digit {name}",
    "the number {digit}",
    "a picture of the digit {digit}",
    "a small grey {name} written by hand",
    "handwritten {digit}",
)
"""Caption templates for still digits (``{digit}`` is ``"3"``, ``{name}`` is ``"three"``)."""
VIDEO_TEMPLATES = (
    "the digit {digit} moving {direction}",
    "a handwritten {name} sliding {direction}",
    "{name} drifting {direction}",
)
"""Caption templates for moving digits; ``{direction}`` is the initial direction."""
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (0, -1),
    "right": (0, 1),
    "up": (-1, 0),
    "down": (1, 0),
    "up and left": (-1, -1),
    "up and right": (-1, 1),
    "down and left": (1, -1),
    "down and right": (1, 1),
}
"""Direction name -> (row step, column step); rows grow downwards."""

Split = Literal["all", "train", "test"]


@functools.cache
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as sk_load_digits

    bunch: Any = sk_load_digits()
    return np.asarray(bunch.images, dtype=np.float32), np.asarray(bunch.target, dtype=np.int64)


@functools.cache
def _digits_at(size: int) -> tuple[Tensor, Tensor]:
    images, labels = _raw_digits()
    x = torch.from_numpy(images)[:, None] / 8.0 - 1.0  # pixel values 0..16 -> [-1, 1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(-1.0, 1.0).contiguous(), torch.from_numpy(labels)


def load_digits(size: int = 16) -> tuple[Float[Tensor, "n 1 size size"], Int[Tensor, " n"]]:
    """All 1797 scikit-learn digits as ``(n, 1, size, size)`` images in ``[-1, 1]`` and labels."""
    if size < 8:
        raise ValueError(f"size must be at least 8 (the digits are 8x8), got {size}")
    x, y = _digits_at(size)
    return x.clone(), y.clone()


def _split_indices(n: int, split: Split, test_fraction: float, seed: int) -> Tensor:
    if split not in get_args(Split):
        raise ValueError(f"split must be one of {get_args(Split)}, got {split!r}")
    if split == "all":
        return torch.arange(n)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, round(n * test_fraction))
    return order[:n_test].sort().values if split == "test" else order[n_test:].sort().values


class DigitsDataset(Dataset[dict[str, Any]]):
    """Handwritten digits as ``(1, size, size)`` images in ``[-1, 1]`` with captions.

    Items are ``{"x": image, "label": digit, "caption": text}``; each image's caption
    template is fixed by ``seed``. ``split`` picks a seeded train/test partition.
    """

    def __init__(
        self,
        size: int = 16,
        *,
        seed: int = 0,
        split: Split = "all",
        test_fraction: float = 0.1,
        templates: Sequence[str] = IMAGE_TEMPLATES,
    ) -> None:
        images, labels = load_digits(size)
        keep = _split_indices(len(labels), split, test_fraction, seed)
        self.images = images[keep]
        self.labels = labels[keep]
        self.size = size
        self.templates = tuple(templates)
        gen = torch.Generator().manual_seed(seed + 1)
        choice = torch.randint(len(self.templates), (len(keep),), generator=gen)
        self.captions = [
            self.templates[int(c)].format(digit=int(d), name=DIGIT_NAMES[int(d)])
            for c, d in zip(choice, self.labels, strict=True)
        ]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "x": self.images[index],
            "label": int(self.labels[index]),
            "caption": self.captions[index],
        }


def _bounce(start: int, velocity: int, steps: int, span: int) -> list[int]:
    """Positions ``start + k * velocity`` reflected into ``[0, span]`` (a triangle wave)."""
    if span == 0:
        return [0] * steps
    period = 2 * span
    out = []
    for k in range(steps):
        p = (start + k * velocity) % period
        out.append(p if p <= span else period - p)
    return out


class MovingDigitsDataset(Dataset[dict[str, Any]]):
    """Videos ``(frames, 1, size, size)`` in ``[-1, 1]`` of a digit sliding over a canvas.

    The digit (upscaled to ``digit_size``) starts at a random place and moves
    ``speed`` pixels a frame in one of eight directions, bouncing off the borders.
    Items are ``{"x": video, "label": digit, "caption": "the digit 3 moving left", ...}``.
    """

    def __init__(
        self,
        num_videos: int = 512,
        *,
        frames: int = 8,
        size: int = 32,
        digit_size: int = 16,
        max_speed: int = 3,
        seed: int = 0,
        split: Split = "all",
        test_fraction: float = 0.1,
        directions: Sequence[str] = tuple(DIRECTIONS),
        templates: Sequence[str] = VIDEO_TEMPLATES,
    ) -> None:
        if digit_size > size:
            raise ValueError(f"digit_size {digit_size} must not exceed the canvas size {size}")
        if frames < 1 or num_videos < 1 or max_speed < 1:
            raise ValueError("frames, num_videos and max_speed must be positive")
        unknown = [d for d in directions if d not in DIRECTIONS]
        if unknown:
            raise ValueError(f"unknown directions {unknown}; known: {list(DIRECTIONS)}")
        self.digits, digit_labels = load_digits(digit_size)
        pool = _split_indices(len(digit_labels), split, test_fraction, seed)
        self.frames, self.size, self.digit_size = frames, size, digit_size
        self.directions = tuple(directions)
        self.templates = tuple(templates)
        gen = torch.Generator().manual_seed(seed + 2)
        span = size - digit_size
        self.source = pool[torch.randint(len(pool), (num_videos,), generator=gen)]
        self.start = torch.randint(span + 1, (num_videos, 2), generator=gen)
        self.direction = torch.randint(len(self.directions), (num_videos,), generator=gen)
        self.speed = torch.randint(1, max_speed + 1, (num_videos,), generator=gen)
        template = torch.randint(len(self.templates), (num_videos,), generator=gen)
        self.labels = digit_labels[self.source]
        self.captions = [
            self.templates[int(t)].format(
                digit=int(d), name=DIGIT_NAMES[int(d)], direction=self.directions[int(k)]
            )
            for t, d, k in zip(template, self.labels, self.direction, strict=True)
        ]

    def __len__(self) -> int:
        return len(self.labels)

    def trajectory(self, index: int) -> list[tuple[int, int]]:
        """The digit's top-left corner ``(row, column)`` in every frame."""
        dr, dc = DIRECTIONS[self.directions[int(self.direction[index])]]
        speed = int(self.speed[index])
        span = self.size - self.digit_size
        r0, c0 = (int(v) for v in self.start[index])
        rows = _bounce(r0, dr * speed, self.frames, span)
        cols = _bounce(c0, dc * speed, self.frames, span)
        return list(zip(rows, cols, strict=True))

    def __getitem__(self, index: int) -> dict[str, Any]:
        digit = self.digits[int(self.source[index])]
        video = torch.full((self.frames, 1, self.size, self.size), -1.0)
        d = self.digit_size
        for f, (r, c) in enumerate(self.trajectory(index)):
            video[f, :, r : r + d, c : c + d] = digit
        return {
            "x": video,
            "label": int(self.labels[index]),
            "caption": self.captions[index],
            "direction": self.directions[int(self.direction[index])],
        }


@dataclasses.dataclass(frozen=True)
class Batch:
    """A collated batch: data ``x`` ``(batch, ...)``, optional labels and captions."""

    x: Tensor
    labels: Tensor | None = None
    captions: list[str] | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])


def collate(items: Sequence[Any]) -> Batch:
    """Stack dataset items (``{"x", "label"?, "caption"?}`` mappings, or bare tensors)."""
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
    return Batch(x=x, labels=labels, captions=captions)


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


def _grid(
    images: Tensor, nrow: int, padding: int, value_range: tuple[float, float]
) -> PILImage.Image:
    b, c = images.shape[:2]
    if c not in (1, 3):
        raise ShapeError(f"image_grid: images need 1 or 3 channels, got {c}")
    if nrow < 1:
        raise ValueError(f"image_grid: nrow must be >= 1, got {nrow}")
    if padding < 0:
        raise ValueError(f"image_grid: padding must be >= 0, got {padding}")
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
    return PILImage.fromarray(array[..., 0] if c == 1 else array)


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
    _check_values("image_grid", images, value_range)
    return _grid(images, nrow, padding, value_range)


@checked
def video_grid(
    videos: Float[Tensor, "batch frames channels height width"],
    padding: int = 1,
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> PILImage.Image:
    """One row per video, one column per frame, values in ``value_range`` (as ``image_grid``)."""
    _check_values("video_grid", videos, value_range)
    frames = videos.shape[1]
    flat = rearrange(videos, "b f c h w -> (b f) c h w")
    return _grid(flat, frames, padding, value_range)


@checked
def save_grid(
    samples: Sample,
    path: str | Path,
    nrow: int = 8,
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> Path:
    """Save images ``(b, c, h, w)`` or videos ``(b, f, c, h, w)`` as a PNG grid.

    Values are in ``value_range`` (default ``[-1, 1]``), as in
    [`image_grid`][diffkit.data.image_grid]: a slight overshoot is clamped, data on
    another scale refused.
    """
    if samples.ndim not in (4, 5):
        raise ShapeError(f"save_grid: expected images or videos, got shape {tuple(samples.shape)}")
    _check_values("save_grid", samples, value_range)
    if samples.ndim == 4:
        picture = _grid(samples, nrow, 1, value_range)
    else:  # one row per video, as video_grid
        flat = rearrange(samples, "b f c h w -> (b f) c h w")
        picture = _grid(flat, samples.shape[1], 1, value_range)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    picture.save(target)
    return target


class DigitsConfig(Config):
    """The still [`DigitsDataset`][diffkit.data.DigitsDataset]."""

    kind: Literal["digits"] = "digits"
    size: int = Field(default=16, ge=8, description="image side in pixels (8x8 digits upscaled)")
    seed: int = Field(
        default=0, ge=0, le=SEED_MAX, description="seeds the captions and the train/test split"
    )
    split: Split = Field(default="all", description="all digits, or a seeded train / test part")
    test_fraction: float = Field(default=0.1, gt=0, lt=1, description="share of the test split")


class MovingDigitsConfig(Config):
    """The video [`MovingDigitsDataset`][diffkit.data.MovingDigitsDataset]."""

    kind: Literal["moving_digits"] = "moving_digits"
    num_videos: int = Field(default=512, ge=1, description="number of videos")
    frames: int = Field(default=8, ge=1, description="frames per video")
    size: int = Field(default=32, ge=8, description="canvas side in pixels")
    digit_size: int = Field(default=16, ge=8, description="digit side in pixels")
    max_speed: int = Field(default=3, ge=1, description="largest speed in pixels per frame")
    seed: int = Field(
        default=0, ge=0, le=SEED_MAX, description="seeds digits, paths, captions and the split"
    )
    split: Split = Field(
        default="all", description="which digits: all, or a seeded train / test part"
    )
    test_fraction: float = Field(default=0.1, gt=0, lt=1, description="share of the test split")


DATASETS: Registry[Dataset[Any]] = Registry("dataset")
"""Datasets by config ``kind`` (``"digits"``, ``"moving_digits"``)."""
DATASETS.register(DigitsConfig, lambda c: DigitsDataset(**c.model_dump(exclude={"kind"})))
DATASETS.register(
    MovingDigitsConfig, lambda c: MovingDigitsDataset(**c.model_dump(exclude={"kind"}))
)
