"""Networks: U-Net, DiT and video denoisers, the latent autoencoder, and their layers.

Each network has a pydantic config registered in [`DENOISERS`][diffkit.nn.DENOISERS] or
[`ENCODERS`][diffkit.nn.ENCODERS], so ``DENOISERS.build({"kind": "unet", ...})`` builds it.
"""

from diffkit.nn import clip as clip
from diffkit.nn import layers as layers
from diffkit.nn import t5 as t5
from diffkit.nn._registry import DENOISERS as DENOISERS
from diffkit.nn._registry import ENCODERS as ENCODERS
from diffkit.nn.dit import DiT as DiT
from diffkit.nn.dit import DiTConfig as DiTConfig
from diffkit.nn.unet import UNet as UNet
from diffkit.nn.unet import UNetConfig as UNetConfig
from diffkit.nn.vae import DiagonalGaussian as DiagonalGaussian
from diffkit.nn.vae import IdentityEncoder as IdentityEncoder
from diffkit.nn.vae import IdentityEncoderConfig as IdentityEncoderConfig
from diffkit.nn.vae import KLAutoencoder as KLAutoencoder
from diffkit.nn.vae import KLAutoencoderConfig as KLAutoencoderConfig
from diffkit.nn.video import VideoDiT as VideoDiT
from diffkit.nn.video import VideoDiTConfig as VideoDiTConfig
