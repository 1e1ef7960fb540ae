"""diffusers schedulers as a diffkit schedule and sampler (``from_diffusers(scheduler)``).

A diffusers scheduler holds three things diffkit keeps apart: the noise schedule of the
model's training (its betas), the sampling method with its options, and the model's
prediction type. ``from_diffusers(scheduler)`` returns the first two as
[`SchedulerParts`][diffkit.interop.SchedulerParts] ``(schedule, sampler)``; the third
describes the model, so in diffkit it is the denoiser's ``prediction`` attribute:
[`diffusers_prediction`][diffkit.interop.diffusers_prediction] reads it from the scheduler
(``from_diffusers(unet, prediction=diffusers_prediction(pipe.scheduler))``). Then::

    schedule, sampler = from_diffusers(pipe.scheduler)
    x0 = sampler.sample(denoiser, schedule, latents, steps=N, start="sample")

with ``latents`` diffusers' starting latents in diffkit's units (``x_T``: diffusers' DDPM,
DDIM, DPM-Solver, UniPC latents, and its Euler / Heun / LMS / DPM-SDE latents times
``alpha`` at the first time, i.e. divided by ``init_noise_sigma`` and scaled by
``sqrt(1 - sigma**2 ... )``: see the parity tests). Every config field is honoured, or
refused by name: ``ALLOWED`` lists, per scheduler, the fields diffkit honours only at some
values, and a field the converter does not know is refused too.
"""

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from diffkit.samplers import (
    DDIM,
    DDPM,
    LCM,
    LMS,
    PNDM,
    Clip,
    DPMSolverPP,
    DPMSolverPPSDE,
    DPMSolverPPSinglestep,
    Euler,
    EulerAncestral,
    Heun,
    Karras,
    LCMSpacing,
    LogSNR,
    SamplerBase,
    Timesteps,
    UniformTime,
    UniPC,
)
from diffkit.samplers.spacing import SpacingBase
from diffkit.schedules import Discrete, RectifiedFlow, ScheduleBase
from diffkit.typing import Prediction

__all__ = ["ALLOWED", "SCHEDULERS", "SchedulerParts", "diffusers_prediction", "scheduler_parts"]


class SchedulerParts(NamedTuple):
    """A diffusers scheduler in diffkit: the training ``schedule`` and the ``sampler``."""

    schedule: ScheduleBase
    sampler: SamplerBase


_INF = -math.inf
_NONE_OR_FALSE = (None, False)
_SIGMAS = {"use_exponential_sigmas": _NONE_OR_FALSE, "use_beta_sigmas": _NONE_OR_FALSE}
_SPACED = {"timestep_spacing": ("linspace", "leading", "trailing")}
_THRESHOLD = {"prediction_type": ("epsilon", "v_prediction", "sample")}
_DISCRETE = {**_SPACED, **_SIGMAS, **_THRESHOLD}
_SOLVER = {
    **_SIGMAS,
    **_THRESHOLD,
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
    "final_sigmas_type": ("zero", "sigma_min"),
}
_DPM = {**_SOLVER, "variance_type": (None,), "lambda_min_clipped": (_INF,)}

ALLOWED: dict[str, dict[str, tuple[Any, ...]]] = {
    "DDPMScheduler": {**_SPACED, **_THRESHOLD, "variance_type": ("fixed_small", "fixed_small_log")},
    "DDIMScheduler": {**_SPACED, **_THRESHOLD},
    "EulerDiscreteScheduler": {
        **_DISCRETE,
        "interpolation_type": ("linear",),
        "timestep_type": ("discrete",),
        "sigma_min": (None,),
        "sigma_max": (None,),
        "final_sigmas_type": ("zero", "sigma_min"),
    },
    "EulerAncestralDiscreteScheduler": {**_SPACED, **_THRESHOLD},
    "HeunDiscreteScheduler": _DISCRETE,
    "LMSDiscreteScheduler": _DISCRETE,
    "DPMSolverMultistepScheduler": {
        **_DPM,
        **_SPACED,
        "algorithm_type": ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver"),
        "solver_order": (1, 2, 3),
        "euler_at_final": (False,),
    },
    "DPMSolverSinglestepScheduler": {
        **_DPM,
        "algorithm_type": ("dpmsolver++", "sde-dpmsolver++", "dpmsolver"),
        "solver_order": (1, 2, 3),
    },
    "UniPCMultistepScheduler": {
        **_SOLVER,
        **_SPACED,
        "solver_order": (1, 2, 3),
        "predict_x0": (True,),
        "lower_order_final": (True,),
        "disable_corrector": ([], ()),
        "solver_p": (None,),
        "sigma_min": (None,),
        "sigma_max": (None,),
        "shift_terminal": (None,),
    },
    "DPMSolverSDEScheduler": _DISCRETE,
    "PNDMScheduler": {**_SPACED, "prediction_type": ("epsilon", "v_prediction")},
    "LCMScheduler": _THRESHOLD,
    "FlowMatchEulerDiscreteScheduler": {
        "use_dynamic_shifting": (False,),
        "invert_sigmas": (False,),
        "shift_terminal": (None,),
        "use_karras_sigmas": (False,),
        "stochastic_sampling": (False,),
        **_SIGMAS,
    },
}
"""Scheduler -> field -> the values diffkit honours; any other value is refused by name."""

