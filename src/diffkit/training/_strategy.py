"""How a model is run by ``train()``: one process, DDP or FSDP2, and what runs inside.

- ``strategy`` (``TrainConfig.strategy``): ``"single"`` (one process), ``"ddp"``
  (``DistributedDataParallel``: every rank holds the whole model and optimizer),
  ``"fsdp"`` (``torch.distributed.fsdp.fully_shard``, FSDP2: every rank holds a
  ``1 / world_size`` shard of each parameter, gradient and AdamW state, and gathers a
  block's full weights only while it runs). ``"auto"``: DDP in a job of several
  processes, else one process.
- **The sharding policy** (``blocks``): each residual block
  (``ResBlock``), each attention block of a U-Net level (``SpatialSelfAttention``,
  ``SpatialTransformer``), each patch-transformer block (``PatchTransformerBlock``)
  and each CLIP tower block (``ResidualAttentionBlock``) is one FSDP unit, the
  outermost such module only; the root (embeddings, in/out layers, resamplers)
  is the last unit. A unit's weights are gathered for its forward and its backward,
  then freed (``reshard_after_forward=True``), so the peak holds the sharded model plus
  about one block's full weights.
- **Mixed precision** (``precision``): under FSDP, ``MixedPrecisionPolicy`` (blocks
  compute in bf16/fp16, gradients reduce in fp32, the root's output is fp32); under
  one process or DDP, ``torch.autocast``. The optimizer's parameters (master weights),
  the loss and the EMA stay fp32.
- **Activation checkpointing** (``activation_checkpointing``): the same blocks keep no
  activations for backward and recompute their forward there (``torch.utils.checkpoint``,
  non-reentrant, around each block's ``forward``: parameter names and state dicts are
  unchanged, FSDP's hooks stay outside, and it traces under ``torch.compile``).
- **compile** (``compile``): ``module.compile(backend=compile_backend)`` in place, so
  names, state dicts and the EMA are unchanged.
"""

import functools
import types
from typing import Any, Literal, cast

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from diffkit.ema import EMA
from diffkit.nn.attention import SpatialSelfAttention, SpatialTransformer
from diffkit.nn.clip import ResidualAttentionBlock
from diffkit.nn.resblocks import ResBlock
from diffkit.nn.transformer import PatchTransformerBlock
from diffkit.training._config import Precision, TrainConfig
from diffkit.training._distributed import DistributedInfo

__all__ = ["BLOCK_TYPES", "Resolved", "blocks", "local_numel", "resolve_strategy"]

Resolved = Literal["single", "ddp", "fsdp"]

BLOCK_TYPES: tuple[type[nn.Module], ...] = (
    ResBlock,
    SpatialSelfAttention,
    SpatialTransformer,
    PatchTransformerBlock,
    ResidualAttentionBlock,
)
"""The module types that are one FSDP unit and one activation-checkpointing unit each."""

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_strategy(config: TrainConfig, info: DistributedInfo) -> Resolved:
    """The strategy ``config.strategy`` means in this job; refuses one it cannot honour."""
    if config.strategy == "auto":
        return "ddp" if info.world_size > 1 else "single"
    if config.strategy == "single" and info.world_size > 1:
        raise ValueError(
            f"strategy='single' in a job of {info.world_size} processes would train "
            f"{info.world_size} unrelated copies; use 'ddp' or 'fsdp' (or 'auto')"
        )
    joined = dist.is_available() and dist.is_initialized()
    if config.strategy in ("ddp", "fsdp") and not joined:
        raise ValueError(
            f"strategy={config.strategy!r} needs a torch.distributed job (run under "
            "torchrun, even with --nproc_per_node=1); 'auto' trains one plain process"
        )
    return config.strategy


def blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost modules of ``BLOCK_TYPES`` in ``model``: its FSDP and checkpoint units."""
    found: list[nn.Module] = []
    inside: set[str] = set()
    for name, module in model.named_modules():
        if module is model or any(name.startswith(f"{outer}.") for outer in inside):
            continue
        if isinstance(module, BLOCK_TYPES):
            found.append(module)
            inside.add(name)
    return found


def apply_strategy(
    model: nn.Module,
    config: TrainConfig,
    strategy: Resolved,
    device: torch.device,
    ema: EMA | None,
) -> nn.Module:
    """Checkpoint, compile and shard (or wrap) ``model`` in place; what the loss calls."""
    if config.activation_checkpointing:
        for block in blocks(model):
            recompute_in_backward(block)
    if config.compile:
        model.compile(backend=config.compile_backend)
    if strategy == "single":
        return model
    if strategy == "ddp":
        return DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=config.find_unused_parameters,
        )
    _fully_shard(model, config.precision)
    if ema is not None:
        shard_like(ema.module, model)
    return model


def recompute_in_backward(block: nn.Module) -> None:
    """Make ``block`` keep no activations: its forward runs again in backward.

    ``torch.utils.checkpoint`` (non-reentrant, RNG state restored, so dropout redraws the
    same masks) around the block's own ``forward``: the module's hooks (FSDP's gathers)
    stay outside, and its parameter names do not change.
    """
    # a method bound to the block (not a closure over it): a deepcopy of the model rebinds
    # it to the copy
    block.forward = types.MethodType(_checkpointed_forward, block)


def _checkpointed_forward(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    forward = functools.partial(type(block).forward, block)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _fully_shard(model: nn.Module, precision: Precision) -> None:
    """FSDP2 per block, then the root; mixed precision through ``MixedPrecisionPolicy``."""
    compute = _DTYPES.get(precision)
    # Blocks compute in ``compute`` and reduce gradients in fp32; their outputs stay in
    # ``compute`` for the next block. Only the root casts its output back to fp32.
    inner = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    root = MixedPrecisionPolicy(
        param_dtype=compute, reduce_dtype=torch.float32, output_dtype=torch.float32
    )
    for block in blocks(model):
        for name in ("time_embed", "label_embed"):
            # a PatchTransformerBlock's own embeddings are called by its network, outside
            # the block's forward: they are units of their own
            own = getattr(block, name, None)
            if isinstance(block, PatchTransformerBlock) and isinstance(own, nn.Module):
                fully_shard(own, mp_policy=inner)
        fully_shard(block, mp_policy=inner)
    fully_shard(model, mp_policy=root)


@torch.no_grad()
def shard_like(averaged: nn.Module, model: nn.Module) -> None:
    """Make ``averaged``'s parameters DTensors sharded like ``model``'s (same local shards)."""
    params = dict(model.named_parameters())
    for name, param in list(averaged.named_parameters()):
        source = params[name]
        if not isinstance(source, DTensor):
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = averaged.get_submodule(owner_name)
        # the averaged copy equals the model when it is made: its shard is the model's
        shard = source.detach().clone().to(param.dtype)
        owner._parameters[leaf] = nn.Parameter(shard, requires_grad=False)


def local_numel(tensors: list[Tensor]) -> int:
    """How many elements of ``tensors`` this rank holds (a DTensor: its local shard)."""
    return sum((t.to_local() if isinstance(t, DTensor) else t).numel() for t in tensors)


def full_value(value: Tensor) -> Tensor:
    """A DTensor's full value (a plain tensor as it is): e.g. the gradient norm under FSDP."""
    return cast(Tensor, value.full_tensor()) if isinstance(value, DTensor) else value


def grad_scaler(
    precision: Precision, strategy: Resolved, device: torch.device
) -> torch.amp.GradScaler | None:
    """fp16's gradient scaler: ``ShardedGradScaler`` under FSDP (inf checks over ranks)."""
    if precision != "fp16":
        return None
    if strategy == "fsdp":
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type)
    return torch.amp.GradScaler(device.type)
