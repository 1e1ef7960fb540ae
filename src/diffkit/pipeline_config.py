"""``PipelineConfig``: the parts of a pipeline as configs, checked against each other.

A [`PipelineConfig`][diffkit.pipeline_config.PipelineConfig] names one config per part
(schedule, denoiser, optional encoder, text conditioner, patchifier, the default
sampler) plus the data shape and the default number of steps and guidance scale. Each
part is parsed through the registry of its group in ``diffkit.config.REGISTRIES``
(``"schedule"``, ``"denoiser"``, ``"encoder"``, ``"text_conditioner"``, ``"sampler"``,
``"patchifier"``), so a kind a user registered is accepted exactly like a built-in one.
[`diffkit.build`][diffkit.builder.build] turns one into a
[`Pipeline`][diffkit.pipeline.Pipeline], and ``pipeline.config`` gives it back.

Validating a ``PipelineConfig`` checks that the parts fit together, before any weight
exists, and names the fields that disagree:

- the data channels are the encoder's input and output channels;
- the encoder's latent channels are the denoiser's input (and output) channels;
- the data height and width are multiples of the encoder's downsampling factor, and
  the latent grid a multiple of the denoiser's downsampling factor and patch sizes;
- the text conditioner's token width is the denoiser's ``context_dim`` (cross-attention)
  and its pooled width the denoiser's ``pooled_dim``;
- videos go to a video denoiser, images to an image one;
- the denoiser's prediction type is one the loss and the samplers know.

The checks read only what each part's config declares: the properties of
[`DenoiserSpec`][diffkit.protocols.DenoiserSpec],
[`EncoderSpec`][diffkit.protocols.EncoderSpec] and
[`TextSpec`][diffkit.protocols.TextSpec] (and the patchifier's ``patch_size``). A user's
config that declares them is checked like a built-in one; one that does not is accepted,
and the checks that need it are skipped.
"""

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple, Protocol, runtime_checkable

import torch
from pydantic import Field, SerializeAsAny, field_validator, model_validator

from diffkit.config import REGISTRIES, Config, Registry, kind_of
from diffkit.protocols import (
    DenoiserSpec,
    EncoderSpec,
    NoiseSchedule,
    Patchifier,
    TextSpec,
    VideoEncoderSpec,
)
from diffkit.typing import Prediction

__all__ = [
    "GROUPS",
    "PipelineConfig",
    "compatibility_problems",
    "parse_config",
    "registry",
    "to_yaml",
]

PREDICTIONS: tuple[Prediction, ...] = ("epsilon", "x0", "v", "flow")

if TYPE_CHECKING:
    AnyConfig = Config
else:
    AnyConfig = Annotated[Config, SerializeAsAny()]
    """A component config of any registered kind, serialised with all of its own fields."""

GROUPS: dict[str, str] = {
    "schedule": "schedule",
    "denoiser": "denoiser",
    "encoder": "encoder",
    "text": "text_conditioner",
    "sampler": "sampler",
    "patchifier": "patchifier",
}
"""Part of a pipeline (a ``PipelineConfig`` field) -> the registry group of its kinds."""

_BUILTIN_MODULES = (
    "diffkit.schedules",
    "diffkit.patches",
    "diffkit.losses",
    "diffkit.nn",
    "diffkit.text",
    "diffkit.samplers",
)


def _load_builtin_groups() -> None:
    """Import the modules that register the built-in components (each registers on import)."""
    import importlib

    for module in _BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ImportError:  # a part of the library that is not installed / not there yet
            continue


def registry(group: str) -> Registry[Any]:
    """The registry of a component group, e.g. ``registry("denoiser")``."""
    if group not in REGISTRIES:
        _load_builtin_groups()
    try:
        return REGISTRIES[group]
    except KeyError:
        raise ValueError(
            f"no component registry named '{group}'; known: {', '.join(sorted(REGISTRIES))}"
        ) from None


def _parse(group: str, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, Config | Mapping | str):
        return registry(group).parse(value)
    raise ValueError(
        f"expected a {group} config (a mapping with 'kind'), got {type(value).__name__}"
    )


MAX_STEPS = 10_000
"""The most sampling steps a pipeline config (or ``generate(steps=...)``) may ask for."""
MAX_DATA_ELEMENTS = 2**28
"""The most numbers in one sample, ``prod(data_shape)`` (2**28: e.g. 64 RGB frames of
1024 x 1364 pixels); larger samples are refused before anything is allocated."""


