"""Pipeline: generation, img2img, save/load round trips and plain-Python composition."""

import json
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Literal

import pytest
import torch
from pydantic import Field

from diffkit.builder import PipelineConfig, build, registry
from diffkit.checkpoint import CheckpointError
from diffkit.forward import add_noise
from diffkit.nn.unet import UNet, UNetConfig
from diffkit.patches import SpatialPatches
from diffkit.pipeline import Pipeline
from diffkit.protocols import Conditioning
from diffkit.samplers import DDIM, REGISTRY, Explicit, LogSNR, UniformTime
from diffkit.schedules import Cosine, Discrete, ScheduleBase, discrete_betas
from diffkit.typing import ShapeError


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _text_latent_config(tokenizer: str = "byte", **text_extra) -> PipelineConfig:
    return PipelineConfig(
        data_shape=(1, 16, 16),
        schedule={"kind": "cosine"},
        denoiser={
            "kind": "unet",
            "in_channels": 4,
            "base_channels": 8,
            "channel_mult": [1, 2],
            "blocks_per_level": 1,
            "attention_resolutions": [2],
            "attention_head_dim": 8,
            "norm_groups": 4,
            "context_dim": 16,
        },
        encoder={
            "kind": "kl_autoencoder",
            "in_channels": 1,
            "base_channels": 8,
            "channel_mult": [1, 2],
            "blocks_per_level": 1,
            "latent_channels": 4,
            "norm_groups": 4,
        },
        text={
            "kind": "clip_text",
            "tokenizer": tokenizer,
            "text": {
                "kind": "clip_text_tower",
                "vocab_size": 49408 if tokenizer == "clip_bpe" else 260,
                "context_length": 8,
                "width": 16,
                "layers": 1,
                "heads": 2,
            },
            **text_extra,
        },
        sampler={"kind": "dpmpp"},
        steps=3,
        guidance=3.0,
    )


@pytest.fixture(scope="module")
def text_pipeline():
    torch.manual_seed(0)
    return build(_text_latent_config())


def test_save_load_generate_gives_identical_samples(tmp_path, text_pipeline):
    prompts = ["a handwritten 3", "the number 7"]
    before = text_pipeline.generate(prompts, generator=torch.Generator().manual_seed(1))
    assert before.shape == (2, 1, 16, 16)
    text_pipeline.save(tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    loaded = Pipeline.load(tmp_path / "p")
    assert loaded.config == text_pipeline.config
    after = loaded.generate(prompts, generator=torch.Generator().manual_seed(1))
    assert torch.equal(before, after)
    for (k, a), (j, b) in zip(
        text_pipeline.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k == j and torch.equal(a, b)


def test_generation_is_reproducible_per_seed_and_guidance_changes_it(text_pipeline):
    def run(seed, guidance=None, sampler=None):
        gen = torch.Generator().manual_seed(seed)
        return text_pipeline.generate(["a 1"], generator=gen, guidance=guidance, sampler=sampler)

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    assert not torch.equal(run(0), run(0, guidance=1.0))
    assert not torch.equal(run(0), run(0, sampler="ddim"))
    negative = text_pipeline.generate(
        ["a 1"], negative_prompts="a 2", generator=torch.Generator().manual_seed(0)
    )
    assert not torch.equal(run(0), negative)


def test_latents_and_encode_decode(text_pipeline):
    z = text_pipeline.generate(["x"], decode=False, generator=torch.Generator().manual_seed(0))
    assert z.shape == (1, 4, 8, 8)
    assert text_pipeline.decode(z).shape == (1, 1, 16, 16)
    assert text_pipeline.encode(torch.zeros(2, 1, 16, 16)).shape == (2, 4, 8, 8)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda p: p.img2img(torch.zeros(1, 1, 16, 16), ["a", "b"]),
            "x's batch is 1 but got 2 prompts; pass 1$",
        ),
        (
            lambda p: p.generate("a", num_samples=3, noise=torch.zeros(2, 4, 8, 8)),
            "noise has batch 2 but num_samples is 3$",
        ),
        (
            lambda p: p.generate(["a", "b"], noise=torch.zeros(3, 4, 8, 8)),
            "noise's batch is 3 but got 2 prompts; pass 1 or 3$",
        ),
        (
            lambda p: p.generate(["a", "b"], num_samples=3),
            "num_samples is 3 but got 2 prompts; pass 1 or 3$",
        ),
        (
            lambda p: p.generate(["a", "b", "c"], negative_prompts=["x", "y"]),
            "the batch is 3 but got 2 negative_prompts; pass 1 or 3$",
        ),
        (
            lambda p: p.generate(["a", "b", "c"], uncond=p.condition(["x", "y"]), guidance=2.0),
            "the batch is 3 but got uncond of batch 2; pass 1 or 3$",
        ),
    ],
)
def test_batch_mismatches_name_the_arguments(text_pipeline, call, message):
    with pytest.raises(ValueError, match=message):
        call(text_pipeline)