# Fields each converter reads (honoured at every value), beside those of ``ALLOWED``.
_BETAS = {
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "rescale_betas_zero_snr",
    "prediction_type",
    "steps_offset",
}
_CLIPS = {
    "clip_sample",
    "clip_sample_range",
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
}
_KARRAS = {"use_karras_sigmas"}
_SOLVES = {"solver_type", "lower_order_final", "flow_shift", "time_shift_type"}
_READ: dict[str, set[str]] = {
    "DDPMScheduler": _BETAS | _CLIPS,
    "DDIMScheduler": _BETAS | _CLIPS | {"set_alpha_to_one"},
    "EulerDiscreteScheduler": _BETAS | _KARRAS,
    "EulerAncestralDiscreteScheduler": _BETAS,
    "HeunDiscreteScheduler": _BETAS | _KARRAS | {"clip_sample", "clip_sample_range"},
    "LMSDiscreteScheduler": _BETAS | _KARRAS,
    "DPMSolverMultistepScheduler": _BETAS | _CLIPS | _KARRAS | _SOLVES | {"use_lu_lambdas"},
    "UniPCMultistepScheduler": _BETAS | _CLIPS | _KARRAS | _SOLVES,
    "DPMSolverSinglestepScheduler": _BETAS | _CLIPS | _KARRAS | _SOLVES,
    "DPMSolverSDEScheduler": _BETAS | _KARRAS | {"noise_sampler_seed"},
    "PNDMScheduler": _BETAS | {"skip_prk_steps", "set_alpha_to_one"},
    # set_alpha_to_one, steps_offset, timestep_spacing: diffusers' LCM never reads them
    # (its last step returns the estimate; its grid is the distillation grid)
    "LCMScheduler": _BETAS
    | _CLIPS
    | {"original_inference_steps", "timestep_scaling", "set_alpha_to_one", "timestep_spacing"},
    # base_shift ... max_image_seq_len and time_shift_type act only with dynamic shifting
    "FlowMatchEulerDiscreteScheduler": {
        "num_train_timesteps",
        "shift",
        "base_shift",
        "max_shift",
        "base_image_seq_len",
        "max_image_seq_len",
        "time_shift_type",
    },
}

_PREDICTIONS: dict[str, Prediction] = {
    "epsilon": "epsilon",
    "v_prediction": "v",
    "sample": "x0",
    "flow_prediction": "flow",
}


def _config(scheduler: Any) -> dict[str, Any]:
    """The config fields the scheduler's ``__init__`` takes: those its behaviour depends on.

    A config loaded with ``from_config`` keeps the other schedulers' keys as hidden
    entries (Stable Diffusion's PNDM config carries ``clip_sample``), which diffusers
    ignores; so does the converter.
    """
    config = getattr(scheduler, "config", None)
    if not isinstance(config, Mapping):
        raise TypeError(f"{type(scheduler).__name__} has no diffusers config")
    taken = inspect.signature(type(scheduler).__init__).parameters
    return {k: v for k, v in config.items() if k in taken and not k.startswith("_")}


