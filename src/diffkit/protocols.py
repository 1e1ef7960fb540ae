"""The six interfaces every diffkit component satisfies, and the `Conditioning` container.

They are structural (`typing.Protocol`): any object with the right attributes and methods
plugs in, no inheritance needed, including objects that forward them (``torch.compile``'s
wrapper). Shapes use the names of
[`diffkit.typing`][diffkit.typing]; one time axis, ``t`` in [0, 1] (0 data, 1 noise).
"""

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from typing_extensions import Protocol, runtime_checkable

from diffkit.typing import Prediction, Sample, ShapeError, Time

__all__ = [
    "Conditioning",
    "Denoiser",
    "DenoiserSpec",
    "Encoder",
    "EncoderSpec",
    "NoiseSchedule",
    "Patchifier",
    "Sampler",
    "StepCallback",
    "TextConditioner",
    "TextSpec",
    "VideoEncoderSpec",
]


_BaseProtocolMeta: Any = type(Protocol)


class _ProtocolMeta(_BaseProtocolMeta):
    """Runtime protocol checks by ``hasattr`` on the protocol's members, cached per protocol.

    What Python 3.11's ``typing`` does, without recomputing the member list on every
    check (9-14 µs a check there; ~1 µs here). Unlike Python 3.12's
    ``inspect.getattr_static`` lookup it also accepts objects that forward attributes
    through ``__getattr__``: ``torch.compile``'s ``OptimizedModule``, EMA or DDP-style
    wrappers, ``nn.Module`` buffers.
    """

    def __instancecheck__(cls, instance: object) -> bool:  # pyright: ignore[reportSelfClsParameterName]
        members = _MEMBERS.get(cls) or cls._members()
        if members is None:
            return super().__instancecheck__(instance)  # a nominal subclass, or an error
        if next(_lacking(members, instance), None) is None:
            return True
        return cls in type(instance).__mro__  # an explicit subclass still is one

    def _members(cls) -> tuple[tuple[str, bool], ...] | None:  # pyright: ignore[reportSelfClsParameterName]
        """``(name, is_method)`` of each member, cached; ``None`` if the class is no protocol."""
        runtime = cls.__dict__.get("_is_runtime_protocol", False)
        if not (getattr(cls, "_is_protocol", False) and runtime):
            return None
        names: Iterable[str] = cls.__protocol_attrs__
        members = tuple((name, callable(getattr(cls, name, None))) for name in sorted(names))
        # Kept off the class: an attribute there would become a member of subprotocols.
        _MEMBERS[cls] = members
        return members

    def _missing(cls, instance: object) -> list[str]:  # pyright: ignore[reportSelfClsParameterName]
        """The protocol's members ``instance`` lacks (a method set to None counts, as in typing)."""
        return list(_lacking(cls._members() or (), instance))


def _lacking(members: tuple[tuple[str, bool], ...], instance: object) -> Iterator[str]:
    for name, method in members:
        value = getattr(instance, name, _MISSING)
        # A method set to None opts out of the protocol, as in typing.
        if value is _MISSING or (method and value is None):
            yield name


