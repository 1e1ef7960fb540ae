"""Whole diffusers pipelines converted by ``from_diffusers(pipe)`` draw diffusers' images.

Tiny random pipelines built from configs (float32, CPU, no downloads; the CLIP and T5
tokenizers are built offline by ``offline_tokenizers``): the converted ``dk.Pipeline`` given the
same prompts, negative prompts, latents, steps and guidance returns the same images (and
latents) to 1e-4 relative, with the scheduler converted from the pipeline's; saved and
loaded, it returns bit-identical images. What the converted pipeline cannot honour is
refused by name.
"""

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("open_clip")

from offline_tokenizers import clip_tokenizer, t5_tokenizer  # noqa: E402

import diffkit as dk  # noqa: E402
from diffkit.protocols import Conditioning  # noqa: E402

pytestmark = pytest.mark.parity

CONTEXT = 16
PROMPTS = ["a photo of a cat", "seven"]
NEGATIVE = ["blurry, low quality", ""]
STEPS = 4
RTOL = 1e-4
SCALED_LINEAR = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}

# name -> a diffusers scheduler as Stable Diffusion pipelines ship them (or commonly swap in)
SCHEDULERS: dict[str, Callable[[], Any]] = {
    # Stable Diffusion 1.5's own scheduler config, and its DDIM
    "pndm_sd15": lambda: diffusers.PNDMScheduler(
        **SCALED_LINEAR, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1
    ),
    "ddim_sd15": lambda: diffusers.DDIMScheduler(
        **SCALED_LINEAR, clip_sample=False, set_alpha_to_one=False, steps_offset=1
    ),
    "ddim_trailing": lambda: diffusers.DDIMScheduler(
        **SCALED_LINEAR, clip_sample=False, timestep_spacing="trailing", steps_offset=1
    ),
    "dpmpp_2m": lambda: diffusers.DPMSolverMultistepScheduler(**SCALED_LINEAR),
    "euler_trailing": lambda: diffusers.EulerDiscreteScheduler(
        **SCALED_LINEAR, timestep_spacing="trailing"
    ),
    "euler_leading": lambda: diffusers.EulerDiscreteScheduler(
        **SCALED_LINEAR, timestep_spacing="leading", steps_offset=1
    ),
}


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max |got - want| / max |want|``."""
    return float((got - want).abs().max() / want.abs().max())


def _perturbed(model: torch.nn.Module, seed: int, scale: float = 0.05) -> Any:
    """diffusers' initialisation plus noise (its zero-initialised layers made non-zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def _vae() -> Any:
    torch.manual_seed(2)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    return _perturbed(vae, seed=2)


def _text_encoder() -> Any:
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(
        vocab_size=49408,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CONTEXT,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=2,  # SD 1.x's config: pooled at the largest id
    )
    return _perturbed(transformers.CLIPTextModel(config), seed=0)


def _sd(scheduler: Any, **components: Any) -> Any:
    """A tiny StableDiffusionPipeline (16x16 images, 8x8 latents), random weights."""
    torch.manual_seed(1)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8,
        cross_attention_dim=16,
        attention_head_dim=2,
    )
    parts = {
        "vae": _vae(),
        "text_encoder": _text_encoder(),
        "tokenizer": clip_tokenizer(CONTEXT),
        "unet": _perturbed(unet, seed=1),
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    } | components
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.StableDiffusionPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(seed: int = 5) -> torch.Tensor:
    return torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _diffusers_sd(pipe: Any, guidance: float, output_type: str) -> torch.Tensor:
    negative = {"negative_prompt": NEGATIVE} if guidance > 1 else {}
    with torch.no_grad():
        out = pipe(
            PROMPTS,
            latents=_latents(),
            num_inference_steps=STEPS,
            guidance_scale=guidance,
            output_type=output_type,
            **negative,
        )
    return out.images


def _diffkit_sd(pipeline: dk.Pipeline, guidance: float, decode: bool = True) -> torch.Tensor:
    negative = {"negative_prompts": NEGATIVE} if guidance != 1 else {}
    out = pipeline.generate(
        PROMPTS, noise=_latents(), steps=STEPS, guidance=guidance, decode=decode, **negative
    )
    return (out / 2 + 0.5).clamp(0, 1) if decode else out  # diffusers' postprocess to [0, 1]


