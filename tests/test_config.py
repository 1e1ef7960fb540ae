"""The config base and registries: strict, frozen, JSON round-trip, user kinds."""

import math
from typing import Literal

import pytest
from pydantic import Field, ValidationError

from diffkit.config import REGISTRIES, Config, Registry, kind_of


class _ToyConfig(Config):
    kind: Literal["toy"] = "toy"
    width: int = Field(default=4, gt=0, description="width")


class _FloatConfig(Config):
    kind: Literal["floaty"] = "floaty"
    scale: float = Field(default=1.0, description="any finite number")
    limit: float | None = Field(default=None, description="optional")


class _OtherConfig(Config):
    kind: Literal["other"] = "other"


def _registry() -> Registry[int]:
    registry: Registry[int] = Registry("toy_group_for_tests")
    registry.register(_ToyConfig, lambda c: c.width)
    return registry


def test_configs_are_frozen_and_forbid_unknown_fields() -> None:
    config = _ToyConfig()
    with pytest.raises(ValidationError):
        config.width = 3  # type: ignore[misc]
    with pytest.raises(ValidationError, match="colour"):
        _ToyConfig(colour="red")  # type: ignore[call-arg]


def test_invalid_value_names_the_field() -> None:
    with pytest.raises(ValidationError, match="width"):
        _registry().parse({"kind": "toy", "width": -1})


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field", ["scale", "limit"])
def test_float_fields_must_be_finite(field: str, value: float) -> None:
    with pytest.raises(ValidationError, match=f"(?s){field}.*finite number"):
        _FloatConfig.model_validate({field: value})
    assert getattr(_FloatConfig.model_validate({field: -1e300}), field) == -1e300


def test_round_trip_through_json_and_dict() -> None:
    registry = _registry()
    config = _ToyConfig(width=7)
    assert registry.parse(config.to_json()) == config
    assert registry.parse(config.to_dict()) == config
    assert registry.build(config.to_dict()) == 7
    assert kind_of(config) == "toy"


def test_user_kinds_register_like_builtins_and_are_listed() -> None:
    registry = _registry()
    registry.register(_OtherConfig, lambda c: -1)
    assert registry.kinds == ["toy", "other"]
    assert registry.build({"kind": "other"}) == -1
    assert REGISTRIES["toy_group_for_tests"] is registry


def test_duplicate_kinds_and_unknown_kinds_are_errors() -> None:
    registry = _registry()

    class Clash(Config):
        kind: Literal["toy"] = "toy"

    with pytest.raises(ValueError, match="already registered"):
        registry.register(Clash, lambda c: 0)
    registry.register(Clash, lambda c: 0, replace=True)
    with pytest.raises(ValueError, match="unknown toy_group_for_tests kind 'zzz'"):
        registry.parse({"kind": "zzz"})
    with pytest.raises(ValueError, match="needs a 'kind'"):
        registry.parse({"width": 3})
    with pytest.raises(ValueError, match="not a registered"):
        registry.parse(_OtherConfig())


def test_a_bare_kind_string_says_a_mapping_is_expected() -> None:
    with pytest.raises(ValueError, match=r"mapping with a 'kind' field, e\.g\. \{kind: toy\}"):
        _registry().parse("toy")
    with pytest.raises(ValueError, match=r"e\.g\. \{kind: toy\}.*got the string 'not json'"):
        _registry().parse("not json")