def test_load_detects_mismatched_and_corrupt_files_and_names_keys(tmp_path, text_pipeline):
    folder = tmp_path / "p"
    text_pipeline.save(folder)
    config = json.loads((folder / "config.json").read_text())
    config["denoiser"]["base_channels"] = 16  # a different architecture for the same weights
    config["denoiser"]["norm_groups"] = 8
    (folder / "config.json").write_text(json.dumps(config))
    edited = pytest.warns(UserWarning, match=r"is not the config .*model\.safetensors was saved")
    with edited, pytest.raises(CheckpointError, match=r"mis-shaped keys: .*denoiser\.conv_in"):
        Pipeline.load(folder)

    text_pipeline.save(folder)
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        Pipeline.load(folder)

    text_pipeline.save(folder)
    config = json.loads((folder / "config.json").read_text())
    config["encoder"] = None
    config["denoiser"]["in_channels"] = 1
    config["denoiser"]["out_channels"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    edited = pytest.warns(UserWarning, match=r"is not the config .*model\.safetensors was saved")
    with edited, pytest.raises(CheckpointError, match=r"unexpected keys: encoder\."):
        Pipeline.load(folder)

    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        Pipeline.load(folder)


@pytest.mark.parametrize("content", ["1", "null", "[]", '"cosine"'])
def test_a_config_json_that_is_not_an_object_names_the_file(tmp_path, text_pipeline, content):
    text_pipeline.save(tmp_path)
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match=r"config\.json does not hold a JSON object"):
        Pipeline.load(tmp_path)


def test_load_never_unpickles(tmp_path, text_pipeline, monkeypatch):
    text_pipeline.save(tmp_path)

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling is forbidden")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    Pipeline.load(tmp_path)