_MISSING = object()
_MEMBERS: dict[type, tuple[tuple[str, bool], ...]] = {}


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """What a denoiser is conditioned on; every field is optional and batch-first.

    - ``tokens``: a sequence for cross-attention, ``(batch, tokens, dim)``.
    - ``pooled``: one vector per item, ``(batch, dim)``.
    - ``mask``: bool, ``True`` where a token is real, ``(batch, tokens)``.
    - ``labels``: integer (int64 or int32) class labels, ``(batch,)``.
    - ``micro``: micro-conditions, a few numbers per item, ``(batch, n)``: SDXL's
      ``(original height, width, crop top, left, target height, width)``, PixArt-α's
      ``(height, width, aspect ratio)`` of the image to generate.
    - ``temporal``: bool, ``(batch,)``, for a video batch: ``True`` where an item's frames
      are one clip, ``False`` where they are independent images (joint image-video
      training; a space-time U-Net's temporal layers are the identity for those items).
      Unset: every item is a clip. It describes ``x_t`` rather than what to generate, so
      [`where`][diffkit.protocols.Conditioning.where] keeps it from this side.
    """

    tokens: Float[Tensor, "batch tokens dim"] | None = None
    pooled: Float[Tensor, "batch pooled_dim"] | None = None
    mask: Bool[Tensor, "batch tokens"] | None = None
    labels: Int[Tensor, " batch"] | None = None
    micro: Float[Tensor, "batch micro"] | None = None
    temporal: Bool[Tensor, " batch"] | None = None

    def __post_init__(self) -> None:
        sizes = {name: t.shape[0] for name, t in self._fields() if t is not None}
        if len(set(sizes.values())) > 1:
            raise ShapeError(f"Conditioning: fields disagree on the batch size: {sizes}")
        if self.tokens is not None and self.tokens.ndim != 3:
            raise ShapeError(
                "Conditioning: 'tokens' must be (batch, tokens, dim), "
                f"got {tuple(self.tokens.shape)}"
            )
        if self.pooled is not None and self.pooled.ndim != 2:
            raise ShapeError(
                f"Conditioning: 'pooled' must be (batch, dim), got {tuple(self.pooled.shape)}"
            )
        if self.micro is not None and self.micro.ndim != 2:
            raise ShapeError(
                f"Conditioning: 'micro' must be (batch, n), got {tuple(self.micro.shape)}"
            )
        for name, value in (
            ("tokens", self.tokens),
            ("pooled", self.pooled),
            ("micro", self.micro),
        ):
            if value is not None and not value.is_floating_point():
                raise ShapeError(
                    f"Conditioning: '{name}' must be floating-point embeddings, got dtype "
                    f"{value.dtype} (token ids go through a TextConditioner first)"
                )
        if self.mask is not None:
            if self.tokens is None:
                raise ShapeError("Conditioning: 'mask' given without 'tokens'")
            if tuple(self.mask.shape) != tuple(self.tokens.shape[:2]):
                raise ShapeError(
                    f"Conditioning: 'mask' shape {tuple(self.mask.shape)} must equal the first "
                    f"two dimensions of 'tokens' {tuple(self.tokens.shape[:2])}"
                )
            if self.mask.dtype != torch.bool:
                raise ShapeError(
                    f"Conditioning: 'mask' must be a bool keep-mask, got dtype {self.mask.dtype} "
                    "(a tokenizer's 0/1 attention_mask?); pass mask.bool()"
                )
        if self.temporal is not None and (
            self.temporal.ndim != 1 or self.temporal.dtype != torch.bool
        ):
            raise ShapeError(
                "Conditioning: 'temporal' must be a bool (batch,) tensor (True: a clip, False: "
                f"independent images), got shape {tuple(self.temporal.shape)} and dtype "
                f"{self.temporal.dtype}"
            )
        if self.labels is not None:
            if self.labels.ndim != 1:
                raise ShapeError(
                    f"Conditioning: 'labels' must be (batch,), got {tuple(self.labels.shape)}"
                )
            if self.labels.dtype not in (torch.int64, torch.int32):
                raise ShapeError(
                    f"Conditioning: 'labels' must be integer class indices (int64 or int32), got "
                    f"dtype {self.labels.dtype}; pass labels.long()"
                )

    def _fields(self) -> list[tuple[str, Tensor | None]]:
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]

    @property
    def batch_size(self) -> int | None:
        """The batch size, or ``None`` when every field is empty."""
        for _, t in self._fields():
            if t is not None:
                return int(t.shape[0])
        return None

    def map(self, fn: Callable[[Tensor], Tensor]) -> "Conditioning":
        """Apply ``fn`` to every tensor field (e.g. ``lambda t: t.to(device)``)."""
        return Conditioning(**{n: (fn(t) if t is not None else None) for n, t in self._fields()})

    def expand(self, batch: int) -> "Conditioning":
        """Repeat a batch-1 conditioning to ``batch`` items (a no-op when it already has them)."""
        size = self.batch_size
        if size is None or size == batch:
            return self
        if size != 1:
            raise ShapeError(f"Conditioning: cannot expand batch {size} to {batch}")
        return self.map(lambda t: t.expand(batch, *t.shape[1:]))

    def cat(self, other: "Conditioning") -> "Conditioning":
        """Concatenate two conditionings along the batch (used for classifier-free guidance)."""
        out: dict[str, Tensor | None] = {}
        for (name, a), (_, b) in zip(self._fields(), other._fields(), strict=True):
            if (a is None) != (b is None):
                raise ShapeError(f"Conditioning.cat: '{name}' is set on one side only")
            if a is not None and b is not None and a.shape[1:] != b.shape[1:]:
                raise ShapeError(
                    f"Conditioning.cat: '{name}' has shape {tuple(a.shape)} on one side and "
                    f"{tuple(b.shape)} on the other; all but the batch dimension must match "
                    "(e.g. pad cond's and uncond's prompts to the same context length)"
                )
            out[name] = None if a is None or b is None else torch.cat([a, b])
        return Conditioning(**out)

    def where(self, keep: Bool[Tensor, " batch"], other: "Conditioning") -> "Conditioning":
        """Per item: this conditioning where ``keep`` is true, else ``other`` (batch 1 or same).

        A field unset on ``other`` becomes zeros (an all-False mask); every other dimension
        of a set field must match, e.g. cond's and uncond's context lengths. ``temporal``
        (which items are clips) is kept from this side for every item.
        """
        out: dict[str, Tensor | None] = {}
        for (name, a), (_, b) in zip(self._fields(), other._fields(), strict=True):
            if a is None or name == "temporal":  # temporal describes x_t: kept
                out[name] = a
                continue
            if b is not None and (b.shape[1:] != a.shape[1:] or b.shape[0] not in (1, a.shape[0])):
                context = name in ("tokens", "mask") and b.ndim == a.ndim
                if context and b.shape[1] != a.shape[1]:
                    hint = (
                        f"context lengths {a.shape[1]} and {b.shape[1]} differ: pad cond's and "
                        "uncond's prompts to the same context length"
                    )
                else:
                    hint = f"other's batch must be 1 or {a.shape[0]} and the rest must match"
                raise ShapeError(
                    f"Conditioning.where: '{name}' has shape {tuple(a.shape)} in this (cond) and "
                    f"{tuple(b.shape)} in other (uncond); {hint}"
                )
            fill = torch.zeros_like(a) if b is None else b.to(a.dtype).expand_as(a)
            k = keep.reshape(keep.shape + (1,) * (a.ndim - 1))
            out[name] = torch.where(k, a, fill)
        return Conditioning(**out)


