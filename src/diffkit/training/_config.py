"""How to train: [`TrainConfig`][diffkit.training.TrainConfig] and its learning-rate schedule."""

import math
from typing import Literal

from pydantic import Field, model_validator

from diffkit.config import Config
from diffkit.losses import DiffusionLoss

__all__ = [
    "CheckpointFormat",
    "Precision",
    "Strategy",
    "TrainConfig",
    "checkpoint_format",
    "learning_rate",
]

Precision = Literal["fp32", "bf16", "fp16"]
Strategy = Literal["auto", "single", "ddp", "fsdp"]
CheckpointFormat = Literal["safetensors", "sharded"]


class TrainConfig(Config):
    """How to train: batch, optimizer, EMA, precision, checkpoints, logging and samples."""

    kind: Literal["train"] = "train"
    steps: int = Field(default=1000, ge=1, description="total optimizer steps")
    batch_size: int = Field(
        default=64, ge=1, description="global batch size (items per optimizer step)"
    )
    micro_batch_size: int | None = Field(
        default=None,
        ge=1,
        description=(
            "items per forward/backward pass; batch_size / micro_batch_size shards are shared "
            "out over the processes and accumulated. None: batch_size / world_size. Fix it to "
            "make runs identical across process counts"
        ),
    )
    lr: float = Field(default=1e-4, gt=0, description="peak AdamW learning rate")
    lr_schedule: Literal["constant", "cosine"] = Field(
        default="constant", description="after warm-up: constant, or cosine decay to min_lr"
    )
    min_lr: float = Field(
        default=0.0, ge=0, description="final learning rate of the cosine schedule"
    )
    warmup_steps: int = Field(default=0, ge=0, description="steps of linear learning-rate warm-up")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW decoupled weight decay")
    betas: tuple[float, float] = Field(
        default=(0.9, 0.999), description="AdamW (beta1, beta2), in [0, 1)"
    )
    adam_eps: float = Field(default=1e-8, gt=0, description="AdamW epsilon")
    grad_clip: float | None = Field(
        default=1.0, gt=0, description="clip the global gradient norm to this; None: no clipping"
    )
    ema_decay: float | None = Field(
        default=0.999, gt=0, lt=1, description="EMA decay per step (with warm-up); None: no EMA"
    )
    precision: Precision = Field(
        default="fp32",
        description=(
            "compute dtype: fp32; bf16; fp16 with a gradient scaler. Master weights, the "
            "loss and the EMA stay fp32. Under strategy 'fsdp' through FSDP's "
            "MixedPrecisionPolicy (gradients reduced in fp32), else torch.autocast"
        ),
    )
    strategy: Strategy = Field(
        default="auto",
        description=(
            "single: one process; ddp: DistributedDataParallel (each rank holds everything); "
            "fsdp: FSDP2 fully_shard per block, then the root (each rank holds 1/world_size "
            "of the parameters, gradients, AdamW states and EMA); auto: ddp under a job of "
            "several processes, else single. ddp and fsdp need a torchrun job"
        ),
    )
    activation_checkpointing: bool = Field(
        default=False,
        description=(
            "recompute each block's forward (residual, attention, transformer block) in "
            "backward instead of keeping its activations: less memory, about one more "
            "forward of compute; the same losses"
        ),
    )
    compile: bool = Field(
        default=False,
        description=(
            "torch.compile the model in place (compile_backend); the first steps pay the "
            "compilation. Shape checks still run at the model's boundary (graph breaks)"
        ),
    )
    compile_backend: Literal["inductor", "aot_eager", "eager"] = Field(
        default="inductor",
        description=(
            "torch.compile backend: inductor (generated kernels; needs a C compiler on CPU), "
            "aot_eager (traced graphs, eager kernels: quick to compile, for checks)"
        ),
    )
    seed: int = Field(default=0, ge=0, description="seeds data order, times, noise and dropout")
    loss: DiffusionLoss = Field(
        default_factory=DiffusionLoss,
        description="the diffusion loss of train(denoiser, schedule, ...); other losses ignore it",
    )
    output_dir: str | None = Field(
        default=None, description="folder for checkpoints, logs and samples; None: write nothing"
    )
    checkpoint_every: int | None = Field(
        default=None, ge=1, description="write a checkpoint every this many steps (and at the end)"
    )
    checkpoint_format: Literal["auto", "safetensors", "sharded"] = Field(
        default="auto",
        description=(
            "'safetensors': one file, written by rank 0; 'sharded': a folder every process "
            "writes its part of (torch.distributed.checkpoint), resumable on another number "
            "of processes; 'auto': sharded under FSDP, else safetensors"
        ),
    )
    keep_checkpoints: int = Field(
        default=3, ge=1, description="how many recent checkpoints to keep"
    )
    resume: bool = Field(
        default=True,
        description=(
            "continue from the newest checkpoint in output_dir; False: start afresh, and "
            "refuse an output_dir that already holds checkpoints"
        ),
    )
    log_every: int = Field(default=10, ge=1, description="log every this many steps")
    sample_every: int | None = Field(
        default=None,
        ge=1,
        description="save a sample grid every this many steps (needs a sample fn and output_dir)",
    )
    num_workers: int = Field(
        default=0, ge=0, description="DataLoader worker processes; 0: load in the training process"
    )
    progress: bool = Field(
        default=True,
        description=(
            "show progress (rank 0 only): a live bar on a terminal or in a notebook; "
            "written to anything else (a log file, CI, a pipe), a plain line every 30 s "
            "instead of carriage-return redraws"
        ),
    )
    tensorboard: bool = Field(
        default=True, description="also log to TensorBoard when it is installed"
    )
    device: str | None = Field(
        default=None,
        description="'cpu', 'cuda', 'cuda:1', ...; None: this rank's GPU, else the CPU",
    )
    find_unused_parameters: bool = Field(
        default=False, description="DDP: allow parameters that get no gradient in a step"
    )

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                f"({self.micro_batch_size})"
            )
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.min_lr > 0 and self.lr_schedule == "constant":
            raise ValueError(
                f"min_lr ({self.min_lr}) is the end of the cosine schedule; with "
                "lr_schedule='constant' it would be ignored (set lr_schedule: cosine)"
            )
        if self.compile_backend != "inductor" and not self.compile:
            raise ValueError(
                f"compile_backend ({self.compile_backend!r}) is used only with compile=True; "
                "it would be ignored"
            )
        if self.strategy == "fsdp" and self.checkpoint_format == "safetensors":
            raise ValueError(
                "checkpoint_format='safetensors' with strategy='fsdp': the single-file "
                "checkpoint is written by rank 0 from whole weights, which no rank holds "
                "under FSDP; use checkpoint_format 'sharded' (or 'auto')"
            )
        return self


def checkpoint_format(config: TrainConfig) -> CheckpointFormat:
    """The checkpoint format ``config`` writes (``checkpoint_format='auto'`` resolved)."""
    if config.checkpoint_format != "auto":
        return config.checkpoint_format
    return "sharded" if config.strategy == "fsdp" else "safetensors"


def learning_rate(config: TrainConfig, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): warm-up, then the schedule."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.lr
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))
