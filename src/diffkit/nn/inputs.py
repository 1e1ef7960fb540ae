"""What the networks check on their inputs, where the inputs enter (their ``forward``).

The layers in [`diffkit.nn.layers`][diffkit.nn.layers] compute and do not check; each
network calls these before any compute, so a wrong input fails naming the network and the
field: times outside ``[0, 1]``, a [`Conditioning`][diffkit.protocols.Conditioning] that
lacks (or would be entirely ignored by) what the network was built to use, and inputs in
another dtype than the network's parameters. Checks that would read values back from an
accelerator (a device sync per sampling step) run on CPU tensors only.
"""

from typing import Protocol

import torch
from torch import Tensor

from diffkit.protocols import Conditioning
from diffkit.typing import ShapeError, host_range

__all__ = [
    "ConditioningSpec",
    "check_input_dtypes",
    "check_times",
    "validate_conditioning",
    "validate_inputs",
]


def check_times(t: Tensor) -> None:
    """Refuse times ``t`` outside ``[0, 1]`` (or NaN) when ``t`` is on the CPU.

    Looking costs no device sync there; the usual slip is a diffusers timestep (0-999)
    given as ``t``.
    """
    ends = host_range(t)
    if ends is not None and not 0.0 <= ends[0] <= ends[1] <= 1.0:
        raise ValueError(
            f"t must be continuous times in [0, 1], got values from {ends[0]:g} to "
            f"{ends[1]:g} (or NaN); a trained model's step index i is Discrete.t_from_index(i)"
        )


class ConditioningSpec(Protocol):
    """What a network config says about the conditioning it uses (``None``: not used)."""

    @property
    def context_dim(self) -> int | None: ...
    @property
    def pooled_dim(self) -> int | None: ...
    @property
    def num_classes(self) -> int | None: ...


def validate_inputs(
    owner: str,
    x_t: Tensor,
    t: Tensor,
    cond: Conditioning | None,
    config: ConditioningSpec,
    dtype: torch.dtype,
    *,
    temporal: bool = False,
) -> None:
    """A network's checks before any compute: the conditioning its ``config`` uses and the
    dtypes ([`validate_conditioning`][diffkit.nn.inputs.validate_conditioning]), then the
    times ([`check_times`][diffkit.nn.inputs.check_times]). ``dtype``: its parameters';
    ``temporal``: whether it reads ``Conditioning.temporal`` (a space-time U-Net)."""
    validate_conditioning(
        owner,
        x_t,
        cond,
        context_dim=config.context_dim,
        pooled_dim=config.pooled_dim,
        num_classes=config.num_classes,
        dtype=dtype,
        temporal=temporal,
    )
    check_times(t)


def validate_conditioning(
    owner: str,
    x_t: Tensor,
    cond: Conditioning | None,
    *,
    context_dim: int | None,
    pooled_dim: int | None,
    num_classes: int | None,
    dtype: torch.dtype | None = None,
    temporal: bool = False,
) -> None:
    """Raise before any compute when ``cond`` lacks what a network was configured to use.

    ``x_t`` ``(batch, ...)`` is the network's input; with ``dtype`` (the network's
    parameter dtype) it and the embeddings the network reads must be in that dtype
    ([`check_input_dtypes`][diffkit.nn.inputs.check_input_dtypes]). ``Conditioning.temporal``
    is refused unless ``temporal`` (the network has temporal layers to switch off).
    """
    batch = x_t.shape[0]
    if cond is not None and cond.batch_size not in (None, batch):
        raise ShapeError(f"{owner}: Conditioning has batch {cond.batch_size}, x_t has {batch}")
    if cond is not None and cond.temporal is not None and not temporal:
        raise ValueError(
            f"{owner}: got Conditioning.temporal (which items are clips, which independent "
            "images) but the network has no temporal layers to switch off; only a space-time "
            "U-Net (UNetConfig.temporal) reads it"
        )
    tokens = cond.tokens if cond is not None else None
    pooled = cond.pooled if cond is not None else None
    if context_dim is not None:
        _check_width(owner, "tokens", tokens, "context_dim", context_dim, "cross-attention needs")
    if num_classes is not None:
        _check_labels(owner, cond.labels if cond is not None else None, num_classes)
    if pooled_dim is not None:
        _check_width(owner, "pooled", pooled, "pooled_dim", pooled_dim, "pooled-conditioned; pass")
    if cond is not None:
        # A field the network has no input for is ignored; that is fine while it uses another
        # (a CLIP conditioner gives tokens and pooled to a cross-attention-only U-Net), but a
        # Conditioning it ignores entirely would silently make conditional sampling unconditional.
        options = {
            "tokens": ("context_dim", context_dim),
            "pooled": ("pooled_dim", pooled_dim),
            "labels": ("num_classes", num_classes),
        }
        given = [name for name in options if getattr(cond, name) is not None]
        if given and all(options[name][1] is None for name in given):
            missing = ", ".join(options[name][0] for name in given)
            raise ValueError(
                f"{owner}: got Conditioning with {', '.join(given)} but the network uses none "
                f"of them (built without {missing}); build it with "
                f"{options[given[0]][0]}=... or pass cond=None"
            )
        if "labels" in given and num_classes is None:
            # unlike tokens and pooled (a text conditioner gives both), labels are only given
            # for a class-conditioned network: ignoring them would sample unconditionally
            raise ValueError(
                f"{owner}: got Conditioning.labels but the network has no classes "
                f"(num_classes is None); build it with num_classes=... or leave cond.labels out"
            )
    if dtype is not None:
        check_input_dtypes(
            owner,
            dtype,
            x_t,
            cond,
            tokens=context_dim is not None,
            pooled=pooled_dim is not None,
        )


