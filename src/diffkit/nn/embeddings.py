"""Embeddings of time and of pooled vectors: the sinusoid and the two-layer MLP after it.

A network embeds its time in two steps: [`network_timestep`][diffkit.nn.embeddings.network_timestep]
maps the continuous ``t`` to what the network was trained on (``time_scale * t`` or a
training index), [`timestep_embedding`][diffkit.nn.embeddings.timestep_embedding] turns it
into sinusoidal features, and a [`TimeEmbedding`][diffkit.nn.embeddings.TimeEmbedding] MLP
maps those to the network's width. These are maths only; the networks check ``t`` where it
enters ([`check_times`][diffkit.nn.inputs.check_times]).

Positions can also be rotary (RoPE, Su et al. 2021):
[`rotary_angles_3d`][diffkit.nn.embeddings.rotary_angles_3d] gives each token of a
``(frames, height, width)`` grid its rotation angles and
[`apply_rotary`][diffkit.nn.embeddings.apply_rotary] rotates queries and keys by them, so
that attention scores depend on relative positions only (Wan 2.1).
"""

import math
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from diffkit.protocols import Conditioning
from diffkit.typing import checked_layer

__all__ = [
    "TimeEmbedding",
    "add_condition_embeddings",
    "apply_rotary",
    "network_timestep",
    "rotary_angles",
    "rotary_angles_3d",
    "timestep_embedding",
]


def timestep_embedding(
    timesteps: Tensor,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> Float[Tensor, "batch dim"]:
    """Sinusoidal embedding of (possibly fractional) timesteps ``(batch,)`` -> ``(batch, dim)``.

    Frequencies ``w_k = max_period^(-k / (dim/2 - freq_shift))``; features ``[cos, sin]``
    (or ``[sin, cos]`` when ``flip_sin_to_cos`` is false), computed in float32 (DDPM's
    embedding, with diffusers' ``flip_sin_to_cos`` / ``downscale_freq_shift`` conventions).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(
        half, dtype=torch.float32, device=timesteps.device
    )
    freqs = torch.exp(exponent / (half - freq_shift))
    args = timesteps[:, None].float() * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class TimeEmbedding(nn.Module):
    """Two-layer MLP ``linear_2(act(linear_1(x)))`` used on time / pooled embeddings (SiLU)
    and on caption tokens (PixArt's caption projection: tanh-approximated GELU)."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        out_dim: int | None = None,
        *,
        activation: Literal["silu", "gelu_tanh"] = "silu",
    ) -> None:
        super().__init__()
        self.activation = activation
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, out_dim or dim)

    @checked_layer
    def forward(self, x: Float[Tensor, "*batch in_dim"]) -> Float[Tensor, "*batch out_dim"]:
        """``(..., in_dim) -> (..., out_dim)``."""
        h = self.linear_1(x)
        h = F.silu(h) if self.activation == "silu" else F.gelu(h, approximate="tanh")
        return self.linear_2(h)


def network_timestep(
    t: Tensor, time_input: Literal["t", "index"], num_train_timesteps: int, time_scale: float
) -> Tensor:
    """What a network's timestep embedding receives for continuous times ``t`` ``(batch,)``.

    - ``"t"``: ``time_scale * t`` (a model trained on continuous time).
    - ``"index"``: the discrete training index ``N t - 1`` of a model trained on ``N`` steps
      (``Discrete.index_from_t``), computed in float64 and snapped to the nearest integer when
      within float32 rounding of it, so ``t = Discrete.t_from_index(i)`` gives exactly ``i``.

    ``t`` is taken as given: the networks refuse times outside ``[0, 1]`` where they take
    them ([`check_times`][diffkit.nn.inputs.check_times]).
    """
    if time_input == "t":
        return t * time_scale
    index = t.double() * num_train_timesteps - 1
    nearest = index.round()
    snap = (index - nearest).abs() <= 4e-6 * num_train_timesteps
    return torch.where(snap, nearest, index)


def add_condition_embeddings(
    emb: Float[Tensor, "batch dim"],
    cond: Conditioning | None,
    label_embed: nn.Embedding | None,
    pooled_embed: TimeEmbedding | None,
) -> Float[Tensor, "batch dim"]:
    """The time embedding ``emb`` plus the embeddings of ``cond``'s class labels and pooled
    vector, each when the network has that embedding and ``cond`` that field."""
    if cond is not None:
        if label_embed is not None and cond.labels is not None:
            emb = emb + label_embed(cond.labels)
        if pooled_embed is not None and cond.pooled is not None:
            emb = emb + pooled_embed(cond.pooled)
    return emb


def rotary_angles(
    positions: int, features: int, theta: float = 10000.0
) -> Float[Tensor, "positions half"]:
    """Rotary angles ``(positions, features / 2)`` along one axis: pair ``j`` of position
    ``p`` turns by ``p * theta^(-2j / features)`` (RoFormer). Float64."""
    if features % 2 != 0:
        raise ValueError(f"rotary_angles: features must be even, got {features}")
    freqs = 1.0 / theta ** (torch.arange(0, features, 2, dtype=torch.float64) / features)
    return torch.arange(positions, dtype=torch.float64)[:, None] * freqs[None, :]


def rotary_angles_3d(
    grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0
) -> Float[Tensor, "tokens half"]:
    """Rotary angles ``(f * h * w, head_dim / 2)`` of a frame-major ``(f, h, w)`` token grid.

    Each head's features form ``head_dim / 2`` pairs: the rows and the columns get
    ``head_dim // 6`` pairs each, the frames the rest (Wan 2.1's split); each axis as
    [`rotary_angles`][diffkit.nn.embeddings.rotary_angles]. Float64.
    """
    if head_dim % 2 != 0 or head_dim < 6:
        raise ValueError(f"rotary_angles_3d: head_dim must be even and >= 6, got {head_dim}")
    spatial = 2 * (head_dim // 6)
    sizes = (head_dim - 2 * spatial, spatial, spatial)
    parts = []
    for axis, (n, size) in enumerate(zip(grid, sizes, strict=True)):
        shape = [1, 1, 1, size // 2]
        shape[axis] = n
        parts.append(rotary_angles(n, size, theta).view(shape).expand(*grid, size // 2))
    return torch.cat(parts, dim=-1).reshape(-1, head_dim // 2)


def apply_rotary(
    x: Float[Tensor, "*batch tokens head_dim"], angles: Float[Tensor, "tokens half"]
) -> Float[Tensor, "*batch tokens head_dim"]:
    """Rotate each consecutive feature pair ``(x_2j, x_2j+1)`` of ``x`` by ``angles[:, j]``
    (in at least float32, returned in ``x``'s dtype)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    cos = angles.cos().to(x.device, dtype)
    sin = angles.sin().to(x.device, dtype)
    x1, x2 = x.to(dtype).unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)
