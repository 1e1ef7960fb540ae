"""``PipelineConfig`` and ``build(config) -> Pipeline``: assemble a pipeline from configs.

A [`PipelineConfig`][diffkit.builder.PipelineConfig] names one config per part
(schedule, denoiser, optional encoder, text conditioner, patchifier, the default
sampler) plus the data shape and the default number of steps and guidance scale. Each
part is parsed through the registry of its group in ``diffkit.config.REGISTRIES``
(``"schedule"``, ``"denoiser"``, ``"encoder"``, ``"text_conditioner"``, ``"sampler"``,
``"patchifier"``), so a kind a user registered is accepted exactly like a built-in one.

Validating a ``PipelineConfig`` checks that the parts fit together, before any weight
exists, and names the fields that disagree:

- the data channels are the encoder's input and output channels;
- the encoder's latent channels are the denoiser's input (and output) channels;
- the data height and width are multiples of the encoder's downsampling factor, and
  the latent grid a multiple of the denoiser's downsampling factor and patch sizes;
- the text conditioner's token width is the denoiser's ``context_dim`` (cross-attention)
  and its pooled width the denoiser's ``pooled_dim``;
- videos go to a denoiser with 3-D patches, images to one without;
- the denoiser's prediction type is one the loss and the samplers know.

Fields are read from the part configs by name (``in_channels``, ``latent_channels``,
``context_dim``, ``patch_size``, ``downsampling_factor``, ...), so a user's config that
uses the same names is checked too; a check whose fields a config lacks is skipped.
"""

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, SerializeAsAny, field_validator, model_validator

from diffkit.config import REGISTRIES, Config, Registry
from diffkit.patches import SpatialPatches, TubeletPatches
from diffkit.protocols import Patchifier

if TYPE_CHECKING:
    from diffkit.pipeline import Pipeline

__all__ = [
    "PATCHIFIERS",
    "PipelineConfig",
    "SpatialPatchesConfig",
    "TubeletPatchesConfig",
    "build",
    "registry",
]

PREDICTIONS = ("epsilon", "x0", "v", "flow")

if TYPE_CHECKING:
    AnyConfig = Config
else:
    AnyConfig = Annotated[Config, SerializeAsAny()]
    """A component config of any registered kind, serialised with all of its own fields."""


class SpatialPatchesConfig(Config):
    """2-D patches of images: [`SpatialPatches`][diffkit.patches.SpatialPatches]."""

    kind: Literal["spatial_patches"] = "spatial_patches"
    patch_size: tuple[int, int] = Field(
        default=(2, 2), description="patch (height, width) in pixels"
    )

    @field_validator("patch_size", mode="before")
    @classmethod
    def _pair(cls, value: Any) -> Any:
        return (value, value) if isinstance(value, int) else value

    @model_validator(mode="after")
    def _positive(self) -> "SpatialPatchesConfig":
        if min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be positive, got {self.patch_size}")
        return self


class TubeletPatchesConfig(Config):
    """3-D tubelets of videos: [`TubeletPatches`][diffkit.patches.TubeletPatches]."""

    kind: Literal["tubelet_patches"] = "tubelet_patches"
    patch_size: tuple[int, int, int] = Field(
        default=(1, 2, 2), description="tubelet (frames, height, width)"
    )

    @model_validator(mode="after")
    def _positive(self) -> "TubeletPatchesConfig":
        if min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be positive, got {self.patch_size}")
        return self


PATCHIFIERS: Registry[Patchifier] = (
    REGISTRIES["patchifier"] if "patchifier" in REGISTRIES else Registry("patchifier")
)
"""Patchifiers by config ``kind``."""
PATCHIFIERS.register(SpatialPatchesConfig, lambda c: SpatialPatches(c.patch_size))
PATCHIFIERS.register(TubeletPatchesConfig, lambda c: TubeletPatches(c.patch_size))

# field of PipelineConfig -> registry group
GROUPS: dict[str, str] = {
    "schedule": "schedule",
    "denoiser": "denoiser",
    "encoder": "encoder",
    "text": "text_conditioner",
    "sampler": "sampler",
    "patchifier": "patchifier",
}


