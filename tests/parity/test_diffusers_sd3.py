"""Parity of diffusers' SD3 transformer (MMDiT) with its diffkit conversion (a DiT configured
with ``joint_attention``), and of SD3's flow-matching sigmas with ``RectifiedFlow``.

Tiny randomly initialised diffusers models, no downloads: ``from_diffusers`` gives the same
outputs, ``to_diffusers`` loads strictly and round trips exactly, and the full-size SD3 /
SD3.5 configurations map every tensor one to one on the meta device.
"""

from typing import Any

import pytest
import torch

import diffkit as dk
from diffkit.nn import DiT
from diffkit.protocols import Conditioning
from diffkit.typing import ShapeError

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.parity

VARIANTS = {
    "sd3": {},
    "sd3.5-large": {"qk_norm": "rms_norm"},
    "sd3.5-medium": {"qk_norm": "rms_norm", "dual_attention_layers": (0, 1)},
    "uncropped": {"pos_embed_max_size": None},  # positions scaled to the grid, as DiT's
}


def _sd3(**overrides: Any) -> Any:
    options = {
        "sample_size": 8,
        "patch_size": 2,
        "in_channels": 4,
        "out_channels": 4,
        "num_layers": 3,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "joint_attention_dim": 12,
        "caption_projection_dim": 16,
        "pooled_projection_dim": 10,
        "pos_embed_max_size": 12,
    } | overrides
    model = diffusers.SD3Transformer2DModel(**options)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random weights everywhere, the zero-initialised gates included
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return model.eval()


def _inputs(size: tuple[int, int], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, *size, generator=g, dtype=dtype)
    tokens = torch.randn(3, 5, 12, generator=g, dtype=dtype)
    pooled = torch.randn(3, 10, generator=g, dtype=dtype)
    return x, tokens, pooled


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", [(8, 8), (6, 10), (24, 24)])  # 24: the whole 12-patch grid
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sd3_transformer_matches_diffusers(
    variant: str, size: tuple[int, int], dtype: torch.dtype
) -> None:
    ref = _sd3(**VARIANTS[variant]).to(dtype)
    model = dk.interop.from_diffusers(ref)
    assert isinstance(model, DiT) and model.config.joint_attention
    assert model.config.prediction == "flow"
    x, tokens, pooled = _inputs(size, dtype)
    sigma = torch.tensor([0.02, 0.5, 1.0], dtype=dtype)
    with torch.no_grad():
        want = ref(x, encoder_hidden_states=tokens, pooled_projections=pooled,
                   timestep=sigma * 1000).sample  # fmt: skip
        got = model(x, sigma, Conditioning(tokens=tokens, pooled=pooled))
    error = (got - want).abs().max().item()
    # float64: diffusers' RMSNorm (qk_norm) takes its variance in float32
    assert error <= (1e-5 if dtype == torch.float32 else 1e-9), error


def test_time_shift_makes_t_that_of_the_shifted_rectified_flow() -> None:
    """With the scheduler's shift the converted network takes RectifiedFlow(shift)'s t."""
    ref = _sd3()
    model = dk.interop.from_diffusers(ref, time_shift=3.0)
    assert isinstance(model, DiT) and model.config.time_shift == 3.0
    schedule = dk.schedules.RectifiedFlow(shift=3.0)
    x, tokens, pooled = _inputs((8, 8), torch.float32)
    t = torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        timestep = (1000 * schedule.sigma(t.double())).float()
        want = ref(x, encoder_hidden_states=tokens, pooled_projections=pooled,
                   timestep=timestep).sample  # fmt: skip
        got = model(x, t, Conditioning(tokens=tokens, pooled=pooled))
        unshifted = dk.interop.from_diffusers(ref)(x, t, Conditioning(tokens=tokens, pooled=pooled))
    assert (got - want).abs().max().item() <= 1e-5
    assert (unshifted - want).abs().max().item() > 1e-3