StepCallback = Callable[[int, Tensor, Tensor, Tensor], None]
"""``callback(step, t, x_t, x0_hat)`` called after each sampler step (previews, progress).

diffkit's samplers return the same samples, bit for bit, with or without a callback.
"""


@runtime_checkable
class NoiseSchedule(Protocol, metaclass=_ProtocolMeta):
    """The forward process ``x_t = alpha(t) * x0 + sigma(t) * eps`` on continuous ``t``.

    ``log_snr(t) = log(alpha(t)**2 / sigma(t)**2)`` decreases in ``t`` (strictly, but
    for a clamp such as ``Cosine``'s ``min_log_snr`` near ``t = 1``) and
    ``t_of_log_snr`` is its inverse. All methods take and return ``(batch,)``.
    """

    def alpha(self, t: Time) -> Time:
        """Signal scale ``alpha(t)``, ``(batch,) -> (batch,)``."""
        ...

    def sigma(self, t: Time) -> Time:
        """Noise scale ``sigma(t)``, ``(batch,) -> (batch,)``."""
        ...

    def log_snr(self, t: Time) -> Time:
        """Log signal-to-noise ratio ``lambda(t) = 2 log(alpha / sigma)``, decreasing in ``t``."""
        ...

    def t_of_log_snr(self, log_snr: Time) -> Time:
        """The time at which ``log_snr(t)`` equals the given value (inverse of ``log_snr``)."""
        ...


@runtime_checkable
class Denoiser(Protocol, metaclass=_ProtocolMeta):
    """A network ``(x_t, t, cond) -> prediction`` of the kind named by ``prediction``."""

    # Read-only for the type checker: a class attribute ``prediction: Prediction = "x0"``,
    # a narrower ``Literal["x0"]`` or a property all satisfy it.
    @property
    def prediction(self) -> Prediction:
        """What the network predicts: ``"epsilon"``, ``"x0"``, ``"v"`` or ``"flow"``."""
        ...

    def __call__(self, x_t: Sample, t: Time, cond: Conditioning | None = None) -> Sample:
        """Predict from ``x_t`` ``(batch, *shape)`` at times ``t`` ``(batch,)``; same shape out."""
        ...


@runtime_checkable
class Sampler(Protocol, metaclass=_ProtocolMeta):
    """The reverse process: turns standard normal ``noise`` into data in ``steps`` steps.

    Stateless: nothing survives between calls, so one object can serve many threads.
    diffkit's samplers run under ``torch.no_grad()`` (no autograd graph over the steps).
    """

    def sample(
        self,
        denoiser: Denoiser,
        schedule: NoiseSchedule,
        noise: Sample,
        *,
        steps: int,
        cond: Conditioning | None = None,
        guidance: float = 1.0,
        uncond: Conditioning | None = None,
        generator: torch.Generator | None = None,
        callback: StepCallback | None = None,
    ) -> Sample:
        """Sample ``x0`` ``(batch, *shape)`` starting from ``noise ~ N(0, I)`` of that shape."""
        ...


