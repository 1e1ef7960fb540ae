"""Prediction conversions: every pair round-trips, for every schedule, and matches the maths."""

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import diffkit as dk
from diffkit.prediction import PREDICTIONS, convert, from_x0_eps, to_x0_eps
from diffkit.schedules import EDM, Cosine, Discrete, LinearBeta, RectifiedFlow, discrete_betas

SCHEDULES = [
    LinearBeta(),
    Cosine(),
    EDM(),
    RectifiedFlow(),
    Discrete.from_betas(discrete_betas("linear_beta", 1000)),
]
PAIRS = list(itertools.product(PREDICTIONS, PREDICTIONS))


@pytest.mark.parametrize(("source", "target"), PAIRS)
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: type(s).__name__)
@given(t=st.floats(0.02, 0.98), seed=st.integers(0, 2**16))
def test_conversions_round_trip_for_every_pair_and_schedule(
    source: str, target: str, schedule: dk.NoiseSchedule, t: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64).unbind(1)
    tt = torch.full((3,), t, dtype=torch.float64)
    a, s = schedule.alpha(tt), schedule.sigma(tt)
    x_t = a[:, None, None] * x0 + s[:, None, None] * eps
    pred = from_x0_eps(x0, eps, source, a, s)  # type: ignore[arg-type]
    there = convert(pred, source, target, x_t, a, s)  # type: ignore[arg-type]
    back = convert(there, target, source, x_t, a, s)  # type: ignore[arg-type]
    torch.testing.assert_close(back, pred, rtol=1e-9, atol=1e-9)
    # and the converted prediction is the right one for (x0, eps)
    expected = from_x0_eps(x0, eps, target, a, s)  # type: ignore[arg-type]
    torch.testing.assert_close(there, expected, rtol=1e-8, atol=1e-8)


def test_definitions_of_v_and_flow() -> None:
    x0, eps = torch.randn(2, 5, 3, dtype=torch.float64).unbind(0)
    a = torch.tensor([0.6] * 5, dtype=torch.float64)
    s = torch.tensor([0.8] * 5, dtype=torch.float64)
    torch.testing.assert_close(from_x0_eps(x0, eps, "v", a, s), 0.6 * eps - 0.8 * x0)
    torch.testing.assert_close(from_x0_eps(x0, eps, "flow", a, s), eps - x0)
    got_x0, got_eps = to_x0_eps(0.6 * eps - 0.8 * x0, "v", 0.6 * x0 + 0.8 * eps, a, s)
    torch.testing.assert_close(got_x0, x0)
    torch.testing.assert_close(got_eps, eps)


def test_low_precision_predictions_are_converted_in_the_schedule_precision() -> None:
    x_t = torch.randn(2, 3).to(torch.bfloat16)
    a = torch.tensor([0.999, 0.5], dtype=torch.float64)
    s = (1 - a**2).sqrt()
    x0, _ = to_x0_eps(torch.zeros_like(x_t), "epsilon", x_t, a, s)
    assert x0.dtype == torch.float64
    assert convert(torch.zeros_like(x_t), "epsilon", "x0", x_t, a, s).dtype == torch.bfloat16


def test_unknown_prediction_kind_is_rejected_by_name() -> None:
    x = torch.zeros(2, 3)
    a = torch.ones(2)
    with pytest.raises((ValueError, TypeError), match=r"target|kind|Literal"):
        convert(x, "epsilon", "score", x, a, a)  # type: ignore[arg-type]


def test_batch_mismatch_names_argument_and_dimension() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(dk.ShapeError, match=r"'alpha' dimension 'batch' is 4"):
        convert(x, "epsilon", "x0", x, torch.ones(4), torch.ones(4))