def diffusers_prediction(scheduler: Any) -> Prediction:
    """The prediction type a diffusers scheduler expects of its model, in diffkit's names.

    ``"epsilon"``, ``"v_prediction"`` -> ``"v"``, ``"sample"`` -> ``"x0"``; a flow-matching
    scheduler's model predicts ``"flow"``. It belongs to the denoiser (its ``prediction``
    attribute), not to the sampler.
    """
    config = _config(scheduler)
    if type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler":
        return "flow"
    kind = config.get("prediction_type", "epsilon")
    if kind not in _PREDICTIONS:
        raise ValueError(
            f"prediction_type={kind!r} cannot be honoured; allowed: {tuple(_PREDICTIONS)}"
        )
    return _PREDICTIONS[kind]


def _check(name: str, config: dict[str, Any]) -> None:
    """Refuse, by name, a field at a value diffkit cannot honour, or a field it does not know."""
    allowed = ALLOWED[name]
    for field, value in config.items():
        if field in allowed:
            if not any(_same(value, ok) for ok in allowed[field]):
                raise ValueError(
                    f"{name}.{field}={value!r} cannot be honoured by diffkit; "
                    f"allowed: {allowed[field]}"
                )
        elif field not in _READ[name]:
            raise ValueError(f"{name}.{field}: unknown to diffkit's converter (refused)")


def _same(value: Any, ok: Any) -> bool:
    if isinstance(ok, list | tuple):
        return isinstance(value, list | tuple) and list(value) == list(ok)
    return type(value) is type(ok) and value == ok  # True is not 1 here


def _schedule(scheduler: Any, interpolation: str = "log_snr") -> Discrete:
    """The training schedule: the scheduler's own ``alphas_cumprod``.

    diffusers computed it from ``trained_betas`` or ``beta_schedule`` (``linear``,
    ``scaled_linear``, ``squaredcos_cap_v2``, ...) and ``rescale_betas_zero_snr`` (with its
    ``2**-24`` floor at the end for Euler, DPM-Solver and UniPC), in float32: the table
    its steps use, so the conversion reproduces them exactly (from the betas in float64
    instead, its DPM-Solver loops differ by 1e-5 relative).
    """
    table = torch.as_tensor(scheduler.alphas_cumprod).detach().to("cpu", torch.float64)
    mode = "sigma" if interpolation == "sigma" else "log_snr"
    try:
        return Discrete.from_alphas_cumprod(table, interpolation=mode)
    except ValueError as error:
        raise ValueError(
            f"{type(scheduler).__name__}: its alphas_cumprod (from beta_schedule / "
            f"trained_betas / rescale_betas_zero_snr) is not a valid schedule: {error}"
        ) from None


def _clip(config: dict[str, Any]) -> Clip | None:
    """``thresholding`` (dynamic) or ``clip_sample`` (static), as diffusers applies them."""
    if config.get("thresholding", False):
        ratio, limit = config["dynamic_thresholding_ratio"], config["sample_max_value"]
        return Clip(dynamic=True, ratio=ratio, limit=limit)
    if config.get("clip_sample", False):
        return Clip(limit=config.get("clip_sample_range", 1.0))
    return None


def _timesteps(config: dict[str, Any], rounded: bool = True, drop_last: bool = False) -> Timesteps:
    return Timesteps(
        spacing=config.get("timestep_spacing", "linspace"),
        num_train=config["num_train_timesteps"],
        steps_offset=config.get("steps_offset", 0),
        rounded=rounded,
        drop_last=drop_last,
    )


def _karras_family(scheduler: Any, config: dict[str, Any]) -> tuple[Discrete, SpacingBase]:
    """Euler, Heun, LMS, DPM-SDE: sigmas ``np.interp``-ed at fractional timesteps, or Karras."""
    name, n = type(scheduler).__name__, config["num_train_timesteps"]
    if config.get("use_karras_sigmas", False):
        if config.get("timestep_spacing", "linspace") != "linspace":
            raise ValueError(
                f"{name}.timestep_spacing={config['timestep_spacing']!r} with "
                "use_karras_sigmas=True cannot be honoured (the ramp's ends then depend on "
                "the step count); allowed: ('linspace',)"
            )
        spacing: SpacingBase = Karras(t_max=1.0, t_min=1 / n, sigma_max=None)
        return _schedule(scheduler), spacing
    return _schedule(scheduler, "sigma"), _timesteps(config, rounded=False)


