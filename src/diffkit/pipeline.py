"""``Pipeline``: a schedule, a denoiser and their helpers, composed for sampling.

A pipeline holds a [`NoiseSchedule`][diffkit.protocols.NoiseSchedule], a
[`Denoiser`][diffkit.protocols.Denoiser], and optionally an
[`Encoder`][diffkit.protocols.Encoder] (latent diffusion), a
[`TextConditioner`][diffkit.protocols.TextConditioner] (prompts), a default
[`Sampler`][diffkit.protocols.Sampler] and a [`Patchifier`][diffkit.protocols.Patchifier].
Any objects satisfying those protocols work, registered or not. A pipeline is its parts:
``pipeline.config`` is the [`PipelineConfig`][diffkit.pipeline_config.PipelineConfig]
assembled from their configs (a schedule, sampler or patchifier *is* its config, a
network holds its own as ``module.config``), so one built by ``diffkit.build(config)``,
one composed by hand from registered parts, one converted by ``interop`` and one changed
with ``replace(...)`` all save and load alike.

- ``generate(prompts | cond, steps=, guidance=, sampler=, generator=)`` samples images
  or videos (text-to-image, text-to-video, class-conditional, unconditional);
- ``img2img(x, prompts, strength=t0)`` noises ``x`` to time ``t0 < 1`` and denoises
  from there;
- ``encode`` / ``decode`` go to and from the latent space;
- ``save(dir)`` writes ``config.json``, ``model.safetensors`` (and tokenizer files);
  ``Pipeline.load(dir)`` rebuilds it exactly, reading only safetensors. A part without a
  registered config is refused at save, naming it.
"""

import contextlib
import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypedDict

import torch
from jaxtyping import Float
from torch import Tensor, nn

from diffkit.checkpoint import (
    CheckpointError,
    atomic_write,
    check_dtypes,
    check_loadable,
    load_state_dict,
    load_tensors,
    read_header,
)
from diffkit.checkpoint import save_tensors as _save_tensors
from diffkit.config import MAX_PARAMETERS, Config
from diffkit.files import UnreadableFileError, confined, read_bytes
from diffkit.forward import add_noise
from diffkit.guidance import warn_unused
from diffkit.pipeline_config import GROUPS, MAX_STEPS, PipelineConfig, parse_config, registry
from diffkit.protocols import (
    Conditioning,
    Denoiser,
    Encoder,
    NoiseSchedule,
    Patchifier,
    Sampler,
    StepCallback,
    TextConditioner,
)
from diffkit.typing import Prediction, Sample, ShapeError, Time, checked, warn_at_caller

__all__ = ["PARTS", "Pipeline"]

Data = Float[Tensor, "batch *data"]
"""Images ``(batch, c, h, w)`` or videos ``(batch, frames, c, h, w)`` in data space."""
Latents = Float[Tensor, "batch *latent"]
"""The same in the encoder's latent space (equal to ``Data`` in pixel space)."""

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
FORMAT = "diffkit-pipeline"
CONFIG_KEY = "config"
"""The weights' metadata key that records the config saved with them."""
MIXED_KEY = "mixed_dtypes"
"""The weights' metadata key listing the modules saved in more than one floating dtype."""
PARTS = ("schedule", "denoiser", "encoder", "text", "sampler", "patchifier")
"""The parts of a pipeline, each described by a registered config when saved."""


def _default_sampler() -> Sampler:
    from diffkit.samplers import REGISTRY

    return REGISTRY["dpmpp_2m"]()


def _sampler_by_name(name: str) -> Sampler:
    from diffkit.samplers import REGISTRY

    try:
        return REGISTRY[name]()
    except KeyError:
        raise ValueError(f"unknown sampler '{name}'; known: {', '.join(REGISTRY)}") from None


class _Asked(NamedTuple):
    """The conditions a call was given, before they are checked and expanded."""

    prompts: Sequence[str] | str | None
    cond: Conditioning | None
    uncond: Conditioning | None
    negative_prompts: Sequence[str] | str | None


class _Conds(TypedDict):
    """A call's expanded conditions and guidance, as a sampler takes them (``**conds``)."""

    cond: Conditioning | None
    uncond: Conditioning | None
    guidance: float


def _batch_error(batch_from: str, batch: int, given: str, size: int | None) -> ValueError:
    """A condition whose batch is neither 1 nor the sampling batch, named as it was given."""
    if given in ("cond", "uncond"):
        given = f"{given} of batch {size}"
    fits = "1" if batch == 1 else f"1 or {batch}"
    return ValueError(f"Pipeline: {batch_from} is {batch} but got {given}; pass {fits}")


def _check_floating(where: str, name: str, x: Tensor) -> None:
    """``x`` must be floating-point, said as ``checked`` says it (before any cast hides it)."""
    if not x.is_floating_point():
        dtypes = sorted(set(getattr(Data, "dtypes", ())))
        raise ShapeError(
            f"{where}: argument '{name}' has dtype {x.dtype}, expected one of {dtypes}"
        )


def _channels(n: int) -> str:
    return f"{n} channel" if n == 1 else f"{n} channels"


def _check_prompts(name: str, prompts: object) -> None:
    """``prompts`` must be ``None``, a str or a sequence of str (ordered, with a length)."""
    if prompts is None or isinstance(prompts, str):
        return
    if not isinstance(prompts, Sequence) or isinstance(prompts, bytes | bytearray):
        raise TypeError(
            f"Pipeline: {name} must be a str or a list of str, got {type(prompts).__name__}; "
            "pass a list (a set has no order, an iterator no length)"
        )
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"Pipeline: {name}[{i}] is {type(prompt).__name__}, expected str")