def test_tokenizer_files_travel_with_the_saved_pipeline(tmp_path):
    pytest.importorskip("open_clip")  # ships the CLIP BPE merges file
    torch.manual_seed(0)
    pipeline = build(_text_latent_config("clip_bpe"))
    pipeline.save(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    vocab = config["text"]["vocab_path"]
    assert vocab.startswith("tokenizer/") and (tmp_path / "a" / vocab).is_file()
    shutil.move(tmp_path / "a", tmp_path / "b")  # the folder is self-contained
    loaded = Pipeline.load(tmp_path / "b")
    prompts = ["a drawing of a seven"]
    assert torch.equal(
        pipeline.generate(prompts, generator=torch.Generator().manual_seed(3)),
        loaded.generate(prompts, generator=torch.Generator().manual_seed(3)),
    )


def test_unconditional_video_pipeline_generates_videos(tmp_path):
    config = PipelineConfig(
        data_shape=(4, 1, 8, 8),
        schedule={"kind": "rectified_flow"},
        denoiser={
            "kind": "video_dit",
            "in_channels": 1,
            "patch_size": [2, 2, 2],
            "dim": 16,
            "depth": 1,
            "num_heads": 2,
            "freq_dim": 16,
            "prediction": "flow",
        },
        patchifier={"kind": "tubelet_patches", "patch_size": [2, 2, 2]},
        sampler={"kind": "euler"},
    )
    pipeline = build(config)
    videos = pipeline.generate(num_samples=2, steps=2, generator=torch.Generator().manual_seed(0))
    assert videos.shape == (2, 4, 1, 8, 8)
    assert pipeline.patchifier is not None
    assert pipeline.patchifier.patchify(videos).shape == (2, 2 * 4 * 4, 8)
    pipeline.save(tmp_path)
    again = Pipeline.load(tmp_path).generate(
        num_samples=2, steps=2, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(videos, again)


SPACE_TIME_UNET = {
    "kind": "unet",
    "in_channels": 1,
    "base_channels": 8,
    "channel_mult": [1, 2],
    "blocks_per_level": 1,
    "attention_resolutions": [1],
    "attention_head_dim": 4,
    "norm_groups": 4,
    "temporal": {"kind": "temporal", "input_heads": 2},
}


def test_space_time_unet_pipeline_generates_videos_and_refuses_image_data(tmp_path):
    config = PipelineConfig(
        data_shape=(3, 1, 8, 8), schedule={"kind": "cosine"}, denoiser=SPACE_TIME_UNET
    )
    pipeline = build(config)
    videos = pipeline.generate(num_samples=2, steps=2, generator=torch.Generator().manual_seed(0))
    assert videos.shape == (2, 3, 1, 8, 8)
    pipeline.save(tmp_path)
    again = Pipeline.load(tmp_path).generate(
        num_samples=2, steps=2, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(videos, again)
    with pytest.raises(ValueError, match="takes videos"):
        PipelineConfig(data_shape=(1, 8, 8), schedule={"kind": "cosine"}, denoiser=SPACE_TIME_UNET)


def test_class_conditional_generation_with_guidance():
    config = PipelineConfig(
        data_shape=(1, 8, 8),
        schedule={"kind": "cosine"},
        denoiser={
            "kind": "dit",
            "in_channels": 1,
            "patch_size": 2,
            "dim": 16,
            "depth": 1,
            "num_heads": 2,
            "freq_dim": 16,
            "num_classes": 11,
            "prediction": "v",
        },
    )
    pipeline = build(config)
    cond = Conditioning(labels=torch.tensor([3, 7]))
    null = Conditioning(labels=torch.tensor([10]))
    out = pipeline.generate(cond=cond, uncond=null, guidance=2.0, steps=2, sampler="ddim")
    assert out.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="guidance != 1 needs an unconditional"):
        pipeline.generate(cond=cond, guidance=2.0, steps=2)
    with pytest.raises(ValueError, match="prompts need a text conditioner"):
        pipeline.generate(["a"], steps=2)
    with pytest.raises(ValueError, match="unknown sampler"):
        pipeline.generate(cond=cond, steps=2, sampler="nope")


class RecordingDenoiser:
    """A plain class (no nn.Module, not registered) that satisfies the Denoiser protocol."""

    prediction = "x0"

    def __init__(self, target: torch.Tensor) -> None:
        self.target = target
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x_t, t, cond=None):
        self.calls.append((x_t.clone(), t.clone()))
        return self.target.expand_as(x_t).to(x_t.dtype)


def test_img2img_starts_from_the_noised_input_at_strength():
    target = torch.full((1, 1, 4, 4), 0.25)
    denoiser = RecordingDenoiser(target)
    schedule = Cosine()
    pipeline = Pipeline(schedule, denoiser, sampler=REGISTRY["ddim"](), data_shape=(1, 4, 4))
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = pipeline.img2img(x, strength=0.4, steps=4, generator=torch.Generator().manual_seed(5))
    eps = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    expected_start = add_noise(schedule, x, eps, torch.full((2,), 0.4))
    first_x, first_t = denoiser.calls[0]
    torch.testing.assert_close(first_x, expected_start, rtol=1e-5, atol=1e-6)
    assert torch.allclose(first_t, torch.full((2,), 0.4))
    assert all(float(t.max()) <= 0.4 + 1e-6 for _, t in denoiser.calls)
    assert len(denoiser.calls) == 4
    # a perfect x0-predictor of a single point lands on it
    torch.testing.assert_close(out, target.expand(2, 1, 4, 4), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="strength"):
        pipeline.img2img(x, strength=0.0)


def test_plain_python_components_compose_without_registration():
    denoiser = RecordingDenoiser(torch.zeros(1, 2, 3, 3))
    pipeline = Pipeline(Cosine(), denoiser, data_shape=(2, 3, 3))
    out = pipeline.generate(num_samples=3, steps=2, sampler=REGISTRY["euler"]())
    assert out.shape == (3, 2, 3, 3)
    assert len(denoiser.calls) >= 2
    with pytest.raises(ValueError, match=r"Pipeline.save: denoiser RecordingDenoiser has no regis"):
        pipeline.save("unused")
    with pytest.raises(TypeError, match="prediction"):
        Pipeline(Cosine(), object())  # type: ignore[arg-type]


def test_unconditional_generation_from_a_text_pipeline_uses_the_empty_prompt(text_pipeline):
    gen = torch.Generator
    free = text_pipeline.generate(num_samples=2, generator=gen().manual_seed(4))
    empty = text_pipeline.generate(["", ""], guidance=1.0, generator=gen().manual_seed(4))
    assert free.shape == (2, 1, 16, 16)
    assert torch.equal(free, empty)


class HalfResolution:
    """A plain-Python Encoder: 2x2 average pooling down, nearest-neighbour up."""

    latent_channels = 1
    scaling_factor = 1.0

    def latent_shape(self, shape):
        c, h, w = shape
        return (c, h // 2, w // 2)

    def encode(self, x):
        return torch.nn.functional.avg_pool2d(x, 2)

    def decode(self, z):
        return torch.nn.functional.interpolate(z, scale_factor=2.0, mode="nearest")


def test_a_plain_python_encoder_makes_a_latent_pipeline():
    denoiser = RecordingDenoiser(torch.zeros(1, 1, 4, 4))
    pipeline = Pipeline(
        Cosine(),
        denoiser,
        encoder=HalfResolution(),
        data_shape=(1, 8, 8),
        sampler=REGISTRY["ddim"](),
    )
    out = pipeline.generate(num_samples=2, steps=2)
    assert out.shape == (2, 1, 8, 8)
    assert denoiser.calls[0][0].shape == (2, 1, 4, 4)  # the denoiser works on latents
    assert pipeline.img2img(out, strength=0.5, steps=2).shape == (2, 1, 8, 8)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda p: p.generate("a", num_samples=0), ValueError, "num_samples must be at least 1"),
        (lambda p: p.generate("a", num_samples=-1), ValueError, "num_samples must be at least 1"),
        (lambda p: p.generate("a", num_samples=2.0), TypeError, "num_samples must be an int"),
        (lambda p: p.generate("a", num_samples=True), TypeError, "num_samples must be an int"),
        (lambda p: p.generate({"a", "b"}), TypeError, "prompts must be a str or a list .* set"),
        (
            lambda p: p.generate(s for s in ["a", "b"]),
            TypeError,
            "prompts must be a str or a list of str, got generator; pass a list",
        ),
        (lambda p: p.generate(["a", None]), TypeError, r"prompts\[1\] is NoneType"),
        (
            lambda p: p.generate(["a"], negative_prompts={"x"}),
            TypeError,
            "negative_prompts must be a str or a list of str, got set",
        ),
        (lambda p: p.condition({"a"}), TypeError, "prompts must be a str or a list"),
        (
            lambda p: p.generate("a", noise=torch.zeros(1, 4, 8, 8, dtype=torch.uint8)),
            ShapeError,
            "Pipeline.generate: argument 'noise' has dtype torch.uint8, expected one of",
        ),
        (
            lambda p: p.img2img(torch.full((1, 1, 16, 16), 255, dtype=torch.uint8), "a"),
            ShapeError,
            "Pipeline.img2img: argument 'x' has dtype torch.uint8, expected one of",
        ),
        (
            lambda p: p.generate("a", noise=torch.randn(1, 3, 8, 8)),
            ShapeError,
            r"noise has 3 channels \(dimension 1 of \(1, 3, 8, 8\)\), expected 4: the "
            r"encoder's latent channels \(shape \(4, 8, 8\)\); pass noise with 4 channels",
        ),
        (
            lambda p: p.generate("a", noise=torch.randn(1, 2, 4, 8, 8)),
            ShapeError,
            r"noise has 5 dimensions \(1, 2, 4, 8, 8\), expected 4: .* pass noise of shape "
            r"\(batch, 4, 8, 8\)",
        ),
        (
            lambda p: p.img2img(torch.randn(1, 3, 16, 16), "a"),
            ShapeError,
            r"Pipeline.img2img: x has 3 channels \(dimension 1 of \(1, 3, 16, 16\)\), "
            r"expected 1: data_shape's channels .* pass x with 1 channel ",
        ),
        (
            lambda p: p.img2img(torch.randn(1, 16, 16), "a"),
            ShapeError,
            r"Pipeline.img2img: x has 3 dimensions \(1, 16, 16\), expected 4: .* pass x of "
            r"shape \(batch, 1, 16, 16\)",
        ),
        (
            lambda p: p.generate(negative_prompts="x"),
            ValueError,
            "Pipeline.generate: negative_prompts has no effect on an unconditional call .* "
            "pass prompts= \\(prompts='' guides away from the negative prompts alone\\)",
        ),
        (
            lambda p: p.img2img(torch.zeros(1, 1, 16, 16), uncond=p.condition(["x"])),
            ValueError,
            "Pipeline.img2img: uncond has no effect on an unconditional call",
        ),
        (
            lambda p: p.generate("a", negative_prompts="x", uncond=p.condition(["y"])),
            ValueError,
            "Pipeline.generate: pass uncond or negative_prompts, not both",
        ),
    ],
)
def test_bad_arguments_are_named_before_any_compute(
    text_pipeline, monkeypatch, call, error, message
):
    def no_compute(*args, **kwargs):
        raise AssertionError("the denoiser ran")

    monkeypatch.setattr(text_pipeline.denoiser, "forward", no_compute)
    with pytest.raises(error, match=message):
        call(text_pipeline)


