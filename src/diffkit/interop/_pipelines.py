"""Whole diffusers pipelines -> a [`Pipeline`][diffkit.pipeline.Pipeline] drawing the same images.

``from_diffusers(pipe)`` converts each part the pipeline runs: the denoiser (U-Net or patch
transformer), the VAE, the text encoder with its tokenizer, and the scheduler, which becomes
a schedule and the pipeline's default sampler (``from_diffusers(pipe.scheduler)``). What the
denoiser predicts comes from the scheduler's ``prediction_type`` (``epsilon``,
``v_prediction`` -> ``v``, ``sample`` -> ``x0``; a flow-matching scheduler: ``flow``), its
training steps from the scheduler's ``num_train_timesteps``. The converted pipeline's
``generate(prompts, negative_prompts=..., noise=latents, steps=..., guidance=...)`` computes
what ``pipe(prompts, negative_prompt=..., latents=latents, num_inference_steps=...,
guidance_scale=...)`` does: the same latents (``start``: the first sample is the latents as
diffusers scales them), the same classifier-free guidance (one batched call on the
conditional and unconditional inputs, ``uncond + scale (cond - uncond)``), the default
steps and guidance of the diffusers pipeline's ``__call__``. diffusers guides only when
``guidance_scale > 1``; diffkit whenever ``guidance != 1``.

Every component is converted or refused by name, never silently left out:

- ``safety_checker`` is refused when present: it blacks out the images it flags, which the
  converted pipeline would not do. Load the pipeline with ``safety_checker=None`` to
  convert it (``feature_extractor``, the safety checker's image preprocessor, then has
  no use and is dropped);
- ``image_encoder`` (IP-Adapter image prompts) is refused: a diffkit pipeline takes no
  image prompts; a U-Net with an IP-Adapter loaded is refused by its conversion;
- LoRA adapters that are loaded but not fused are refused (fuse them into the weights:
  ``pipe.fuse_lora()``, then ``pipe.unload_lora_weights()``);
- SDXL's invisible ``watermark`` is refused (``add_watermarker=False``), an SDXL pipeline
  without its first text encoder (the refiner) and SD3 without T5 too;
- ``DiTPipeline``'s ``id2label`` (class names to ids, ``pipe.get_label_ids``) does not
  touch the images and is dropped: pass the ids as ``Conditioning(labels=...)``;
- any other component the pipeline holds is refused, naming it.
"""

import hashlib
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from torch import nn

from diffkit.nn.dit import DiT
from diffkit.nn.t5 import T5Encoder
from diffkit.nn.unet import UNet
from diffkit.nn.vae import KLAutoencoder
from diffkit.pipeline import Pipeline
from diffkit.protocols import Encoder
from diffkit.samplers import SamplerBase
from diffkit.schedules import ScheduleBase
from diffkit.text import CLIPTextConditioner, ComposedTextConditioner, T5TextConditioner
from diffkit.tokenizers import CLIPTokenizer, SentencePieceTokenizer, find_open_clip_vocab
from diffkit.typing import Prediction

__all__ = ["PIPELINES", "pipeline_from_diffusers"]

_Net = TypeVar("_Net", bound=nn.Module)

# Schedulers whose sample lives in k-diffusion's space x / alpha: their pipelines start from
# latents * init_noise_sigma, which is sigma_max (diffkit's noise) for the linspace and
# trailing spacings and sqrt(sigma_max^2 + 1) (x_T = latents) for leading.
_SIGMA_SPACE = (
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "LMSDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DPMSolverSDEScheduler",
)

_DROPPED = {"feature_extractor"}
"""Components that never touch the images once the safety checker is gone."""
_REFUSED = {
    "safety_checker": "it blacks out the images it flags, which a diffkit pipeline would not "
    "do; load the pipeline with safety_checker=None (or set pipe.safety_checker = None) to "
    "convert it without",
    "image_encoder": "IP-Adapter image prompts have no diffkit equivalent; set "
    "pipe.image_encoder = None to convert the pipeline without them",
}


def _prediction(scheduler: Any) -> Prediction:
    """What the denoiser predicts, as the scheduler says (flow matching: ``flow``)."""
    from diffkit.interop._schedulers import diffusers_prediction

    try:
        return diffusers_prediction(scheduler)
    except ValueError as err:
        raise ValueError(f"from_diffusers: the pipeline's scheduler {err}") from None


def _start(scheduler: Any) -> Literal["noise", "sample"]:
    """How the pipeline's latents become the first sample (see ``PipelineConfig.start``)."""
    spacing = scheduler.config.get("timestep_spacing", "linspace")
    if type(scheduler).__name__ in _SIGMA_SPACE and spacing in ("linspace", "trailing"):
        return "noise"  # x_T = alpha sigma_max latents = sigma(t_max) latents
    return "sample"


