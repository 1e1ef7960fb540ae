"""CLIP: a text tower and an image tower trained to agree (Radford et al. 2021).

A batch of N (image, caption) pairs gives N² candidate pairings. Both towers map into
one ``embed_dim``-dimensional space, embeddings are L2-normalised, and the symmetric
InfoNCE loss asks every image to pick its own caption among the N captions and every
caption its own image, at a learned temperature::

    logits = exp(s) * normalize(f_img(images)) @ normalize(f_txt(texts)).T   # (N, N)
    loss   = (CE(logits, arange(N)) + CE(logits.T, arange(N))) / 2

with the log-scale ``s`` clamped to ``[0, ln 100]`` as in CLIP.

- [`TextTower`][diffkit.nn.clip.TextTower]: token + position embeddings, a pre-LayerNorm
  transformer with a causal mask, a final LayerNorm; pooled at the end-of-text token
  (the largest id of the row, CLIP's rule, or the first ``eos_token_id``).
- [`VisionTower`][diffkit.nn.clip.VisionTower]: a ViT over
  [`SpatialPatches`][diffkit.patches.SpatialPatches] with a class token, pooled at it.
- [`ResNetTower`][diffkit.nn.clip.ResNetTower]: a small GroupNorm ResNet, average-pooled
  (an alternative image tower for training from scratch).
- [`CLIP`][diffkit.nn.clip.CLIP], [`contrastive_loss`][diffkit.nn.clip.contrastive_loss],
  [`ZeroShotClassifier`][diffkit.nn.clip.ZeroShotClassifier] (prompt templates averaged
  per class).

The layout matches open_clip's ``CLIP`` and transformers' ``CLIPTextModel`` so their
weights load exactly (see ``diffkit.interop``).
"""

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float, Int
from pydantic import Field, model_validator
from torch import Tensor, nn

from diffkit.config import NetworkConfig, Registry, field_error
from diffkit.patches import SpatialPatches
from diffkit.tokenizers import Tokenizer
from diffkit.typing import Image, ShapeError, TokenIds, checked, checked_layer, host_range

__all__ = [
    "CLIP",
    "CLIP_MODELS",
    "CLIPConfig",
    "ResNetTower",
    "ResNetTowerConfig",
    "ResidualAttentionBlock",
    "TextTower",
    "TextTowerConfig",
    "VisionTower",
    "VisionTowerConfig",
    "ZeroShotClassifier",
    "contrastive_loss",
]

Activation = Literal["gelu", "quick_gelu"]
Hidden = Float[Tensor, "batch tokens dim"]
Embedding = Float[Tensor, "batch embed"]

MAX_LOGIT_SCALE = math.log(100.0)
"""CLIP clamps the log of its logit scale to ``[0, ln 100]`` (temperature >= 0.01)."""


def _block_estimate(width: int, mlp_width: int | None) -> int:
    """Parameters of one transformer block's projections: q, k, v, out and the MLP."""
    return 4 * width * width + 2 * width * (mlp_width or 4 * width)


