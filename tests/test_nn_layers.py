"""Tests for the layers of diffkit.nn.layers (embeddings, resblocks, attention): shapes, masks."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import diffkit as dk
from diffkit.nn.layers import (
    Attention,
    Downsample,
    ResBlock,
    SpatialSelfAttention,
    SpatialTransformer,
    Upsample,
    network_timestep,
    timestep_embedding,
)
from diffkit.typing import CHECKS_ENABLED


def test_timestep_embedding_matches_the_ddpm_formula():
    steps = torch.tensor([0.0, 1.0, 37.5, 999.0])
    dim = 8
    emb = timestep_embedding(steps, dim, flip_sin_to_cos=False, freq_shift=1.0)
    half = dim // 2
    for row, s in zip(emb, steps.tolist(), strict=True):
        freqs = [math.exp(-math.log(10000) * k / (half - 1)) for k in range(half)]
        expected = [math.sin(s * f) for f in freqs] + [math.cos(s * f) for f in freqs]
        assert torch.allclose(row, torch.tensor(expected), atol=1e-4)
    flipped = timestep_embedding(steps, dim, flip_sin_to_cos=True, freq_shift=1.0)
    assert torch.equal(flipped, torch.cat([emb[:, half:], emb[:, :half]], dim=1))


def test_index_time_input_recovers_the_training_index_exactly():
    n = 1000
    index = torch.arange(n)
    for dtype in (torch.float32, torch.float64):
        t = ((index + 1) / n).to(dtype)
        steps = network_timestep(t, "index", n, 1000.0)
        assert torch.equal(steps, index.double())
    # between grid points it stays fractional
    mid = network_timestep(torch.tensor([0.0105]), "index", n, 1000.0)
    assert mid.item() == pytest.approx(9.5)
    assert torch.equal(
        network_timestep(torch.tensor([0.25]), "t", n, 1000.0), torch.tensor([250.0])
    )


@pytest.mark.parametrize("scale_shift", [False, True])
def test_resblock_maps_channels_and_uses_the_embedding(scale_shift):
    block = ResBlock(8, 16, 12, groups=4, scale_shift=scale_shift)
    torch.nn.init.normal_(block.conv2.weight)
    x = torch.randn(2, 8, 6, 6)
    a = block(x, torch.randn(2, 12))
    b = block(x, torch.randn(2, 12))
    assert a.shape == (2, 16, 6, 6)
    assert not torch.allclose(a, b)


def test_group_norm_error_names_the_layer_and_the_numbers():
    with pytest.raises(ValueError, match="12 channels are not divisible into 8 groups"):
        ResBlock(12, 12, None, groups=8)


def test_cross_attention_ignores_masked_tokens():
    attn = Attention(16, 2, context_dim=8)
    x = torch.randn(2, 5, 16)
    context = torch.randn(2, 4, 8)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    out = attn(x, context, mask)
    changed = context.clone()
    changed[0, 2:] = torch.randn(2, 8) * 10
    assert torch.allclose(attn(x, changed, mask)[0], out[0], atol=1e-6)
    # the same as attending to the real tokens only
    assert torch.allclose(attn(x[:1], context[:1, :2]), out[:1], atol=1e-6)


def test_cross_attention_with_every_token_masked_is_finite():
    attn = Attention(16, 2, context_dim=8)
    mask = torch.zeros(1, 3, dtype=torch.bool)
    out = attn(torch.randn(1, 4, 16), torch.randn(1, 3, 8), mask)
    assert torch.isfinite(out).all()


def test_cross_attention_without_context_says_so():
    with pytest.raises(ValueError, match="needs a context"):
        Attention(16, 2, context_dim=8)(torch.randn(1, 4, 16))


def test_spatial_attention_layers_keep_shape_and_are_residual():
    x = torch.randn(2, 16, 4, 4)
    self_attn = SpatialSelfAttention(16, 8, groups=4)
    torch.nn.init.zeros_(self_attn.out.weight)
    torch.nn.init.zeros_(self_attn.out.bias)
    assert torch.equal(self_attn(x), x)
    block = SpatialTransformer(16, 2, 8, context_dim=6, groups=4)
    assert block(x, torch.randn(2, 3, 6)).shape == x.shape


@pytest.mark.skipif(not CHECKS_ENABLED, reason="shape checks are off")
def test_building_blocks_check_shapes_when_called_on_their_own():
    # Inside a model they run unchecked (checked_layer); called directly they still check.
    block = ResBlock(8, 16, 12, groups=4)
    with pytest.raises(dk.ShapeError, match=r"ResBlock.forward: argument 'emb'"):
        block(torch.randn(2, 8, 4, 4), torch.randn(3, 12))
    with pytest.raises(dk.ShapeError, match=r"argument 'x' has 3 dimensions"):
        SpatialSelfAttention(16, 8, groups=4)(torch.randn(2, 16, 16))
    with pytest.raises(dk.ShapeError, match=r"argument 'x' has 4 dimensions"):
        Attention(16, 2)(torch.randn(2, 16, 4, 4))
    with pytest.raises(dk.ShapeError, match=r"argument 'x' has 3 dimensions"):
        Downsample(8)(torch.randn(8, 4, 4))


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 3),
    c_in=st.integers(1, 5),
    h=st.integers(1, 7),
    w=st.integers(1, 7),
    channels_last=st.booleans(),
)
def test_upsample_is_nearest_x2_then_the_3x3_convolution(
    n: int, c_in: int, h: int, w: int, channels_last: bool
) -> None:
    # Computed per output phase without the upsampled map; values and gradients must be
    # those of interpolate-then-convolve, and the output keeps the input's memory format.
    torch.manual_seed(n * 100 + c_in * 10 + h + w)
    up = Upsample(c_in).double()
    x = torch.randn(n, c_in, h, w, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    ours = up(x)
    reference = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    assert ours.shape == (n, c_in, 2 * h, 2 * w)
    if channels_last and c_in > 1 and h * w > 1:
        assert ours.is_contiguous(memory_format=torch.channels_last)
    else:
        assert ours.is_contiguous() or ours.is_contiguous(memory_format=torch.channels_last)
    probe = torch.randn_like(reference)
    grads = torch.autograd.grad((ours * probe).sum(), (x, up.conv.weight, up.conv.bias))
    expected = torch.autograd.grad((reference * probe).sum(), (x, up.conv.weight, up.conv.bias))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_upsample_state_dict_is_the_convolution_only() -> None:
    # The phase taps are a constant, not a weight: checkpoints and diffusers interop see
    # only conv.weight / conv.bias.
    assert sorted(Upsample(4).state_dict()) == ["conv.bias", "conv.weight"]