def _load_builtin_groups() -> None:
    """Import the modules that register the built-in components (each registers on import)."""
    import importlib

    for module in ("diffkit.schedules", "diffkit.nn", "diffkit.text", "diffkit.samplers"):
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
    steps: int = Field(default=30, ge=1, description="default number of sampling steps")
    guidance: float = Field(default=1.0, ge=0, description="default classifier-free guidance scale")

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


def _get(config: Config | None, *names: str) -> Any:
    """The first of ``names`` that ``config`` has (attribute or property) and is not None."""
    if config is None:
        return None
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def _text_dims(text: Config | None) -> tuple[int | None, int | None]:
    """(token width, pooled width) of a text conditioner config, when it says."""
    if text is None:
        return None, None
    token = _get(text, "token_dim")
    pooled = _get(text, "pooled_dim")
    tower = _get(text, "text")  # diffkit's CLIP conditioner nests its tower config
    if token is None and isinstance(tower, Config):
        token = _get(tower, "width")
    if pooled is None and token is not None:
        project = bool(_get(text, "project_pooled"))
        pooled = _get(text, "projection_dim") if project else token
    return token, pooled


def _patch(config: Config | None) -> tuple[int, ...] | None:
    size = _get(config, "patch_size")
    if size is None:
        return None
    return (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)


def compatibility_problems(config: PipelineConfig) -> list[str]:
    """Every way the parts of ``config`` disagree, each naming the fields (empty: they fit)."""
    problems: list[str] = []
    den, enc, text = config.denoiser, config.encoder, config.text
    shape = config.data_shape
    video = len(shape) == 4
    channels, height, width = shape[-3:]

    # data -> encoder -> latent
    enc_in = _get(enc, "in_channels", "channels")
    if enc_in is not None and enc_in != channels:
        problems.append(
            f"data_shape has {channels} channels but "
            f"encoder.{_name(enc, 'in_channels', 'channels')} is {enc_in}"
        )
    enc_out = _get(enc, "out_channels")
    if enc_out is not None and enc_out != channels:
        problems.append(
            f"data_shape has {channels} channels but encoder.out_channels is {enc_out} (the "
            "decoder would give samples of another shape)"
        )
    latent_channels = _get(enc, "latent_channels", "channels") if enc is not None else channels
    factor = int(_get(enc, "downsampling_factor") or 1)
    for name, size in (("height", height), ("width", width)):
        if size % factor:
            problems.append(
                f"data_shape {name} {size} is not a multiple of encoder.downsampling_factor "
                f"{factor}"
            )
    lh, lw = height // factor, width // factor

    # latent -> denoiser
    den_in = _get(den, "in_channels", "channels")
    den_out = _get(den, "out_channels") or den_in
    where = "encoder.latent_channels" if enc is not None else "data_shape channels"
    if latent_channels is not None and den_in is not None and den_in != latent_channels:
        problems.append(
            f"{where} is {latent_channels} but denoiser.{_name(den, 'in_channels', 'channels')} "
            f"is {den_in}"
        )
    if latent_channels is not None and den_out is not None and den_out != latent_channels:
        problems.append(f"{where} is {latent_channels} but denoiser.out_channels is {den_out}")
    den_factor = _get(den, "downsampling_factor")
    if den_factor is not None:
        for name, size in (("height", lh), ("width", lw)):
            if size % int(den_factor):
                problems.append(
                    f"the latent {name} {size} is not a multiple of "
                    f"denoiser.downsampling_factor {den_factor} (from denoiser.channel_mult)"
                )
    for owner, part in (("denoiser", den), ("patchifier", config.patchifier)):
        patch = _patch(part)
        if patch is None:
            continue
        if len(patch) == 3 and not video:
            problems.append(
                f"{owner}.patch_size {patch} is a 3-D tubelet but data_shape {shape} is an image"
            )
            continue
        if len(patch) == 2 and video and owner == "denoiser":
            problems.append(
                f"{owner}.patch_size {patch} is 2-D but data_shape {shape} is a video; use a "
                "video denoiser"
            )
            continue
        sizes = [("height", lh, patch[-2]), ("width", lw, patch[-1])]
        if len(patch) == 3:
            sizes.insert(0, ("frames", shape[0], patch[0]))
        for name, size, p in sizes:
            if size % p:
                problems.append(
                    f"the latent {name} {size} is not a multiple of {owner}.patch_size {p}"
                )
    if video and getattr(den, "kind", None) == "unet":
        problems.append(f"data_shape {shape} is a video but denoiser.kind 'unet' takes images")

    # text -> cross-attention
    token_dim, pooled_dim = _text_dims(text)
    context_dim = _get(den, "context_dim", "cross_attention_dim")
    den_pooled = _get(den, "pooled_dim")
    if text is not None and token_dim is not None:
        if context_dim is None and den_pooled is None:
            problems.append(
                "a text conditioner is set but the denoiser has neither context_dim nor "
                "pooled_dim to take it"
            )
        if context_dim is not None and context_dim != token_dim:
            problems.append(
                f"text token width (text.{_text_field(text)}) is {token_dim} but "
                f"denoiser.context_dim is {context_dim}"
            )
        if den_pooled is not None and pooled_dim is not None and den_pooled != pooled_dim:
            problems.append(
                f"text pooled width is {pooled_dim} but denoiser.pooled_dim is {den_pooled}"
            )

    # prediction type for the loss and the samplers
    prediction = _get(den, "prediction")
    if prediction is not None and prediction not in PREDICTIONS:
        problems.append(
            f"denoiser.prediction '{prediction}' is not one the loss knows: {PREDICTIONS}"
        )
    t_max = _get(_get(config.sampler, "spacing"), "t_max")
    if prediction == "epsilon" and (t_max is None or t_max >= 1.0):
        alpha_end = _alpha_at_one(config.schedule)
        if alpha_end == 0.0:
            problems.append(
                f"denoiser.prediction 'epsilon' cannot recover the data at t = 1, where "
                f"schedule.kind '{getattr(config.schedule, 'kind', '?')}' has alpha = 0 "
                "(zero terminal SNR); use prediction 'v', 'x0' or 'flow', or a sampler "
                "spacing with t_max < 1"
            )
    return problems