class TextTowerConfig(NetworkConfig):
    """A CLIP text transformer (defaults: ViT-B/32's text tower)."""

    kind: Literal["clip_text_tower"] = "clip_text_tower"
    vocab_size: int = Field(default=49408, gt=0, description="number of token ids")
    context_length: int = Field(default=77, ge=2, description="longest token sequence (positions)")
    width: int = Field(default=512, gt=0, description="hidden size of every token")
    layers: int = Field(default=12, ge=0, le=256, description="number of transformer blocks")
    heads: int = Field(default=8, gt=0, description="attention heads; must divide width")
    mlp_width: int | None = Field(
        default=None, gt=0, description="MLP hidden size; None: 4 * width"
    )
    activation: Activation = Field(
        default="gelu", description="MLP activation (OpenAI CLIP: quick_gelu)"
    )
    layer_norm_eps: float = Field(default=1e-5, gt=0, description="LayerNorm epsilon")
    eos_token_id: int | None = Field(
        default=None,
        ge=0,
        description="pool at the first position of this id; None: at the largest id",
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "TextTowerConfig":
        if self.width % self.heads:
            message = f"heads ({self.heads}) must divide width ({self.width})"
            raise field_error("TextTowerConfig", "heads", message, self.heads)
        if self.eos_token_id is not None and self.eos_token_id >= self.vocab_size:
            message = (
                f"eos_token_id ({self.eos_token_id}) must be a token id, below vocab_size "
                f"({self.vocab_size})"
            )
            raise field_error("TextTowerConfig", "eos_token_id", message, self.eos_token_id)
        return self

    def parameter_estimate(self) -> int:
        """A lower bound on the tower's parameters: token and position embeddings, and
        each block's attention and MLP projections (norms and biases left out)."""
        embeddings = (self.vocab_size + self.context_length) * self.width
        return embeddings + self.layers * _block_estimate(self.width, self.mlp_width)


class VisionTowerConfig(NetworkConfig):
    """A CLIP ViT image tower (defaults: ViT-B/16)."""

    kind: Literal["clip_vit"] = "clip_vit"
    image_size: int = Field(
        default=224, gt=0, description="height and width of the (square) images"
    )
    patch_size: int = Field(
        default=16, gt=0, description="side of the square patches; divides image_size"
    )
    channels: int = Field(default=3, gt=0, description="image channels")
    width: int = Field(default=768, gt=0, description="hidden size of every token")
    layers: int = Field(default=12, ge=0, le=256, description="number of transformer blocks")
    heads: int = Field(default=12, gt=0, description="attention heads; must divide width")
    mlp_width: int | None = Field(
        default=None, gt=0, description="MLP hidden size; None: 4 * width"
    )
    activation: Activation = Field(
        default="gelu", description="MLP activation (OpenAI CLIP: quick_gelu)"
    )
    layer_norm_eps: float = Field(default=1e-5, gt=0, description="LayerNorm epsilon")

    @model_validator(mode="after")
    def _check(self) -> "VisionTowerConfig":
        if self.width % self.heads:
            message = f"heads ({self.heads}) must divide width ({self.width})"
            raise field_error("VisionTowerConfig", "heads", message, self.heads)
        if self.image_size % self.patch_size:
            message = f"patch_size ({self.patch_size}) must divide image_size ({self.image_size})"
            raise field_error("VisionTowerConfig", "patch_size", message, self.patch_size)
        return self

    def parameter_estimate(self) -> int:
        """A lower bound on the tower's parameters: patch and position embeddings, and
        each block's attention and MLP projections (norms and biases left out)."""
        grid = self.image_size // self.patch_size
        embeddings = (self.channels * self.patch_size**2 + grid * grid + 1) * self.width
        return embeddings + self.layers * _block_estimate(self.width, self.mlp_width)


class ResNetTowerConfig(NetworkConfig):
    """A small ResNet image tower (GroupNorm, average pooling) for training from scratch."""

    kind: Literal["clip_resnet"] = "clip_resnet"
    image_size: int = Field(default=224, gt=0, description="height and width of the images")
    channels: int = Field(default=3, gt=0, description="image channels")
    widths: tuple[int, ...] = Field(
        default=(64, 128, 256, 512),
        min_length=1,
        max_length=16,
        description="channels of each stage (at most 16 stages)",
    )
    blocks: tuple[int, ...] = Field(
        default=(2, 2, 2, 2),
        min_length=1,
        max_length=16,
        description="residual blocks per stage (1 to 64 each)",
    )
    norm_groups: int = Field(default=8, gt=0, description="GroupNorm groups; divides every width")

    @model_validator(mode="after")
    def _check(self) -> "ResNetTowerConfig":
        owner = "ResNetTowerConfig"
        if len(self.widths) != len(self.blocks):
            message = f"widths {self.widths} and blocks {self.blocks} must have one entry per stage"
            raise field_error(owner, "blocks", message, self.blocks)
        if any(w < 1 for w in self.widths):
            raise field_error(owner, "widths", "every stage needs a positive width", self.widths)
        if any(not 1 <= b <= 64 for b in self.blocks):
            message = "every stage needs at least one block, and at most 64"
            raise field_error(owner, "blocks", message, self.blocks)
        if any(w % self.norm_groups for w in self.widths):
            message = f"norm_groups ({self.norm_groups}) must divide every width"
            raise field_error(owner, "norm_groups", message, self.norm_groups)
        return self

    def parameter_estimate(self) -> int:
        """A lower bound on the tower's parameters: the stem and the second 3x3 convolution
        of each block (norms, first convolutions and shortcuts left out)."""
        stem = 9 * self.channels * self.widths[0]
        return stem + sum(9 * w * w * b for w, b in zip(self.widths, self.blocks, strict=False))


class CLIPConfig(NetworkConfig):
    """A CLIP model: both towers, the shared embedding size and the initial temperature."""

    kind: Literal["clip"] = "clip"
    embed_dim: int = Field(default=512, gt=0, description="size of the shared text-image embedding")
    text: TextTowerConfig = Field(
        default_factory=lambda: TextTowerConfig(), description="text tower"
    )
    vision: VisionTowerConfig | ResNetTowerConfig = Field(
        default_factory=lambda: VisionTowerConfig(),
        discriminator="kind",
        description="image tower: a ViT (clip_vit) or a small ResNet (clip_resnet)",
    )
    init_logit_scale: float = Field(
        default=math.log(1 / 0.07),
        ge=0,
        le=MAX_LOGIT_SCALE,
        description="initial log of the logit scale",
    )

    def parameter_estimate(self) -> int:
        """A lower bound on the model's parameters: both towers and their projections."""
        vision_width = (
            self.vision.width
            if isinstance(self.vision, VisionTowerConfig)
            else self.vision.widths[-1]
        )
        projections = self.embed_dim * (self.text.width + vision_width)
        return self.text.parameter_estimate() + self.vision.parameter_estimate() + projections


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, the GELU approximation OpenAI's CLIP was trained with."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def _activation(name: Activation) -> nn.Module:
    return QuickGELU() if name == "quick_gelu" else nn.GELU()


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_width: int | None = None,
        activation: Activation = "gelu",
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.heads = heads
        mlp_width = mlp_width or 4 * width
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.qkv = nn.Linear(width, 3 * width)  # rows: [q; k; v], heads contiguous in each
        self.out = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.fc = nn.Linear(width, mlp_width)
        self.act = _activation(activation)
        self.proj = nn.Linear(mlp_width, width)

    @checked_layer
    def forward(self, x: Hidden, causal: bool = False) -> Hidden:
        """Tokens ``(batch, tokens, width)``; ``causal``: token i attends to tokens <= i."""
        q, k, v = rearrange(
            self.qkv(self.ln_1(x)), "b n (three h d) -> three b h n d", three=3, h=self.heads
        )
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        x = x + self.out(rearrange(attended, "b h n d -> b n (h d)"))
        return x + self.proj(self.act(self.fc(self.ln_2(x))))


def _blocks(config: TextTowerConfig | VisionTowerConfig) -> nn.ModuleList:
    """The tower's ``config.layers`` blocks (initialised afterwards by ``_init_blocks``)."""
    return nn.ModuleList(
        ResidualAttentionBlock(
            config.width, config.heads, config.mlp_width, config.activation, config.layer_norm_eps
        )
        for _ in range(config.layers)
    )


def _projection(width: int, proj_dim: int | None) -> nn.Linear | None:
    """The bias-free projection into the shared embedding space; ``None`` without ``proj_dim``."""
    return nn.Linear(width, proj_dim, bias=False) if proj_dim is not None else None


def _init_blocks(blocks: nn.ModuleList, width: int) -> None:
    """CLIP's initialisation: attention ~ width^-1/2, residual outputs shrunk with depth."""
    proj_std = width**-0.5 * (2 * max(len(blocks), 1)) ** -0.5
    for block in blocks:
        assert isinstance(block, ResidualAttentionBlock)
        nn.init.normal_(block.qkv.weight, std=width**-0.5)
        nn.init.zeros_(block.qkv.bias)
        nn.init.normal_(block.out.weight, std=proj_std)
        nn.init.zeros_(block.out.bias)
        nn.init.normal_(block.fc.weight, std=(2 * width) ** -0.5)
        nn.init.normal_(block.proj.weight, std=proj_std)


class TextTower(nn.Module):
    """Token ids ``(batch, n)`` to hidden states and the pooled end-of-text state.

    ``forward`` returns ``(tokens, pooled)``: the final-LayerNorm hidden states
    ``(batch, n, width)`` and the state at the end token ``(batch, width)``, both
    before any projection (transformers' ``last_hidden_state`` / ``pooler_output``).
    ``encode`` returns the pooled state through ``projection`` (CLIP's text embedding).
    """

    def __init__(self, config: TextTowerConfig, proj_dim: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.width = config.width
        self.context_length = config.context_length
        self.output_dim = proj_dim or config.width
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.width))
        self.blocks = _blocks(config)
        self.ln_final = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.projection = _projection(config.width, proj_dim)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        _init_blocks(self.blocks, config.width)
        if self.projection is not None:
            nn.init.normal_(self.projection.weight, std=config.width**-0.5)

    def end_positions(self, token_ids: Tensor) -> Tensor:
        """Index ``(batch,)`` of each row's end-of-text token (the pooling position)."""
        if self.config.eos_token_id is None:
            return token_ids.argmax(dim=-1)
        return (token_ids == self.config.eos_token_id).int().argmax(dim=-1)

    @checked_layer
    def forward(
        self, token_ids: TokenIds, skip_last_layers: int = 0, final_norm: bool = True
    ) -> tuple[Float[Tensor, "batch context dim"], Float[Tensor, "batch dim"]]:
        """Ids ``(batch, n)``, ``n <= context_length`` -> (hidden states, pooled state).

        The hidden states are taken ``skip_last_layers`` blocks before the end ("CLIP
        skip": Stable Diffusion 2.x and SDXL use 1), through the final LayerNorm when
        ``final_norm`` (SD 1.x / 2.x: yes; SDXL: no). The pooled state always comes from
        the full tower and its final LayerNorm.
        """
        n = token_ids.shape[1]
        if n > self.context_length:
            raise ShapeError(
                f"TextTower: token_ids has {n} positions, more than context_length "
                f"{self.context_length}"
            )
        if not 0 <= skip_last_layers <= len(self.blocks):
            raise ValueError(
                f"TextTower: skip_last_layers must be in [0, {len(self.blocks)}], "
                f"got {skip_last_layers}"
            )
        # CPU ids only (host_range): on an accelerator a bad id fails inside the embedding
        # instead, since reading the ids back would sync the device on every call.
        ends = host_range(token_ids)
        vocab = self.config.vocab_size
        if ends is not None and not 0 <= ends[0] <= ends[1] < vocab:
            raise ValueError(
                f"TextTower: token_ids must be in [0, vocab_size={vocab}), got ids from "
                f"{int(ends[0])} to {int(ends[1])} (a tokenizer with a larger vocabulary?)"
            )
        x = self.token_embedding(token_ids) + self.positional_embedding[:n]
        hidden = x
        for i, block in enumerate(self.blocks):
            x = block(x, causal=True)
            if i == len(self.blocks) - 1 - skip_last_layers:
                hidden = x
        out = self.ln_final(x)
        pooled = out[torch.arange(x.shape[0], device=x.device), self.end_positions(token_ids)]
        if skip_last_layers == 0 and final_norm:
            return out, pooled
        return (self.ln_final(hidden) if final_norm else hidden), pooled

    @checked_layer
    def encode(self, token_ids: TokenIds) -> Embedding:
        """Ids ``(batch, n)`` to the projected (not normalised) text embedding."""
        _, pooled = self(token_ids)
        return pooled if self.projection is None else self.projection(pooled)


