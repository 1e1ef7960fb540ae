"""Named sampler configurations: ``PRESETS`` (configs) and ``REGISTRY`` (factories)."""

from collections.abc import Callable

from diffkit.samplers._base import SamplerBase
from diffkit.samplers.ddim import DDIM, DDPM
from diffkit.samplers.dpmsolver import DPMSolverPP
from diffkit.samplers.edm import EDMStochastic
from diffkit.samplers.euler import Euler, EulerAncestral, Heun
from diffkit.samplers.lcm import LCM
from diffkit.samplers.lms import LMS
from diffkit.samplers.pndm import PNDM
from diffkit.samplers.singlestep import DPMSolver2, DPMSolverPP2SAncestral, DPMSolverPPSDE
from diffkit.samplers.spacing import Karras, LogSNR, UniformTime
from diffkit.samplers.unipc import UniPC

__all__ = ["PRESETS", "REGISTRY"]

PRESETS: dict[str, SamplerBase] = {
    "ddpm": DDPM(),
    "ddim": DDIM(),
    "ddim_logsnr": DDIM(spacing=LogSNR()),
    "euler": Euler(),
    "euler_ancestral": EulerAncestral(),
    "heun": Heun(),
    # Karras et al. (2022), Algorithm 2, with their ImageNet-64 churn settings
    "edm_stochastic": EDMStochastic(),
    "dpm_2": DPMSolver2(),
    "dpm_2_ancestral": DPMSolver2(eta=1.0),
    "lms": LMS(),
    # latent consistency models (diffusers' LCMScheduler; 2-8 steps)
    "lcm": LCM(),
    # Stable Diffusion 1.x's default scheduler (diffusers' PNDMScheduler, skip_prk_steps=True)
    "pndm": PNDM(),
    "dpmpp_2s_ancestral": DPMSolverPP2SAncestral(),
    "dpmpp_2m": DPMSolverPP(order=2, spacing=Karras()),
    "dpmpp_2m_logsnr": DPMSolverPP(order=2, spacing=LogSNR()),
    "dpmpp_3m": DPMSolverPP(order=3, spacing=Karras()),
    "dpmpp_3m_logsnr": DPMSolverPP(order=3, spacing=LogSNR()),
    "dpmpp_sde": DPMSolverPP(order=2, eta=1.0, spacing=LogSNR()),
    "dpmpp_2m_sde": DPMSolverPP(order=2, eta=1.0, spacing=LogSNR()),
    # k-diffusion's single-step "dpmpp_sde" (Brownian-tree noise); "dpmpp_sde" above is 2M.
    "dpmpp_sde_single": DPMSolverPPSDE(),
    "dpmpp_3m_sde": DPMSolverPP(order=3, eta=1.0, spacing=LogSNR()),
    "unipc": UniPC(order=2, spacing=LogSNR()),
    "unipc_3": UniPC(order=3, spacing=LogSNR()),
    # Recommended at low NFE (<= 10): see benchmarks/RESULTS.md.
    "unipc_3_trailing": UniPC(order=3, spacing=UniformTime(trailing=True), final="extrapolated"),
}
"""Short name -> a recommended sampler configuration (a sampler: configs are immutable)."""

REGISTRY: dict[str, Callable[[], SamplerBase]] = {
    name: preset.model_copy for name, preset in PRESETS.items()
}
"""Short name -> zero-argument factory of that preset (``REGISTRY["unipc"]()``)."""
