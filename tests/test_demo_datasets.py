"""diffkit_demo.datasets: the captioned digits, still and moving, and their configs."""

import itertools

import pytest
import torch
from pydantic import ValidationError

from diffkit.data import DATASETS
from diffkit_demo.datasets import (
    DIGIT_NAMES,
    DIRECTIONS,
    DigitsConfig,
    DigitsDataset,
    MovingDigitsConfig,
    MovingDigitsDataset,
    load_digits,
)


@pytest.mark.parametrize("size", [16, 32])
def test_digits_are_upscaled_images_in_minus_one_one(size: int) -> None:
    ds = DigitsDataset(size)
    item = ds[0]
    assert len(ds) == 1797
    assert item["x"].shape == (1, size, size)
    assert ds.images.min() >= -1.0 and ds.images.max() <= 1.0
    assert ds.images.min() == -1.0 and ds.images.max() > 0.9  # the full range is used
    assert set(ds.labels.tolist()) == set(range(10))


def test_captions_name_the_digit_and_use_several_templates() -> None:
    ds = DigitsDataset(16, seed=3)
    for i in range(50):
        label = ds[i]["label"]
        caption = ds[i]["caption"]
        assert str(label) in caption or DIGIT_NAMES[label] in caption
    assert len({c.replace(str(d), "#") for c, d in zip(ds.captions, ds.labels.tolist())}) >= 3


def test_datasets_are_a_function_of_the_seed() -> None:
    a, b, c = DigitsDataset(16, seed=1), DigitsDataset(16, seed=1), DigitsDataset(16, seed=2)
    assert a.captions == b.captions and a.captions != c.captions
    v1, v2 = MovingDigitsDataset(8, seed=4), MovingDigitsDataset(8, seed=4)
    assert torch.equal(v1[3]["x"], v2[3]["x"]) and v1.captions == v2.captions


def test_train_and_test_splits_partition_the_digits() -> None:
    train, test = DigitsDataset(8, split="train"), DigitsDataset(8, split="test")
    assert len(train) + len(test) == 1797
    assert len(test) == round(1797 * 0.1)
    rows = {tuple(x.flatten().tolist()) for x in train.images}
    overlap = sum(tuple(x.flatten().tolist()) in rows for x in test.images)
    assert overlap < 5  # only the few exact duplicate images of the raw data set


def test_moving_digit_frames_show_the_digit_at_its_bouncing_trajectory() -> None:
    ds = MovingDigitsDataset(24, frames=10, size=24, digit_size=12, max_speed=4, seed=0)
    images, _ = load_digits(12)
    span = 24 - 12
    for i in range(len(ds)):
        item = ds[i]
        video = item["x"]
        assert video.shape == (10, 1, 24, 24)
        assert item["direction"] in item["caption"]
        path = ds.trajectory(i)
        dr, dc = DIRECTIONS[item["direction"]]
        speed = int(ds.speed[i])
        for (r0, c0), (r1, c1) in itertools.pairwise(path):
            assert 0 <= r1 <= span and 0 <= c1 <= span
            # each axis travels `speed` pixels: straight, or reflected off one border
            for a, b, d in ((r0, r1, dr), (c0, c1, dc)):
                travelled = {abs(b - a), a + b, 2 * span - a - b}
                assert abs(d) * speed in travelled
        r, c = path[0]
        digit = images[int(ds.source[i])]
        assert torch.equal(video[0, :, r : r + 12, c : c + 12], digit)
        outside = video[0].clone()
        outside[:, r : r + 12, c : c + 12] = -1.0
        assert bool((outside == -1.0).all())
    moved = [ds.trajectory(i)[1] != ds.trajectory(i)[0] for i in range(len(ds))]
    assert all(moved)


def test_first_step_goes_in_the_captioned_direction_away_from_borders() -> None:
    ds = MovingDigitsDataset(64, size=32, digit_size=8, max_speed=2, seed=1)
    checked = 0
    for i in range(len(ds)):
        (r0, c0), (r1, c1) = ds.trajectory(i)[:2]
        dr, dc = DIRECTIONS[ds[i]["direction"]]
        if 2 <= r0 <= 22 and 2 <= c0 <= 22:
            assert (r1 - r0) * dr >= 0 and (c1 - c0) * dc >= 0
            assert (r1 != r0) == (dr != 0) and (c1 != c0) == (dc != 0)
            checked += 1
    assert checked > 20


def test_importing_the_datasets_registers_them_for_training_configs() -> None:
    assert isinstance(DATASETS.build({"kind": "digits", "size": 8}), DigitsDataset)
    moving = DATASETS.build({"kind": "moving_digits", "num_videos": 2})
    assert isinstance(moving, MovingDigitsDataset) and len(moving) == 2


@pytest.mark.parametrize("config", [DigitsConfig, MovingDigitsConfig])
def test_data_seeds_fit_torch_generators(config: type) -> None:
    config(seed=2**63 - 1)
    with pytest.raises(ValidationError, match="seed"):
        config(seed=2**63)  # torch.Generator.manual_seed would overflow later


def test_a_misspelled_split_is_refused() -> None:
    for split in ("val", "TEST"):
        with pytest.raises(ValueError, match="split must be one of"):
            DigitsDataset(8, split=split)  # type: ignore[arg-type]
