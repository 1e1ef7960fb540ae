"""Properties of the model-fitted grids and solvers in ``diffkit.samplers.fitting``.

The data are a small Gaussian mixture with components of different widths, so the exact
denoiser is closed form and a sampler's error is its own: the RMS distance of its
samples to a fine-grid ODE solution from the same noise. Calibration (fitting) noise and
evaluation noise are drawn from different seeds.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffkit import samplers
from diffkit.prediction import from_x0_eps
from diffkit.schedules import Cosine, Discrete, RectifiedFlow, discrete_betas

F64 = torch.float64
DIM = 4
SCHEDULES = {
    "discrete": (Discrete.from_betas(discrete_betas("linear_beta", 1000)), ("epsilon", "x0")),
    "cosine": (Cosine(), ("v", "x0")),
    "rectified_flow": (RectifiedFlow(), ("flow", "x0")),
}


class Mixture:
    """Exact denoiser of a 3-component mixture (widths 0.03, 0.18, 1), predicting any kind."""

    def __init__(self, schedule, seed: int, prediction: str = "epsilon") -> None:
        g = torch.Generator().manual_seed(seed)
        self.schedule, self.prediction = schedule, prediction
        self.means = 2 * torch.randn(3, DIM, generator=g, dtype=F64)
        self.stds = torch.logspace(-1.5, 0, 3, dtype=F64)[:, None].expand(3, DIM)
        self.log_w = torch.log_softmax(torch.randn(3, generator=g, dtype=F64), 0)

    def __call__(self, x, t, cond=None):
        a = self.schedule.alpha(t.to(F64))[:, None, None]
        s = self.schedule.sigma(t.to(F64))[:, None, None]
        x64 = x.to(F64)[:, None, :]
        var = a * a * self.stds**2 + s * s
        log_p = (-0.5 * ((x64 - a * self.means) ** 2 / var + torch.log(var))).sum(-1)
        resp = torch.softmax(log_p + self.log_w, -1)[..., None]
        x0 = (resp * (self.means + a * self.stds**2 / var * (x64 - a * self.means))).sum(1)
        a, s = a[:, 0], s[:, 0]
        eps = (x.to(F64) - a * x0) / s
        return from_x0_eps(x0, eps, self.prediction, a[:, 0], s[:, 0]).to(x.dtype)


def _noise(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _problem(seed: int, schedule: str):
    sched, kinds = SCHEDULES[schedule]
    return Mixture(sched, seed, kinds[seed % 2]), sched


@settings(max_examples=10)
@given(
    steps=st.integers(1, 7),
    seed=st.integers(0, 2**16),
    schedule=st.sampled_from(sorted(SCHEDULES)),
    solver=st.booleans(),
)
def test_fitted_grid_is_decreasing_from_t_max_with_the_asked_steps(
    steps, seed, schedule, solver
) -> None:
    den, sched = _problem(seed, schedule)
    fit = samplers.fit_solver if solver else samplers.fit_grid
    result = fit(den, sched, _noise(32, seed), steps, teacher_steps=30)
    times = result.spacing(sched, steps) if solver else result(sched, steps)
    assert times.shape == (steps + 1,) and times.dtype == F64
    assert times[0] == 1.0 and times[-1] == 0.0 and times[-2] > 0
    assert bool((times[1:] < times[:-1]).all())
    fitted = result.spacing if isinstance(result, samplers.FittedSolver) else result
    assert isinstance(fitted, samplers.FittedGrid)
    assert fitted.teacher_nfe == 30 and fitted.search_nfe >= steps


@settings(max_examples=3)
@given(seed=st.integers(0, 2**16), schedule=st.sampled_from(sorted(SCHEDULES)))
def test_fitting_is_deterministic_for_the_same_noise(seed, schedule) -> None:
    den, sched = _problem(seed, schedule)
    noise = _noise(32, seed)
    first = samplers.fit_solver(den, sched, noise, 3, teacher_steps=20)
    assert first == samplers.fit_solver(den, sched, noise, 3, teacher_steps=20)
    grid = samplers.fit_grid(den, sched, noise, 3, teacher_steps=20)
    assert grid == samplers.fit_grid(den, sched, noise, 3, teacher_steps=20)


@pytest.mark.slow
@settings(max_examples=6)
@given(
    seed=st.integers(0, 2**16),
    schedule=st.sampled_from(sorted(SCHEDULES)),
    steps=st.integers(3, 5),
)
def test_fitted_sampler_beats_the_uniform_grids_at_low_nfe_on_new_noise(
    seed, schedule, steps
) -> None:
    den, sched = _problem(seed, schedule)
    calibration, test = _noise(512, seed), _noise(256, seed + 1)
    exact = samplers.UniPC(final="extrapolated").sample(den, sched, test, steps=300)

    def error(sampler: samplers.SamplerBase) -> float:
        return float((sampler.sample(den, sched, test, steps=steps) - exact).square().mean())

    def unipc_3(spacing) -> samplers.UniPC:
        return samplers.UniPC(order=3, final="extrapolated", spacing=spacing)

    uniform = min(error(unipc_3(samplers.UniformTime())), error(unipc_3(samplers.LogSNR())))
    trailing = error(unipc_3(samplers.UniformTime(trailing=True)))
    solver = error(samplers.fit_solver(den, sched, calibration, steps, teacher_steps=100))
    grid = samplers.fit_grid(den, sched, calibration, steps, teacher_steps=100)
    fitted_grid = error(unipc_3(grid))
    # Better than the uniform grids; no worse than the trailing one beyond held-out noise.
    assert solver <= uniform and fitted_grid <= uniform, (solver, fitted_grid, uniform)
    assert solver <= 1.1 * trailing and fitted_grid <= 1.1 * trailing, (
        solver,
        fitted_grid,
        trailing,
    )


def test_fitted_solver_reproduces_its_fit_on_the_calibration_noise() -> None:
    den, sched = _problem(3, "discrete")
    noise = _noise(64, 3)
    solver = samplers.fit_solver(den, sched, noise, 5, teacher_steps=60)
    # The fit's own teacher: UniPC-2 on the 60-point log-SNR grid, extrapolated last step.
    teacher = samplers.UniPC(order=2, final="extrapolated")
    end = teacher.sample(den, sched, noise, steps=60)
    x = solver.sample(den, sched, noise, steps=5)
    mse = float((x - end).square().mean())
    assert isinstance(solver.spacing, samplers.FittedGrid)
    assert mse == pytest.approx(solver.spacing.loss, rel=1e-6, abs=1e-12)
    # At least as close to the teacher as the grid it started its search from.
    start = samplers.UniPC(order=3, final="extrapolated").sample(den, sched, noise, steps=5)
    assert mse < float((start - end).square().mean())


def test_fitted_steps_are_consistent_exactly_on_constant_data() -> None:
    # Every step's D-weights sum to alpha_{i+1}(1 - e^{-h}) (the last: to 1), so data that
    # is one point is sampled exactly, whatever the weights.
    sched = SCHEDULES["discrete"][0]
    den = Mixture(sched, 0)
    solver = samplers.fit_solver(den, sched, _noise(32, 0), 4, teacher_steps=30)

    class Point:
        prediction = "x0"

        def __call__(self, x, t, cond=None):
            return torch.full_like(x, 0.7)

    x = solver.sample(Point(), sched, _noise(8, 1), steps=4)
    torch.testing.assert_close(x, torch.full_like(x, 0.7), rtol=0, atol=1e-10)


def test_fitted_solver_saves_as_a_config_and_rebuilds() -> None:
    den, sched = _problem(1, "cosine")
    solver = samplers.fit_solver(den, sched, _noise(32, 1), 3, teacher_steps=30)
    rebuilt = samplers.SAMPLERS.build(solver.to_json())
    assert isinstance(rebuilt, samplers.FittedSolver)
    assert rebuilt == solver  # the fit's costs and loss included, in its FittedGrid
    noise = _noise(8, 2)
    torch.testing.assert_close(
        rebuilt.sample(den, sched, noise, steps=3), solver.sample(den, sched, noise, steps=3)
    )


def test_fitted_results_name_a_wrong_step_count_or_schedule() -> None:
    den, sched = _problem(0, "discrete")
    noise = _noise(16, 0)
    solver = samplers.fit_solver(den, sched, noise, 3, teacher_steps=20)
    grid = samplers.fit_grid(den, sched, noise, 3, teacher_steps=20)
    with pytest.raises(ValueError, match="steps=3"):
        solver.sample(den, sched, noise, steps=4)
    with pytest.raises(ValueError, match="steps=3"):
        grid(sched, 4)
    with pytest.raises(ValueError, match="schedule mismatch"):
        solver.sample(den, Cosine(), noise, steps=3)
    with pytest.raises(ValueError, match="teacher_steps"):
        samplers.fit_solver(den, sched, noise, 20, teacher_steps=20)
    with pytest.raises(ValueError, match="spacing"):
        samplers.fit_grid(den, sched, noise, 3, sampler=object())  # type: ignore[arg-type]
