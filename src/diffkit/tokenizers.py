"""Text to fixed-length token ids: a file-free byte tokenizer and CLIP's byte-pair encoder.

Both follow CLIP's layout: ``[start, *ids, end, pad, pad, ...]``, exactly
``context_length`` ids per text. A text too long for the context is truncated and its
last id replaced by the end token, so every row holds exactly one end token. The end
token has the largest id of the vocabulary, so a text tower can find it with
``argmax`` (CLIP's pooling rule).

- [`ByteTokenizer`][diffkit.tokenizers.ByteTokenizer] needs no files: one id per UTF-8
  byte. For training from scratch offline.
- [`CLIPTokenizer`][diffkit.tokenizers.CLIPTokenizer] reads the standard CLIP merges file
  ``bpe_simple_vocab_16e6.txt.gz`` (open_clip ships a copy:
  [`find_open_clip_vocab`][diffkit.tokenizers.find_open_clip_vocab]) and gives the same
  ids as open_clip's tokenizer. Text is cleaned as CLIP does: ``ftfy.fix_text`` when
  ftfy is installed (it is whenever open_clip is), otherwise Unicode NFC normalisation
  only (the fallback differs from CLIP on mojibake, curly quotes and full-width forms);
  then HTML entities are unescaped twice, whitespace runs collapse to one space, and
  the text is lower-cased. The merges file must be a regular file of at most
  [`MAX_READ_BYTES`][diffkit.files.MAX_READ_BYTES] inflated; a missing, damaged or
  oversized one (or a FIFO, device or directory) raises
  [`UnreadableFileError`][diffkit.files.UnreadableFileError] naming it, without hanging.
- [`SentencePieceTokenizer`][diffkit.tokenizers.SentencePieceTokenizer] runs a
  ``tokenizer.json`` (the format of Hugging Face's ``tokenizers`` library, which it needs:
  T5's SentencePiece Unigram model) in T5's layout instead: ``[*ids, end, pad, ...]``, no
  start token.
"""

import functools
import html
import itertools
import os
import unicodedata
from collections.abc import Sequence

import torch
from torch import Tensor
from typing_extensions import Protocol, runtime_checkable

from diffkit.files import UnreadableFileError, read_bytes, read_gzip
from diffkit.protocols import _ProtocolMeta
from diffkit.typing import TokenIds

__all__ = [
    "ByteTokenizer",
    "CLIPTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "find_open_clip_vocab",
    "padding_mask",
]


@runtime_checkable
class Tokenizer(Protocol, metaclass=_ProtocolMeta):
    """Texts to ``(batch, context_length)`` integer ids with start / end / padding tokens."""

    vocab_size: int
    context_length: int
    sot_token_id: int
    eot_token_id: int
    pad_token_id: int

    def encode(self, text: str) -> list[int]:
        """The ids of one text, without start / end tokens and without truncation."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Ids back to text, without a leading start token and from the first end token on."""
        ...

    def __call__(self, texts: Sequence[str]) -> TokenIds:
        """``len(texts)`` texts to ids ``(batch, context_length)``, truncated and padded."""
        ...


def _check_texts(texts: Sequence[str], owner: str) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{owner}: expected a list of texts, got a single string; wrap it: [text]")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{owner}: got an empty list of texts; pass at least one text")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{owner}: texts[{i}] is {type(text).__name__}, expected str")
    return texts


class _FixedLength:
    """Shared layout: start token, ids, end token, truncation and padding."""

    context_length: int
    sot_token_id: int
    eot_token_id: int
    pad_token_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def __call__(self, texts: Sequence[str]) -> TokenIds:
        """``len(texts)`` texts to ids ``(batch, context_length)``, truncated and padded."""
        texts = _check_texts(texts, type(self).__name__)
        out = torch.full((len(texts), self.context_length), self.pad_token_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length]
                ids[-1] = self.eot_token_id
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def padding_mask(self, ids: TokenIds) -> Tensor:
        """``True`` for the start token, the text and the end token; ``False`` on padding."""
        return padding_mask(ids, self.eot_token_id)


def padding_mask(ids: TokenIds, eot_token_id: int) -> Tensor:
    """Boolean ``(batch, context)``: ``True`` up to and including each row's first end token.

    A row without an end token (cut by a foreign tokenizer) is all ``True``.
    """
    is_end = ids == eot_token_id
    first_end = torch.where(is_end.any(dim=-1), is_end.int().argmax(dim=-1), ids.shape[-1] - 1)
    positions = torch.arange(ids.shape[-1], device=ids.device)
    return positions <= first_end[:, None]


def _strip_specials(ids: Sequence[int], tokenizer: _FixedLength) -> list[int]:
    """The ids between a leading start token and the first end token (padding follows it)."""
    out = [int(i) for i in ids]
    if out and out[0] == tokenizer.sot_token_id:
        out = out[1:]
    if tokenizer.eot_token_id in out:
        out = out[: out.index(tokenizer.eot_token_id)]
    return out


def _check_context(context_length: int) -> int:
    if context_length < 2:
        raise ValueError(
            f"context_length must be at least 2 (start and end tokens), got {context_length}"
        )
    return int(context_length)


