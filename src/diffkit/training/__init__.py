"""Training, as a library: ``train(model, loss, dataset, config)``.

One loop trains every model of a pipeline, each with its own loss object
([`TrainingLoss`][diffkit.training.TrainingLoss]: ``loss(model, batch, generator) ->
scalar``): a denoiser with [`DenoiserLoss`][diffkit.training.DenoiserLoss] (or simply
``train(denoiser, schedule, ...)``), a KL autoencoder with
[`AutoencoderLoss`][diffkit.training.AutoencoderLoss], CLIP with
[`CLIPLoss`][diffkit.training.CLIPLoss]. ``train`` is
[`prepare`][diffkit.training.prepare] → [`train_step`][diffkit.training.train_step] →
[`after_step`][diffkit.training.after_step] (log, sample, checkpoint) →
[`finish`][diffkit.training.finish]; call them yourself to step a run by hand.

One optimizer step draws a *global batch* of ``batch_size`` items. It is cut into
``batch_size / micro_batch_size`` *shards*; each shard has its own slice of the epoch
(a ``DistributedSampler`` over shards, reshuffled by ``set_epoch``) and its own random
generator for times, noise and condition dropout, seeded from ``(seed, step, shard)``.
The processes of a ``torchrun`` job share the shards out (``world_size`` must divide
their number) and run the rest as gradient accumulation, so a run's numbers depend on
its config, not on how many processes run it: two processes reproduce one process's
loss trajectory up to floating-point summation order.

Each step: the loss, AdamW with the config's learning-rate schedule
([`learning_rate`][diffkit.training.learning_rate]: linear warm-up, then constant or
cosine), gradient clipping, an [`EMA`][diffkit.ema.EMA] of the weights, optional mixed
precision (bf16, or fp16 with a gradient scaler; fp32 master weights), activation
checkpointing per block and ``torch.compile``. Under ``torchrun`` the model runs in DDP,
or sharded per block with FSDP2 (``strategy="fsdp"``: each rank holds ``1 / world_size``
of the weights, gradients, AdamW states and EMA). Rank 0 shows a
progress bar (loss, samples/s; in a log file or CI, a plain line every 30 s instead),
appends to ``log.jsonl`` (and TensorBoard when it is installed), saves sample grids,
and writes checkpoints atomically with optimizer, EMA, step and RNG states (every
rank's torch RNG, gathered to rank 0); ``resume=True`` continues from the newest one
and gives the same losses as a run that was never interrupted on the same number of
processes (and the same ``log.jsonl``: what the interrupted run logged after that
checkpoint is cut first, and TensorBoard purges it).

[`train_pipeline`][diffkit.training.train_pipeline] trains a built
[`Pipeline`][diffkit.pipeline.Pipeline] (captions through its text conditioner, data
through its frozen encoder), and ``python -m diffkit.training run.yaml`` (a
[`TrainRunConfig`][diffkit.training.TrainRunConfig]) does the same from the command line,
alone or under ``torchrun``.
"""

from diffkit.training._batching import step_generator as step_generator
from diffkit.training._config import TrainConfig as TrainConfig
from diffkit.training._config import learning_rate as learning_rate
from diffkit.training._distributed import DistributedInfo as DistributedInfo
from diffkit.training._distributed import distributed as distributed
from diffkit.training._distributed import init_distributed as init_distributed
from diffkit.training._loop import LoopState as LoopState
from diffkit.training._loop import StepResult as StepResult
from diffkit.training._loop import TrainResult as TrainResult
from diffkit.training._loop import after_step as after_step
from diffkit.training._loop import finish as finish
from diffkit.training._loop import prepare as prepare
from diffkit.training._loop import train as train
from diffkit.training._loop import train_step as train_step
from diffkit.training._losses import AutoencoderLoss as AutoencoderLoss
from diffkit.training._losses import CLIPLoss as CLIPLoss
from diffkit.training._losses import DenoiserLoss as DenoiserLoss
from diffkit.training._losses import TrainingLoss as TrainingLoss
from diffkit.training._pipeline import ConditionMode as ConditionMode
from diffkit.training._pipeline import train_pipeline as train_pipeline
from diffkit.training._reporting import progress_bar as progress_bar
from diffkit.training._run import TrainRunConfig as TrainRunConfig
from diffkit.training._run import main as main
from diffkit.training._sharded import ShardedState as ShardedState
from diffkit.training._sharded import export_pipeline as export_pipeline
from diffkit.training._sharded import latest_sharded_checkpoint as latest_sharded_checkpoint
from diffkit.training._sharded import load_consolidated as load_consolidated
from diffkit.training._sharded import load_sharded_checkpoint as load_sharded_checkpoint
from diffkit.training._sharded import save_sharded_checkpoint as save_sharded_checkpoint

# Configs name their public home in messages ("see diffkit.training.TrainConfig ...").
for _config in (AutoencoderLoss, TrainConfig, TrainRunConfig):
    _config.__module__ = __name__
del _config

__all__ = [
    "AutoencoderLoss",
    "CLIPLoss",
    "ConditionMode",
    "DenoiserLoss",
    "DistributedInfo",
    "LoopState",
    "ShardedState",
    "StepResult",
    "TrainConfig",
    "TrainResult",
    "TrainRunConfig",
    "TrainingLoss",
    "after_step",
    "distributed",
    "export_pipeline",
    "finish",
    "init_distributed",
    "latest_sharded_checkpoint",
    "learning_rate",
    "load_consolidated",
    "load_sharded_checkpoint",
    "main",
    "prepare",
    "progress_bar",
    "save_sharded_checkpoint",
    "step_generator",
    "train",
    "train_pipeline",
    "train_step",
]
