"""The training loop: ``train()`` = ``prepare`` → (``train_step`` → ``after_step``)* → ``finish``.

- [`prepare`][diffkit.training.prepare] joins the job, checks the run, builds the EMA,
  applies the strategy (activation checkpointing, compile, then DDP or FSDP2 sharding:
  ``TrainConfig.strategy``), builds the optimizer and scaler, resumes from the newest
  checkpoint and opens the batch stream, the log and the progress display.
- [`train_step`][diffkit.training.train_step] runs one optimizer step: this rank's
  shards (gradient accumulation), gradient clipping, the optimizer, the EMA, and the
  loss averaged over the ranks.
- [`after_step`][diffkit.training.after_step] reports (progress, log), saves a sample
  grid and writes a checkpoint when they are due.
- [`finish`][diffkit.training.finish] closes what ``prepare`` opened and gives the model
  back in the mode it came in.

The loop knows nothing of the model's kind: a [`TrainingLoss`][diffkit.training.TrainingLoss]
turns ``(model, batch, generator)`` into the scalar to minimise.
"""

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from diffkit.checkpoint import (
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    load_training_checkpoint,
    save_training_checkpoint,
)
from diffkit.data import Batch
from diffkit.ema import EMA
from diffkit.protocols import Conditioning, NoiseSchedule
from diffkit.training._batching import EpochBatches, ShardPlan, step_generator, to_device
from diffkit.training._config import Precision, TrainConfig, checkpoint_format, learning_rate
from diffkit.training._distributed import (
    DistributedInfo,
    barrier,
    gather_rank_rng,
    init_distributed,
    leaves_what_it_joins,
    mean_over_ranks,
    resolve_device,
    restore_rank_rng,
    seed_rank,
)
from diffkit.training._losses import (
    ConditionFn,
    DenoiserLoss,
    LossFn,
    TrainingLoss,
    resolve_prediction,
)
from diffkit.training._reporting import RunLog, SampleFn, progress_bar, save_samples
from diffkit.training._sharded import (
    latest_sharded_checkpoint,
    list_sharded_checkpoints,
    load_sharded_checkpoint,
    prune_sharded_checkpoints,
    save_sharded_checkpoint,
    sharded_checkpoint_name,
)
from diffkit.training._strategy import (
    Resolved,
    apply_strategy,
    full_value,
    grad_scaler,
    resolve_strategy,
)
from diffkit.typing import Prediction, warn_at_caller

