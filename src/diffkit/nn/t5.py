"""The T5 text encoder (Raffel et al. 2020), as PixArt and Stable Diffusion 3 condition on it.

Token ids are embedded (no positions are added), then ``layers`` pre-norm blocks: RMS
norm, self-attention over all tokens, RMS norm, MLP, each a residual branch; a final RMS
norm. Positions enter as T5's *relative position bias*: the distance ``j - i`` from query
``i`` to key ``j`` is binned into ``num_buckets`` buckets (exact for small distances,
logarithmic up to ``max_distance``, one bucket per direction beyond) and each bucket has a
learned bias per head, added to the attention scores of every block. The scores are not
scaled by ``head_dim ** -0.5`` (T5's weights absorb it). The MLP is ReLU (T5 1.0) or
gated-GELU (T5 1.1, Flan-T5: ``activation="gelu_tanh", gated=True``), without biases.

The attention layers are [`Attention`][diffkit.nn.attention.Attention] and the MLPs
[`FeedForward`][diffkit.nn.attention.FeedForward]; ``diffkit.interop.from_transformers``
loads a transformers ``T5EncoderModel`` into a [`T5Encoder`][diffkit.nn.t5.T5Encoder].
"""

import math
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from pydantic import Field, model_validator
from torch import Tensor, nn

from diffkit.config import Config
from diffkit.nn.attention import Attention, FeedForward, FeedForwardKind, attention_bias
from diffkit.typing import ShapeError, checked_layer, host_range

__all__ = ["T5Block", "T5Encoder", "T5EncoderConfig", "relative_position_buckets"]

T5Activation = Literal["relu", "gelu", "gelu_tanh"]


