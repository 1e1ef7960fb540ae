"""PipelineConfig and build(): valid configs build and run, invalid ones name their fields."""

import json
from typing import Literal

import pytest
import torch
import yaml
from einops import rearrange
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import Field
from torch import nn

from diffkit.builder import PipelineConfig, build, compatibility_problems, parse_config, registry
from diffkit.config import Config, ValidationError
from diffkit.pipeline import Pipeline


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _unet(channels: int, *, levels: int = 1, context: int | None = None, **extra) -> dict:
    return {
        "kind": "unet",
        "in_channels": channels,
        "base_channels": 8,
        "channel_mult": [1, 2][:levels],
        "blocks_per_level": 1,
        "attention_resolutions": [],
        "mid_attention": context is not None,
        "attention_head_dim": 8,
        "norm_groups": 4,
        "context_dim": context,
        **extra,
    }


def _kl(in_channels: int, latent: int, levels: int = 2) -> dict:
    return {
        "kind": "kl_autoencoder",
        "in_channels": in_channels,
        "base_channels": 8,
        "channel_mult": [1, 2, 2][:levels],
        "blocks_per_level": 1,
        "latent_channels": latent,
        "norm_groups": 4,
        "mid_attention": False,
    }


def _text(width: int) -> dict:
    return {
        "kind": "clip_text",
        "tokenizer": "byte",
        "text": {
            "kind": "clip_text_tower",
            "vocab_size": 260,
            "context_length": 8,
            "width": width,
            "layers": 1,
            "heads": 2,
        },
    }


@st.composite
def valid_configs(draw):
    channels = draw(st.sampled_from([1, 3]))
    encoder_kind = draw(st.sampled_from(["none", "identity", "kl"]))
    video = draw(st.booleans())
    denoiser_kind = "video_dit" if video else draw(st.sampled_from(["unet", "dit"]))
    latent = channels
    factor = 1
    encoder = None
    if encoder_kind == "identity":
        encoder = {"kind": "identity", "channels": channels}
    elif encoder_kind == "kl":
        latent = draw(st.integers(1, 4))
        levels = draw(st.integers(1, 2))
        factor = 2 ** (levels - 1)
        encoder = _kl(channels, latent, levels)
    text_width = draw(st.sampled_from([None, 16]))
    schedule = draw(st.sampled_from(["cosine", "linear_beta", "rectified_flow"]))
    # epsilon cannot give x0 where alpha(1) = 0 (the builder refuses that pairing)
    predictions = ["x0", "v", "flow"] if schedule == "rectified_flow" else ["epsilon", "v"]
    prediction = draw(st.sampled_from(predictions))
    if denoiser_kind == "unet":
        levels = draw(st.integers(1, 2))
        den_factor = 2 ** (levels - 1)
        denoiser = _unet(latent, levels=levels, context=text_width, prediction=prediction)
    else:
        den_factor = draw(st.sampled_from([1, 2]))
        denoiser = {
            "kind": denoiser_kind,
            "in_channels": latent,
            "dim": 16,
            "depth": 1,
            "num_heads": 2,
            "freq_dim": 16,
            "context_dim": text_width,
            "prediction": prediction,
        }
        if video:
            denoiser["patch_size"] = (1, den_factor, den_factor)
        else:
            denoiser["patch_size"] = den_factor
    side = factor * den_factor * draw(st.integers(1, 3)) * 2
    shape = (channels, side, side)
    if video:
        shape = (draw(st.integers(1, 3)), *shape)
    return PipelineConfig(
        data_shape=shape,
        schedule={"kind": schedule},
        denoiser=denoiser,
        encoder=encoder,
        text=_text(text_width) if text_width else None,
        sampler={"kind": draw(st.sampled_from(["ddim", "euler", "dpmpp", "unipc"]))},
    )


