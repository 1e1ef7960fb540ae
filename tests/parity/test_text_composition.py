"""Composed text conditioners vs the prompt encoding of diffusers' SDXL and SD3 pipelines.

SDXL: CLIP-L (``CLIPTextModel``) and OpenCLIP-bigG (``CLIPTextModelWithProjection``), each
at its penultimate hidden state without the final LayerNorm, side by side on the features;
pooled: bigG's projected ``text_embeds``. SD3: two ``CLIPTextModelWithProjection`` likewise
(pooled: both, concatenated), zero-padded to T5's width, then T5's tokens on the sequence
axis. Tiny random encoders, tokenizers built offline, no downloads.
"""

from pathlib import Path
from typing import Any

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("open_clip")

from offline_tokenizers import clip_tokenizer, t5_tokenizer  # noqa: E402

import diffkit as dk  # noqa: E402
from diffkit.text import (  # noqa: E402
    TEXT_CONDITIONERS,
    CLIPTextConditioner,
    CLIPTextConditionerConfig,
    ComposedTextConditioner,
    ComposedTextConditionerConfig,
    T5TextConditionerConfig,
)
from diffkit.tokenizers import find_open_clip_vocab  # noqa: E402

pytestmark = pytest.mark.parity

CONTEXT = 16
T5_LENGTH = 12
TEXTS = ["a photo of a cat", "an astronaut riding a horse on mars, a photo of the dog"]
NEGATIVE = ["blurry", ""]


def _randomize(model: Any, seed: int) -> Any:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


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
        eos_token_id=2,  # the published configs: pooled at the largest id
    )
    torch.manual_seed(seed)
    return _randomize(cls(config), seed)


def _t5(width: int) -> Any:
    config = transformers.T5Config(
        vocab_size=40, d_model=width, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=10,
        feed_forward_proj="gated-gelu", dropout_rate=0.0,
    )  # fmt: skip
    torch.manual_seed(3)
    return _randomize(transformers.T5EncoderModel(config), 3)


def _clip_config(
    model: Any, pad_token_id: int, *, projected: bool
) -> tuple[CLIPTextConditionerConfig, dict[str, torch.Tensor]]:
    """The conditioner config of an SDXL / SD3 CLIP tower and its converted weights."""
    tower = dk.interop.from_transformers(model)
    config = CLIPTextConditionerConfig(
        text=tower.config,
        vocab_path=find_open_clip_vocab(),
        pad_token_id=pad_token_id,
        projection_dim=tower.projection.out_features if tower.projection is not None else None,
        project_pooled=projected,
        skip_last_layers=1,  # hidden_states[-2]
        final_norm=False,
        mask_padding=False,
    )
    return config, tower.state_dict()


def _load(conditioner: ComposedTextConditioner, states: list[dict[str, torch.Tensor]]) -> None:
    for part, state in zip(conditioner.parts, states, strict=True):
        inner = part.tower if isinstance(part, CLIPTextConditioner) else part.encoder
        inner.load_state_dict(state)


def _max_error(a: torch.Tensor | None, b: torch.Tensor) -> float:
    assert a is not None and a.shape == b.shape
    return (a - b).abs().max().item()


def test_sdxl_composition_matches_diffusers_encode_prompt() -> None:
    clip_l = _clip(transformers.CLIPTextModel, 16, 12, seed=0)
    clip_g = _clip(transformers.CLIPTextModelWithProjection, 24, 20, seed=1)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=None, unet=None, scheduler=diffusers.EulerDiscreteScheduler(),
        text_encoder=clip_l, tokenizer=clip_tokenizer(CONTEXT),
        text_encoder_2=clip_g, tokenizer_2=clip_tokenizer(CONTEXT, pad_token="!"),
    )  # fmt: skip
    with torch.no_grad():
        want = pipe.encode_prompt(
            TEXTS, device="cpu", do_classifier_free_guidance=True, negative_prompt=NEGATIVE
        )
    (l_config, l_state), (g_config, g_state) = (
        _clip_config(clip_l, 49407, projected=False),
        _clip_config(clip_g, 0, projected=True),
    )
    config = ComposedTextConditionerConfig.sdxl(l_config, g_config)
    assert (config.token_dim, config.pooled_dim) == (16 + 24, 20)
    conditioner = TEXT_CONDITIONERS.build(TEXT_CONDITIONERS.parse(config.to_json()))
    assert isinstance(conditioner, ComposedTextConditioner) and conditioner.config == config
    _load(conditioner, [l_state, g_state])
    with torch.no_grad():
        cond, uncond = conditioner.condition(TEXTS), conditioner.condition(NEGATIVE)
    errors = [
        _max_error(cond.tokens, want[0]),
        _max_error(uncond.tokens, want[1]),
        _max_error(cond.pooled, want[2]),
        _max_error(uncond.pooled, want[3]),
    ]
    assert cond.mask is None and max(errors) <= 1e-5, errors


def _sd3_parts(tmp_path: Path) -> tuple[Any, ...]:
    clip_l = _clip(transformers.CLIPTextModelWithProjection, 16, 12, seed=0)
    clip_g = _clip(transformers.CLIPTextModelWithProjection, 24, 20, seed=1)
    return clip_l, clip_g, _t5(48), t5_tokenizer(tmp_path)


