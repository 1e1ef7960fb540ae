"""diffkit's text tower vs transformers' CLIPTextModel on small random configs."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
)

import diffkit as dk  # noqa: E402
from diffkit.nn.clip import TextTower  # noqa: E402
from diffkit.text import CLIPTextConditioner, TransformersTextConditioner  # noqa: E402
from diffkit.tokenizers import ByteTokenizer  # noqa: E402

pytestmark = pytest.mark.parity

CONTEXT = 12


def random_config(hidden_act: str, eos_token_id: int) -> "CLIPTextConfig":
    return CLIPTextConfig(
        vocab_size=259,
        hidden_size=32,
        intermediate_size=40,  # not 4 * width: mlp_width is read, not assumed
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CONTEXT,
        hidden_act=hidden_act,
        projection_dim=16,
        pad_token_id=0,
        bos_token_id=ByteTokenizer.sot_token_id,
        eos_token_id=eos_token_id,
    )


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():  # move LayerNorms and biases off their identity init
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def token_ids() -> torch.Tensor:
    # rows whose end token is followed by padding, by more end tokens, or is truncated
    ids = ByteTokenizer(CONTEXT)(["seven", "a photo of a seven", ""])
    ids[2, 3:] = ByteTokenizer.eot_token_id
    return ids


@pytest.mark.parametrize(
    ("hidden_act", "eos_token_id"),
    [("quick_gelu", 2), ("gelu", ByteTokenizer.eot_token_id), ("quick_gelu", 65)],
)
def test_from_transformers_matches_last_hidden_state_and_pooler_output(
    hidden_act: str, eos_token_id: int
) -> None:
    ref = randomize(CLIPTextModel(random_config(hidden_act, eos_token_id)))
    tower = dk.interop.from_transformers(ref)
    assert isinstance(tower, TextTower)
    ids = token_ids()
    if eos_token_id == 65:  # an eos id that is not the row maximum: pooled at its first match
        ids[:, 4] = 65
    with torch.no_grad():
        out = ref(input_ids=ids)
        tokens, pooled = tower(ids)
    torch.testing.assert_close(tokens, out.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, out.pooler_output, atol=1e-5, rtol=0)


def test_from_transformers_keeps_the_projection_of_a_with_projection_model() -> None:
    ref = randomize(CLIPTextModelWithProjection(random_config("quick_gelu", 2)))
    tower = dk.interop.from_transformers(ref)
    ids = token_ids()
    with torch.no_grad():
        out = ref(input_ids=ids)
        torch.testing.assert_close(tower.encode(ids), out.text_embeds, atol=1e-5, rtol=0)
        torch.testing.assert_close(tower(ids)[0], out.last_hidden_state, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("cls", "project_pooled"),
    [
        (CLIPTextModel, False),
        (CLIPTextModelWithProjection, False),
        (CLIPTextModelWithProjection, True),
    ],
)
@pytest.mark.parametrize(("skip_last_layers", "final_norm"), [(0, True), (1, True), (1, False)])
def test_transformers_conditioner_matches_the_converted_tower(
    cls: type, project_pooled: bool, skip_last_layers: int, final_norm: bool
) -> None:
    ref = randomize(cls(random_config("gelu", ByteTokenizer.eot_token_id)))
    tok = ByteTokenizer(CONTEXT)
    options = dict(
        project_pooled=project_pooled, skip_last_layers=skip_last_layers, final_norm=final_norm
    )
    wrapped = TransformersTextConditioner(ref, tok, **options)
    ours = CLIPTextConditioner(dk.interop.from_transformers(ref), tok, **options)
    texts = ["seven", "the number 7", "a handwritten digit seven"]
    with torch.no_grad():
        a, b = wrapped.condition(texts), ours.condition(texts)
    assert a.tokens is not None and b.tokens is not None
    assert a.pooled is not None and b.pooled is not None
    torch.testing.assert_close(a.tokens, b.tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.pooled, b.pooled, atol=1e-5, rtol=0)
    assert (wrapped.token_dim, wrapped.pooled_dim) == (ours.token_dim, ours.pooled_dim)


def test_non_clip_models_are_refused() -> None:
    with pytest.raises(TypeError, match="CLIPTextModel"):
        dk.interop.from_transformers(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="CLIPTextModel"):
        TransformersTextConditioner(torch.nn.Linear(2, 2), ByteTokenizer())


def test_skipping_a_layer_without_final_norm_gives_the_penultimate_hidden_state() -> None:
    # SDXL's text conditioning: hidden_states[-2] of CLIPTextModel, no final LayerNorm
    ref = randomize(CLIPTextModel(random_config("quick_gelu", 2)))
    tower = dk.interop.from_transformers(ref)
    ids = token_ids()
    with torch.no_grad():
        out = ref(input_ids=ids, output_hidden_states=True)
        tokens, pooled = tower(ids, skip_last_layers=1, final_norm=False)
    torch.testing.assert_close(tokens, out.hidden_states[-2], atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, out.pooler_output, atol=1e-5, rtol=0)


def test_sdxl_style_conditioner_from_its_config_gives_penultimate_state_and_text_embeds() -> None:
    # OpenCLIP-bigG as SDXL / SD3 run it: hidden_states[-2] (no final LN), projected pool
    from diffkit.text import TEXT_CONDITIONERS, CLIPTextConditionerConfig

    ref = randomize(CLIPTextModelWithProjection(random_config("gelu", ByteTokenizer.eot_token_id)))
    tower = dk.interop.from_transformers(ref)
    config = CLIPTextConditionerConfig(
        text=tower.config, tokenizer="byte", projection_dim=16, project_pooled=True,
        skip_last_layers=1, final_norm=False, mask_padding=False,
    )  # fmt: skip
    conditioner = TEXT_CONDITIONERS.build(TEXT_CONDITIONERS.parse(config.to_dict()))
    assert isinstance(conditioner, CLIPTextConditioner) and conditioner.config == config
    conditioner.tower.load_state_dict(tower.state_dict())
    texts = ["seven", "a handwritten digit seven"]
    ids = ByteTokenizer(CONTEXT)(texts)
    with torch.no_grad():
        out = ref(input_ids=ids, output_hidden_states=True)
        cond = conditioner.eval().condition(texts)
    assert cond.tokens is not None and cond.pooled is not None and cond.mask is None
    torch.testing.assert_close(cond.tokens, out.hidden_states[-2], atol=1e-5, rtol=0)
    torch.testing.assert_close(cond.pooled, out.text_embeds, atol=1e-5, rtol=0)
