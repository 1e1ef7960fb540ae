"""Properties of every noise schedule: end points, monotonicity, inverses, Discrete tables."""

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

import diffkit as dk
from diffkit.schedules import (
    EDM,
    SCHEDULES,
    Cosine,
    Discrete,
    LinearBeta,
    RectifiedFlow,
    SqrtLinearBeta,
    ZeroTerminalSNR,
    discrete_betas,
    rescale_zero_terminal_snr,
)

F64 = torch.float64

ALL = {
    "linear_beta": LinearBeta(),
    "sqrt_linear_beta": SqrtLinearBeta(),
    "cosine": Cosine(),
    "edm": EDM(),
    "rectified_flow": RectifiedFlow(),
    "rectified_flow_shift3": RectifiedFlow(shift=3.0),
    "discrete": Discrete.from_betas(discrete_betas("linear_beta", 1000)),
    "discrete_sd": Discrete.from_betas(discrete_betas("sqrt_linear_beta", 1000, 0.00085, 0.012)),
    "discrete_zsnr": Discrete.from_betas(
        discrete_betas("sqrt_linear_beta", 1000, 0.00085, 0.012), zero_terminal_snr=True
    ),
    "zero_terminal_snr": ZeroTerminalSNR(base=LinearBeta()),
}
VP = [k for k in ALL if k not in {"edm", "rectified_flow", "rectified_flow_shift3"}]
ZERO_TERMINAL = {"rectified_flow", "rectified_flow_shift3", "discrete_zsnr", "zero_terminal_snr"}


@pytest.mark.parametrize("name", list(ALL))
def test_every_schedule_satisfies_the_protocol(name: str) -> None:
    assert isinstance(ALL[name], dk.NoiseSchedule)


@pytest.mark.parametrize("name", list(ALL))
def test_log_snr_strictly_decreasing_and_alpha_sigma_monotone(name: str) -> None:
    s = ALL[name]
    t = torch.linspace(0.0, 1.0, 2001, dtype=F64)[1:-1]
    lam = s.log_snr(t)
    assert bool((lam[1:] < lam[:-1]).all())
    a, sig = s.alpha(t), s.sigma(t)
    assert bool((a[1:] <= a[:-1]).all()) and bool((sig[1:] >= sig[:-1]).all())


@pytest.mark.parametrize("name", list(ALL))
def test_documented_end_points(name: str) -> None:
    s = ALL[name]
    ends = torch.tensor([0.0, 1.0], dtype=F64)
    lam = s.log_snr(ends)
    if name == "edm":
        assert s.sigma(ends).tolist() == pytest.approx([0.002, 80.0])
        assert s.alpha(ends).tolist() == [1.0, 1.0]
        return
    assert math.isinf(lam[0]) and lam[0] > 0, "t = 0 is clean data"
    assert s.alpha(ends)[0].item() == pytest.approx(1.0)
    assert s.sigma(ends)[0].item() == pytest.approx(0.0, abs=1e-12)
    if name in ZERO_TERMINAL:
        assert s.alpha(ends)[1].item() == pytest.approx(0.0, abs=1e-12)
        assert math.isinf(lam[1]) and lam[1] < 0
    else:
        assert s.alpha(ends)[1].item() < 0.07  # nearly pure noise
    if name in VP:
        t = torch.linspace(0, 1, 101, dtype=F64)
        total = s.alpha(t) ** 2 + s.sigma(t) ** 2
        torch.testing.assert_close(total, torch.ones_like(total))


ENDS_OF_EVERY_KIND = {
    **ALL,
    "cosine_discrete": Discrete.from_beta_schedule("cosine"),
    "zero_terminal_snr_sqrt": ZeroTerminalSNR(base=SqrtLinearBeta()),
    "zero_terminal_snr_cosine": ZeroTerminalSNR(base=Cosine()),
    **{kind: SCHEDULES.build({"kind": kind}) for kind in SCHEDULES.kinds if kind not in ALL},
}


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("name", list(ENDS_OF_EVERY_KIND))
def test_t_of_log_snr_of_infinite_log_snr_is_exactly_an_end(name: str, dtype: torch.dtype) -> None:
    s = ENDS_OF_EVERY_KIND[name]
    t = s.t_of_log_snr(torch.tensor([math.inf, -math.inf], dtype=dtype))
    assert t.tolist() == [0.0, 1.0]


