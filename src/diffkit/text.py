"""Text conditioners: texts -> [`Conditioning`][diffkit.protocols.Conditioning].

Every class here satisfies [`TextConditioner`][diffkit.protocols.TextConditioner]:
``condition(texts)`` tokenizes ``len(texts)`` strings to ``(batch, context_length)`` ids
and returns

- ``tokens``: the text tower's last hidden states (after its final LayerNorm),
  ``(batch, context_length, token_dim)``, for cross-attention;
- ``pooled``: the hidden state at the end-of-text token, ``(batch, pooled_dim)``. By
  default it is *not* projected (transformers' ``pooler_output``; what Stable Diffusion
  1.x / 2.x would use). With ``project_pooled=True`` it goes through the tower's text
  projection (CLIP's text embedding, unnormalised; SDXL's ``text_embeds``);
- ``mask``: ``True`` for the start token, the text and the end token, ``False`` on the
  padding after it. The hidden states at padded positions are still meaningful inputs
  (Stable Diffusion attends to all of them); a model may use the mask or ignore it.

[`CLIPTextConditioner`][diffkit.text.CLIPTextConditioner] runs diffkit's own
[`TextTower`][diffkit.nn.clip.TextTower] (trained here, or loaded with
``diffkit.interop.from_open_clip`` / ``from_transformers``).
[`TransformersTextConditioner`][diffkit.text.TransformersTextConditioner] and
[`OpenCLIPTextConditioner`][diffkit.text.OpenCLIPTextConditioner] run the external
models as they are.
"""

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from diffkit.config import Config, Registry
from diffkit.nn.clip import TextTower, TextTowerConfig
from diffkit.protocols import Conditioning, TextConditioner
from diffkit.tokenizers import (
    ByteTokenizer,
    CLIPTokenizer,
    Tokenizer,
    find_open_clip_vocab,
    padding_mask,
)

__all__ = [
    "TEXT_CONDITIONERS",
    "CLIPTextConditioner",
    "CLIPTextConditionerConfig",
    "OpenCLIPTextConditioner",
    "TransformersTextConditioner",
]


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _tokenize(tokenizer: Tokenizer, texts: Sequence[str], owner: str) -> Tensor:
    if isinstance(texts, str):
        raise TypeError(f"{owner}: expected a list of texts, got a single string; wrap it: [text]")
    if len(texts) == 0:
        raise ValueError(f"{owner}: got an empty list of texts; pass at least one text")
    return tokenizer(texts)


class CLIPTextConditioner(nn.Module):
    """diffkit's CLIP [`TextTower`][diffkit.nn.clip.TextTower] with its tokenizer."""

    def __init__(
        self, tower: TextTower, tokenizer: Tokenizer, *, project_pooled: bool = False
    ) -> None:
        super().__init__()
        if tokenizer.context_length > tower.context_length:
            raise ValueError(
                f"CLIPTextConditioner: the tokenizer's context_length {tokenizer.context_length} "
                f"exceeds the tower's {tower.context_length}"
            )
        if tokenizer.vocab_size > tower.config.vocab_size:
            raise ValueError(
                f"CLIPTextConditioner: the tokenizer has {tokenizer.vocab_size} ids but the "
                f"tower embeds only {tower.config.vocab_size}"
            )
        if project_pooled and tower.projection is None:
            raise ValueError("CLIPTextConditioner: project_pooled=True needs a tower projection")
        self.tower = tower
        self.tokenizer = tokenizer
        self.project_pooled = project_pooled
        self.token_dim: int = tower.width
        self.pooled_dim: int = tower.output_dim if project_pooled else tower.width
        self.context_length: int = tokenizer.context_length

    @classmethod
    def from_config(cls, config: "CLIPTextConditionerConfig") -> "CLIPTextConditioner":
        """A randomly initialised tower and the configured tokenizer."""
        context = config.text.context_length
        tokenizer: Tokenizer
        if config.tokenizer == "byte":
            tokenizer = ByteTokenizer(context)
        else:
            tokenizer = CLIPTokenizer(config.vocab_path or find_open_clip_vocab(), context)
        tower = TextTower(config.text, proj_dim=config.projection_dim)
        return cls(tower, tokenizer, project_pooled=config.project_pooled)

    def forward(self, texts: Sequence[str]) -> Conditioning:
        """Same as [`condition`][diffkit.text.CLIPTextConditioner.condition]."""
        return self.condition(texts)

    def condition(self, texts: Sequence[str]) -> Conditioning:
        """``len(texts)`` strings to tokens ``(b, context, token_dim)``, pooled and mask."""
        ids = _tokenize(self.tokenizer, texts, type(self).__name__).to(_device(self))
        tokens, pooled = self.tower(ids)
        if self.project_pooled and self.tower.projection is not None:
            pooled = self.tower.projection(pooled)
        return Conditioning(
            tokens=tokens, pooled=pooled, mask=padding_mask(ids, self.tokenizer.eot_token_id)
        )