def test_img2img_rejects_uint8_like_encode(text_pipeline):
    image = torch.zeros(1, 1, 16, 16, dtype=torch.uint8)
    with pytest.raises(ShapeError) as from_encode:
        text_pipeline.encode(image)
    with pytest.raises(ShapeError) as from_img2img:
        text_pipeline.img2img(image, "a")
    encode_line = str(from_encode.value).splitlines()[0]
    assert str(from_img2img.value) == encode_line.replace("Pipeline.encode", "Pipeline.img2img")


def test_an_unused_negative_prompt_or_uncond_at_guidance_one_warns(text_pipeline):
    def run(guidance, **kw):
        gen = torch.Generator().manual_seed(0)
        return text_pipeline.generate("a 1", guidance=guidance, generator=gen, **kw)

    with pytest.warns(UserWarning, match="^Pipeline.generate: negative_prompts is unused") as seen:
        sweep = {g: run(g, negative_prompts="a 2") for g in (1.0, 3.0)}  # one warning, at 1
    assert [w.filename for w in seen] == [__file__]  # it points at the user's call
    assert "pass guidance other than 1 for negative_prompts to take effect" in str(seen[0].message)
    assert torch.equal(sweep[1.0], run(1.0))
    assert not torch.equal(sweep[3.0], run(3.0))
    x = torch.zeros(1, 1, 16, 16)
    with pytest.warns(UserWarning, match="^Pipeline.img2img: uncond is unused with guidance 1"):
        text_pipeline.img2img(x, "a", uncond=text_pipeline.condition([""]), guidance=1.0)


