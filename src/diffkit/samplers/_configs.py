"""Pydantic configs for every sampler, the ``SAMPLERS`` registry and the name -> factory map."""

from collections.abc import Callable
from typing import Literal

from pydantic import Field

from diffkit.config import Config, Registry
from diffkit.protocols import Sampler
from diffkit.samplers._base import SamplerBase
from diffkit.samplers.ddim import DDIM, DDPM
from diffkit.samplers.dpmsolver import DPMSolverPP
from diffkit.samplers.euler import Euler, EulerAncestral, Heun
from diffkit.samplers.fitting import FittedSolver, FittedSolverConfig
from diffkit.samplers.spacing import (
    SPACINGS,
    Karras,
    KarrasConfig,
    LogSNR,
    LogSNRConfig,
    Spacing,
    SpacingConfig,
    UniformTime,
    UniformTimeConfig,
)
from diffkit.samplers.unipc import UniPC

__all__ = [
    "REGISTRY",
    "SAMPLERS",
    "DDIMConfig",
    "DDPMConfig",
    "DPMSolverPPConfig",
    "EulerAncestralConfig",
    "EulerConfig",
    "HeunConfig",
    "UniPCConfig",
]

SAMPLERS: Registry[Sampler] = Registry("sampler")
"""``kind`` -> sampler config and builder."""

_SPACING = "time grid: uniform t, uniform log-SNR, Karras rho ramp or explicit times"


def _spacing(config: SpacingConfig) -> Spacing:
    return SPACINGS.build(config)


class DDIMConfig(Config):
    """DDIM with posterior-noise scale ``eta`` (0: deterministic)."""

    kind: Literal["ddim"] = "ddim"
    eta: float = Field(default=0.0, ge=0, description="noise scale; 0 is the DDIM ODE step")
    spacing: SpacingConfig = Field(
        default_factory=UniformTimeConfig, discriminator="kind", description=_SPACING
    )


class DDPMConfig(Config):
    """DDPM ancestral sampling."""

    kind: Literal["ddpm"] = "ddpm"
    spacing: SpacingConfig = Field(
        default_factory=UniformTimeConfig, discriminator="kind", description=_SPACING
    )


class EulerConfig(Config):
    """Euler's method on the EDM ODE."""

    kind: Literal["euler"] = "euler"
    spacing: SpacingConfig = Field(
        default_factory=KarrasConfig, discriminator="kind", description=_SPACING
    )


class EulerAncestralConfig(Config):
    """Euler-ancestral on the EDM ODE."""

    kind: Literal["euler_ancestral"] = "euler_ancestral"
    eta: float = Field(default=1.0, ge=0, description="share of each step's noise re-drawn")
    spacing: SpacingConfig = Field(
        default_factory=KarrasConfig, discriminator="kind", description=_SPACING
    )


class HeunConfig(Config):
    """Heun's second-order method on the EDM ODE (2 NFE per step)."""

    kind: Literal["heun"] = "heun"
    spacing: SpacingConfig = Field(
        default_factory=KarrasConfig, discriminator="kind", description=_SPACING
    )


class DPMSolverPPConfig(Config):
    """DPM-Solver++ multistep (2M / 3M; SDE variant when ``eta > 0``)."""

    kind: Literal["dpmpp"] = "dpmpp"
    order: Literal[1, 2, 3] = Field(default=2, description="multistep order")
    eta: float = Field(default=0.0, ge=0, description="SDE noise scale; 0 is the ODE solver")
    final: Literal["denoised", "extrapolated"] = Field(
        default="denoised",
        description="last step: the last denoised estimate, or two extrapolated to sigma=0",
    )
    spacing: SpacingConfig = Field(
        default_factory=LogSNRConfig, discriminator="kind", description=_SPACING
    )


class UniPCConfig(Config):
    """UniPC predictor-corrector."""

    kind: Literal["unipc"] = "unipc"
    order: Literal[1, 2, 3] = Field(default=2, description="predictor order")
    variant: Literal["bh1", "bh2"] = Field(default="bh2", description="B(h): h or e^h - 1")
    corrector: bool = Field(default=True, description="apply the UniC corrector")
    final: Literal["denoised", "extrapolated"] = Field(
        default="denoised",
        description="last step: the last denoised estimate, or two extrapolated to sigma=0",
    )
    spacing: SpacingConfig = Field(
        default_factory=LogSNRConfig, discriminator="kind", description=_SPACING
    )


SAMPLERS.register(DDIMConfig, lambda c: DDIM(c.eta, _spacing(c.spacing)))
SAMPLERS.register(DDPMConfig, lambda c: DDPM(_spacing(c.spacing)))
SAMPLERS.register(EulerConfig, lambda c: Euler(_spacing(c.spacing)))
SAMPLERS.register(EulerAncestralConfig, lambda c: EulerAncestral(c.eta, _spacing(c.spacing)))
SAMPLERS.register(HeunConfig, lambda c: Heun(_spacing(c.spacing)))
SAMPLERS.register(
    DPMSolverPPConfig, lambda c: DPMSolverPP(c.order, c.eta, _spacing(c.spacing), c.final)
)
SAMPLERS.register(
    UniPCConfig,
    lambda c: UniPC(c.order, c.variant, c.corrector, _spacing(c.spacing), c.final),
)

SAMPLERS.register(
    FittedSolverConfig,
    lambda c: FittedSolver(c.times, c.data, c.correct, c.alpha, c.sigma),
)

REGISTRY: dict[str, Callable[[], SamplerBase]] = {
    "ddpm": DDPM,
    "ddim": DDIM,
    "ddim_logsnr": lambda: DDIM(spacing=LogSNR()),
    "euler": Euler,
    "euler_ancestral": EulerAncestral,
    "heun": Heun,
    "dpmpp_2m": lambda: DPMSolverPP(order=2, spacing=Karras()),
    "dpmpp_2m_logsnr": lambda: DPMSolverPP(order=2, spacing=LogSNR()),
    "dpmpp_3m": lambda: DPMSolverPP(order=3, spacing=Karras()),
    "dpmpp_3m_logsnr": lambda: DPMSolverPP(order=3, spacing=LogSNR()),
    "dpmpp_sde": lambda: DPMSolverPP(order=2, eta=1.0, spacing=LogSNR()),
    "dpmpp_3m_sde": lambda: DPMSolverPP(order=3, eta=1.0, spacing=LogSNR()),
    "unipc": lambda: UniPC(order=2, spacing=LogSNR()),
    "unipc_3": lambda: UniPC(order=3, spacing=LogSNR()),
    # Recommended at low NFE (<= 10): see benchmarks/RESULTS.md.
    "unipc_3_trailing": lambda: UniPC(
        order=3, spacing=UniformTime(trailing=True), final="extrapolated"
    ),
}
"""Short name -> zero-argument factory of a recommended sampler configuration."""
