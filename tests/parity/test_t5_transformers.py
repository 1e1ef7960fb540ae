"""diffkit's T5 encoder and T5 conditioner vs transformers' T5EncoderModel and T5 tokenizer.

Tiny random configs, no downloads: the tokenizer is a small Unigram vocabulary built offline
with transformers' ``T5Tokenizer`` and saved as its ``tokenizer.json`` (offline_tokenizers.py).
"""

from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from offline_tokenizers import t5_tokenizer  # noqa: E402

import diffkit as dk  # noqa: E402
from diffkit.nn.t5 import T5Encoder, relative_position_buckets  # noqa: E402
from diffkit.text import TEXT_CONDITIONERS, T5TextConditioner, T5TextConditionerConfig  # noqa: E402
from diffkit.tokenizers import SentencePieceTokenizer  # noqa: E402

pytestmark = pytest.mark.parity

TEXTS = [
    "a photo of a cat",
    "an astronaut riding a horse on mars, a photo of the dog",
    "Zebra!",
    "",
]


def t5_encoder(feed_forward_proj: str = "gated-gelu", seed: int = 0) -> Any:
    config = transformers.T5Config(
        vocab_size=40,
        d_model=16,
        d_kv=6,  # heads * d_kv != d_model: the inner width is read, not assumed
        d_ff=24,
        num_layers=2,
        num_heads=3,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=10,  # short: the logarithmic buckets are reached
        feed_forward_proj=feed_forward_proj,
        dropout_rate=0.0,
    )
    torch.manual_seed(seed)
    model = transformers.T5EncoderModel(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # off T5's unit norms and its initialisation
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_sentencepiece_tokenizer_gives_transformers_ids(tmp_path: Path) -> None:
    reference = t5_tokenizer(tmp_path)
    ours = SentencePieceTokenizer(tmp_path / "tokenizer.json", context_length=12)
    want = reference(TEXTS, padding="max_length", max_length=12, truncation=True)
    ids = ours(TEXTS)
    assert ids.tolist() == want.input_ids
    assert ours.padding_mask(ids).long().tolist() == want.attention_mask
    assert (ids[1] != 0).all() and ids[1, -1] == 1  # the long text is cut, its end kept
    assert ours.decode(ids[0].tolist()) == "a photo of a cat"


def test_relative_position_buckets_match_transformers() -> None:
    from transformers.models.t5.modeling_t5 import T5Attention

    n = 40
    positions = torch.arange(n)
    distance = positions[None, :] - positions[:, None]
    for buckets, max_distance in ((8, 10), (32, 128)):
        want = T5Attention._relative_position_bucket(distance, True, buckets, max_distance)
        got = relative_position_buckets(n, n, buckets, max_distance, torch.device("cpu"))
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("feed_forward_proj", ["gated-gelu", "relu", "gated-relu"])
@pytest.mark.parametrize("masked", [True, False])
def test_t5_encoder_matches_transformers(
    tmp_path: Path, feed_forward_proj: str, masked: bool, dtype: torch.dtype
) -> None:
    reference = t5_encoder(feed_forward_proj).to(dtype)
    encoder = dk.interop.from_transformers(reference)
    assert isinstance(encoder, T5Encoder)
    assert encoder.config.gated == feed_forward_proj.startswith("gated")
    tokens = t5_tokenizer(tmp_path)(TEXTS, padding="max_length", max_length=20, truncation=True)
    ids = torch.tensor(tokens.input_ids)
    mask = torch.tensor(tokens.attention_mask)
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask if masked else None)
        got = encoder(ids, mask.bool() if masked else None)
    error = (got - want.last_hidden_state).abs().max().item()
    assert error <= 1e-5, error
    assert encoder.token_embedding.weight.dtype == dtype


@pytest.mark.parametrize("mask_padding", [True, False])  # PixArt, Stable Diffusion 3
def test_t5_conditioner_built_from_its_config_matches_transformers(
    tmp_path: Path, mask_padding: bool
) -> None:
    tokenizer = t5_tokenizer(tmp_path)
    reference = t5_encoder()
    converted = dk.interop.from_transformers(reference)
    config = T5TextConditionerConfig(
        text=converted.config,
        tokenizer_path=str(tmp_path / "tokenizer.json"),
        context_length=16,
        mask_padding=mask_padding,
    )
    conditioner = TEXT_CONDITIONERS.build(TEXT_CONDITIONERS.parse(config.to_dict()))
    assert isinstance(conditioner, T5TextConditioner)
    conditioner.encoder.load_state_dict(converted.state_dict())
    assert conditioner.config == config
    inputs = tokenizer(TEXTS, padding="max_length", max_length=16, truncation=True)
    ids, mask = torch.tensor(inputs.input_ids), torch.tensor(inputs.attention_mask)
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask if mask_padding else None)
        cond = conditioner.eval().condition(TEXTS)
    assert cond.tokens is not None and cond.pooled is None
    assert (cond.tokens - want.last_hidden_state).abs().max().item() <= 1e-5
    if mask_padding:
        assert cond.mask is not None and torch.equal(cond.mask, mask.bool())
    else:
        assert cond.mask is None
    assert (config.token_dim, config.pooled_dim) == (16, 0)
    assert isinstance(config, dk.protocols.TextSpec)


def test_unsupported_t5_options_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="feed_forward_proj"):
        dk.interop.from_transformers(t5_encoder("gated-silu"))
    with pytest.raises(ValueError, match="num_buckets"):
        dk.nn.t5.T5EncoderConfig(num_buckets=7)
    with pytest.raises(ValueError, match="pad_token_id"):
        T5TextConditionerConfig(
            text=dk.nn.t5.T5EncoderConfig(vocab_size=4, width=8, layers=1, heads=2, head_dim=4,
                                          mlp_width=8),
            tokenizer_path="tokenizer.json",
            pad_token_id=4,
        )  # fmt: skip