def check_input_dtypes(
    owner: str,
    dtype: torch.dtype,
    x_t: Tensor,
    cond: Conditioning | None,
    *,
    tokens: bool,
    pooled: bool,
) -> None:
    """Refuse, before any compute, ``x_t`` or used embeddings of ``cond`` not in ``dtype``.

    ``dtype`` is the network's parameter dtype; ``tokens`` / ``pooled`` say which fields it
    reads. Dtype comparisons only (no device sync). Under ``torch.autocast``, which casts
    each op's inputs itself, float32 and the autocast dtype are let through.
    """
    if x_t.dtype != dtype:
        _check_dtype(owner, "x_t", x_t, dtype)
    if cond is None:
        return
    if tokens and cond.tokens is not None and cond.tokens.dtype != dtype:
        _check_dtype(owner, "Conditioning.tokens", cond.tokens, dtype)
    if pooled and cond.pooled is not None and cond.pooled.dtype != dtype:
        _check_dtype(owner, "Conditioning.pooled", cond.pooled, dtype)


def _check_dtype(owner: str, name: str, value: Tensor, dtype: torch.dtype) -> None:
    device = value.device.type
    if torch.is_autocast_enabled(device) and value.dtype in (
        torch.float32,
        torch.get_autocast_dtype(device),
    ):
        return
    if name == "x_t":  # a sampler calls the model in the dtype of its noise
        fix = f"pass x_t.to({dtype}) (to a sampler: noise.to({dtype}))"
    else:
        fix = f"pass it .to({dtype})"
    raise ShapeError(
        f"{owner}: {name} is {value.dtype} but the model's parameters are {dtype}; {fix}, "
        f"or convert the model with .to({value.dtype})"
    )


def _check_width(
    owner: str, field: str, value: Tensor | None, setting: str, width: int, needs: str
) -> None:
    """``Conditioning.<field>`` is given and ``width`` wide (the ``setting`` of the network)."""
    if value is None:
        raise ValueError(f"{owner}: {needs} Conditioning({field}=...)")
    if value.shape[-1] != width:
        raise ShapeError(
            f"{owner}: Conditioning.{field} has dim {value.shape[-1]}, expected {setting}={width}"
        )


def _check_labels(owner: str, labels: Tensor | None, num_classes: int) -> None:
    """Labels are given and, when on the CPU, in ``[0, num_classes)``."""
    if labels is None:
        raise ValueError(
            f"{owner}: class-conditioned (num_classes set); pass Conditioning(labels=)"
        )
    # CPU labels only (host_range): on an accelerator a bad label fails inside the
    # embedding instead, since reading them back would sync every sampling step.
    ends = host_range(labels)
    if ends is not None and not 0 <= ends[0] <= ends[1] < num_classes:
        raise ValueError(
            f"{owner}: Conditioning.labels must be in [0, num_classes={num_classes}) "
            f"(a null label for guidance counts among the classes), got labels from "
            f"{ends[0]:g} to {ends[1]:g}"
        )
