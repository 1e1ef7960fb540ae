"""Tokenizers: fixed-length layout, round trips, errors (open_clip parity is in tests/parity)."""

import gzip

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from diffkit.tokenizers import (
    ByteTokenizer,
    CLIPTokenizer,
    Tokenizer,
    find_open_clip_vocab,
    padding_mask,
)


@pytest.fixture(scope="module")
def clip_tokenizer() -> CLIPTokenizer:
    pytest.importorskip("open_clip")
    return CLIPTokenizer(find_open_clip_vocab(), context_length=16)


def test_tokenizers_satisfy_the_protocol(clip_tokenizer: CLIPTokenizer) -> None:
    assert isinstance(ByteTokenizer(), Tokenizer)
    assert isinstance(clip_tokenizer, Tokenizer)
    assert clip_tokenizer.vocab_size == 49408
    assert clip_tokenizer.eot_token_id == clip_tokenizer.vocab_size - 1
    assert ByteTokenizer.eot_token_id == ByteTokenizer.vocab_size - 1


@given(texts=st.lists(st.text(max_size=40), min_size=1, max_size=4), context=st.integers(2, 24))
def test_byte_tokenizer_always_emits_exactly_context_length_ids(
    texts: list[str], context: int
) -> None:
    tok = ByteTokenizer(context_length=context)
    ids = tok(texts)
    assert ids.shape == (len(texts), context)
    assert ids.dtype == torch.long
    assert (ids[:, 0] == tok.sot_token_id).all()
    # exactly one end token per row, and it is the row's argmax (CLIP's pooling rule)
    assert ((ids == tok.eot_token_id).sum(dim=1) == 1).all()
    assert (ids.argmax(dim=1) == (ids == tok.eot_token_id).int().argmax(dim=1)).all()
    assert int(ids.max()) < tok.vocab_size


@given(text=st.text(max_size=30))
def test_byte_tokenizer_round_trips_text_that_fits(text: str) -> None:
    tok = ByteTokenizer(context_length=len(text.encode("utf-8")) + 2)
    ids = tok([text])
    assert tok.decode(ids[0].tolist()) == text
    assert tok.decode(tok.encode(text)) == text


def test_byte_tokenizer_truncates_and_ends_with_the_end_token() -> None:
    tok = ByteTokenizer(context_length=6)
    ids = tok(["abcdefgh"])[0].tolist()
    assert ids == [tok.sot_token_id, *(ord(c) + 1 for c in "abcd"), tok.eot_token_id]
    assert tok.decode(ids) == "abcd"


def test_padding_mask_marks_start_text_and_end() -> None:
    tok = ByteTokenizer(context_length=8)
    ids = tok(["ab", ""])
    mask = tok.padding_mask(ids)
    assert mask.tolist() == [[True] * 4 + [False] * 4, [True] * 2 + [False] * 6]


words = st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8), max_size=5)


@given(words=words)
def test_clip_tokenizer_round_trips_lowercase_words(
    clip_tokenizer: CLIPTokenizer, words: list[str]
) -> None:
    text = " ".join(words)
    assert clip_tokenizer.decode(clip_tokenizer.encode(text)).strip() == text


@given(texts=st.lists(st.text(max_size=60), min_size=1, max_size=3))
def test_clip_tokenizer_always_emits_exactly_context_length_ids(
    clip_tokenizer: CLIPTokenizer, texts: list[str]
) -> None:
    ids = clip_tokenizer(texts)
    assert ids.shape == (len(texts), 16)
    assert (ids[:, 0] == clip_tokenizer.sot_token_id).all()
    assert ((ids == clip_tokenizer.eot_token_id).sum(dim=1) == 1).all()


def test_clip_tokenizer_cleans_case_whitespace_and_html(clip_tokenizer: CLIPTokenizer) -> None:
    messy = clip_tokenizer.encode("  A  Photo\tof &amp;amp; ")
    assert messy == clip_tokenizer.encode("a photo of &")


@pytest.mark.parametrize("name", ["byte", "clip"])
def test_empty_or_bare_string_input_gives_a_clear_error(
    name: str, request: pytest.FixtureRequest
) -> None:
    tokenizer = ByteTokenizer() if name == "byte" else request.getfixturevalue("clip_tokenizer")
    with pytest.raises(ValueError, match="empty list of texts"):
        tokenizer([])
    with pytest.raises(TypeError, match="single string"):
        tokenizer("a photo")
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        tokenizer(["a", 3])  # type: ignore[list-item]


def test_context_length_below_two_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        ByteTokenizer(context_length=1)


def test_clip_tokenizer_rejects_a_file_that_is_not_clip_merges(tmp_path) -> None:
    path = tmp_path / "merges.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version\na b\n")
    with pytest.raises(ValueError, match="not a CLIP merges file"):
        CLIPTokenizer(path)


def test_padding_mask_of_a_row_without_end_token_is_all_true() -> None:
    ids = torch.tensor([[257, 5, 6, 7], [257, 258, 258, 258]])
    assert padding_mask(ids, 258).tolist() == [[True] * 4, [True, True, False, False]]


def test_clip_tokenizer_can_pad_with_the_end_token(clip_tokenizer: CLIPTokenizer) -> None:
    tok = CLIPTokenizer(clip_tokenizer.vocab_path, context_length=8, pad_token_id=49407)
    ids = tok(["a cat"])[0].tolist()
    assert ids == [49406, *clip_tokenizer.encode("a cat"), *[49407] * 5]
    assert tok.padding_mask(tok(["a cat"])).tolist() == [[True] * 4 + [False] * 4]
    assert tok.decode(ids) == "a cat "