class PipelineConfig(Config):
    """The parts of a [`Pipeline`][diffkit.pipeline.Pipeline], each a registered config."""

    kind: Literal["pipeline"] = "pipeline"
    data_shape: tuple[int, ...] = Field(
        description="one sample without batch: (channels, height, width) for images, "
        "(frames, channels, height, width) for videos, in pixels"
    )
    schedule: AnyConfig = Field(description="the noise schedule (group 'schedule')")
    denoiser: AnyConfig = Field(description="the denoiser network (group 'denoiser')")
    encoder: AnyConfig | None = Field(
        default=None, description="latent encoder (group 'encoder'); None: diffusion in pixel space"
    )
    text: AnyConfig | None = Field(
        default=None, description="text conditioner (group 'text_conditioner'); None: no prompts"
    )
    sampler: AnyConfig | None = Field(
        default=None, description="default sampler (group 'sampler'); None: DPM-Solver++(2M)"
    )
    patchifier: AnyConfig | None = Field(
        default=None, description="patchifier (group 'patchifier') for token-level use of the data"
    )
    steps: int = Field(
        default=30, ge=1, le=MAX_STEPS, description="default number of sampling steps"
    )
    guidance: float = Field(default=1.0, ge=0, description="default classifier-free guidance scale")
    start: Literal["noise", "sample"] = Field(
        default="noise",
        description="what generate's standard normal noise is: 'noise' is scaled to sigma at "
        "the sampler's first time (diffkit's default); 'sample' is the first sample x_T "
        "itself (diffusers' DDIM / DPM-Solver / UniPC / flow pipelines start from their "
        "latents so)",
    )
    empty_uncond: Literal["prompt", "zeros"] = Field(
        default="prompt",
        description="the unconditional input of guidance without negative prompts: the empty "
        "prompt's conditioning, or zeros of its shape (SDXL's force_zeros_for_empty_prompt)",
    )

    @field_validator("schedule", "denoiser", mode="before")
    @classmethod
    def _parse_required(cls, value: Any, info: Any) -> Any:
        return _parse(GROUPS[info.field_name], value)

    @field_validator("encoder", "text", "sampler", "patchifier", mode="before")
    @classmethod
    def _parse_optional(cls, value: Any, info: Any) -> Any:
        return _parse(GROUPS[info.field_name], value)

    @field_validator("data_shape")
    @classmethod
    def _shape(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if len(value) not in (3, 4) or min(value) < 1:
            raise ValueError(
                "data_shape must be (channels, height, width) or (frames, channels, height, "
                f"width) of positive sizes, got {value}"
            )
        if math.prod(value) > MAX_DATA_ELEMENTS:
            raise ValueError(
                f"data_shape {value} holds {math.prod(value):,} numbers per sample, more than "
                f"diffkit.pipeline_config.MAX_DATA_ELEMENTS ({MAX_DATA_ELEMENTS:,})"
            )
        return value

    @model_validator(mode="after")
    def _parts_fit(self) -> "PipelineConfig":
        problems = compatibility_problems(self)
        if problems:
            raise ValueError("the pipeline's parts do not fit: " + "; ".join(problems))
        return self

    @property
    def is_video(self) -> bool:
        """Whether samples are videos ``(frames, channels, height, width)``."""
        return len(self.data_shape) == 4


class _Latent(NamedTuple):
    """What the denoiser works on; ``None``: unknown (an encoder that declares nothing)."""

    channels: int | None
    height: int | None
    width: int | None
    where: str  # how the latent channels are named in a message
    frames: int | None = None  # videos: latent frames (fewer where the encoder compresses time)


def compatibility_problems(config: PipelineConfig) -> list[str]:
    """Every way the parts of ``config`` disagree, each naming the fields (empty: they fit)."""
    latent = _latent(config)
    return [
        *_encoder_problems(config.data_shape, config.encoder),
        *_denoiser_problems(config, latent),
        *_patchifier_problems(config, latent),
        *_text_problems(config.denoiser, config.text),
        *_prediction_problems(config),
    ]


def _latent(config: PipelineConfig) -> _Latent:
    channels, height, width = config.data_shape[-3:]
    encoder = config.encoder
    frames = config.data_shape[0] if config.is_video else None
    if encoder is None:
        return _Latent(channels, height, width, "data_shape channels", frames)
    if not isinstance(encoder, EncoderSpec):
        return _Latent(None, None, None, "", frames)
    if frames is not None and isinstance(encoder, VideoEncoderSpec):
        frames = 1 + (frames - 1) // encoder.temporal_downsampling_factor
    factor = encoder.downsampling_factor
    return _Latent(
        encoder.latent_channels,
        height // factor,
        width // factor,
        "encoder.latent_channels",
        frames,
    )


def _encoder_problems(shape: tuple[int, ...], encoder: Config | None) -> list[str]:
    """Data -> encoder: channels in and out, and the downsampling of height and width."""
    if not isinstance(encoder, EncoderSpec):
        return []
    problems: list[str] = []
    channels, height, width = shape[-3:]
    if encoder.in_channels != channels:
        problems.append(
            f"data_shape has {channels} channels but encoder.in_channels is {encoder.in_channels}"
        )
    out = encoder.out_channels
    if out is not None and out != channels:
        problems.append(
            f"data_shape has {channels} channels but encoder.out_channels is {out} (the "
            "decoder would give samples of another shape)"
        )
    if len(shape) == 4 and isinstance(encoder, VideoEncoderSpec):
        r = encoder.temporal_downsampling_factor
        if (shape[0] - 1) % r:
            problems.append(
                f"data_shape has {shape[0]} frames but the encoder codes the first frame alone "
                f"and then groups of encoder.temporal_downsampling_factor {r}: frames must be "
                f"1 + {r} k"
            )
    factor = encoder.downsampling_factor
    sizes = [("height", height, factor), ("width", width, factor)]
    return problems + _not_multiples("data_shape", sizes, "encoder.downsampling_factor")


def _not_multiples(what: str, sizes: Iterable[tuple[str, int, int]], divisor: str) -> list[str]:
    """``{what} {name} {size} is not a multiple of {divisor} {d}`` for each ``(name, size, d)``
    whose ``size`` is not a multiple of ``d``."""
    return [
        f"{what} {name} {size} is not a multiple of {divisor} {d}"
        for name, size, d in sizes
        if size % d
    ]


def _denoiser_problems(config: PipelineConfig, latent: _Latent) -> list[str]:
    """Latent -> denoiser: channels, images or videos, and the latent grid."""
    den = config.denoiser
    if not isinstance(den, DenoiserSpec):
        return []
    problems: list[str] = []
    if latent.channels is not None:
        for field, value in (("in_channels", den.in_channels), ("out_channels", den.out_channels)):
            if value is not None and value != latent.channels:
                problems.append(
                    f"{latent.where} is {latent.channels} but denoiser.{field} is {value}"
                )
    shape = config.data_shape
    if config.is_video != den.is_video:
        data, takes = ("a video", "images") if config.is_video else ("an image", "videos")
        problems.append(
            f"data_shape {shape} is {data} but denoiser.kind '{kind_of(den)}' takes {takes}"
        )
        return problems
    if latent.height is not None and latent.width is not None:
        factor = den.downsampling_factor
        sizes = [("height", latent.height, factor), ("width", latent.width, factor)]
        problems += _not_multiples("the latent", sizes, "denoiser.downsampling_factor")
    patch = den.patch_size
    if latent.frames is not None and isinstance(patch, tuple):
        frames = [("frames", latent.frames, patch[0])]
        problems += _not_multiples("the latent", frames, "denoiser.patch_size")
    return problems


def _patchifier_problems(config: PipelineConfig, latent: _Latent) -> list[str]:
    """The patchifier's patches must tile the latent (frames, height, width)."""
    patchifier = config.patchifier
    if not isinstance(patchifier, Patchifier):
        return []
    patch, shape = tuple(patchifier.patch_size), config.data_shape
    if len(patch) == 3 and not config.is_video:
        return [
            f"patchifier.patch_size {patch} is a 3-D tubelet but data_shape {shape} is an image"
        ]
    if latent.height is None or latent.width is None:
        return []
    sizes = [("height", latent.height, patch[-2]), ("width", latent.width, patch[-1])]
    if len(patch) == 3:
        sizes.insert(0, ("frames", latent.frames or shape[0], patch[0]))
    return _not_multiples("the latent", sizes, "patchifier.patch_size")


def _text_problems(den: Config, text: Config | None) -> list[str]:
    """Text -> denoiser: token width to cross-attention, pooled width to the pooled input."""
    if not isinstance(text, TextSpec) or not isinstance(den, DenoiserSpec):
        return []
    if den.context_dim is None and den.pooled_dim is None:
        return [
            "a text conditioner is set but the denoiser has neither context_dim nor "
            "pooled_dim to take it"
        ]
    problems: list[str] = []
    if den.context_dim is not None and den.context_dim != text.token_dim:
        problems.append(
            f"text.token_dim (the text token width) is {text.token_dim} but "
            f"denoiser.context_dim is {den.context_dim}"
        )
    if den.pooled_dim is not None and den.pooled_dim != text.pooled_dim:
        problems.append(
            f"text.pooled_dim (the text pooled width) is {text.pooled_dim} but "
            f"denoiser.pooled_dim is {den.pooled_dim}"
        )
    return problems


@runtime_checkable
class _Spaced(Protocol):
    """A sampler config with a time spacing (every built-in sampler)."""

    @property
    def spacing(self) -> object: ...


@runtime_checkable
class _EndsBefore(Protocol):
    """A spacing that declares the largest time it starts from."""

    @property
    def t_max(self) -> float: ...


def _first_time(sampler: Config | None) -> float:
    """The largest time a sampler config starts from, as its spacing declares (else 1)."""
    spacing = sampler.spacing if isinstance(sampler, _Spaced) else None
    return float(spacing.t_max) if isinstance(spacing, _EndsBefore) else 1.0


def _prediction_problems(config: PipelineConfig) -> list[str]:
    """The prediction type must be known, and able to recover the data where sampling starts."""
    den, schedule = config.denoiser, config.schedule
    if not isinstance(den, DenoiserSpec):
        return []
    prediction = den.prediction
    if prediction not in PREDICTIONS:
        return [f"denoiser.prediction '{prediction}' is not one the loss knows: {PREDICTIONS}"]
    if prediction != "epsilon" or _first_time(config.sampler) < 1.0:
        return []
    if _alpha_at_one(schedule) != 0.0:
        return []
    return [
        f"denoiser.prediction 'epsilon' cannot recover the data at t = 1, where "
        f"schedule.kind '{kind_of(schedule)}' has alpha = 0 (zero terminal SNR); use "
        "prediction 'v', 'x0' or 'flow', or a sampler spacing with t_max < 1"
    ]


def _alpha_at_one(schedule: Config) -> float | None:
    """``alpha(1)`` of a schedule (a schedule is its config: nothing to build)."""
    if not isinstance(schedule, NoiseSchedule):
        return None
    try:
        return float(schedule.alpha(torch.ones(1, dtype=torch.float64))[0])
    except Exception:  # a user schedule that cannot be evaluated here is checked when used
        return None


_CONFIG_FILE_SUFFIXES = (".yaml", ".yml", ".json")


def parse_config(
    config: "PipelineConfig | Mapping[str, Any] | str | os.PathLike[str]",
) -> PipelineConfig:
    """A validated ``PipelineConfig`` from a config, a mapping, JSON / YAML text or a file.

    A ``pathlib.Path`` (any ``os.PathLike``) is read as a JSON / YAML file; a ``str`` is
    always the text itself, and one that reads as a file name is refused with the fix.
    """
    if isinstance(config, PipelineConfig):
        return config
    if isinstance(config, os.PathLike):
        path = Path(config)
        try:
            return parse_config(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"parse_config: {path} is not a text (JSON / YAML) file") from None
    if isinstance(config, str):
        data = _load_yaml(config)
        if data is None:
            raise ValueError("parse_config: the config text is empty (no YAML / JSON mapping)")
        if isinstance(data, str) and _looks_like_a_path(config):
            raise ValueError(
                f"parse_config: {config!r} looks like a file path; a str is the config's "
                f"YAML / JSON text: pass Path({config!r}) (or Path(...).read_text())"
            )
        return PipelineConfig.model_validate(data)
    if not isinstance(config, Mapping):
        raise TypeError(
            "a pipeline config must be a PipelineConfig, a mapping, JSON / YAML text or a "
            f"pathlib.Path, got {type(config).__name__}"
        )
    return PipelineConfig.model_validate(dict(config))


def _looks_like_a_path(text: str) -> bool:
    """Whether one-line config text is rather a file name (a config suffix, or a file)."""
    name = text.strip()
    if not name or "\n" in name:
        return False
    if name.lower().endswith(_CONFIG_FILE_SUFFIXES) or os.sep in name:
        return True
    try:
        return Path(name).exists()
    except (OSError, ValueError):
        return False


_NO_YAML = (
    "reading YAML needs PyYAML: pip install 'diffkit[demo]' (or pip install pyyaml); "
    "JSON configs need nothing"
)


def _load_yaml(text: str) -> Any:
    """YAML (a superset of JSON) text as data; without PyYAML, JSON text only."""
    try:
        import yaml
    except ImportError:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise ImportError(f"parse_config: {_NO_YAML}") from None
    return yaml.safe_load(text)


def to_yaml(config: Config) -> str:
    """A config as YAML text (the inverse of ``parse_config`` for pipelines); needs PyYAML."""
    try:
        import yaml
    except ImportError:
        raise ImportError(f"to_yaml: {_NO_YAML.replace('reading', 'writing')}") from None

    return yaml.safe_dump(config.to_dict(), sort_keys=False)
