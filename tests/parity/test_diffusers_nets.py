"""diffkit's networks reproduce diffusers' UNet2DModel, UNet2DConditionModel and AutoencoderKL.

Small randomly initialised diffusers models are converted with ``dk.interop.from_diffusers``;
the converted denoiser, called at ``t = Discrete.t_from_index(timestep)``, must return what
diffusers returns for ``timestep`` (float32, CPU, <= 1e-5). Weights exported with
``to_diffusers_state_dict`` load into a fresh diffusers model with ``strict=True``.
"""

import logging
import warnings

import pytest
import torch

import diffkit as dk
from diffkit.nn import KLAutoencoder, KLAutoencoderConfig, UNet, UNetConfig
from diffkit.nn.layers import network_timestep

pytestmark = pytest.mark.parity
diffusers = pytest.importorskip("diffusers")

N_TRAIN = 1000
SCHEDULE = dk.schedules.Discrete.from_betas(torch.linspace(1e-4, 0.02, N_TRAIN))
TOL = 1e-5


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere, including layers diffusers initialises to zero / one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _build(cls, config: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _perturbed(cls(**config), seed)


def _assert_export_loads_strictly(cls, config, model, expected, *args, **kwargs) -> None:
    """Exported weights load with strict=True into a fresh diffusers model and reproduce it."""
    fresh = _build(cls, config, seed=1)
    fresh.load_state_dict(dk.interop.to_diffusers_state_dict(model), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(*args, **kwargs).sample, expected)


UNET2D_CONFIGS = {
    "plain_and_attention": {
        "sample_size": 16,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (16, 32),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
        "norm_num_groups": 8,
        "attention_head_dim": 8,
    },
    "three_levels_scale_shift_classes": {
        "sample_size": 16,
        "in_channels": 2,
        "out_channels": 1,
        "block_out_channels": (8, 16, 24),
        "layers_per_block": 2,
        "down_block_types": ("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"),
        "norm_num_groups": 4,
        "attention_head_dim": None,
        "attn_norm_num_groups": 4,
        "resnet_time_scale_shift": "scale_shift",
        "num_class_embeds": 5,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "center_input_sample": True,
        "mid_block_scale_factor": 1.414,
    },
    "no_mid_attention_first_width_not_the_unit": {
        "sample_size": 8,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": (12, 16),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D"),
        "norm_num_groups": 4,
        "add_attention": False,
        "downsample_padding": 0,
    },
}
UNET2D_CONFIGS["scale_shift_no_mid_attention"] = {
    **UNET2D_CONFIGS["plain_and_attention"],
    "sample_size": 8,
    "resnet_time_scale_shift": "scale_shift",
    "add_attention": False,  # no mid-block attention, so no attn_norm_num_groups needed
}

UNET_COND_CONFIGS = {
    "cross_attention": {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (16, 32),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "norm_num_groups": 8,
        "cross_attention_dim": 12,
        "attention_head_dim": 2,
    },
    "linear_projection_depth_two_pooled": {
        "sample_size": 8,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (8, 16, 16),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3,
        "up_block_types": ("CrossAttnUpBlock2D",) * 3,
        "norm_num_groups": 4,
        "cross_attention_dim": 6,
        "attention_head_dim": (2, 4, 4),
        "use_linear_projection": True,
        "transformer_layers_per_block": 2,
        "class_embed_type": "projection",
        "projection_class_embeddings_input_dim": 5,
        "time_embedding_dim": 40,
    },
    "class_labels_no_mid_block_attention_levels": {
        "sample_size": 8,
        "in_channels": 2,
        "out_channels": 2,
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D"),
        "norm_num_groups": 4,
        "cross_attention_dim": 8,
        "attention_head_dim": 4,
        "num_class_embeds": 3,
    },
}


