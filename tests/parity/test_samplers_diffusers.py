"""diffkit's samplers reproduce diffusers' schedulers step for step on a Discrete schedule."""

import pytest
import torch

import diffkit as dk
from diffkit import samplers

pytestmark = pytest.mark.parity
diffusers = pytest.importorskip("diffusers")

N_TRAIN = 1000
BETAS = torch.linspace(1e-4, 0.02, N_TRAIN, dtype=torch.float64)


class IndexModel:
    """A smooth epsilon-model of (x, training index) that both libraries call alike."""

    prediction = "epsilon"

    def __init__(self, schedule: dk.schedules.Discrete | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        self.weight = torch.randn(6, 6, generator=g, dtype=torch.float64) / 6**0.5
        self.schedule = schedule

    def eps(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        index = index.reshape(-1, 1).to(torch.float64)
        return torch.tanh(x.double() @ self.weight + index / N_TRAIN) + 0.3 * x.double()

    def __call__(self, x, t, cond=None):
        assert self.schedule is not None
        return self.eps(x, self.schedule.index_from_t(t.double())).to(x.dtype)


def _run_diffusers(
    scheduler, model: IndexModel, x: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """diffusers' samples after each step and its denoised estimate at each evaluation."""
    samples, denoised = [], []
    ac = scheduler.alphas_cumprod.to(torch.float64)
    for ts in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, ts)
        eps = model.eps(inp, ts.expand(x.shape[0]))
        a2 = ac[int(ts)]
        denoised.append((inp - (1 - a2).sqrt() * eps) / a2.sqrt())
        x = scheduler.step(eps, ts, x).prev_sample
        samples.append(x)
    return samples, denoised


# name: (diffusers scheduler, diffkit sampler on given times, x scaled as x / alpha,
#        compare intermediate samples (False for UniPC: diffusers returns the predictor,
#        the corrector is applied on its next call; the denoised estimates are compared))
CASES = {
    "ddim": (
        lambda: diffusers.DDIMScheduler(
            beta_schedule="linear", timestep_spacing="trailing", clip_sample=False
        ),
        lambda sp: samplers.DDIM(spacing=sp),
        False,
        True,
    ),
    # Stable Diffusion 1.x's spacing: diffkit's own Leading grid, not the given times.
    "ddim_leading_offset": (
        lambda: diffusers.DDIMScheduler(
            beta_schedule="linear", timestep_spacing="leading", steps_offset=1, clip_sample=False
        ),
        lambda sp: samplers.DDIM(spacing=samplers.Leading(steps_offset=1)),
        False,
        True,
    ),
    "lms": (
        lambda: diffusers.LMSDiscreteScheduler(beta_schedule="linear", timestep_spacing="trailing"),
        lambda sp: samplers.LMS(spacing=sp),
        True,
        True,
    ),
    "dpmpp_2m_heun": (
        lambda: diffusers.DPMSolverMultistepScheduler(
            beta_schedule="linear", solver_order=2, solver_type="heun"
        ),
        lambda sp: samplers.DPMSolverPP(order=2, solver_type="heun", spacing=sp),
        False,
        True,
    ),
    "dpmpp_3m_no_lower_order_final": (
        lambda: diffusers.DPMSolverMultistepScheduler(
            beta_schedule="linear", solver_order=3, lower_order_final=False
        ),
        lambda sp: samplers.DPMSolverPP(order=3, lower_order_final=False, spacing=sp),
        False,
        True,
    ),
    "dpmpp_2m": (
        lambda: diffusers.DPMSolverMultistepScheduler(beta_schedule="linear", solver_order=2),
        lambda sp: samplers.DPMSolverPP(order=2, spacing=sp),
        False,
        True,
    ),
    "dpmpp_3m": (
        lambda: diffusers.DPMSolverMultistepScheduler(beta_schedule="linear", solver_order=3),
        lambda sp: samplers.DPMSolverPP(order=3, spacing=sp),
        False,
        True,
    ),
    "unipc": (
        lambda: diffusers.UniPCMultistepScheduler(beta_schedule="linear", solver_order=2),
        lambda sp: samplers.UniPC(order=2, spacing=sp),
        False,
        False,
    ),
    "unipc_3": (
        lambda: diffusers.UniPCMultistepScheduler(beta_schedule="linear", solver_order=3),
        lambda sp: samplers.UniPC(order=3, spacing=sp),
        False,
        False,
    ),
    "euler": (
        lambda: diffusers.EulerDiscreteScheduler(
            beta_schedule="linear", timestep_spacing="trailing"
        ),
        lambda sp: samplers.Euler(spacing=sp),
        True,
        True,
    ),
}


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("name", list(CASES))
def test_sampler_matches_diffusers_step_for_step(name: str, steps: int) -> None:
    make_scheduler, make_sampler, karras_scaled, compare_samples = CASES[name]
    schedule = dk.schedules.Discrete.from_betas(BETAS)
    scheduler = make_scheduler()
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.to(torch.float64)
    times = tuple(((timesteps + 1) / N_TRAIN).tolist())
    sampler = make_sampler(samplers.Explicit(times=times))
    model = IndexModel(schedule)

    g = torch.Generator().manual_seed(1)
    x_init = torch.randn(3, 6, generator=g, dtype=torch.float64) * scheduler.init_noise_sigma
    reference, ref_denoised = _run_diffusers(scheduler, model, x_init.clone())

    grid = sampler.grid(schedule, steps)
    # diffusers' Euler works with x / alpha; diffkit with x (alpha x0 + sigma eps).
    scale = grid.alpha[0] if karras_scaled else 1.0
    noise = x_init * scale / grid.sigma[0]
    ours: list[torch.Tensor] = []
    ours_denoised: list[torch.Tensor] = []

    def record(i, t, x, x0):
        ours.append(x / grid.alpha[i + 1] if karras_scaled else x.clone())
        ours_denoised.append(x0.clone())

    final = sampler.sample(model, schedule, noise, steps=steps, callback=record)
    assert len(ours) == len(reference) == steps
    # diffusers' LMS integrates its Lagrange polynomials over float32 sigmas (up to 157
    # here): its coefficients carry float32 rounding, 1-2e-5 on estimates of size ~1.
    tol = 3e-5 if name == "lms" else 1e-5
    for i in range(steps - 1):
        # the callback's estimate after step i is the one evaluated at point i + 1
        torch.testing.assert_close(
            ours_denoised[i], ref_denoised[i + 1], atol=tol, rtol=tol, msg=f"x0 at step {i}"
        )
        if compare_samples:
            torch.testing.assert_close(
                ours[i], reference[i].to(ours[i].dtype), atol=tol, rtol=tol, msg=f"step {i}"
            )
    torch.testing.assert_close(final, reference[-1].to(final.dtype), atol=tol, rtol=tol)


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_guidance_rescale_matches_diffusers_rescale_noise_cfg(rescale: float) -> None:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)

    def model(x, t, c=None):
        return torch.cat([cond, uncond])

    model.prediction = "epsilon"  # type: ignore[attr-defined]
    ours = dk.guidance.predict(model, cond, torch.zeros(4), None, 7.5, rescale=rescale)
    cfg = uncond + 7.5 * (cond - uncond)
    theirs = rescale_noise_cfg(cfg, cond, guidance_rescale=rescale)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_match_euler_is_euler_on_shifted_rectified_flow(shift: float) -> None:
    # diffusers' FlowMatchEulerDiscreteScheduler (SD3 / Flux): unshifted sigmas evenly
    # spaced from 1 to shift(1 / 1000), shifted, then Euler on the flow. In diffkit: the
    # time shift is RectifiedFlow(shift=...), t the unshifted sigma, and flow-Euler is
    # Euler (= DDIM) on uniform t down to that t_min.
    steps = 8
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 6, generator=g, dtype=torch.float64) / 6**0.5

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x.double() @ weight) * (1 + sigma.reshape(-1, 1)) - 0.5 * x.double()

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps)
    noise = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = noise.float()
    for t in scheduler.timesteps:
        v = velocity(x, (t / 1000).double().expand(x.shape[0])).float()
        x = scheduler.step(v, t, x).prev_sample

    schedule = dk.schedules.RectifiedFlow(shift=shift)

    class Flow:
        prediction = "flow"

        def __call__(self, x, t, cond=None):
            return velocity(x, schedule.sigma(t.double())).to(x.dtype)

    t_min = shift * 1e-3 / (1 + (shift - 1) * 1e-3)
    sampler = samplers.Euler(spacing=samplers.UniformTime(t_min=t_min))
    ours = sampler.sample(Flow(), schedule, noise, steps=steps)
    torch.testing.assert_close(ours.float(), x, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# PNDM / PLMS: diffusers' own loop (scale_model_input is the identity for PNDM)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("float64_alphas", [False, True])
@pytest.mark.parametrize("steps", [4, 10, 25])
@pytest.mark.parametrize("skip_prk_steps", [True, False])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_pndm_matches_diffusers_pndm_scheduler(
    prediction: str, spacing: str, skip_prk_steps: bool, steps: int, float64_alphas: bool
) -> None:
    # Stable Diffusion 1.x's grid: "leading" spacing with steps_offset=1; the last step
    # onto the data (set_alpha_to_one=True). diffusers keeps alphas_cumprod in float32;
    # with float64 ones put in its place both run in float64. (diffusers' PNDM steps by
    # num_train // steps, not to its next timestep: its "linspace" grid is not a grid it
    # steps on, so only "leading" and "trailing" with steps dividing 1000 are compared.)
    scheduler = diffusers.PNDMScheduler(
        beta_schedule="linear",
        skip_prk_steps=skip_prk_steps,
        steps_offset=1 if spacing == "leading" else 0,
        set_alpha_to_one=True,
        timestep_spacing=spacing,
        prediction_type=prediction,
    )
    if float64_alphas:
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    schedule = dk.schedules.Discrete.from_alphas_cumprod(scheduler.alphas_cumprod.double())
    scheduler.set_timesteps(steps)
    model = IndexModel(schedule)
    x_T = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = x_T.clone()
    for ts in scheduler.timesteps:
        x = scheduler.step(model.eps(x, ts.expand(3)), ts, x).prev_sample

    warmup = "plms" if skip_prk_steps else "prk"
    grid = (
        samplers.Leading(steps_offset=1)
        if spacing == "leading"
        else samplers.UniformTime(trailing=True)
    )
    combine = "epsilon" if prediction == "epsilon" else "v"
    sampler = samplers.PNDM(warmup=warmup, combine=combine, spacing=grid)
    calls = 0

    def counted(x, t, cond=None):
        nonlocal calls
        calls += 1
        return model(x, t)

    counted.prediction = "epsilon" if prediction == "epsilon" else "v"  # type: ignore[attr-defined]
    ours = sampler.sample(counted, schedule, x_T, steps=steps, start="sample")
    assert calls == len(scheduler.timesteps)  # the same number of model evaluations
    error = float((ours - x).abs().max() / x.abs().max())
    assert error <= (1e-13 if float64_alphas else 1e-6), error


# --------------------------------------------------------------------------------------
# LCM: diffusers' LCMScheduler loop (scale_model_input is the identity), same generator
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("float64", [False, True])
@pytest.mark.parametrize("steps", [1, 2, 4, 8, 50])
def test_lcm_matches_diffusers_lcm_scheduler(steps: int, float64: bool, prediction: str) -> None:
    # Its own defaults: scaled-linear betas, original_inference_steps=50, timestep_scaling=10.
    # diffusers computes c_skip, c_out from the timestep it is given: a tensor timestep
    # makes them float32 (c_out = 1 - 1e-9 rounds to 1), a Python int keeps them float64.
    scheduler = diffusers.LCMScheduler(prediction_type=prediction)
    dtype = torch.float64 if float64 else torch.float32
    if float64:
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    schedule = dk.schedules.Discrete.from_alphas_cumprod(scheduler.alphas_cumprod.double())
    scheduler.set_timesteps(steps)
    model = IndexModel(schedule)
    model.prediction = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}[prediction]
    x_T = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=dtype)
    x, g = x_T.clone(), torch.Generator().manual_seed(7)
    for ts in scheduler.timesteps:
        out = model.eps(x, ts.expand(3)).to(dtype)
        x = scheduler.step(out, int(ts) if float64 else ts, x, generator=g).prev_sample

    sampler = samplers.LCM()
    grid = sampler.grid(schedule, steps)
    assert [round(t * N_TRAIN) - 1 for t in grid.t[:-1]] == scheduler.timesteps.tolist()
    g = torch.Generator().manual_seed(7)
    ours = sampler.sample(model, schedule, x_T, steps=steps, start="sample", generator=g)
    error = float((ours - x).abs().max() / x.abs().max())
    assert error <= (1e-13 if float64 else 1e-6), error


@pytest.mark.parametrize(
    ("steps", "original_steps", "strength"),
    [(4, 50, 1.0), (7, 50, 1.0), (3, 50, 0.5), (6, 50, 0.58), (5, 25, 0.8), (10, 100, 0.37)],
)
def test_lcm_spacing_is_diffusers_lcm_timesteps(
    steps: int, original_steps: int, strength: float
) -> None:
    scheduler = diffusers.LCMScheduler(original_inference_steps=original_steps)
    scheduler.set_timesteps(steps, strength=strength)
    spacing = samplers.LCMSpacing(original_steps=original_steps, strength=strength)
    times = spacing(dk.schedules.Discrete.from_betas(BETAS), steps)
    assert [round(float(t) * N_TRAIN) - 1 for t in times[:-1]] == scheduler.timesteps.tolist()
    assert float(times[-1]) == 0.0
