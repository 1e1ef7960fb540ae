"""Parity of diffusers' Latte transformer (``LatteTransformer3DModel``) with its diffkit
conversion, a [`VideoDiT`][diffkit.nn.video.VideoDiT] of alternating spatial and temporal
PixArt blocks.

Tiny randomly initialised diffusers models, no downloads: ``from_diffusers`` gives the same
outputs for random videos, timesteps and captions; ``to_diffusers`` loads strict and round
trips are exact; the published Latte-1 config maps every tensor on the meta device.
"""

from typing import Any

import pytest
import torch

import diffkit as dk
from diffkit.nn.video import VideoDiT, VideoDiTConfig
from diffkit.protocols import Conditioning

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5

_LATTE_TINY = {
    "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8,
    "num_layers": 2, "cross_attention_dim": 16, "attention_bias": True, "sample_size": 8,
    "patch_size": 2, "activation_fn": "gelu-approximate", "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False, "norm_eps": 1e-6, "caption_channels": 12,
    "video_length": 3,
}  # fmt: skip


def _latte(**overrides: Any) -> Any:
    model = diffusers.LatteTransformer3DModel(**(_LATTE_TINY | overrides))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random non-zero weights everywhere (the zero-started ones too)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return model.eval()


def _run_both(ref: Any, model: Any, size: tuple[int, int], dtype: torch.dtype):
    frames = ref.config.video_length
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, ref.config.in_channels, frames, *size, generator=g, dtype=dtype)
    steps = torch.randint(0, 1000, (2,), generator=g)
    text = torch.randn(2, 5, ref.config.caption_channels, generator=g, dtype=dtype)
    with torch.no_grad():
        want = ref(x, steps, text, return_dict=False)[0]
        t = (steps.to(dtype) + 1) / 1000  # Discrete.t_from_index
        got = model(x.transpose(1, 2), t, Conditioning(tokens=text)).transpose(1, 2)
    return got, want[:, : got.shape[1]]  # learned sigma: the variance half is not predicted


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("options", "size"),
    [
        ({}, (8, 8)),
        ({"out_channels": 4, "video_length": 4, "num_layers": 1}, (8, 12)),
        ({"sample_size": 128, "video_length": 2}, (8, 8)),  # scaled, interpolated positions
    ],
)
def test_latte_matches_diffusers(
    options: dict[str, Any], size: tuple[int, int], dtype: torch.dtype
) -> None:
    ref = torch.nn.Module.to(_latte(**options), dtype=dtype)  # diffusers.to warns needlessly
    model = dk.interop.from_diffusers(ref)
    assert isinstance(model, VideoDiT) and model.config.attention == "alternating"
    got, want = _run_both(ref, model, size, dtype)
    err = (got - want).abs().max().item()
    tol = TOL if dtype == torch.float32 else 1e-10
    assert err <= tol * max(1.0, want.abs().max().item()), err


def test_a_single_frame_gets_no_temporal_positions_as_in_diffusers() -> None:
    ref = _latte(video_length=1)
    model = dk.interop.from_diffusers(ref)
    got, want = _run_both(ref, model, (8, 8), torch.float32)
    assert (got - want).abs().max().item() <= TOL * max(1.0, want.abs().max().item())


def test_latte_round_trip_is_exact_and_loads_strict() -> None:
    ref = _latte()
    model = dk.interop.from_diffusers(ref, prediction="v")
    back = dk.interop.to_diffusers(model)  # load_state_dict(strict=True) inside
    assert type(back) is type(ref)
    want, got = ref.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    again = dk.interop.from_diffusers(back)
    assert isinstance(again, VideoDiT) and isinstance(model, VideoDiT)
    assert again.config == model.config and again.prediction == "v"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("norm_type", "ada_norm_zero"),
        ("activation_fn", "geglu"),
        ("attention_bias", False),
        ("norm_elementwise_affine", True),
        ("cross_attention_dim", 8),
        ("caption_channels", None),
    ],
)
def test_latte_options_diffkit_cannot_honour_are_refused_by_name(field: str, value: Any) -> None:
    options = {**_LATTE_TINY, field: value, "num_embeds_ada_norm": 1000}
    try:
        with torch.device("meta"):
            ref = diffusers.LatteTransformer3DModel(**options)
    except Exception:  # some combinations diffusers cannot build: refuse the config alone
        from diffkit.interop._diffusers_transformer import latte_config

        with pytest.raises(ValueError, match=field):
            latte_config({"dropout": 0.0, **options}, None, None, {})
        return
    with pytest.raises(ValueError, match=field):
        dk.interop.from_diffusers(ref)


def test_frames_past_video_length_are_refused() -> None:
    model = dk.interop.from_diffusers(_latte(video_length=2))
    cond = Conditioning(tokens=torch.randn(1, 3, 12))
    with pytest.raises(ValueError, match="max_frames"):
        model(torch.randn(1, 3, 4, 8, 8), torch.rand(1), cond)


def test_a_video_dit_latte_cannot_express_is_refused_by_name() -> None:
    config = VideoDiTConfig(
        dim=16, depth=1, num_heads=2, context_dim=8, attention="alternating",
        positions="space_then_time", pos_order="wh", pos_base_size=4, modulation="single",
        context_projection=True, context_mask=False, cross_norm=False, mlp_dim=24,
    )  # fmt: skip
    with pytest.raises(ValueError, match="mlp_dim"):
        dk.interop.to_diffusers(VideoDiT(config))


LATTE_1 = {  # maxin-cn/Latte-1, transformer/config.json
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "cross_attention_dim": 1152,
    "attention_bias": True,
    "sample_size": 64,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "caption_channels": 4096,
    "video_length": 16,
}


def test_full_size_latte_maps_every_tensor_on_meta() -> None:
    """Every diffusers tensor of the published config maps onto a diffkit one of the same
    shape and back, none left over, and the parameter counts are equal."""
    from diffkit.interop._diffusers_transformer import (
        diffusers_state_dict,
        dit_state_dict,
        latte_config,
    )

    with torch.device("meta"):
        ref = diffusers.LatteTransformer3DModel(**LATTE_1)
        config = latte_config(ref.config, None, None, {})
        model = VideoDiT(config)
    want, mine = ref.state_dict(), model.state_dict()
    converted = dit_state_dict(want, config)
    assert converted.keys() == mine.keys()
    assert all(converted[k].shape == mine[k].shape for k in mine)
    back = diffusers_state_dict(mine, config)
    assert back.keys() == want.keys()
    assert all(back[k].shape == want[k].shape for k in want)
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in ref.parameters())
