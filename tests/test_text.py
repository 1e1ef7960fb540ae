"""Text conditioners built on diffkit's CLIP text tower (external adapters: tests/parity)."""

import pytest
import torch

from diffkit.nn.clip import TextTower, TextTowerConfig
from diffkit.protocols import Conditioning, TextConditioner
from diffkit.text import TEXT_CONDITIONERS, CLIPTextConditioner, CLIPTextConditionerConfig
from diffkit.tokenizers import ByteTokenizer


def tower_config(**overrides: object) -> TextTowerConfig:
    fields: dict[str, object] = dict(vocab_size=259, context_length=12, width=16, layers=1, heads=2)
    return TextTowerConfig.model_validate(fields | overrides)


@pytest.fixture(scope="module")
def conditioner() -> CLIPTextConditioner:
    torch.manual_seed(0)
    tower = TextTower(tower_config(), proj_dim=8).eval()
    return CLIPTextConditioner(tower, ByteTokenizer(12))


def test_clip_text_conditioner_satisfies_the_protocol(conditioner: CLIPTextConditioner) -> None:
    assert isinstance(conditioner, TextConditioner)
    assert (conditioner.token_dim, conditioner.pooled_dim, conditioner.context_length) == (
        16,
        16,
        12,
    )


def test_condition_returns_tokens_pooled_and_padding_mask(
    conditioner: CLIPTextConditioner,
) -> None:
    texts = ["seven", "a picture of a handwritten seven"]  # the second is truncated
    with torch.no_grad():
        cond = conditioner.condition(texts)
        ids = conditioner.tokenizer(texts)
        tokens, pooled = conditioner.tower(ids)
    assert isinstance(cond, Conditioning)
    assert cond.tokens is not None and cond.pooled is not None and cond.mask is not None
    assert cond.tokens.shape == (2, 12, 16)
    assert cond.pooled.shape == (2, 16)
    assert cond.mask.tolist()[0] == [True] * 7 + [False] * 5  # start, 5 bytes, end
    assert cond.mask[1].all()
    torch.testing.assert_close(cond.tokens, tokens)
    torch.testing.assert_close(cond.pooled, pooled)
    torch.testing.assert_close(cond.pooled[0], cond.tokens[0, 6])  # pooled at the end token


def test_project_pooled_gives_the_clip_text_embedding(conditioner: CLIPTextConditioner) -> None:
    projected = CLIPTextConditioner(conditioner.tower, ByteTokenizer(12), project_pooled=True)
    assert projected.pooled_dim == 8
    with torch.no_grad():
        cond = projected.condition(["seven"])
        expected = conditioner.tower.encode(ByteTokenizer(12)(["seven"]))
    assert cond.pooled is not None
    torch.testing.assert_close(cond.pooled, expected)


def test_empty_text_list_or_bare_string_gives_a_clear_error(
    conditioner: CLIPTextConditioner,
) -> None:
    with pytest.raises(ValueError, match="empty list of texts"):
        conditioner.condition([])
    with pytest.raises(TypeError, match="single string"):
        conditioner.condition("seven")


def test_mismatched_tokenizer_and_tower_are_rejected() -> None:
    tower = TextTower(tower_config(context_length=8))
    with pytest.raises(ValueError, match="context_length 12 exceeds"):
        CLIPTextConditioner(tower, ByteTokenizer(12))
    small = TextTower(tower_config(vocab_size=100))
    with pytest.raises(ValueError, match="259 ids"):
        CLIPTextConditioner(small, ByteTokenizer(12))
    with pytest.raises(ValueError, match="needs a tower projection"):
        CLIPTextConditioner(tower, ByteTokenizer(8), project_pooled=True)


def test_registry_builds_a_conditioner_from_a_dict() -> None:
    data = {
        "kind": "clip_text",
        "text": tower_config().to_dict(),
        "tokenizer": "byte",
        "projection_dim": 8,
        "project_pooled": True,
    }
    built = TEXT_CONDITIONERS.build(data)
    assert isinstance(built, CLIPTextConditioner)
    cond = built.condition(["one", "two", "three"])
    assert cond.pooled is not None and cond.pooled.shape == (3, 8)
    assert TEXT_CONDITIONERS.parse(CLIPTextConditionerConfig.model_validate(data).to_json())


def test_config_validates_vocabulary_and_projection() -> None:
    with pytest.raises(ValueError, match="too small for the clip_bpe tokenizer"):
        CLIPTextConditionerConfig(text=tower_config(), tokenizer="clip_bpe")
    with pytest.raises(ValueError, match="needs projection_dim"):
        CLIPTextConditionerConfig(text=tower_config(), tokenizer="byte", project_pooled=True)


def test_clip_bpe_conditioner_from_config_uses_open_clips_vocabulary() -> None:
    pytest.importorskip("open_clip")
    config = CLIPTextConditionerConfig(text=tower_config(vocab_size=49408), tokenizer="clip_bpe")
    built = TEXT_CONDITIONERS.build(config)
    assert isinstance(built, CLIPTextConditioner)
    assert built.tokenizer.vocab_size == 49408
    cond = built.condition(["a photo of a cat"])
    assert cond.mask is not None and int(cond.mask.sum()) == 7  # start, 5 words, end


