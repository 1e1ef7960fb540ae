"""The reverse process: stateless samplers, their time grids, and DDIM inversion.

Every sampler satisfies [`Sampler`][diffkit.protocols.Sampler]:
``sampler.sample(denoiser, schedule, noise, steps=..., cond=..., guidance=...,
uncond=..., generator=..., callback=...) -> x0``, works with every schedule and every
prediction type, and keeps no state between calls. ``REGISTRY`` maps short names
(``"dpmpp_2m"``, ``"unipc"``, ...) to zero-argument factories of recommended settings.
``fit_solver`` / ``fit_grid`` fit a sampler's grid (and coefficients) to a given model.
"""

from diffkit.samplers._base import Grid as Grid
from diffkit.samplers._base import NonFiniteError as NonFiniteError
from diffkit.samplers._base import SamplerBase as SamplerBase
from diffkit.samplers._base import Step as Step
from diffkit.samplers._base import make_grid as make_grid
from diffkit.samplers._configs import REGISTRY as REGISTRY
from diffkit.samplers._configs import SAMPLERS as SAMPLERS
from diffkit.samplers._configs import DDIMConfig as DDIMConfig
from diffkit.samplers._configs import DDPMConfig as DDPMConfig
from diffkit.samplers._configs import DPMSolverPPConfig as DPMSolverPPConfig
from diffkit.samplers._configs import EulerAncestralConfig as EulerAncestralConfig
from diffkit.samplers._configs import EulerConfig as EulerConfig
from diffkit.samplers._configs import HeunConfig as HeunConfig
from diffkit.samplers._configs import UniPCConfig as UniPCConfig
from diffkit.samplers.ddim import DDIM as DDIM
from diffkit.samplers.ddim import DDPM as DDPM
from diffkit.samplers.dpmsolver import DPMSolverPP as DPMSolverPP
from diffkit.samplers.euler import Euler as Euler
from diffkit.samplers.euler import EulerAncestral as EulerAncestral
from diffkit.samplers.euler import Heun as Heun
from diffkit.samplers.fitting import FittedGrid as FittedGrid
from diffkit.samplers.fitting import FittedSolver as FittedSolver
from diffkit.samplers.fitting import FittedSolverConfig as FittedSolverConfig
from diffkit.samplers.fitting import fit_grid as fit_grid
from diffkit.samplers.fitting import fit_solver as fit_solver
from diffkit.samplers.inversion import DDIMInversion as DDIMInversion
from diffkit.samplers.spacing import SPACINGS as SPACINGS
from diffkit.samplers.spacing import Explicit as Explicit
from diffkit.samplers.spacing import Karras as Karras
from diffkit.samplers.spacing import LogSNR as LogSNR
from diffkit.samplers.spacing import Spacing as Spacing
from diffkit.samplers.spacing import UniformTime as UniformTime
from diffkit.samplers.unipc import UniPC as UniPC

__all__ = [
    "DDIM",
    "DDPM",
    "REGISTRY",
    "SAMPLERS",
    "SPACINGS",
    "DDIMConfig",
    "DDIMInversion",
    "DDPMConfig",
    "DPMSolverPP",
    "DPMSolverPPConfig",
    "Euler",
    "EulerAncestral",
    "EulerAncestralConfig",
    "EulerConfig",
    "Explicit",
    "FittedGrid",
    "FittedSolver",
    "FittedSolverConfig",
    "Grid",
    "Heun",
    "HeunConfig",
    "Karras",
    "LogSNR",
    "NonFiniteError",
    "SamplerBase",
    "Spacing",
    "Step",
    "UniPC",
    "UniPCConfig",
    "UniformTime",
    "fit_grid",
    "fit_solver",
    "make_grid",
]