@settings(max_examples=20)
@given(valid_configs())
def test_valid_configs_build_and_denoise_to_the_promised_shape(config):
    pipeline = build(config)
    assert isinstance(pipeline, Pipeline)
    latent = pipeline.latent_shape()
    x = torch.randn(2, *latent)
    cond = pipeline.condition(["a", "b"]) if pipeline.text is not None else None
    with torch.no_grad():
        out = pipeline.denoiser(x, torch.rand(2), cond)
    assert out.shape == x.shape
    prompts = ["a three", "a seven"] if pipeline.text is not None else None
    sample = pipeline.generate(
        prompts, num_samples=None if prompts else 2, steps=2, generator=torch.Generator()
    )
    assert sample.shape == (2, *config.data_shape)
    # The config survives JSON and YAML.
    assert PipelineConfig.model_validate_json(config.to_json()) == config
    assert parse_config(yaml.safe_dump(config.to_dict())) == config


BREAKS = {
    "encoder latent channels": (
        lambda d: {**d, "encoder": _kl(1, 3)},
        ["encoder.latent_channels is 3", "denoiser.in_channels is 4"],
    ),
    "data channels": (
        lambda d: {**d, "data_shape": [3, 16, 16]},
        ["data_shape has 3 channels", "encoder.in_channels is 1"],
    ),
    "latent grid vs U-Net levels": (
        lambda d: {**d, "data_shape": [1, 10, 10], "encoder": _kl(1, 4, levels=3)},
        ["data_shape height 10", "encoder.downsampling_factor 4"],
    ),
    "latent grid vs U-Net downsampling": (
        lambda d: {**d, "data_shape": [1, 6, 6]},
        ["latent height 3", "denoiser.downsampling_factor 2"],
    ),
    "text width": (
        lambda d: {**d, "text": _text(24)},
        ["text.token_dim (the text token width) is 24", "denoiser.context_dim is 16"],
    ),
    "text without cross-attention": (
        lambda d: {**d, "denoiser": _unet(4, levels=2)},
        ["neither context_dim nor pooled_dim"],
    ),
    "patch size": (
        lambda d: {**d, "patchifier": {"kind": "spatial_patches", "patch_size": 3}},
        ["latent height 8 is not a multiple of patchifier.patch_size 3"],
    ),
    "video into a U-Net": (
        lambda d: {**d, "data_shape": [4, 1, 16, 16]},
        ["is a video but denoiser.kind 'unet' takes images"],
    ),
    "bad field value": (
        lambda d: {**d, "denoiser": {**_unet(4, levels=2, context=16), "base_channels": -1}},
        ["base_channels"],
    ),
    "unknown kind": (lambda d: {**d, "denoiser": {"kind": "nope"}}, ["unknown denoiser kind"]),
    "extra field": (
        lambda d: {**d, "colour": "red"},
        ["colour", "unknown field 'colour' for PipelineConfig"],
    ),
    "misspelled field": (
        lambda d: {**d, "denoser": d["denoiser"]},
        ["unknown field 'denoser' for PipelineConfig; did you mean 'denoiser'?"],
    ),
    "misspelled nested field": (
        lambda d: {**d, "schedule": {"kind": "cosine", "offst": 0.01}},
        ["schedule.offst", "unknown field 'offst' for Cosine; did you mean 'offset'?"],
    ),
    "bad prediction": (
        lambda d: {**d, "denoiser": {**_unet(4, levels=2, context=16), "prediction": "score"}},
        ["prediction"],
    ),
    "bad data shape": (lambda d: {**d, "data_shape": [16, 16]}, ["data_shape"]),
    "epsilon at zero terminal SNR": (
        lambda d: {**d, "schedule": {"kind": "rectified_flow"}},
        ["denoiser.prediction 'epsilon' cannot recover", "schedule.kind 'rectified_flow'"],
    ),
}


def _good() -> dict:
    return {
        "data_shape": [1, 16, 16],
        "schedule": {"kind": "cosine"},
        "denoiser": _unet(4, levels=2, context=16),
        "encoder": _kl(1, 4),
        "text": _text(16),
    }


def test_the_reference_config_is_valid():
    assert compatibility_problems(PipelineConfig.model_validate(_good())) == []


