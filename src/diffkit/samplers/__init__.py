"""The reverse process: stateless samplers, their time grids, and DDIM inversion.

Every sampler satisfies [`Sampler`][diffkit.protocols.Sampler]:
``sampler.sample(denoiser, schedule, noise, steps=..., cond=..., guidance=...,
uncond=..., generator=..., callback=...) -> x0``, works with every schedule and every
prediction type, and keeps no state between calls. A sampler and a spacing are each one
frozen config (``DDIM(eta=0.5, spacing=LogSNR())``), registered by ``kind`` in
``SAMPLERS`` / ``SPACINGS``; ``PRESETS`` names recommended configurations and
``REGISTRY`` maps the same names (``"dpmpp_2m"``, ``"unipc"``, ...) to zero-argument
factories. ``sampler.prepare(schedule, steps)`` gives the immutable
[`Plan`][diffkit.samplers.Plan] (grid and coefficients) for reuse across calls.
Samplers that are linear in grid values subclass ``SamplerBase`` and write ``plan``;
others subclass ``StepSampler`` and write ``step``. ``fit_solver`` / ``fit_grid`` fit a
sampler's grid (and coefficients) to a given model. ``extend_video`` makes a clip longer
than the model's window by VDM's replacement method (any sampler, unchanged);
``seam_differences`` measures its seams.
"""

from diffkit.samplers._base import SAMPLERS as SAMPLERS
from diffkit.samplers._base import Grid as Grid
from diffkit.samplers._base import NonFiniteError as NonFiniteError
from diffkit.samplers._base import Plan as Plan
from diffkit.samplers._base import Point as Point
from diffkit.samplers._base import SamplerBase as SamplerBase
from diffkit.samplers._base import Step as Step
from diffkit.samplers._base import StopsAt as StopsAt
from diffkit.samplers._base import make_grid as make_grid
from diffkit.samplers.clipping import Clip as Clip
from diffkit.samplers.ddim import DDIM as DDIM
from diffkit.samplers.ddim import DDPM as DDPM
from diffkit.samplers.dpmsolver import DPMSolverPP as DPMSolverPP
from diffkit.samplers.dpmsolver import DPMSolverPPSinglestep as DPMSolverPPSinglestep
from diffkit.samplers.edm import EDMStochastic as EDMStochastic
from diffkit.samplers.euler import Euler as Euler
from diffkit.samplers.euler import EulerAncestral as EulerAncestral
from diffkit.samplers.euler import Heun as Heun
from diffkit.samplers.extend import Replacement as Replacement
from diffkit.samplers.extend import extend_video as extend_video
from diffkit.samplers.extend import frame_differences as frame_differences
from diffkit.samplers.extend import seam_differences as seam_differences
from diffkit.samplers.fitting import FittedGrid as FittedGrid
from diffkit.samplers.fitting import FittedSolver as FittedSolver
from diffkit.samplers.fitting import fit_grid as fit_grid
from diffkit.samplers.fitting import fit_solver as fit_solver
from diffkit.samplers.inversion import DDIMInversion as DDIMInversion
from diffkit.samplers.lcm import LCM as LCM
from diffkit.samplers.lms import LMS as LMS
from diffkit.samplers.noise import BrownianTreeNoise as BrownianTreeNoise
from diffkit.samplers.noise import Noise as Noise
from diffkit.samplers.pndm import PNDM as PNDM
from diffkit.samplers.presets import PRESETS as PRESETS
from diffkit.samplers.presets import REGISTRY as REGISTRY
from diffkit.samplers.singlestep import DPMSolver2 as DPMSolver2
from diffkit.samplers.singlestep import DPMSolverPP2SAncestral as DPMSolverPP2SAncestral
from diffkit.samplers.singlestep import DPMSolverPPSDE as DPMSolverPPSDE
from diffkit.samplers.spacing import SPACINGS as SPACINGS
from diffkit.samplers.spacing import AnySpacing as AnySpacing
from diffkit.samplers.spacing import Explicit as Explicit
from diffkit.samplers.spacing import Karras as Karras
from diffkit.samplers.spacing import LCMSpacing as LCMSpacing
from diffkit.samplers.spacing import Leading as Leading
from diffkit.samplers.spacing import LogSNR as LogSNR
from diffkit.samplers.spacing import Spacing as Spacing
from diffkit.samplers.spacing import SpacingBase as SpacingBase
from diffkit.samplers.spacing import Timesteps as Timesteps
from diffkit.samplers.spacing import UniformTime as UniformTime
from diffkit.samplers.stepping import StepModel as StepModel
from diffkit.samplers.stepping import StepSampler as StepSampler
from diffkit.samplers.unipc import UniPC as UniPC

__all__ = [
    "DDIM",
    "DDPM",
    "LCM",
    "LMS",
    "PNDM",
    "PRESETS",
    "REGISTRY",
    "SAMPLERS",
    "SPACINGS",
    "AnySpacing",
    "BrownianTreeNoise",
    "Clip",
    "DDIMInversion",
    "DPMSolver2",
    "DPMSolverPP",
    "DPMSolverPP2SAncestral",
    "DPMSolverPPSDE",
    "DPMSolverPPSinglestep",
    "EDMStochastic",
    "Euler",
    "EulerAncestral",
    "Explicit",
    "FittedGrid",
    "FittedSolver",
    "Grid",
    "Heun",
    "Karras",
    "LCMSpacing",
    "Leading",
    "LogSNR",
    "Noise",
    "NonFiniteError",
    "Plan",
    "Point",
    "Replacement",
    "SamplerBase",
    "Spacing",
    "SpacingBase",
    "Step",
    "StepModel",
    "StepSampler",
    "StopsAt",
    "Timesteps",
    "UniPC",
    "UniformTime",
    "extend_video",
    "fit_grid",
    "fit_solver",
    "frame_differences",
    "make_grid",
    "seam_differences",
]