__all__ = [
    "LoopState",
    "StepResult",
    "TrainResult",
    "after_step",
    "finish",
    "prepare",
    "train",
    "train_step",
]


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


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What one optimizer step measured."""

    step: int
    """Optimizer steps done, this one included (1-based)."""
    loss: float
    """The loss of the global batch (mean over shards and ranks)."""
    lr: float
    grad_norm: float
    """The global gradient norm before clipping."""


@dataclasses.dataclass
class LoopState:
    """A run between steps: made by ``prepare``, run by ``train_step``, closed by ``finish``."""

    config: TrainConfig
    info: DistributedInfo
    device: torch.device
    model: nn.Module
    """The module being trained."""
    wrapped: nn.Module
    """What the loss calls: ``model`` (also when FSDP sharded it in place), or its
    ``DistributedDataParallel`` wrapper."""
    loss: TrainingLoss
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    ema: EMA | None
    plan: ShardPlan
    start: int
    """The step this call starts at (a resume's checkpoint step, else 0)."""
    batches: Generator[list[tuple[int, Batch]], None, None]
    log: RunLog
    bar: Any
    sample: SampleFn | None
    was_training: bool
    losses: list[float] = dataclasses.field(default_factory=list)
    written: list[Path] = dataclasses.field(default_factory=list)
    started: float = dataclasses.field(default_factory=time.perf_counter)
    window_start: float = dataclasses.field(default_factory=time.perf_counter)
    window_items: int = 0
    strategy: Resolved = "single"
    """What runs the model: one process, ``ddp`` or ``fsdp`` (``config.strategy`` resolved)."""

    @property
    def out(self) -> Path | None:
        """The run's folder (``config.output_dir``)."""
        return Path(self.config.output_dir) if self.config.output_dir is not None else None

    @property
    def checkpoint_dir(self) -> Path | None:
        """Where checkpoints go: ``output_dir/checkpoints``."""
        out = self.out
        return out / "checkpoints" if out is not None else None

    def result(self) -> TrainResult:
        """What ``train`` returns for this run."""
        return TrainResult(
            losses=self.losses,
            start_step=self.start,
            step=max(self.start, self.config.steps),
            ema=self.ema,
            checkpoints=self.written,
            output_dir=self.out,
        )


@leaves_what_it_joins
def train(
    model: nn.Module,
    objective: TrainingLoss | NoiseSchedule,
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
    """Train ``model`` on ``dataset`` in place and return the losses and the EMA.

    ``objective`` is a [`TrainingLoss`][diffkit.training.TrainingLoss]
    ([`AutoencoderLoss`][diffkit.training.AutoencoderLoss],
    [`CLIPLoss`][diffkit.training.CLIPLoss], [`DenoiserLoss`][diffkit.training.DenoiserLoss]
    or your own), or, for a denoiser, its noise schedule: ``train(denoiser, schedule, ...)``
    is ``train(denoiser, DenoiserLoss(schedule, ...), ...)`` with

    - ``loss(denoiser, schedule, x0, cond=, uncond=, generator=) -> scalar``; default
      ``config.loss``.
    - ``condition(batch) -> Conditioning | None`` builds each micro-batch's condition
      (e.g. a text conditioner on ``batch.captions``); ``uncond`` is the null condition
      substituted by condition dropout.
    - ``encode(x) -> z`` maps data to latents (a frozen encoder) before noising.
    - ``prediction`` names what a module without a ``prediction`` attribute predicts (one
      that has it must agree).

    ``sample(model, generator) -> samples in [-1, 1]`` makes the periodic sample grid
    (with the EMA weights when there are any), whatever the objective.

    Runs under ``torchrun`` too: ``init_distributed()`` (called here) joins the job,
    the model is wrapped in ``DistributedDataParallel`` (or, with ``strategy="fsdp"``,
    sharded per block with FSDP2) and rank 0 writes files; a
    process group this call created is destroyed when it returns.
    A fresh run seeds the global torch RNG from ``(seed, rank)`` (for dropout); a
    resumed run restores each rank's own state from the checkpoint (on a different
    number of processes it warns and reseeds each rank from ``(seed, rank, step)``).
    """
    if isinstance(objective, NoiseSchedule):
        objective = DenoiserLoss(
            objective,
            loss=loss if loss is not None else config.loss,
            condition=condition,
            uncond=uncond,
            encode=encode,
            prediction=resolve_prediction(model, prediction),
        )
    else:
        _refuse_denoiser_options(loss=loss, condition=condition, uncond=uncond, encode=encode)
        if prediction is not None:
            raise TypeError("train: prediction= belongs to train(denoiser, schedule, ...)")
    state = prepare(model, objective, dataset, config, sample=sample)
    try:
        for step in range(state.start, config.steps):
            after_step(state, train_step(state, step))
    finally:
        finish(state)
    return state.result()


def _refuse_denoiser_options(**options: object) -> None:
    given = [name for name, value in options.items() if value is not None]
    if given:
        raise TypeError(
            f"train: {', '.join(given)}= belong to train(denoiser, schedule, ...); with a "
            "training loss object, give them to its constructor (e.g. DenoiserLoss)"
        )


def prepare(
    model: nn.Module,
    loss: TrainingLoss,
    dataset: Dataset[Any],
    config: TrainConfig,
    *,
    sample: SampleFn | None = None,
) -> LoopState:
    """Set a run up: check it, build the optimizer and EMA, resume, wrap, open the stream.

    Joins the ``torchrun`` job when there is one; stepping a run by hand there, do it
    inside [`distributed`][diffkit.training.distributed], which leaves the job again.
    """
    info = init_distributed()
    device = resolve_device(config.device, info)
    strategy = resolve_strategy(config, info)
    _check_run(config, strategy, sample)
    plan = ShardPlan.of(config, info)
    out = Path(config.output_dir) if config.output_dir is not None else None
    if out is not None and not config.resume:
        _refuse_earlier_run(out / "checkpoints")
    model.to(device)
    ema = EMA(model, config.ema_decay) if config.ema_decay is not None else None
    wrapped = apply_strategy(model, config, strategy, device, ema)  # FSDP: shards in place
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=config.lr,
        betas=config.betas,
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
        # one multi-tensor update instead of a loop over the parameters (torch's default on
        # CUDA, not on CPU); FSDP's sharded parameters keep torch's choice
        foreach=True if strategy != "fsdp" else None,
    )
    scaler = grad_scaler(config.precision, strategy, device)
    start = 0
    if out is not None and config.resume:
        start = _resume(out / "checkpoints", model, optimizer, ema, scaler, config, info, device)
    if start == 0:
        seed_rank(config.seed, info)
    if ema is not None:
        ema.to(device)
    batches = EpochBatches(len(dataset), plan, config.seed)  # type: ignore[arg-type]
    stream = batches.stream(
        dataset, start, config.steps, config.num_workers, pin=device.type == "cuda"
    )
    main = info.is_main
    bar = None
    if main and config.progress and start < config.steps:
        bar = progress_bar(config.steps, "train", initial=start, dynamic_ncols=True)
    return LoopState(
        config=config,
        info=info,
        device=device,
        model=model,
        wrapped=wrapped,
        loss=loss,
        params=params,
        optimizer=optimizer,
        scaler=scaler,
        ema=ema,
        plan=plan,
        start=start,
        batches=stream,
        log=RunLog(out if main else None, config.tensorboard and main, start),
        bar=bar,
        sample=sample,
        was_training=model.training,  # given back as it came (a pipeline samples in eval)
        strategy=strategy,
    )


def _check_run(config: TrainConfig, strategy: Resolved, sample: SampleFn | None) -> None:
    if config.sample_every is not None and sample is None:
        raise ValueError("sample_every is set but no sample function was given")
    if config.sample_every is not None and config.output_dir is None:
        # (not refused by TrainConfig itself: a run file may get output_dir on the command line)
        raise ValueError(
            f"sample_every ({config.sample_every}) saves sample grids under "
            "output_dir/samples, but output_dir is None, so none would be made; set "
            "output_dir or leave sample_every out"
        )
    if strategy == "fsdp":
        _check_fsdp(config)


def _check_fsdp(config: TrainConfig) -> None:
    """Refuse, by name, what the FSDP strategy does not do (yet)."""
    if config.sample_every is not None:
        raise ValueError(
            "sample_every with strategy='fsdp': sample grids run the model on rank 0 alone, "
            "but its weights are sharded over every rank; sample after training instead"
        )
    if config.compile:
        raise ValueError(
            "compile=True with strategy='fsdp' is not supported (FSDP's hooks would be "
            "traced); compile under 'single' or 'ddp'"
        )


def train_step(state: LoopState, step: int) -> StepResult:
    """Run optimizer step ``step`` (0-based) on this rank's shards of the global batch."""
    config = state.config
    lr = learning_rate(config, step)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    state.model.train()
    state.optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=state.device, dtype=torch.float32)
    for j, (shard, batch) in enumerate(next(state.batches)):
        total += _backward(state, step, shard, batch, sync=j == state.plan.accum - 1)
    grad_norm = _optimizer_step(state)
    value = float(mean_over_ranks(total / state.plan.accum, state.info).item())
    if not math.isfinite(value):
        raise FloatingPointError(f"the loss is {value} at step {step + 1}")
    state.losses.append(value)
    return StepResult(step=step + 1, loss=value, lr=lr, grad_norm=float(grad_norm))