@settings(max_examples=len(BREAKS))
@given(st.sampled_from(sorted(BREAKS)))
def test_invalid_configs_raise_validation_errors_naming_the_fields(name):
    mutate, phrases = BREAKS[name]
    with pytest.raises(ValidationError) as info:
        PipelineConfig.model_validate(mutate(_good()))
    message = str(info.value)
    for phrase in phrases:
        assert phrase in message, (name, message)


def test_an_encoder_decoding_to_other_channels_than_the_data_is_rejected():
    # The decoder's out_channels, not only the encoder's in_channels, must match data_shape.
    data = {**_good(), "encoder": {**_kl(1, 4), "out_channels": 3}}
    with pytest.raises(ValidationError) as info:
        PipelineConfig.model_validate(data)
    assert "data_shape has 1 channels but encoder.out_channels is 3" in str(info.value)
    assert (
        compatibility_problems(
            PipelineConfig.model_validate({**_good(), "encoder": {**_kl(1, 4), "out_channels": 1}})
        )
        == []
    )


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_non_finite_guidance_is_rejected(value):
    with pytest.raises(ValidationError, match=r"(?s)guidance.*finite number"):
        PipelineConfig.model_validate({**_good(), "guidance": value})


def test_compatibility_is_checked_before_any_weight_is_allocated(monkeypatch):
    built = []
    monkeypatch.setattr(
        registry("denoiser"), "build", lambda *a, **k: built.append(a) or nn.Identity()
    )
    with pytest.raises(ValidationError):
        build({**_good(), "text": _text(24)})
    assert built == []


class SmallMLPConfig(Config):
    """A user's own denoiser config, registered like a built-in."""

    kind: Literal["test_small_mlp"] = "test_small_mlp"
    in_channels: int = Field(1, gt=0, description="channels")
    side: int = Field(8, gt=0, description="image side")
    width: int = Field(32, gt=0, description="hidden width")
    prediction: Literal["epsilon", "x0", "v", "flow"] = "epsilon"

    # What the builder checks (DenoiserSpec): declared, so this config is checked too.
    out_channels: None = None
    context_dim: None = None
    pooled_dim: None = None
    patch_size: None = None

    @property
    def downsampling_factor(self) -> int:
        return 1

    @property
    def is_video(self) -> bool:
        return False


class SmallMLP(nn.Module):
    def __init__(self, config: SmallMLPConfig) -> None:
        super().__init__()
        self.config = config  # what Pipeline.save records
        self.prediction = config.prediction
        n = config.in_channels * config.side**2
        self.net = nn.Sequential(
            nn.Linear(n + 1, config.width), nn.SiLU(), nn.Linear(config.width, n)
        )
        self.side = config.side

    def forward(self, x, t, cond=None):
        h = torch.cat([rearrange(x, "b c h w -> b (c h w)"), t[:, None].to(x.dtype)], 1)
        return rearrange(self.net(h), "b (c h w) -> b c h w", h=self.side, w=self.side)


registry("denoiser").register(SmallMLPConfig, SmallMLP, replace=True)


def test_user_registered_components_are_built_and_checked_like_builtins(tmp_path):
    config = PipelineConfig(
        data_shape=(1, 8, 8),
        schedule={"kind": "cosine"},
        denoiser={"kind": "test_small_mlp", "width": 16},
        sampler={"kind": "ddim"},
    )
    pipeline = build(json.loads(config.to_json()))
    assert isinstance(pipeline.denoiser, SmallMLP)
    assert pipeline.generate(num_samples=3, steps=2).shape == (3, 1, 8, 8)
    with pytest.raises(ValidationError, match=r"denoiser\.in_channels is 2"):
        PipelineConfig(
            data_shape=(1, 8, 8),
            schedule={"kind": "cosine"},
            denoiser={"kind": "test_small_mlp", "in_channels": 2},
        )
    pipeline.save(tmp_path)
    again = Pipeline.load(tmp_path)
    for a, b in zip(pipeline.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_schedule_given_as_a_bare_kind_name_names_the_field_and_the_fix():
    text = yaml.safe_dump({**_good(), "schedule": "cosine"})
    with pytest.raises(ValidationError) as info:
        parse_config(text)
    message = str(info.value)
    assert "schedule\n" in message and "e.g. {kind: cosine}" in message, message
    assert "Expecting value" not in message


@pytest.mark.parametrize("value", [1, None, ["data_shape"]])
def test_parse_config_of_a_non_mapping_is_a_clear_error(value):
    with pytest.raises(TypeError, match="a pipeline config must be a PipelineConfig, a mapping"):
        parse_config(value)


def test_a_pathlib_path_is_read_as_a_config_file(tmp_path):
    config = parse_config(_good())
    for name, text in (
        ("pipe.yaml", yaml.safe_dump(config.to_dict())),
        ("pipe.json", config.to_json()),
    ):
        (tmp_path / name).write_text(text)
        assert parse_config(tmp_path / name) == config
    assert isinstance(build(tmp_path / "pipe.yaml"), Pipeline)
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="is not a text"):
        parse_config(tmp_path / "binary.yaml")