def test_a_shorter_tokenizer_context_uses_the_first_positions() -> None:
    torch.manual_seed(0)
    tower = TextTower(tower_config()).eval()
    short = CLIPTextConditioner(tower, ByteTokenizer(8))
    with torch.no_grad():
        cond = short.condition(["seven"])
        _, pooled = tower(ByteTokenizer(12)(["seven"]))
    assert cond.tokens is not None and cond.tokens.shape == (1, 8, 16)
    torch.testing.assert_close(cond.pooled, pooled)  # causal: later padding changes nothing


def test_skip_last_layers_takes_tokens_earlier_and_keeps_the_pooled_state() -> None:
    torch.manual_seed(0)
    tower = TextTower(tower_config(layers=2)).eval()
    tok = ByteTokenizer(12)
    ids = tok(["seven"])
    with torch.no_grad():
        _, full_pooled = tower(ids)
        x = tower.token_embedding(ids) + tower.positional_embedding
        after_first = tower.blocks[0](x, causal=True)
        for skip, final_norm, expected in [
            (1, True, tower.ln_final(after_first)),
            (1, False, after_first),
            (2, False, x),
        ]:
            cond = CLIPTextConditioner(
                tower, tok, skip_last_layers=skip, final_norm=final_norm
            ).condition(["seven"])
            torch.testing.assert_close(cond.tokens, expected)
            torch.testing.assert_close(cond.pooled, full_pooled)
    with pytest.raises(ValueError, match=r"skip_last_layers must be in \[0, 2\]"):
        CLIPTextConditioner(tower, tok, skip_last_layers=3)
    with pytest.raises(ValueError, match=r"exceeds text\.layers"):
        CLIPTextConditionerConfig(text=tower_config(layers=2), tokenizer="byte", skip_last_layers=3)


def test_the_tower_must_pool_at_the_tokenizers_end_token() -> None:
    # a pooled vector read at a pad (or the start token) would condition on nothing
    with pytest.raises(ValueError, match=r"eos_token_id 5 but .* eot_token_id 258"):
        CLIPTextConditioner(TextTower(tower_config(eos_token_id=5)), ByteTokenizer(12))
    wide = TextTower(tower_config(vocab_size=300))  # argmax rule, but 258 is not the largest id
    tokenizer = ByteTokenizer(12)
    tokenizer.vocab_size = 300  # type: ignore[misc]  # a tokenizer with ids above its end token
    with pytest.raises(ValueError, match="end token 258 is not its largest id"):
        CLIPTextConditioner(wide, tokenizer)
    CLIPTextConditioner(TextTower(tower_config(eos_token_id=258)), ByteTokenizer(12))
    with pytest.raises(ValueError, match=r"eos_token_id .* below vocab_size"):
        tower_config(eos_token_id=10**6)


def test_config_mask_padding_and_pad_token_id_reach_the_conditioner() -> None:
    config = CLIPTextConditionerConfig(text=tower_config(), tokenizer="byte", mask_padding=False)
    assert TEXT_CONDITIONERS.parse(config.to_dict()) == config
    conditioner = CLIPTextConditioner.from_config(config)
    with torch.no_grad():
        assert conditioner.condition(["seven"]).mask is None
    with pytest.raises(ValueError, match="pad_token_id"):
        CLIPTextConditionerConfig(text=tower_config(), tokenizer="byte", pad_token_id=5)


def test_a_conditioner_put_together_by_hand_has_the_config_that_builds_it_again() -> None:
    torch.manual_seed(0)
    tower = TextTower(tower_config(), proj_dim=8).eval()
    by_hand = CLIPTextConditioner(tower, ByteTokenizer(12), project_pooled=True)
    config = by_hand.config
    assert config.text == tower.config and config.projection_dim == 8 and config.project_pooled
    assert (config.token_dim, config.pooled_dim) == (by_hand.token_dim, by_hand.pooled_dim)
    again = TEXT_CONDITIONERS.build(config)
    assert isinstance(again, CLIPTextConditioner) and again.config == config
    again.load_state_dict(by_hand.state_dict())
    a, b = by_hand.condition(["a seven"]), again.condition(["a seven"])
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.pooled, b.pooled)
    with pytest.raises(ValueError, match="context_length 8 is not its tower's 12"):
        CLIPTextConditioner(tower, ByteTokenizer(8)).config  # noqa: B018


def test_the_clip_bpe_padding_id_is_part_of_the_config() -> None:
    pytest.importorskip("open_clip")
    config = CLIPTextConditionerConfig(
        text=tower_config(vocab_size=49408), tokenizer="clip_bpe", pad_token_id=49407
    )
    built = TEXT_CONDITIONERS.build(config)
    assert isinstance(built, CLIPTextConditioner) and built.tokenizer.pad_token_id == 49407
    assert built.config.pad_token_id == 49407
    with pytest.raises(ValueError, match="not a padding id of the byte"):
        CLIPTextConditionerConfig(text=tower_config(), tokenizer="byte", pad_token_id=3)