@pytest.mark.parametrize("guidance", [1.0, 7.5])
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_stable_diffusion_pipeline_draws_the_diffusers_images(
    scheduler: str, guidance: float
) -> None:
    pipe = _sd(SCHEDULERS[scheduler]())
    pipeline = dk.interop.from_diffusers(pipe)
    assert isinstance(pipeline, dk.Pipeline)
    assert (pipeline.steps, pipeline.guidance, pipeline.data_shape) == (50, 7.5, (3, 16, 16))
    want_latents = _diffusers_sd(pipe, guidance, "latent")
    want = _diffusers_sd(pipe, guidance, "pt")
    got_latents = _diffkit_sd(pipeline, guidance, decode=False)
    got = _diffkit_sd(pipeline, guidance)
    assert want.std() > 0.05  # an image, not a constant clamped to 0 or 1
    assert _relative(got_latents, want_latents) <= RTOL
    assert _relative(got, want) <= RTOL


def test_guidance_and_negative_prompts_change_the_image() -> None:
    """The parity above is not of two pipelines that ignore guidance or negative prompts."""
    pipeline = dk.interop.from_diffusers(_sd(SCHEDULERS["ddim_trailing"]()))
    plain = _diffkit_sd(pipeline, 1.0, decode=False)
    guided = _diffkit_sd(pipeline, 7.5, decode=False)
    empty = pipeline.generate(PROMPTS, noise=_latents(), steps=STEPS, guidance=7.5, decode=False)
    assert _relative(guided, plain) > 1e-2
    assert _relative(guided, empty) > 1e-3


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_the_prediction_comes_from_the_scheduler(prediction: str) -> None:
    scheduler = diffusers.DDIMScheduler(
        **SCALED_LINEAR, clip_sample=False, timestep_spacing="trailing", prediction_type=prediction
    )
    pipe = _sd(scheduler)
    pipeline = dk.interop.from_diffusers(pipe)
    assert pipeline.denoiser.prediction == {"v_prediction": "v", "sample": "x0"}[prediction]
    assert pipeline.config.denoiser.prediction == pipeline.denoiser.prediction
    got = _diffkit_sd(pipeline, 7.5, decode=False)
    assert _relative(got, _diffusers_sd(pipe, 7.5, "latent")) <= RTOL


def test_saved_and_loaded_sd_pipeline_draws_bit_identical_images(tmp_path: Path) -> None:
    pipeline = dk.interop.from_diffusers(_sd(SCHEDULERS["dpmpp_2m"]()))
    before = _diffkit_sd(pipeline, 7.5)
    pipeline.save(tmp_path)
    loaded = dk.Pipeline.load(tmp_path)
    text = loaded.config.text.model_copy(update={"vocab_path": pipeline.config.text.vocab_path})
    assert loaded.config.model_copy(update={"text": text}) == pipeline.config  # vocabulary: a copy
    assert loaded.start == "sample" and loaded.config.text.pad_token_id == 49407
    assert torch.equal(_diffkit_sd(loaded, 7.5), before)


def test_the_start_follows_how_the_scheduler_scales_its_latents() -> None:
    """diffusers starts Euler from ``latents * sigma_max`` (trailing) or ``* sqrt(sigma_max^2
    + 1)`` (leading): diffkit's scaled noise, or the latents as the first sample."""
    assert dk.interop.from_diffusers(_sd(SCHEDULERS["euler_trailing"]())).start == "noise"
    assert dk.interop.from_diffusers(_sd(SCHEDULERS["euler_leading"]())).start == "sample"
    assert dk.interop.from_diffusers(_sd(SCHEDULERS["ddim_trailing"]())).start == "sample"


# ---------------------------------------------------------------------------------------- DiT


