"""The demo's toy datasets: handwritten digits, still and moving, with captions.

Both datasets are built from scikit-learn's bundled handwritten digits (1797 images of
8x8 pixels, no download): [`DigitsDataset`][diffkit_demo.datasets.DigitsDataset] upscales them
to ``size x size`` images in ``[-1, 1]`` with a caption per image drawn from several
templates, and [`MovingDigitsDataset`][diffkit_demo.datasets.MovingDigitsDataset] slides a digit
across a larger canvas, bouncing off the borders, for ``frames`` frames, captioned with
the digit and its direction. Everything is a pure function of a seed.

Importing this module registers both in [`diffkit.data.DATASETS`][diffkit.data.DATASETS]
(kinds ``"digits"`` and ``"moving_digits"``), so a training run config can name them.
scikit-learn (the ``diffkit[demo]`` extra) provides the digits.
"""

import functools
from collections.abc import Sequence
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from pydantic import Field, model_validator
from torch import Tensor
from torch.utils.data import Dataset

from diffkit.config import SEED_MAX, Config, field_error
from diffkit.data import DATASETS
from diffkit.pipeline_config import MAX_DATA_ELEMENTS

__all__ = [
    "DIGIT_NAMES",
    "DIRECTIONS",
    "IMAGE_TEMPLATES",
    "MAX_SIDE",
    "MAX_VIDEOS",
    "VIDEO_TEMPLATES",
    "DigitsConfig",
    "DigitsDataset",
    "MovingDigitsConfig",
    "MovingDigitsDataset",
    "load_digits",
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


MAX_SIDE = 1024
"""The largest image (canvas) side of the digit datasets: the 1,797 digits are held in
memory at this size (7.5 GB of float32 at 1024)."""
MAX_VIDEOS = 2**20
"""The most videos a ``MovingDigitsConfig`` may ask for (each has a caption in memory)."""


class DigitsConfig(Config):
    """The still [`DigitsDataset`][diffkit_demo.datasets.DigitsDataset]."""

    kind: Literal["digits"] = "digits"
    size: int = Field(
        default=16,
        ge=8,
        le=MAX_SIDE,
        description="image side in pixels (8x8 digits upscaled; at most MAX_SIDE)",
    )
    seed: int = Field(
        default=0, ge=0, le=SEED_MAX, description="seeds the captions and the train/test split"
    )
    split: Split = Field(default="all", description="all digits, or a seeded train / test part")
    test_fraction: float = Field(default=0.1, gt=0, lt=1, description="share of the test split")


class MovingDigitsConfig(Config):
    """The video [`MovingDigitsDataset`][diffkit_demo.datasets.MovingDigitsDataset]."""

    kind: Literal["moving_digits"] = "moving_digits"
    num_videos: int = Field(
        default=512, ge=1, le=MAX_VIDEOS, description="number of videos (at most MAX_VIDEOS)"
    )
    frames: int = Field(default=8, ge=1, description="frames per video")
    size: int = Field(
        default=32, ge=8, le=MAX_SIDE, description="canvas side in pixels (at most MAX_SIDE)"
    )
    digit_size: int = Field(default=16, ge=8, description="digit side in pixels")
    max_speed: int = Field(default=3, ge=1, description="largest speed in pixels per frame")
    seed: int = Field(
        default=0, ge=0, le=SEED_MAX, description="seeds digits, paths, captions and the split"
    )
    split: Split = Field(
        default="all", description="which digits: all, or a seeded train / test part"
    )
    test_fraction: float = Field(default=0.1, gt=0, lt=1, description="share of the test split")

    @model_validator(mode="after")
    def _digit_fits(self) -> "MovingDigitsConfig":
        if self.digit_size > self.size:
            message = f"digit_size {self.digit_size} must not exceed the canvas size {self.size}"
            raise field_error("MovingDigitsConfig", "digit_size", message, self.digit_size)
        if self.frames * self.size**2 > MAX_DATA_ELEMENTS:
            message = (
                f"a video of {self.frames} frames of {self.size}x{self.size} pixels holds more "
                f"than diffkit.pipeline_config.MAX_DATA_ELEMENTS ({MAX_DATA_ELEMENTS:,}) numbers"
            )
            raise field_error("MovingDigitsConfig", "frames", message, self.frames)
        return self


DATASETS.register(DigitsConfig, lambda c: DigitsDataset(**c.model_dump(exclude={"kind"})))
DATASETS.register(
    MovingDigitsConfig, lambda c: MovingDigitsDataset(**c.model_dump(exclude={"kind"}))
)