def _check_components(pipe: Any, used: set[str]) -> None:
    """Refuse, by name, every component that would change the images and is not converted."""
    for name, component in pipe.components.items():
        if component is None or name in used or name in _DROPPED:
            continue
        reason = _REFUSED.get(name, "diffkit does not convert it")
        raise ValueError(
            f"from_diffusers: {type(pipe).__name__}'s {name} ({type(component).__name__}) is "
            f"not converted: {reason}"
        )
    for name in used:
        if getattr(getattr(pipe, name, None), "peft_config", None):
            raise ValueError(
                f"from_diffusers: {type(pipe).__name__}'s {name} has LoRA adapters loaded "
                "(peft_config) that are not part of its weights; fuse them first: "
                "pipe.fuse_lora(), then pipe.unload_lora_weights()"
            )


def _scheduler_parts(scheduler: Any) -> tuple[ScheduleBase, SamplerBase]:
    """The schedule and the sampler of a diffusers scheduler (``from_diffusers``)."""
    from diffkit.interop._schedulers import scheduler_parts

    schedule, sampler = scheduler_parts(scheduler)
    return schedule, sampler


def _vocabulary_problem(theirs: Mapping[str, int], ours: CLIPTokenizer) -> str | None:
    """Where a transformers CLIP vocabulary differs from diffkit's CLIP BPE (None: nowhere)."""
    specials = {"<|startoftext|>": "<start_of_text>", "<|endoftext|>": "<end_of_text>"}
    mapped = {specials.get(piece, piece): i for piece, i in theirs.items()}
    if len(mapped) != ours.vocab_size:
        return f"{len(mapped)} ids, CLIP's has {ours.vocab_size}"
    for i, piece in enumerate(ours.pieces):
        if mapped.get(piece) != i:
            return f"{piece!r} is id {mapped.get(piece)}, CLIP's {i}"
    return None


def clip_text(
    text_encoder: Any,
    tokenizer: Any,
    *,
    project_pooled: bool = False,
    skip_last_layers: int = 0,
    final_norm: bool = True,
) -> CLIPTextConditioner:
    """A transformers CLIP text encoder with its tokenizer, conditioning as diffusers' SD does.

    No padding mask (the U-Net attends to all positions), the tokenizer's padding id and
    length; the tokenizer must have CLIP's vocabulary, checked id by id. The options are
    [`CLIPTextConditioner`][diffkit.text.CLIPTextConditioner]'s (SDXL: the penultimate
    layer without the final LayerNorm, the second tower's projected pooled vector).
    """
    from diffkit.interop._transformers import from_transformers

    if text_encoder.config.to_dict().get("use_attention_mask"):
        raise ValueError(
            "from_diffusers: text_encoder config use_attention_mask=True is not supported"
        )
    context = int(tokenizer.model_max_length)
    ours = CLIPTokenizer(find_open_clip_vocab(), context, int(tokenizer.pad_token_id))
    problem = _vocabulary_problem(tokenizer.get_vocab(), ours)
    if problem is not None:
        raise ValueError(f"from_diffusers: the tokenizer's vocabulary is not CLIP's: {problem}")
    tower = from_transformers(text_encoder)
    if tower.context_length != context:
        raise ValueError(
            f"from_diffusers: tokenizer model_max_length {context} is not the text encoder's "
            f"max_position_embeddings {tower.context_length}"
        )
    conditioner = CLIPTextConditioner(
        tower,
        ours,
        project_pooled=project_pooled,
        skip_last_layers=skip_last_layers,
        final_norm=final_norm,
        mask_padding=False,
    )
    return conditioner.train(text_encoder.training)


def _network(module: Any, kind: type[_Net], **options: Any) -> _Net:
    """``from_diffusers(module)``, which must give a ``kind``."""
    from diffkit.interop._diffusers import from_diffusers

    converted = from_diffusers(module, **options)
    if not isinstance(converted, kind):
        raise TypeError(
            f"from_diffusers: {type(module).__name__} converted to {type(converted).__name__}, "
            f"not the {kind.__name__} the pipeline needs"
        )
    return converted


def _denoiser(pipe: Any, module: Any, kind: type[_Net], **options: Any) -> _Net:
    """The pipeline's denoiser ``module`` converted to ``kind``, trained as its scheduler says
    (``prediction_type``, ``num_train_timesteps``)."""
    scheduler = pipe.scheduler
    n_train = int(scheduler.config.num_train_timesteps)
    return _network(
        module, kind, prediction=_prediction(scheduler), num_train_timesteps=n_train, **options
    )