@runtime_checkable
class Encoder(Protocol, metaclass=_ProtocolMeta):
    """A latent space: ``encode`` maps data to latents, ``decode`` maps them back.

    Latents are already multiplied by ``scaling_factor`` so that they have roughly unit
    variance. Videos ``(batch, frames, channels, height, width)`` are coded frame by frame by
    an image autoencoder, or as clips by a video one that compresses time too
    ([`CausalVideoAutoencoder`][diffkit.nn.video_vae.CausalVideoAutoencoder]).
    """

    latent_channels: int
    scaling_factor: float

    def latent_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The latent shape (without batch) for a data shape (without batch)."""
        ...

    def encode(self, x: Sample) -> Sample:
        """Data ``(batch, [frames,] channels, height, width)`` to scaled latents."""
        ...

    def decode(self, z: Sample) -> Sample:
        """Scaled latents back to data; ``decode(encode(x))`` approximates ``x``."""
        ...


@runtime_checkable
class TextConditioner(Protocol, metaclass=_ProtocolMeta):
    """Texts to a [`Conditioning`][diffkit.protocols.Conditioning] (tokens, pooled, mask)."""

    token_dim: int
    pooled_dim: int
    context_length: int

    def condition(self, texts: Sequence[str]) -> Conditioning:
        """Encode ``len(texts)`` strings; tokens ``(batch, context_length, token_dim)``."""
        ...


@runtime_checkable
class Patchifier(Protocol, metaclass=_ProtocolMeta):
    """Cuts data into non-overlapping patches and puts them back, exactly.

    ``unpatchify(patchify(x), x.shape[1:]) == x`` bit for bit.
    """

    @property
    def patch_size(self) -> tuple[int, ...]:
        """The patch (or tubelet) size, one entry per patched axis."""
        ...

    def patchify(self, x: Sample) -> Float[Tensor, "batch tokens patch_dim"]:
        """Data ``(batch, *shape)`` to tokens ``(batch, tokens, patch_dim)``."""
        ...

    def unpatchify(
        self, tokens: Float[Tensor, "batch tokens patch_dim"], shape: Sequence[int]
    ) -> Sample:
        """Tokens back to data of ``shape`` (without batch)."""
        ...

    def grid(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The token grid (e.g. ``(frames', height', width')``) for a data shape without batch."""
        ...


# --------------------------------------------------------------------------------------
# What a part's config declares, for checking that the parts of a pipeline fit together
# before anything is built (see diffkit.builder.compatibility_problems). A config that
# does not declare them is accepted, and the checks that need them are skipped.
# --------------------------------------------------------------------------------------


@runtime_checkable
class DenoiserSpec(Protocol, metaclass=_ProtocolMeta):
    """What a denoiser's config declares about the tensors its network takes."""

    @property
    def in_channels(self) -> int:
        """Channels of ``x_t`` (the latent channels in latent diffusion)."""
        ...

    @property
    def out_channels(self) -> int | None:
        """Channels of the prediction; ``None``: ``in_channels``."""
        ...

    @property
    def context_dim(self) -> int | None:
        """Width of ``Conditioning.tokens`` taken by cross-attention; ``None``: none."""
        ...

    @property
    def pooled_dim(self) -> int | None:
        """Width of ``Conditioning.pooled`` taken; ``None``: none."""
        ...

    @property
    def downsampling_factor(self) -> int:
        """The latent height and width must be multiples of this (patch size included)."""
        ...

    @property
    def patch_size(self) -> int | tuple[int, ...] | None:
        """Patch size: ``(h, w)`` (an int: square) for images, ``(frames, h, w)`` for video."""
        ...

    @property
    def is_video(self) -> bool:
        """Whether the network takes videos ``(batch, frames, channels, height, width)``."""
        ...

    @property
    def prediction(self) -> Prediction:
        """What the network predicts: ``"epsilon"``, ``"x0"``, ``"v"`` or ``"flow"``."""
        ...


@runtime_checkable
class EncoderSpec(Protocol, metaclass=_ProtocolMeta):
    """What an encoder's config declares about data and latents."""

    @property
    def in_channels(self) -> int:
        """Channels of the data it encodes."""
        ...

    @property
    def out_channels(self) -> int | None:
        """Channels of the data it decodes to; ``None``: ``in_channels``."""
        ...

    @property
    def latent_channels(self) -> int:
        """Channels of its latents."""
        ...

    @property
    def downsampling_factor(self) -> int:
        """Data height and width over latent height and width."""
        ...


@runtime_checkable
class VideoEncoderSpec(EncoderSpec, Protocol, metaclass=_ProtocolMeta):
    """An encoder config that compresses time too: ``1 + r k`` frames to ``1 + k``."""

    @property
    def temporal_downsampling_factor(self) -> int:
        """``r``: latent frames are ``1 + (frames - 1) / r``."""
        ...


@runtime_checkable
class TextSpec(Protocol, metaclass=_ProtocolMeta):
    """What a text conditioner's config declares about the conditioning it makes."""

    @property
    def token_dim(self) -> int:
        """Width of ``Conditioning.tokens``."""
        ...

    @property
    def pooled_dim(self) -> int:
        """Width of ``Conditioning.pooled``."""
        ...
