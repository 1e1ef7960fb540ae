"""Exponential moving average (EMA) of a model's weights, the usual sampling weights.

After each optimizer step ``shadow <- shadow + (1 - d) * (param - shadow)`` with
``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates (the warm-up keeps early,
random weights from dominating); buffers (e.g. norm statistics) are copied as they are.
"""

import copy
from typing import cast

import torch
from torch import Tensor, nn

__all__ = ["EMA"]


class EMA(nn.Module):
    """Holds ``module``, an averaged copy of a model; ``update(model)`` after every step."""

    num_updates: Tensor

    def __init__(self, model: nn.Module, decay: float = 0.999, *, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        """The decay the next ``update`` uses (with warm-up: ``min(decay, (1+n)/(10+n))``)."""
        n = int(self.num_updates.item())
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the averaged weights towards ``model``'s current weights."""
        decay = self.current_decay()
        pairs = _match(
            "parameter", list(self.module.named_parameters()), list(model.named_parameters())
        )
        floats = [(s, p.detach()) for s, p in pairs if s.is_floating_point()]
        if floats:
            targets = [p.to(s.dtype) for s, p in floats]
            torch._foreach_lerp_([s for s, _ in floats], targets, 1.0 - decay)
        for buf, src in _match(
            "buffer", list(self.module.named_buffers()), list(model.named_buffers())
        ):
            buf.copy_(src)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s parameters and buffers with the averaged ones."""
        model.load_state_dict(self.module.state_dict())

    def averaged(self) -> nn.Module:
        """The averaged model (in eval mode, no gradients)."""
        return cast(nn.Module, self.module)


def _match(
    kind: str, shadow: list[tuple[str, Tensor]], current: list[tuple[str, Tensor]]
) -> list[tuple[Tensor, Tensor]]:
    """Pair the averaged copy's tensors with the model's by name; raise on any mismatch."""
    # The fast path: the same names with the same shapes in the same order.
    if [(n, t.shape) for n, t in shadow] == [(n, t.shape) for n, t in current]:
        return [(s, c) for (_, s), (_, c) in zip(shadow, current, strict=True)]
    mine, theirs = dict(shadow), dict(current)
    missing = [n for n in mine if n not in theirs]
    extra = [n for n in theirs if n not in mine]
    if missing or extra:
        found = [f"the model lacks {kind}s {missing}"] if missing else []
        if extra:
            hint = " (added after the EMA was created? create it once the model is complete)"
            found.append(
                f"the model has {kind}s {extra} that the averaged copy lacks"
                + ("" if missing else hint)
            )
        raise ValueError(
            f"EMA.update: the model's {kind}s do not match the averaged copy: {'; '.join(found)}"
        )
    for name, tensor in mine.items():
        if tensor.shape != theirs[name].shape:
            raise ValueError(
                f"EMA.update: {kind} '{name}' has shape {tuple(theirs[name].shape)} in the "
                f"model but {tuple(tensor.shape)} in the averaged copy"
            )
    return [(tensor, theirs[name]) for name, tensor in mine.items()]
