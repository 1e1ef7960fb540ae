"""The component registries of the networks: ``kind`` -> config class and builder."""

from torch import nn

from diffkit.config import Registry

__all__ = ["DENOISERS", "ENCODERS"]

DENOISERS: Registry[nn.Module] = Registry("denoiser")
"""Denoiser networks (U-Net, DiT, video transformer) by config ``kind``."""

ENCODERS: Registry[nn.Module] = Registry("encoder")
"""Latent encoders (KL autoencoder, identity) by config ``kind``."""
