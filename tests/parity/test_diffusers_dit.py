"""Parity of diffusers' DiT and PixArt transformers with their diffkit conversions (DiT).

Tiny randomly initialised diffusers models, no downloads: ``from_diffusers`` gives the same
outputs for random inputs, timesteps, labels and captions, and ``to_diffusers`` /
``from_diffusers`` round trips are exact.
"""

from collections.abc import Callable
from typing import Any

import pytest
import torch

import diffkit as dk
from diffkit.nn import DiT
from diffkit.protocols import Conditioning
from diffkit.typing import ShapeError

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random non-zero weights everywhere (the zero-initialised gates and heads included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return model.eval()


def _tie_block_embeddings(model: Any) -> Any:
    """One time / label embedding copied into every block, as in the published DiT weights."""
    first = model.transformer_blocks[0].norm1.emb
    with torch.no_grad():
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first.state_dict())
    return model


def _dit(**overrides: Any) -> Any:
    options = {
        "num_attention_heads": 2,
        "attention_head_dim": 8,
        "in_channels": 4,
        "out_channels": 8,
        "num_layers": 2,
        "sample_size": 8,
        "patch_size": 2,
        "num_embeds_ada_norm": 10,
    } | overrides
    return _tie_block_embeddings(_randomize(diffusers.DiTTransformer2DModel(**options)))


def _pixart(**overrides: Any) -> Any:
    options = {
        "num_attention_heads": 2,
        "attention_head_dim": 8,
        "in_channels": 4,
        "out_channels": 8,
        "num_layers": 2,
        "sample_size": 8,
        "patch_size": 2,
        "cross_attention_dim": 16,
        "caption_channels": 12,
    } | overrides
    return _randomize(diffusers.PixArtTransformer2DModel(**options))


def _inputs(batch: int = 3, size: tuple[int, int] = (8, 8), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *size, generator=g)
    steps = torch.randint(0, 1000, (batch,), generator=g)
    return x, steps, g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", [(8, 8), (12, 12)])  # diffusers' DiT unpatchifies squares only
@pytest.mark.parametrize("out_channels", [8, 4])
def test_dit_matches_diffusers(
    size: tuple[int, int], out_channels: int, dtype: torch.dtype
) -> None:
    ref = _dit(out_channels=out_channels).to(dtype)
    model = dk.interop.from_diffusers(ref)
    assert isinstance(model, DiT)
    x, steps, _ = _inputs(size=size)
    x = x.to(dtype)
    labels = torch.tensor([0, 9, 10])  # 10: the null class of classifier-free guidance
    with torch.no_grad():
        want = ref(x, timestep=steps, class_labels=labels).sample
        got = model.predict_all(x, (steps + 1) / 1000, Conditioning(labels=labels))
        prediction = model(x, (steps + 1) / 1000, Conditioning(labels=labels))
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= (TOL if dtype == torch.float32 else 1e-12)
    assert torch.equal(prediction, got[:, :4])
    assert model.config.learned_sigma == (out_channels == 8)


def _untied_dit() -> Any:
    return _randomize(diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, num_layers=3, sample_size=8,
        num_embeds_ada_norm=10,
    ))  # fmt: skip


def test_dit_with_a_time_embedding_per_block_matches_diffusers() -> None:
    """A DiT trained in diffusers: its blocks' copies of the embeddings differ."""
    ref = _untied_dit()
    model = dk.interop.from_diffusers(ref)
    assert isinstance(model, DiT) and model.config.embeddings_per_block
    tied = dk.interop.from_diffusers(_dit())  # the published layout: one embedding
    assert isinstance(tied, DiT) and not tied.config.embeddings_per_block
    x, steps, _ = _inputs()
    labels = torch.tensor([1, 2, 10])
    with torch.no_grad():
        want = ref(x, timestep=steps, class_labels=labels).sample
        got = model.predict_all(x, (steps + 1) / 1000, Conditioning(labels=labels))
    assert (got - want).abs().max().item() <= TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("caption", [12, None])
@pytest.mark.parametrize("size", [(8, 8), (8, 12)])
def test_pixart_matches_diffusers(
    caption: int | None, size: tuple[int, int], dtype: torch.dtype
) -> None:
    # without a caption projection: PixArt-Σ-like options (interpolation scale 2, no sigma)
    ref: Any = (
        _pixart()
        if caption
        else _pixart(caption_channels=None, interpolation_scale=2, out_channels=4)
    )
    ref = ref.to(dtype)
    model = dk.interop.from_diffusers(ref)
    assert isinstance(model, DiT)
    x, steps, g = _inputs(size=size)
    x = x.to(dtype)
    width = caption or 16
    tokens = torch.randn(3, 5, width, generator=g, dtype=dtype)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]).bool()
    with torch.no_grad():
        want = ref(
            x, encoder_hidden_states=tokens, timestep=steps, encoder_attention_mask=mask.long()
        ).sample
        got = model.predict_all(x, (steps + 1) / 1000, Conditioning(tokens=tokens, mask=mask))
    assert (got - want).abs().max().item() <= (TOL if dtype == torch.float32 else 1e-12)