@pytest.mark.parametrize("name", list(UNET2D_CONFIGS))
def test_unet2d_matches_diffusers_at_the_same_training_step(name):
    config = UNET2D_CONFIGS[name]
    reference = _build(diffusers.UNet2DModel, config)
    model = dk.interop.from_diffusers(reference)
    assert isinstance(model, UNet) and model.config.time_input == "index"
    g = torch.Generator().manual_seed(1)
    size = config["sample_size"]
    x = torch.randn(3, config["in_channels"], size, size, generator=g)
    timestep = torch.tensor([0, 417, 999])
    labels = torch.tensor([0, 4, 2]) if "num_class_embeds" in config else None
    with torch.no_grad():
        expected = reference(x, timestep, class_labels=labels).sample
        for t in (SCHEDULE.t_from_index(timestep), SCHEDULE.t_from_index(timestep).float()):
            got = model(x, t, dk.Conditioning(labels=labels) if labels is not None else None)
            assert (got - expected).abs().max() <= TOL
    _assert_export_loads_strictly(
        diffusers.UNet2DModel, config, model, expected, x, timestep, class_labels=labels
    )


@pytest.mark.parametrize("name", list(UNET_COND_CONFIGS))
def test_unet2d_condition_matches_diffusers_with_tokens_and_mask(name):
    config = UNET_COND_CONFIGS[name]
    reference = _build(diffusers.UNet2DConditionModel, config)
    model = dk.interop.from_diffusers(reference, prediction="v")
    assert model.prediction == "v"
    g = torch.Generator().manual_seed(2)
    size = config["sample_size"]
    x = torch.randn(2, config["in_channels"], size, size, generator=g)
    tokens = torch.randn(2, 5, config["cross_attention_dim"], generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    timestep = torch.tensor([3, 871])
    kwargs, cond = {}, {}
    if config.get("num_class_embeds"):
        kwargs["class_labels"] = cond["labels"] = torch.tensor([2, 0])
    if config.get("class_embed_type") == "projection":
        kwargs["class_labels"] = cond["pooled"] = torch.randn(2, 5, generator=g)
    with torch.no_grad():
        expected = reference(
            x, timestep, encoder_hidden_states=tokens, encoder_attention_mask=mask, **kwargs
        ).sample
        got = model(
            x,
            SCHEDULE.t_from_index(timestep),
            dk.Conditioning(tokens=tokens, mask=mask.bool(), **cond),
        )
    assert (got - expected).abs().max() <= TOL
    _assert_export_loads_strictly(
        diffusers.UNet2DConditionModel,
        config,
        model,
        expected,
        x,
        timestep,
        encoder_hidden_states=tokens,
        encoder_attention_mask=mask,
        **kwargs,
    )


VAE_CONFIGS = {
    "two_levels": {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "block_out_channels": (16, 32),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
    },
    "three_levels_no_quant_conv_no_mid_attention_shift": {
        "in_channels": 1,
        "out_channels": 2,
        "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3,
        "block_out_channels": (8, 16, 16),
        "layers_per_block": 1,
        "latent_channels": 3,
        "norm_num_groups": 4,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": False,
        "scaling_factor": 0.5,
        "shift_factor": 0.25,
    },
}


@pytest.mark.parametrize("name", list(VAE_CONFIGS))
def test_autoencoder_kl_encode_and_decode_match_diffusers(name):
    config = VAE_CONFIGS[name]
    reference = _build(diffusers.AutoencoderKL, config)
    model = dk.interop.from_diffusers(reference)
    assert isinstance(model, KLAutoencoder)
    scale = reference.config.scaling_factor
    shift = reference.config.shift_factor or 0.0
    x = torch.randn(2, config["in_channels"], 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dist = reference.encode(x).latent_dist
        z = model.encode(x)
        assert (z - (dist.mean - shift) * scale).abs().max() <= TOL
        posterior = model.posterior(x)
        assert (posterior.logvar - dist.logvar).abs().max() <= TOL
        assert (posterior.kl() - dist.kl()).abs().max() <= 1e-4 * dist.kl().abs().max()
        expected = reference.decode(z / scale + shift).sample
        assert (model.decode(z) - expected).abs().max() <= TOL
    fresh = _build(diffusers.AutoencoderKL, config, seed=5)
    fresh.load_state_dict(dk.interop.to_diffusers_state_dict(model), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh.encode(x).latent_dist.mean, dist.mean)


def test_unsupported_diffusers_options_are_refused_by_name():
    config = dict(UNET2D_CONFIGS["plain_and_attention"], time_embedding_type="fourier")
    with pytest.raises(ValueError, match="time_embedding_type"):
        dk.interop.from_diffusers(_build(diffusers.UNet2DModel, config))
    config = dict(
        UNET2D_CONFIGS["plain_and_attention"],
        down_block_types=("DownBlock2D", "SkipDownBlock2D"),
        up_block_types=("SkipUpBlock2D", "UpBlock2D"),
    )
    with pytest.raises(ValueError, match="SkipDownBlock2D"):
        dk.interop.from_diffusers(_build(diffusers.UNet2DModel, config))
    with pytest.raises(TypeError, match="cannot convert"):
        dk.interop.from_diffusers(torch.nn.Linear(2, 2))
    # diffusers builds this mid block with one resnet: diffkit's has two
    config = dict(UNET_COND_CONFIGS["cross_attention"], mid_block_type="UNetMidBlock2D")
    with pytest.raises(ValueError, match="mid_block_type='UNetMidBlock2D'"):
        dk.interop.from_diffusers(_build(diffusers.UNet2DConditionModel, config))
    # with scale_shift, the mid-block attention's GroupNorm needs attn_norm_num_groups
    config = dict(UNET2D_CONFIGS["plain_and_attention"], resnet_time_scale_shift="scale_shift")
    with pytest.raises(ValueError, match="attn_norm_num_groups"):
        dk.interop.from_diffusers(_build(diffusers.UNet2DModel, config))


NATIVE_UNETS = {
    "self_attention": UNetConfig(
        in_channels=2,
        base_channels=8,
        channel_mult=(1, 2),
        blocks_per_level=1,
        attention_resolutions=(2,),
        attention_head_dim=4,
        norm_groups=4,
        num_classes=3,
        scale_shift=True,
        time_input="index",
    ),
    "cross_attention_pooled": UNetConfig(
        in_channels=3,
        base_channels=8,
        channel_mult=(1, 2, 2),
        blocks_per_level=1,
        attention_resolutions=(1, 4),
        attention_head_dim=4,
        norm_groups=4,
        context_dim=6,
        pooled_dim=5,
        linear_projection=True,
        time_input="index",
    ),
}


@pytest.mark.parametrize("name", list(NATIVE_UNETS))
def test_native_unet_exports_to_an_equivalent_diffusers_model(name):
    config = NATIVE_UNETS[name]
    model = _perturbed(UNet(config), seed=4)
    exported = dk.interop.to_diffusers(model).eval()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, config.in_channels, 8, 8, generator=g)
    timestep = torch.tensor([5, 640])
    kwargs, cond = {}, {}
    if config.num_classes:
        kwargs["class_labels"] = cond["labels"] = torch.tensor([2, 1])
    if config.pooled_dim:
        kwargs["class_labels"] = cond["pooled"] = torch.randn(2, 5, generator=g)
    if config.context_dim:
        kwargs["encoder_hidden_states"] = cond["tokens"] = torch.randn(2, 3, 6, generator=g)
    with torch.no_grad():
        expected = exported(x, timestep, **kwargs).sample
        got = model(x, SCHEDULE.t_from_index(timestep), dk.Conditioning(**cond))
    assert (got - expected).abs().max() <= TOL


def test_native_autoencoder_exports_to_an_equivalent_diffusers_model():
    config = KLAutoencoderConfig(
        in_channels=1, base_channels=8, channel_mult=(1, 2), blocks_per_level=1, norm_groups=4
    )
    model = _perturbed(KLAutoencoder(config), seed=6)
    exported = dk.interop.to_diffusers(model).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        mean = exported.encode(x).latent_dist.mean
        assert (model.encode(x) - mean * config.scaling_factor).abs().max() <= TOL


ROUND_TRIP_UNETS = {
    "continuous_time_self_attention_v": UNetConfig(
        in_channels=3,
        base_channels=8,
        channel_mult=(1, 2),
        blocks_per_level=1,
        attention_resolutions=(2,),
        attention_head_dim=4,
        norm_groups=4,
        prediction="v",
    ),
    "continuous_time_scale_one_cross_attention_x0": UNetConfig(
        in_channels=4,
        base_channels=8,
        channel_mult=(1, 2),
        blocks_per_level=1,
        attention_resolutions=(1,),
        attention_head_dim=4,
        norm_groups=4,
        context_dim=6,
        time_scale=1.0,
        prediction="x0",
    ),
    "index_500_steps_cross_attention_flow": UNetConfig(
        in_channels=2,
        base_channels=8,
        channel_mult=(1, 2),
        blocks_per_level=1,
        attention_resolutions=(2,),
        attention_head_dim=4,
        norm_groups=4,
        context_dim=6,
        time_input="index",
        num_train_timesteps=500,
        prediction="flow",
    ),
}
RECORDED = ("time_input", "time_scale", "num_train_timesteps", "prediction")


@pytest.mark.parametrize("name", list(ROUND_TRIP_UNETS))
def test_unet_round_trip_through_diffusers_is_exact(name, tmp_path):
    config = ROUND_TRIP_UNETS[name]
    model = _perturbed(UNet(config), seed=7)
    exported = dk.interop.to_diffusers(model).eval()
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, config.in_channels, 8, 8, generator=g)
    t = torch.tensor([0.3, 0.8])
    cond = dk.Conditioning(tokens=torch.randn(2, 3, 6, generator=g)) if config.context_dim else None
    kwargs = {"encoder_hidden_states": cond.tokens} if cond is not None else {}
    with torch.no_grad():
        expected = model(x, t, cond)
        # diffusers' forward takes network_timestep(t): time_scale * t or the index N t - 1
        timestep = network_timestep(
            t, config.time_input, config.num_train_timesteps, config.time_scale
        )
        assert (exported(x, timestep, **kwargs).sample - expected).abs().max() <= TOL
    exported.save_pretrained(tmp_path)
    reloaded = type(exported).from_pretrained(tmp_path).eval()
    for source in (exported, reloaded):
        back = dk.interop.from_diffusers(source)
        assert isinstance(back, UNet)
        for field in RECORDED:
            assert getattr(back.config, field) == getattr(config, field), field
        assert back.prediction == config.prediction
        with torch.no_grad():
            assert (back(x, t, cond) - expected).abs().max() <= 1e-6
    # explicit arguments still win over what was recorded
    back = dk.interop.from_diffusers(exported, prediction="epsilon", num_train_timesteps=250)
    assert (back.prediction, back.config.num_train_timesteps) == ("epsilon", 250)
    assert back.config.time_input == config.time_input


