"""diffkit's space-time U-Net reproduces diffusers' UNet3DConditionModel (ModelScope t2v).

Small randomly initialised diffusers models convert with ``dk.interop.from_diffusers``; the
converted U-Net, given ``(batch, frames, channels, h, w)`` at ``t = (timestep + 1) / N``,
returns diffusers' output for ``(batch, channels, frames, h, w)`` at ``timestep``.
``to_diffusers`` builds a UNet3DConditionModel and loads its weights with ``strict=True``.
"""

from typing import Any

import pytest
import torch

import diffkit as dk
from diffkit.nn import UNet, UNetConfig
from diffkit.nn.unet import TemporalConfig
from diffkit.protocols import Conditioning

pytestmark = pytest.mark.parity
diffusers = pytest.importorskip("diffusers")

TINY: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock3D", "DownBlock3D"),
    "up_block_types": ("UpBlock3D", "CrossAttnUpBlock3D"),
    "block_out_channels": (16, 32),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 12,
    "attention_head_dim": 8,
}
# every level attending, two blocks per level, another norm eps and mid-block scale
TINY_ALL_ATTENTION: dict[str, Any] = {
    **TINY,
    "down_block_types": ("CrossAttnDownBlock3D", "CrossAttnDownBlock3D"),
    "up_block_types": ("CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
    "layers_per_block": 2,
    "norm_eps": 1e-6,
    "mid_block_scale_factor": 1.5,
    "out_channels": 3,
}


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere, including the temporal convs diffusers zero-initialises."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


def _inputs(dtype: torch.dtype, frames: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, frames, 8, 8, generator=g, dtype=dtype)  # diffusers' layout
    tokens = torch.randn(2, 5, 12, generator=g, dtype=dtype)
    return x, torch.tensor([17, 731]), tokens


def _diffkit_call(
    unet: torch.nn.Module, x: torch.Tensor, steps: torch.Tensor, tokens: torch.Tensor
):
    video = x.permute(0, 2, 1, 3, 4)  # (b, c, f, h, w) -> (b, f, c, h, w)
    out = unet(video, (steps + 1) / 1000, Conditioning(tokens=tokens))
    return out.permute(0, 2, 1, 3, 4)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("options", [TINY, TINY_ALL_ATTENTION], ids=["tiny", "all-attention"])
def test_unet3d_matches_diffusers_at_the_same_training_step(
    options: dict[str, Any], dtype: torch.dtype, tol: float
) -> None:
    ref = _perturbed(diffusers.UNet3DConditionModel(**options).to(dtype), seed=0)
    unet = dk.interop.from_diffusers(ref)
    assert isinstance(unet, UNet) and unet.config.is_video
    x, steps, tokens = _inputs(dtype)
    with torch.no_grad():
        want = ref(x, steps, encoder_hidden_states=tokens).sample
        got = _diffkit_call(unet, x, steps, tokens)
    assert got.dtype == dtype
    error = (got - want).abs().max().item()
    assert error <= tol, error


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_space_time_unet_exports_to_an_equivalent_diffusers_model(
    dtype: torch.dtype,
) -> None:
    config = UNetConfig(
        in_channels=4,
        base_channels=16,
        channel_mult=(1, 2),
        blocks_per_level=1,
        attention_resolutions=(1, 2),
        attention_head_dim=8,
        norm_groups=8,
        context_dim=12,
        linear_projection=True,
        time_input="index",  # the exported model's timestep is then diffusers' index
        temporal=TemporalConfig(),
    )
    unet = _perturbed(UNet(config).to(dtype), seed=2)
    exported = dk.interop.to_diffusers(unet)  # loads with strict=True
    assert type(exported).__name__ == "UNet3DConditionModel"
    x, steps, tokens = _inputs(dtype, frames=4)
    with torch.no_grad():
        want = _diffkit_call(unet, x, steps, tokens)
        got = exported(x, steps, encoder_hidden_states=tokens).sample
        back = dk.interop.from_diffusers(exported)
        again = _diffkit_call(back, x, steps, tokens)
    assert (got - want).abs().max().item() <= (1e-5 if dtype == torch.float32 else 1e-12)
    # the defaults (out_channels, time_embed_dim) come back as the numbers they stood for
    assert back.config == unet.config.model_copy(update={"out_channels": 4, "time_embed_dim": 64})
    assert torch.equal(again, want)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"act_fn": "gelu"}, "act_fn"),
        ({"time_cond_proj_dim": 8}, "time_cond_proj_dim"),
        ({"norm_num_groups": None}, "norm_num_groups"),
        ({"attention_head_dim": (8, 4)}, "attention_head_dim"),
        ({"down_block_types": ("CrossAttnDownBlock3D", "DownBlockMotion")}, "down_block_types"),
        ({"up_block_types": ("CrossAttnUpBlock3D", "UpBlock3D")}, "up_block_types"),
    ],
)
def test_unet3d_options_it_cannot_honour_are_refused_by_name(
    change: dict[str, Any], field: str
) -> None:
    ref = diffusers.UNet3DConditionModel(**TINY)
    ref.register_to_config(**change)  # the config a checkpoint could carry
    with pytest.raises(ValueError, match=field):
        dk.interop.from_diffusers(ref)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"temporal": TemporalConfig(input_heads=4)}, "temporal.input_heads"),
        ({"temporal": TemporalConfig(conv=False)}, "temporal.conv"),
        ({"temporal": TemporalConfig(dropout=0.0)}, "temporal.dropout"),
        ({"temporal": TemporalConfig(positions="rotary")}, "temporal.positions"),
        ({"temporal": TemporalConfig(frame_patch=2)}, "temporal.frame_patch"),
        ({"temporal": TemporalConfig(cross_attention=True)}, "temporal.cross_attention"),
        ({"scale_shift": True}, "scale_shift"),
        ({"linear_projection": False}, "linear_projection"),
        ({"transformer_depth": 2}, "transformer_depth"),
        ({"context_dim": None}, "context_dim"),
    ],
)
def test_space_time_unet_options_diffusers_lacks_are_refused_by_name(
    change: dict[str, Any], field: str
) -> None:
    base = {
        "in_channels": 4,
        "base_channels": 16,
        "channel_mult": (1, 2),
        "blocks_per_level": 1,
        "attention_resolutions": (1,),
        "attention_head_dim": 8,
        "norm_groups": 8,
        "context_dim": 12,
        "linear_projection": True,
        "temporal": TemporalConfig(),
    }
    unet = UNet(UNetConfig(**{**base, **change}))
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        dk.interop.to_diffusers(unet)