def _end(config: dict[str, Any]) -> float:
    """``final_sigmas_type="sigma_min"``: the last step stops at the first training step."""
    return (
        1 / config["num_train_timesteps"] if config.get("final_sigmas_type") == "sigma_min" else 0.0
    )


def _solver_spacing(config: dict[str, Any]) -> SpacingBase:
    """DPM-Solver / UniPC: ``steps + 1`` spread points, or Karras / Lu rounded timesteps."""
    n = config["num_train_timesteps"]
    snap = None if config["beta_schedule"] == "squaredcos_cap_v2" else n
    if config.get("use_karras_sigmas", False):
        return Karras(t_max=1.0, t_min=1 / n, sigma_max=None, snap=snap)
    if config.get("use_lu_lambdas", False):
        return LogSNR(t_max=1.0, t_min=1 / n, snap=snap)
    return _timesteps(config, drop_last=True)


def _ddpm(scheduler: Any, config: dict[str, Any]) -> SchedulerParts:
    sampler = DDPM(spacing=_timesteps(config), clip=_clip(config))
    return SchedulerParts(_schedule(scheduler), sampler)


def _ddim(scheduler: Any, config: dict[str, Any]) -> SchedulerParts:
    t_end = 0.0 if config.get("set_alpha_to_one", True) else 1 / config["num_train_timesteps"]
    sampler = DDIM(spacing=_timesteps(config), clip=_clip(config), t_end=t_end)
    return SchedulerParts(_schedule(scheduler), sampler)


def _euler(scheduler: Any, config: dict[str, Any]) -> SchedulerParts:
    schedule, spacing = _karras_family(scheduler, config)
    return SchedulerParts(schedule, Euler(spacing=spacing, t_end=_end(config)))


def _euler_ancestral(scheduler: Any, config: dict[str, Any]) -> SchedulerParts:
    schedule, spacing = _karras_family(scheduler, config)
    return SchedulerParts(schedule, EulerAncestral(spacing=spacing))


def _heun(scheduler: Any, config: dict[str, Any]) -> SchedulerParts:
    schedule, spacing = _karras_family(scheduler, config)
    clip = Clip(limit=config["clip_sample_range"]) if config.get("clip_sample") else None
    return SchedulerParts(schedule, Heun(spacing=spacing, clip=clip))


def _lms(scheduler: Any, config: dict[str, Any]) -> SchedulerParts:
    schedule, spacing = _karras_family(scheduler, config)
    return SchedulerParts(schedule, LMS(spacing=spacing))


def _dpm_sde(scheduler: Any, config: dict[str, Any]) -> SchedulerParts:
    schedule, spacing = _karras_family(scheduler, config)
    sampler = DPMSolverPPSDE(spacing=spacing, seed=config.get("noise_sampler_seed"))
    return SchedulerParts(schedule, sampler)


def _dpmsolver(scheduler: Any, config: dict[str, Any]) -> SchedulerParts:
    algorithm = config["algorithm_type"]
    sde = algorithm.startswith("sde-")
    if sde and config["solver_order"] == 3:
        raise ValueError(
            f"DPMSolverMultistepScheduler.solver_order=3 with algorithm_type={algorithm!r} "
            "cannot be honoured (diffusers has no third-order SDE step); allowed: (1, 2)"
        )
    sampler = DPMSolverPP(
        order=config["solver_order"],
        algorithm="dpmsolver" if algorithm.endswith("dpmsolver") else "dpmsolver++",
        eta=1.0 if sde else 0.0,
        solver_type=config["solver_type"],
        lower_order_final=config["lower_order_final"],
        spacing=_solver_spacing(config),
        clip=_clip(config),
        t_end=_end(config),
    )
    return SchedulerParts(_schedule(scheduler), sampler)


