"""The forward process: marginals compose, the posterior is Bayes' rule, sampling is seeded."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import diffkit as dk
from diffkit.forward import add_noise, posterior, q_sample, transition
from diffkit.schedules import EDM, Cosine, Discrete, LinearBeta, RectifiedFlow, discrete_betas

SCHEDULES = [
    LinearBeta(),
    Cosine(),
    EDM(),
    RectifiedFlow(),
    Discrete.from_betas(discrete_betas("linear_beta", 1000)),
]
F64 = torch.float64


def _pair(s: float, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = sorted((s, t))
    hi = max(hi, lo + 1e-3)
    return torch.tensor([lo], dtype=F64), torch.tensor([hi], dtype=F64)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: type(s).__name__)
@given(s=st.floats(0.01, 0.95), t=st.floats(0.01, 0.99))
def test_composing_q_s_given_0_then_q_t_given_s_matches_q_t_given_0(
    schedule: dk.NoiseSchedule, s: float, t: float
) -> None:
    ss, tt = _pair(s, t)
    a_ts, sig_ts = transition(schedule, ss, tt)
    # x_t = a_ts (a_s x0 + sig_s e1) + sig_ts e2: mean coefficient and variance
    mean_coef = a_ts * schedule.alpha(ss)
    var = a_ts**2 * schedule.sigma(ss) ** 2 + sig_ts**2
    torch.testing.assert_close(mean_coef, schedule.alpha(tt), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(var, schedule.sigma(tt) ** 2, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: type(s).__name__)
@given(s=st.floats(0.01, 0.95), t=st.floats(0.01, 0.99), m=st.floats(-2, 2), v=st.floats(0.1, 4))
def test_posterior_matches_bayes_for_gaussian_data(
    schedule: dk.NoiseSchedule, s: float, t: float, m: float, v: float
) -> None:
    """For x0 ~ N(m, v), E[x_s | x_t] from the posterior equals the Gaussian conditional."""
    ss, tt = _pair(s, t)
    a_s, sig_s = schedule.alpha(ss), schedule.sigma(ss)
    a_t, sig_t = schedule.alpha(tt), schedule.sigma(tt)
    x_t = torch.tensor([[0.7]], dtype=F64)
    # Bayes for x0 | x_t (Gaussian prior, Gaussian likelihood)
    prec = 1 / v + a_t**2 / sig_t**2
    x0_mean = (m / v + a_t * x_t[:, 0] / sig_t**2) / prec
    x0_var = 1 / prec
    # x_s | x_t = E over x0 | x_t of the posterior q(x_s | x_t, x0), which is linear in x0
    mean_at_x0, var = posterior(schedule, x_t, x0_mean[:, None], ss, tt)
    one, _ = posterior(schedule, x_t, x0_mean[:, None] + 1, ss, tt)
    coef_x0 = (one - mean_at_x0)[:, 0]
    total_var = var + coef_x0**2 * x0_var
    # direct joint Gaussian of (x_s, x_t)
    var_s = a_s**2 * v + sig_s**2
    var_t = a_t**2 * v + sig_t**2
    a_ts = a_t / a_s
    cov = a_ts * var_s
    direct_mean = a_s * m + cov / var_t * (x_t[:, 0] - a_t * m)
    direct_var = var_s - cov**2 / var_t
    torch.testing.assert_close(mean_at_x0[:, 0], direct_mean, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(total_var, direct_var, rtol=1e-7, atol=1e-9)


def test_q_sample_is_seeded_and_has_the_marginal_moments() -> None:
    schedule = LinearBeta()
    x0 = torch.full((20000, 1), 2.0, dtype=F64)
    t = torch.full((20000,), 0.3, dtype=F64)
    a, b = (q_sample(schedule, x0, t, torch.Generator().manual_seed(0)) for _ in range(2))
    torch.testing.assert_close(a[0], b[0])
    x_t, noise = a
    torch.testing.assert_close(x_t, add_noise(schedule, x0, noise, t))
    assert x_t.mean().item() == pytest.approx(2 * schedule.alpha(t[:1]).item(), abs=0.02)
    assert x_t.std().item() == pytest.approx(schedule.sigma(t[:1]).item(), rel=0.02)


def test_add_noise_rejects_mismatched_noise_and_batch() -> None:
    with pytest.raises(dk.ShapeError, match=r"'noise' dimensions '\*shape' are \(4,\)"):
        add_noise(LinearBeta(), torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2))
    with pytest.raises(dk.ShapeError, match="'t'"):
        add_noise(LinearBeta(), torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(5))


@pytest.mark.parametrize("fn", ["transition", "posterior"])
def test_s_later_than_t_is_refused_naming_both(fn: str) -> None:
    """Swapped (t, t_prev) gave alpha_{t|s} > 1 and a zero variance; now a clear error."""
    s, t = torch.tensor([0.2, 0.6]), torch.tensor([0.5, 0.3])
    x = torch.zeros(2, 3)
    expected = rf"{fn}: s must not be later than t.*s=0\.6 > t=0\.3 at item 1"
    with pytest.raises(ValueError, match=expected):
        if fn == "transition":
            transition(Cosine(), s, t)
        else:
            posterior(Cosine(), x, x, s, t)
    # off the CPU the values are not read (no host sync): meta tensors go through unchecked
    meta_s, meta_t, meta_x = s.to("meta"), t.to("meta"), x.to("meta")
    if fn == "transition":
        assert transition(Cosine(), meta_s, meta_t)[0].shape == (2,)
    else:
        assert posterior(Cosine(), meta_x, meta_x, meta_s, meta_t)[0].shape == (2, 3)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("time", [0.0, 0.3, 1.0])
def test_s_equal_t_is_the_identity_and_the_point_mass_at_x_t(
    schedule: dk.NoiseSchedule, time: float
) -> None:
    """transition(s, s) = (1, 0); posterior(s == t) is the point mass at x_t, even at sigma 0."""
    t = torch.tensor([time], dtype=F64)
    a, sig = transition(schedule, t, t)
    assert a.tolist() == [1.0] and sig.tolist() == [0.0]
    g = torch.Generator().manual_seed(0)
    x_t, x0 = torch.randn(2, 3, generator=g, dtype=F64).chunk(2)
    mean, var = posterior(schedule, x_t, x0, t, t)
    assert torch.equal(mean, x_t) and var.tolist() == [0.0]