@pytest.mark.parametrize("steps", [4, 28])
def test_rectified_flow_sigmas_are_the_sd3_schedulers(steps: int) -> None:
    """FlowMatchEulerDiscreteScheduler(shift=3): its sigmas are RectifiedFlow(3).sigma at t
    spaced evenly from 1 to the shifted sigma of its last training step, its timesteps
    1000 sigma."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    schedule = dk.schedules.RectifiedFlow(shift=3.0)
    t_min = float(schedule.sigma(torch.tensor([1 / 1000], dtype=torch.float64)))
    t = torch.linspace(1.0, t_min, steps, dtype=torch.float64)
    sigma = schedule.sigma(t)
    torch.testing.assert_close(scheduler.sigmas[:-1].double(), sigma, atol=1e-6, rtol=0)
    torch.testing.assert_close(scheduler.timesteps.double(), 1000 * sigma, atol=1e-3, rtol=0)
    assert float(scheduler.sigmas[-1]) == 0.0
    alpha = schedule.alpha(t)
    torch.testing.assert_close(alpha, 1 - sigma)  # x_t = (1 - sigma) x0 + sigma eps


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sd3_round_trip_is_exact_and_strict(variant: str) -> None:
    ref = _sd3(**VARIANTS[variant])
    model = dk.interop.from_diffusers(ref, time_shift=3.0)
    back: Any = dk.interop.to_diffusers(model)  # loads with strict=True
    assert type(back) is type(ref)
    want, got = ref.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    again = dk.interop.from_diffusers(back)
    assert isinstance(again, DiT) and again.config == model.config  # time_shift recorded


def test_sd3_options_diffkit_cannot_honour_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="caption_projection_dim"):
        dk.interop.from_diffusers(_sd3(caption_projection_dim=24))
    with pytest.raises(ValueError, match="qk_norm"):
        dk.interop.from_diffusers(_sd3(qk_norm="layer_norm"))
    with pytest.raises(ValueError, match="context_dim"):
        dk.nn.DiTConfig(dim=16, num_heads=2, joint_attention=True)
    with pytest.raises(ValueError, match="dual_attention_layers"):
        dk.nn.DiTConfig(dim=16, num_heads=2, dual_attention_layers=(0,))
    model = dk.interop.from_diffusers(_sd3())
    assert isinstance(model, DiT)
    x, tokens, pooled = _inputs((26, 8), torch.float32)
    with pytest.raises(ShapeError, match="pos_max_size"):
        model(x, torch.full((3,), 0.5), Conditioning(tokens=tokens, pooled=pooled))
    unpooled = DiT(model.config.model_copy(update={"pooled_dim": None}))
    with pytest.raises(ValueError, match="pooled_dim"):
        dk.interop.to_diffusers(unpooled)


FULL_SIZE = {
    "SD3-medium": {
        "num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
        "pos_embed_max_size": 192,
    },
    "SD3.5-medium": {
        "num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
        "pos_embed_max_size": 384, "qk_norm": "rms_norm",
        "dual_attention_layers": tuple(range(13)),
    },
    "SD3.5-large": {
        "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
        "pos_embed_max_size": 192, "qk_norm": "rms_norm",
    },
}  # fmt: skip


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_sd3_configs_map_every_tensor_on_meta(name: str) -> None:
    """Built on the meta device (no memory): every diffusers tensor maps onto a diffkit one of
    the same shape and back, none left over, parameter counts equal."""
    from diffkit.interop._diffusers_transformer import diffusers_state_dict, dit_state_dict

    with torch.device("meta"):
        ref = diffusers.SD3Transformer2DModel(**FULL_SIZE[name])
        config = dk.interop._diffusers_transformer.sd3_config(ref.config, None, {}, 3.0)
        model = DiT(config)
    assert all(p.is_meta for p in model.parameters())
    want, mine = ref.state_dict(), model.state_dict()
    converted = dit_state_dict(want, config)
    assert converted.keys() == mine.keys()
    assert all(converted[k].shape == mine[k].shape for k in mine)
    back = diffusers_state_dict(mine, config)
    assert back.keys() == want.keys()
    assert all(back[k].shape == want[k].shape for k in want)
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in ref.parameters())


def test_a_masked_caption_token_is_as_if_absent() -> None:
    """Joint attention with a keep-mask: no token, image or caption, reads a masked caption
    token, so the output equals that of the caption without it."""
    model = dk.interop.from_diffusers(_sd3(**VARIANTS["sd3.5-medium"]))
    x, tokens, pooled = _inputs((8, 8), torch.float32)
    t = torch.full((3,), 0.4)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[:, 3:] = False
    with torch.no_grad():
        masked = model(x, t, Conditioning(tokens=tokens, pooled=pooled, mask=mask))
        shorter = model(x, t, Conditioning(tokens=tokens[:, :3], pooled=pooled))
        unmasked = model(x, t, Conditioning(tokens=tokens, pooled=pooled))
    assert (masked - shorter).abs().max().item() <= 1e-5
    assert (masked - unmasked).abs().max().item() > 1e-3