class ByteTokenizer(_FixedLength):
    """One id per UTF-8 byte (``byte + 1``); padding 0, start 257, end 258; no files needed.

    ``decode(encode(text)) == text`` for every string; texts whose UTF-8 encoding is
    longer than ``context_length - 2`` bytes are truncated by ``__call__``.
    """

    vocab_size: int = 259
    pad_token_id: int = 0
    sot_token_id: int = 257
    eot_token_id: int = 258

    def __init__(self, context_length: int = 77) -> None:
        self.context_length = _check_context(context_length)

    def __repr__(self) -> str:
        return f"ByteTokenizer(context_length={self.context_length})"

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text``, each shifted by one."""
        return [b + 1 for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        """Ids back to text, without start, end and padding; bad UTF-8 is replaced."""
        data = bytes(i - 1 for i in _strip_specials(ids, self) if 1 <= i <= 256)
        return data.decode("utf-8", errors="replace")


@functools.cache
def _byte_to_char() -> dict[int, str]:
    """A printable character for each byte (CLIP / GPT-2's reversible byte alphabet).

    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...)
    are sent, in byte order, to the characters from U+0100 on.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    spare = 256
    for b in range(256):
        if b not in table:
            table[b] = chr(spare)
            spare += 1
    return table


def _split_words(text: str, specials: Sequence[str]) -> list[str]:
    """CLIP's pre-tokenisation: special tokens, English contractions, letter runs, single
    digits / numbers, and runs of other non-space symbols (Unicode categories L and N)."""
    contractions = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
    words: list[str] = []
    i, n = 0, len(text)

    def kind(ch: str) -> str:
        if ch.isspace():
            return "space"
        category = unicodedata.category(ch)[0]
        return "letter" if category == "L" else "number" if category == "N" else "symbol"

    while i < n:
        special = next((s for s in specials if text.startswith(s, i)), None)
        if special is not None:
            words.append(special)
            i += len(special)
            continue
        lowered = text[i : i + 3].lower()
        contraction = next((c for c in contractions if lowered.startswith(c)), None)
        if contraction is not None:
            words.append(text[i : i + len(contraction)])
            i += len(contraction)
            continue
        k = kind(text[i])
        if k == "space":
            i += 1
        elif k == "number":
            words.append(text[i])
            i += 1
        else:
            j = i + 1
            while j < n and kind(text[j]) == k:  # greedy, like the regex it mirrors
                j += 1
            words.append(text[i:j])
            i = j
    return words


def _fix_text(text: str) -> str:
    try:
        import ftfy
    except ImportError:
        return unicodedata.normalize("NFC", text)
    return ftfy.fix_text(text)


def _clean(text: str) -> str:
    text = html.unescape(html.unescape(_fix_text(text))).strip()
    return " ".join(text.split()).lower()


def find_open_clip_vocab() -> str:
    """The path of the CLIP merges file ``bpe_simple_vocab_16e6.txt.gz`` inside open_clip."""
    from importlib import resources

    try:
        path = resources.files("open_clip").joinpath("bpe_simple_vocab_16e6.txt.gz")
    except ModuleNotFoundError:
        raise ImportError(
            "open_clip is not installed; install open-clip-torch or pass the path of "
            "bpe_simple_vocab_16e6.txt.gz to CLIPTokenizer"
        ) from None
    if not path.is_file():
        raise FileNotFoundError(f"open_clip has no CLIP vocabulary at {path}")
    return str(path)


