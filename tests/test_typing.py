"""Runtime shape checks: readable errors naming argument and dimension; the off switch."""

import math
import os
import subprocess
import sys
import threading

import pytest
import torch

import diffkit as dk
from diffkit.typing import CHECKS_ENABLED, checked, checked_layer, trusted


@checked
def _f(x: dk.typing.Image, t: dk.typing.Time) -> dk.typing.Image:
    return x


@checked_layer
def _layer(x: dk.typing.Image) -> dk.typing.Image:
    return x[:, :, :1]  # returns the wrong shape: only a check of the return value sees it


@checked
def _model(x: dk.typing.Image, t: dk.typing.Time) -> dk.typing.Pooled:
    return _layer(x).flatten(1)


needs_checks = pytest.mark.skipif(not CHECKS_ENABLED, reason="shape checks are off")


@needs_checks
def test_layer_checks_on_its_own_but_not_inside_a_checked_call() -> None:
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(dk.ShapeError, match="_layer: the return value"):
        _layer(x)
    # Inside a checked call the layer runs unchecked: the model's boundary already checked.
    assert _model(x, torch.zeros(2)).shape == (2, 4)
    # The model's own arguments are still checked, and the depth is restored after an error.
    with pytest.raises(dk.ShapeError, match="'batch' is 3"):
        _model(x, torch.zeros(3))
    with pytest.raises(dk.ShapeError, match="_layer: the return value"):
        _layer(x)


@needs_checks
def test_nesting_depth_is_per_thread() -> None:
    errors: list[BaseException] = []
    inside = threading.Event()
    release = threading.Event()

    @checked
    def _hold(x: dk.typing.Image) -> dk.typing.Image:
        inside.set()
        release.wait(10)
        return x

    holder = threading.Thread(target=_hold, args=(torch.zeros(1, 1, 2, 2),))
    holder.start()
    inside.wait(10)

    def _other() -> None:
        try:
            _layer(torch.zeros(1, 1, 4, 4))
        except BaseException as err:
            errors.append(err)

    other = threading.Thread(target=_other)
    other.start()
    other.join(10)
    release.set()
    holder.join(10)
    # Another thread being inside a checked call must not switch this thread's checks off.
    assert len(errors) == 1 and isinstance(errors[0], dk.ShapeError)


@needs_checks
def test_trusted_block_skips_checks_on_its_thread_only_and_ends_with_the_block() -> None:
    bad = torch.zeros(2, 1, 4, 4), torch.zeros(3)  # 'batch' 2 vs 3
    seen_by_other: list[BaseException] = []

    def _other() -> None:
        try:
            _f(*bad)
        except BaseException as err:
            seen_by_other.append(err)

    with trusted():
        assert _f(*bad) is bad[0]
        other = threading.Thread(target=_other)
        other.start()
        other.join(10)
    assert len(seen_by_other) == 1 and isinstance(seen_by_other[0], dk.ShapeError)
    with pytest.raises(dk.ShapeError, match="'batch' is 3"):
        _f(*bad)
    with pytest.raises(RuntimeError), trusted():  # the block ends even on an error
        raise RuntimeError
    with pytest.raises(dk.ShapeError):
        _f(*bad)


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


def test_host_range_reads_cpu_tensors_only() -> None:
    assert dk.typing.host_range(torch.tensor([3, -1, 2])) == (-1.0, 3.0)
    low, high = dk.typing.host_range(torch.tensor([0.5, float("nan")]))  # type: ignore[misc]
    assert math.isnan(low) and math.isnan(high)
    assert dk.typing.host_range(torch.empty(0)) is None
    assert dk.typing.host_range(torch.zeros(2, device="meta")) is None  # no read-back


def test_an_int_goes_where_a_float_is_annotated_but_not_a_str() -> None:
    """PEP 484's numeric tower, as static checkers read it (``scale=3`` was a ShapeError)."""
    cond, uncond = torch.randn(2, 3), torch.zeros(2, 3)
    guided = dk.guidance.classifier_free(cond, uncond, scale=3)
    assert torch.equal(guided, dk.guidance.classifier_free(cond, uncond, scale=3.0))
    with pytest.raises(dk.ShapeError, match="'scale'"):
        dk.guidance.classifier_free(cond, uncond, scale="3")  # pyright: ignore[reportArgumentType]