class TransformersTextConditioner(nn.Module):
    """A transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection``, run as it is.

    ``tokens`` is ``last_hidden_state``; ``pooled`` is ``pooler_output``, or ``text_embeds``
    of a ``CLIPTextModelWithProjection`` when ``project_pooled=True``. Use
    ``CLIPTokenizer(path, pad_token_id=49407)`` for OpenAI checkpoints (Stable Diffusion 1.x
    pads with the end token).
    """

    def __init__(
        self, model: nn.Module, tokenizer: Tokenizer, *, project_pooled: bool = False
    ) -> None:
        super().__init__()
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        if not isinstance(model, CLIPTextModel | CLIPTextModelWithProjection):
            raise TypeError(
                "TransformersTextConditioner: expected a CLIPTextModel or "
                f"CLIPTextModelWithProjection, got {type(model).__name__}"
            )
        if project_pooled and not isinstance(model, CLIPTextModelWithProjection):
            raise ValueError(
                "TransformersTextConditioner: project_pooled=True needs a "
                "CLIPTextModelWithProjection"
            )
        cfg: Any = model.config
        self.model = model
        self.tokenizer = tokenizer
        self.project_pooled = project_pooled
        self._with_projection = isinstance(model, CLIPTextModelWithProjection)
        self._eos_token_id = int(cfg.eos_token_id)
        self.token_dim: int = cfg.hidden_size
        self.pooled_dim: int = cfg.projection_dim if project_pooled else cfg.hidden_size
        self.context_length: int = tokenizer.context_length

    def forward(self, texts: Sequence[str]) -> Conditioning:
        """Same as [`condition`][diffkit.text.TransformersTextConditioner.condition]."""
        return self.condition(texts)

    def condition(self, texts: Sequence[str]) -> Conditioning:
        """``len(texts)`` strings to tokens ``(b, context, token_dim)``, pooled and mask."""
        ids = _tokenize(self.tokenizer, texts, type(self).__name__).to(_device(self))
        out: Any = self.model(input_ids=ids)
        tokens: Tensor = out.last_hidden_state
        if self.project_pooled:
            pooled: Tensor = out.text_embeds
        elif self._with_projection:  # CLIPTextModelWithProjection returns no pooler_output
            end = _end_positions(ids, self._eos_token_id)
            pooled = tokens[torch.arange(tokens.shape[0], device=tokens.device), end]
        else:
            pooled = out.pooler_output
        return Conditioning(
            tokens=tokens, pooled=pooled, mask=padding_mask(ids, self.tokenizer.eot_token_id)
        )


def _end_positions(ids: Tensor, eos_token_id: int) -> Tensor:
    """transformers' pooling rule: the largest id for old configs (eos id 2), else first eos."""
    if eos_token_id == 2:
        return ids.argmax(dim=-1)
    return (ids == eos_token_id).int().argmax(dim=-1)


class OpenCLIPTextConditioner(nn.Module):
    """The text tower of an open_clip ``CLIP``, run with open_clip's own modules.

    ``pooled`` is unprojected by default; ``project_pooled=True`` gives what
    ``model.encode_text(ids)`` returns (unnormalised).
    """

    def __init__(
        self, model: nn.Module, tokenizer: Tokenizer, *, project_pooled: bool = False
    ) -> None:
        super().__init__()
        import open_clip

        if not isinstance(model, open_clip.CLIP):
            raise TypeError(
                f"OpenCLIPTextConditioner: expected an open_clip.CLIP, got {type(model).__name__}"
            )
        m: Any = model
        self.model = model
        self.tokenizer = tokenizer
        self.project_pooled = project_pooled
        width = int(m.token_embedding.embedding_dim)
        self.token_dim: int = width
        self.pooled_dim: int = int(m.text_projection.shape[-1]) if project_pooled else width
        self.context_length: int = tokenizer.context_length

    def forward(self, texts: Sequence[str]) -> Conditioning:
        """Same as [`condition`][diffkit.text.OpenCLIPTextConditioner.condition]."""
        return self.condition(texts)

    def condition(self, texts: Sequence[str]) -> Conditioning:
        """``len(texts)`` strings to tokens ``(b, context, token_dim)``, pooled and mask."""
        from open_clip.transformer import text_global_pool

        m: Any = self.model
        ids = _tokenize(self.tokenizer, texts, type(self).__name__).to(_device(self))
        n = ids.shape[1]
        x = m.token_embedding(ids) + m.positional_embedding[:n]
        mask = m.attn_mask[:n, :n] if m.attn_mask is not None else None
        x = m.ln_final(m.transformer(x, attn_mask=mask))
        pooled = text_global_pool(x, ids, m.text_pool_type, eos_token_id=m.text_eos_id)
        if self.project_pooled:
            proj = m.text_projection
            pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        return Conditioning(
            tokens=x, pooled=pooled, mask=padding_mask(ids, self.tokenizer.eot_token_id)
        )


class CLIPTextConditionerConfig(Config):
    """A randomly initialised CLIP text tower with a byte or CLIP-BPE tokenizer."""

    kind: Literal["clip_text"] = "clip_text"
    text: TextTowerConfig = Field(description="the text transformer")
    tokenizer: Literal["byte", "clip_bpe"] = Field(
        default="clip_bpe", description="byte: no files; clip_bpe: CLIP's 49408-id BPE"
    )
    vocab_path: str | None = Field(
        default=None, description="CLIP merges file for clip_bpe; None: open_clip's copy"
    )
    projection_dim: int | None = Field(
        default=None, gt=0, description="size of the text projection; None: no projection"
    )
    project_pooled: bool = Field(
        default=False, description="return the projected pooled embedding (needs projection_dim)"
    )

    @model_validator(mode="after")
    def _check(self) -> "CLIPTextConditionerConfig":
        needed = ByteTokenizer.vocab_size if self.tokenizer == "byte" else 49408
        if self.text.vocab_size < needed:
            raise ValueError(
                f"text.vocab_size {self.text.vocab_size} is too small for the {self.tokenizer} "
                f"tokenizer ({needed} ids)"
            )
        if self.project_pooled and self.projection_dim is None:
            raise ValueError("project_pooled=True needs projection_dim")
        return self


TEXT_CONDITIONERS: Registry[TextConditioner] = Registry("text_conditioner")
"""Text conditioners by config ``kind``."""
TEXT_CONDITIONERS.register(CLIPTextConditionerConfig, CLIPTextConditioner.from_config)