def _backward(state: LoopState, step: int, shard: int, batch: Batch, *, sync: bool) -> Tensor:
    """The loss of one shard, backpropagated (DDP syncs gradients on the last shard only)."""
    batch = to_device(batch, state.device)
    generator = step_generator(state.config.seed, step, shard, state.device)
    wrapped = state.wrapped
    no_sync = isinstance(wrapped, DistributedDataParallel) and not sync
    # FSDP casts through its MixedPrecisionPolicy (and reduce-scatters every shard's
    # gradients: the sum of the averages is the average of the sums)
    precision = "fp32" if state.strategy == "fsdp" else state.config.precision
    with wrapped.no_sync() if no_sync else contextlib.nullcontext():  # type: ignore[operator]
        with _autocast(precision, state.device):
            value = state.loss(wrapped, batch, generator)
        scaled = value.float() / state.plan.accum
        (state.scaler.scale(scaled) if state.scaler is not None else scaled).backward()
    return value.detach().float()


def _optimizer_step(state: LoopState) -> Tensor:
    """Unscale, clip, step the optimizer and the EMA; the gradient norm before clipping."""
    scaler, optimizer = state.scaler, state.optimizer
    if scaler is not None:
        scaler.unscale_(optimizer)
    if state.config.grad_clip is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(state.params, state.config.grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm(
            [p.grad for p in state.params if p.grad is not None]
        )
    grad_norm = full_value(grad_norm)  # FSDP: a DTensor over the shards
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if state.ema is not None:
        state.ema.update(state.model)
    return grad_norm


def _autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def after_step(state: LoopState, result: StepResult) -> None:
    """Report ``result`` (progress, log), then save samples and a checkpoint when due."""
    if state.info.is_main:
        report(state, result)
        if _due(result.step, state.config.sample_every, state.config.steps):
            sample_grid(state, result.step)
    if _due(result.step, state.config.checkpoint_every, state.config.steps, at_end=True):
        checkpoint(state, result.step)


def _due(done: int, every: int | None, steps: int, *, at_end: bool = False) -> bool:
    """Whether a thing done every ``every`` steps and at the end is due after step ``done``.

    ``every=None``: never, or (``at_end``) only at the end.
    """
    if done == steps:
        return every is not None or at_end
    return every is not None and done % every == 0


def report(state: LoopState, result: StepResult) -> None:
    """Rank 0: the progress display, and a log record every ``log_every`` steps."""
    config = state.config
    now = time.perf_counter()
    state.window_items += config.batch_size
    throughput = state.window_items / max(now - state.window_start, 1e-9)
    if state.bar is not None:
        state.bar.set_postfix(loss=f"{result.loss:.4f}", samples_s=f"{throughput:.1f}")
        state.bar.update(1)
    if result.step % config.log_every == 0 or result.step == config.steps:
        state.log.log(
            {
                "step": result.step,
                "loss": result.loss,
                "lr": result.lr,
                "grad_norm": result.grad_norm,
                "samples_per_s": throughput,
                "elapsed_s": now - state.started,
            }
        )
        state.window_start, state.window_items = now, 0


def sample_grid(state: LoopState, step: int) -> Path | None:
    """Rank 0: save a sample grid of step ``step`` (when the run has a sample function)."""
    if state.sample is None or state.out is None:
        return None
    return save_samples(state.sample, state.ema, state.model, state.config.seed, step, state.out)


def checkpoint(state: LoopState, step: int) -> Path | None:
    """Every rank: gather the RNG states; rank 0 writes checkpoint ``step`` and prunes old ones.

    With ``checkpoint_format='sharded'`` every rank writes its part of the folder instead
    ([`save_sharded_checkpoint`][diffkit.training.save_sharded_checkpoint]).
    """
    folder = state.checkpoint_dir
    if folder is None:
        return None
    if checkpoint_format(state.config) == "sharded":
        return _sharded_checkpoint(state, folder, step)
    rank_rng = gather_rank_rng(state.info, state.device)
    path = None
    if state.info.is_main:
        path = save_training_checkpoint(
            folder / checkpoint_name(step),
            model=state.model,
            step=step,
            optimizer=state.optimizer,
            ema=state.ema,
            scaler=state.scaler,
            extra=_run_extra(state),
            rank_rng=rank_rng,
        )
        state.written.append(path)
        for _, old in list_checkpoints(folder)[: -state.config.keep_checkpoints]:
            old.unlink(missing_ok=True)
            if old in state.written:
                state.written.remove(old)
    barrier(state.info)
    return path


def _run_extra(state: LoopState) -> dict[str, Any]:
    """What a checkpoint records of the run: world size, config, how batches were cut."""
    return {
        "world_size": state.info.world_size,
        "config": state.config.to_dict(),
        "shards": [state.plan.micro, state.plan.num_shards],
    }


def _sharded_checkpoint(state: LoopState, folder: Path, step: int) -> Path:
    """Every rank writes its part of sharded checkpoint ``step``; rank 0 prunes old ones."""
    path = save_sharded_checkpoint(
        folder / sharded_checkpoint_name(step),
        model=state.model,
        step=step,
        info=state.info,
        device=state.device,
        optimizer=state.optimizer,
        ema=state.ema,
        scaler=state.scaler,
        extra=_run_extra(state),
    )
    if state.info.is_main:
        state.written.append(path)
        for old in prune_sharded_checkpoints(folder, state.config.keep_checkpoints):
            if old in state.written:
                state.written.remove(old)
    barrier(state.info)
    return path


def finish(state: LoopState) -> None:
    """Close the batch stream (and its workers), the display and the log; restore the mode."""
    state.model.train(state.was_training)
    state.batches.close()  # stops any DataLoader workers
    if state.bar is not None:
        state.bar.close()
    state.log.close()


def _resume(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: EMA | None,
    scaler: torch.amp.GradScaler | None,
    config: TrainConfig,
    info: DistributedInfo,
    device: torch.device,
) -> int:
    """Load the newest checkpoint of the run's format in ``folder`` (if any) and return its
    step (else 0)."""
    if checkpoint_format(config) == "sharded":
        _refuse_other_format(folder, config, list_checkpoints(folder), "safetensors")
        found = latest_sharded_checkpoint(folder)
        if found is None:
            return 0
        loaded = load_sharded_checkpoint(
            found,
            model=model,
            info=info,
            device=device,
            seed=config.seed,
            optimizer=optimizer,
            ema=ema,
            scaler=scaler,
        )
    else:
        _refuse_other_format(folder, config, list_sharded_checkpoints(folder), "sharded")
        found = latest_checkpoint(folder)
        if found is None:
            return 0
        loaded = load_training_checkpoint(
            found, model=model, optimizer=optimizer, ema=ema, scaler=scaler
        )
        restore_rank_rng(loaded.rank_rng, found, info, device, config.seed, loaded.step)
    _warn_on_other_cut(loaded.extra.get("shards"), ShardPlan.of(config, info), found)
    _reapply_adam_hparams(optimizer, config, found)
    return loaded.step


def _refuse_other_format(
    folder: Path, config: TrainConfig, found: list[tuple[int, Path]], kind: str
) -> None:
    """A run resumes from checkpoints of its own format only (never mixes them when pruning)."""
    if found:
        raise ValueError(
            f"checkpoint_format={config.checkpoint_format!r} writes "
            f"{checkpoint_format(config)} checkpoints, but {folder} holds {len(found)} {kind} "
            f"checkpoint(s) of an earlier run (steps {', '.join(str(s) for s, _ in found)}); "
            f"continue that run with checkpoint_format={kind!r}, or choose another output_dir"
        )


def _warn_on_other_cut(saved: Any, plan: ShardPlan, found: Path) -> None:
    """Warn when this run cuts its global batches into other shards than the saved run."""
    if saved is not None and list(saved) != [plan.micro, plan.num_shards]:
        warn_at_caller(
            f"train: {found.name} was written by a run that cut each global batch into "
            f"{saved[1]} shards of {saved[0]}, this run cuts {plan.num_shards} of "
            f"{plan.micro}: the batches and draws differ from an uninterrupted run's (fix "
            "micro_batch_size to resume on another number of processes with the same losses)"
        )


def _refuse_earlier_run(folder: Path) -> None:
    """A fresh run must not mix its checkpoints (and pruning) with an earlier run's."""
    found = list_checkpoints(folder) + list_sharded_checkpoints(folder)
    if found:
        steps = ", ".join(str(step) for step, _ in found)
        raise FileExistsError(
            f"resume=False, but {folder} already holds {len(found)} checkpoint(s) of an "
            f"earlier run (steps {steps}); pass resume=True to continue that run, or choose "
            "another output_dir (a fresh run never deletes an earlier run's checkpoints)"
        )


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