def test_negative_prompts_without_a_text_conditioner_are_refused():
    denoiser = RecordingDenoiser(torch.zeros(1, 2, 4, 4))
    pipeline = Pipeline(Cosine(), denoiser, data_shape=(2, 4, 4), sampler=REGISTRY["ddim"]())
    cond = Conditioning(pooled=torch.ones(1, 3))
    with pytest.raises(ValueError, match="negative_prompts need a text conditioner; pass uncond="):
        pipeline.generate(cond=cond, negative_prompts="x", guidance=2.0, steps=2)
    with pytest.raises(ValueError, match=r"uncond has no effect on an unconditional call .* cond="):
        pipeline.generate(uncond=cond, guidance=2.0, steps=2)
    with pytest.raises(ShapeError, match=r"noise has 3 channels .* expected 2: data_shape's"):
        pipeline.generate(noise=torch.zeros(1, 3, 4, 4), steps=2)
    assert not denoiser.calls


def test_prompts_as_a_tuple_and_noise_at_another_resolution_still_work(text_pipeline):
    out = text_pipeline.generate(("a", "b"), generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 1, 16, 16)
    z = text_pipeline.generate("a", noise=torch.randn(1, 4, 4, 4), decode=False)
    assert z.shape == (1, 4, 4, 4)