@pytest.mark.parametrize("name", list(ALL))
@given(t=st.floats(0.002, 0.998))
def test_t_of_log_snr_inverts_log_snr(name: str, t: float) -> None:
    s = ALL[name]
    tt = torch.tensor([t], dtype=F64)
    back = s.t_of_log_snr(s.log_snr(tt))
    assert back.item() == pytest.approx(t, abs=1e-7)


@pytest.mark.parametrize("name", list(ALL))
@given(lam=st.floats(-8.0, 8.0))
def test_log_snr_inverts_t_of_log_snr(name: str, lam: float) -> None:
    s = ALL[name]
    ll = torch.tensor([lam], dtype=F64)
    t = s.t_of_log_snr(ll)
    lo, hi = s.log_snr(torch.tensor([1.0, 0.0], dtype=F64)).tolist()
    if not lo < lam < hi:
        return  # outside the schedule's range: clamped to an end point
    assert s.log_snr(t).item() == pytest.approx(lam, abs=1e-6)


@pytest.mark.parametrize("name", list(ALL))
def test_float32_inputs_give_float32_outputs_close_to_float64(name: str) -> None:
    s = ALL[name]
    t64 = torch.linspace(0.01, 0.99, 50, dtype=F64)
    for fn in (s.alpha, s.sigma, s.log_snr):
        out = fn(t64.float())
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), fn(t64), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear_beta", "sqrt_linear_beta", "cosine"])
@given(zero_snr=st.booleans(), n=st.integers(2, 1000))
def test_discrete_reproduces_alphas_cumprod_at_integer_steps(
    kind: str, zero_snr: bool, n: int
) -> None:
    betas = discrete_betas(kind, n, 0.00085, 0.012)  # type: ignore[arg-type]
    s = Discrete.from_betas(betas, zero_terminal_snr=zero_snr)
    expected = torch.cumprod(1 - betas, 0)
    if zero_snr:
        expected = rescale_zero_terminal_snr(expected)
    t = s.t_from_index(torch.arange(n))
    torch.testing.assert_close(s.alpha(t) ** 2, expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(s.index_from_t(t), torch.arange(n, dtype=F64))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_discrete_index_from_t_is_exact_at_every_step_in_the_dtype_of_t(dtype) -> None:
    # float32 t of step i is up to half an ulp off (i+1)/N: N t - 1 formed in float32 gave
    # 249.99998 for i = 250 (and .long() 249); in float64 and snapped it is exactly i.
    s = Discrete()
    i = torch.arange(1000)
    index = s.index_from_t(s.t_from_index(i).to(dtype))
    assert index.dtype == dtype
    assert torch.equal(index, i.to(dtype))
    assert torch.equal(index.long(), i)


def test_discrete_index_from_t_is_continuous_between_steps_and_keeps_the_gradient() -> None:
    s = Discrete()
    t = torch.tensor([0.2505, 0.25, 1 / 3], dtype=F64, requires_grad=True)
    index = s.index_from_t(t)
    torch.testing.assert_close(index, torch.tensor([249.5, 249.0, 1000 / 3 - 1], dtype=F64))
    index.sum().backward()
    assert t.grad is not None and torch.equal(t.grad, torch.full((3,), 1000.0, dtype=F64))


@given(t=st.floats(1e-12, 9.9e-4), zero_snr=st.booleans())
def test_discrete_is_accurate_below_its_first_training_step(t: float, zero_snr: bool) -> None:
    # Below t = 1/N alpha² runs linearly to 1; near t = 0, 1 - alpha² is tiny and must not
    # be formed by cancellation (relative accuracy of the time, not just absolute).
    s = Discrete.from_betas(discrete_betas("linear_beta", 1000), zero_terminal_snr=zero_snr)
    tt = torch.tensor([t], dtype=F64)
    one_minus_a2 = float(s.sigma(tt)) ** 2
    assert one_minus_a2 == pytest.approx(
        t * 1000 * (1 - float(s.alphas_cumprod[0])), rel=1e-12, abs=0
    )
    assert s.t_of_log_snr(s.log_snr(tt)).item() == pytest.approx(t, rel=1e-9, abs=0)


def test_discrete_from_alphas_cumprod_equals_from_betas() -> None:
    betas = discrete_betas("linear_beta", 100)
    a = Discrete.from_betas(betas)
    b = Discrete.from_alphas_cumprod(torch.cumprod(1 - betas, 0))
    t = torch.linspace(0, 1, 77, dtype=F64)
    torch.testing.assert_close(a.log_snr(t), b.log_snr(t))


def test_discrete_fractional_t_interpolates_log_snr_linearly_between_steps() -> None:
    s = Discrete.from_betas(discrete_betas("linear_beta", 10))
    table = s.log_snr(s.t_from_index(torch.arange(10)))
    mid = s.log_snr(s.t_from_index(torch.tensor([3.25])))
    assert mid.item() == pytest.approx((0.75 * table[3] + 0.25 * table[4]).item())


def test_continuous_linear_beta_is_the_limit_of_the_discrete_schedule() -> None:
    disc = Discrete.from_betas(discrete_betas("linear_beta", 1000))
    t = disc.t_from_index(torch.arange(0, 1000, 37))
    torch.testing.assert_close(LinearBeta().alpha(t), disc.alpha(t), atol=2e-3, rtol=0)
    disc_sd = Discrete.from_betas(discrete_betas("sqrt_linear_beta", 1000, 0.00085, 0.012))
    torch.testing.assert_close(SqrtLinearBeta().alpha(t), disc_sd.alpha(t), atol=2e-3, rtol=0)


def test_discrete_rejects_bad_tables() -> None:
    with pytest.raises(ValueError, match="strictly decreasing"):
        Discrete.from_alphas_cumprod(torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        Discrete.from_alphas_cumprod(torch.tensor([1.5, 0.6]))


@pytest.mark.parametrize("kind", SCHEDULES.kinds)
def test_schedule_configs_round_trip_through_json_and_build(kind: str) -> None:
    config = SCHEDULES.config_class(kind)()
    again = SCHEDULES.parse(config.to_json())
    assert again == config
    assert isinstance(SCHEDULES.build(again), dk.NoiseSchedule)


def test_invalid_schedule_config_names_the_field() -> None:
    with pytest.raises(ValidationError, match="num_steps"):
        SCHEDULES.parse({"kind": "discrete", "num_steps": 1})
    with pytest.raises(ValidationError, match="beta_schedule"):
        SCHEDULES.parse({"kind": "discrete", "beta_schedule": "linear"})
    with pytest.raises(ValidationError, match="extra_field"):
        SCHEDULES.parse({"kind": "cosine", "extra_field": 1})
    with pytest.raises(ValueError, match="unknown schedule kind 'nope'"):
        SCHEDULES.parse({"kind": "nope"})


@pytest.mark.parametrize("base", [RectifiedFlow(), RectifiedFlow(shift=3.0), EDM()])
def test_zero_terminal_snr_rejects_a_base_that_is_not_variance_preserving(base) -> None:
    with pytest.raises(
        ValueError, match=f"base must be a variance-preserving.*{type(base).__name__}"
    ):
        ZeroTerminalSNR(base=base)


FLOAT_FIELDS = [
    (kind, field)
    for kind in SCHEDULES.kinds
    for field, info in SCHEDULES.config_class(kind).model_fields.items()
    if info.annotation is float
]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(("kind", "field"), FLOAT_FIELDS)
def test_non_finite_schedule_parameters_are_rejected_naming_the_field(
    kind: str, field: str, value: float
) -> None:
    with pytest.raises(ValidationError, match=f"(?s){field}.*finite number"):
        SCHEDULES.parse({"kind": kind, field: value})


def test_wrong_shaped_time_names_the_argument_and_dimension() -> None:
    with pytest.raises(dk.ShapeError, match=r"argument 't' has 2 dimensions"):
        LinearBeta().alpha(torch.zeros(2, 3))
    with pytest.raises(dk.ShapeError, match=r"argument 'log_snr'.*dtype"):
        Cosine().t_of_log_snr(torch.zeros(3, dtype=torch.long))


def test_discrete_config_rejects_decreasing_linear_betas() -> None:
    with pytest.raises(ValidationError, match=r"beta_end .* must not be below beta_start"):
        Discrete.model_validate({"beta_start": 0.02, "beta_end": 1e-4})
    with pytest.raises(ValueError, match=r"beta_end .* must not be below beta_start"):
        Discrete.from_beta_schedule(beta_start=0.02, beta_end=1e-4)
    Discrete.from_beta_schedule("cosine", beta_start=0.02, beta_end=1e-4)  # unused there
    Discrete.from_beta_schedule(beta_start=0.01, beta_end=0.01)  # constant betas are valid


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: EDM(sigma_min=80.0, sigma_max=0.002),
            r"for EDM\nsigma_max\n.*sigma_max must be larger than sigma_min .*sigma_min=80",
        ),
        (
            lambda: LinearBeta(beta_start=0.02, beta_end=1e-4),
            r"for LinearBeta\nbeta_end\n.*beta_end must be larger than beta_start",
        ),
        (
            lambda: SqrtLinearBeta(beta_start=0.012, beta_end=0.00085),
            r"for SqrtLinearBeta\nbeta_end\n.*beta_end must be larger",
        ),
        (lambda: RectifiedFlow(shift=-1), r"for RectifiedFlow\nshift\n.*greater than or equal to"),
        (lambda: Cosine(offset=1.5), r"for Cosine\noffset\n.*less than 1 .*input_value=1\.5"),
        (lambda: LinearBeta(num_steps=1), r"num_steps\n.*greater than or equal to 2"),
        (lambda: EDM(rho=math.nan), r"for EDM\nrho\n.*finite"),
        (lambda: Discrete(alphas_cumprod=(0.5,)), r"alphas_cumprod\n.*≥2 steps"),
    ],
)
def test_a_schedule_checks_its_fields_when_made_naming_the_field(build, message) -> None:
    with pytest.raises(ValidationError, match=message):
        build()


