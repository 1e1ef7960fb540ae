"""The networks' building blocks, one import away; each is defined in its concept's module.

- [`diffkit.nn.embeddings`][diffkit.nn.embeddings]: time embeddings
  (`timestep_embedding`, `network_timestep`, `TimeEmbedding`).
- [`diffkit.nn.resblocks`][diffkit.nn.resblocks]: convolutional blocks
  (`ResBlock`, `Downsample`, `Upsample`, `group_norm`, `pointwise`).
- [`diffkit.nn.attention`][diffkit.nn.attention]: attention and transformer pieces
  (`Attention`, `FeedForward`, `LocalFeedForward`, `TransformerBlock`,
  `SpatialSelfAttention`, `SpatialTransformer`, `attention_bias`).
- [`diffkit.nn.transformer`][diffkit.nn.transformer]: the adaLN-Zero helpers of the patch
  transformers (`modulate`, `zero_linear`).

Layers compute and hold no input policy: what a network checks on its inputs lives in
[`diffkit.nn.inputs`][diffkit.nn.inputs].
"""

from diffkit.nn.attention import Attention as Attention
from diffkit.nn.attention import FeedForward as FeedForward
from diffkit.nn.attention import LocalFeedForward as LocalFeedForward
from diffkit.nn.attention import SpatialSelfAttention as SpatialSelfAttention
from diffkit.nn.attention import SpatialTransformer as SpatialTransformer
from diffkit.nn.attention import TransformerBlock as TransformerBlock
from diffkit.nn.attention import attention_bias as attention_bias
from diffkit.nn.embeddings import TimeEmbedding as TimeEmbedding
from diffkit.nn.embeddings import network_timestep as network_timestep
from diffkit.nn.embeddings import timestep_embedding as timestep_embedding
from diffkit.nn.resblocks import Downsample as Downsample
from diffkit.nn.resblocks import ResBlock as ResBlock
from diffkit.nn.resblocks import Upsample as Upsample
from diffkit.nn.resblocks import group_norm as group_norm
from diffkit.nn.resblocks import pointwise as pointwise
from diffkit.nn.transformer import modulate as modulate
from diffkit.nn.transformer import zero_linear as zero_linear
