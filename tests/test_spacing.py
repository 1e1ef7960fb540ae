"""Properties of the time spacings in ``diffkit.samplers.spacing``."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from diffkit.samplers import SPACINGS, Explicit, Karras, Leading, LogSNR, UniformTime
from diffkit.schedules import EDM, Cosine, Discrete, RectifiedFlow, discrete_betas

F64 = torch.float64
SCHEDULES = {
    "discrete": Discrete.from_betas(discrete_betas("linear_beta", 1000)),
    "cosine": Cosine(),
    "edm": EDM(),
    "rectified_flow": RectifiedFlow(),
}
SPACINGS_UNDER_TEST = {
    "uniform": UniformTime(),
    "trailing": UniformTime(trailing=True),
    "logsnr": LogSNR(),
    "logsnr_power2": LogSNR(power=2.0),
    "karras": Karras(),
}


@given(
    steps=st.integers(1, 60),
    spacing=st.sampled_from(sorted(SPACINGS_UNDER_TEST)),
    schedule=st.sampled_from(sorted(SCHEDULES)),
)
def test_grid_is_decreasing_from_t_max_and_ends_on_the_data(steps, spacing, schedule) -> None:
    t = SPACINGS_UNDER_TEST[spacing](SCHEDULES[schedule], steps)
    assert t.shape == (steps + 1,) and t.dtype == F64
    capped = (spacing, schedule) == ("karras", "cosine")  # Karras' sigma_max ceiling
    assert (t[0] < 1.0 if capped else t[0] == 1.0) and t[-1] == 0.0
    assert bool((t[1:] < t[:-1]).all())


def test_uniform_log_snr_is_even_in_log_snr() -> None:
    sched = SCHEDULES["discrete"]
    t = LogSNR()(sched, 12)
    lam = sched.log_snr(t[:-1])
    gaps = lam[1:] - lam[:-1]
    torch.testing.assert_close(gaps, gaps.mean().expand_as(gaps), atol=1e-6, rtol=1e-6)


def test_karras_matches_the_edm_sigmas() -> None:
    # On the EDM schedule uniform t is exactly the Karras ramp between its sigma bounds.
    sched = EDM()
    karras = Karras(t_min=1e-9)(sched, 10)
    sigmas = sched.sigma(karras[:-1])
    rho = 7.0
    lo, hi = (
        sched.sigma(torch.tensor([1e-9], dtype=F64)),
        sched.sigma(torch.tensor([1.0], dtype=F64)),
    )
    ramp = torch.linspace(0, 1, 10, dtype=F64)
    expected = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    torch.testing.assert_close(sigmas, expected, rtol=1e-8, atol=1e-10)


def test_trailing_uniform_matches_diffusers_trailing_timesteps() -> None:
    t = UniformTime(trailing=True)(SCHEDULES["discrete"], 10)
    index = (t[:-1] * 1000 - 1).round()
    assert index.tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]


def test_infinite_log_snr_endpoint_keeps_pure_noise_first() -> None:
    sched = RectifiedFlow()
    for spacing in (LogSNR(), Karras()):
        t = spacing(sched, 6)
        assert t[0] == 1.0 and math.isinf(float(sched.log_snr(t[:1])))
        assert bool(torch.isfinite(sched.log_snr(t[1:-1])).all())


def test_karras_caps_a_huge_terminal_sigma_and_keeps_the_peers_grids() -> None:
    # Cosine ends at sigma/alpha = e^10: uncapped, 7 of 10 steps sit at t > 0.95.
    cosine = Cosine()
    uncapped = Karras(sigma_max=None)(cosine, 10)
    assert int((uncapped[:-1] > 0.95).sum()) == 7
    capped = Karras()(cosine, 10)
    ratio = cosine.sigma(capped[:1]) / cosine.alpha(capped[:1])
    torch.testing.assert_close(ratio, torch.tensor([200.0], dtype=F64), rtol=1e-6, atol=0)
    assert int((capped[:-1] > 0.95).sum()) <= 5
    # Below the ceiling (DDPM linear betas end at 157, EDM at 80) the grid is unchanged.
    for sched in (SCHEDULES["discrete"], EDM()):
        torch.testing.assert_close(Karras()(sched, 10), Karras(sigma_max=None)(sched, 10))


def test_leading_matches_diffusers_leading_timesteps_with_their_offset() -> None:
    t = Leading(steps_offset=1)(SCHEDULES["discrete"], 10)
    index = (t[:-1] * 1000 - 1).round()
    assert index.tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert t[-1] == 0.0
    with pytest.raises(ValueError, match="steps_offset"):
        Leading(steps_offset=1000)
    with pytest.raises(ValueError, match="num_train"):
        Leading(num_train=10)(SCHEDULES["discrete"], 20)


def test_explicit_times_are_checked() -> None:
    sched = SCHEDULES["discrete"]
    assert Explicit(times=(0.9, 0.5, 0.1))(sched, 3).tolist() == [0.9, 0.5, 0.1, 0.0]
    with pytest.raises(ValueError, match="decreasing"):
        Explicit(times=(0.5, 0.9))
    with pytest.raises(ValueError, match=r"2 times \(steps=2\); asked for steps=3"):
        Explicit(times=(0.9, 0.5))(sched, 3)


def test_spacing_configs_build_and_validate() -> None:
    assert SPACINGS.build({"kind": "karras", "rho": 5.0}) == Karras(rho=5.0)
    assert SPACINGS.build({"kind": "uniform", "trailing": True}) == UniformTime(trailing=True)
    assert SPACINGS.build({"kind": "logsnr", "power": 2}) == LogSNR(power=2.0)
    with pytest.raises(ValueError):
        SPACINGS.parse({"kind": "logsnr", "t_min": 0.5, "t_max": 0.4})
    with pytest.raises(ValueError):
        SPACINGS.parse({"kind": "karras", "rho": -1})


@pytest.mark.parametrize(
    ("make", "arg"),
    [
        (lambda: LogSNR(t_min=-0.1), "t_min"),
        (lambda: LogSNR(t_min=float("nan")), "t_min"),
        (lambda: Karras(t_min=0.0), "t_min"),
        (lambda: UniformTime(t_max=2.0), "t_max"),
        (lambda: UniformTime(t_max=0.0), "t_max"),
        (lambda: UniformTime(t_min=0.5, t_max=0.4), "t_min"),
        (lambda: LogSNR(power=0.0), "power"),
        (lambda: Karras(rho=-1.0), "rho"),
        (lambda: Karras(sigma_max=0.0), "sigma_max"),
        (lambda: Explicit(times=()), "times"),
        (lambda: Explicit(times=(0.5, 0.9)), "times"),
        (lambda: Explicit(times=(1.5, 0.5)), "times"),
        (lambda: Explicit(times=(0.5, 0.0)), "times"),
    ],
)
def test_spacings_built_directly_refuse_bad_arguments_by_name(make, arg: str) -> None:
    # Same rules as the configs, checked at construction (before any denoiser call).
    with pytest.raises(ValueError, match=arg):
        make()


@pytest.mark.parametrize(
    "raw",
    [
        {"kind": "logsnr", "t_min": -0.1},
        {"kind": "karras", "t_min": 0.0},
        {"kind": "uniform", "t_max": 2.0},
        {"kind": "logsnr", "power": 0.0},
        {"kind": "explicit", "times": [0.5, 0.9]},
        {"kind": "explicit", "times": [1.5]},
        {"kind": "explicit", "times": []},
    ],
)
def test_spacing_configs_refuse_what_the_spacings_refuse(raw: dict) -> None:
    name = next(k for k in raw if k != "kind")
    with pytest.raises(ValueError, match=name):
        SPACINGS.parse(raw)
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k != "kind"}
    cls = {"logsnr": LogSNR, "karras": Karras, "uniform": UniformTime, "explicit": Explicit}
    with pytest.raises(ValueError, match=name):
        cls[raw["kind"]](**fields)
