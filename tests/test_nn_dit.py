"""Tests for diffkit.nn.dit and diffkit.nn.video: shapes, batch independence, adaLN-Zero."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffkit as dk
from diffkit.nn import DENOISERS, DiT, DiTConfig, VideoDiT, VideoDiTConfig
from diffkit.nn.attention import LocalFeedForward
from diffkit.nn.transformer import PatchTransformer, PatchTransformerBlock, PatchTransformerConfig
from diffkit.protocols import Conditioning
from diffkit.typing import ShapeError


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random non-zero weights everywhere (adaLN-Zero layers start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _cond(config: DiTConfig | VideoDiTConfig, batch: int) -> Conditioning | None:
    tokens = torch.randn(batch, 3, config.context_dim) if config.context_dim else None
    labels = torch.arange(batch) % 3 if config.num_classes else None
    pooled = torch.randn(batch, config.pooled_dim) if config.pooled_dim else None
    if tokens is None and labels is None and pooled is None:
        return None
    return Conditioning(tokens=tokens, labels=labels, pooled=pooled)


def _common(draw) -> dict:
    return {
        "in_channels": draw(st.integers(1, 3)),
        "out_channels": draw(st.none() | st.integers(1, 3)),
        "dim": 16,
        "depth": draw(st.integers(1, 2)),
        "num_heads": draw(st.sampled_from([1, 2, 4])),
        "context_dim": draw(st.none() | st.just(6)),
        "pooled_dim": draw(st.none() | st.just(5)),
        "num_classes": draw(st.none() | st.just(3)),
        "freq_dim": 8,
        "prediction": draw(st.sampled_from(["epsilon", "x0", "v", "flow"])),
    }


@st.composite
def dit_setups(draw):
    p = draw(st.integers(1, 3))
    config = DiTConfig(patch_size=p, **_common(draw))
    shape = (config.in_channels, p * draw(st.integers(1, 3)), p * draw(st.integers(1, 3)))
    return config, shape


@st.composite
def video_setups(draw):
    patch = (draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    attention = draw(st.sampled_from(["factorised", "full"]))
    config = VideoDiTConfig(patch_size=patch, attention=attention, **_common(draw))
    frames = patch[0] * draw(st.integers(1, 3))
    shape = (
        frames,
        config.in_channels,
        patch[1] * draw(st.integers(1, 3)),
        patch[2] * draw(st.integers(1, 3)),
    )
    return config, shape


def _build(config):
    return DiT(config) if isinstance(config, DiTConfig) else VideoDiT(config)


def _out_shape(config, shape):
    out = config.out_channels or config.in_channels
    if isinstance(config, DiTConfig):
        return (out, *shape[1:])
    return (shape[0], out, *shape[2:])


@settings(max_examples=10)
@given(setup=dit_setups() | video_setups(), batch=st.integers(1, 3))
def test_transformer_denoisers_map_batch_shape_to_the_same_shape(setup, batch):
    config, shape = setup
    model = _randomize(_build(config))
    with torch.no_grad():
        out = model(torch.randn(batch, *shape), torch.rand(batch), _cond(config, batch))
    assert out.shape == (batch, *_out_shape(config, shape))
    assert torch.isfinite(out).all()
    assert model.prediction == config.prediction
    assert isinstance(model, dk.Denoiser)


@settings(max_examples=6)
@given(setup=dit_setups() | video_setups())
def test_transformer_denoisers_do_not_leak_across_batch_items(setup):
    config, shape = setup
    model = _randomize(_build(config))
    x, t, cond = torch.randn(3, *shape), torch.rand(3), _cond(config, 3)
    with torch.no_grad():
        before = model(x, t, cond)
        x2 = x.clone()
        x2[1] = torch.randn_like(x2[1])
        after = model(x2, t, cond)
    assert torch.allclose(before[[0, 2]], after[[0, 2]], atol=1e-5)
    assert not torch.allclose(before[1], after[1], atol=1e-5)


def test_adaln_zero_starts_as_zero_output_and_trains():
    config = DiTConfig(in_channels=2, patch_size=2, dim=16, depth=2, num_heads=2, freq_dim=8)
    model = DiT(config)
    x = torch.randn(2, 2, 4, 4)
    assert torch.equal(model(x, torch.rand(2)), torch.zeros_like(x))
    model(x, torch.rand(2)).sub(x).pow(2).mean().backward()
    assert model.proj_out.weight.grad is not None and model.proj_out.weight.grad.abs().sum() > 0


def test_factorised_video_attention_mixes_frames_but_keeps_items_apart():
    config = VideoDiTConfig(
        in_channels=1, patch_size=(1, 2, 2), dim=16, depth=1, num_heads=2, freq_dim=8
    )
    model = _randomize(VideoDiT(config))
    x, t = torch.randn(1, 3, 1, 4, 4), torch.rand(1)
    with torch.no_grad():
        before = model(x, t)
        x2 = x.clone()
        x2[:, 0] += 1.0
        after = model(x2, t)
    # changing frame 0 changes the prediction for frame 2 (temporal attention)
    assert not torch.allclose(before[:, 2], after[:, 2], atol=1e-5)


def test_factorised_and_full_attention_differ_only_in_the_attention():
    base = {"in_channels": 1, "patch_size": (1, 2, 2), "dim": 16, "depth": 1, "num_heads": 2}
    factorised = VideoDiT(VideoDiTConfig(attention="factorised", **base))
    full = VideoDiT(VideoDiTConfig(attention="full", **base))
    assert factorised.blocks[0].attn_time is not None
    assert full.blocks[0].attn_time is None


def test_patch_transformers_reject_indivisible_sizes_naming_the_dimension():
    dit = DiT(DiTConfig(in_channels=1, patch_size=2, dim=16, depth=1, num_heads=2))
    with pytest.raises(ShapeError, match="width 5 is not a multiple of the patch size 2"):
        dit(torch.randn(1, 1, 4, 5), torch.rand(1))
    with pytest.raises(ShapeError, match="channels"):
        dit(torch.randn(1, 3, 4, 4), torch.rand(1))
    video = VideoDiT(
        VideoDiTConfig(in_channels=1, patch_size=(2, 2, 2), dim=16, depth=1, num_heads=2)
    )
    with pytest.raises(ShapeError, match="frames 3 is not a multiple"):
        video(torch.randn(1, 3, 1, 4, 4), torch.rand(1))


def test_transformer_configs_build_from_the_registry():
    dit = DENOISERS.build({"kind": "dit", "dim": 16, "depth": 1, "num_heads": 2})
    video = DENOISERS.build({"kind": "video_dit", "dim": 16, "depth": 1, "num_heads": 2})
    assert isinstance(dit, DiT) and isinstance(video, VideoDiT)
    with pytest.raises(ValueError, match="num_heads"):
        DiTConfig(dim=18, num_heads=4)


def test_transformer_configs_reject_sizes_that_lose_time_or_position():
    # freq_dim 1 makes the time features all zero: the network would ignore time
    for config in (DiTConfig, VideoDiTConfig):
        with pytest.raises(ValueError, match="freq_dim"):
            config(dim=16, num_heads=2, freq_dim=1)
        assert config(dim=16, num_heads=2, freq_dim=2).freq_dim == 2
    # dim 4 leaves the 3-D sin-cos positions no feature for the position within a frame
    with pytest.raises(ValueError, match=r"dim 4 must be .*at least 8"):
        VideoDiTConfig(dim=4, num_heads=1)
    assert VideoDiTConfig(dim=8, num_heads=1).dim == 8


def test_local_mlp_mixes_only_spatial_neighbours_of_the_same_frame():
    mlp = _randomize(LocalFeedForward(8, 2.0))
    assert isinstance(mlp, LocalFeedForward)
    grid = (2, 3, 3)  # tokens frame-major: (f h w)
    x = torch.randn(1, 18, 8)
    with torch.no_grad():
        before = mlp(x, grid)
        x2 = x.clone()
        x2[0, 0] = torch.randn(8)  # frame 0, row 0, column 0
        changed = (mlp(x2, grid) - before).abs().sum(-1)[0].reshape(grid) > 1e-6
    expected = torch.zeros(grid, dtype=torch.bool)
    expected[0, :2, :2] = True
    assert torch.equal(changed, expected)
    with pytest.raises(ShapeError, match="grid"):
        mlp(torch.randn(1, 17, 8), grid)


def test_local_mlp_video_dit_keeps_the_video_shape():
    base = {"in_channels": 1, "patch_size": (2, 2, 2), "dim": 16, "depth": 1, "num_heads": 2}
    local = VideoDiT(VideoDiTConfig(local_mlp=True, **base))
    assert isinstance(local.blocks[0].mlp, LocalFeedForward)
    x = torch.randn(2, 4, 1, 4, 6)
    assert local(x, torch.rand(2)).shape == x.shape


def _dtype_models(dtype: torch.dtype) -> list[tuple[str, torch.nn.Module, torch.Tensor]]:
    common = {"in_channels": 1, "dim": 16, "depth": 1, "num_heads": 2, "context_dim": 6}
    dit = DiT(DiTConfig(**common, pooled_dim=5)).to(dtype)
    video = VideoDiT(VideoDiTConfig(**common, pooled_dim=5)).to(dtype)
    return [("DiT", dit, torch.randn(2, 1, 8, 8)), ("VideoDiT", video, torch.randn(2, 2, 1, 8, 8))]


@pytest.mark.parametrize(
    ("model_dtype", "x_dtype", "field"),
    [
        (torch.float32, torch.bfloat16, "x_t"),
        (torch.float32, torch.float64, "x_t"),
        (torch.float64, torch.float64, "tokens"),
        (torch.float64, torch.float64, "pooled"),
        (torch.bfloat16, torch.bfloat16, "tokens"),
    ],
)
def test_transformers_refuse_inputs_in_another_dtype_before_computing(model_dtype, x_dtype, field):
    for name, model, x in _dtype_models(model_dtype):
        calls: list[int] = []
        model.embed.register_forward_hook(lambda *args, calls=calls: calls.append(1))
        tokens = torch.randn(2, 3, 6, dtype=model_dtype)
        pooled = torch.randn(2, 5, dtype=model_dtype)
        if field == "tokens":
            tokens = tokens.float()
        if field == "pooled":
            pooled = pooled.float()
        named = "x_t" if field == "x_t" else f"Conditioning.{field}"
        wrong = x_dtype if field == "x_t" else torch.float32
        match = rf"{name}: {named} is {wrong} but the model's parameters are {model_dtype}; "
        with pytest.raises(ShapeError, match=match + r".*\.to\("):
            model(x.to(x_dtype), torch.rand(2), Conditioning(tokens=tokens, pooled=pooled))
        assert not calls, name


def test_transformers_train_a_step_under_bf16_autocast():
    """precision="bf16" training: float32 models and inputs inside torch.autocast."""
    for name, model, x in _dtype_models(torch.float32):
        cond = Conditioning(tokens=torch.randn(2, 3, 6), pooled=torch.randn(2, 5))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, torch.rand(2), cond)
            also = model(x.bfloat16(), torch.rand(2), cond)
        assert out.dtype == also.dtype == torch.bfloat16, name
        out.float().pow(2).mean().backward()
        assert model.embed.weight.grad is not None, name


def test_dit_and_video_dit_share_one_core_block_and_config():
    video = VideoDiT(VideoDiTConfig(dim=16, depth=1, num_heads=2, attention="full"))
    dit = DiT(DiTConfig(dim=16, depth=1, num_heads=2))
    for model in (dit, video):
        assert isinstance(model, PatchTransformer)
        assert isinstance(model.config, PatchTransformerConfig)
        assert all(type(block) is PatchTransformerBlock for block in model.blocks)
    # full attention over a one-frame video is DiT's block: the same parameters
    assert dit.blocks[0].state_dict().keys() == video.blocks[0].state_dict().keys()
    shared = set(PatchTransformerConfig.model_fields) - {"kind"}
    assert shared <= set(DiTConfig.model_fields) & set(VideoDiTConfig.model_fields)


@pytest.mark.parametrize("attention", ["factorised", "full"])
def test_on_one_frame_every_attention_is_the_image_block(attention):
    # Space attention within the only frame is full attention; the time branch (factorised
    # only) is gated off by its zero adaLN rows, so the block computes DiT's block.
    image = _randomize(PatchTransformerBlock(16, 2, context_dim=6))
    video = PatchTransformerBlock(16, 2, attention=attention, context_dim=6)
    state = video.state_dict()
    for key, value in image.state_dict().items():
        state[key] = torch.zeros_like(state[key])
        state[key][: value.shape[0]] = value
    video.load_state_dict(state)
    h, c, context = torch.randn(2, 6, 16), torch.randn(2, 16), torch.randn(2, 3, 6)
    with torch.no_grad():
        torch.testing.assert_close(video(h, c, (1, 2, 3), context), image(h, c, (1, 2, 3), context))


def test_saved_weights_keep_their_names():
    # Checkpoints and saved pipelines load by these names: the shared core kept them.
    config = {"dim": 16, "depth": 1, "num_heads": 2, "context_dim": 6, "num_classes": 3}
    block = [
        "attn.qkv.weight",
        "attn.qkv.bias",
        "attn.out.weight",
        "attn.out.bias",
        "norm_cross.weight",
        "norm_cross.bias",
        "cross.q.weight",
        "cross.q.bias",
        "cross.kv.weight",
        "cross.kv.bias",
        "cross.out.weight",
        "cross.out.bias",
        "mlp.proj_in.weight",
        "mlp.proj_in.bias",
        "mlp.proj_out.weight",
        "mlp.proj_out.bias",
        "ada.weight",
        "ada.bias",
    ]
    time = [f"attn_time.{p}.{w}" for p in ("qkv", "out") for w in ("weight", "bias")]
    head = [
        f"{m}.{w}"
        for m in ("embed", "time_embed.linear_1", "time_embed.linear_2")
        for w in ("weight", "bias")
    ] + ["label_embed.weight"]
    tail = [f"{m}.{w}" for m in ("ada_out", "proj_out") for w in ("weight", "bias")]

    def names(blocks: list[str]) -> list[str]:
        return head + [f"blocks.0.{k}" for k in blocks] + tail

    assert list(DiT(DiTConfig(**config)).state_dict()) == names(block)
    full = VideoDiT(VideoDiTConfig(attention="full", **config))
    assert list(full.state_dict()) == names(block)
    factorised = VideoDiT(VideoDiTConfig(**config))
    assert list(factorised.state_dict()) == names(block[:4] + time + block[4:])
    assert factorised.blocks[0].ada.weight.shape == (9 * 16, 16)


def test_rotary_angles_make_attention_scores_depend_on_relative_positions_only():
    from diffkit.nn.embeddings import apply_rotary, rotary_angles_3d

    grid, head_dim = (3, 4, 5), 12
    angles = rotary_angles_3d(grid, head_dim).reshape(*grid, head_dim // 2)
    q, k = torch.randn(head_dim, dtype=torch.float64), torch.randn(head_dim, dtype=torch.float64)

    def score(p: tuple[int, int, int], r: tuple[int, int, int]) -> torch.Tensor:
        return apply_rotary(q, angles[p]) @ apply_rotary(k, angles[r])

    # the same offset (1, 2, -1) from two places gives the same score; another offset does not
    assert torch.allclose(score((0, 0, 3), (1, 2, 2)), score((1, 1, 4), (2, 3, 3)))
    assert not torch.allclose(score((0, 0, 3), (1, 2, 2)), score((0, 0, 3), (1, 2, 3)))
    # pairs 0-1 turn with the frame, 2-3 with the row, 4-5 with the column (head_dim // 6 each
    # for rows and columns, the rest for frames)
    assert rotary_angles_3d(grid, head_dim).shape == (60, 6)
    for pairs, axis in ((slice(0, 2), 0), (slice(2, 4), 1), (slice(4, 6), 2)):
        part = angles[..., pairs]
        first = part.narrow(axis, 0, 1)
        assert torch.all(first == 0) and not torch.all(part == 0)
        others = [a for a in range(3) if a != axis]
        corner = part.narrow(others[0], 0, 1).narrow(others[1], 0, 1)
        assert torch.equal(part, corner.expand_as(part))


def _wan_like(**overrides) -> VideoDiTConfig:
    options = {
        "in_channels": 2, "dim": 24, "depth": 1, "num_heads": 2, "mlp_dim": 20,
        "attention": "full", "positions": "rotary", "modulation": "single",
        "qk_norm": True, "qk_norm_across_heads": True, "context_dim": 6,
        "context_projection": True, "context_mask": False,
    }  # fmt: skip
    return VideoDiTConfig(**(options | overrides))


def test_rotary_video_dit_adds_no_positions_and_honours_mlp_dim_and_norms():
    model = _randomize(VideoDiT(_wan_like()))
    block = model.blocks[0]
    assert block.mlp.proj_in.out_features == 20
    assert block.attn.q_norm is not None and block.attn.q_norm.normalized_shape == (24,)
    assert block.cross is not None and block.cross.k_norm is not None
    x, t = torch.randn(1, 2, 2, 4, 4), torch.rand(1)
    cond = Conditioning(tokens=torch.randn(1, 3, 6))
    with torch.no_grad():  # a rolled video is not a rolled prediction: positions matter
        out = model(x, t, cond)
        rolled = model(x.roll(1, dims=3), t, cond)
    assert not torch.allclose(rolled, out.roll(1, dims=3), atol=1e-4)


def test_context_mask_false_attends_to_every_token_given():
    x, t = torch.randn(1, 2, 2, 4, 4), torch.rand(1)
    tokens = torch.randn(1, 3, 6)
    mask = torch.tensor([[True, True, False]])
    for context_mask in (False, True):
        model = _randomize(VideoDiT(_wan_like(context_mask=context_mask)))
        with torch.no_grad():
            masked = model(x, t, Conditioning(tokens=tokens, mask=mask))
            unmasked = model(x, t, Conditioning(tokens=tokens))
        assert torch.allclose(masked, unmasked) == (not context_mask)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"attention": "factorised"}, "rotary"),
        ({"num_heads": 6}, "head size"),  # head size 4 < 6
        ({"qk_norm": False}, "qk_norm_across_heads"),
        ({"positions": "sincos", "pos_order": "wh"}, "pos_order"),
        ({"positions": "space_then_time"}, "alternating"),
    ],
)
def test_video_dit_refuses_option_combinations_it_cannot_honour(overrides, field):
    with pytest.raises(ValueError, match=field):
        _wan_like(**overrides)


def _latte_like(**overrides) -> VideoDiTConfig:
    options = {
        "in_channels": 2, "dim": 16, "depth": 2, "num_heads": 2, "attention": "alternating",
        "positions": "space_then_time", "modulation": "single", "context_dim": 6,
    }  # fmt: skip
    return VideoDiTConfig(**(options | overrides))


def test_alternating_blocks_are_spatial_with_cross_attention_then_temporal_without():
    model = VideoDiT(_latte_like())
    assert [b.mixing for b in model.blocks] == ["space", "time", "space", "time"]
    assert [b.cross is not None for b in model.blocks] == [True, False, True, False]
    assert all(b.attn_time is None for b in model.blocks)


def test_alternating_video_dit_mixes_frames_only_in_its_temporal_blocks():
    model = _randomize(VideoDiT(_latte_like(depth=1)))
    x, t = torch.randn(1, 3, 2, 4, 4), torch.rand(1)
    cond = Conditioning(tokens=torch.randn(1, 2, 6))
    x2 = x.clone()
    x2[:, 0] += 1.0
    with torch.no_grad():
        changed = (model(x2, t, cond) - model(x, t, cond)).abs().amax(dim=(0, 2, 3, 4))
        model.blocks[1].ada_table.data[2].zero_()  # temporal block's attention gate ...
        model.ada.weight.data.zero_()
        model.ada.bias.data.zero_()  # ... closed: frames no longer meet
        cut = (model(x2, t, cond) - model(x, t, cond)).abs().amax(dim=(0, 2, 3, 4))
    assert changed[2] > 1e-4 and cut[2] == 0