def test_save_writes_the_live_encoder_factors_and_sampler(tmp_path):
    torch.manual_seed(0)
    pipeline = build(_text_latent_config())
    pipeline.encoder.scaling_factor, pipeline.encoder.shift_factor = 1.7, 0.3
    pipeline.sampler = REGISTRY["ddim"]()
    loaded = Pipeline.load(pipeline.save(tmp_path / "p"))
    assert (loaded.encoder.scaling_factor, loaded.encoder.shift_factor) == (1.7, 0.3)
    assert loaded.sampler == pipeline.sampler
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pipeline.decode(z), loaded.decode(z))
    a = pipeline.generate(["a 7"], generator=torch.Generator().manual_seed(1))
    b = loaded.generate(["a 7"], generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)

    class Unregistered:
        def sample(self, *args, **kwargs):
            raise NotImplementedError

    pipeline.sampler = Unregistered()
    with pytest.raises(ValueError, match=r"Pipeline.save: sampler Unregistered has no registered"):
        pipeline.save(tmp_path / "q")
    assert not (tmp_path / "q" / "config.json").exists()

    pipeline.sampler = None  # the default sampler, as generate uses it
    pipeline.schedule = Cosine(offset=0.01)  # a replaced schedule saves as its own config
    loaded = Pipeline.load(pipeline.save(tmp_path / "r"))
    assert loaded.config.sampler is None and loaded.sampler is None
    assert loaded.config.schedule.offset == 0.01


@pytest.mark.parametrize(
    "spacing",
    [
        UniformTime(t_max=0.5),
        LogSNR(t_max=0.7),
        Explicit(times=(0.4, 0.2, 0.1)),
        UniformTime(t_max=1.0),
    ],
    ids=["uniform-t_max-0.5", "logsnr-t_max-0.7", "explicit", "t_max-1"],
)
def test_img2img_noises_the_input_to_the_samplers_first_grid_time(spacing):
    schedule = Cosine()
    denoiser = RecordingDenoiser(torch.zeros(1, 1, 4, 4))
    pipeline = Pipeline(schedule, denoiser, data_shape=(1, 4, 4))
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    strength = 0.8
    pipeline.img2img(
        x, strength=strength, steps=3, sampler=DDIM(spacing=spacing),
        generator=torch.Generator().manual_seed(5),
    )  # fmt: skip
    eps = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    first_x, first_t = denoiser.calls[0]
    t_first = strength * float(spacing(schedule, 3)[0])
    torch.testing.assert_close(first_t, torch.full((2,), t_first))
    t = torch.full((2,), t_first, dtype=torch.float64)
    alpha, sigma = float(schedule.alpha(t)[0]), float(schedule.sigma(t)[0])
    coefficient = float(((first_x - sigma * eps) * x).sum() / (x * x).sum())
    assert coefficient == pytest.approx(alpha, abs=1e-5)
    if spacing == UniformTime(t_max=1.0):  # starting at t0 itself: the start state, bit for bit
        t0 = torch.full((2,), strength, dtype=torch.float64)
        start = add_noise(schedule, x, eps, t0.float()) / schedule.sigma(t0).float().view(
            -1, 1, 1, 1
        )
        truncated_sigma = float(schedule.sigma(torch.tensor([strength], dtype=torch.float64))[0])
        assert torch.equal(first_x, start * truncated_sigma)


def test_an_interrupted_save_leaves_the_pipeline_there_intact(tmp_path, monkeypatch):
    import diffkit.pipeline as module

    folder = tmp_path / "p"
    old = build(_text_latent_config())
    old.save(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    new = build(_text_latent_config().model_copy(update={"steps": 12}))
    new.encoder.scaling_factor = 0.9
    real = module._save_tensors

    def write_then_fail(path, tensors, metadata):  # the weights written, then the disk fills
        real(path, tensors, metadata)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module, "_save_tensors", write_then_fail)
    with pytest.raises(OSError, match="No space left"):
        new.save(folder)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no temporary left
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = Pipeline.load(folder)
    assert loaded.config.steps == 3 and loaded.encoder.scaling_factor == old.encoder.scaling_factor
    for key, value in old.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key

    # torn between the moves into place: new weights beside the old config.json
    new.save(tmp_path / "new")
    shutil.copyfile(tmp_path / "new" / "model.safetensors", folder / "model.safetensors")
    torn = r"p/config\.json is not the config .*p/model\.safetensors was saved with \(they "
    with pytest.warns(UserWarning, match=torn + r"differ in encoder\.scaling_factor, steps\)"):
        Pipeline.load(folder)


