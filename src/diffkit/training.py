"""The training loop, as a library function: ``train(denoiser, schedule, dataset, config)``.

One optimizer step draws a *global batch* of ``batch_size`` items. It is cut into
``batch_size / micro_batch_size`` *shards*; each shard has its own slice of the epoch
(a ``DistributedSampler`` over shards, reshuffled by ``set_epoch``) and its own random
generator for times, noise and condition dropout, seeded from ``(seed, step, shard)``.
The processes of a ``torchrun`` job share the shards out (``world_size`` must divide
their number) and run the rest as gradient accumulation, so a run's numbers depend on
its config, not on how many processes run it: two processes reproduce one process's
loss trajectory up to floating-point summation order.

Each step: [`DiffusionLoss`][diffkit.losses.DiffusionLoss] (with condition dropout for
classifier-free guidance), AdamW, gradient clipping, an [`EMA`][diffkit.ema.EMA] of
the weights, optional mixed precision (bf16 autocast, or fp16 with a gradient scaler on
CUDA). Rank 0 shows a progress bar (loss, samples/s; in a log file or CI, a plain line
every 30 s instead), appends to ``log.jsonl`` (and TensorBoard when it is installed),
saves sample grids, and writes checkpoints atomically with optimizer, EMA, step and RNG
states (every rank's torch RNG, gathered to rank 0); ``resume=True`` continues from the
newest one and gives the same losses as a run that was never interrupted on the same
number of processes (and the same ``log.jsonl``: what the interrupted run logged after
that checkpoint is cut first, and TensorBoard purges it).

[`train_pipeline`][diffkit.training.train_pipeline] trains a built
[`Pipeline`][diffkit.pipeline.Pipeline] (captions through its text conditioner, data
through its frozen encoder), and ``python -m diffkit.training run.yaml`` (a
[`TrainRunConfig`][diffkit.training.TrainRunConfig]) does the same from the command line,
alone or under ``torchrun``.
"""

import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar, cast

import numpy as np
import torch
import torch.distributed as dist
from pydantic import Field, SerializeAsAny, field_validator, model_validator
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from diffkit.builder import PipelineConfig
from diffkit.checkpoint import (
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    load_training_checkpoint,
    save_training_checkpoint,
)
from diffkit.config import Config
from diffkit.data import Batch, collate, save_grid, shard_batches
from diffkit.ema import EMA
from diffkit.losses import DiffusionLoss
from diffkit.protocols import Conditioning, NoiseSchedule
from diffkit.typing import Prediction, warn_at_caller

if TYPE_CHECKING:
    from diffkit.pipeline import Pipeline

__all__ = [
    "DistributedInfo",
    "TrainConfig",
    "TrainResult",
    "TrainRunConfig",
    "distributed",
    "init_distributed",
    "learning_rate",
    "main",
    "step_generator",
    "train",
    "train_pipeline",
]