def _dit_pipeline(scheduler: Any | None = None) -> Any:
    """A tiny DiTPipeline: 1000 ImageNet classes (the pipeline's null class is 1000)."""
    torch.manual_seed(3)
    transformer = diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,  # learned sigma
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )
    transformer = _perturbed(transformer, seed=3, scale=0.1)
    first = transformer.transformer_blocks[0].norm1.emb
    with torch.no_grad():  # one embedding in every block, as in the published weights
        for block in transformer.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first.state_dict())
    scheduler = scheduler or diffusers.DDIMScheduler(clip_sample=False, timestep_spacing="trailing")
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=_vae(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


LABELS = [3, 997]


def _dit_noise(seed: int) -> torch.Tensor:
    return torch.randn(len(LABELS), 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _diffkit_dit(pipeline: dk.Pipeline, guidance: float, seed: int) -> torch.Tensor:
    cond = Conditioning(labels=torch.tensor(LABELS))
    null = {"uncond": Conditioning(labels=torch.full((2,), 1000))} if guidance != 1 else {}
    out = pipeline.generate(
        cond=cond, noise=_dit_noise(seed), steps=STEPS, guidance=guidance, **null
    )
    return (out / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("guidance", [1.0, 4.0, 7.5])
def test_dit_pipeline_draws_the_diffusers_images(guidance: float) -> None:
    pipe = _dit_pipeline()
    pipeline = dk.interop.from_diffusers(pipe)
    assert (pipeline.steps, pipeline.guidance, pipeline.data_shape) == (50, 4.0, (3, 16, 16))
    with torch.no_grad():  # the pipeline draws its latents from the generator, first
        want = pipe(
            LABELS,
            guidance_scale=guidance,
            num_inference_steps=STEPS,
            generator=torch.Generator().manual_seed(7),
            output_type="pt",
        ).images
    got = _diffkit_dit(pipeline, guidance, seed=7)
    assert want.std() > 0.05
    assert _relative(got, want) <= RTOL
    if guidance != 1:
        assert _relative(got, _diffkit_dit(pipeline, 1.0, seed=7)) > 1e-3


def test_saved_and_loaded_dit_pipeline_draws_bit_identical_images(tmp_path: Path) -> None:
    pipeline = dk.interop.from_diffusers(_dit_pipeline())
    before = _diffkit_dit(pipeline, 4.0, seed=8)
    pipeline.save(tmp_path)
    assert torch.equal(_diffkit_dit(dk.Pipeline.load(tmp_path), 4.0, seed=8), before)


# ------------------------------------------------------------------------------------ PixArt

T5_LENGTH = 120  # PixArtAlphaPipeline's max_sequence_length


def _t5(width: int) -> Any:
    config = transformers.T5Config(
        vocab_size=40, d_model=width, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=10,
        feed_forward_proj="gated-gelu", dropout_rate=0.0,
    )  # fmt: skip
    torch.manual_seed(4)
    return _perturbed(transformers.T5EncoderModel(config), seed=4, scale=0.1)


def _pixart(tmp_path: Path, scheduler: Any | None = None) -> Any:
    """A tiny PixArt-α pipeline; ``sample_size=128`` as PixArt-α 1024's, so it adds the
    resolution micro-conditions (drawn at 16x16 pixels, 8x8 latents)."""
    torch.manual_seed(5)
    transformer = diffusers.PixArtTransformer2DModel(
        num_attention_heads=3,  # width 24: a third each for height, width and aspect ratio
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=128,
        patch_size=2,
        cross_attention_dim=24,
        caption_channels=24,
    )
    pipe = diffusers.PixArtAlphaPipeline(
        tokenizer=t5_tokenizer(tmp_path),
        text_encoder=_t5(24),
        vae=_vae(),
        transformer=_perturbed(transformer, seed=5, scale=0.1),
        scheduler=scheduler or diffusers.DPMSolverMultistepScheduler(),  # as PixArt-α ships
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("guidance", [1.0, 4.5, 7.5])
def test_pixart_pipeline_draws_the_diffusers_images(tmp_path: Path, guidance: float) -> None:
    pipe = _pixart(tmp_path)
    pipeline = dk.interop.from_diffusers(pipe)
    assert (pipeline.steps, pipeline.guidance, pipeline.data_shape) == (20, 4.5, (3, 256, 256))
    negative = {"negative_prompt": NEGATIVE} if guidance > 1 else {}
    with torch.no_grad():
        want = pipe(
            PROMPTS, latents=_latents(), num_inference_steps=STEPS, guidance_scale=guidance,
            height=16, width=16, use_resolution_binning=False, clean_caption=False,
            output_type="pt", **negative,
        ).images  # fmt: skip
    negatives = {"negative_prompts": NEGATIVE} if guidance != 1 else {}
    out = pipeline.generate(PROMPTS, noise=_latents(), steps=STEPS, guidance=guidance, **negatives)
    got = (out / 2 + 0.5).clamp(0, 1)
    assert want.std() > 0.05
    assert _relative(got, want) <= RTOL
    pipeline.save(tmp_path / "saved")
    loaded = dk.Pipeline.load(tmp_path / "saved")
    again = loaded.generate(PROMPTS, noise=_latents(), steps=STEPS, guidance=guidance, **negatives)
    assert torch.equal(again, out)


# -------------------------------------------------------------------------------------- SDXL


def _clip(cls: Any, width: int, projection: int, seed: int) -> Any:
    config = transformers.CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CONTEXT,
        hidden_act="quick_gelu" if seed == 0 else "gelu",  # OpenAI's L; OpenCLIP's bigG
        projection_dim=projection,
        bos_token_id=49406,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return _perturbed(cls(config), seed=seed, scale=0.1)


def _sdxl(**options: Any) -> Any:
    """A tiny SDXL pipeline: CLIP-L (16) and bigG (24, projected to 20), text_time U-Net."""
    torch.manual_seed(6)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=16 + 24,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=20 + 6 * 8,
        norm_num_groups=8,
    )
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=_clip(transformers.CLIPTextModel, 16, 12, seed=0),
        text_encoder_2=_clip(transformers.CLIPTextModelWithProjection, 24, 20, seed=1),
        tokenizer=clip_tokenizer(CONTEXT),
        tokenizer_2=clip_tokenizer(CONTEXT, pad_token="!"),
        unet=_perturbed(unet, seed=6),
        scheduler=SCHEDULERS["euler_leading"](),
        add_watermarker=False,
        **options,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_sdxl_pipeline_draws_the_diffusers_images(tmp_path: Path, guidance: float) -> None:
    pipe = _sdxl()
    pipeline = dk.interop.from_diffusers(pipe)
    assert (pipeline.steps, pipeline.guidance, pipeline.empty_uncond) == (50, 5.0, "zeros")
    want = _diffusers_sd(pipe, guidance, "pt")
    got = _diffkit_sd(pipeline, guidance)
    assert want.std() > 0.05
    assert _relative(got, want) <= RTOL
    pipeline.save(tmp_path)
    assert torch.equal(_diffkit_sd(dk.Pipeline.load(tmp_path), guidance), got)


def test_sdxl_without_negative_prompts_guides_against_zeros() -> None:
    """force_zeros_for_empty_prompt: diffusers' unconditional input is zeros, not ``""``."""
    pipe = _sdxl()
    pipeline = dk.interop.from_diffusers(pipe)
    with torch.no_grad():
        want = pipe(
            PROMPTS, latents=_latents(), num_inference_steps=STEPS, guidance_scale=7.5,
            output_type="latent",
        ).images  # fmt: skip
    got = pipeline.generate(PROMPTS, noise=_latents(), steps=STEPS, guidance=7.5, decode=False)
    assert _relative(got, want) <= RTOL
    empty = pipeline.replace(empty_uncond="prompt")
    assert _relative(empty.generate(PROMPTS, noise=_latents(), steps=STEPS, guidance=7.5,
                                    decode=False), want) > 1e-3  # fmt: skip


# --------------------------------------------------------------------------------------- SD3


def _sd3_pipeline(tmp_path: Path) -> Any:
    """A tiny SD3: MMDiT (joint width 48, T5's; the CLIP tokens, 16 + 24 wide, zero-padded to
    it), CLIP-L + bigG (pooled 12 + 20), T5, flow matching with shift 3."""
    torch.manual_seed(7)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=48,
        caption_projection_dim=16,
        pooled_projection_dim=12 + 20,
        pos_embed_max_size=12,
    )
    torch.manual_seed(8)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=1.5305,
        shift_factor=0.0609,  # SD3's latent shift
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=_perturbed(transformer, seed=7, scale=0.1),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_perturbed(vae, seed=8),
        text_encoder=_clip(transformers.CLIPTextModelWithProjection, 16, 12, seed=0),
        tokenizer=clip_tokenizer(CONTEXT),
        text_encoder_2=_clip(transformers.CLIPTextModelWithProjection, 24, 20, seed=1),
        tokenizer_2=clip_tokenizer(CONTEXT, pad_token="!"),
        text_encoder_3=_t5(48),
        tokenizer_3=t5_tokenizer(tmp_path),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("guidance", [1.0, 7.0, 7.5])
def test_sd3_pipeline_draws_the_diffusers_images(tmp_path: Path, guidance: float) -> None:
    pipe = _sd3_pipeline(tmp_path)
    pipeline = dk.interop.from_diffusers(pipe)
    assert (pipeline.steps, pipeline.guidance, pipeline.denoiser.prediction) == (28, 7.0, "flow")
    want = _diffusers_sd(pipe, guidance, "pt")
    got = _diffkit_sd(pipeline, guidance)
    assert want.std() > 0.05
    assert _relative(got, want) <= RTOL
    pipeline.save(tmp_path / "saved")
    assert torch.equal(_diffkit_sd(dk.Pipeline.load(tmp_path / "saved"), guidance), got)


# ------------------------------------------------------------------------------- refusals


class _Stand(torch.nn.Module):
    """A stand-in for a component the converter must refuse (never run)."""


def test_a_safety_checker_is_refused_by_name() -> None:
    pipe = _sd(SCHEDULERS["ddim_trailing"]())
    pipe.register_modules(safety_checker=_Stand())
    with pytest.raises(ValueError, match=r"safety_checker.*safety_checker=None"):
        dk.interop.from_diffusers(pipe)


def test_an_ip_adapter_image_encoder_is_refused_by_name() -> None:
    pipe = _sd(SCHEDULERS["ddim_trailing"]())
    pipe.register_modules(image_encoder=_Stand())
    with pytest.raises(ValueError, match=r"image_encoder.*IP-Adapter"):
        dk.interop.from_diffusers(pipe)


def test_an_unknown_component_and_unfused_lora_are_refused_by_name() -> None:
    pipe = _sd(SCHEDULERS["ddim_trailing"]())
    pipe.register_modules(controlnet=_Stand())
    with pytest.raises(ValueError, match="controlnet"):
        dk.interop.from_diffusers(pipe)
    pipe = _sd(SCHEDULERS["ddim_trailing"]())
    pipe.unet.peft_config = {"default": object()}  # what load_lora_weights leaves
    with pytest.raises(ValueError, match=r"unet has LoRA adapters.*fuse_lora"):
        dk.interop.from_diffusers(pipe)


def test_a_tokenizer_without_clips_vocabulary_is_refused() -> None:
    pipe = _sd(SCHEDULERS["ddim_trailing"]())
    vocab = dict(clip_tokenizer(CONTEXT).get_vocab())
    vocab["cat</w>"], vocab["dog</w>"] = vocab["dog</w>"], vocab["cat</w>"]
    pipe.tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CONTEXT)
    with pytest.raises(ValueError, match="vocabulary is not CLIP's"):
        dk.interop.from_diffusers(pipe)


def test_dit_with_a_scheduler_that_scales_its_latents_is_refused() -> None:
    pipe = _dit_pipeline(diffusers.EulerDiscreteScheduler())
    with pytest.raises(ValueError, match="EulerDiscreteScheduler"):
        dk.interop.from_diffusers(pipe)


def test_an_sdxl_watermark_is_refused_by_name() -> None:
    pipe = _sdxl()
    pipe.watermark = object()  # what add_watermarker=True sets (invisible-watermark)
    with pytest.raises(ValueError, match="watermark"):
        dk.interop.from_diffusers(pipe)


def test_an_unsupported_pipeline_is_refused_by_name() -> None:
    unet = diffusers.UNet2DModel(
        block_out_channels=(8, 8),
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
        norm_num_groups=8,
    )
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler())
    with pytest.raises(TypeError, match="DDPMPipeline"):
        dk.interop.from_diffusers(pipe)
