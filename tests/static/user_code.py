"""Code written the way a user of diffkit writes it, for the static type checker.

CI runs ``pyright src tests/static``: every public config must be constructible from its
defaults plus keyword overrides without the checker asking for fields that have
defaults (pydantic ``Field(x, ...)`` with a positional default hides it from pyright's
dataclass transform; diffkit writes ``Field(default=x, ...)``). ``tests/test_static.py``
also runs these functions, so the file cannot drift from the real API.
"""

from typing import Literal

import torch
from torch import Tensor

import diffkit as dk
from diffkit.config import Config
from diffkit.losses import DiffusionLoss
from diffkit.nn.clip import CLIPConfig, ResNetTowerConfig, TextTowerConfig, VisionTowerConfig
from diffkit.nn.dit import DiTConfig
from diffkit.nn.t5 import T5EncoderConfig
from diffkit.nn.unet import UNetConfig
from diffkit.nn.vae import IdentityEncoderConfig, KLAutoencoderConfig
from diffkit.nn.video import VideoDiTConfig
from diffkit.patches import SpatialPatches, TubeletPatches
from diffkit.samplers import (
    DDIM,
    DDPM,
    DDIMInversion,
    DPMSolver2,
    DPMSolverPP,
    DPMSolverPP2SAncestral,
    DPMSolverPPSDE,
    Euler,
    EulerAncestral,
    Heun,
    Karras,
    Leading,
    LogSNR,
    UniformTime,
    UniPC,
)
from diffkit.schedules import (
    EDM,
    Cosine,
    Discrete,
    LinearBeta,
    RectifiedFlow,
    SqrtLinearBeta,
    ZeroTerminalSNR,
)
from diffkit.training import AutoencoderLoss, TrainConfig, TrainRunConfig
from diffkit.typing import Prediction
from diffkit_demo.datasets import DigitsConfig, MovingDigitsConfig


def default_configs() -> list[Config]:
    """Every public config that has no required field, built from its defaults."""
    configs: list[Config] = [
        SpatialPatches(),
        TubeletPatches(),
        DigitsConfig(),
        MovingDigitsConfig(),
        TextTowerConfig(),
        T5EncoderConfig(),
        VisionTowerConfig(),
        ResNetTowerConfig(),
        CLIPConfig(),
        DiTConfig(),
        UNetConfig(),
        KLAutoencoderConfig(),
        IdentityEncoderConfig(),
        VideoDiTConfig(),
        DiffusionLoss(),
        UniformTime(),
        LogSNR(),
        Karras(),
        LinearBeta(),
        SqrtLinearBeta(),
        Cosine(),
        EDM(),
        RectifiedFlow(),
        Discrete(),
        ZeroTerminalSNR(base=Cosine(offset=0.01)),
        DDIM(),
        DDPM(),
        Euler(),
        EulerAncestral(),
        Heun(),
        DPMSolver2(),
        DPMSolverPP2SAncestral(),
        DPMSolverPPSDE(),
        dk.samplers.LMS(),
        Leading(),
        DPMSolverPP(),
        UniPC(),
        DDIMInversion(),
        AutoencoderLoss(),
        TrainConfig(),
    ]
    return configs


def a_training_run() -> TrainRunConfig:
    """A small text-free pixel-space run, overriding a few fields by keyword."""
    pipeline = dk.PipelineConfig(
        data_shape=(1, 16, 16),
        schedule=Cosine(),
        denoiser=UNetConfig(
            in_channels=1,
            base_channels=16,
            channel_mult=(1, 2),
            norm_groups=8,
            attention_resolutions=(2,),
        ),
        steps=10,
    )
    return TrainRunConfig(
        pipeline=pipeline,
        data=DigitsConfig(size=16, split="train"),
        train=TrainConfig(steps=4, batch_size=8, lr=1e-3, progress=False),
    )


class ShrinkDenoiser(torch.nn.Module):
    """A user's own denoiser: the protocol is structural, ``prediction`` a plain attribute."""

    prediction: Prediction = "x0"

    def forward(self, x_t: Tensor, t: Tensor, cond: dk.Conditioning | None = None) -> Tensor:
        """E[x0 | x_t] for standard normal data under a variance-preserving schedule."""
        return x_t * 0.5


class NarrowDenoiser(torch.nn.Module):
    """A narrower ``Literal`` satisfies the protocol too (it is read-only there)."""

    prediction: Literal["x0"] = "x0"

    def forward(self, x_t: Tensor, t: Tensor, cond: dk.Conditioning | None = None) -> Tensor:
        """The same shrinkage as ``ShrinkDenoiser``."""
        return x_t * 0.5


def sample_with_own_denoiser() -> Tensor:
    """Sample with a user-written denoiser and a schedule built from a JSON string."""
    schedule = dk.schedules.SCHEDULES.build(Cosine().to_json())
    sampler = dk.samplers.REGISTRY["dpmpp_2m"]()
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    first = sampler.sample(ShrinkDenoiser(), schedule, noise, steps=3)
    plan = DDIM(eta=0.5, spacing=LogSNR(power=2.0)).prepare(schedule, 3)
    again = plan.sampler.sample(NarrowDenoiser(), schedule, noise, steps=3, plan=plan)
    return first + sampler.sample(NarrowDenoiser(), schedule, noise, steps=3) + again
