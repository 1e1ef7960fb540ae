"""What the CLIP conversions share: one block's weights under diffkit's names, and loading."""

from collections.abc import Mapping
from typing import TypeVar

import torch
from torch import Tensor, nn

M = TypeVar("M", bound=nn.Module)


def block_state(
    prefix: str,
    *,
    ln_1: nn.LayerNorm,
    qkv: tuple[Tensor, Tensor],
    out: nn.Linear,
    ln_2: nn.LayerNorm,
    fc: nn.Linear,
    proj: nn.Linear,
) -> dict[str, Tensor]:
    """State-dict entries of a diffkit ``ResidualAttentionBlock`` named ``prefix`` + "...".

    ``qkv`` is the fused ``(weight, bias)`` projection with rows ``[q; k; v]``.
    """
    state = {f"{prefix}qkv.weight": qkv[0], f"{prefix}qkv.bias": qkv[1]}
    for name, layer in (("ln_1", ln_1), ("out", out), ("ln_2", ln_2), ("fc", fc), ("proj", proj)):
        state[f"{prefix}{name}.weight"] = layer.weight
        state[f"{prefix}{name}.bias"] = layer.bias
    return state


def load_converted(module: M, state: Mapping[str, Tensor], like: Tensor, training: bool) -> M:
    """``module`` on ``like``'s device and dtype, with copies of ``state``; mode ``training``."""
    module = module.to(device=like.device, dtype=like.dtype)
    with torch.no_grad():
        module.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    return module.train(training)