Precision = Literal["fp32", "bf16", "fp16"]


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
        description="fp32; bf16 autocast (CPU or CUDA); fp16 autocast + scaler (CUDA)",
    )
    seed: int = Field(default=0, ge=0, description="seeds data order, times, noise and dropout")
    loss: DiffusionLoss = Field(default_factory=DiffusionLoss, description="the diffusion loss")
    output_dir: str | None = Field(
        default=None, description="folder for checkpoints, logs and samples; None: write nothing"
    )
    checkpoint_every: int | None = Field(
        default=None, ge=1, description="write a checkpoint every this many steps (and at the end)"
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
        return self


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """Where this process stands in a ``torch.distributed`` job (1 process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the one that logs and writes checkpoints)."""
        return self.rank == 0


def init_distributed(backend: str | None = None) -> DistributedInfo:
    """Join the ``torchrun`` job described by the environment (``RANK``, ``WORLD_SIZE``, ...).

    Uses ``nccl`` when CUDA is available, else ``gloo``. Without those variables (a plain
    ``python`` run) nothing is initialised and rank 0 of 1 is returned.
    """
    if dist.is_available() and dist.is_initialized():
        return _current_distributed()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return DistributedInfo(local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, init_method="env://")
    return _current_distributed()


@contextlib.contextmanager
def distributed(backend: str | None = None) -> Iterator[DistributedInfo]:
    """``with distributed() as info:``: join the ``torchrun`` job and leave it on exit.

    The process group is destroyed on exit when this block created it (a group that
    already existed is left to its owner). A process that exits with its group still
    alive can abort in gloo's or NCCL's destructors after its work is done, so a
    ``torchrun`` script should train inside this block (or call
    ``torch.distributed.destroy_process_group()`` itself).
    """
    created = not (dist.is_available() and dist.is_initialized())
    try:
        yield init_distributed(backend)
    finally:
        if created and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _leaves_what_it_joins(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``fn`` inside [`distributed`][diffkit.training.distributed]."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with distributed():
            return fn(*args, **kwargs)

    return wrapper


def _current_distributed() -> DistributedInfo:
    if not (dist.is_available() and dist.is_initialized()):
        return DistributedInfo()
    return DistributedInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", str(dist.get_rank()))),
    )


def learning_rate(config: TrainConfig, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): warm-up, then the schedule."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.lr
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


def step_generator(
    seed: int, step: int, shard: int, device: str | torch.device = "cpu"
) -> torch.Generator:
    """The generator for one shard of one step, a pure function of ``(seed, step, shard)``."""
    words = np.random.SeedSequence([seed, step, shard]).generate_state(2, dtype=np.uint32)
    value = (int(words[0]) << 31) ^ int(words[1])
    return torch.Generator(device=device).manual_seed(value)


@dataclasses.dataclass
class TrainResult:
    """What ``train`` returns: the per-step losses of this call and the final state."""

    losses: list[float]
    """Global mean loss of every step run by this call (after a resume: the new steps)."""
    start_step: int
    step: int
    ema: EMA | None
    checkpoints: list[Path]
    """The checkpoints this call wrote that are still kept (``keep_checkpoints``), oldest first."""
    output_dir: Path | None


class _DenoiserView:
    """Presents a (DDP-wrapped) module as a Denoiser: its ``prediction`` plus ``__call__``."""

    prediction: Prediction

    def __init__(self, module: nn.Module, prediction: Prediction) -> None:
        self.module = module
        self.prediction = prediction

    def __call__(self, x_t: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
        return self.module(x_t, t, cond)


LossFn = Callable[..., Tensor]
ConditionFn = Callable[[Batch], Conditioning | None]
SampleFn = Callable[[nn.Module, torch.Generator], Tensor]


def _resolve_device(config: TrainConfig, info: DistributedInfo) -> torch.device:
    if config.device is not None:
        device = torch.device(config.device)
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", info.local_rank)  # each rank its own GPU
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def _autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


_PROGRESS_LINE_EVERY_S = 30.0
"""Seconds between the plain progress lines written where no live bar can be drawn."""


class _ProgressLines:
    """Progress for a log (not a terminal): a plain line every ``interval`` seconds.

    Speaks the part of tqdm's interface that diffkit uses (``update``, ``set_postfix``,
    ``close``, ``with``). A last line is written on close when earlier lines were.
    """

    def __init__(self, total: int, desc: str, initial: int, file: Any, interval: float) -> None:
        self.total, self.desc, self.n = total, desc, initial
        self.file, self.interval = file, interval
        self.postfix = ""
        self.started = self.last = time.monotonic()
        self.written = -1  # the step count of the last line written

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._write(now)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{key} {value}" for key, value in values.items())

    def close(self) -> None:
        if self.written >= 0 and self.written != self.n:
            self._write(time.monotonic())

    def _write(self, now: float) -> None:
        extra = f", {self.postfix}" if self.postfix else ""
        self.file.write(
            f"{self.desc}: {self.n}/{self.total} steps ({now - self.started:.0f} s{extra})\n"
        )
        self.file.flush()
        self.written = self.n

    def __enter__(self) -> "_ProgressLines":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _progress_bar(
    total: int,
    desc: str,
    *,
    enabled: bool = True,
    initial: int = 0,
    file: Any = None,
    **tqdm_options: Any,
) -> Any:
    """A progress display as ``TrainConfig.progress`` describes it (``file``: stderr).

    A notebook or a terminal gets a live tqdm bar; any other stream (a log file, a CI
    log, a pipe) a ``_ProgressLines`` report, so that no carriage-return redraws pile
    up in it. ``enabled=False``: a bar that shows nothing.
    """
    from tqdm import tqdm as terminal_tqdm
    from tqdm.auto import tqdm as auto_tqdm  # (imports tqdm.autonotebook, warnings off)
    from tqdm.autonotebook import tqdm as chosen_tqdm

    options: dict[str, Any] = {"total": total, "desc": desc, "initial": initial, "unit": "step"}
    if not enabled:
        return terminal_tqdm(disable=True, **options)
    if file is None and chosen_tqdm is not terminal_tqdm:  # a notebook: its widget
        return auto_tqdm(**options, **tqdm_options)
    stream = sys.stderr if file is None else file
    isatty = getattr(stream, "isatty", None)
    if callable(isatty) and isatty():
        return terminal_tqdm(file=stream, **options, **tqdm_options)
    return _ProgressLines(total, desc, initial, stream, _PROGRESS_LINE_EVERY_S)


class _Logger:
    """Rank-0 logging to ``log.jsonl`` and, when installed, TensorBoard.

    A run that starts at step ``start`` (a resume, or 0) first drops what an earlier,
    interrupted run logged after that step, so that each step is logged once: the
    records of ``log.jsonl`` past ``start`` are cut (the file is rewritten atomically)
    and TensorBoard purges its events past ``start`` (``purge_step``).
    """

    def __init__(self, folder: Path | None, tensorboard: bool, start: int = 0) -> None:
        self.file = None
        self.writer: Any = None
        if folder is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        _cut_log(folder / "log.jsonl", start)
        self.file = open(folder / "log.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                return
            # records are logged at step start + 1 onwards: TensorBoard drops events >= it
            self.writer = SummaryWriter(log_dir=str(folder / "tensorboard"), purge_step=start + 1)

    def log(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self.writer.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def _cut_log(path: Path, start: int) -> None:
    """Keep only the records of ``path`` (a ``log.jsonl``) up to step ``start``, atomically.

    The rest were logged by an interrupted run after the checkpoint this run resumes
    from (or, at ``start`` 0, by a run that left no checkpoint); this run logs those
    steps again. A line that is not a record (one cut short by a crash) is dropped too.
    """
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if (step := _record_step(line)) is not None and step <= start]
    if len(kept) == len(lines) and (not lines or lines[-1].endswith("\n")):
        return
    fd, temp = tempfile.mkstemp(prefix=".log.jsonl.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.writelines(line if line.endswith("\n") else line + "\n" for line in kept)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(temp, path.stat().st_mode & 0o777)  # mkstemp's file is private (0600)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _record_step(line: str) -> int | None:
    """The ``step`` of one ``log.jsonl`` line; None when it is not a record."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


class _EpochBatches:
    """Index batches of this process's shards, cut per epoch and cached for the current one."""

    def __init__(
        self, size: int, micro: int, shards: Sequence[int], num_shards: int, seed: int
    ) -> None:
        self.size, self.micro, self.shards, self.num_shards, self.seed = (
            size,
            micro,
            list(shards),
            num_shards,
            seed,
        )
        self.steps_per_epoch = (size // num_shards) // micro
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the dataset ({size} items) is smaller than one global batch "
                f"({num_shards} x {micro}); lower batch_size"
            )
        self._epoch = -1
        self._batches: dict[int, list[list[int]]] = {}

    def at(self, step: int) -> Iterator[tuple[int, list[int]]]:
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._batches = {
                s: shard_batches(
                    self.size,
                    batch_size=self.micro,
                    epoch=epoch,
                    seed=self.seed,
                    shard=s,
                    num_shards=self.num_shards,
                )
                for s in self.shards
            }
        for s in self.shards:
            yield s, self._batches[s][position]

    def stream(
        self, dataset: Dataset[Any], start: int, stop: int, num_workers: int, pin: bool
    ) -> Generator[list[tuple[int, Batch]], None, None]:
        """For each step from ``start`` to ``stop``: this process's ``(shard, batch)`` pairs.

        With workers, one ``DataLoader`` reads every step (its workers start once, not
        once per epoch), in the same order as the inline path.
        """
        if num_workers == 0:
            for k in range(start, stop):
                yield [(s, collate([dataset[i] for i in idx])) for s, idx in self.at(k)]
            return
        loader = DataLoader(
            dataset,
            batch_sampler=_StepBatches(self, start, stop),
            collate_fn=collate,
            num_workers=num_workers,
            pin_memory=pin,
            # its own generator: worker seeding must not draw from the global RNG
            generator=torch.Generator().manual_seed(self.seed + start // self.steps_per_epoch),
        )
        items = iter(loader)
        try:
            for _ in range(start, stop):
                yield [(s, next(items)) for s in self.shards]
        finally:
            del items  # shuts the workers down now, not when the generator is collected


class _StepBatches:
    """A ``batch_sampler``: the index batches of steps ``start`` to ``stop``, shard by shard."""

    def __init__(self, batches: _EpochBatches, start: int, stop: int) -> None:
        self.batches, self.start, self.stop = batches, start, stop

    def __iter__(self) -> Iterator[list[int]]:
        for k in range(self.start, self.stop):
            for _, idx in self.batches.at(k):
                yield idx

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * len(self.batches.shards)


@_leaves_what_it_joins
def train(
    denoiser: nn.Module,
    schedule: NoiseSchedule,
    dataset: Dataset[Any],
    config: TrainConfig,
    *,
    loss: LossFn | None = None,
    condition: ConditionFn | None = None,
    uncond: Conditioning | None = None,
    encode: Callable[[Tensor], Tensor] | None = None,
    sample: SampleFn | None = None,
    prediction: Prediction | None = None,
) -> TrainResult:
    """Train ``denoiser`` on ``dataset`` in place and return the losses and the EMA.

    - ``loss(denoiser, schedule, x0, cond=, uncond=, generator=) -> scalar``; default
      ``config.loss``.
    - ``condition(batch) -> Conditioning | None`` builds each micro-batch's condition
      (e.g. a text conditioner on ``batch.captions``); ``uncond`` is the null condition
      substituted by condition dropout.
    - ``encode(x) -> z`` maps data to latents (a frozen encoder) before noising.
    - ``sample(model, generator) -> samples in [-1, 1]`` makes the periodic sample grid
      (with the EMA weights when there are any).
    - ``prediction`` names what a module without a ``prediction`` attribute predicts (one
      that has it must agree).

    Runs under ``torchrun`` too: ``init_distributed()`` (called here) joins the job,
    the denoiser is wrapped in ``DistributedDataParallel`` and rank 0 writes files; a
    process group this call created is destroyed when it returns.
    A fresh run seeds the global torch RNG from ``(seed, rank)`` (for dropout); a
    resumed run restores each rank's own state from the checkpoint (on a different
    number of processes it warns and reseeds each rank from ``(seed, rank, step)``).
    """
    info = init_distributed()
    device = _resolve_device(config, info)
    if config.precision == "fp16" and device.type != "cuda":
        raise ValueError("precision='fp16' needs a CUDA device; use 'bf16' or 'fp32' on CPU")
    own_kind = getattr(denoiser, "prediction", None)
    if prediction is not None and own_kind is not None and prediction != own_kind:
        raise ValueError(
            f"train: prediction={prediction!r} conflicts with the denoiser's own prediction "
            f"{own_kind!r}; it would learn to predict {prediction!r} while samplers read its "
            f"output as {own_kind!r}. Build the denoiser with prediction={prediction!r} "
            "(e.g. in its config) or drop prediction="
        )
    found_kind = prediction or own_kind
    if found_kind not in ("epsilon", "x0", "v", "flow"):
        raise ValueError(
            "the denoiser needs a 'prediction' attribute ('epsilon', 'x0', 'v' or 'flow'), "
            "or pass prediction="
        )
    kind = cast(Prediction, found_kind)
    micro = config.micro_batch_size or config.batch_size // info.world_size
    if micro < 1 or config.batch_size % micro:
        raise ValueError(
            f"batch_size {config.batch_size} cannot be split over {info.world_size} processes"
        )
    num_shards = config.batch_size // micro
    if num_shards % info.world_size:
        raise ValueError(
            f"{num_shards} shards (batch_size / micro_batch_size) cannot be shared evenly "
            f"by {info.world_size} processes"
        )
    accum = num_shards // info.world_size
    shards = [info.rank * accum + j for j in range(accum)]
    if config.sample_every is not None and sample is None:
        raise ValueError("sample_every is set but no sample function was given")
    if config.sample_every is not None and config.output_dir is None:
        # (not refused by TrainConfig itself: a run file may get output_dir on the command line)
        raise ValueError(
            f"sample_every ({config.sample_every}) saves sample grids under "
            "output_dir/samples, but output_dir is None, so none would be made; set "
            "output_dir or leave sample_every out"
        )
    out = Path(config.output_dir) if config.output_dir is not None else None
    ckpt_dir = out / "checkpoints" if out is not None else None
    if ckpt_dir is not None and not config.resume:
        _refuse_earlier_run(ckpt_dir)

    denoiser.to(device)
    loss_fn: LossFn = loss if loss is not None else config.loss
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=config.lr,
        betas=config.betas,
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
    )
    scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
    ema = EMA(denoiser, config.ema_decay) if config.ema_decay is not None else None

    start = 0
    if ckpt_dir is not None and config.resume:
        found = latest_checkpoint(ckpt_dir)
        if found is not None:
            state = load_training_checkpoint(
                found, model=denoiser, optimizer=optimizer, ema=ema, scaler=scaler
            )
            start = state.step
            _restore_rank_rng(state.rank_rng, found, info, device, config.seed, start)
            _reapply_adam_hparams(optimizer, config, found)
    if start == 0:
        # Dropout and other global-RNG users differ per rank, reproducibly.
        torch.manual_seed(
            int(np.random.SeedSequence([config.seed, info.rank]).generate_state(1)[0])
        )
    if ema is not None:
        ema.to(device)

    model: nn.Module = denoiser
    ddp: DistributedDataParallel | None = None
    if info.world_size > 1:
        ddp = DistributedDataParallel(
            denoiser,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=config.find_unused_parameters,
        )
        model = ddp
    view = _DenoiserView(model, kind)
    batches = _EpochBatches(len(dataset), micro, shards, num_shards, config.seed)  # type: ignore[arg-type]
    stream = batches.stream(
        dataset, start, config.steps, config.num_workers, pin=device.type == "cuda"
    )
    if uncond is not None:
        uncond = uncond.map(lambda t: t.to(device))

    main = info.is_main
    logger = _Logger(out, config.tensorboard, start) if main else _Logger(None, False)
    bar = None
    if main and config.progress and start < config.steps:
        bar = _progress_bar(config.steps, "train", initial=start, dynamic_ncols=True)

    losses: list[float] = []
    written: list[Path] = []
    window_start, window_items = time.perf_counter(), 0
    started = time.perf_counter()
    was_training = denoiser.training  # given back as it came (a pipeline samples in eval)
    try:
        for step in range(start, config.steps):
            lr = learning_rate(config, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            denoiser.train()
            optimizer.zero_grad(set_to_none=True)
            total = torch.zeros((), device=device, dtype=torch.float32)
            for j, (shard, batch) in enumerate(next(stream)):
                x = batch.x.to(device, non_blocking=True)
                if encode is not None:
                    with torch.no_grad():
                        x = encode(x)
                cond = condition(batch) if condition is not None else None
                if cond is not None:
                    cond = cond.map(lambda t: t.to(device))
                generator = step_generator(config.seed, step, shard, device)
                sync = ddp is None or j == accum - 1
                with contextlib.nullcontext() if sync else ddp.no_sync():  # type: ignore[union-attr]
                    with _autocast(config.precision, device):
                        value = loss_fn(
                            view, schedule, x, cond=cond, uncond=uncond, generator=generator
                        )
                    scaled = value.float() / accum
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                total += value.detach().float()
            if scaler is not None:
                scaler.unscale_(optimizer)
            if config.grad_clip is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            else:
                grad_norm = torch.nn.utils.get_total_norm(
                    [p.grad for p in params if p.grad is not None]
                )
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if ema is not None:
                ema.update(denoiser)

            mean = total / accum
            if ddp is not None:
                dist.all_reduce(mean, op=dist.ReduceOp.SUM)
                mean = mean / info.world_size
            value_f = float(mean.item())
            if not math.isfinite(value_f):
                raise FloatingPointError(f"the loss is {value_f} at step {step + 1}")
            losses.append(value_f)
            done = step + 1
            window_items += config.batch_size

            if main:
                now = time.perf_counter()
                throughput = window_items / max(now - window_start, 1e-9)
                if bar is not None:
                    bar.set_postfix(loss=f"{value_f:.4f}", samples_s=f"{throughput:.1f}")
                    bar.update(1)
                if done % config.log_every == 0 or done == config.steps:
                    logger.log(
                        {
                            "step": done,
                            "loss": value_f,
                            "lr": lr,
                            "grad_norm": float(grad_norm),
                            "samples_per_s": throughput,
                            "elapsed_s": now - started,
                        }
                    )
                    window_start, window_items = now, 0
                if (
                    out is not None
                    and sample is not None
                    and config.sample_every is not None
                    and (done % config.sample_every == 0 or done == config.steps)
                ):
                    _save_samples(sample, ema, denoiser, config.seed, done, out)
            if ckpt_dir is not None and (
                done == config.steps
                or (config.checkpoint_every is not None and done % config.checkpoint_every == 0)
            ):
                rank_rng = _gather_rank_rng(info, device)
                if main:
                    written.append(
                        save_training_checkpoint(
                            ckpt_dir / checkpoint_name(done),
                            model=denoiser,
                            step=done,
                            optimizer=optimizer,
                            ema=ema,
                            scaler=scaler,
                            extra={"world_size": info.world_size, "config": config.to_dict()},
                            rank_rng=rank_rng,
                        )
                    )
                    for _, old in list_checkpoints(ckpt_dir)[: -config.keep_checkpoints]:
                        old.unlink(missing_ok=True)
                        if old in written:
                            written.remove(old)
                if ddp is not None:
                    dist.barrier()
    finally:
        denoiser.train(was_training)
        stream.close()  # stops any DataLoader workers
        if bar is not None:
            bar.close()
        logger.close()
    return TrainResult(
        losses=losses,
        start_step=start,
        step=max(start, config.steps),
        ema=ema,
        checkpoints=written,
        output_dir=out,
    )


def _gather_rank_rng(info: DistributedInfo, device: torch.device) -> dict[str, Tensor]:
    """Every rank's torch CPU (and CUDA) RNG state, stacked by rank on rank 0 ({} elsewhere)."""
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    if info.world_size == 1:
        return {k: v[None] for k, v in states.items()}
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    stacked: dict[str, Tensor] = {}
    for key, state in states.items():
        state = state.to(on)
        parts = [torch.empty_like(state) for _ in range(info.world_size)] if info.is_main else None
        dist.gather(state, parts, dst=0)
        if parts is not None:
            stacked[key] = torch.stack(parts).cpu()
    return stacked


def _restore_rank_rng(
    rank_rng: dict[str, Tensor],
    path: Path,
    info: DistributedInfo,
    device: torch.device,
    seed: int,
    step: int,
) -> None:
    """Give each rank back its own RNG state; reseed per rank when the world size changed."""
    saved = rank_rng["torch"].shape[0] if "torch" in rank_rng else 1  # older files: rank 0's
    if saved != info.world_size:
        warn_at_caller(
            f"{path} holds the RNG states of {saved} process(es) but this run has "
            f"{info.world_size}: each process's global torch RNG is reseeded from "
            f"(seed, rank, step), so its draws (dropout) differ from an uninterrupted run's"
        )
        torch.manual_seed(int(np.random.SeedSequence([seed, info.rank, step]).generate_state(1)[0]))
        return
    # clone(): a row of the stacked states is a view, and set_rng_state reads its storage
    if "torch" in rank_rng:
        torch.set_rng_state(rank_rng["torch"][info.rank].to(torch.uint8).clone())
    if "cuda" in rank_rng and device.type == "cuda":
        torch.cuda.set_rng_state(rank_rng["cuda"][info.rank].to(torch.uint8).clone(), device)


def _refuse_earlier_run(ckpt_dir: Path) -> None:
    """A fresh run must not mix its checkpoints (and pruning) with an earlier run's."""
    found = list_checkpoints(ckpt_dir)
    if found:
        steps = ", ".join(str(step) for step, _ in found)
        raise FileExistsError(
            f"resume=False, but {ckpt_dir} already holds {len(found)} checkpoint(s) of an "
            f"earlier run (steps {steps}); pass resume=True to continue that run, or choose "
            "another output_dir (a fresh run never deletes an earlier run's checkpoints)"
        )


def _save_samples(
    sample: SampleFn, ema: EMA | None, denoiser: nn.Module, seed: int, step: int, out: Path
) -> Path:
    model = ema.averaged() if ema is not None else denoiser
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            images = sample(model, torch.Generator().manual_seed(seed))
    finally:
        model.train(was_training)
    # clamped: an early model's samples can overshoot [-1, 1] far more than save_grid accepts
    return save_grid(images.float().cpu().clamp(-1, 1), out / "samples" / f"step-{step:08d}.png")


ConditionMode = Literal["auto", "text", "labels", "none"]


def _reapply_adam_hparams(
    optimizer: torch.optim.Optimizer, config: TrainConfig, found: Path
) -> None:
    """Set the config's AdamW hyperparameters on a restored optimizer, warning on changes."""
    wanted: dict[str, Any] = {
        "weight_decay": config.weight_decay,
        "betas": tuple(config.betas),
        "eps": config.adam_eps,
    }
    names = {"weight_decay": "weight_decay", "betas": "betas", "eps": "adam_eps"}
    changed: dict[str, Any] = {}
    for group in optimizer.param_groups:
        for key, value in wanted.items():
            old = group.get(key)
            old_cmp = tuple(old) if isinstance(old, (list, tuple)) else old
            if old_cmp != value and key not in changed:
                changed[key] = old_cmp
            group[key] = value
    if changed:
        listed = ", ".join(
            f"{names[key]} {old!r} -> {wanted[key]!r}" for key, old in changed.items()
        )
        warn_at_caller(
            f"train: resuming from {found.name} with changed optimizer settings ({listed}); "
            "the config's values are used from here on"
        )


@_leaves_what_it_joins
def train_pipeline(
    pipeline: "Pipeline",
    dataset: Dataset[Any],
    config: TrainConfig,
    *,
    condition: ConditionMode = "auto",
    null_label: int | None = None,
    sample_prompts: Sequence[str] | None = None,
    sample_steps: int = 20,
) -> TrainResult:
    """Train a pipeline's denoiser on ``dataset``; the encoder and text conditioner stay frozen.

    ``condition``: ``"text"`` conditions on ``batch.captions`` through the pipeline's text
    conditioner (dropped to the empty prompt by ``config.loss.cond_dropout``);
    ``"labels"`` on ``batch.labels`` (dropped to ``null_label``); ``"none"``
    unconditional; ``"auto"``: text when the pipeline has a text conditioner, else none.
    Sample grids (``config.sample_every``) use ``sample_prompts`` (or 8 unconditional
    samples) with the EMA weights.
    """
    info = init_distributed()
    device = _resolve_device(config, info)
    pipeline.to(device)
    for part in (pipeline.encoder, pipeline.text):
        if isinstance(part, nn.Module):
            part.eval().requires_grad_(False)
    if not isinstance(pipeline.denoiser, nn.Module):
        raise TypeError("train_pipeline: the pipeline's denoiser must be an nn.Module")
    if pipeline.data_shape is not None and len(dataset) > 0:  # type: ignore[arg-type]
        first = collate([dataset[0]]).x.shape[1:]
        if tuple(first) != pipeline.data_shape:
            raise ValueError(
                f"train_pipeline: the dataset's samples have shape {tuple(first)} but the "
                f"pipeline's data_shape is {pipeline.data_shape}"
            )
    mode = condition
    if mode == "auto":
        mode = "text" if pipeline.text is not None else "none"

    condition_fn: ConditionFn | None = None
    uncond: Conditioning | None = None
    if mode == "text":
        text = pipeline.text
        if text is None:
            raise ValueError("train_pipeline: condition='text' needs a text conditioner")

        def text_condition(batch: Batch) -> Conditioning:
            if batch.captions is None:
                raise ValueError("train_pipeline: condition='text' needs captions in the data")
            with torch.no_grad():
                return text.condition(batch.captions)

        condition_fn = text_condition
        with torch.no_grad():
            uncond = text.condition([""])
    elif mode == "labels":
        if config.loss.cond_dropout > 0 and null_label is None:
            raise ValueError("train_pipeline: label dropout (cond_dropout > 0) needs null_label")

        def label_condition(batch: Batch) -> Conditioning:
            if batch.labels is None:
                raise ValueError("train_pipeline: condition='labels' needs labels in the data")
            return Conditioning(labels=batch.labels)

        condition_fn = label_condition
        if null_label is not None:
            uncond = Conditioning(labels=torch.tensor([null_label]))

    encode = pipeline.encode if pipeline.encoder is not None else None

    prompts: list[str] | None = None
    if mode == "text":
        prompts = list(sample_prompts or [])
        if not prompts:  # the captions of the first items
            first = collate([dataset[i] for i in range(min(8, len(dataset)))])  # type: ignore[arg-type]
            prompts = first.captions or [""]
    labels = torch.arange(8) % 10 if mode == "labels" else None

    def sample(model: nn.Module, generator: torch.Generator) -> Tensor:
        return pipeline.generate(
            prompts,
            cond=Conditioning(labels=labels.to(device)) if labels is not None else None,
            num_samples=8 if prompts is None and labels is None else None,
            steps=sample_steps,
            guidance=1.0,
            generator=generator,
            denoiser=_DenoiserView(model, pipeline.denoiser.prediction),
        )

    return train(
        pipeline.denoiser,
        pipeline.schedule,
        dataset,
        config,
        condition=condition_fn,
        uncond=uncond,
        encode=encode,
        sample=sample if config.sample_every is not None else None,
    )


class TrainRunConfig(Config):
    """Everything a command-line training run needs: pipeline, data and training configs."""

    kind: Literal["train_run"] = "train_run"
    pipeline: PipelineConfig = Field(description="the pipeline to build and train")
    data: SerializeAsAny[Config] = Field(description="the dataset (group 'dataset')")
    train: TrainConfig = Field(description="how to train")
    condition: ConditionMode = Field(
        default="auto", description="what the denoiser is conditioned on"
    )
    null_label: int | None = Field(default=None, ge=0, description="the 'no label' class for CFG")
    sample_prompts: list[str] | None = Field(
        default=None, description="prompts of the sample grids"
    )

    @field_validator("data", mode="before")
    @classmethod
    def _parse_data(cls, value: Any) -> Any:
        from diffkit.data import DATASETS

        return DATASETS.parse(value)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m diffkit.training run.yaml`` (or under ``torchrun``): build, train, save.

    Rank 0 saves the pipeline with the EMA weights to ``<output_dir>/pipeline``.
    """
    import argparse

    import yaml

    from diffkit.builder import build
    from diffkit.data import DATASETS

    parser = argparse.ArgumentParser(prog="diffkit-train", description=main.__doc__)
    parser.add_argument("config", help="a YAML or JSON TrainRunConfig file")
    parser.add_argument("--steps", type=int, help="override train.steps")
    parser.add_argument("--output-dir", help="override train.output_dir")
    args = parser.parse_args(argv)
    with open(args.config, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    overrides = {
        k: v for k, v in (("steps", args.steps), ("output_dir", args.output_dir)) if v is not None
    }
    if overrides:
        data = {**data, "train": {**data.get("train", {}), **overrides}}
    run = TrainRunConfig.model_validate(data)
    with distributed() as info:
        pipeline = build(run.pipeline)
        dataset = DATASETS.build(run.data)
        result = train_pipeline(
            pipeline,
            dataset,
            run.train,
            condition=run.condition,
            null_label=run.null_label,
            sample_prompts=run.sample_prompts,
        )
        if info.is_main and result.output_dir is not None:
            if result.ema is not None:
                result.ema.copy_to(cast(nn.Module, pipeline.denoiser))
            pipeline.save(result.output_dir / "pipeline")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