class T5EncoderConfig(Config):
    """A T5 encoder stack (defaults: T5 v1.1 XXL, the text encoder of PixArt and SD3)."""

    kind: Literal["t5_encoder"] = "t5_encoder"
    vocab_size: int = Field(default=32128, gt=0, le=2**20, description="number of token ids")
    width: int = Field(
        default=4096, gt=0, le=65536, description="hidden size of every token (d_model)"
    )
    layers: int = Field(default=24, ge=0, le=256, description="number of blocks")
    heads: int = Field(default=64, gt=0, le=1024, description="attention heads")
    head_dim: int = Field(default=64, gt=0, le=4096, description="width of each head (d_kv)")
    mlp_width: int = Field(default=10240, gt=0, le=2**18, description="MLP hidden size (d_ff)")
    activation: T5Activation = Field(
        default="gelu_tanh", description="MLP activation (T5 1.0: relu; 1.1 / Flan: gelu_tanh)"
    )
    gated: bool = Field(
        default=True, description="gated MLP: act(x W0) * (x W1) (T5 1.1 / Flan: yes; 1.0: no)"
    )
    num_buckets: int = Field(default=32, ge=4, le=4096, description="relative position buckets")
    max_distance: int = Field(
        default=128, ge=1, le=2**20, description="distances from this on share the last bucket"
    )
    layer_norm_eps: float = Field(default=1e-6, gt=0, description="RMS norm epsilon")

    @model_validator(mode="after")
    def _check(self) -> "T5EncoderConfig":
        if 2 * (self.num_buckets // 2) != self.num_buckets:
            raise ValueError(f"num_buckets {self.num_buckets} must be even (one half per side)")
        if self.max_distance < self.num_buckets // 4 + 1:
            raise ValueError(
                f"max_distance {self.max_distance} must exceed num_buckets // 4 "
                f"({self.num_buckets // 4}), where the logarithmic buckets start"
            )
        return self

    @property
    def mlp_kind(self) -> FeedForwardKind:
        """The [`FeedForward`][diffkit.nn.attention.FeedForward] kind of the MLPs."""
        gated: dict[T5Activation, FeedForwardKind] = {
            "relu": "reglu",
            "gelu": "geglu",
            "gelu_tanh": "geglu_tanh",
        }
        return gated[self.activation] if self.gated else self.activation


def relative_position_buckets(
    queries: int, keys: int, num_buckets: int, max_distance: int, device: torch.device
) -> Int[Tensor, "queries keys"]:
    """T5's bidirectional bucket of each distance ``key - query``, ``(queries, keys)``.

    Half the buckets are for keys after the query; in each half, distances below a quarter
    of ``num_buckets`` get a bucket each, larger ones logarithmic bins up to ``max_distance``.
    """
    distance = (
        torch.arange(keys, device=device)[None, :] - torch.arange(queries, device=device)[:, None]
    )
    half = num_buckets // 2
    exact = half // 2
    side = (distance > 0).long() * half
    far = distance.abs()
    # clamped below at 1: log(0) is never selected but must not be computed as -inf -> long
    scaled = torch.log(far.clamp_min(1).float() / exact) / math.log(max_distance / exact)
    log_bucket = (exact + (scaled * (half - exact)).long()).clamp_max(half - 1)
    return side + torch.where(far < exact, far, log_bucket)


class T5Block(nn.Module):
    """``x + attn(norm1(x), bias)``, then ``x + mlp(norm2(x))``; RMS norms, no biases."""

    def __init__(self, config: T5EncoderConfig) -> None:
        super().__init__()
        c = config
        self.norm1 = nn.RMSNorm(c.width, eps=c.layer_norm_eps)
        self.attn = Attention(c.width, c.heads, c.head_dim, out_bias=False, scale=1.0)
        self.norm2 = nn.RMSNorm(c.width, eps=c.layer_norm_eps)
        self.mlp = FeedForward(c.width, kind=c.mlp_kind, inner=c.mlp_width, bias=False)

    @checked_layer
    def forward(
        self,
        x: Float[Tensor, "batch tokens dim"],
        bias: Float[Tensor, "#batch heads tokens tokens"],
    ) -> Float[Tensor, "batch tokens dim"]:
        """Tokens ``(b, n, dim)``; ``bias`` added to the attention scores."""
        x = x + self.attn(self.norm1(x), bias=bias)
        return x + self.mlp(self.norm2(x))


class T5Encoder(nn.Module):
    """Token ids ``(batch, n)`` (and a keep-mask) to T5's last hidden states."""

    def __init__(self, config: T5EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.width = config.width
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.relative_bias = nn.Embedding(config.num_buckets, config.heads)
        self.blocks = nn.ModuleList(T5Block(config) for _ in range(config.layers))
        self.final_norm = nn.RMSNorm(config.width, eps=config.layer_norm_eps)
        nn.init.normal_(self.token_embedding.weight, std=1.0)
        nn.init.normal_(self.relative_bias.weight, std=config.width**-0.5)

    def position_bias(self, n: int, device: torch.device) -> Float[Tensor, "1 heads n n"]:
        """The learned bias of every (query, key) distance, ``(1, heads, n, n)``."""
        c = self.config
        buckets = relative_position_buckets(n, n, c.num_buckets, c.max_distance, device)
        return self.relative_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    @checked_layer
    def forward(
        self, token_ids: Int[Tensor, "batch n"], mask: Bool[Tensor, "batch n"] | None = None
    ) -> Float[Tensor, "batch n dim"]:
        """Ids ``(batch, n)`` to hidden states; ``mask`` (``True``: a real token) hides the
        padding from every attention (PixArt passes it; SD3 does not)."""
        ends = host_range(token_ids)
        vocab = self.config.vocab_size
        if ends is not None and not 0 <= ends[0] <= ends[1] < vocab:
            raise ValueError(
                f"T5Encoder: token_ids must be in [0, vocab_size={vocab}), got ids from "
                f"{int(ends[0])} to {int(ends[1])}"
            )
        if mask is not None and mask.shape != token_ids.shape:
            raise ShapeError(
                f"T5Encoder: mask {tuple(mask.shape)} must have the shape of token_ids "
                f"{tuple(token_ids.shape)}"
            )
        x = self.token_embedding(token_ids)
        bias = self.position_bias(token_ids.shape[1], token_ids.device).to(x.dtype)
        padding = attention_bias(mask, x.dtype)
        if padding is not None:
            bias = bias + padding
        for block in self.blocks:
            x = block(x, bias)
        return self.final_norm(x)