def _sd3_conditioner(tmp_path: Path, clip_l: Any, clip_g: Any, t5: Any) -> ComposedTextConditioner:
    (l_config, l_state), (g_config, g_state) = (
        _clip_config(clip_l, 49407, projected=True),
        _clip_config(clip_g, 0, projected=True),
    )
    encoder = dk.interop.from_transformers(t5)
    t5_config = T5TextConditionerConfig(
        text=encoder.config,
        tokenizer_path=str(tmp_path / "tokenizer.json"),
        context_length=T5_LENGTH,
        mask_padding=False,
    )
    config = ComposedTextConditionerConfig.sd3(l_config, g_config, t5_config)
    assert (config.token_dim, config.pooled_dim) == (48, 12 + 20)
    conditioner = TEXT_CONDITIONERS.build(TEXT_CONDITIONERS.parse(config.to_dict()))
    assert isinstance(conditioner, ComposedTextConditioner)
    _load(conditioner, [l_state, g_state, encoder.state_dict()])
    return conditioner.eval()


def test_sd3_composition_matches_diffusers_encode_prompt(tmp_path: Path) -> None:
    clip_l, clip_g, t5, t5_tok = _sd3_parts(tmp_path)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=None, vae=None, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        text_encoder=clip_l, tokenizer=clip_tokenizer(CONTEXT),
        text_encoder_2=clip_g, tokenizer_2=clip_tokenizer(CONTEXT, pad_token="!"),
        text_encoder_3=t5, tokenizer_3=t5_tok,
    )  # fmt: skip
    with torch.no_grad():
        want = pipe.encode_prompt(
            TEXTS, None, None, device="cpu", do_classifier_free_guidance=True,
            negative_prompt=NEGATIVE, max_sequence_length=T5_LENGTH,
        )  # fmt: skip
    conditioner = _sd3_conditioner(tmp_path, clip_l, clip_g, t5)
    with torch.no_grad():
        cond, uncond = conditioner.condition(TEXTS), conditioner.condition(NEGATIVE)
    assert cond.tokens is not None and cond.tokens.shape == (2, CONTEXT + T5_LENGTH, 48)
    errors = [
        _max_error(cond.tokens, want[0]),
        _max_error(uncond.tokens, want[1]),
        _max_error(cond.pooled, want[2]),
        _max_error(uncond.pooled, want[3]),
    ]
    assert max(errors) <= 1e-5, errors


def test_composed_conditioner_saves_and_loads_in_a_pipeline(tmp_path: Path) -> None:
    clip_l, clip_g, t5, _ = _sd3_parts(tmp_path)
    text = _sd3_conditioner(tmp_path, clip_l, clip_g, t5)
    denoiser = dk.nn.DiT(
        dk.nn.DiTConfig(
            dim=16, depth=1, num_heads=2, context_dim=48, pooled_dim=32, prediction="flow"
        )
    )
    schedule = dk.schedules.RectifiedFlow()
    pipeline = dk.Pipeline(schedule=schedule, denoiser=denoiser, text=text, data_shape=(4, 8, 8))
    pipeline.save(tmp_path / "pipe")
    loaded = dk.Pipeline.load(tmp_path / "pipe")
    # the tokenizer files travel with the pipeline: the loaded parts read the folder's copies
    saved = tmp_path / "pipe" / "tokenizer"
    assert loaded.config.model_copy(update={"text": None}) == pipeline.config.model_copy(
        update={"text": None}
    )
    paths = [
        getattr(part, "vocab_path", None) or part.tokenizer_path
        for part in loaded.text.config.parts
    ]
    assert [Path(path).parent for path in paths] == [saved / str(i) for i in range(3)]
    for path, part in zip(paths, pipeline.text.config.parts, strict=True):
        original = getattr(part, "vocab_path", None) or part.tokenizer_path
        assert Path(path).read_bytes() == Path(original).read_bytes()
    with torch.no_grad():
        a, b = pipeline.condition(TEXTS), loaded.condition(TEXTS)
    assert a.tokens is not None and b.tokens is not None and torch.equal(a.tokens, b.tokens)
    assert a.pooled is not None and b.pooled is not None and torch.equal(a.pooled, b.pooled)


def test_composition_refuses_what_it_cannot_join(tmp_path: Path) -> None:
    clip_l = _clip(transformers.CLIPTextModelWithProjection, 16, 12, seed=0)
    config, _ = _clip_config(clip_l, 49407, projected=True)
    with pytest.raises(ValueError, match="mask_padding"):
        ComposedTextConditionerConfig(
            parts=(config.model_copy(update={"mask_padding": True}),), groups=((0,),)
        )
    with pytest.raises(ValueError, match="groups"):
        ComposedTextConditionerConfig(parts=(config, config), groups=((0,),))
    short = config.model_copy(update={"text": config.text.model_copy(update={"context_length": 8})})
    with pytest.raises(ValueError, match="context lengths"):
        ComposedTextConditionerConfig(parts=(config, short), groups=((0, 1),))
    unprojected = config.model_copy(update={"projection_dim": None, "project_pooled": False})
    with pytest.raises(ValueError, match="pooled"):
        ComposedTextConditionerConfig(parts=(config,), groups=((0,),), pooled=(1,))
    assert (
        ComposedTextConditionerConfig(parts=(unprojected,), groups=((0,),), pooled=(0,)).pooled_dim
        == 16
    )
    with pytest.raises(TypeError, match=r"parts\[0\]"):
        ComposedTextConditioner([torch.nn.Linear(2, 2)], ((0,),))