def _vae(vae: Any) -> Encoder:
    """The VAE as a diffkit [`KLAutoencoder`][diffkit.nn.vae.KLAutoencoder] (an ``Encoder``)."""
    # KLAutoencoder's scaling_factor is a read-only property, the protocol's a plain attribute
    return cast(Encoder, _network(vae, KLAutoencoder))


def _image_shape(vae: Any, sample_size: Any) -> tuple[int, int, int]:
    """``(channels, height, width)`` of the images a pipeline draws by default."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if isinstance(sample_size, list | tuple):
        height, width = sample_size
    else:
        height = width = sample_size
    return (int(vae.config.out_channels), int(height) * factor, int(width) * factor)


def _stable_diffusion(pipe: Any) -> Pipeline:
    """``StableDiffusionPipeline``: U-Net, VAE, CLIP text encoder, scheduler."""
    _check_components(pipe, {"unet", "vae", "text_encoder", "tokenizer", "scheduler"})
    schedule, sampler = _scheduler_parts(pipe.scheduler)
    unet = _denoiser(pipe, pipe.unet, UNet)
    return Pipeline(
        schedule,
        unet,
        encoder=_vae(pipe.vae),
        text=clip_text(pipe.text_encoder, pipe.tokenizer),
        sampler=sampler,
        data_shape=_image_shape(pipe.vae, pipe.unet.config.sample_size),
        steps=50,
        guidance=7.5,
        start=_start(pipe.scheduler),
    )


def _dit(pipe: Any) -> Pipeline:
    """``DiTPipeline``: class-conditional DiT, VAE, scheduler; ``id2label`` is dropped."""
    _check_components(pipe, {"transformer", "vae", "scheduler"})
    name = type(pipe.scheduler).__name__
    if name in _SIGMA_SPACE:
        raise ValueError(
            f"from_diffusers: DiTPipeline with {name}: the pipeline starts from unscaled "
            "latents (no init_noise_sigma), which that scheduler does not sample from; use a "
            "DDIM, DDPM, DPM-Solver or UniPC scheduler"
        )
    schedule, sampler = _scheduler_parts(pipe.scheduler)
    transformer = _denoiser(pipe, pipe.transformer, DiT)
    return Pipeline(
        schedule,
        transformer,
        encoder=_vae(pipe.vae),
        sampler=sampler,
        data_shape=_image_shape(pipe.vae, pipe.transformer.config.sample_size),
        steps=50,
        guidance=4.0,
        start="sample",
    )


def _tokenizer_file(tokenizer: Any) -> str:
    """A transformers tokenizer's ``tokenizer.json``, written once per content to the temporary
    folder (diffkit's ``SentencePieceTokenizer`` reads a file; ``Pipeline.save`` copies it)."""
    text = tokenizer.backend_tokenizer.to_str()
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "diffkit-tokenizers" / digest
    path = folder / "tokenizer.json"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f"tokenizer.json.{os.getpid()}"
        partial.write_text(text, encoding="utf-8")
        partial.replace(path)
    return str(path)


def t5_text(text_encoder: Any, tokenizer: Any, length: int, mask: bool) -> T5TextConditioner:
    """A transformers T5 encoder with its tokenizer, ``length`` tokens, masked (PixArt) or not."""
    from diffkit.interop._transformers import from_transformers

    encoder = from_transformers(text_encoder)
    if not isinstance(encoder, T5Encoder):
        raise TypeError(f"from_diffusers: expected a T5EncoderModel, got {type(text_encoder)}")
    ours = SentencePieceTokenizer(
        _tokenizer_file(tokenizer), length, int(tokenizer.pad_token_id), int(tokenizer.eos_token_id)
    )
    return T5TextConditioner(encoder, ours, mask_padding=mask).train(text_encoder.training)


def _pixart(pipe: Any) -> Pipeline:
    """``PixArtAlphaPipeline``: PixArt transformer, VAE, T5 (120 tokens, masked), scheduler."""
    _check_components(pipe, {"transformer", "vae", "text_encoder", "tokenizer", "scheduler"})
    schedule, sampler = _scheduler_parts(pipe.scheduler)
    transformer = _denoiser(pipe, pipe.transformer, DiT)
    return Pipeline(
        schedule,
        transformer,
        encoder=_vae(pipe.vae),
        text=t5_text(pipe.text_encoder, pipe.tokenizer, 120, mask=True),
        sampler=sampler,
        data_shape=_image_shape(pipe.vae, pipe.transformer.config.sample_size),
        steps=20,
        guidance=4.5,
        start=_start(pipe.scheduler),
    )


def _sdxl_text(pipe: Any) -> ComposedTextConditioner:
    """SDXL's two CLIP towers at their penultimate layer, side by side; bigG's pooled."""
    if pipe.text_encoder is None or pipe.text_encoder_2 is None:
        raise ValueError(
            "from_diffusers: StableDiffusionXLPipeline without text_encoder and text_encoder_2 "
            "(the refiner's layout) is not converted"
        )
    # each tower's hidden_states[-2]: the penultimate layer, without the final LayerNorm
    first = clip_text(pipe.text_encoder, pipe.tokenizer, skip_last_layers=1, final_norm=False)
    second = clip_text(
        pipe.text_encoder_2,
        pipe.tokenizer_2,
        project_pooled=True,
        skip_last_layers=1,
        final_norm=False,
    )
    return ComposedTextConditioner([first, second], groups=((0, 1),), pooled=(1,))


def _sdxl(pipe: Any) -> Pipeline:
    """``StableDiffusionXLPipeline``: U-Net with text_time, VAE, CLIP-L + bigG, scheduler."""
    used = {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"}
    _check_components(pipe, used | {"scheduler"})
    if getattr(pipe, "watermark", None) is not None:
        raise ValueError(
            "from_diffusers: StableDiffusionXLPipeline's watermark (invisible-watermark) is "
            "not converted: it changes the images' pixels; build the pipeline with "
            "add_watermarker=False"
        )
    schedule, sampler = _scheduler_parts(pipe.scheduler)
    unet = _denoiser(pipe, pipe.unet, UNet, micro_conditions=6)
    zeros = bool(pipe.config.get("force_zeros_for_empty_prompt", True))
    return Pipeline(
        schedule,
        unet,
        encoder=_vae(pipe.vae),
        text=_sdxl_text(pipe),
        sampler=sampler,
        data_shape=_image_shape(pipe.vae, pipe.unet.config.sample_size),
        steps=50,
        guidance=5.0,
        start=_start(pipe.scheduler),
        empty_uncond="zeros" if zeros else "prompt",
    )


def _sd3_text(pipe: Any) -> ComposedTextConditioner:
    """SD3's CLIP-L and bigG (penultimate, side by side, both pooled) then T5's 256 tokens."""
    if pipe.text_encoder_3 is None:
        raise ValueError(
            "from_diffusers: StableDiffusion3Pipeline without text_encoder_3 (T5): diffusers "
            "then conditions on zeros in its place, which is not converted"
        )
    clips = [
        clip_text(encoder, tokenizer, project_pooled=True, skip_last_layers=1, final_norm=False)
        for encoder, tokenizer in (
            (pipe.text_encoder, pipe.tokenizer),
            (pipe.text_encoder_2, pipe.tokenizer_2),
        )
    ]
    t5 = t5_text(pipe.text_encoder_3, pipe.tokenizer_3, 256, mask=False)
    return ComposedTextConditioner([*clips, t5], groups=((0, 1), (2,)), pooled=(0, 1))


def _sd3(pipe: Any) -> Pipeline:
    """``StableDiffusion3Pipeline``: MMDiT, VAE (with shift), CLIP-L + bigG + T5, flow."""
    used = {"transformer", "vae", "scheduler"}
    used |= {f"{kind}{n}" for kind in ("text_encoder", "tokenizer") for n in ("", "_2", "_3")}
    _check_components(pipe, used)
    schedule, sampler = _scheduler_parts(pipe.scheduler)
    shift = float(pipe.scheduler.config.get("shift", 1.0))
    prediction = _prediction(pipe.scheduler)
    transformer = _network(pipe.transformer, DiT, prediction=prediction, time_shift=shift)
    return Pipeline(
        schedule,
        transformer,
        encoder=_vae(pipe.vae),
        text=_sd3_text(pipe),
        sampler=sampler,
        data_shape=_image_shape(pipe.vae, pipe.transformer.config.sample_size),
        steps=28,
        guidance=7.0,
        start=_start(pipe.scheduler),
    )


PIPELINES: dict[str, Callable[[Any], Pipeline]] = {
    "StableDiffusionPipeline": _stable_diffusion,
    "DiTPipeline": _dit,
    "PixArtAlphaPipeline": _pixart,
    "StableDiffusionXLPipeline": _sdxl,
    "StableDiffusion3Pipeline": _sd3,
}
"""diffusers pipeline class name -> its converter."""


def pipeline_from_diffusers(pipe: Any) -> Pipeline:
    """The [`Pipeline`][diffkit.pipeline.Pipeline] drawing what a diffusers pipeline draws."""
    name = type(pipe).__name__
    if name not in PIPELINES:
        raise TypeError(
            f"from_diffusers: cannot convert the pipeline {name}; supported: {', '.join(PIPELINES)}"
        )
    return PIPELINES[name](pipe).eval()