def test_full_size_modelscope_unet_maps_every_tensor_on_meta() -> None:
    """ModelScope text-to-video (diffusers' default UNet3DConditionModel config), built on the
    meta device: every tensor converts onto diffkit's with its shape and back; equal counts."""
    from diffkit.interop._diffusers import _state_dict_to_diffkit, to_diffusers_state_dict
    from diffkit.interop._diffusers_video import unet3d_config, video_keys_to_diffkit

    with torch.device("meta"):
        ref = diffusers.UNet3DConditionModel()  # (320, 640, 1280, 1280), 64-dim heads, 1024
        unet = UNet(unet3d_config(ref, None, None, {}))
    assert all(p.is_meta for p in unet.parameters())
    want, mine = ref.state_dict(), unet.state_dict()
    converted = _state_dict_to_diffkit(video_keys_to_diffkit(want), unet)
    assert converted.keys() == mine.keys()
    assert all(converted[k].shape == mine[k].shape for k in mine)
    back = to_diffusers_state_dict(unet)
    assert back.keys() == want.keys()
    assert all(back[k].shape == want[k].shape for k in want)
    count = sum(p.numel() for p in unet.parameters())
    assert count == sum(p.numel() for p in ref.parameters())
    assert count > 1.3e9  # ModelScope's U-Net: 1.41 B parameters