def _check_images(images: Tensor, channels: int, size: int, owner: str) -> None:
    if tuple(images.shape[1:]) != (channels, size, size):
        raise ShapeError(
            f"{owner}: images must be (batch, {channels}, {size}, {size}), got "
            f"{tuple(images.shape)}"
        )


class VisionTower(nn.Module):
    """Images ``(batch, channels, size, size)`` to patch states and the pooled class token.

    Patches are cut by [`SpatialPatches`][diffkit.patches.SpatialPatches] and embedded
    linearly (no bias: a strided convolution in the original), a class token is
    prepended, learned positions are added, then LayerNorm, the blocks, LayerNorm.
    """

    def __init__(self, config: VisionTowerConfig, proj_dim: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.width = config.width
        self.output_dim = proj_dim or config.width
        self.patches = SpatialPatches(config.patch_size)
        grid = config.image_size // config.patch_size
        scale = config.width**-0.5
        self.patch_embedding = nn.Linear(
            self.patches.patch_dim(config.channels), config.width, bias=False
        )
        self.class_embedding = nn.Parameter(scale * torch.randn(config.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, config.width))
        self.ln_pre = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.blocks = _blocks(config)
        self.ln_post = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.projection = _projection(config.width, proj_dim)
        _init_blocks(self.blocks, config.width)
        if self.projection is not None:
            nn.init.normal_(self.projection.weight, std=scale)

    @checked_layer
    def forward(
        self, images: Image
    ) -> tuple[Float[Tensor, "batch tokens dim"], Float[Tensor, "batch dim"]]:
        """Images -> (states of class + patch tokens ``(batch, 1 + patches, width)``, pooled)."""
        _check_images(images, self.config.channels, self.config.image_size, "VisionTower")
        x = self.patch_embedding(self.patches.patchify(images))
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.ln_pre(x)
        for block in self.blocks:
            x = block(x)
        x = self.ln_post(x)
        return x, x[:, 0]

    @checked_layer
    def encode(self, images: Image) -> Embedding:
        """Images to the projected (not normalised) image embedding."""
        _, pooled = self(images)
        return pooled if self.projection is None else self.projection(pooled)


class _ResidualBlock(nn.Module):
    """``relu(x + norm(conv(relu(norm(conv(x))))))``, with a strided 1x1 shortcut if needed."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, cout)
        nn.init.zeros_(self.norm2.weight)  # each block starts as the identity
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.GroupNorm(groups, cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.shortcut(x) + self.norm2(self.conv2(h)))


class ResNetTower(nn.Module):
    """Images to a feature map and its average: a 3x3 stem, then stages that halve the size.

    ``forward`` returns the final feature map as tokens ``(batch, h*w, width)`` and their
    mean ``(batch, width)`` (after a LayerNorm); ``encode`` projects the mean. A simpler
    tower than OpenAI's ModifiedResNet (no attention pooling), for small images.
    """

    def __init__(self, config: ResNetTowerConfig, proj_dim: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.width = config.widths[-1]
        self.output_dim = proj_dim or self.width
        g = config.norm_groups
        self.stem = nn.Sequential(
            nn.Conv2d(config.channels, config.widths[0], 3, padding=1, bias=False),
            nn.GroupNorm(g, config.widths[0]),
            nn.ReLU(),
        )
        layers: list[nn.Module] = []
        cin = config.widths[0]
        for stage, (width, count) in enumerate(zip(config.widths, config.blocks)):
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(_ResidualBlock(cin, width, stride, g))
                cin = width
        self.stages = nn.Sequential(*layers)
        self.ln_post = nn.LayerNorm(self.width)
        self.projection = _projection(self.width, proj_dim)
        if self.projection is not None:
            nn.init.normal_(self.projection.weight, std=self.width**-0.5)

    @checked_layer
    def forward(
        self, images: Image
    ) -> tuple[Float[Tensor, "batch tokens dim"], Float[Tensor, "batch dim"]]:
        """Images -> (final feature map as tokens, their normalised mean)."""
        _check_images(images, self.config.channels, self.config.image_size, "ResNetTower")
        features = self.stages(self.stem(images))
        tokens = rearrange(features, "b c h w -> b (h w) c")
        return tokens, self.ln_post(tokens.mean(dim=1))

    @checked_layer
    def encode(self, images: Image) -> Embedding:
        """Images to the projected (not normalised) image embedding."""
        _, pooled = self(images)
        return pooled if self.projection is None else self.projection(pooled)


@checked
def contrastive_loss(
    image_embeddings: Float[Tensor, "batch embed"],
    text_embeddings: Float[Tensor, "batch embed"],
    logit_scale: Float[Tensor, ""] | float,
) -> Float[Tensor, ""]:
    """Symmetric InfoNCE over the batch: row i of each side is the positive for row i.

    Embeddings are expected L2-normalised; ``logit_scale`` is the multiplier ``exp(s)``
    (inverse temperature). Returns the mean of image->text and text->image cross-entropies.
    """
    logits = logit_scale * image_embeddings @ text_embeddings.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class CLIP(nn.Module):
    """Text and image towers with projections into one space and a learned logit scale.

    ``encode_image`` / ``encode_text`` return the projected embeddings, L2-normalised when
    ``normalize=True`` (open_clip's signature and default). ``forward`` returns the
    image-text logits and ``loss`` the symmetric InfoNCE loss; both use the clamped scale.
    In training mode with gradients on, both first clamp ``logit_scale`` itself to
    ``[0, ln 100]`` (so an optimiser step past ln 100 cannot freeze the temperature);
    calling ``clamp_logit_scale_`` after each step, as open_clip does, is then optional.
    """

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = config.embed_dim
        self.text = TextTower(config.text, proj_dim=config.embed_dim)
        self.vision: VisionTower | ResNetTower = (
            VisionTower(config.vision, proj_dim=config.embed_dim)
            if isinstance(config.vision, VisionTowerConfig)
            else ResNetTower(config.vision, proj_dim=config.embed_dim)
        )
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))

    @classmethod
    def from_config(cls, config: CLIPConfig) -> "CLIP":
        """Build (randomly initialised) from its config."""
        return cls(config)

    @property
    def context_length(self) -> int:
        """Token positions of the text tower."""
        return self.text.context_length

    def scale(self) -> Tensor:
        """The logit multiplier ``exp(clamp(s, 0, ln 100))``, in ``[1, 100]``."""
        # torch's clamp has zero gradient *at* its bounds, so a log-scale clamped to
        # exactly ln 100 (or 0) would never move again; the gradient flows on the closed
        # interval and is zero only strictly outside it.
        s = self.logit_scale
        inside = (s >= 0.0) & (s <= MAX_LOGIT_SCALE)
        return torch.where(inside, s, s.clamp(0.0, MAX_LOGIT_SCALE)).exp()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the stored log-scale in place to ``[0, ln 100]`` (training forwards do too)."""
        self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

    def _clamp_before_training_use(self) -> None:
        """In a forward that will backpropagate, clamp the stored log-scale in place."""
        # Outside [0, ln 100] scale() has zero gradient and the temperature would be stuck;
        # clamping before use equals open_clip's clamp after every optimiser step. Through
        # ``.data``, not a no_grad ``clamp_``: a version bump would break a graph already
        # holding the (in-range, hence unchanged) parameter, e.g. two losses summed. No
        # host sync; every DDP rank clamps its identical copy identically.
        s = self.logit_scale
        if self.training and s.requires_grad and torch.is_grad_enabled():
            s.data.clamp_(0.0, MAX_LOGIT_SCALE)

    @checked
    def encode_image(self, images: Image, normalize: bool = False) -> Embedding:
        """Images ``(batch, channels, size, size)`` to embeddings ``(batch, embed_dim)``."""
        z = self.vision.encode(images)
        return F.normalize(z, dim=-1) if normalize else z

    @checked
    def encode_text(self, token_ids: TokenIds, normalize: bool = False) -> Embedding:
        """Token ids ``(batch, n)`` to embeddings ``(batch, embed_dim)``."""
        z = self.text.encode(token_ids)
        return F.normalize(z, dim=-1) if normalize else z

    @checked
    def forward(
        self,
        images: Float[Tensor, "batch_images channels height width"],
        token_ids: Int[Tensor, "batch_texts context"],
    ) -> Float[Tensor, "batch_images batch_texts"]:
        """Logits ``scale * cos(image_i, text_j)`` for every image-text pair."""
        self._clamp_before_training_use()
        image = self.encode_image(images, normalize=True)
        text = self.encode_text(token_ids, normalize=True)
        return self.scale() * image @ text.T

    @checked
    def loss(self, images: Image, token_ids: TokenIds) -> Float[Tensor, ""]:
        """Symmetric InfoNCE loss of ``batch`` matching (image, text) pairs."""
        if images.shape[0] != token_ids.shape[0]:
            raise ShapeError(
                f"CLIP.loss: {images.shape[0]} images but {token_ids.shape[0]} texts; "
                "pairs must match one to one"
            )
        self._clamp_before_training_use()
        image = self.encode_image(images, normalize=True)
        text = self.encode_text(token_ids, normalize=True)
        return contrastive_loss(image, text, self.scale())


Template = str | Callable[[str], str]


class ZeroShotClassifier(nn.Module):
    """Classifies images by cosine similarity to one text embedding per class.

    Each class embedding is the normalised mean of the normalised embeddings of its
    prompts (``template.format(classname)`` for every template), as in CLIP.
    """

    def __init__(self, model: CLIP, class_embeddings: Float[Tensor, "classes embed"]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("class_embeddings", class_embeddings)

    @classmethod
    @torch.no_grad()
    def from_prompts(
        cls,
        model: CLIP,
        tokenizer: Tokenizer,
        classnames: Sequence[str],
        templates: Sequence[Template],
    ) -> "ZeroShotClassifier":
        """Embed ``len(classnames) * len(templates)`` prompts and average them per class."""
        if not classnames:
            raise ValueError("ZeroShotClassifier: classnames is empty")
        if not templates:
            raise ValueError("ZeroShotClassifier: templates is empty")
        prompts = [
            t.format(name) if isinstance(t, str) else t(name)
            for name in classnames
            for t in templates
        ]
        device = model.logit_scale.device
        per_prompt = model.encode_text(tokenizer(prompts).to(device), normalize=True)
        per_class = rearrange(per_prompt, "(c t) e -> c t e", t=len(templates)).mean(dim=1)
        return cls(model, F.normalize(per_class, dim=-1))

    @checked
    def forward(self, images: Image) -> Float[Tensor, "batch classes"]:
        """Logits ``scale * cos(image, class)`` ``(batch, classes)``."""
        image = self.model.encode_image(images, normalize=True)
        weights: Tensor = self.class_embeddings  # type: ignore[assignment]
        return self.model.scale() * image @ weights.T

    @torch.no_grad()
    def predict(self, images: Image) -> Tensor:
        """The most similar class index per image ``(batch,)``."""
        return self(images).argmax(dim=-1)


CLIP_MODELS: Registry[nn.Module] = Registry("clip")
"""CLIP models by config ``kind``."""
CLIP_MODELS.register(CLIPConfig, CLIP.from_config)