def _alpha_at_one(schedule: Config) -> float | None:
    """``alpha(1)`` of a schedule config (schedules hold no weights, so building is cheap)."""
    import torch

    try:
        built = registry("schedule").build(schedule)
        return float(built.alpha(torch.ones(1, dtype=torch.float64))[0])
    except Exception:  # a user schedule that cannot be evaluated here is checked when used
        return None


def _name(config: Config | None, *names: str) -> str:
    for name in names:
        if getattr(config, name, None) is not None:
            return name
    return names[0]


def _text_field(text: Config) -> str:
    return "token_dim" if getattr(text, "token_dim", None) is not None else "text.width"


def build(config: "PipelineConfig | Mapping[str, Any] | str | os.PathLike[str]") -> "Pipeline":
    """Build the [`Pipeline`][diffkit.pipeline.Pipeline] a config describes (fresh weights).

    ``config`` may also be a mapping, JSON / YAML text, or a ``pathlib.Path`` to a JSON /
    YAML file (a plain ``str`` is always text); it is validated (parts checked against
    each other) before any component is built.
    """
    from diffkit.pipeline import Pipeline

    parsed = parse_config(config)
    schedule = registry("schedule").build(parsed.schedule)
    denoiser = registry("denoiser").build(parsed.denoiser)
    encoder = registry("encoder").build(parsed.encoder) if parsed.encoder is not None else None
    text = registry("text_conditioner").build(parsed.text) if parsed.text is not None else None
    sampler = registry("sampler").build(parsed.sampler) if parsed.sampler is not None else None
    patchifier = (
        registry("patchifier").build(parsed.patchifier) if parsed.patchifier is not None else None
    )
    return Pipeline(
        schedule,
        denoiser,
        encoder=encoder,
        text=text,
        sampler=sampler,
        patchifier=patchifier,
        data_shape=parsed.data_shape,
        config=parsed,
    ).eval()


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


def to_yaml(config: Config) -> str:
    """A config as YAML text (the inverse of ``parse_config`` for pipelines); needs PyYAML."""
    try:
        import yaml
    except ImportError:
        raise ImportError(f"to_yaml: {_NO_YAML.replace('reading', 'writing')}") from None

    return yaml.safe_dump(config.to_dict(), sort_keys=False)
