"""Runtime shape checks: readable errors naming argument and dimension; the off switch."""

import os
import subprocess
import sys

import pytest
import torch

import diffkit as dk
from diffkit.typing import CHECKS_ENABLED, checked


@checked
def _f(x: dk.typing.Image, t: dk.typing.Time) -> dk.typing.Image:
    return x


def test_checks_are_on_by_default() -> None:
    assert CHECKS_ENABLED or os.environ.get("DIFFKIT_SHAPE_CHECKS") == "0"


def test_error_names_argument_and_mismatched_dimension() -> None:
    with pytest.raises(
        dk.ShapeError, match=r"_f: argument 't' dimension 'batch' is 3, but 'batch' is 2"
    ):
        _f(torch.zeros(2, 1, 4, 4), torch.zeros(3))


def test_error_for_wrong_rank_and_dtype() -> None:
    with pytest.raises(
        dk.ShapeError, match=r"argument 'x' has 3 dimensions \(2, 4, 4\), expected 4"
    ):
        _f(torch.zeros(2, 4, 4), torch.zeros(2))
    with pytest.raises(dk.ShapeError, match=r"argument 'x' has dtype torch.int64"):
        _f(torch.zeros(2, 1, 4, 4, dtype=torch.long), torch.zeros(2))
    with pytest.raises(dk.ShapeError, match=r"argument 't' must be a tensor"):
        _f(torch.zeros(2, 1, 4, 4), 0.5)  # type: ignore[arg-type]


def test_shape_error_is_both_type_and_value_error() -> None:
    assert issubclass(dk.ShapeError, TypeError) and issubclass(dk.ShapeError, ValueError)


def test_environment_variable_turns_checks_off() -> None:
    code = (
        "import torch, diffkit as dk\n"
        "from diffkit.schedules import LinearBeta\n"
        "print(dk.typing.CHECKS_ENABLED)\n"
        "LinearBeta().alpha(torch.zeros(2, 3))\n"
        "print('no error')\n"
    )
    env = {**os.environ, "DIFFKIT_SHAPE_CHECKS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "no", "error"]


def test_conditioning_validates_its_fields() -> None:
    with pytest.raises(dk.ShapeError, match="batch size"):
        dk.Conditioning(tokens=torch.zeros(2, 3, 4), pooled=torch.zeros(3, 4))
    with pytest.raises(dk.ShapeError, match="'mask' shape"):
        dk.Conditioning(tokens=torch.zeros(2, 3, 4), mask=torch.ones(2, 4, dtype=torch.bool))
    c = dk.Conditioning(tokens=torch.ones(1, 3, 4))
    assert c.expand(5).batch_size == 5
    assert c.cat(c).batch_size == 2
    with pytest.raises(dk.ShapeError, match="one side only"):
        c.cat(dk.Conditioning(pooled=torch.ones(1, 2)))
