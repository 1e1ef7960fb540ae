"""Strict pydantic configs and the ``kind`` -> class registries every component uses.

Each component has one config class: a frozen pydantic model that forbids unknown
fields (a misspelled one is a ``ValidationError`` that suggests the field meant), with a
short ``kind: Literal[...]`` discriminator. A
[`Registry`][diffkit.config.Registry] per component group (schedules, denoisers,
samplers, ...) maps each ``kind`` to its config class. A component that is not a network
(a schedule, a loss, a patchifier) *is* its config: the class holds its fields, its
validation and its behaviour, and building it is parsing it. A network is built from
its config by a registered function and keeps that config as ``module.config``. User
code registers its own components the same way.
"""

import difflib
import json
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Generic, NoReturn, TypeVar, cast

from pydantic import (
    AliasChoices,
    AliasPath,
    BaseModel,
    ConfigDict,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

__all__ = [
    "MAX_PARAMETERS",
    "REGISTRIES",
    "SEED_MAX",
    "Config",
    "NetworkConfig",
    "Registry",
    "ValidationError",
    "field_error",
    "kind_of",
    "whole",
]

SEED_MAX = 2**63 - 1
"""The largest seed a config takes: torch's generators take up to ``2**64 - 1`` and recipes
add small offsets (``seed + 31``, ``seed + epoch``) to theirs."""

MAX_PARAMETERS = 50_000_000_000
"""The most parameters (and buffer elements) a network or a loaded pipeline may have: 50
billion, 200 GB in float32. A [`NetworkConfig`][diffkit.config.NetworkConfig] whose
parameter count, estimated from its fields, is larger is refused when it is validated;
[`Pipeline.load`][diffkit.pipeline.Pipeline.load] also counts the network it builds on the
meta device before allocating anything."""

_LIST_FIELDS_UP_TO = 10
"""An unknown field with no close match lists the valid ones when there are at most this many."""


def _field_keys(model: type[BaseModel]) -> list[str]:
    """The keys a model's input may use: field names and their (validation) aliases."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        keys.append(name)
        aliases = [field.alias, field.validation_alias]
        if isinstance(field.validation_alias, AliasChoices):
            aliases.extend(field.validation_alias.choices)
        for alias in aliases:
            if isinstance(alias, AliasPath):
                alias = alias.path[0]
            if isinstance(alias, str) and alias not in keys:
                keys.append(alias)
    return keys


def _unknown_field_error(model: type[BaseModel], key: str, keys: list[str]) -> PydanticCustomError:
    """``unknown field 'stpes' for TrainConfig; did you mean 'steps'?``, or where to look."""
    close = difflib.get_close_matches(key, keys, n=1)
    if not close and key.lower() != key:  # 'Steps', 'LR'
        close = difflib.get_close_matches(key.lower(), keys, n=1)
    # pydantic fills the {placeholders} of these literal templates from the context
    context: dict[str, Any] = {"field": key, "model": model.__name__}
    if close:
        context["suggestion"] = close[0]
        template = "unknown field '{field}' for {model}; did you mean '{suggestion}'?"
    elif len(keys) <= _LIST_FIELDS_UP_TO:
        context["fields"] = ", ".join(keys)
        template = "unknown field '{field}' for {model}; its fields are {fields}"
    else:
        context["where"] = f"{model.__module__}.{model.__qualname__}"
        context["count"] = len(keys)
        template = "unknown field '{field}' for {model}; see {where} for its {count} fields"
    return PydanticCustomError("extra_forbidden", template, context)


_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1


class Config(BaseModel):
    """Base of every diffkit config: immutable, unknown fields are errors, floats finite.

    An unknown field keeps pydantic's ``extra_forbidden`` error type and location, with a
    message that suggests the closest field: ``unknown field 'stpes' for TrainConfig; did
    you mean 'steps'?``. With no close one it lists the fields, or names the class to read.
    """

    # NaN and inf are refused in every float field: no component takes them, and JSON
    # would write them as null, so a saved config would not load again.
    model_config = ConfigDict(
        frozen=True, extra="forbid", validate_default=True, allow_inf_nan=False
    )

    # Subclasses declare ``kind: Literal["name"] = "name"``; the base leaves it undeclared
    # so that each subclass can narrow it.
    group: ClassVar[str] = ""

    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown_fields(cls, data: Any) -> Any:
        """Each unknown key of a mapping is an error that suggests the closest field name."""
        if not isinstance(data, dict | Mapping):
            return data  # instances and non-mappings: pydantic's own checks
        fields = cls.__pydantic_fields__  # what ``model_fields`` returns, without its overhead
        if fields.keys() >= data.keys() or cls.model_config.get("extra") != "forbid":
            return data  # the common case, one set comparison; or a config open to extras
        unknown = [key for key in data if key not in fields]
        keys = _field_keys(cls)
        unknown = [key for key in unknown if key not in keys]
        if not unknown or not all(isinstance(key, str) for key in unknown):
            return data  # aliases only, or non-string keys (pydantic says "keys should be strings")
        errors: list[InitErrorDetails] = [
            {
                # the type and location of pydantic's own error, with a more helpful message
                "type": _unknown_field_error(cls, key, keys),
                "loc": (key,),
                "input": data[key],
            }
            for key in unknown
        ]
        raise ValidationError.from_exception_data(cls.__name__, errors)

    @model_validator(mode="before")
    @classmethod
    def _refuse_huge_ints(cls, data: Any) -> Any:
        """Integers a 64-bit tensor cannot hold (``2**63`` and up) are refused by field:
        valid to pydantic, they would fail later, inside torch or numpy."""
        if not isinstance(data, dict | Mapping):
            return data
        for key, value in data.items():
            values = value if isinstance(value, list | tuple) else (value,)
            for item in values:
                if isinstance(item, int) and not _INT_MIN <= item <= _INT_MAX:
                    message = f"{key} must fit in 64 bits (|value| < 2**63), got {item}"
                    raise field_error(cls.__name__, str(key), message, item)
        return data

    def to_json(self) -> str:
        """Serialise to JSON (``kind`` included), the inverse of ``Registry.parse``."""
        return self.model_dump_json(indent=2)

    def to_dict(self) -> dict[str, Any]:
        """Serialise to plain Python data (``kind`` included)."""
        return self.model_dump(mode="json")


def whole(value: float) -> int:
    """``int(value)``, and a number above every bound for a float too large to be finite."""
    return int(value) if math.isfinite(value) else 2**1024


def _magnitude(count: int) -> str:
    """``1.23e+12``; ``about 10^400`` for a count no float can hold."""
    return f"{count:.3g}" if count < 10**300 else f"about 10^{len(str(count)) - 1}"


class NetworkConfig(Config):
    """Base of a network's config: sizes no machine can build are refused by field.

    A subclass gives ``parameter_estimate``, a lower bound on its network's parameter
    count computed from the fields alone (nothing is built). A config whose estimate
    exceeds [`MAX_PARAMETERS`][diffkit.config.MAX_PARAMETERS] is a ``ValidationError``
    located at the field most responsible: the one whose default would shrink the
    estimate most. Numbers of blocks and levels have their own ``le=`` bounds, since each
    block is a Python object even on the meta device.
    """

    def parameter_estimate(self) -> int:
        """A lower bound on the number of parameters of the network this config builds."""
        raise NotImplementedError(f"{type(self).__name__} does not estimate its parameters")

    @model_validator(mode="after")
    def _refuse_unbuildable(self) -> Any:
        count = self.parameter_estimate()
        if count <= MAX_PARAMETERS:
            return self
        name = self._most_responsible_field()
        value = getattr(self, name)
        shown = value if len(str(value)) <= 40 else f"{str(value)[:40]}..."
        owner = type(self).__name__
        message = (
            f"{owner} would have at least {_magnitude(count)} parameters, more than "
            f"diffkit.config.MAX_PARAMETERS ({MAX_PARAMETERS:,}): {name}={shown} is too large"
        )
        raise field_error(owner, name, message, value)

    def _most_responsible_field(self) -> str:
        """The field whose default value would shrink ``parameter_estimate`` the most."""
        best, least = "", None
        for name, info in type(self).model_fields.items():
            if name == "kind" or info.is_required():
                continue
            default = info.get_default(call_default_factory=True)
            if getattr(self, name) == default:
                continue
            try:
                count = self.model_copy(update={name: default}).parameter_estimate()
            except (ValueError, TypeError, ArithmeticError, IndexError):
                continue
            if least is None or count < least:
                best, least = name, count
        return best or next(n for n in type(self).model_fields if n != "kind")


C = TypeVar("C", bound=Config)


def kind_of(config: Config) -> str:
    """The ``kind`` discriminator of a config (every registered config declares one)."""
    kind = getattr(config, "kind", None)
    if not isinstance(kind, str):
        raise ValueError(f"{type(config).__name__} has no 'kind' field")
    return kind


T = TypeVar("T")


def field_error(
    model: str, field: str | tuple[str, ...], message: str, value: Any
) -> ValidationError:
    """A ``ValidationError`` located at ``field`` (a name, or a path into nested configs),
    for a check across fields (a model validator), which pydantic would otherwise report
    with an empty location."""
    error = PydanticCustomError("value_error", "{message}", {"message": message})
    loc = (field,) if isinstance(field, str) else field
    return ValidationError.from_exception_data(model, [{"type": error, "loc": loc, "input": value}])


class Registry(Generic[T]):
    """Maps ``kind`` to a config class and, for networks, to a builder ``config -> module``."""

    def __init__(self, group: str) -> None:
        self.group = group
        self._configs: dict[str, type[Config]] = {}
        self._builders: dict[str, Callable[[Any], T] | None] = {}
        REGISTRIES[group] = self

    def register(
        self,
        config_cls: type[C],
        builder: Callable[[C], T] | None = None,
        *,
        replace: bool = False,
    ) -> type[C]:
        """Register ``config_cls`` (its ``kind`` default names it), with its builder if any.

        Without a builder the config *is* the component: ``build`` returns the parsed
        config itself (schedules, losses, patchifiers, samplers).
        """
        field = config_cls.model_fields.get("kind")
        kind = None if field is None else field.default
        if not isinstance(kind, str) or not kind:
            raise ValueError(
                f"{config_cls.__name__}: a registered config needs a default 'kind' string"
            )
        if kind in self._configs and not replace and self._configs[kind] is not config_cls:
            raise ValueError(
                f"{self.group}: kind '{kind}' is already registered to "
                f"{self._configs[kind].__name__}; pass replace=True to override"
            )
        self._configs[kind] = config_cls
        self._builders[kind] = builder
        return config_cls

    @property
    def kinds(self) -> list[str]:
        """The registered kinds, in registration order."""
        return list(self._configs)

    def config_class(self, kind: str) -> type[Config]:
        """The config class registered for ``kind``."""
        try:
            return self._configs[kind]
        except KeyError:
            raise ValueError(
                f"unknown {self.group} kind '{kind}'; known kinds: {', '.join(self.kinds)}. "
                f"A kind of your own must be registered in this process first: "
                f"diffkit.builder.registry('{self.group}').register(YourConfig)"
            ) from None

    def parse(self, data: "Config | Mapping[str, Any] | str") -> Config:
        """Validate a dict / JSON string / config into the config class its ``kind`` names."""
        if isinstance(data, Config):
            if self._configs.get(kind_of(data)) is not type(data):
                raise ValueError(
                    f"{type(data).__name__} is not a registered {self.group} config "
                    f"(known kinds: {', '.join(self.kinds)})"
                )
            return data
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except json.JSONDecodeError:
                example = data if data in self._configs else (self.kinds or ["..."])[0]
                raise ValueError(
                    f"a {self.group} config must be a mapping with a 'kind' field, e.g. "
                    f"{{kind: {example}}}, or its JSON text; got the string {data!r}"
                ) from None
        if not isinstance(data, Mapping):
            raise ValueError(f"a {self.group} config must be a mapping with a 'kind' field")
        kind = data.get("kind")
        if not isinstance(kind, str):
            self._kind_error(
                f"a {self.group} config needs a 'kind' field (one of {self.kinds})", kind
            )
        try:
            cls = self.config_class(kind)
        except ValueError as err:
            self._kind_error(str(err), kind)
        return cls.model_validate(dict(data))

    def _kind_error(self, message: str, kind: Any) -> NoReturn:
        """A bad ``kind`` is a ``ValidationError`` (a ``ValueError``) located at ``kind``."""
        raise field_error(f"{self.group} config", "kind", message, kind) from None

    def build(self, config: "Config | Mapping[str, Any] | str") -> T:
        """Build the component a config describes (a config, a dict or a JSON string).

        A component registered without a builder is its config: that config is returned.
        """
        parsed = self.parse(config)
        builder = self._builders[kind_of(parsed)]
        return cast("T", parsed) if builder is None else builder(parsed)


REGISTRIES: dict[str, Registry[Any]] = {}
"""Every component group's registry, by group name ("schedule", "sampler", ...)."""
