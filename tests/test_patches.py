"""Tests for diffkit.patches: exact round trips, divisibility errors, positional embeddings."""

import pytest
import torch
from einops import rearrange
from hypothesis import given
from hypothesis import strategies as st

import diffkit as dk
from diffkit.patches import (
    SpatialPatches,
    TubeletPatches,
    sincos_pos_embed_1d,
    sincos_pos_embed_2d,
    sincos_pos_embed_3d,
)
from diffkit.typing import ShapeError

AXES = ["frames", "height", "width"]


@given(
    batch=st.integers(1, 3),
    channels=st.integers(1, 4),
    p1=st.integers(1, 4),
    p2=st.integers(1, 4),
    h=st.integers(1, 4),
    w=st.integers(1, 4),
)
def test_spatial_unpatchify_inverts_patchify_exactly(batch, channels, p1, p2, h, w):
    patches = SpatialPatches((p1, p2))
    x = torch.randn(batch, channels, h * p1, w * p2)
    tokens = patches.patchify(x)
    assert tokens.shape == (batch, h * w, channels * p1 * p2)
    assert patches.grid(x.shape[1:]) == (h, w)
    assert torch.equal(patches.unpatchify(tokens, x.shape[1:]), x)


@given(
    batch=st.integers(1, 2),
    channels=st.integers(1, 3),
    pt=st.integers(1, 3),
    p1=st.integers(1, 3),
    p2=st.integers(1, 3),
    f=st.integers(1, 3),
    h=st.integers(1, 3),
    w=st.integers(1, 3),
)
def test_tubelet_unpatchify_inverts_patchify_exactly(batch, channels, pt, p1, p2, f, h, w):
    patches = TubeletPatches((pt, p1, p2))
    x = torch.randn(batch, f * pt, channels, h * p1, w * p2)
    tokens = patches.patchify(x)
    assert tokens.shape == (batch, f * h * w, channels * pt * p1 * p2)
    assert patches.grid(x.shape[1:]) == (f, h, w)
    assert torch.equal(patches.unpatchify(tokens, x.shape[1:]), x)


@given(p=st.integers(2, 5), k=st.integers(1, 4), r=st.integers(1, 4), dim=st.sampled_from([2, 3]))
def test_spatial_patchify_rejects_indivisible_size_naming_the_dimension(p, k, r, dim):
    r = r % p or 1
    size = [p * 2, p * 2]
    size[dim - 2] = p * k + r
    name = "height" if dim == 2 else "width"
    with pytest.raises(ShapeError, match=f"{name} {p * k + r} is not a multiple"):
        SpatialPatches(p).patchify(torch.zeros(1, 1, *size))


@given(p=st.integers(2, 4), r=st.integers(1, 3), axis=st.sampled_from(AXES))
def test_tubelet_patchify_rejects_indivisible_size_naming_the_dimension(p, r, axis):
    r = r % p or 1
    sizes = {"frames": 2 * p, "height": 2 * p, "width": 2 * p}
    sizes[axis] = p + r
    x = torch.zeros(1, sizes["frames"], 1, sizes["height"], sizes["width"])
    with pytest.raises(ShapeError, match=f"{axis} {p + r} is not a multiple"):
        TubeletPatches((p, p, p)).patchify(x)


def test_patchify_layout_is_the_documented_rearrange():
    x = torch.randn(2, 3, 8, 12)
    expected = rearrange(x, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=4, p2=2)
    assert torch.equal(SpatialPatches((4, 2)).patchify(x), expected)
    v = torch.randn(2, 4, 3, 8, 6)
    expected = rearrange(v, "b (f pt) c (h p1) (w p2) -> b (f h w) (c pt p1 p2)", pt=2, p1=4, p2=3)
    assert torch.equal(TubeletPatches((2, 4, 3)).patchify(v), expected)


def test_unpatchify_rejects_tokens_that_do_not_fit_the_shape():
    tokens = torch.zeros(1, 6, 12)
    with pytest.raises(ShapeError, match="do not fit"):
        SpatialPatches(2).unpatchify(tokens, (3, 4, 4))


def test_patchifiers_satisfy_the_protocol():
    assert isinstance(SpatialPatches(2), dk.Patchifier)
    assert isinstance(TubeletPatches((1, 2, 2)), dk.Patchifier)
    assert dk.patches.SpatialPatches is SpatialPatches


def test_bad_patch_sizes_are_rejected():
    with pytest.raises(ValueError):
        SpatialPatches(0)
    with pytest.raises(ValueError, match=r"TubeletPatches: .*\(frames, height, width\).*2 sizes"):
        TubeletPatches((1, 2))  # type: ignore[arg-type]


