"""Text conditioners: texts -> [`Conditioning`][diffkit.protocols.Conditioning].

Every class here satisfies [`TextConditioner`][diffkit.protocols.TextConditioner]:
``condition(texts)`` tokenizes ``len(texts)`` strings to ``(batch, context_length)`` ids
and returns

- ``tokens``: the text tower's last hidden states (after its final LayerNorm),
  ``(batch, context_length, token_dim)``, for cross-attention. ``skip_last_layers=1``
  takes them one block earlier ("CLIP skip"; Stable Diffusion 2.x with
  ``final_norm=True``, SDXL with ``final_norm=False``);
- ``pooled``: the hidden state at the end-of-text token, ``(batch, pooled_dim)``. By
  default it is *not* projected (transformers' ``pooler_output``; what Stable Diffusion
  1.x / 2.x would use). With ``project_pooled=True`` it goes through the tower's text
  projection (CLIP's text embedding, unnormalised; SDXL's ``text_embeds``);
- ``mask``: ``True`` for the start token, the text and the end token, ``False`` on the
  padding after it. The hidden states at padded positions are still meaningful inputs:
  Stable Diffusion attends to all of them, so its conditioners take ``mask_padding=False``
  (no mask) and pad with the end token (``pad_token_id=49407``).

[`CLIPTextConditioner`][diffkit.text.CLIPTextConditioner] runs diffkit's own
[`TextTower`][diffkit.nn.clip.TextTower] (trained here, or loaded with
``diffkit.interop.from_open_clip`` / ``from_transformers``).
[`T5TextConditioner`][diffkit.text.T5TextConditioner] runs diffkit's
[`T5Encoder`][diffkit.nn.t5.T5Encoder] (PixArt, SD3; ``tokens`` only, no ``pooled``).
[`ComposedTextConditioner`][diffkit.text.ComposedTextConditioner] runs several of them
on the same texts and joins their outputs (SDXL: two CLIP towers; SD3: two CLIP towers
and T5).
[`TransformersTextConditioner`][diffkit.text.TransformersTextConditioner] and
[`OpenCLIPTextConditioner`][diffkit.text.OpenCLIPTextConditioner] run the external
models as they are.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Generic, Literal, NamedTuple, TypeVar, cast

import torch
import torch.nn.functional as F
from pydantic import Field, SerializeAsAny, field_validator, model_validator
from torch import Tensor, nn

from diffkit.config import Config, Registry, kind_of
from diffkit.nn.clip import TextTower, TextTowerConfig
from diffkit.nn.t5 import T5Encoder, T5EncoderConfig
from diffkit.protocols import Conditioning, TextConditioner
from diffkit.tokenizers import (
    ByteTokenizer,
    CLIPTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    find_open_clip_vocab,
    padding_mask,
)

__all__ = [
    "TEXT_CONDITIONERS",
    "CLIPTextConditioner",
    "CLIPTextConditionerConfig",
    "ComposedTextConditioner",
    "ComposedTextConditionerConfig",
    "OpenCLIPTextConditioner",
    "T5TextConditioner",
    "T5TextConditionerConfig",
    "TransformersTextConditioner",
]


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _check_skip(skip_last_layers: int, layers: int, owner: str) -> None:
    if not 0 <= skip_last_layers <= layers:
        raise ValueError(
            f"{owner}: skip_last_layers must be in [0, {layers}] (the tower has {layers} "
            f"layers), got {skip_last_layers}"
        )


def _tokenize(
    tokenizer: Callable[[Sequence[str]], Tensor], texts: Sequence[str], owner: str
) -> Tensor:
    if isinstance(texts, str):
        raise TypeError(f"{owner}: expected a list of texts, got a single string; wrap it: [text]")
    if len(texts) == 0:
        raise ValueError(f"{owner}: got an empty list of texts; pass at least one text")
    return tokenizer(texts)


def _check_end_token(tower: TextTower, tokenizer: Tokenizer) -> None:
    """The tower must pool where the tokenizer puts its end token, or pooled is a pad's state."""
    eos, eot = tower.config.eos_token_id, tokenizer.eot_token_id
    if eos is not None and eos != eot:
        raise ValueError(
            f"CLIPTextConditioner: the tower pools at eos_token_id {eos} but the tokenizer ends "
            f"texts with eot_token_id {eot}; set the tower's eos_token_id to {eot}"
        )
    if eos is None and eot != tokenizer.vocab_size - 1:
        raise ValueError(
            f"CLIPTextConditioner: the tower pools at the largest id of each row (CLIP's rule, "
            f"eos_token_id None) but the tokenizer's end token {eot} is not its largest id "
            f"({tokenizer.vocab_size - 1}); set the tower's eos_token_id to {eot}"
        )