def test_a_pipeline_loads_back_in_the_dtypes_it_was_saved_in(tmp_path):
    torch.manual_seed(0)
    pipeline = build(_text_latent_config()).to(torch.bfloat16)
    loaded = Pipeline.load(pipeline.save(tmp_path / "p"))
    assert loaded.dtype == torch.bfloat16
    assert {t.dtype for t in loaded.state_dict().values() if t.is_floating_point()} == {
        torch.bfloat16
    }
    a = pipeline.generate(["a 7"], generator=torch.Generator().manual_seed(1))
    b = loaded.generate(["a 7"], generator=torch.Generator().manual_seed(1))
    assert b.dtype == torch.bfloat16 and torch.equal(a, b)

    pipeline.text.float()  # mixed: a float32 text encoder beside a bfloat16 denoiser
    loaded = Pipeline.load(pipeline.save(tmp_path / "mixed"))
    for key, value in pipeline.state_dict().items():
        assert loaded.state_dict()[key].dtype == value.dtype, key

    as_float = Pipeline.load(tmp_path / "p", dtype=torch.float32, device="cpu")
    assert as_float.dtype == torch.float32


def test_a_loaded_pipeline_saves_again_from_another_working_directory(tmp_path, monkeypatch):
    pytest.importorskip("open_clip")  # ships the CLIP BPE merges file
    torch.manual_seed(0)
    monkeypatch.chdir(tmp_path)
    build(_text_latent_config("clip_bpe")).save("a")  # a relative folder
    loaded = Pipeline.load("a")
    assert Path(loaded.config.text.vocab_path).is_absolute()
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    loaded.save("../b")
    again = Pipeline.load(tmp_path / "b")
    assert torch.equal(
        loaded.text.tokenizer(["a red seven"]), again.text.tokenizer(["a red seven"])
    )


