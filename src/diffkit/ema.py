"""Exponential moving average (EMA) of a model's weights, the usual sampling weights.

After each optimizer step ``shadow <- shadow + (1 - d) * (param - shadow)`` with
``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates (the warm-up keeps early,
random weights from dominating); buffers (e.g. norm statistics) are copied as they are.

For float16 and bfloat16 parameters the shadow is kept and updated in float32: in
16 bits ``(1 - d) * (param - shadow)`` rounds away (at ``d = 0.999`` a bfloat16 EMA
never moves). The averaged model (``averaged()``, ``copy_to``) has the model's dtypes,
rounded from the float32 shadow; ``state_dict()`` holds the float32 shadow, and loads
a 16-bit one (an older checkpoint) upcast. float32, float64 and integer tensors are
averaged (or copied) in their own dtype, as before.

``torch.compile(model)`` and ``(Distributed)DataParallel(model)`` are unwrapped: the
EMA averages, and ``copy_to`` writes, the module inside. Under FSDP (``fully_shard``)
``train`` makes the averaged copy's parameters DTensors sharded like the model's, and
each rank averages its own shard.
"""

import copy
from typing import Any, cast

import torch
from torch import Tensor, nn

__all__ = ["EMA"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_MASTER = "_fp32_shadow_"


class EMA(nn.Module):
    """Holds ``module``, an averaged copy of a model; ``update(model)`` after every step."""

    num_updates: Tensor

    def __init__(self, model: nn.Module, decay: float = 0.999, *, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.module = copy.deepcopy(_unwrap(model)).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        # float32 shadows of the 16-bit parameters (by name; tied names share one shadow)
        low = [(n, p) for n, p in self.module.named_parameters() if p.dtype in _LOW_PRECISION]
        self._low_names: list[str] = [n for n, _ in low]
        for i, (_, p) in enumerate(low):
            self.register_buffer(f"{_MASTER}{i}", p.detach().float(), persistent=False)
        index = {id(p): i for i, (_, p) in enumerate(low)}
        self._low_keys: dict[str, int] = {
            n: index[id(p)]
            for n, p in self.module.named_parameters(remove_duplicate=False)
            if id(p) in index
        }
        self.register_state_dict_post_hook(_save_float32_shadows)
        self.register_load_state_dict_pre_hook(_load_float32_shadows)

    def _master(self, i: int) -> Tensor:
        return cast(Tensor, getattr(self, f"{_MASTER}{i}"))

    def current_decay(self) -> float:
        """The decay the next ``update`` uses (with warm-up: ``min(decay, (1+n)/(10+n))``)."""
        n = int(self.num_updates.item())
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the averaged weights towards ``model``'s current weights."""
        model = _unwrap(model)
        decay = self.current_decay()
        pairs = _match(
            "parameter", list(self.module.named_parameters()), list(model.named_parameters())
        )
        masters = {n: self._master(i) for i, n in enumerate(self._low_names)}
        floats = [
            (_local(s), _local(p.detach()))
            for n, s, p in pairs
            if s.is_floating_point() and n not in masters
        ]
        if floats:
            targets = [p.to(s.dtype) for s, p in floats]
            torch._foreach_lerp_([s for s, _ in floats], targets, 1.0 - decay)
        low = [(masters[n], s, _local(p.detach())) for n, s, p in pairs if n in masters]
        if low:
            shadows = [m for m, _, _ in low]
            targets = [p.to(torch.float32) for _, _, p in low]
            torch._foreach_lerp_(shadows, targets, 1.0 - decay)
            torch._foreach_copy_([s for _, s, _ in low], shadows)  # rounded to the model's dtype
        for _, buf, src in _match(
            "buffer", list(self.module.named_buffers()), list(model.named_buffers())
        ):
            buf.copy_(src)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s parameters and buffers with the averaged ones."""
        _unwrap(model).load_state_dict(self.module.state_dict())

    def averaged(self) -> nn.Module:
        """The averaged model in the model's dtypes (in eval mode, no gradients)."""
        return cast(nn.Module, self.module)


def _save_float32_shadows(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """``state_dict`` hook: the 16-bit parameters are saved as their float32 shadows."""
    ema = cast(EMA, module)
    for name, i in ema._low_keys.items():
        key = f"{prefix}module.{name}"
        if key in state_dict:
            state_dict[key] = ema._master(i).detach()


def _load_float32_shadows(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any
) -> None:
    """``load_state_dict`` pre-hook: fill the float32 shadows (a 16-bit one is upcast)."""
    ema = cast(EMA, module)
    for name, i in ema._low_keys.items():
        value = state_dict.get(f"{prefix}module.{name}")
        master = ema._master(i)
        if isinstance(value, Tensor) and value.shape == master.shape:
            with torch.no_grad():
                master.copy_(value)
        # anything else is left to load_state_dict, which names the mismatch


def _local(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (FSDP: the EMA is sharded like the model), else itself."""
    to_local = getattr(tensor, "to_local", None)
    return cast(Tensor, to_local()) if callable(to_local) else tensor


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile``'s or ``(Distributed)DataParallel``'s wrapper."""
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(inner, nn.Module):
            model = inner
        elif isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            model = cast(nn.Module, model.module)
        else:
            return model


def _match(
    kind: str, shadow: list[tuple[str, Tensor]], current: list[tuple[str, Tensor]]
) -> list[tuple[str, Tensor, Tensor]]:
    """Pair the averaged copy's tensors with the model's by name; raise on any mismatch."""
    # The fast path: the same names with the same shapes in the same order.
    if [(n, t.shape) for n, t in shadow] == [(n, t.shape) for n, t in current]:
        return [(n, s, c) for (n, s), (_, c) in zip(shadow, current, strict=True)]
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
    return [(name, tensor, theirs[name]) for name, tensor in mine.items()]