_Model = TypeVar("_Model", bound=nn.Module)

_OPTIONS = ("project_pooled", "skip_last_layers", "final_norm", "mask_padding")
"""The layer options of a conditioner, its keyword arguments and its config's fields."""


class _Dims(NamedTuple):
    """A text model's number of blocks and the widths of its tokens and pooled output."""

    layers: int
    token_dim: int
    pooled_dim: int


class _Conditioner(nn.Module, ABC, Generic[_Model]):
    """What the conditioners here share: the tokenizer, the layer options and ``condition``.

    ``condition`` tokenizes, runs the model (``_encode``, per subclass), marks the padding.
    A subclass checks its text ``model`` (``_dims``, ``_adopt``).
    """

    def __init__(
        self,
        model: _Model,
        tokenizer: Tokenizer,
        *,
        project_pooled: bool = False,
        skip_last_layers: int = 0,
        final_norm: bool = True,
        mask_padding: bool = True,
    ) -> None:
        super().__init__()
        dims = self._dims(model, project_pooled)
        _check_skip(skip_last_layers, dims.layers, type(self).__name__)
        self.tokenizer = tokenizer
        self.project_pooled = project_pooled
        self.skip_last_layers = skip_last_layers
        self.final_norm = final_norm
        self.mask_padding = mask_padding
        self.token_dim: int = dims.token_dim
        self.pooled_dim: int = dims.pooled_dim
        self.context_length: int = tokenizer.context_length
        self._adopt(model)

    @staticmethod
    @abstractmethod
    def _dims(model: _Model, project_pooled: bool) -> _Dims:
        """Refuse a model of the wrong kind; else its dimensions."""

    @abstractmethod
    def _adopt(self, model: _Model) -> None:
        """Check ``model`` against the tokenizer and options, and keep it."""

    def forward(self, texts: Sequence[str]) -> Conditioning:
        """Same as ``condition``."""
        return self.condition(texts)

    def condition(self, texts: Sequence[str]) -> Conditioning:
        """``len(texts)`` strings to tokens ``(b, context, token_dim)``, pooled and mask.

        The mask is ``None`` with ``mask_padding=False``: the model attends to every position.
        """
        ids = _tokenize(self.tokenizer, texts, type(self).__name__).to(_device(self))
        tokens, pooled = self._encode(ids)
        mask = padding_mask(ids, self.tokenizer.eot_token_id) if self.mask_padding else None
        return Conditioning(tokens=tokens, pooled=pooled, mask=mask)

    @abstractmethod
    def _encode(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Token ids ``(b, context)`` to ``(tokens, pooled)`` as the options ask."""


class CLIPTextConditioner(_Conditioner[TextTower]):
    """diffkit's CLIP [`TextTower`][diffkit.nn.clip.TextTower] (``model``, kept as ``tower``)
    with its tokenizer."""

    tower: TextTower

    @staticmethod
    def _dims(model: TextTower, project_pooled: bool) -> _Dims:
        pooled_dim = model.output_dim if project_pooled else model.width
        return _Dims(model.config.layers, model.width, pooled_dim)

    def _adopt(self, model: TextTower) -> None:
        tower, tokenizer = model, self.tokenizer
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
        _check_end_token(tower, tokenizer)
        if self.project_pooled and tower.projection is None:
            raise ValueError("CLIPTextConditioner: project_pooled=True needs a tower projection")
        self.tower = tower

    @classmethod
    def from_config(cls, config: "CLIPTextConditionerConfig") -> "CLIPTextConditioner":
        """A randomly initialised tower and the configured tokenizer."""
        context = config.text.context_length
        tokenizer: Tokenizer
        if config.tokenizer == "byte":
            tokenizer = ByteTokenizer(context)
        else:
            tokenizer = CLIPTokenizer(
                config.vocab_path or find_open_clip_vocab(), context, config.pad_token_id
            )
        tower = TextTower(config.text, proj_dim=config.projection_dim)
        return cls(tower, tokenizer, **{name: getattr(config, name) for name in _OPTIONS})

    @property
    def config(self) -> "CLIPTextConditionerConfig":
        """The config that builds this conditioner: its tower's config, tokenizer and options.

        Read from the parts themselves (a conditioner put together by hand, or converted
        by ``interop``, has one too); a ``ValueError`` for a tokenizer no config describes.
        """
        tokenizer, tower = self.tokenizer, self.tower
        if tokenizer.context_length != tower.context_length:
            raise ValueError(
                f"CLIPTextConditioner: its tokenizer's context_length "
                f"{tokenizer.context_length} is not its tower's {tower.context_length}, "
                "which a CLIPTextConditionerConfig cannot describe"
            )
        if type(tokenizer) is ByteTokenizer:
            kind, vocab_path = "byte", None
        elif type(tokenizer) is CLIPTokenizer:
            kind, vocab_path = "clip_bpe", tokenizer.vocab_path
        else:
            raise ValueError(
                f"CLIPTextConditioner: its tokenizer {tokenizer!r} is neither a ByteTokenizer "
                "nor a CLIPTokenizer, which a CLIPTextConditionerConfig cannot describe"
            )
        projection = tower.projection
        return CLIPTextConditionerConfig(
            text=tower.config,
            tokenizer=kind,
            vocab_path=vocab_path,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=projection.out_features if projection is not None else None,
            **{name: getattr(self, name) for name in _OPTIONS},
        )

    def _encode(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        tokens, pooled = self.tower(ids, self.skip_last_layers, self.final_norm)
        if self.project_pooled and self.tower.projection is not None:
            pooled = self.tower.projection(pooled)
        return tokens, pooled


class _WrappedModel(_Conditioner[nn.Module]):
    """A text model from another library, run as it is (``self.model``)."""

    model: nn.Module

    def _adopt(self, model: nn.Module) -> None:
        self.model = model


class TransformersTextConditioner(_WrappedModel):
    """A transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection``, run as it is.

    ``tokens`` is ``last_hidden_state``; ``pooled`` is ``pooler_output``, or ``text_embeds``
    of a ``CLIPTextModelWithProjection`` when ``project_pooled=True``. Use
    ``CLIPTokenizer(path, pad_token_id=49407)`` for OpenAI checkpoints (Stable Diffusion 1.x
    pads with the end token).
    """

    @staticmethod
    def _dims(model: nn.Module, project_pooled: bool) -> _Dims:
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
        pooled_dim = cfg.projection_dim if project_pooled else cfg.hidden_size
        return _Dims(cfg.num_hidden_layers, cfg.hidden_size, pooled_dim)

    def _encode(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        from transformers import CLIPTextModelWithProjection

        default_layer = self.skip_last_layers == 0 and self.final_norm
        out: Any = self.model(input_ids=ids, output_hidden_states=not default_layer)
        last: Tensor = out.last_hidden_state
        if self.project_pooled:
            pooled: Tensor = out.text_embeds
        elif isinstance(self.model, CLIPTextModelWithProjection):  # it has no pooler_output
            end = _end_positions(ids, int(cast(Any, self.model).config.eos_token_id))
            pooled = last[torch.arange(last.shape[0], device=last.device), end]
        else:
            pooled = out.pooler_output
        if default_layer:
            return last, pooled
        # hidden_states: the embeddings, then every layer's output (before the final LN)
        tokens = out.hidden_states[-1 - self.skip_last_layers]
        return (_final_layer_norm(self.model)(tokens) if self.final_norm else tokens), pooled


def _final_layer_norm(model: Any) -> nn.Module:
    """A transformers CLIP text model's final LayerNorm."""
    from transformers import CLIPTextModelWithProjection

    # transformers 4.x nests the layers in `text_model`; 5.x puts them on CLIPTextModel
    core: Any = model.text_model if isinstance(model, CLIPTextModelWithProjection) else model
    if hasattr(core, "final_layer_norm"):
        return core.final_layer_norm
    return core.text_model.final_layer_norm


def _end_positions(ids: Tensor, eos_token_id: int) -> Tensor:
    """transformers' pooling rule: the largest id for old configs (eos id 2), else first eos."""
    if eos_token_id == 2:
        return ids.argmax(dim=-1)
    return (ids == eos_token_id).int().argmax(dim=-1)


class OpenCLIPTextConditioner(_WrappedModel):
    """The text tower of an open_clip ``CLIP``, run with open_clip's own modules.

    ``pooled`` is unprojected by default; ``project_pooled=True`` gives what
    ``model.encode_text(ids)`` returns (unnormalised).
    """

    @staticmethod
    def _dims(model: nn.Module, project_pooled: bool) -> _Dims:
        import open_clip

        if not isinstance(model, open_clip.CLIP):
            raise TypeError(
                f"OpenCLIPTextConditioner: expected an open_clip.CLIP, got {type(model).__name__}"
            )
        m: Any = model
        width = int(m.token_embedding.embedding_dim)
        pooled_dim = int(m.text_projection.shape[-1]) if project_pooled else width
        return _Dims(len(m.transformer.resblocks), width, pooled_dim)

    def _encode(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        from open_clip.transformer import text_global_pool

        m: Any = self.model
        n = ids.shape[1]
        x = m.token_embedding(ids) + m.positional_embedding[:n]
        mask = m.attn_mask[:n, :n] if m.attn_mask is not None else None
        blocks = m.transformer.resblocks
        hidden = x
        for i, block in enumerate(blocks):
            x = block(x, attn_mask=mask)
            if i == len(blocks) - 1 - self.skip_last_layers:
                hidden = x
        x = m.ln_final(x)
        tokens = m.ln_final(hidden) if self.final_norm else hidden
        pooled = text_global_pool(x, ids, m.text_pool_type, eos_token_id=m.text_eos_id)
        if self.project_pooled:
            proj = m.text_projection
            pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        return tokens, pooled


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
    pad_token_id: int = Field(
        default=0,
        ge=0,
        description="padding id of the clip_bpe tokenizer: 0 (open_clip) or 49407 (OpenAI's, "
        "Stable Diffusion 1.x); the byte tokenizer pads with 0",
    )
    projection_dim: int | None = Field(
        default=None, gt=0, description="size of the text projection; None: no projection"
    )
    project_pooled: bool = Field(
        default=False, description="return the projected pooled embedding (needs projection_dim)"
    )
    skip_last_layers: int = Field(
        default=0, ge=0, description="take the tokens this many blocks before the end (CLIP skip)"
    )
    final_norm: bool = Field(
        default=True, description="pass the tokens through the tower's final LayerNorm"
    )
    mask_padding: bool = Field(
        default=True, description="give the padding mask (False: attend to all, as SD does)"
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
        if self.pad_token_id >= needed or (self.tokenizer == "byte" and self.pad_token_id):
            raise ValueError(
                f"pad_token_id {self.pad_token_id} is not a padding id of the {self.tokenizer} "
                f"tokenizer (byte: 0; clip_bpe: below {needed})"
            )
        if self.skip_last_layers > self.text.layers:
            raise ValueError(
                f"skip_last_layers {self.skip_last_layers} exceeds text.layers {self.text.layers}"
            )
        return self

    @property
    def token_dim(self) -> int:
        """Width of the tokens: the tower's ``text.width``."""
        return self.text.width

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled embedding: ``projection_dim`` when projected, else the tower's."""
        if self.project_pooled and self.projection_dim is not None:
            return self.projection_dim
        return self.text.width


class T5TextConditionerConfig(Config):
    """A T5 encoder with its SentencePiece tokenizer (PixArt: 120 or 300 tokens, masked;
    Stable Diffusion 3: 256 tokens, unmasked)."""

    kind: Literal["t5_text"] = "t5_text"
    text: T5EncoderConfig = Field(description="the T5 encoder")
    tokenizer_path: str = Field(description="the tokenizer.json of the SentencePiece tokenizer")
    context_length: int = Field(
        default=77, ge=1, le=4096, description="ids per text (max_length): truncated or padded"
    )
    pad_token_id: int = Field(default=0, ge=0, description="padding id (T5: 0)")
    eot_token_id: int = Field(default=1, ge=0, description="end-of-text id (T5: 1)")
    mask_padding: bool = Field(
        default=True,
        description="hide the padding from the encoder's attention and give the mask "
        "(PixArt); False: attend to all, no mask (Stable Diffusion 3)",
    )

    @model_validator(mode="after")
    def _check(self) -> "T5TextConditionerConfig":
        for name in ("pad_token_id", "eot_token_id"):
            if getattr(self, name) >= self.text.vocab_size:
                raise ValueError(
                    f"{name} {getattr(self, name)} is not below text.vocab_size "
                    f"{self.text.vocab_size}"
                )
        return self

    @property
    def token_dim(self) -> int:
        """Width of the tokens: the encoder's ``text.width``."""
        return self.text.width

    @property
    def pooled_dim(self) -> int:
        """T5 has no pooled output: 0 (``Conditioning.pooled`` is ``None``)."""
        return 0


class T5TextConditioner(nn.Module):
    """diffkit's [`T5Encoder`][diffkit.nn.t5.T5Encoder] (``encoder``) with its tokenizer.

    ``tokens`` is the last hidden state ``(batch, context_length, width)``; there is no
    ``pooled``. With ``mask_padding`` the encoder does not attend to the padding and the
    mask is returned (``True`` up to and including the end token).
    """

    def __init__(
        self, encoder: T5Encoder, tokenizer: SentencePieceTokenizer, *, mask_padding: bool = True
    ) -> None:
        super().__init__()
        if tokenizer.vocab_size > encoder.config.vocab_size:
            raise ValueError(
                f"T5TextConditioner: the tokenizer has {tokenizer.vocab_size} ids but the "
                f"encoder embeds only {encoder.config.vocab_size}"
            )
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.mask_padding = mask_padding
        self.token_dim: int = encoder.width
        self.pooled_dim: int = 0
        self.context_length: int = tokenizer.context_length

    @classmethod
    def from_config(cls, config: T5TextConditionerConfig) -> "T5TextConditioner":
        """A randomly initialised encoder and the configured tokenizer."""
        tokenizer = SentencePieceTokenizer(
            config.tokenizer_path, config.context_length, config.pad_token_id, config.eot_token_id
        )
        return cls(T5Encoder(config.text), tokenizer, mask_padding=config.mask_padding)

    @property
    def config(self) -> T5TextConditionerConfig:
        """The config that builds this conditioner, read from its parts."""
        tok = self.tokenizer
        return T5TextConditionerConfig(
            text=self.encoder.config,
            tokenizer_path=tok.path,
            context_length=tok.context_length,
            pad_token_id=tok.pad_token_id,
            eot_token_id=tok.eot_token_id,
            mask_padding=self.mask_padding,
        )

    def forward(self, texts: Sequence[str]) -> Conditioning:
        """Same as ``condition``."""
        return self.condition(texts)

    def condition(self, texts: Sequence[str]) -> Conditioning:
        """``len(texts)`` strings to tokens ``(b, context, width)`` and (``mask_padding``) mask."""
        ids = _tokenize(self.tokenizer, texts, type(self).__name__).to(_device(self))
        mask = padding_mask(ids, self.tokenizer.eot_token_id) if self.mask_padding else None
        return Conditioning(tokens=self.encoder(ids, mask), mask=mask)


if TYPE_CHECKING:
    _PartConfig = Config
else:
    _PartConfig = Annotated[Config, SerializeAsAny()]

_Part = CLIPTextConditionerConfig | T5TextConditionerConfig
_Conditioners = CLIPTextConditioner | T5TextConditioner


def _context_length(part: _Part) -> int:
    return (
        part.text.context_length
        if isinstance(part, CLIPTextConditionerConfig)
        else (part.context_length)
    )


class ComposedTextConditionerConfig(Config):
    """Several text conditioners run on the same texts, their outputs joined (SDXL, SD3).

    The tokens of the parts in each of ``groups`` are concatenated on the feature axis
    (their context lengths must agree); each group is zero-padded on the features to the
    widest group, and the groups are concatenated on the sequence axis. The pooled
    vectors of the parts listed in ``pooled`` are concatenated. SDXL: CLIP-L and OpenCLIP-
    bigG, ``groups=((0, 1),)``, ``pooled=(1,)``; SD3: CLIP-L, CLIP-G and T5,
    ``groups=((0, 1), (2,))``, ``pooled=(0, 1)`` (``sdxl`` / ``sd3`` build these).
    """

    kind: Literal["composed_text"] = "composed_text"
    parts: tuple[_PartConfig, ...] = Field(
        min_length=1, max_length=8, description="the conditioners (clip_text or t5_text configs)"
    )
    groups: tuple[tuple[int, ...], ...] = Field(
        description="indices of parts whose tokens are concatenated on the features; the "
        "groups follow one another on the sequence axis; every part in exactly one group"
    )
    pooled: tuple[int, ...] = Field(
        default=(), description="indices of parts whose pooled vectors are concatenated"
    )

    @field_validator("parts", mode="before")
    @classmethod
    def _parse_parts(cls, value: Any) -> Any:
        if not isinstance(value, list | tuple):
            return value
        return tuple(TEXT_CONDITIONERS.parse(part) for part in value)

    @model_validator(mode="after")
    def _check(self) -> "ComposedTextConditionerConfig":
        parts = self.parts
        for i, part in enumerate(parts):
            if not isinstance(part, _Part):
                raise ValueError(
                    f"parts[{i}] is a {kind_of(part)!r} config; a composed conditioner takes "
                    "clip_text and t5_text parts"
                )
            if part.mask_padding:
                raise ValueError(
                    f"parts[{i}].mask_padding is true; a composed conditioner joins unmasked "
                    "tokens (SDXL and SD3 attend to every position): set it false"
                )
        flat = [i for group in self.groups for i in group]
        if sorted(flat) != list(range(len(parts))) or not all(self.groups):
            raise ValueError(
                f"groups {self.groups} must hold every part index 0..{len(parts) - 1} exactly once"
            )
        for group in self.groups:
            lengths = {_context_length(cast(_Part, parts[i])) for i in group}
            if len(lengths) > 1:
                raise ValueError(
                    f"groups: the parts {group} have context lengths {sorted(lengths)}; tokens "
                    "concatenated on the features need one"
                )
        for i in self.pooled:
            if not 0 <= i < len(parts) or cast(_Part, parts[i]).pooled_dim == 0:
                raise ValueError(f"pooled: part {i} is not a part with a pooled vector")
        return self

    @property
    def token_dim(self) -> int:
        """Width of the tokens: the widest group's summed token widths."""
        parts = cast(tuple[_Part, ...], self.parts)
        return max(sum(parts[i].token_dim for i in group) for group in self.groups)

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled vector: the summed widths of the ``pooled`` parts (0: none)."""
        return sum(cast(_Part, self.parts[i]).pooled_dim for i in self.pooled)

    @classmethod
    def sdxl(
        cls, clip_l: CLIPTextConditionerConfig, clip_g: CLIPTextConditionerConfig
    ) -> "ComposedTextConditionerConfig":
        """SDXL's text conditioning: both towers' tokens side by side, bigG's pooled vector."""
        return cls(parts=(clip_l, clip_g), groups=((0, 1),), pooled=(1,))

    @classmethod
    def sd3(
        cls,
        clip_l: CLIPTextConditionerConfig,
        clip_g: CLIPTextConditionerConfig,
        t5: T5TextConditionerConfig,
    ) -> "ComposedTextConditionerConfig":
        """SD3's: the CLIP tokens side by side then T5's, both CLIP pooled vectors."""
        return cls(parts=(clip_l, clip_g, t5), groups=((0, 1), (2,)), pooled=(0, 1))


class ComposedTextConditioner(nn.Module):
    """Text conditioners (``parts``) joined as a
    [`ComposedTextConditionerConfig`][diffkit.text.ComposedTextConditionerConfig] says."""

    def __init__(
        self,
        parts: Sequence[nn.Module],
        groups: Sequence[Sequence[int]],
        pooled: Sequence[int] = (),
    ) -> None:
        super().__init__()
        for i, part in enumerate(parts):
            if not isinstance(part, CLIPTextConditioner | T5TextConditioner):
                raise TypeError(
                    f"ComposedTextConditioner: parts[{i}] is a {type(part).__name__}; the parts "
                    "are CLIPTextConditioner / T5TextConditioner (their configs save the whole)"
                )
        self.parts = nn.ModuleList(parts)
        self.groups = tuple(tuple(group) for group in groups)
        self.pooled = tuple(pooled)
        # validated as a config: every rule of ComposedTextConditionerConfig holds here too
        self._config = ComposedTextConditionerConfig(
            parts=tuple(cast(_Conditioners, part).config for part in self.parts),
            groups=self.groups,
            pooled=self.pooled,
        )
        self.token_dim: int = self._config.token_dim
        self.pooled_dim: int = self._config.pooled_dim
        self.context_length: int = sum(
            _context_length(cast(_Part, self._config.parts[group[0]])) for group in self.groups
        )

    @classmethod
    def from_config(cls, config: ComposedTextConditionerConfig) -> "ComposedTextConditioner":
        """Each part built from its config (random weights, the configured tokenizers)."""
        parts = [cast(nn.Module, TEXT_CONDITIONERS.build(part)) for part in config.parts]
        return cls(parts, config.groups, config.pooled)

    @property
    def config(self) -> ComposedTextConditionerConfig:
        """The config that builds this conditioner: its parts' configs and the joins."""
        return self._config

    def forward(self, texts: Sequence[str]) -> Conditioning:
        """Same as ``condition``."""
        return self.condition(texts)

    def condition(self, texts: Sequence[str]) -> Conditioning:
        """Every part's conditioning of ``texts``, joined: tokens ``(b, context, token_dim)``,
        pooled ``(b, pooled_dim)`` (``None`` without pooled parts), no mask."""
        outputs = [cast(TextConditioner, part).condition(texts) for part in self.parts]
        sequences = []
        for group in self.groups:
            tokens = torch.cat([cast(Tensor, outputs[i].tokens) for i in group], dim=-1)
            sequences.append(F.pad(tokens, (0, self.token_dim - tokens.shape[-1])))
        pooled = [cast(Tensor, outputs[i].pooled) for i in self.pooled]
        return Conditioning(
            tokens=torch.cat(sequences, dim=1), pooled=torch.cat(pooled, dim=-1) if pooled else None
        )


TEXT_CONDITIONERS: Registry[TextConditioner] = Registry("text_conditioner")
"""Text conditioners by config ``kind``."""
TEXT_CONDITIONERS.register(CLIPTextConditionerConfig, CLIPTextConditioner.from_config)
TEXT_CONDITIONERS.register(T5TextConditionerConfig, T5TextConditioner.from_config)
TEXT_CONDITIONERS.register(ComposedTextConditionerConfig, ComposedTextConditioner.from_config)