def test_non_integer_patch_sizes_are_refused_by_name():
    """(2.7, 2) was silently truncated to (2, 2) and True became 1."""
    for size, name in (((2.7, 2), "height"), ((2, 2.0), "width"), ((2, True), "width")):
        with pytest.raises(
            ValueError, match=rf"SpatialPatches: patch_size {name} must be a positive"
        ):
            SpatialPatches(size)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"SpatialPatches: .*one positive int, got True"):
        SpatialPatches(True)
    with pytest.raises(ValueError, match=r"TubeletPatches: patch_size frames .*got 1\.5"):
        TubeletPatches((1.5, 2, 2))  # type: ignore[arg-type]
    # integer types other than int are fine
    assert SpatialPatches(torch.tensor(3)).patch_size == (3, 3)  # type: ignore[arg-type]
    assert TubeletPatches([1, 2, 2]).patch_size == (1, 2, 2)  # type: ignore[arg-type]


def test_tubelet_patches_refuse_a_single_int_with_both_readings():
    """TubeletPatches(2) was a raw TypeError; an int is ambiguous (2x2x2, or 1x2x2 per frame)."""
    with pytest.raises(ValueError, match=r"got the int 2; pass \(2, 2, 2\).*\(1, 2, 2\)"):
        TubeletPatches(2)  # type: ignore[arg-type]


def test_sincos_2d_separates_rows_and_columns():
    emb = sincos_pos_embed_2d(3, 4, 16)
    assert emb.shape == (12, 16)
    grid = rearrange(emb, "(h w) d -> h w d", h=3)
    # first half depends on the row only, second half on the column only
    assert torch.equal(grid[:, 0, :8], grid[:, 3, :8])
    assert torch.equal(grid[0, :, 8:], grid[2, :, 8:])
    assert not torch.equal(grid[0, 0], grid[1, 0])
    # position 0 is sin(0)=0, cos(0)=1
    assert torch.equal(emb[0, :4], torch.zeros(4)) and torch.equal(emb[0, 4:8], torch.ones(4))
    # every position is distinct
    assert torch.cdist(emb, emb).add(torch.eye(12)).min() > 0


@given(f=st.integers(1, 4), h=st.integers(1, 4), w=st.integers(1, 4), dim=st.sampled_from([8, 24]))
def test_sincos_3d_positions_are_distinct_and_frame_major(f, h, w, dim):
    emb = sincos_pos_embed_3d(f, h, w, dim)
    assert emb.shape == (f * h * w, dim)
    n = f * h * w
    if n > 1:
        assert torch.cdist(emb, emb).add(torch.eye(n)).min() > 1e-4
    grid = rearrange(emb, "(f s) d -> f s d", f=f)
    # the spatial part is the same in every frame
    space = sincos_pos_embed_2d(h, w, grid.shape[-1] - (dim - (3 * dim // 4) // 4 * 4))
    assert torch.equal(grid[-1, :, -space.shape[-1] :], space)


def test_sincos_rejects_dims_that_do_not_split():
    with pytest.raises(ValueError):
        sincos_pos_embed_2d(2, 2, 6)
    with pytest.raises(ValueError):
        sincos_pos_embed_3d(2, 2, 2, 6)


@pytest.mark.parametrize("dim", [0, -2, 3])
def test_sincos_1d_needs_a_positive_even_dim(dim):
    # dim 0 used to give an empty (n, 0) embedding, a negative one a bare torch.arange error
    with pytest.raises(ValueError, match=f"dim must be a positive multiple of 2 .*got {dim}"):
        sincos_pos_embed_1d(torch.arange(3), dim)


@pytest.mark.parametrize("dim", [0, -4, 6])
def test_sincos_2d_needs_a_positive_multiple_of_4(dim):
    with pytest.raises(ValueError, match=f"dim must be a positive multiple of 4 .*got {dim}"):
        sincos_pos_embed_2d(2, 2, dim)


@pytest.mark.parametrize("dim", [-16, -4, 6])
def test_sincos_3d_refuses_negative_dims_by_name(dim):
    with pytest.raises(ValueError, match=f"sincos_pos_embed_3d: dim .*{dim}"):
        sincos_pos_embed_3d(2, 2, 2, dim)


def test_sincos_3d_rejects_dims_that_leave_a_part_empty():
    # dim 4 would give 0 spatial features: every token of a frame at the same position
    for dim in (0, 4):
        with pytest.raises(ValueError, match=f"dim {dim} leaves 0 features for the 2-D position"):
            sincos_pos_embed_3d(2, 3, 3, dim)
    emb = sincos_pos_embed_3d(1, 3, 3, 8)
    assert torch.unique(emb, dim=0).shape[0] == 9


def test_a_patchifier_is_its_config_and_round_trips() -> None:
    from diffkit.patches import PATCHIFIERS

    for patches in (SpatialPatches(3), TubeletPatches((1, 2, 4))):
        again = PATCHIFIERS.parse(patches.to_json())
        assert again == patches and PATCHIFIERS.build(patches) is patches
    assert SpatialPatches(3) == SpatialPatches(patch_size=(3, 3))
    assert PATCHIFIERS.build({"kind": "spatial_patches", "patch_size": 4}) == SpatialPatches(4)
    with pytest.raises(ValueError, match=r"TubeletPatches: .*got the int 2"):
        PATCHIFIERS.parse({"kind": "tubelet_patches", "patch_size": 2})