def _singlestep(scheduler: Any, config: dict[str, Any]) -> SchedulerParts:
    n = config["num_train_timesteps"]
    spacing: SpacingBase = _timesteps({**config, "timestep_spacing": "linspace"}, drop_last=True)
    if config.get("use_karras_sigmas", False):  # rounded for every beta schedule here
        spacing = Karras(t_max=1.0, t_min=1 / n, sigma_max=None, snap=n)
    algorithm = config["algorithm_type"]
    if algorithm == "sde-dpmsolver++" and config["solver_order"] == 3:
        raise ValueError(
            "DPMSolverSinglestepScheduler.solver_order=3 with algorithm_type='sde-dpmsolver++' "
            "cannot be honoured (its third-order SDE step is untested upstream); allowed: (1, 2)"
        )
    sampler = DPMSolverPPSinglestep(
        order=config["solver_order"],
        algorithm="dpmsolver" if algorithm == "dpmsolver" else "dpmsolver++",
        eta=1.0 if algorithm == "sde-dpmsolver++" else 0.0,
        solver_type=config["solver_type"],
        lower_order_final=config["lower_order_final"],
        spacing=spacing,
        clip=_clip(config),
        t_end=_end(config),
    )
    return SchedulerParts(_schedule(scheduler), sampler)


def _unipc(scheduler: Any, config: dict[str, Any]) -> SchedulerParts:
    if config["solver_type"] not in ("bh1", "bh2"):
        raise ValueError(
            f"UniPCMultistepScheduler.solver_type={config['solver_type']!r} cannot be "
            "honoured; allowed: ('bh1', 'bh2')"
        )
    sampler = UniPC(
        order=config["solver_order"],
        variant=config["solver_type"],
        spacing=_solver_spacing(config),
        clip=_clip(config),
        t_end=_end(config),
    )
    return SchedulerParts(_schedule(scheduler), sampler)


def _pndm(scheduler: Any, config: dict[str, Any]) -> SchedulerParts:
    t_end = 1 / config["num_train_timesteps"] if not config["set_alpha_to_one"] else 0.0
    warmup = "plms" if config["skip_prk_steps"] else "prk"
    combine = "v" if config["prediction_type"] == "v_prediction" else "epsilon"
    sampler = PNDM(warmup=warmup, spacing=_timesteps(config), t_end=t_end, combine=combine)
    return SchedulerParts(_schedule(scheduler), sampler)


def _lcm(scheduler: Any, config: dict[str, Any]) -> SchedulerParts:
    n = config["num_train_timesteps"]
    spacing = LCMSpacing(num_train=n, original_steps=config["original_inference_steps"])
    sampler = LCM(
        timestep_scaling=config["timestep_scaling"],
        num_train=n,
        spacing=spacing,
        clip=_clip(config),
    )
    return SchedulerParts(_schedule(scheduler), sampler)


def _flow_match(scheduler: Any, config: dict[str, Any]) -> SchedulerParts:
    shift, first = float(config["shift"]), 1 / config["num_train_timesteps"]
    t_min = shift * first / (1 + (shift - 1) * first)  # the shifted first step, unshifted
    sampler = Euler(spacing=UniformTime(t_min=t_min))
    return SchedulerParts(RectifiedFlow(shift=shift), sampler)


SCHEDULERS: dict[str, Callable[[Any, dict[str, Any]], SchedulerParts]] = {
    "DDPMScheduler": _ddpm,
    "DDIMScheduler": _ddim,
    "EulerDiscreteScheduler": _euler,
    "EulerAncestralDiscreteScheduler": _euler_ancestral,
    "HeunDiscreteScheduler": _heun,
    "LMSDiscreteScheduler": _lms,
    "DPMSolverMultistepScheduler": _dpmsolver,
    "DPMSolverSDEScheduler": _dpm_sde,
    "DPMSolverSinglestepScheduler": _singlestep,
    "UniPCMultistepScheduler": _unipc,
    "PNDMScheduler": _pndm,
    "LCMScheduler": _lcm,
    "FlowMatchEulerDiscreteScheduler": _flow_match,
}
"""diffusers scheduler class name -> its converter ((scheduler, config) -> ``SchedulerParts``)."""


def scheduler_parts(scheduler: Any) -> SchedulerParts:
    """The diffkit ``(schedule, sampler)`` of a diffusers scheduler; fields refused by name."""
    name = type(scheduler).__name__
    if name not in SCHEDULERS:
        raise TypeError(
            f"from_diffusers: cannot convert {name}; supported: {', '.join(SCHEDULERS)}"
        )
    config = _config(scheduler)
    _check(name, config)
    diffusers_prediction(scheduler)  # refuses an unknown prediction_type by name
    return SCHEDULERS[name](scheduler, config)