def test_pixart_alpha_micro_conditions_match_diffusers() -> None:
    ref = _pixart(attention_head_dim=6, cross_attention_dim=12, use_additional_conditions=True)
    model = dk.interop.from_diffusers(ref)
    assert isinstance(model, DiT) and model.config.size_conditions
    x, steps, g = _inputs()
    tokens = torch.randn(3, 5, 12, generator=g)
    resolution = torch.tensor([[1024.0, 1024.0], [768.0, 1344.0], [512.0, 512.0]])
    aspect = resolution[:, :1] / resolution[:, 1:]
    with torch.no_grad():
        want = ref(
            x,
            encoder_hidden_states=tokens,
            timestep=steps,
            added_cond_kwargs={"resolution": resolution, "aspect_ratio": aspect},
        ).sample
        cond = Conditioning(tokens=tokens, micro=torch.cat([resolution, aspect], dim=1))
        got = model.predict_all(x, (steps + 1) / 1000, cond)
        with pytest.raises(ShapeError, match="micro"):
            model(x, (steps + 1) / 1000, Conditioning(tokens=tokens))
    assert (got - want).abs().max().item() <= TOL
    back: Any = dk.interop.to_diffusers(model)
    assert back.config.use_additional_conditions
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ref.state_dict().items())


@pytest.mark.parametrize("make", [_dit, _untied_dit, _pixart])
def test_round_trips_are_exact(make: Callable[..., Any]) -> None:
    ref = make()
    model = dk.interop.from_diffusers(ref, prediction="v")
    back = dk.interop.to_diffusers(model)
    assert type(back) is type(ref)
    want, got = ref.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    again = dk.interop.from_diffusers(back)
    assert again.config == model.config
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in again.state_dict().items())


def test_native_dit_is_refused_by_name() -> None:
    model = DiT(dk.nn.DiTConfig(dim=16, depth=1, num_heads=2, num_classes=3))
    with pytest.raises(ValueError, match="pos_order"):
        dk.interop.to_diffusers(model)


FULL_SIZE = {
    "DiT-XL/2-256": ("DiTTransformer2DModel", {}),
    "PixArt-α-1024": ("PixArtTransformer2DModel", {"caption_channels": 4096}),
    "PixArt-α-512": (
        "PixArtTransformer2DModel",
        {"sample_size": 64, "caption_channels": 4096, "use_additional_conditions": False},
    ),
    "PixArt-Σ-1024": (
        "PixArtTransformer2DModel",
        {
            "sample_size": 128,
            "caption_channels": 4096,
            "interpolation_scale": 2,
            "use_additional_conditions": False,
        },
    ),
}


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_configs_map_every_tensor_on_meta(name: str) -> None:
    """Built on the meta device (no memory): every diffusers tensor maps onto a diffkit one of
    the same number of elements and back, none left over."""
    from diffkit.interop._diffusers_transformer import (
        diffusers_state_dict,
        dit_config,
        dit_state_dict,
    )

    cls, options = FULL_SIZE[name]
    with torch.device("meta"):
        ref = getattr(diffusers, cls)(**options)
        config = dit_config(ref, None, None, {})
        model = DiT(config)
    assert all(p.is_meta for p in model.parameters())
    assert config.embeddings_per_block == (cls == "DiTTransformer2DModel")  # meta: not compared
    want, mine = ref.state_dict(), model.state_dict()
    converted = dit_state_dict(want, config)
    assert converted.keys() == mine.keys()
    assert all(converted[k].shape == mine[k].shape for k in mine)
    back = diffusers_state_dict(mine, config)
    assert back.keys() == want.keys()
    assert all(back[k].shape == want[k].shape for k in want)
    count = sum(p.numel() for p in model.parameters())
    ref_count = sum(p.numel() for p in ref.parameters())
    if config.modulation == "zero" and not config.embeddings_per_block:  # one copy per block
        per_block = sum(p.numel() for p in ref.transformer_blocks[0].norm1.emb.parameters())
        count += (config.depth - 1) * per_block
    assert count == ref_count


@pytest.mark.parametrize(
    ("field", "value"), [("qk_norm", True), ("mlp_dim", 24), ("context_mask", False)]
)
def test_dit_options_pixart_cannot_express_are_refused_by_name(field: str, value: Any) -> None:
    model = dk.interop.from_diffusers(_pixart())
    assert isinstance(model, DiT)
    changed = DiT(model.config.model_copy(update={field: value}))
    with pytest.raises(ValueError, match=field):
        dk.interop.to_diffusers(changed)
