"""Tests for diffkit.nn.unet: shapes for random configs, input errors, batch independence."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffkit as dk
from diffkit.nn import DENOISERS, UNet, UNetConfig
from diffkit.nn.unet import TemporalConfig
from diffkit.protocols import Conditioning
from diffkit.typing import ShapeError


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random non-zero weights everywhere (zero-initialised layers would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


@st.composite
def unet_setups(draw, max_blocks: int = 2):
    levels = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([4, 8]))
    mult = tuple(draw(st.sampled_from([1, 2])) for _ in range(levels))
    attention = tuple(f for f in (1, 2, 4)[:levels] if draw(st.booleans()))
    cross = draw(st.booleans())
    config = UNetConfig(
        in_channels=draw(st.integers(1, 4)),
        out_channels=draw(st.none() | st.integers(1, 3)),
        base_channels=groups,
        channel_mult=mult,
        blocks_per_level=draw(st.integers(1, max_blocks)),
        attention_resolutions=attention,
        attention_head_dim=4,
        mid_attention=draw(st.booleans()),
        context_dim=6 if cross else None,
        transformer_depth=draw(st.integers(1, max_blocks)),
        linear_projection=draw(st.booleans()),
        num_classes=draw(st.none() | st.just(3)),
        pooled_dim=draw(st.none() | st.just(5)),
        norm_groups=groups,
        scale_shift=draw(st.booleans()),
        prediction=draw(st.sampled_from(["epsilon", "x0", "v", "flow"])),
    )
    factor = config.downsampling_factor
    # at least 2x2 pixels at the coarsest level (GroupNorm needs 2 values per group)
    height = factor * draw(st.integers(2, 3))
    width = factor * draw(st.integers(2, 3))
    return config, height, width


def _cond(config: UNetConfig, batch: int) -> Conditioning | None:
    tokens = torch.randn(batch, 3, config.context_dim) if config.context_dim else None
    labels = torch.arange(batch) % 3 if config.num_classes else None
    pooled = torch.randn(batch, config.pooled_dim) if config.pooled_dim else None
    if tokens is None and labels is None and pooled is None:
        return None
    return Conditioning(tokens=tokens, labels=labels, pooled=pooled)


@settings(max_examples=6)
@given(setup=unet_setups(), batch=st.integers(1, 3))
def test_unet_maps_batch_shape_to_the_same_shape(setup, batch):
    config, height, width = setup
    model = UNet(config).eval()
    x = torch.randn(batch, config.in_channels, height, width)
    with torch.no_grad():
        out = model(x, torch.rand(batch), _cond(config, batch))
    out_channels = config.out_channels or config.in_channels
    assert out.shape == (batch, out_channels, height, width)
    assert torch.isfinite(out).all()
    assert model.prediction == config.prediction
    assert isinstance(model, dk.Denoiser)


@settings(max_examples=4)
@given(setup=unet_setups(max_blocks=1))
def test_unet_output_for_one_item_does_not_depend_on_another(setup):
    config, height, width = setup
    model = _randomize(UNet(config))
    x = torch.randn(3, config.in_channels, height, width)
    t = torch.rand(3)
    cond = _cond(config, 3)
    with torch.no_grad():
        before = model(x, t, cond)
        x2 = x.clone()
        x2[1] = torch.randn_like(x2[1])
        t2 = t.clone()
        t2[1] = 0.5 * t[1]
        after = model(x2, t2, cond)
    assert torch.allclose(before[[0, 2]], after[[0, 2]], atol=1e-5)
    assert not torch.allclose(before[1], after[1], atol=1e-5)


def test_unet_rejects_sizes_it_cannot_downsample_before_computing():
    config = UNetConfig(
        in_channels=1,
        base_channels=8,
        channel_mult=(1, 1, 1, 1),
        attention_resolutions=(),
        norm_groups=4,
        blocks_per_level=1,
        mid_attention=False,
    )
    model = UNet(config)
    with pytest.raises(ShapeError, match="height 28 is not a multiple of 8"):
        model(torch.randn(1, 1, 28, 32), torch.rand(1))
    with pytest.raises(ShapeError, match="width 20 is not a multiple of 8"):
        model(torch.randn(1, 1, 32, 20), torch.rand(1))
    with pytest.raises(ShapeError, match="3 channels, expected 1"):
        model(torch.randn(1, 3, 32, 32), torch.rand(1))
    with pytest.raises(ShapeError, match="'t'"):
        model(torch.randn(2, 1, 32, 32), torch.rand(3))


def test_unet_says_which_conditioning_is_missing():
    config = UNetConfig(
        in_channels=1,
        base_channels=8,
        channel_mult=(1, 2),
        attention_resolutions=(2,),
        norm_groups=4,
        attention_head_dim=4,
        context_dim=6,
        num_classes=2,
        blocks_per_level=1,
    )
    model = UNet(config)
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    with pytest.raises(ValueError, match="tokens"):
        model(x, t)
    with pytest.raises(ShapeError, match="context_dim=6"):
        model(x, t, Conditioning(tokens=torch.randn(2, 3, 5), labels=torch.zeros(2).long()))
    with pytest.raises(ValueError, match="labels"):
        model(x, t, Conditioning(tokens=torch.randn(2, 3, 6)))


def test_unet_cross_attention_follows_the_tokens_and_respects_the_mask():
    config = UNetConfig(
        in_channels=2,
        base_channels=8,
        channel_mult=(1, 2),
        attention_resolutions=(1, 2),
        norm_groups=4,
        attention_head_dim=4,
        context_dim=6,
        blocks_per_level=1,
    )
    model = _randomize(UNet(config))
    x, t = torch.randn(1, 2, 8, 8), torch.rand(1)
    tokens = torch.randn(1, 4, 6)
    mask = torch.tensor([[True, True, False, False]])
    with torch.no_grad():
        a = model(x, t, Conditioning(tokens=tokens, mask=mask))
        tokens2 = tokens.clone()
        tokens2[0, 3] += 5.0
        b = model(x, t, Conditioning(tokens=tokens2, mask=mask))
        c = model(x, t, Conditioning(tokens=tokens2))
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, c, atol=1e-4)


def test_unet_config_validates_and_builds_from_the_registry():
    with pytest.raises(ValueError, match="norm_groups"):
        UNetConfig(base_channels=12, norm_groups=8)
    with pytest.raises(ValueError, match="attention_resolutions"):
        UNetConfig(channel_mult=(1, 2), attention_resolutions=(4,))
    data = {
        "kind": "unet",
        "in_channels": 1,
        "base_channels": 8,
        "channel_mult": [1, 2],
        "attention_resolutions": [2],
        "norm_groups": 4,
        "attention_head_dim": 4,
        "prediction": "v",
    }
    model = DENOISERS.build(data)
    assert isinstance(model, UNet) and model.prediction == "v"
    assert DENOISERS.parse(model.config.to_json()) == model.config


def test_unet_config_rejects_time_features_that_ignore_time_or_are_nan():
    small = {"channel_mult": (1,), "norm_groups": 1, "attention_resolutions": ()}
    # the first level's width is the size of the sinusoidal time features
    with pytest.raises(ValueError, match=r"base_channels \* channel_mult\[0\] = 1 .* at least 2"):
        UNetConfig(base_channels=1, mid_attention=False, **small)
    with pytest.raises(ValueError, match=r"freq_shift 1\.0 equals half the 2"):
        UNetConfig(base_channels=2, freq_shift=1.0, mid_attention=False, **small)
    model = _randomize(UNet(UNetConfig(base_channels=2, mid_attention=False, **small)))
    x = torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        assert not torch.allclose(model(x, torch.tensor([0.1])), model(x, torch.tensor([0.9])))


def test_unet_trains_a_step():
    config = UNetConfig(
        in_channels=1,
        base_channels=8,
        channel_mult=(1, 2),
        attention_resolutions=(2,),
        norm_groups=4,
        attention_head_dim=4,
        blocks_per_level=1,
    )
    model = UNet(config)
    x = torch.randn(4, 1, 8, 8)
    loss = model(x, torch.rand(4)).pow(2).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def _small_conditioned_unet(dtype: torch.dtype = torch.float32) -> UNet:
    config = UNetConfig(
        in_channels=1,
        base_channels=8,
        channel_mult=(1, 2),
        attention_resolutions=(2,),
        norm_groups=4,
        attention_head_dim=4,
        blocks_per_level=1,
        context_dim=6,
        pooled_dim=5,
    )
    return UNet(config).to(dtype)


@pytest.mark.parametrize(
    ("model_dtype", "x_dtype", "cond_dtype", "named"),
    [
        (torch.float32, torch.bfloat16, torch.float32, "x_t is torch.bfloat16"),
        (torch.float32, torch.float64, torch.float32, "x_t is torch.float64"),
        (torch.float64, torch.float64, torch.float32, "Conditioning.tokens is torch.float32"),
        (torch.bfloat16, torch.bfloat16, torch.float32, "Conditioning.tokens is torch.float32"),
    ],
)
def test_unet_refuses_inputs_in_another_dtype_before_computing(
    model_dtype, x_dtype, cond_dtype, named
):
    model = _small_conditioned_unet(model_dtype)
    calls = []
    model.conv_in.register_forward_hook(lambda *args: calls.append(1))
    tokens = torch.randn(2, 3, 6, dtype=cond_dtype)
    cond = Conditioning(tokens=tokens, pooled=torch.randn(2, 5, dtype=model_dtype))
    with pytest.raises(ShapeError, match=rf"UNet: {named} but the model's parameters are "):
        model(torch.randn(2, 1, 8, 8, dtype=x_dtype), torch.rand(2), cond)
    assert not calls
    pooled = Conditioning(tokens=torch.randn(2, 3, 6, dtype=model_dtype), pooled=torch.randn(2, 5))
    if model_dtype != torch.float32:
        with pytest.raises(ShapeError, match=r"Conditioning.pooled is torch.float32.*\.to\("):
            model(torch.randn(2, 1, 8, 8, dtype=model_dtype), torch.rand(2), pooled)


def test_unet_trains_a_step_under_bf16_autocast():
    """precision="bf16" training: float32 model and inputs inside torch.autocast."""
    model = _small_conditioned_unet()
    cond = Conditioning(tokens=torch.randn(2, 3, 6), pooled=torch.randn(2, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 1, 8, 8), torch.rand(2), cond)
        also = model(torch.randn(2, 1, 8, 8, dtype=torch.bfloat16), torch.rand(2), cond)
    assert out.dtype == also.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in model.conv_in.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ShapeError, match="float64"):
        model(torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.rand(2), cond)


def _space_time_unet(**temporal: object) -> UNet:
    """A tiny text-conditioned space-time U-Net, every weight random (none zero)."""
    config = UNetConfig(
        in_channels=2,
        base_channels=8,
        channel_mult=(1, 2),
        blocks_per_level=1,
        attention_resolutions=(1,),
        attention_head_dim=4,
        norm_groups=4,
        context_dim=6,
        temporal=TemporalConfig(input_heads=2, dropout=0.0, **temporal),  # type: ignore[arg-type]
    )
    return _randomize(UNet(config))


def _video_cond(batch: int, temporal: list[bool] | None = None) -> Conditioning:
    tokens = torch.randn(batch, 3, 6, generator=torch.Generator().manual_seed(5))
    flags = torch.tensor(temporal) if temporal is not None else None
    return Conditioning(tokens=tokens, temporal=flags)


def _is_temporal(name: str) -> bool:
    return name.startswith("temporal_in") or ".temporal_" in name


def test_space_time_unet_maps_videos_to_videos_and_mixes_frames():
    unet = _space_time_unet()
    assert unet.config.is_video
    x = torch.randn(2, 3, 2, 8, 8)
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        out = unet(x, t, _video_cond(2))
        moved = x.clone()
        moved[:, 0] += 1.0  # change the first frame only
        other = unet(moved, t, _video_cond(2))
    assert out.shape == x.shape
    assert (other[:, 1:] - out[:, 1:]).abs().max() > 1e-3  # the later frames see it
    with pytest.raises(ShapeError, match="videos"):
        unet(x[:, 0], t, _video_cond(2))


def test_image_items_of_a_space_time_unet_are_the_image_unet_frame_by_frame():
    """temporal=False items: every temporal layer is the identity, so each frame is what the
    image U-Net with the same spatial weights gives for it, whatever the other frames are."""
    unet = _space_time_unet()
    image = UNet(unet.config.model_copy(update={"temporal": None}))
    missing, unexpected = image.load_state_dict(unet.state_dict(), strict=False)
    assert not missing and unexpected and all(_is_temporal(k) for k in unexpected)
    image.eval()
    x = torch.randn(2, 3, 2, 8, 8)
    t = torch.tensor([0.3, 0.7])
    cond = _video_cond(2, [False, True])
    with torch.no_grad():
        out = unet(x, t, cond)
        for f in range(3):
            frame = image(x[:, f], t, Conditioning(tokens=cond.tokens))
            assert torch.allclose(out[0, f], frame[0], atol=1e-5)
            assert not torch.allclose(out[1, f], frame[1], atol=1e-3)  # a clip mixes frames


@pytest.mark.parametrize("layers", [{}, {"attention": False}, {"conv": False}])
def test_temporal_layers_get_no_gradient_from_image_items_and_some_from_clips(layers):
    unet = _space_time_unet(**layers).train()
    x = torch.randn(4, 3, 2, 8, 8)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8])
    cond = _video_cond(4, [False, True, False, True])  # images at 0 and 2, clips at 1 and 3

    def grads(items: list[int]) -> dict[str, torch.Tensor]:
        unet.zero_grad()
        out = unet(x, t, cond)
        out[items].pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}

    from_images, from_clips = grads([0, 2]), grads([1, 3])
    temporal = [n for n, _ in unet.named_parameters() if _is_temporal(n)]
    spatial = [n for n, _ in unet.named_parameters() if not _is_temporal(n)]
    assert temporal and spatial
    assert all(n not in from_images or not from_images[n].any() for n in temporal)
    assert all(from_clips[n].abs().sum() > 0 for n in temporal)
    assert sum(from_images[n].abs().sum() for n in spatial if n in from_images) > 0


def test_conditioning_temporal_is_checked_kept_by_where_and_refused_by_image_networks():
    with pytest.raises(ShapeError, match="temporal"):
        Conditioning(temporal=torch.tensor([1, 0]))
    cond = _video_cond(2, [False, True])
    null = Conditioning(tokens=torch.zeros(1, 3, 6))
    dropped = cond.where(torch.tensor([False, False]), null)
    assert dropped.temporal is not None and dropped.temporal.tolist() == [False, True]
    image = UNet(_space_time_unet().config.model_copy(update={"temporal": None}))
    with pytest.raises(ValueError, match=r"Conditioning\.temporal"):
        image(torch.randn(2, 2, 8, 8), torch.rand(2), cond)


def test_temporal_config_refuses_a_u_net_with_no_temporal_layer():
    with pytest.raises(ValueError, match="input_heads"):
        TemporalConfig(conv=False, attention=False, input_heads=None)


@pytest.mark.parametrize("positions", ["none", "rotary", "sinusoidal"])
def test_temporal_attention_sees_frame_order_only_with_rotary_positions(positions):
    """Without temporal convolutions and positions the frames are a set: reversing a clip
    reverses the output. Rotary positions (relative, VDM's) let the attention tell the
    order, which a model needs to say which way a clip moves."""
    unet = _space_time_unet(conv=False, positions=positions).double().eval()
    x = torch.randn(2, 4, 2, 8, 8, generator=torch.Generator().manual_seed(1)).double()
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    cond = _video_cond(2).map(lambda v: v.double() if v.is_floating_point() else v)
    with torch.no_grad():
        out = unet(x, t, cond)
        flipped = unet(x.flip(1), t, cond).flip(1)
    gap = float((out - flipped).abs().max())
    if positions == "none":
        assert gap < 1e-12
    else:
        assert gap > 1e-6


def test_rotary_temporal_positions_need_even_heads():
    base = _space_time_unet().config.to_dict()
    temporal = {**base["temporal"], "positions": "rotary"}
    with pytest.raises(ValueError, match="attention_head_dim"):
        UNetConfig.model_validate({**base, "attention_head_dim": 3, "temporal": temporal})
    with pytest.raises(ValueError, match="num_heads"):
        UNetConfig.model_validate({**base, "num_heads": 8, "temporal": temporal})


def test_temporal_cross_attention_lets_the_text_steer_the_frames_and_needs_a_context():
    """With temporal.cross_attention the temporal attentions read the text: a clip's frames
    then change with the tokens even where only temporal layers could carry it; image
    items stay the image U-Net's."""
    unet = _space_time_unet(cross_attention=True).double().eval()
    plain = _space_time_unet().double().eval()
    assert sum(p.numel() for p in unet.parameters()) != sum(p.numel() for p in plain.parameters())
    x = torch.randn(2, 3, 2, 8, 8, generator=torch.Generator().manual_seed(2)).double()
    t = torch.tensor([0.4, 0.6], dtype=torch.float64)
    cond = _video_cond(2, [False, True]).map(lambda v: v.double() if v.is_floating_point() else v)
    image = UNet(unet.config.model_copy(update={"temporal": None})).double().eval()
    image.load_state_dict(unet.state_dict(), strict=False)
    with torch.no_grad():
        out = unet(x, t, cond)
        frame = image(x[:, 1], t, Conditioning(tokens=cond.tokens))
        layer = unet.temporal_in
        assert layer is not None
        h = torch.randn(6, 8, 8, 8, dtype=torch.float64)
        tokens = torch.randn(6, 3, 6, dtype=torch.float64)
        moved = (layer(h, 3, tokens) - layer(h, 3, tokens + 1.0)).abs().max()
    assert torch.allclose(out[0, 1], frame[0], atol=1e-10)
    assert moved > 1e-6  # the temporal attention's output follows the text
    with pytest.raises(ValueError, match="context_dim"):
        UNetConfig.model_validate(
            {**unet.config.to_dict(), "context_dim": None, "temporal": unet.config.temporal}
        )


def test_a_space_time_unet_with_frame_patches_compiles_to_the_eager_numbers() -> None:
    """torch.compile (aot_eager) of a space-time U-Net whose frames come in pairs: the output
    leaves conv_out channels-last under compile, and the frames must still come back out."""
    unet = _space_time_unet(frame_patch=2, cross_attention=True).eval()
    x = torch.randn(2, 4, 2, 8, 8, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([0.3, 0.7])
    cond = _video_cond(2)
    with torch.no_grad():
        eager = unet(x, t, cond)
        torch._dynamo.reset()
        compiled = torch.compile(unet, backend="aot_eager")(x, t, cond)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)


def test_grouped_cross_attention_equals_repeating_the_context() -> None:
    """A temporal attention's pixels read their clip's text together (``groups``): the same
    numbers as the plain way, each pixel's frames with their own copy of the text."""
    from einops import repeat

    from diffkit.nn.attention import TransformerBlock

    gen = torch.Generator().manual_seed(4)
    block = TransformerBlock(16, 2, 8, context_dim=6).double().eval()
    x = torch.randn(2 * 5, 3, 16, generator=gen, dtype=torch.float64)  # 2 clips x 5 pixels
    context = torch.randn(2, 7, 6, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    with torch.no_grad():
        grouped = block(x, context, mask, groups=5)
        plain = block(
            x, repeat(context, "b m d -> (b g) m d", g=5), repeat(mask, "b m -> (b g) m", g=5)
        )
        assert not torch.allclose(grouped, block(x, context.flip(0), mask.flip(0), groups=5))
    torch.testing.assert_close(grouped, plain, rtol=0, atol=1e-12)
    with pytest.raises(ShapeError, match="not 3 per context item"):
        block(x, context, mask, groups=3)


def test_frame_patches_stack_frames_as_channels_and_check_the_frame_count():
    """temporal.frame_patch=2: frames (0, 1), (2, 3), ... enter the first convolution together
    (so frame 0's output sees frame 1 before any temporal layer), and the output has every
    frame back in its place."""
    unet = _space_time_unet(frame_patch=2).double().eval()
    x = torch.randn(2, 4, 2, 8, 8, generator=torch.Generator().manual_seed(3)).double()
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    cond = _video_cond(2).map(lambda v: v.double() if v.is_floating_point() else v)
    with torch.no_grad():
        out = unet(x, t, cond)
        moved = x.clone()
        moved[:, 1] += 1.0
        other = unet(moved, t, cond)
    assert out.shape == x.shape
    assert float((other[:, 0] - out[:, 0]).abs().max()) > 1e-6
    assert unet.conv_in.in_channels == 4 and unet.conv_out.out_channels == 4
    with pytest.raises(ShapeError, match="frame_patch"):
        unet(x[:, :3], t, cond)
    with pytest.raises(ValueError, match="frame_patch"):
        unet(x, t, _video_cond(2, [True, False]))
