"""Strategy, mixed precision, activation checkpointing and compile switches of train()."""

import math
from copy import deepcopy

import pytest
import torch
import torch.distributed as dist

from diffkit.losses import DiffusionLoss
from diffkit.nn.attention import SpatialSelfAttention
from diffkit.nn.dit import DiT, DiTConfig
from diffkit.nn.resblocks import ResBlock
from diffkit.nn.transformer import PatchTransformerBlock
from diffkit.nn.unet import UNet, UNetConfig
from diffkit.protocols import Conditioning
from diffkit.schedules import Cosine
from diffkit.training import DenoiserLoss, TrainConfig, _strategy, finish, prepare, train_step
from diffkit.training._distributed import DistributedInfo
from diffkit.typing import ShapeError
from diffkit_demo.datasets import DigitsDataset


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    return DigitsDataset(8)


def _unet() -> UNet:
    torch.manual_seed(0)
    return UNet(
        UNetConfig(
            in_channels=1,
            base_channels=8,
            channel_mult=(1, 2),
            blocks_per_level=1,
            attention_resolutions=(2,),
            attention_head_dim=8,
            norm_groups=4,
            num_classes=11,
            dropout=0.1,  # recomputation must redraw the same dropout masks
            prediction="v",
        )
    )


def _dit(depth: int = 2) -> DiT:
    torch.manual_seed(0)
    return DiT(
        DiTConfig(in_channels=1, dim=32, depth=depth, num_heads=2, num_classes=11, prediction="v")
    )


def _fit(model, digits, steps=6, **overrides):
    """The losses of ``steps`` steps of ``model`` on digits with the config's switches."""
    fields = dict(
        steps=steps,
        batch_size=8,
        micro_batch_size=4,
        lr=3e-3,
        grad_clip=0.5,
        ema_decay=0.9,
        loss=DiffusionLoss(cond_dropout=0.2),
        progress=False,
    )
    fields.update(overrides)
    loss = DenoiserLoss(
        Cosine(),
        loss=fields["loss"],
        condition=lambda batch: Conditioning(labels=batch.labels),
        uncond=Conditioning(labels=torch.tensor([10])),
    )
    state = prepare(model, loss, digits, TrainConfig(**fields))
    try:
        return [train_step(state, step).loss for step in range(steps)], state
    finally:
        finish(state)


def test_the_sharding_policy_is_each_block_outermost_first():
    unet, dit = _unet(), _dit()
    units = _strategy.blocks(unet)
    assert sum(isinstance(u, ResBlock) for u in units) == sum(
        isinstance(m, ResBlock) for m in unet.modules()
    )
    assert any(isinstance(u, SpatialSelfAttention) for u in units)
    assert _strategy.blocks(dit) == list(dit.blocks)
    assert all(isinstance(u, PatchTransformerBlock) for u in _strategy.blocks(dit))
    assert unet not in units  # the root is sharded last, on its own


@pytest.mark.parametrize("build", [_unet, _dit], ids=["unet", "dit"])
def test_activation_checkpointing_gives_the_same_losses(digits, build):
    plain, _ = _fit(build(), digits)
    recomputed, state = _fit(build(), digits, activation_checkpointing=True)
    assert max(abs(a - b) for a, b in zip(plain, recomputed, strict=True)) <= 1e-6
    # only the blocks' forward changed: parameter names (and checkpoints) are the same
    assert [n for n, _ in state.model.named_parameters()] == [
        n for n, _ in build().named_parameters()
    ]
    # and a copy of the trained model runs its own blocks, not the original's
    copy = deepcopy(state.model)
    with torch.no_grad():
        for block in _strategy.blocks(copy):
            for p in block.parameters():
                p.zero_()
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    labels = Conditioning(labels=torch.tensor([1, 2]))
    copy.eval(), state.model.eval()
    assert not torch.equal(copy(x, t, labels), state.model(x, t, labels))


BF16_TOLERANCE = 1e-2
"""bf16 compute vs fp32: the largest difference of any step's loss over 20 steps."""


