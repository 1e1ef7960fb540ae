"""transformers tokenizers built offline for parity tests (no downloads).

- ``clip_tokenizer``: transformers' ``CLIPTokenizer`` over the CLIP merges file open_clip
  ships (the vocabulary of OpenAI's and OpenCLIP's text towers, 49408 ids);
- ``t5_tokenizer``: transformers' ``T5Tokenizer`` over a tiny Unigram vocabulary, saved
  (``tokenizer.json``) where diffkit's ``SentencePieceTokenizer`` can read it.
"""

import gzip
from pathlib import Path
from typing import Any

import transformers

from diffkit.tokenizers import _byte_to_char, find_open_clip_vocab

T5_PIECES = [
    *("▁a", "▁photo", "▁of", "▁cat", "▁c", "at", "▁the", "▁dog", "▁seven", "▁s"),
    *("e", "v", "n", "o", "p", "h", "t", "g", "d", "r", "l"),
    *("▁an", "▁astronaut", "▁riding", "▁horse", "▁on", "▁mars"),
]


def clip_tokenizer(context_length: int, pad_token: str = "<|endoftext|>") -> Any:
    """CLIP's BPE as transformers runs it; ``pad_token="!"`` (id 0) is SDXL's second one."""
    with gzip.open(find_open_clip_vocab(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    alphabet = list(_byte_to_char().values())
    pieces = [*alphabet, *(c + "</w>" for c in alphabet), *(m.replace(" ", "") for m in merges)]
    pieces += ["<|startoftext|>", "<|endoftext|>"]
    return transformers.CLIPTokenizer(
        vocab={piece: i for i, piece in enumerate(pieces)},
        merges=[tuple(m.split()) for m in merges],
        pad_token=pad_token,
        model_max_length=context_length,
    )


def t5_tokenizer(folder: Path) -> Any:
    """A T5 tokenizer over a tiny Unigram vocabulary, saved in ``folder``."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(piece, -3.0 - 0.1 * i) for i, piece in enumerate(T5_PIECES)]
    tokenizer = transformers.T5Tokenizer(vocab=vocab, extra_ids=0)
    tokenizer.save_pretrained(folder)
    return tokenizer