class _Records(logging.Handler):
    """Collects the log records of a logger that does not propagate (diffusers' does not)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_export_logs_and_prints_nothing(capfd):
    model = _perturbed(UNet(NATIVE_UNETS["self_attention"]), seed=4)
    records, logger = _Records(), logging.getLogger("diffusers")
    logger.addHandler(records)
    capfd.readouterr()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            exported = dk.interop.to_diffusers(model)
            assert next(exported.parameters()).dtype == torch.float32
            wide = dk.interop.to_diffusers(model.to(torch.float64))
            assert next(wide.parameters()).dtype == torch.float64
    finally:
        logger.removeHandler(records)
    assert records.messages == []
    assert capfd.readouterr() == ("", "")


def test_a_pipeline_of_converted_diffusers_parts_saves_and_loads(tmp_path):
    """A U-Net and a scheduler converted from diffusers make a pipeline that saves (issue 18)."""
    model = _build(diffusers.UNet2DModel, UNET2D_CONFIGS["plain_and_attention"])
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=N_TRAIN)
    schedule = dk.schedules.Discrete.from_alphas_cumprod(scheduler.alphas_cumprod.double())
    channels = model.config.in_channels
    size = model.config.sample_size
    pipeline = dk.Pipeline(
        schedule, dk.interop.from_diffusers(model), data_shape=(channels, size, size), steps=3
    )
    loaded = dk.Pipeline.load(pipeline.save(tmp_path / "converted"))
    assert loaded.config == pipeline.config
    run = {"num_samples": 2, "steps": 3}
    first = pipeline.generate(generator=torch.Generator().manual_seed(3), **run)
    again = loaded.generate(generator=torch.Generator().manual_seed(3), **run)
    assert torch.equal(first, again)