def test_bf16_autocast_trains_the_recipe_within_tolerance_of_fp32_with_fp32_masters(digits):
    fp32, _ = _fit(_unet(), digits, steps=20)
    bf16, state = _fit(_unet(), digits, steps=20, precision="bf16")
    assert max(abs(a - b) for a, b in zip(fp32, bf16, strict=True)) <= BF16_TOLERANCE
    assert bf16 != fp32  # it did compute in bf16
    assert {p.dtype for p in state.model.parameters()} == {torch.float32}
    assert state.ema is not None
    assert {p.dtype for p in state.ema.module.parameters()} == {torch.float32}


COMPILE_TOLERANCE = 1e-5
"""compile (aot_eager) vs eager: the largest difference of any step's loss."""


def test_compile_with_checkpointing_trains_like_eager_and_shape_checks_still_raise(digits):
    eager, _ = _fit(_dit(depth=1), digits, steps=3)  # one block: compiling is the cost
    # with checkpointed blocks too: torch.utils.checkpoint traces under compile
    compiled, state = _fit(
        _dit(depth=1),
        digits,
        steps=3,
        compile=True,
        compile_backend="aot_eager",
        activation_checkpointing=True,
    )
    assert max(abs(a - b) for a, b in zip(eager, compiled, strict=True)) <= COMPILE_TOLERANCE
    model = state.model
    assert model._compiled_call_impl is not None  # compiled in place: names unchanged
    # the boundary's shape checks run under compile too (as graph breaks)
    with pytest.raises(ShapeError, match="'batch'"):
        model(torch.randn(2, 1, 8, 8), torch.rand(3), Conditioning(labels=torch.tensor([1, 2])))


def test_strategies_that_cannot_run_are_refused_by_name(digits):
    two = DistributedInfo(rank=0, world_size=2)
    with pytest.raises(ValueError, match="strategy='single'"):
        _strategy.resolve_strategy(TrainConfig(strategy="single"), two)
    assert _strategy.resolve_strategy(TrainConfig(), two) == "ddp"
    assert _strategy.resolve_strategy(TrainConfig(), DistributedInfo()) == "single"
    assert not dist.is_initialized()
    for strategy in ("ddp", "fsdp"):
        with pytest.raises(ValueError, match=f"strategy='{strategy}'"):
            _fit(_unet(), digits, strategy=strategy)
    with pytest.raises(ValueError, match="compile_backend"):
        TrainConfig(compile_backend="aot_eager")


def _one_process_group() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def test_fsdp_in_a_one_process_job_trains_like_one_process_and_refuses_what_it_cannot(digits):
    single, _ = _fit(_unet(), digits, steps=3)
    _one_process_group()
    try:
        sharded, state = _fit(_unet(), digits, steps=3, strategy="fsdp")
        # fp16 under FSDP: MixedPrecisionPolicy, with the scaler that checks every rank
        half, half_state = _fit(
            _unet(),
            digits,
            steps=3,
            strategy="fsdp",
            precision="fp16",
            activation_checkpointing=True,
        )
        for field, value in (("compile", True),):
            with pytest.raises(ValueError, match=field):
                _fit(_unet(), digits, steps=1, strategy="fsdp", **{field: value})
        with pytest.raises(ValueError, match="checkpoint_format='safetensors'"):
            TrainConfig(strategy="fsdp", checkpoint_format="safetensors")
    finally:
        dist.destroy_process_group()
    assert max(abs(a - b) for a, b in zip(single, sharded, strict=True)) <= 1e-6
    param = next(state.model.parameters())
    assert type(param).__name__ == "DTensor"
    assert state.ema is not None
    assert type(next(state.ema.module.parameters())).__name__ == "DTensor"
    assert all(math.isfinite(v) for v in sharded)
    assert type(half_state.scaler).__name__ == "ShardedGradScaler"
    assert all(math.isfinite(v) for v in half) and half != sharded
    assert {p.dtype for p in half_state.model.parameters()} == {torch.float32}
