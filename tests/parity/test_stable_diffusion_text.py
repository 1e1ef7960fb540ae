"""Stable Diffusion 1.x text conditioning, as diffusers' StableDiffusionPipeline computes it.

SD's pipeline tokenizes with transformers' OpenAI tokenizer (padding with the end token,
49407), runs ``CLIPTextModel`` without an attention mask and passes ``last_hidden_state`` to
the U-Net without ``encoder_attention_mask``: the U-Net attends to all 77 positions, padding
included. A diffkit conditioner configured that way (``pad_token_id=49407``,
``mask_padding=False``), saved as its config and built back, must drive the converted U-Net
to diffusers' output. Small random models; the BPE merges file open_clip ships (no download).
"""

import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("open_clip")

import diffkit as dk  # noqa: E402
from diffkit.text import TEXT_CONDITIONERS, CLIPTextConditioner, CLIPTextConditionerConfig  # noqa: E402
from diffkit.tokenizers import CLIPTokenizer, find_open_clip_vocab  # noqa: E402

pytestmark = pytest.mark.parity

CONTEXT = 16
SD_PAD = 49407  # transformers' openai/clip-vit-large-patch14 tokenizer pads with <|endoftext|>
TEXTS = ["a photo of a cat", "seven"]


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _sd_text_encoder() -> torch.nn.Module:
    config = transformers.CLIPTextConfig(
        vocab_size=49408,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CONTEXT,
        hidden_act="quick_gelu",
        pad_token_id=1,
        bos_token_id=49406,
        eos_token_id=2,  # SD 1.x's config: pooled at the largest id
    )
    torch.manual_seed(0)
    return _perturbed(transformers.CLIPTextModel(config), seed=0)


def _sd_unet() -> torch.nn.Module:
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
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
    return _perturbed(unet, seed=1)


def _conditioner_config(tower: dk.nn.clip.TextTower) -> CLIPTextConditionerConfig:
    return CLIPTextConditionerConfig(
        text=tower.config, tokenizer="clip_bpe", pad_token_id=SD_PAD, mask_padding=False
    )


def test_sd_text_conditioner_reloaded_from_its_config_matches_stable_diffusion() -> None:
    text_encoder, unet = _sd_text_encoder(), _sd_unet()
    tokenizer = CLIPTokenizer(find_open_clip_vocab(), CONTEXT, pad_token_id=SD_PAD)
    ids = tokenizer(TEXTS)
    assert (ids == SD_PAD).sum(dim=-1).min() > 1  # both rows are padded, with the end token
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(len(TEXTS), 4, 8, 8, generator=g)
    timestep = torch.tensor([10, 700])
    with torch.no_grad():
        expected = unet(
            latents, timestep, encoder_hidden_states=text_encoder(input_ids=ids)[0]
        ).sample

    tower = dk.interop.from_transformers(text_encoder)
    config = TEXT_CONDITIONERS.parse(_conditioner_config(tower).to_dict())
    conditioner = TEXT_CONDITIONERS.build(config)
    assert isinstance(conditioner, CLIPTextConditioner)
    conditioner.tower.load_state_dict(tower.state_dict())
    model = dk.interop.from_diffusers(unet)
    schedule = dk.schedules.Discrete.from_betas(torch.linspace(1e-4, 0.02, 1000))
    with torch.no_grad():
        cond = conditioner.eval().condition(TEXTS)
        got = model(latents, schedule.t_from_index(timestep), cond)
    assert cond.mask is None
    assert torch.equal(conditioner.tokenizer(TEXTS), ids)
    assert (got - expected).abs().max() <= 1e-5


def test_the_padding_mask_is_on_by_default_and_changes_what_the_unet_sees() -> None:
    text_encoder, unet = _sd_text_encoder(), _sd_unet()
    tower = dk.interop.from_transformers(text_encoder)
    tokenizer = CLIPTokenizer(find_open_clip_vocab(), CONTEXT, pad_token_id=SD_PAD)
    masked = CLIPTextConditioner(tower, tokenizer)
    unmasked = CLIPTextConditioner(tower, tokenizer, mask_padding=False)
    model = dk.interop.from_diffusers(unet)
    latents = torch.randn(len(TEXTS), 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.5, 0.5])
    with torch.no_grad():
        a, b = masked.condition(TEXTS), unmasked.condition(TEXTS)
        assert a.mask is not None and not a.mask.all() and b.mask is None
        torch.testing.assert_close(a.tokens, b.tokens)
        assert (model(latents, t, a) - model(latents, t, b)).abs().max() > 1e-4
