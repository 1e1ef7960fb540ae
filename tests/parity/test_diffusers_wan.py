"""Parity of diffusers' Wan 2.1 transformer (``WanTransformer3DModel``) with its diffkit
conversion, a rotary-position [`VideoDiT`][diffkit.nn.video.VideoDiT].

Tiny randomly initialised diffusers models, no downloads: ``from_diffusers`` gives the same
outputs for random videos, times and captions; ``to_diffusers`` loads strict and round trips
are exact; the full-size Wan 2.1 1.3B config maps every tensor on the meta device.
"""

from typing import Any

import pytest
import torch

import diffkit as dk
from diffkit.nn.video import VideoDiT, VideoDiTConfig
from diffkit.protocols import Conditioning

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5


def _wan(**overrides: Any) -> Any:
    options = {
        "patch_size": (1, 2, 2),
        "num_attention_heads": 2,
        "attention_head_dim": 12,
        "in_channels": 4,
        "out_channels": 4,
        "text_dim": 20,
        "freq_dim": 32,
        "ffn_dim": 40,
        "num_layers": 2,
        "cross_attn_norm": True,
        "rope_max_seq_len": 32,
    } | overrides
    model = diffusers.WanTransformer3DModel(**options)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random non-zero weights everywhere, the norms' too
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _run_both(ref: Any, model: VideoDiT, frames: int, size: tuple[int, int], dtype: torch.dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, ref.config.in_channels, frames, *size, generator=g, dtype=dtype)
    t = torch.rand(2, generator=g, dtype=dtype)
    text = torch.randn(2, 7, ref.config.text_dim, generator=g, dtype=dtype)
    with torch.no_grad():
        want = ref(x, 1000 * t, text, return_dict=False)[0]
        got = model(x.transpose(1, 2), t, Conditioning(tokens=text))
    return got.transpose(1, 2), want


@pytest.mark.parametrize(
    ("options", "frames", "size"),
    [
        ({}, 3, (8, 8)),
        ({"patch_size": (2, 2, 2), "cross_attn_norm": False, "out_channels": 6}, 4, (8, 12)),
        ({"attention_head_dim": 16, "num_attention_heads": 1}, 2, (6, 10)),
    ],
)
def test_wan_matches_diffusers(options: dict[str, Any], frames: int, size: tuple[int, int]) -> None:
    ref = _wan(**options)
    model = dk.interop.from_diffusers(ref)
    assert isinstance(model, VideoDiT)
    assert model.config.positions == "rotary" and model.prediction == "flow"
    got, want = _run_both(ref, model, frames, size, torch.float32)
    err = (got - want).abs().max().item()
    assert err <= TOL * max(1.0, want.abs().max().item()), err


def test_wan_matches_diffusers_in_float64() -> None:
    """diffusers' Wan keeps its LayerNorms and modulation in float32 (FP32LayerNorm,
    ``temb.float()``): in float64 the two agree to float32's precision, not float64's."""
    ref = _wan().double()
    model = dk.interop.from_diffusers(ref)
    assert isinstance(model, VideoDiT)
    assert next(model.parameters()).dtype == torch.float64
    got, want = _run_both(ref, model, 3, (8, 8), torch.float64)
    assert (got - want).abs().max().item() <= 1e-5


def test_wan_round_trip_is_exact_and_loads_strict() -> None:
    ref = _wan()
    model = dk.interop.from_diffusers(ref, time_shift=3.0)
    back = dk.interop.to_diffusers(model)  # load_state_dict(strict=True) inside
    assert type(back) is type(ref)
    want, got = ref.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    again = dk.interop.from_diffusers(back)
    assert isinstance(again, VideoDiT) and isinstance(model, VideoDiT)
    assert again.config == model.config
    assert again.config.time_shift == 3.0  # recorded in the diffusers config
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in again.state_dict().items())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("image_dim", 12),
        ("added_kv_proj_dim", 12),
        ("pos_embed_seq_len", 4),
        ("qk_norm", "rms_norm"),
        ("eps", 1e-5),
    ],
)
def test_wan_options_diffkit_cannot_honour_are_refused_by_name(field: str, value: Any) -> None:
    with torch.device("meta"):
        ref = diffusers.WanTransformer3DModel(
            num_attention_heads=2, attention_head_dim=12, text_dim=20, ffn_dim=40,
            num_layers=1, freq_dim=32, **{field: value},
        )  # fmt: skip
    with pytest.raises(ValueError, match=field):
        dk.interop.from_diffusers(ref)


def test_a_video_dit_wan_cannot_express_is_refused_by_name() -> None:
    native = VideoDiT(VideoDiTConfig(dim=24, depth=1, num_heads=2, context_dim=8))
    with pytest.raises(ValueError, match="positions"):
        dk.interop.to_diffusers(native)


def test_grids_past_rope_max_seq_len_are_refused() -> None:
    model = dk.interop.from_diffusers(_wan(rope_max_seq_len=3))
    with pytest.raises(ValueError, match="rotary_max_len"):
        model(torch.randn(1, 2, 4, 8, 8), torch.rand(1), Conditioning(tokens=torch.randn(1, 3, 20)))


WAN_1_3B = {  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
}


def test_full_size_wan_1_3b_maps_every_tensor_on_meta() -> None:
    """Built on the meta device: every diffusers tensor maps onto a diffkit one of the same
    shape and back, none left over, and the parameter counts are equal (about 1.42 B)."""
    from diffkit.interop._diffusers_wan_transformer import (
        diffusers_wan_state_dict,
        wan_config,
        wan_state_dict,
    )

    with torch.device("meta"):
        ref = diffusers.WanTransformer3DModel(**WAN_1_3B)
        config = wan_config(ref.config, None, {}, None)
        model = VideoDiT(config)
    assert all(p.is_meta for p in model.parameters())
    want, mine = ref.state_dict(), model.state_dict()
    converted = wan_state_dict(want, config)
    assert converted.keys() == mine.keys()
    assert all(converted[k].shape == mine[k].shape for k in mine)
    back = diffusers_wan_state_dict(mine, config)
    assert back.keys() == want.keys()
    assert all(back[k].shape == want[k].shape for k in want)
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in ref.parameters())
    assert 1.4e9 < count < 1.45e9
