"""diffkit.data: deterministic shard batching, collation, sample grids and the PNG writer."""

import subprocess
import sys
import zlib
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from diffkit.data import (
    DATASETS,
    ENTRY_POINT_GROUP,
    collate,
    grid_array,
    save_grid,
    shard_batches,
    write_png,
)
from diffkit.typing import ShapeError


@given(
    size=st.integers(20, 200),
    batch=st.integers(1, 6),
    shards=st.integers(1, 4),
    epoch=st.integers(0, 3),
)
def test_shards_are_disjoint_equal_sized_and_deterministic(
    size: int, batch: int, shards: int, epoch: int
) -> None:
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


def test_epochs_reshuffle_and_seeds_differ() -> None:
    def first(epoch: int, seed: int) -> list[int]:
        return shard_batches(100, batch_size=10, epoch=epoch, seed=seed)[0]

    assert first(0, 0) != first(1, 0)
    assert first(0, 0) != first(0, 1)
    assert first(2, 5) == first(2, 5)


def test_collate_stacks_items_labels_and_captions() -> None:
    items = [
        {"x": torch.full((1, 2, 2), float(i)), "label": i, "caption": f"c{i}"} for i in range(5)
    ]
    batch = collate(items)
    assert batch.x.shape == (5, 1, 2, 2) and len(batch) == 5
    assert batch.labels is not None and batch.labels.tolist() == [0, 1, 2, 3, 4]
    assert batch.captions == ["c0", "c1", "c2", "c3", "c4"]
    bare = collate([torch.zeros(3), torch.ones(3)])
    assert bare.x.shape == (2, 3) and bare.labels is None and bare.captions is None
    with pytest.raises(TypeError):
        collate([{"y": 1}])


def test_a_bad_batch_size_is_refused() -> None:
    for batch_size in (0, -2, 2.5):
        with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
            shard_batches(10, batch_size=batch_size, epoch=0, seed=0)  # type: ignore[arg-type]


def _read_png(data: bytes) -> np.ndarray:
    """Decode the PNGs write_png makes (8-bit grey or RGB, filter 0), with zlib alone."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        crc = int.from_bytes(data[pos + 8 + length : pos + 12 + length], "big")
        assert crc == zlib.crc32(tag + body)
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + length
    width, height = (
        int.from_bytes(chunks[b"IHDR"][:4], "big"),
        int.from_bytes(chunks[b"IHDR"][4:8], "big"),
    )
    channels = {0: 1, 2: 3}[chunks[b"IHDR"][9]]
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), dtype=np.uint8)
    rows = raw.reshape(height, 1 + width * channels)
    assert (rows[:, 0] == 0).all()
    pixels = rows[:, 1:].reshape(height, width, channels)
    return pixels[..., 0] if channels == 1 else pixels


@pytest.mark.parametrize("shape", [(3, 5), (4, 2, 3)])
def test_write_png_round_trips_grey_and_rgb(tmp_path: Path, shape: tuple[int, ...]) -> None:
    array = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    path = write_png(array, tmp_path / "a.png")
    np.testing.assert_array_equal(_read_png(path.read_bytes()), array)
    pil = pytest.importorskip("PIL.Image")
    np.testing.assert_array_equal(np.asarray(pil.open(path)), array)
    with pytest.raises(ValueError, match="uint8"):
        write_png(array.astype(np.float32), tmp_path / "b.png")


def test_save_grid_writes_the_grid_array_as_png_without_pillow(tmp_path: Path) -> None:
    images = torch.linspace(-1, 1, 5 * 3 * 4 * 6).reshape(5, 3, 4, 6)
    path = save_grid(images, tmp_path / "g" / "i.png", nrow=2)
    np.testing.assert_array_equal(_read_png(path.read_bytes()), grid_array(images, 2))
    assert grid_array(images, nrow=2, padding=0).shape == (3 * 4, 2 * 6, 3)
    videos = torch.zeros(2, 7, 1, 4, 4)
    assert grid_array(videos).shape == (2 * 5 + 1, 7 * 5 + 1)
    path = save_grid(videos, tmp_path / "v.png")
    assert _read_png(path.read_bytes()).shape == (2 * 5 + 1, 7 * 5 + 1)
    with pytest.raises(ShapeError):
        grid_array(torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match="padding"):
        grid_array(images, padding=-1)


def test_grid_array_maps_the_given_value_range() -> None:
    unit = torch.tensor([0.0, 0.5, 1.0]).reshape(1, 1, 1, 3)
    assert grid_array(unit, padding=0, value_range=(0, 1)).tolist() == [[0, 128, 255]]
    assert grid_array(unit, padding=0).tolist() == [[128, 191, 255]]


def test_save_grid_clamps_an_overshoot_but_refuses_another_scale(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"values span \[0, 255\].*value_range=\(-1, 1\)"):
        save_grid(torch.linspace(0, 255, 16).reshape(1, 1, 4, 4), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
    for bad in [(1.0, 1.0), (1.0, 0.0), (0.0, float("inf")), (float("nan"), 1.0)]:
        with pytest.raises(ValueError, match="value_range must be two finite numbers"):
            save_grid(torch.zeros(1, 1, 2, 2), tmp_path / "y.png", value_range=bad)


PLUGIN = """
from typing import Literal

from diffkit.config import Config
from diffkit.data import DATASETS


class ToyConfig(Config):
    kind: Literal["toy_plugin_data"] = "toy_plugin_data"
    n: int = 3


DATASETS.register(ToyConfig, lambda c: list(range(c.n)))
"""


def test_a_dataset_kind_is_found_through_its_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import diffkit.data

    (tmp_path / "toy_plugin_module.py").write_text(PLUGIN, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    entry = EntryPoint("toy_plugin_data", "toy_plugin_module", ENTRY_POINT_GROUP)
    asked: list[dict[str, str]] = []

    def fake_entry_points(**select: str) -> list[EntryPoint]:
        asked.append(select)
        return [entry] if select.get("name") == entry.name else []

    monkeypatch.setattr(diffkit.data, "entry_points", fake_entry_points)
    assert DATASETS.build({"kind": "toy_plugin_data", "n": 2}) == [0, 1]
    assert asked == [{"group": ENTRY_POINT_GROUP, "name": "toy_plugin_data"}]
    with pytest.raises(ValueError, match="unknown dataset kind 'nothing'"):
        DATASETS.parse({"kind": "nothing"})


def test_an_installed_diffkit_finds_the_demo_datasets_in_a_fresh_process() -> None:
    if not any(e.name == "digits" for e in entry_points(group=ENTRY_POINT_GROUP)):
        pytest.skip("diffkit's entry points are not installed (pip install -e . again)")
    code = (
        "from diffkit.data import DATASETS; "
        "print(type(DATASETS.build({'kind': 'digits', 'size': 8})).__name__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "DigitsDataset"
