"""Strict pydantic configs and the ``kind`` -> class registries every component uses.

Each component has one config class: a frozen pydantic model that forbids unknown
fields, with a short ``kind: Literal[...]`` discriminator. A
[`Registry`][diffkit.config.Registry] per component group (schedules, denoisers,
samplers, ...) maps each ``kind`` to its config class and to the function that
builds the component from it. User code registers its own components the same way.
"""

import json
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["REGISTRIES", "SEED_MAX", "Config", "Registry", "ValidationError", "kind_of"]

SEED_MAX = 2**63 - 1
"""The largest seed a config takes: torch's generators take up to ``2**64 - 1`` and recipes
add small offsets (``seed + 31``, ``seed + epoch``) to theirs."""


class Config(BaseModel):
    """Base of every diffkit config: immutable, unknown fields are errors, floats finite."""

    # NaN and inf are refused in every float field: no component takes them, and JSON
    # would write them as null, so a saved config would not load again.
    model_config = ConfigDict(
        frozen=True, extra="forbid", validate_default=True, allow_inf_nan=False
    )

    # Subclasses declare ``kind: Literal["name"] = "name"``; the base leaves it undeclared
    # so that each subclass can narrow it.
    group: ClassVar[str] = ""

    def to_json(self) -> str:
        """Serialise to JSON (``kind`` included), the inverse of ``Registry.parse``."""
        return self.model_dump_json(indent=2)

    def to_dict(self) -> dict[str, Any]:
        """Serialise to plain Python data (``kind`` included)."""
        return self.model_dump(mode="json")


C = TypeVar("C", bound=Config)


def kind_of(config: Config) -> str:
    """The ``kind`` discriminator of a config (every registered config declares one)."""
    kind = getattr(config, "kind", None)
    if not isinstance(kind, str):
        raise ValueError(f"{type(config).__name__} has no 'kind' field")
    return kind


T = TypeVar("T")


class Registry(Generic[T]):
    """Maps ``kind`` to a config class and to a builder ``config -> component``."""

    def __init__(self, group: str) -> None:
        self.group = group
        self._configs: dict[str, type[Config]] = {}
        self._builders: dict[str, Callable[[Any], T]] = {}
        REGISTRIES[group] = self

    def register(
        self, config_cls: type[C], builder: Callable[[C], T], *, replace: bool = False
    ) -> type[C]:
        """Register ``config_cls`` (its ``kind`` default names it) with its builder."""
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
                f"unknown {self.group} kind '{kind}'; known kinds: {', '.join(self.kinds)}"
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
            raise ValueError(f"a {self.group} config needs a 'kind' field (one of {self.kinds})")
        return self.config_class(kind).model_validate(dict(data))

    def build(self, config: "Config | Mapping[str, Any] | str") -> T:
        """Build the component a config describes (a config, a dict or a JSON string)."""
        parsed = self.parse(config)
        return self._builders[kind_of(parsed)](parsed)


REGISTRIES: dict[str, Registry[Any]] = {}
"""Every component group's registry, by group name ("schedule", "sampler", ...)."""
