"""Digits datasets, deterministic shard batching, collation and sample grids."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from diffkit.data import (
    DIGIT_NAMES,
    DIRECTIONS,
    DigitsConfig,
    DigitsDataset,
    MovingDigitsConfig,
    MovingDigitsDataset,
    collate,
    image_grid,
    load_digits,
    save_grid,
    shard_batches,
    video_grid,
)
from diffkit.typing import ShapeError


@pytest.mark.parametrize("size", [16, 32])
def test_digits_are_upscaled_images_in_minus_one_one(size):
    ds = DigitsDataset(size)
    item = ds[0]
    assert len(ds) == 1797
    assert item["x"].shape == (1, size, size)
    assert ds.images.min() >= -1.0 and ds.images.max() <= 1.0
    assert ds.images.min() == -1.0 and ds.images.max() > 0.9  # the full range is used
    assert set(ds.labels.tolist()) == set(range(10))


def test_captions_name_the_digit_and_use_several_templates():
    ds = DigitsDataset(16, seed=3)
    for i in range(50):
        label = ds[i]["label"]
        caption = ds[i]["caption"]
        assert str(label) in caption or DIGIT_NAMES[label] in caption
    assert len({c.replace(str(d), "#") for c, d in zip(ds.captions, ds.labels.tolist())}) >= 3


def test_datasets_are_a_function_of_the_seed():
    a, b, c = DigitsDataset(16, seed=1), DigitsDataset(16, seed=1), DigitsDataset(16, seed=2)
    assert a.captions == b.captions and a.captions != c.captions
    v1, v2 = MovingDigitsDataset(8, seed=4), MovingDigitsDataset(8, seed=4)
    assert torch.equal(v1[3]["x"], v2[3]["x"]) and v1.captions == v2.captions


def test_train_and_test_splits_partition_the_digits():
    train, test = DigitsDataset(8, split="train"), DigitsDataset(8, split="test")
    assert len(train) + len(test) == 1797
    assert len(test) == round(1797 * 0.1)
    rows = {tuple(x.flatten().tolist()) for x in train.images}
    overlap = sum(tuple(x.flatten().tolist()) in rows for x in test.images)
    assert overlap < 5  # only the few exact duplicate images of the raw data set


def test_moving_digit_frames_show_the_digit_at_its_bouncing_trajectory():
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


def test_first_step_goes_in_the_captioned_direction_away_from_borders():
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


@given(
    size=st.integers(20, 200),
    batch=st.integers(1, 6),
    shards=st.integers(1, 4),
    epoch=st.integers(0, 3),
)
def test_shards_are_disjoint_equal_sized_and_deterministic(size, batch, shards, epoch):
    if size // shards < batch:
        with pytest.raises(ValueError, match="fewer than one batch"):
            shard_batches(size, batch_size=batch, epoch=epoch, seed=0, num_shards=shards)
        return
    parts = [
        shard_batches(size, batch_size=batch, epoch=epoch, seed=0, shard=s, num_shards=shards)
        for s in range(shards)
    ]
    flat = [i for part in parts for b in part for i in b]
    assert len(flat) == len(set(flat))
    assert all(0 <= i < size for i in flat)
    assert len({len(p) for p in parts}) == 1
    assert all(len(b) == batch for p in parts for b in p)
    again = shard_batches(size, batch_size=batch, epoch=epoch, seed=0, shard=0, num_shards=shards)
    assert again == parts[0]


def test_epochs_reshuffle_and_seeds_differ():
    def first(epoch, seed):
        return shard_batches(100, batch_size=10, epoch=epoch, seed=seed)[0]

    assert first(0, 0) != first(1, 0)
    assert first(0, 0) != first(0, 1)
    assert first(2, 5) == first(2, 5)


def test_collate_stacks_items_labels_and_captions():
    ds = DigitsDataset(8)
    batch = collate([ds[i] for i in range(5)])
    assert batch.x.shape == (5, 1, 8, 8) and len(batch) == 5
    assert batch.labels is not None and batch.labels.tolist() == ds.labels[:5].tolist()
    assert batch.captions == ds.captions[:5]
    bare = collate([torch.zeros(3), torch.ones(3)])
    assert bare.x.shape == (2, 3) and bare.labels is None and bare.captions is None
    with pytest.raises(TypeError):
        collate([{"y": 1}])


def test_grids_tile_images_and_videos(tmp_path):
    images = torch.linspace(-1, 1, 5 * 3 * 4 * 6).reshape(5, 3, 4, 6)
    grid = image_grid(images, nrow=2, padding=0)
    assert grid.size == (2 * 6, 3 * 4) and grid.mode == "RGB"
    padded = np.asarray(image_grid(images, nrow=2, padding=2))
    assert padded.shape == (3 * (4 + 2) + 2, 2 * (6 + 2) + 2, 3)
    # image 3 is row 1, column 1: its tile starts after two borders on each axis
    tile = padded[2 + 6 : 2 + 6 + 4, 2 + 8 : 2 + 8 + 6]
    expected = ((images[3].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    np.testing.assert_array_equal(tile, expected.permute(1, 2, 0).numpy())
    assert (padded[:2] == 0).all() and (padded[:, 8:10] == 0).all()  # borders are black
    videos = torch.zeros(2, 7, 1, 4, 4)
    assert video_grid(videos).size == (7 * 5 + 1, 2 * 5 + 1)
    with pytest.raises(ValueError, match="padding"):
        image_grid(images, padding=-1)
    path = save_grid(videos, tmp_path / "g" / "v.png")
    assert path.is_file()
    with pytest.raises(ShapeError):
        image_grid(torch.zeros(2, 2, 4, 4))


@pytest.mark.parametrize("config", [DigitsConfig, MovingDigitsConfig])
def test_data_seeds_fit_torch_generators(config: type) -> None:
    config(seed=2**63 - 1)
    with pytest.raises(ValidationError, match="seed"):
        config(seed=2**63)  # torch.Generator.manual_seed would overflow later


def test_a_misspelled_split_and_a_bad_batch_size_are_refused() -> None:
    for split in ("val", "TEST"):
        with pytest.raises(ValueError, match="split must be one of"):
            DigitsDataset(8, split=split)  # type: ignore[arg-type]
    for batch_size in (0, -2, 2.5):
        with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
            shard_batches(10, batch_size=batch_size, epoch=0, seed=0)  # type: ignore[arg-type]


def test_grids_map_the_given_value_range(tmp_path):
    unit = torch.tensor([0.0, 0.5, 1.0]).reshape(1, 1, 1, 3)
    # [0, 1] images: black to white, not the default [-1, 1]'s grey to white
    assert np.asarray(image_grid(unit, padding=0, value_range=(0, 1))).tolist() == [[0, 128, 255]]
    assert np.asarray(image_grid(unit, padding=0)).tolist() == [[128, 191, 255]]
    pixels = unit * 255
    assert np.asarray(image_grid(pixels, padding=0, value_range=(0, 255))).tolist() == [
        [0, 128, 255]
    ]
    # the border takes the range's low end (black)
    framed = np.asarray(image_grid(unit, padding=1, value_range=(0, 1)))
    assert framed[0].tolist() == [0] * 5
    videos = torch.rand(2, 3, 1, 4, 4)
    assert video_grid(videos, value_range=(0.0, 1.0)).size == (3 * 5 + 1, 2 * 5 + 1)
    path = save_grid(videos, tmp_path / "v.png", value_range=(0, 1))
    assert path.is_file()


def test_grids_clamp_an_overshoot_but_refuse_another_scale(tmp_path):
    overshoot = torch.tensor([-1.4, 0.0, 1.3]).reshape(1, 1, 1, 3)
    assert np.asarray(image_grid(overshoot, padding=0)).tolist() == [[0, 128, 255]]
    with pytest.raises(ValueError, match=r"values span \[0, 255\].*value_range=\(-1, 1\)"):
        save_grid(torch.linspace(0, 255, 16).reshape(1, 1, 4, 4), tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"values span \[-4, 0\].*value_range=\(-1, 1\)"):
        image_grid(torch.tensor([-4.0, 0.0]).reshape(1, 1, 1, 2))
    with pytest.raises(ValueError, match="value_range"):
        video_grid(torch.full((1, 2, 1, 2, 2), 3.5), value_range=(0, 1))
    assert not (tmp_path / "x.png").exists()
    for bad in [(1.0, 1.0), (1.0, 0.0), (0.0, float("inf")), (float("nan"), 1.0)]:
        with pytest.raises(ValueError, match="value_range must be two finite numbers"):
            save_grid(torch.zeros(1, 1, 2, 2), tmp_path / "y.png", value_range=bad)
