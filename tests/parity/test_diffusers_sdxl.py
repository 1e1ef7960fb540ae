"""Parity of an SDXL-shaped diffusers U-Net with its diffkit conversion (UNet).

SDXL's U-Net is a configuration of diffkit's: ``text_time`` added embeddings (the pooled text
beside sinusoids of six size micro-conditions), a transformer depth per level, linear
projections around the transformers, attention only below the first level. Tiny random
weights, no downloads.
"""

from typing import Any

import pytest
import torch

import diffkit as dk
from diffkit.nn import UNet
from diffkit.protocols import Conditioning
from diffkit.typing import ShapeError

diffusers = pytest.importorskip("diffusers")


def _sdxl_like(**overrides: Any) -> Any:
    options = {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (16, 32, 32),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 3),
        "attention_head_dim": (2, 4, 4),  # heads per level: 8 channels each
        "use_linear_projection": True,
        "cross_attention_dim": 24,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 12 + 6 * 8,  # pooled text + 6 sinusoids
        "norm_num_groups": 8,
    } | overrides
    model = diffusers.UNet2DConditionModel(**options)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _inputs(batch: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    steps = torch.tensor([3, 870])[:batch]
    tokens = torch.randn(batch, 7, 24, generator=g)
    pooled = torch.randn(batch, 12, generator=g)
    time_ids = torch.tensor(
        [[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768, 1344, 16, 8, 832, 1216]]
    )
    return x, steps, tokens, pooled, time_ids[:batch]


def test_sdxl_unet_matches_diffusers() -> None:
    ref = _sdxl_like()
    unet = dk.interop.from_diffusers(ref)
    assert isinstance(unet, UNet)
    c = unet.config
    assert (c.micro_conditions, c.pooled_dim, c.transformer_depth) == (6, 12, (1, 2, 3))
    assert c.linear_projection and c.attention_resolutions == (2, 4)
    x, steps, tokens, pooled, time_ids = _inputs()
    with torch.no_grad():
        want = ref(
            x,
            steps,
            encoder_hidden_states=tokens,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample
        cond = Conditioning(tokens=tokens, pooled=pooled, micro=time_ids)
        got = unet(x, (steps + 1) / 1000, cond)
        with pytest.raises(ShapeError, match="micro"):
            unet(x, (steps + 1) / 1000, Conditioning(tokens=tokens, pooled=pooled))
    assert (got - want).abs().max().item() <= 1e-5


def test_sdxl_unet_round_trip_is_exact() -> None:
    ref = _sdxl_like()
    unet = dk.interop.from_diffusers(ref)
    back: Any = dk.interop.to_diffusers(unet)
    assert back.config.addition_embed_type == "text_time"
    assert list(back.config.transformer_layers_per_block) == [1, 2, 3]
    want, got = ref.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    again = dk.interop.from_diffusers(back)
    assert isinstance(again, UNet) and again.config == unet.config


def test_sdxl_refiner_micro_conditions_are_an_argument() -> None:
    ref = _sdxl_like(projection_class_embeddings_input_dim=12 + 5 * 8)
    unet = dk.interop.from_diffusers(ref, micro_conditions=5)
    assert isinstance(unet, UNet) and unet.config.micro_conditions == 5
    x, steps, tokens, pooled, time_ids = _inputs()
    ids = time_ids[:, :5]
    with torch.no_grad():
        want = ref(
            x, steps, encoder_hidden_states=tokens,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": ids},
        ).sample  # fmt: skip
        got = unet(x, (steps + 1) / 1000, Conditioning(tokens=tokens, pooled=pooled, micro=ids))
    assert (got - want).abs().max().item() <= 1e-5


def test_exported_micro_conditions_come_back_without_the_argument(tmp_path: Any) -> None:
    """The refiner's 5 micro-conditions are recorded in the exported diffusers config."""
    ref = _sdxl_like(projection_class_embeddings_input_dim=12 + 5 * 8)
    unet = dk.interop.from_diffusers(ref, micro_conditions=5)
    dk.interop.to_diffusers(unet).save_pretrained(tmp_path)
    back = diffusers.UNet2DConditionModel.from_pretrained(tmp_path)
    assert back.config["_diffkit"]["micro_conditions"] == 5
    again = dk.interop.from_diffusers(back)
    assert isinstance(again, UNet) and again.config == unet.config


SDXL_BASE = {
    "sample_size": 128,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}


@pytest.mark.parametrize("options", [{}, SDXL_BASE], ids=["sd-1.5", "sdxl-base"])
def test_full_size_unets_map_every_tensor_on_meta(options: dict[str, Any]) -> None:
    """Built on the meta device (no memory): diffusers' state dict converts tensor for tensor
    onto diffkit's (none left over, same shapes) and back; parameter counts are equal."""
    from diffkit.interop._diffusers import (
        _state_dict_to_diffkit,
        _unet_config,
        to_diffusers_state_dict,
    )

    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**options)
        unet = UNet(_unet_config(ref, None, None))
    assert all(p.is_meta for p in unet.parameters())
    want, mine = ref.state_dict(), unet.state_dict()
    converted = _state_dict_to_diffkit(want, unet)
    assert converted.keys() == mine.keys()
    assert all(converted[k].shape == mine[k].shape for k in mine)
    back = to_diffusers_state_dict(unet)
    assert back.keys() == want.keys()
    assert all(back[k].shape == want[k].shape for k in want)
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in ref.parameters())