def _registered_config(where: str, name: str, part: object) -> Config | None:
    """The registered config that part ``name`` is (a schedule) or has (``module.config``)."""
    if part is None:
        return None
    group = GROUPS[name]
    try:
        config = part if isinstance(part, Config) else getattr(part, "config", None)
    except ValueError as err:  # a config property that cannot describe its part
        raise ValueError(f"{where}: {name} {type(part).__name__}: {err}") from None
    if isinstance(config, Config):
        try:
            return registry(group).parse(config)
        except ValueError:
            pass
    raise ValueError(
        f"{where}: {name} {type(part).__name__} has no registered config, so a saved "
        f"pipeline could not build it back; register its config class (a Config subclass "
        f"with a 'kind') with diffkit.builder.registry('{group}').register(...) and make the "
        f"{name} that config (or give it a .config)"
    )


def _first_time(
    sampler: Sampler, schedule: NoiseSchedule, steps: int, device: torch.device
) -> float:
    """The first time of ``sampler``'s grid on ``schedule`` (1 for one without ``grid``)."""
    grid = getattr(sampler, "grid", None)
    if not callable(grid):
        return 1.0
    times: Any = getattr(grid(schedule, steps, device), "t", None)
    return float(times[0]) if times is not None else 1.0


def _differences(saved: object, found: object, path: str = "") -> list[str]:
    """The dotted paths at which two JSON values differ."""
    if isinstance(saved, dict) and isinstance(found, dict):
        out: list[str] = []
        for key in [*saved, *(k for k in found if k not in saved)]:
            where = f"{path}.{key}" if path else str(key)
            out += _differences(saved.get(key), found.get(key), where)
        return out
    return [] if saved == found else [path or "(the whole config)"]


def _check_saved_together(folder: Path, data: dict[str, Any], recorded: str | None) -> None:
    """Warn when ``config.json`` is not the config the weights were saved with.

    The weights file records its config (pipelines saved before it was recorded are not
    checked). A different one is an interrupted save (new weights, old config) or an
    edit; it loads as the config says, with a ``UserWarning`` naming both files and fields.
    """
    if recorded is None:
        return
    try:
        saved = json.loads(recorded)
    except json.JSONDecodeError:
        return
    fields = _differences(saved, data)
    if fields:
        shown = ", ".join(fields[:8]) + (
            f", ... ({len(fields) - 8} more)" if len(fields) > 8 else ""
        )
        warn_at_caller(
            f"Pipeline.load: {folder / CONFIG_FILE} is not the config {folder / WEIGHTS_FILE} "
            f"was saved with (they differ in {shown}): an interrupted save (new weights, old "
            f"config) or an edit of {CONFIG_FILE}; loading it as {CONFIG_FILE} says. If the "
            "edit was deliberate, save the loaded pipeline again to record it"
        )


def _mixed_modules(pipeline: nn.Module) -> list[str]:
    """The pipeline's modules whose floating tensors have more than one dtype."""
    return [
        name
        for name, child in pipeline.named_children()
        if len({t.dtype for t in child.state_dict().values() if t.is_floating_point()}) > 1
    ]


def _recorded_mixed(metadata: Mapping[str, str]) -> list[str]:
    try:
        names = json.loads(metadata.get(MIXED_KEY, "[]"))
    except (ValueError, RecursionError):
        return []
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def _huge_integers(value: object, path: str = "") -> list[str]:
    """``path=value`` for every integer in a JSON value too large for a tensor size."""
    if isinstance(value, dict):
        return [h for k, v in value.items() for h in _huge_integers(v, f"{path}.{k}".strip("."))]
    if isinstance(value, list):
        return [h for i, v in enumerate(value) for h in _huge_integers(v, f"{path}[{i}]")]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**62:
        shown = str(value) if len(str(value)) <= 20 else f"a {len(str(abs(value)))}-digit number"
        return [f"{path}={shown}"]
    return []


def _largest_sizes(config: object) -> str:
    """The three largest integer fields of a part's config, as ``name=value``."""
    found: list[tuple[int, str]] = []

    def walk(value: object, path: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}.{k}".strip("."))
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v, path)
        elif isinstance(value, int) and not isinstance(value, bool):
            found.append((value, path))

    walk(config.model_dump() if isinstance(config, Config) else {}, "")
    return ", ".join(f"{path}={value}" for value, path in sorted(found, reverse=True)[:3])


def _check_sizes(probe: nn.Module, config: PipelineConfig, where: str) -> None:
    """Refuse a pipeline (built on the meta device) with more than ``MAX_PARAMETERS``."""
    for name, child in probe.named_children():
        count = sum(t.numel() for t in child.state_dict().values())
        if count > MAX_PARAMETERS:
            part = getattr(config, name, None)
            raise CheckpointError(
                f"{where}: {name} would have {count:,} parameters, more than "
                f"diffkit.config.MAX_PARAMETERS ({MAX_PARAMETERS:,}); its largest sizes: "
                f"{_largest_sizes(part)}"
            )


