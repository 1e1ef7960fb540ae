"""diffkit_demo.output: sample grids as Pillow images, and GIFs of clips."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from diffkit.data import save_grid
from diffkit.typing import ShapeError
from diffkit_demo.output import image_grid, save_gif, video_grid


def test_grids_tile_images_and_videos(tmp_path: Path) -> None:
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


def test_grids_map_the_given_value_range(tmp_path: Path) -> None:
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


def test_grids_clamp_an_overshoot_but_refuse_another_scale(tmp_path: Path) -> None:
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


def test_save_gif_animates_clips_side_by_side(tmp_path: Path) -> None:
    videos = torch.rand(2, 3, 1, 4, 4) * 2 - 1
    path = save_gif(videos, tmp_path / "a.gif", scale=2)
    with PILImage.open(path) as gif:
        assert getattr(gif, "n_frames", 1) == 3 and gif.size == (2 * 6 * 2, 6 * 2)
    with pytest.raises(ValueError, match="save_gif"):
        save_gif(torch.zeros(2, 3, 2, 4, 4), tmp_path / "b.gif")


def test_save_grid_writes_other_formats_through_pillow(tmp_path: Path) -> None:
    images = torch.zeros(2, 1, 4, 4)
    path = save_grid(images, tmp_path / "g.bmp")
    assert PILImage.open(path).size == (2 * 5 + 1, 5 + 1)