def test_discrete_t_from_index_rejects_indices_outside_the_table() -> None:
    schedule = ALL["discrete"]
    assert isinstance(schedule, Discrete)
    assert schedule.t_from_index(999).tolist() == [1.0]
    assert schedule.t_from_index(torch.tensor([0, 999])).tolist() == [0.001, 1.0]
    for index in (
        1000,
        -1,
        torch.tensor([3, 1000]),
        torch.tensor([-0.5]),
        torch.tensor([math.nan]),
    ):
        with pytest.raises(ValueError, match=r"Discrete.t_from_index: .* outside \[0, 999\]"):
            schedule.t_from_index(index)


@pytest.mark.parametrize("name", [*ALL, "zero_terminal_snr_cosine"])
def test_a_schedule_is_its_config_and_round_trips_through_json_equal(name: str) -> None:
    schedule = ENDS_OF_EVERY_KIND[name]
    again = SCHEDULES.parse(json.loads(schedule.to_json()))
    assert again == schedule and type(again) is type(schedule)
    assert SCHEDULES.build(schedule) is schedule  # building a schedule is parsing it
    t = torch.linspace(0, 1, 33, dtype=F64)
    assert torch.equal(again.log_snr(t), schedule.log_snr(t))  # the table is kept exactly


def test_discrete_from_named_betas_in_a_config_is_its_table() -> None:
    named = SCHEDULES.parse(
        {"kind": "discrete", "beta_schedule": "sqrt_linear_beta", "beta_start": 0.00085,
         "beta_end": 0.012, "zero_terminal_snr": True}
    )  # fmt: skip
    betas = discrete_betas("sqrt_linear_beta", 1000, 0.00085, 0.012)
    assert named == Discrete.from_betas(betas, zero_terminal_snr=True)
    assert Discrete() == Discrete.from_betas(discrete_betas("linear_beta", 1000))
    assert repr(Discrete()) == "Discrete(num_steps=1000)"
    with pytest.raises(ValidationError, match="not both"):
        Discrete.model_validate({"num_steps": 10, "alphas_cumprod": [0.9, 0.5]})


def test_discrete_caches_its_tables_per_device_without_changing_equality() -> None:
    a, b = Discrete.from_beta_schedule(num_steps=10), Discrete.from_beta_schedule(num_steps=10)
    a.log_snr(torch.tensor([0.5], dtype=F64))
    assert a == b and hash(a) == hash(b)
    assert a != Discrete.from_beta_schedule(num_steps=11)


def test_zero_terminal_snr_nests_its_base_config() -> None:
    schedule = ZeroTerminalSNR(base=Cosine(offset=0.01))
    data = schedule.to_dict()
    assert data == {"kind": "zero_terminal_snr", "base": {"kind": "cosine", "offset": 0.01,
                                                          "min_log_snr": -20.0}}  # fmt: skip
    assert SCHEDULES.parse(data) == schedule
    with pytest.raises(ValidationError, match=r"variance-preserving.*EDM"):
        SCHEDULES.parse({"kind": "zero_terminal_snr", "base": {"kind": "edm"}})