def test_explicit_guidance_on_an_unconditional_call_is_refused_not_ignored():
    """``generate(num_samples=2, guidance=5)`` with no prompts or cond cannot guide."""
    import diffkit as dk

    pipeline = dk.build(
        {
            "data_shape": (1, 8, 8),
            "schedule": {"kind": "cosine"},
            "denoiser": {
                "kind": "unet",
                "in_channels": 1,
                "base_channels": 8,
                "channel_mult": [1],
                "attention_resolutions": [],
                "norm_groups": 4,
                "attention_head_dim": 8,
            },
            "steps": 2,
            "guidance": 3.0,  # the config's default: not applied, and not an error
        }
    )
    with pytest.raises(ValueError, match=r"guidance=5 has no effect on an unconditional call"):
        pipeline.generate(num_samples=2, guidance=5.0)
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"Pipeline.img2img: guidance=2"):
        pipeline.img2img(x, strength=0.5, guidance=2.0)
    generator = torch.Generator().manual_seed(0)
    default = pipeline.generate(num_samples=2, generator=generator)
    same = pipeline.generate(
        num_samples=2, guidance=1.0, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(default, same)


def _tiny_unet(**extra) -> UNet:
    config = UNetConfig(
        in_channels=1,
        base_channels=8,
        channel_mult=(1, 2),
        blocks_per_level=1,
        attention_resolutions=(),
        mid_attention=False,
        norm_groups=4,
        attention_head_dim=8,
        **extra,
    )
    return UNet.from_config(config)


def _same_samples(a: Pipeline, b: Pipeline, **kwargs) -> bool:
    run = {"num_samples": 2, "steps": 3, **kwargs}
    first = a.generate(generator=torch.Generator().manual_seed(7), **run)
    return torch.equal(first, b.generate(generator=torch.Generator().manual_seed(7), **run))


def test_a_pipeline_composed_by_hand_from_registered_parts_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    pipeline = Pipeline(
        Discrete.from_betas(discrete_betas("sqrt_linear_beta", 100, 0.00085, 0.012)),
        _tiny_unet(),
        sampler=REGISTRY["ddim"](),
        patchifier=SpatialPatches(2),
        data_shape=(1, 8, 8),
        steps=4,
    )
    loaded = Pipeline.load(pipeline.save(tmp_path / "p"))
    assert loaded.config == pipeline.config
    assert loaded.schedule == pipeline.schedule and loaded.patchifier == SpatialPatches(2)
    assert loaded.steps == 4 and _same_samples(pipeline, loaded)


def test_a_pipeline_is_its_parts_configs_with_no_second_copy(text_pipeline):
    config = text_pipeline.config
    assert config.schedule is text_pipeline.schedule  # a schedule is its config
    assert config.denoiser is text_pipeline.denoiser.config  # a network holds its own
    assert config == _text_latent_config()
    assert build(config).config == config
    text_pipeline.encoder.scaling_factor = 0.5  # recorded in the encoder's config
    try:
        assert text_pipeline.config.encoder.scaling_factor == 0.5
        assert text_pipeline.encoder.config.scaling_factor == 0.5
    finally:
        text_pipeline.encoder.scaling_factor = _text_latent_config().encoder.scaling_factor


def test_replace_gives_a_new_pipeline_sharing_the_parts_not_replaced(tmp_path, text_pipeline):
    changed = text_pipeline.replace(schedule=Cosine(offset=0.02), sampler=DDIM(eta=0.0), steps=2)
    assert changed is not text_pipeline and changed.denoiser is text_pipeline.denoiser
    assert changed.text is text_pipeline.text and changed.encoder is text_pipeline.encoder
    assert text_pipeline.schedule == Cosine() and text_pipeline.steps == 3  # untouched
    assert changed.config.schedule == Cosine(offset=0.02) and changed.config.steps == 2
    loaded = Pipeline.load(changed.save(tmp_path / "p"))
    assert loaded.config == changed.config
    prompts = {"prompts": ["a 3", "a 5"], "num_samples": None}
    assert _same_samples(changed, loaded, **prompts)
    assert not _same_samples(changed, text_pipeline, **prompts)
    with pytest.raises(TypeError, match=r"Pipeline.replace: no part named 'sheduler'"):
        text_pipeline.replace(sheduler=Cosine())


def test_a_part_without_a_registered_config_is_refused_naming_it():
    pipeline = Pipeline(Cosine(), _tiny_unet(), data_shape=(1, 8, 8), encoder=HalfResolution())
    with pytest.raises(ValueError) as info:
        pipeline.config  # noqa: B018
    message = str(info.value)
    assert "Pipeline.config: encoder HalfResolution has no registered config" in message
    assert "registry('encoder').register" in message
    with pytest.raises(ValueError, match="data_shape is not set"):
        Pipeline(Cosine(), _tiny_unet()).save("unused")


class _Stretched(ScheduleBase):
    """A user's own schedule: the cosine schedule run at ``speed``, registered."""

    kind: Literal["test_stretched"] = "test_stretched"
    speed: float = Field(default=1.0, gt=0, le=1, description="fraction of the cosine time")

    def _log_snr(self, t: torch.Tensor) -> torch.Tensor:
        return Cosine()._log_snr(t * self.speed)

    def _t_of_log_snr(self, log_snr: torch.Tensor) -> torch.Tensor:
        return Cosine()._t_of_log_snr(log_snr) / self.speed


registry("schedule").register(_Stretched, replace=True)


def test_a_custom_registered_kind_round_trips_and_a_fresh_process_names_what_to_register(
    tmp_path,
):
    torch.manual_seed(0)
    pipeline = Pipeline(
        _Stretched(speed=0.9), _tiny_unet(prediction="v"), data_shape=(1, 8, 8), steps=3
    )
    folder = pipeline.save(tmp_path / "p")
    loaded = Pipeline.load(folder)
    assert loaded.schedule == _Stretched(speed=0.9) and _same_samples(pipeline, loaded)
    script = f"from diffkit.pipeline import Pipeline; Pipeline.load({str(folder)!r})"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0
    assert "unknown schedule kind 'test_stretched'" in done.stderr, done.stderr
    assert "registry('schedule').register(YourConfig)" in done.stderr, done.stderr


def test_start_sample_takes_the_noise_as_the_first_sample(one_thread) -> None:
    """``start="sample"`` (a converted diffusers pipeline's): noise is x_T itself, unscaled;
    the default scales it to sigma at the first time. Both are saved in the config."""
    schedule, sampler = Discrete.from_betas(discrete_betas("linear_beta", 1000)), DDIM()
    pipeline = Pipeline(schedule, _tiny_unet(), sampler=sampler, data_shape=(1, 8, 8))
    as_sample = pipeline.replace(start="sample")
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    got = as_sample.generate(noise=noise, steps=3)
    want = sampler.sample(pipeline.denoiser, schedule, noise, steps=3, start="sample")
    assert torch.equal(got, want)
    assert not torch.equal(pipeline.generate(noise=noise, steps=3), got)
    assert as_sample.config.start == "sample" and pipeline.config.start == "noise"
    assert Pipeline.from_config(as_sample.config).start == "sample"
    with pytest.raises(ValueError, match="start"):
        pipeline.replace(start="latents")
    with pytest.raises(ValueError, match="empty_uncond"):
        pipeline.replace(empty_uncond="none")