class CLIPTokenizer(_FixedLength):
    """CLIP's lower-cased byte-level BPE (49408 ids) from its merges file; open_clip's ids.

    Start ``<start_of_text>`` is 49406, end ``<end_of_text>`` is 49407. Padding is 0 as in
    open_clip; transformers' OpenAI tokenizers (Stable Diffusion 1.x) pad with the end
    token instead: ``pad_token_id=49407``. ``decode`` returns the cleaned text with a
    space after every word.
    """

    def __init__(
        self,
        vocab_path: str | os.PathLike[str],
        context_length: int = 77,
        pad_token_id: int = 0,
    ) -> None:
        self.context_length = _check_context(context_length)
        self.pad_token_id = int(pad_token_id)
        self.vocab_path = str(vocab_path)
        try:
            lines = read_gzip(vocab_path).decode("utf-8").split("\n")
        except UnicodeDecodeError:
            raise UnreadableFileError(f"{vocab_path} is not UTF-8 text (CLIP merges)") from None
        # Line 0 is a version header; CLIP keeps the first 49152 - 256 - 2 merges so that
        # 256 bytes + 256 word-final bytes + merges + 2 specials make 49408 ids.
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
        if len(merges) != 49152 - 256 - 2 or any(len(m) != 2 for m in merges):
            raise UnreadableFileError(f"{vocab_path} is not a CLIP merges file")
        alphabet = list(_byte_to_char().values())
        self.specials = ("<start_of_text>", "<end_of_text>")
        vocab = [*alphabet, *(c + "</w>" for c in alphabet), *("".join(m) for m in merges)]
        vocab.extend(self.specials)
        self._ids = {piece: i for i, piece in enumerate(vocab)}
        self._pieces = vocab
        self._ranks = {(a, b): rank for rank, (a, b) in enumerate(merges)}
        self._char_to_byte = {c: b for b, c in _byte_to_char().items()}
        self.vocab_size = len(vocab)
        self.sot_token_id = self._ids[self.specials[0]]
        self.eot_token_id = self._ids[self.specials[1]]
        self._cache: dict[str, list[int]] = {}

    def __repr__(self) -> str:
        return f"CLIPTokenizer({self.vocab_path!r}, context_length={self.context_length})"

    @property
    def pieces(self) -> list[str]:
        """The vocabulary: each id's byte-level BPE piece (``</w>`` ends a word), specials last."""
        return list(self._pieces)

    @classmethod
    def from_open_clip(cls, context_length: int = 77, pad_token_id: int = 0) -> "CLIPTokenizer":
        """The tokenizer over the merges file that the installed open_clip ships."""
        return cls(find_open_clip_vocab(), context_length, pad_token_id)

    def _bpe(self, word: str) -> list[int]:
        """Merge the byte characters of one word by rank until no known pair is left."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        if word in self.specials:
            ids = [self._ids[word]]
        else:
            parts = [*word[:-1], word[-1] + "</w>"]
            while len(parts) > 1:
                pairs = set(itertools.pairwise(parts))
                best = min(pairs, key=lambda p: self._ranks.get(p, len(self._ranks)))
                if best not in self._ranks:
                    break
                merged: list[str] = []
                i = 0
                while i < len(parts):
                    if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                        merged.append(parts[i] + parts[i + 1])
                        i += 2
                    else:
                        merged.append(parts[i])
                        i += 1
                parts = merged
            ids = [self._ids[p] for p in parts]
        self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """The BPE ids of the cleaned ``text``, without start / end tokens."""
        table = _byte_to_char()
        ids: list[int] = []
        for word in _split_words(_clean(text), self.specials):
            if word not in self.specials:
                word = "".join(table[b] for b in word.encode("utf-8"))
            ids.extend(self._bpe(word))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids back to (cleaned) text, without the start token and from the end token on."""
        pieces = "".join(self._pieces[i] for i in _strip_specials(ids, self))
        data = bytearray()
        for chunk in pieces.split("</w>"):
            data.extend(self._char_to_byte[c] for c in chunk)
            data.extend(b" ")
        return data[:-1].decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A ``tokenizer.json`` (T5's SentencePiece Unigram) run by the ``tokenizers`` library.

    T5's layout: ``[*ids, eot, pad, pad, ...]`` with no start token, exactly
    ``context_length`` ids, a text too long cut to ``context_length - 1`` ids and the end
    token (what transformers' ``T5TokenizerFast`` gives with ``padding="max_length",
    truncation=True``). T5 pads with 0 and ends with 1. ``sot_token_id`` is ``None``.
    """

    sot_token_id: None = None

    def __init__(
        self,
        path: str | os.PathLike[str],
        context_length: int = 77,
        pad_token_id: int = 0,
        eot_token_id: int = 1,
    ) -> None:
        from tokenizers import Tokenizer as _RustTokenizer

        if context_length < 1:
            raise ValueError(
                f"context_length must be at least 1 (the end token), got {context_length}"
            )
        self.path = str(path)
        try:
            text = read_bytes(path).decode("utf-8")
        except UnicodeDecodeError:
            raise UnreadableFileError(f"{path} is not UTF-8 text (a tokenizer.json)") from None
        try:
            self._tokenizer = _RustTokenizer.from_str(text)
        except Exception as error:  # the library raises a bare Exception on bad JSON
            raise UnreadableFileError(f"{path} is not a tokenizer.json file: {error}") from None
        # the file may carry padding / truncation settings; the layout here is __call__'s
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self.context_length = int(context_length)
        self.vocab_size: int = self._tokenizer.get_vocab_size(with_added_tokens=True)
        for name, value in (("pad_token_id", pad_token_id), ("eot_token_id", eot_token_id)):
            if not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"SentencePieceTokenizer: {name} {value} is not an id of {path} "
                    f"({self.vocab_size} ids)"
                )
        self.pad_token_id = int(pad_token_id)
        self.eot_token_id = int(eot_token_id)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.path!r}, context_length={self.context_length})"

    def encode(self, text: str) -> list[int]:
        """The ids of one text, without the end token and without truncation."""
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Ids back to text, up to the first end token."""
        out = [int(i) for i in ids]
        if self.eot_token_id in out:
            out = out[: out.index(self.eot_token_id)]
        return self._tokenizer.decode(out)

    def __call__(self, texts: Sequence[str]) -> TokenIds:
        """``len(texts)`` texts to ids ``(batch, context_length)``, truncated and padded."""
        texts = _check_texts(texts, type(self).__name__)
        out = torch.full((len(texts), self.context_length), self.pad_token_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [*self.encode(text)[: self.context_length - 1], self.eot_token_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def padding_mask(self, ids: TokenIds) -> Tensor:
        """``True`` for the text and the end token; ``False`` on padding."""
        return padding_mask(ids, self.eot_token_id)