def test_a_file_name_given_as_str_says_to_pass_a_path(tmp_path, monkeypatch):
    (tmp_path / "pipe").write_text(yaml.safe_dump(_good()))
    monkeypatch.chdir(tmp_path)
    for name in ("pipe.yaml", "configs/pipe.yml", str(tmp_path / "pipe.json"), "pipe"):
        with pytest.raises(ValueError, match="looks like a file path") as info:
            build(name)
        assert f"Path({name!r})" in str(info.value)
    with pytest.raises(ValueError, match="the config text is empty"):
        parse_config("")
    with pytest.raises(ValidationError, match="valid dictionary"):
        parse_config("cosine")  # a bare word that is no file stays pydantic's error


def test_unknown_registry_group_is_a_clear_error():
    with pytest.raises(ValueError, match="no component registry named 'nonsense'"):
        registry("nonsense")


def _leaves(data, path=()):
    if isinstance(data, dict):
        for key, value in data.items():
            if key != "kind":
                yield from _leaves(value, (*path, key))
    else:
        yield path


def _replace(data, path, value):
    if not path:
        return value
    return {**data, path[0]: _replace(data[path[0]], path[1:], value)}


GOOD_LEAVES = sorted(_leaves(_good()))
garbage = st.one_of(
    st.integers(-3, 40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.none(),
    st.booleans(),
    st.lists(st.integers(-1, 5), max_size=4),
)


@settings(max_examples=80)
@given(st.sampled_from(GOOD_LEAVES), garbage)
def test_any_field_value_gives_a_valid_config_or_a_validation_error_never_a_crash(path, value):
    data = _replace(_good(), path, value)
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError:
        return
    assert compatibility_problems(config) == []


def test_every_builtin_part_config_declares_what_the_builder_checks():
    from diffkit.protocols import DenoiserSpec, EncoderSpec, TextSpec

    config = PipelineConfig.model_validate(_good())
    assert isinstance(config.denoiser, DenoiserSpec)
    assert isinstance(config.encoder, EncoderSpec) and isinstance(config.text, TextSpec)
    for kind in ("dit", "video_dit"):
        denoiser = registry("denoiser").parse({"kind": kind})
        assert isinstance(denoiser, DenoiserSpec) and denoiser.is_video == (kind == "video_dit")
    identity = registry("encoder").parse({"kind": "identity", "channels": 2})
    assert isinstance(identity, EncoderSpec) and identity.latent_channels == 2


class OpaqueDenoiserConfig(Config):
    """A user's denoiser config that declares nothing: accepted, its checks skipped."""

    kind: Literal["test_opaque"] = "test_opaque"
    prediction: Literal["epsilon", "x0", "v", "flow"] = "x0"


registry("denoiser").register(OpaqueDenoiserConfig, SmallMLP, replace=True)


def test_a_config_that_declares_nothing_is_accepted_and_its_checks_skipped():
    config = PipelineConfig.model_validate(
        {**_good(), "denoiser": {"kind": "test_opaque"}, "data_shape": [1, 16, 16]}
    )
    assert compatibility_problems(config) == []  # neither channels nor text width guessed
