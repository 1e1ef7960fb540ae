"""diffkit: a typed component library for diffusion models in PyTorch."""

from diffkit import builder as builder
from diffkit import checkpoint as checkpoint
from diffkit import config as config
from diffkit import data as data
from diffkit import ema as ema
from diffkit import forward as forward
from diffkit import guidance as guidance
from diffkit import interop as interop
from diffkit import losses as losses
from diffkit import nn as nn
from diffkit import patches as patches
from diffkit import prediction as prediction
from diffkit import samplers as samplers
from diffkit import schedules as schedules
from diffkit import text as text
from diffkit import tokenizers as tokenizers
from diffkit import training as training
from diffkit import typing as typing
from diffkit.builder import PipelineConfig as PipelineConfig
from diffkit.builder import build as build
from diffkit.losses import DiffusionLoss as DiffusionLoss
from diffkit.patches import SpatialPatches as SpatialPatches
from diffkit.patches import TubeletPatches as TubeletPatches
from diffkit.pipeline import Pipeline as Pipeline
from diffkit.protocols import Conditioning as Conditioning
from diffkit.protocols import Denoiser as Denoiser
from diffkit.protocols import Encoder as Encoder
from diffkit.protocols import NoiseSchedule as NoiseSchedule
from diffkit.protocols import Patchifier as Patchifier
from diffkit.protocols import Sampler as Sampler
from diffkit.protocols import TextConditioner as TextConditioner
from diffkit.typing import ShapeError as ShapeError

__version__ = "0.1.0"
