"""The config base and registries: strict, frozen, JSON round-trip, user kinds."""

import math
from collections.abc import Callable
from typing import Annotated, Literal

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


class _OuterConfig(Config):
    kind: Literal["outer"] = "outer"
    toy: _ToyConfig = Field(default_factory=_ToyConfig, description="a nested section")
    part: Annotated[_ToyConfig | _OtherConfig, Field(discriminator="kind")] = Field(
        default_factory=_OtherConfig, description="a discriminated union"
    )


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


def test_a_component_registered_without_a_builder_is_its_config() -> None:
    registry: Registry[Config] = Registry("toy_components_for_tests")
    assert registry.register(_ToyConfig) is _ToyConfig
    component = _ToyConfig(width=5)
    assert registry.build(component) is component  # building is parsing
    assert registry.build(component.to_json()) == component
    assert registry.build({"kind": "toy"}) == _ToyConfig()


def test_duplicate_kinds_and_unknown_kinds_are_errors() -> None:
    registry = _registry()

    class Clash(Config):
        kind: Literal["toy"] = "toy"

    with pytest.raises(ValueError, match="already registered"):
        registry.register(Clash, lambda c: 0)
    registry.register(Clash, lambda c: 0, replace=True)
    with pytest.raises(ValueError, match="unknown toy_group_for_tests kind 'zzz'") as info:
        registry.parse({"kind": "zzz"})
    assert "registry('toy_group_for_tests').register(YourConfig)" in str(info.value)
    with pytest.raises(ValueError, match="needs a 'kind'"):
        registry.parse({"width": 3})
    with pytest.raises(ValueError, match="not a registered"):
        registry.parse(_OtherConfig())


def test_a_bare_kind_string_says_a_mapping_is_expected() -> None:
    with pytest.raises(ValueError, match=r"mapping with a 'kind' field, e\.g\. \{kind: toy\}"):
        _registry().parse("toy")
    with pytest.raises(ValueError, match=r"e\.g\. \{kind: toy\}.*got the string 'not json'"):
        _registry().parse("not json")


def _errors(make: Callable[[], object]) -> list[tuple[tuple[str | int, ...], str, str]]:
    with pytest.raises(ValidationError) as info:
        make()
    return [(e["loc"], e["type"], e["msg"]) for e in info.value.errors()]


def test_a_misspelled_field_suggests_the_closest_one() -> None:
    from diffkit.training import TrainConfig

    did_you_mean = "unknown field 'stpes' for TrainConfig; did you mean 'steps'?"
    # pydantic's location and error type, with a message that says what was meant
    assert _errors(lambda: TrainConfig(stpes=10)) == [(("stpes",), "extra_forbidden", did_you_mean)]  # type: ignore[call-arg]
    with pytest.raises(ValidationError) as info:
        TrainConfig.model_validate({"stpes": 10})
    assert info.value.errors()[0].get("ctx") == {
        "field": "stpes",
        "model": "TrainConfig",
        "suggestion": "steps",
    }
    assert _errors(lambda: TrainConfig.model_validate({"stpes": 10})) == _errors(
        lambda: TrainConfig.model_validate_json('{"stpes": 10}')
    )
    assert _errors(lambda: _ToyConfig(widht=3, Width=4)) == [  # type: ignore[call-arg]
        (
            ("widht",),
            "extra_forbidden",
            "unknown field 'widht' for _ToyConfig; did you mean 'width'?",
        ),
        (
            ("Width",),
            "extra_forbidden",
            "unknown field 'Width' for _ToyConfig; did you mean 'width'?",
        ),
    ]
    ((loc, _, message),) = _errors(lambda: _registry().parse({"kind": "toy", "widht": 3}))
    assert loc == ("widht",) and message.endswith("did you mean 'width'?")


def test_a_misspelled_nested_field_keeps_its_path() -> None:
    toy = "unknown field 'widht' for _ToyConfig; did you mean 'width'?"
    assert _errors(lambda: _OuterConfig.model_validate({"toy": {"widht": 3}})) == [
        (("toy", "widht"), "extra_forbidden", toy)
    ]
    # a discriminated union: the class the 'kind' names suggests, the tag is in the path
    assert _errors(lambda: _OuterConfig.model_validate({"part": {"kind": "toy", "widht": 3}})) == [
        (("part", "toy", "widht"), "extra_forbidden", toy)
    ]
    # a typo beside other mistakes in sibling sections: each is still reported
    errors = _errors(lambda: _OuterConfig.model_validate({"toy": {"widht": 3}, "part": 1}))
    assert [loc for loc, _, _ in errors] == [("toy", "widht"), ("part",)]


def test_a_far_off_name_gets_no_wrong_suggestion() -> None:
    from diffkit.training import TrainConfig

    # few fields: they are listed; many: the message says where they are documented
    assert _errors(lambda: _ToyConfig(colour="red")) == [  # type: ignore[call-arg]
        (
            ("colour",),
            "extra_forbidden",
            "unknown field 'colour' for _ToyConfig; its fields are kind, width",
        )
    ]
    ((_, _, message),) = _errors(lambda: TrainConfig(zebra_count=1))  # type: ignore[call-arg]
    assert "did you mean" not in message
    assert message.startswith(
        "unknown field 'zebra_count' for TrainConfig; see diffkit.training.TrainConfig for its "
    )


def test_valid_and_non_mapping_inputs_validate_as_before() -> None:
    # valid input is untouched; instances and non-mappings get pydantic's own handling,
    # and only the unknown field, not its valid neighbours, is named
    config = _OuterConfig.model_validate({"toy": {"width": 3}, "part": {"kind": "toy"}})
    assert config == _OuterConfig(toy=_ToyConfig(width=3), part=_ToyConfig())
    assert _OuterConfig.model_validate(config) is config
    assert _OuterConfig.model_validate({"toy": _ToyConfig(width=2)}).toy.width == 2
    assert [kind for _, kind, _ in _errors(lambda: _ToyConfig.model_validate([1]))] == [
        "model_type"
    ]
    assert _errors(lambda: _ToyConfig.model_validate({"width": 2, "widht": 2})) == [
        (
            ("widht",),
            "extra_forbidden",
            "unknown field 'widht' for _ToyConfig; did you mean 'width'?",
        )
    ]