def _to_stored_dtypes(pipeline: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Cast the freshly built modules to the floating dtypes their saved tensors have.

    A module whose saved floating tensors share one dtype is cast whole (its buffers that
    are not saved too, as ``module.to(dtype)`` did before saving); in a mixed one each
    saved parameter and buffer takes its own dtype.
    """
    for name, child in pipeline.named_children():
        stored = {
            v.dtype
            for k, v in tensors.items()
            if k.startswith(f"{name}.") and v.is_floating_point()
        }
        if len(stored) == 1:
            child.to(stored.pop())
    for prefix, module in pipeline.named_modules():
        for group in (module._parameters, module._buffers):
            for key, value in group.items():
                saved = tensors.get(f"{prefix}.{key}" if prefix else key)
                if (
                    value is not None
                    and saved is not None
                    and value.is_floating_point()
                    and saved.is_floating_point()
                    and value.dtype != saved.dtype
                ):
                    value.data = value.data.to(saved.dtype)


_FILE_FIELDS = ("vocab_path", "tokenizer_path")
"""The fields of a text conditioner's config that name a tokenizer file."""


def _files_inside(
    config: Config, folder: Path, relative: str, copies: list[tuple[Path, Path]]
) -> Config:
    """``config`` (a text conditioner's, and the ``parts`` of a composed one) with each
    tokenizer file it names moved to ``folder / relative``; the copies to make are appended."""
    update: dict[str, Any] = {}
    fields = type(config).model_fields
    for name in _FILE_FIELDS:
        value = getattr(config, name, None) if name in fields else None
        if isinstance(value, str):
            source = Path(value)
            target = folder / relative / source.name
            if source.resolve() != target.resolve():
                copies.append((source, target))
            update[name] = f"{relative}/{source.name}"
    parts = getattr(config, "parts", None) if "parts" in fields else None
    if isinstance(parts, tuple) and all(isinstance(part, Config) for part in parts):
        update["parts"] = tuple(
            _files_inside(part, folder, f"{relative}/{i}", copies) for i, part in enumerate(parts)
        )
    return config.model_copy(update=update)


def _confined_files(folder: Path, text: dict[str, Any], where: str) -> dict[str, Any]:
    """A saved text config with each tokenizer file it names checked to be a regular file
    inside ``folder`` and made absolute (also in the ``parts`` of a composed one)."""
    out = dict(text)
    for name in _FILE_FIELDS:
        if isinstance(text.get(name), str):
            try:
                out[name] = str(confined(folder, text[name]))
            except UnreadableFileError as err:
                raise CheckpointError(f"{where}.{name} {err}") from None
    parts = text.get("parts")
    if isinstance(parts, list):
        out["parts"] = [
            _confined_files(folder, part, f"{where}.parts[{i}]") if isinstance(part, dict) else part
            for i, part in enumerate(parts)
        ]
    return out


def _zeros(cond: Conditioning) -> Conditioning:
    """``cond`` with its tokens and pooled vector zeroed (the rest kept)."""
    return dataclasses.replace(
        cond,
        tokens=None if cond.tokens is None else torch.zeros_like(cond.tokens),
        pooled=None if cond.pooled is None else torch.zeros_like(cond.pooled),
    )


def _default_micro(denoiser: object, height: int, width: int) -> list[float] | None:
    """diffusers' default micro-conditions for images of ``height x width`` pixels.

    SDXL's U-Net (6): original size, crop top-left, target size ``(h, w, 0, 0, h, w)``;
    PixArt-α's transformer: ``(h, w, h / w)``; ``None`` for a denoiser that takes none.
    """
    config = getattr(denoiser, "config", None)
    if getattr(config, "size_conditions", False):
        return [float(height), float(width), height / width]
    count = getattr(config, "micro_conditions", 0)
    if count == 6:
        return [float(height), float(width), 0.0, 0.0, float(height), float(width)]
    if count:
        raise ValueError(
            f"Pipeline: the denoiser takes {count} micro-conditions, which have no default "
            "(6 are SDXL's sizes); pass cond= and uncond= with their micro"
        )
    return None


def _with_micro(conds: _Conds, default: Callable[[], list[float] | None], like: Tensor) -> _Conds:
    """``conds`` with the ``default()`` micro-conditions (one row, for every sample) where
    they have none (``default`` is asked only then)."""
    if all(c is None or c.micro is not None for c in (conds["cond"], conds["uncond"])):
        return conds
    micro = default()
    if micro is None:
        return conds
    row = torch.tensor(micro, dtype=like.dtype, device=like.device)

    def filled(c: Conditioning | None) -> Conditioning | None:
        if c is None or c.micro is not None:
            return c
        return dataclasses.replace(c, micro=row.expand(c.batch_size or 1, -1))

    return _Conds(
        cond=filled(conds["cond"]), uncond=filled(conds["uncond"]), guidance=conds["guidance"]
    )


class _Truncated:
    """The schedule on ``[0, t_end]`` stretched to ``[0, 1]``: ``alpha'(u) = alpha(t_end u)``."""

    def __init__(self, schedule: NoiseSchedule, t_end: float) -> None:
        self.schedule, self.t_end = schedule, t_end

    def alpha(self, t: Tensor) -> Tensor:
        return self.schedule.alpha(t * self.t_end)

    def sigma(self, t: Tensor) -> Tensor:
        return self.schedule.sigma(t * self.t_end)

    def log_snr(self, t: Tensor) -> Tensor:
        return self.schedule.log_snr(t * self.t_end)

    def t_of_log_snr(self, log_snr: Tensor) -> Tensor:
        return (self.schedule.t_of_log_snr(log_snr) / self.t_end).clamp(0.0, 1.0)


class _TimeScaled:
    """A denoiser seen on the stretched time axis of ``_Truncated``."""

    def __init__(self, denoiser: Denoiser, t_end: float) -> None:
        self.denoiser, self.t_end = denoiser, t_end
        self.prediction: Prediction = denoiser.prediction

    def __call__(self, x_t: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
        return self.denoiser(x_t, t * self.t_end, cond)


class Pipeline(nn.Module):
    """Schedule + denoiser (+ encoder, text conditioner, sampler, patchifier) for sampling.

    The parts that are ``nn.Module``s are submodules (``denoiser``, ``encoder``,
    ``text``), so ``pipeline.to(device)`` and ``pipeline.state_dict()`` cover them.
    ``data_shape`` is one sample without batch: ``(c, h, w)`` or ``(frames, c, h, w)``;
    ``steps`` and ``guidance`` are the defaults of ``generate`` and ``img2img``; ``start``
    says what ``generate``'s standard normal noise is: ``"noise"`` is scaled to ``sigma`` at
    the sampler's first time, ``"sample"`` is the first sample itself (as diffusers'
    pipelines take their ``latents``; ``interop.from_diffusers(pipeline)`` sets it);
    ``empty_uncond="zeros"`` guides without negative prompts against zeros instead of the
    empty prompt (SDXL's ``force_zeros_for_empty_prompt``).
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        denoiser: Denoiser,
        *,
        encoder: Encoder | None = None,
        text: TextConditioner | None = None,
        sampler: Sampler | None = None,
        patchifier: Patchifier | None = None,
        data_shape: Sequence[int] | None = None,
        steps: int = 30,
        guidance: float = 1.0,
        start: Literal["noise", "sample"] = "noise",
        empty_uncond: Literal["prompt", "zeros"] = "prompt",
    ) -> None:
        super().__init__()
        if getattr(denoiser, "prediction", None) not in ("epsilon", "x0", "v", "flow"):
            raise TypeError(
                "Pipeline: the denoiser needs a 'prediction' attribute: 'epsilon', 'x0', 'v' "
                "or 'flow'"
            )
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"Pipeline: steps must be an int of at least 1, got {steps!r}")
        if not (isinstance(guidance, int | float) and 0 <= guidance < float("inf")):
            raise ValueError(f"Pipeline: guidance must be a finite number >= 0, got {guidance!r}")
        self.schedule = schedule
        self.denoiser = denoiser
        self.encoder = encoder
        self.text = text
        self.sampler = sampler
        self.patchifier = patchifier
        self.data_shape = tuple(int(s) for s in data_shape) if data_shape is not None else None
        self.steps = steps
        self.guidance = float(guidance)
        if start not in ("noise", "sample"):
            raise ValueError(f"Pipeline: start must be 'noise' or 'sample', got {start!r}")
        self.start: Literal["noise", "sample"] = start
        if empty_uncond not in ("prompt", "zeros"):
            raise ValueError(
                f"Pipeline: empty_uncond must be 'prompt' or 'zeros', got {empty_uncond!r}"
            )
        self.empty_uncond: Literal["prompt", "zeros"] = empty_uncond

    @classmethod
    def from_config(
        cls, config: PipelineConfig | Mapping[str, Any] | str | os.PathLike[str]
    ) -> "Pipeline":
        """Each part built by the registry of its group (fresh weights); see ``diffkit.build``."""
        parsed = parse_config(config)

        def part(name: str) -> Any:
            value = getattr(parsed, name)
            return None if value is None else registry(GROUPS[name]).build(value)

        return cls(
            part("schedule"),
            part("denoiser"),
            encoder=part("encoder"),
            text=part("text"),
            sampler=part("sampler"),
            patchifier=part("patchifier"),
            data_shape=parsed.data_shape,
            steps=parsed.steps,
            guidance=parsed.guidance,
            start=parsed.start,
            empty_uncond=parsed.empty_uncond,
        )

    @property
    def config(self) -> PipelineConfig:
        """The [`PipelineConfig`][diffkit.pipeline_config.PipelineConfig] of the parts, now.

        Each part gives its registered config: a part that is a config (a schedule, a
        sampler, a patchifier) is itself, a network its ``.config``. A ``ValueError``
        names a part that has none (register its config class), or a missing
        ``data_shape``.
        """
        return self._config("Pipeline.config")

    def _config(self, where: str) -> PipelineConfig:
        if self.data_shape is None:
            raise ValueError(f"{where}: data_shape is not set; pass data_shape= to Pipeline")
        parts = {name: _registered_config(where, name, getattr(self, name)) for name in PARTS}
        return PipelineConfig.model_validate(
            {
                **parts,
                "data_shape": self.data_shape,
                "steps": self.steps,
                "guidance": self.guidance,
                "start": self.start,
                "empty_uncond": self.empty_uncond,
            }
        )

    def replace(self, **parts: Any) -> "Pipeline":
        """A new pipeline with some parts replaced; the others (their weights too) are shared.

        Keywords: any of ``schedule``, ``denoiser``, ``encoder``, ``text``, ``sampler``,
        ``patchifier``, ``data_shape``, ``steps``, ``guidance``, ``start``, ``empty_uncond``;
        ``None`` removes an optional part. ``pipeline.replace(sampler=DDIM(eta=0.5)).save(dir)``.
        """
        names = (*PARTS, "data_shape", "steps", "guidance", "start", "empty_uncond")
        unknown = sorted(set(parts) - set(names))
        if unknown:
            raise TypeError(
                f"Pipeline.replace: no part named {', '.join(map(repr, unknown))}; the parts "
                f"are {', '.join(names)}"
            )
        given = {name: getattr(self, name) for name in names} | parts
        new = type(self)(given.pop("schedule"), given.pop("denoiser"), **given)
        new.training = self.training  # the shared modules keep their own modes
        return new

    def __repr__(self) -> str:
        parts = [f"schedule={type(self.schedule).__name__}"]
        for name in ("denoiser", "encoder", "text", "sampler", "patchifier"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={type(value).__name__}")
        return f"Pipeline({', '.join(parts)}, data_shape={self.data_shape})"

    # ------------------------------------------------------------------ placement

    @property
    def device(self) -> torch.device:
        """The device of the first parameter or buffer (CPU when there are none)."""
        for tensor in [*self.parameters(), *self.buffers()]:
            return tensor.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the denoiser's first floating-point parameter (float32 if none)."""
        module = self.denoiser if isinstance(self.denoiser, nn.Module) else self
        for p in module.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def latent_shape(self) -> tuple[int, ...]:
        """The shape (without batch) the denoiser works on: the encoder's latent shape."""
        if self.data_shape is None:
            raise ValueError("Pipeline: data_shape is not set; pass data_shape= or noise=")
        if self.encoder is None:
            return self.data_shape
        return tuple(self.encoder.latent_shape(self.data_shape))

    # ------------------------------------------------------------------ latent space

    @checked
    def encode(self, x: Data) -> Latents:
        """Data ``(b, [f,] c, h, w)`` to (scaled) latents; the identity in pixel space."""
        return x if self.encoder is None else self.encoder.encode(x)

    @checked
    def decode(self, z: Latents) -> Data:
        """Latents back to data; the identity in pixel space."""
        return z if self.encoder is None else self.encoder.decode(z)

    # ------------------------------------------------------------------ conditioning

    def condition(self, prompts: Sequence[str]) -> Conditioning:
        """The text conditioner's [`Conditioning`][diffkit.protocols.Conditioning] for prompts."""
        if self.text is None:
            raise ValueError("Pipeline: prompts need a text conditioner; pass cond= instead")
        _check_prompts("prompts", prompts)
        if isinstance(prompts, str):
            prompts = [prompts]
        return self.text.condition(list(prompts))

    def _conditions(
        self,
        where: str,
        asked: _Asked,
        batch: int | None,
        guidance: float,
        batch_from: str = "num_samples",
        guidance_given: bool = False,
    ) -> tuple[int, _Conds]:
        """The batch and the expanded conditions; ``batch_from`` names what set ``batch``.

        ``uncond`` / ``negative_prompts`` that cannot take effect are refused (on an
        unconditional call, both at once, negative prompts without a text conditioner);
        with ``guidance == 1`` they are dropped with a ``UserWarning``.
        """
        self._refuse_conflicts(where, asked)
        prompts, cond, uncond, negative_prompts = asked
        negative = "uncond" if uncond is not None else "negative_prompts"
        if isinstance(prompts, str):
            prompts = [prompts]
        if prompts is None and cond is None:
            self._refuse_unconditional_guidance(where, negative, uncond, negative_prompts)
            if guidance_given and guidance != 1.0:
                raise ValueError(
                    f"{where}: guidance={guidance:g} has no effect on an unconditional call "
                    "(no prompts or cond, so nothing to guide towards); pass prompts= or "
                    "cond=, or leave guidance out"
                )
            # Unconditional: nothing to guide towards; a text model's unconditional
            # branch is the empty prompt (what condition dropout trained it on).
            guidance = 1.0
            if self.text is not None:
                prompts = [""]
        elif guidance == 1.0 and (uncond is not None or negative_prompts is not None):
            warn_unused(where, negative)
            uncond = negative_prompts = None
        given = f"{len(prompts)} prompts" if prompts is not None else "cond"
        if prompts is not None:
            cond = self.condition(prompts)
        size = cond.batch_size if cond is not None else None
        if batch is None:
            batch = size if size is not None else 1
        elif size not in (None, 1, batch):
            raise _batch_error(batch_from, batch, given, size)
        if cond is not None:
            cond = cond.expand(batch)
        if guidance != 1.0 and uncond is None:
            if negative_prompts is None and self.text is None:
                raise ValueError(
                    f"{where}: guidance != 1 needs an unconditional condition: pass uncond= "
                    "(or use a text conditioner)"
                )
            empty = negative_prompts is None
            if isinstance(negative_prompts, str) or negative_prompts is None:
                negative_prompts = [negative_prompts or ""]
            uncond = self.condition(negative_prompts)
            if empty and self.empty_uncond == "zeros":
                uncond = _zeros(uncond)
            given = f"{len(negative_prompts)} negative_prompts"
        else:
            given = "uncond"
        size = uncond.batch_size if uncond is not None else None
        if uncond is not None and size not in (None, 1, batch):
            raise _batch_error("the batch", batch, given, size)
        if uncond is not None:
            uncond = uncond.expand(batch)
        return batch, _Conds(cond=cond, uncond=uncond, guidance=guidance)

    def _refuse_conflicts(self, where: str, asked: _Asked) -> None:
        """Arguments that cannot be given together, or without a text conditioner."""
        prompts, cond, uncond, negative_prompts = asked
        _check_prompts("prompts", prompts)
        _check_prompts("negative_prompts", negative_prompts)
        if prompts is not None and cond is not None:
            raise ValueError(f"{where}: pass prompts or cond, not both")
        if uncond is not None and negative_prompts is not None:
            raise ValueError(
                f"{where}: pass uncond or negative_prompts, not both (negative_prompts only "
                "make an uncond)"
            )
        if negative_prompts is not None and self.text is None:
            raise ValueError(
                f"{where}: negative_prompts need a text conditioner; pass uncond= instead"
            )

    def _refuse_unconditional_guidance(
        self,
        where: str,
        negative: str,
        uncond: Conditioning | None,
        negative_prompts: Sequence[str] | str | None,
    ) -> None:
        """An unconditional call has nothing to guide: an uncond there would be ignored."""
        if uncond is None and negative_prompts is None:
            return
        fix = (
            "pass prompts= (prompts='' guides away from the negative prompts alone)"
            if self.text is not None
            else "pass cond="
        )
        raise ValueError(
            f"{where}: {negative} has no effect on an unconditional call (no prompts "
            f"or cond, so no guidance); {fix}, or leave {negative} out"
        )

    def _sampler(self, sampler: Sampler | str | None) -> Sampler:
        if isinstance(sampler, str):
            return _sampler_by_name(sampler)
        if sampler is not None:
            return sampler
        return self.sampler if self.sampler is not None else _default_sampler()

    def _defaults(self, steps: int | None, guidance: float | None) -> tuple[int, float]:
        if steps is not None and steps > MAX_STEPS:
            raise ValueError(
                f"steps {steps} is more than diffkit.pipeline_config.MAX_STEPS ({MAX_STEPS:,})"
            )
        if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
            raise ValueError(f"guidance must be finite and at least 0, got {guidance}")
        return (self.steps if steps is None else steps), (
            self.guidance if guidance is None else guidance
        )

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str] | str | None = None,
        *,
        cond: Conditioning | None = None,
        uncond: Conditioning | None = None,
        negative_prompts: Sequence[str] | str | None = None,
        num_samples: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        sampler: Sampler | str | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        denoiser: Denoiser | None = None,
        decode: bool = True,
        callback: StepCallback | None = None,
    ) -> Sample:
        """Sample ``(batch, *data_shape)`` (or latents with ``decode=False``).

        Conditioned on ``prompts`` (through the text conditioner) or on ``cond``; with
        neither, unconditional (a text pipeline then uses the empty prompt, without
        guidance: the config's default guidance is not applied, and an explicit
        ``guidance != 1`` is refused). ``guidance != 1`` uses classifier-free guidance against
        ``uncond`` or ``negative_prompts`` (one of them; default: the empty prompt). With
        ``guidance == 1`` they are unused, and a ``UserWarning`` says so; on an
        unconditional call they are refused. ``sampler`` is a Sampler, a name in
        ``diffkit.samplers.REGISTRY``, or the pipeline's default. ``noise`` (standard
        normal, the latent shape's rank and channels; its height and width may differ)
        replaces the draw from ``generator``; ``denoiser`` replaces the pipeline's (e.g.
        EMA weights).
        """
        if num_samples is not None:
            if isinstance(num_samples, bool) or not isinstance(num_samples, int):
                raise TypeError(
                    f"Pipeline.generate: num_samples must be an int, got "
                    f"{type(num_samples).__name__} {num_samples!r}"
                )
            if num_samples < 1:
                raise ValueError(
                    f"Pipeline.generate: num_samples must be at least 1, got {num_samples}"
                )
        guidance_given = guidance is not None
        steps, guidance = self._defaults(steps, guidance)
        batch_from = "num_samples"
        if noise is not None:
            self._check_noise(noise, num_samples)
            if num_samples is None:
                num_samples, batch_from = int(noise.shape[0]), "noise's batch"
        batch, conds = self._conditions(
            "Pipeline.generate",
            _Asked(prompts, cond, uncond, negative_prompts),
            num_samples,
            guidance,
            batch_from,
            guidance_given,
        )
        if noise is None:
            noise = self._noise(batch, generator)
        else:
            noise = noise.to(self.device, self.dtype)
        conds = _with_micro(conds, lambda: self._micro(noise), noise)
        z = self._sampler(sampler).sample(
            denoiser if denoiser is not None else self.denoiser,
            self.schedule,
            noise,
            steps=steps,
            generator=generator,
            callback=callback,
            **conds,
            **({"start": "sample"} if self.start == "sample" else {}),
        )
        return self.decode(z) if decode else z

    @torch.no_grad()
    def extend(
        self,
        prompts: Sequence[str] | str | None = None,
        *,
        frames: int,
        overlap: int,
        first: Tensor | None = None,
        cond: Conditioning | None = None,
        uncond: Conditioning | None = None,
        negative_prompts: Sequence[str] | str | None = None,
        num_samples: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        sampler: Sampler | str | None = None,
        generator: torch.Generator | None = None,
        decode: bool = True,
        reconstruction: float = 4.0,
    ) -> Sample:
        """A video of ``frames`` latent frames, longer than the window ``data_shape`` trains.

        The window is the latent shape's frame count; each new window overlaps the clip's
        last ``overlap`` latent frames and is conditioned on them by
        [`extend_video`][diffkit.samplers.extend_video] (VDM replacement with
        reconstruction guidance of weight ``reconstruction``), in latent space.
        ``first`` (latents ``(batch, f, *frame)``) continues a clip; otherwise the first
        window is ``generate``'s. Prompts, conditions, guidance and sampler as ``generate``.
        """
        from diffkit.samplers.extend import extend_video  # lazily, as the samplers are

        latent = self.latent_shape()
        if len(latent) != 4:
            raise ValueError(f"Pipeline.extend: needs a video pipeline, latent shape {latent}")
        steps, scale = self._defaults(steps, guidance)
        asked = _Asked(prompts, cond, uncond, negative_prompts)
        if first is None:
            first = self.generate(
                prompts,
                cond=cond,
                uncond=uncond,
                negative_prompts=negative_prompts,
                num_samples=num_samples,
                steps=steps,
                guidance=guidance,
                sampler=sampler,
                generator=generator,
                decode=False,
            )
        first = first.to(self.device, self.dtype)
        where, batch = "Pipeline.extend", int(first.shape[0])
        _, conds = self._conditions(where, asked, batch, scale, "first", guidance is not None)
        z = extend_video(
            self._sampler(sampler),
            self.denoiser,
            self.schedule,
            first,
            window=latent[0],
            overlap=overlap,
            total_frames=frames,
            steps=steps,
            generator=generator,
            reconstruction=reconstruction,
            **conds,
        )
        return self.decode(z) if decode else z

    def _check_noise(self, noise: Tensor, num_samples: int | None) -> None:
        """``noise`` must be a floating-point batch of latents, of ``num_samples`` when given.

        Its rank and channels must be the latent shape's (every denoiser would fail on
        others); its spatial size (and frames) is not checked: a convolutional denoiser
        can deliberately sample at another resolution than ``data_shape``, and a
        patch-based one names a size its patches do not divide.
        """
        _check_floating("Pipeline.generate", "noise", noise)
        if noise.device.type == "meta":
            raise ValueError("Pipeline.generate: noise is on the meta device (it holds no values)")
        if noise.ndim < 2:
            raise ValueError(
                f"Pipeline.generate: noise must be (batch, *latent), got {noise.shape}"
            )
        if num_samples is not None and noise.shape[0] != num_samples:
            raise ValueError(
                f"Pipeline.generate: noise has batch {noise.shape[0]} but num_samples is "
                f"{num_samples}"
            )
        latent = self.latent_shape() if self.data_shape is not None else None
        space = "the encoder's latent" if self.encoder is not None else "data_shape's"
        if latent is not None and noise.ndim != 1 + len(latent):
            raise ShapeError(
                f"Pipeline.generate: noise has {noise.ndim} dimensions {tuple(noise.shape)}, "
                f"expected {1 + len(latent)}: (batch, *{latent}), {space} shape; pass noise "
                f"of shape (batch, {', '.join(map(str, latent))})"
            )
        if latent is not None and len(latent) >= 3:
            channels: int | None = latent[-3]
        elif latent is None and self.encoder is not None and noise.ndim >= 4:
            channels = int(self.encoder.latent_channels)
        else:
            channels = None
        if channels is not None and noise.shape[-3] != channels:
            shape = f" (shape {latent})" if latent is not None else ""
            raise ShapeError(
                f"Pipeline.generate: noise has {_channels(noise.shape[-3])} (dimension "
                f"{noise.ndim - 3} of {tuple(noise.shape)}), expected {channels}: {space} "
                f"channels{shape}; pass noise with {_channels(channels)} (its height and "
                "width may differ)"
            )

    def _check_data(self, x: Tensor) -> None:
        """``x`` must have the rank and channels of ``data_shape`` (its spatial size may differ)."""
        if self.data_shape is None:
            return
        shape = self.data_shape
        if x.ndim != 1 + len(shape):
            raise ShapeError(
                f"Pipeline.img2img: x has {x.ndim} dimensions {tuple(x.shape)}, expected "
                f"{1 + len(shape)}: (batch, *{shape}), data_shape; pass x of shape "
                f"(batch, {', '.join(map(str, shape))})"
            )
        if len(shape) >= 3 and x.shape[-3] != shape[-3]:
            raise ShapeError(
                f"Pipeline.img2img: x has {_channels(x.shape[-3])} (dimension {x.ndim - 3} of "
                f"{tuple(x.shape)}), expected {shape[-3]}: data_shape's channels (shape "
                f"{shape}); pass x with {_channels(shape[-3])} (its height and width may differ)"
            )

    def _micro(self, latents: Tensor) -> list[float] | None:
        """The denoiser's default micro-conditions for the images ``latents`` decode to."""
        factor = 1
        if self.encoder is not None and self.data_shape is not None:
            factor = self.data_shape[-1] // self.latent_shape()[-1]  # the encoder's downsampling
        height, width = (int(n) * factor for n in latents.shape[-2:])
        return _default_micro(self.denoiser, height, width)

    def _noise(self, batch: int, generator: torch.Generator | None) -> Tensor:
        shape = (batch, *self.latent_shape())
        device = generator.device if generator is not None else self.device
        noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        return noise.to(self.device, self.dtype)

    @torch.no_grad()
    def img2img(
        self,
        x: Sample,
        prompts: Sequence[str] | str | None = None,
        *,
        strength: float = 0.6,
        cond: Conditioning | None = None,
        uncond: Conditioning | None = None,
        negative_prompts: Sequence[str] | str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        sampler: Sampler | str | None = None,
        generator: torch.Generator | None = None,
        denoiser: Denoiser | None = None,
        decode: bool = True,
    ) -> Sample:
        """Noise data ``x`` to time ``t0 = strength`` and denoise from there in ``steps`` steps.

        ``x_t0 = alpha(t0) encode(x) + sigma(t0) eps``; ``strength = 1`` starts from (almost)
        pure noise, small strengths keep more of ``x``. Works with every sampler: the
        schedule and the denoiser are seen on ``[0, t0]`` stretched to ``[0, 1]``, and ``x``
        is noised to the first time of the sampler's grid there (``t0 * t_max`` for a
        spacing with ``t_max < 1``, ``t0 * times[0]`` for explicit times). ``x``
        must have ``data_shape``'s rank and channels (its height and width may differ);
        conditions and guidance are as in ``generate``.
        """
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength (the start time t0) must be in (0, 1], got {strength}")
        guidance_given = guidance is not None
        steps, guidance = self._defaults(steps, guidance)
        _check_floating("Pipeline.img2img", "x", x)  # uint8 in [0, 255] must not pass as floats
        self._check_data(x)
        x = x.to(self.device, self.dtype)
        batch, conds = self._conditions(
            "Pipeline.img2img",
            _Asked(prompts, cond, uncond, negative_prompts),
            int(x.shape[0]),
            guidance,
            "x's batch",
            guidance_given,
        )
        z0 = self.encode(x)
        conds = _with_micro(conds, lambda: self._micro(z0), z0)
        device = generator.device if generator is not None else z0.device
        eps = torch.randn(z0.shape, generator=generator, device=device, dtype=torch.float32)
        eps = eps.to(z0.device, z0.dtype)
        chosen = self._sampler(sampler)
        truncated = _Truncated(self.schedule, float(strength))
        # The sampler starts at the first time of its grid on [0, strength] (strength *
        # t_max, or an explicit spacing's first time), scaling its noise by sigma there:
        # noise x to exactly that time.
        t_first = float(strength) * _first_time(chosen, truncated, steps, z0.device)
        t0 = torch.full((batch,), t_first, dtype=torch.float64, device=z0.device)
        z_t = add_noise(self.schedule, z0, eps, t0.to(z0.dtype))
        sigma0 = self.schedule.sigma(t0).to(z0.dtype)
        start = z_t / sigma0.reshape(-1, *([1] * (z_t.ndim - 1)))  # the sampler scales by sigma
        z = chosen.sample(
            _TimeScaled(denoiser if denoiser is not None else self.denoiser, float(strength)),
            truncated,
            start,
            steps=steps,
            generator=generator,
            **conds,
        )
        return self.decode(z) if decode else z

    @checked
    def add_noise(self, x0: Sample, t: Time, generator: torch.Generator | None = None) -> Sample:
        """``x_t = alpha(t) x0 + sigma(t) eps`` with ``eps`` drawn from ``generator``."""
        device = generator.device if generator is not None else x0.device
        eps = torch.randn(x0.shape, generator=generator, device=device, dtype=torch.float32)
        return add_noise(self.schedule, x0, eps.to(x0.device, x0.dtype), t)

    # ------------------------------------------------------------------ files

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``config.json``, ``model.safetensors`` (and tokenizer files) to ``directory``.

        Every file is written in full to a temporary file beside it first, and only then
        are they all moved into place: a save that fails (disk full, Ctrl-C) leaves a
        pipeline already there intact. The weights record the config they were saved with,
        so that ``load`` notices a ``config.json`` that is not theirs.
        """
        live = self._config("Pipeline.save")  # refuses before anything is written
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        config, copies = self._config_with_tokenizer_files(folder, live)
        text = config.to_json() + "\n"
        metadata = {"format": FORMAT, CONFIG_KEY: text}
        mixed = _mixed_modules(self)
        if mixed:
            metadata[MIXED_KEY] = json.dumps(mixed)
        # Moved into place in the reverse order of entering: weights, tokenizer, config.
        with contextlib.ExitStack() as stack:
            config_tmp = stack.enter_context(atomic_write(folder / CONFIG_FILE))
            for source, target in copies:
                shutil.copyfile(source, stack.enter_context(atomic_write(target)))
            weights_tmp = stack.enter_context(atomic_write(folder / WEIGHTS_FILE))
            _save_tensors(weights_tmp, self.state_dict(), metadata)
            config_tmp.write_text(text, encoding="utf-8")
        return folder

    def _config_with_tokenizer_files(
        self, folder: Path, config: Any
    ) -> tuple[Config, list[tuple[Path, Path]]]:
        """``config`` with its tokenizer files inside ``folder``, and the files to copy there."""
        text_config = getattr(config, "text", None)
        if not isinstance(text_config, Config):
            return config, []
        copies: list[tuple[Path, Path]] = []
        text = _files_inside(text_config, folder, TOKENIZER_DIR, copies)
        return config.model_copy(update={"text": text}), copies

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> "Pipeline":
        """Rebuild a saved pipeline: its config, then its weights (checked, never unpickled).

        Each module comes back in the floating dtype it was saved in (a bfloat16 pipeline
        loads as bfloat16); ``dtype=`` casts the loaded pipeline to another one.

        A folder from someone else is safe to load: every file it names is a regular file
        inside it, read up to a limit ([`diffkit.files`][diffkit.files]); the networks are
        built on the meta device first, their size checked against ``MAX_PARAMETERS`` and
        the weights' names, shapes and dtypes against them, before memory is allocated.
        Every refusal is one ``CheckpointError`` line (a bad config: ``ValidationError``).
        safetensors has no checksum: a flipped bit that leaves a weight finite is not seen.
        """
        folder = Path(directory)
        config_path = folder / CONFIG_FILE
        if not os.path.lexists(config_path):
            raise CheckpointError(f"{folder} holds no {CONFIG_FILE}; is it a saved pipeline?")
        try:
            config_path = confined(folder, CONFIG_FILE)
            raw = read_bytes(config_path)
            weights_path = confined(folder, WEIGHTS_FILE)
        except UnreadableFileError as err:
            raise CheckpointError(f"{folder} is not a readable saved pipeline: {err}") from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise CheckpointError(f"{config_path} is not a text file (UTF-8 JSON)") from None
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{config_path} is not valid JSON: {err}") from None
        except RecursionError:
            raise CheckpointError(f"{config_path} is nested too deeply") from None
        if not isinstance(data, dict):
            raise CheckpointError(
                f"{config_path} does not hold a JSON object (the pipeline config), got "
                f"{type(data).__name__}"
            )
        specs, metadata = read_header(weights_path)  # names, shapes, dtypes: no data yet
        if metadata.get("format") not in (FORMAT, None):
            raise CheckpointError(f"{weights_path} is not a diffkit pipeline file")
        _check_saved_together(folder, data, metadata.get(CONFIG_KEY))
        if isinstance(data.get("text"), dict):
            # the only other files a folder names: regular files inside it, read bounded
            data["text"] = _confined_files(folder, data["text"], f"{config_path}: text")
        huge = _huge_integers(data)
        if huge:
            raise CheckpointError(f"{config_path}: sizes no machine can hold: {', '.join(huge)}")
        where = str(weights_path)
        check_dtypes(specs, what=where, mixed=_recorded_mixed(metadata))
        parsed = parse_config(data)
        try:
            # Built on the meta device first: sizes and the weights' names, shapes and
            # dtypes are checked before any memory is allocated.
            with torch.device("meta"):
                probe = cls.from_config(parsed)
            _check_sizes(probe, parsed, str(config_path))
            _to_stored_dtypes(probe, specs)
            check_loadable(probe, specs, what=where)
            del probe
            tensors, _ = load_tensors(weights_path)
            pipeline = cls.from_config(parsed).eval()
        except UnreadableFileError as err:  # the tokenizer's file
            raise CheckpointError(f"{config_path}: a tokenizer file: {err}") from None
        except (OverflowError, MemoryError) as err:
            raise CheckpointError(f"{config_path}: sizes no machine can hold: {err}") from None
        _to_stored_dtypes(pipeline, tensors)
        load_state_dict(pipeline, tensors, what=where)
        if device is not None or dtype is not None:
            pipeline.to(device=device, dtype=dtype)
        return pipeline.eval()
