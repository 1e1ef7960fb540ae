"""The training command line: ``python -m diffkit.training run.yaml`` (or under ``torchrun``)."""

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import torch
from pydantic import Field, SerializeAsAny, field_validator
from torch import nn

from diffkit.builder import PipelineConfig
from diffkit.config import Config
from diffkit.data import DATASETS
from diffkit.training._config import TrainConfig, checkpoint_format
from diffkit.training._distributed import distributed
from diffkit.training._pipeline import ConditionMode, train_pipeline
from diffkit.training._sharded import export_pipeline

if TYPE_CHECKING:
    from diffkit.pipeline import Pipeline

__all__ = ["TrainRunConfig", "main"]

_INIT_STREAM = 0x1A17  # tells the model-initialisation seed apart from the other seeded streams


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
        return DATASETS.parse(value)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m diffkit.training run.yaml`` (or under ``torchrun``): build, train, save.

    Rank 0 saves the pipeline with the EMA weights to ``<output_dir>/pipeline`` (from a
    sharded run: consolidated from its last checkpoint, as ``export`` does).
    ``python -m diffkit.training export run.yaml --to DIR`` saves the pipeline of a
    sharded run's newest intact checkpoint (or ``--checkpoint PATH``) to ``DIR``.
    """
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        return _export_main(argv[1:])
    parser = argparse.ArgumentParser(prog="diffkit-train", description=main.__doc__)
    parser.add_argument("config", help="a YAML or JSON TrainRunConfig file")
    parser.add_argument("--steps", type=int, help="override train.steps")
    parser.add_argument("--output-dir", help="override train.output_dir")
    args = parser.parse_args(argv)
    run = _read_run(args.config, steps=args.steps, output_dir=args.output_dir)
    with distributed() as info:
        pipeline = _build_pipeline(run)
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
            if checkpoint_format(run.train) == "sharded":  # the weights may be sharded
                weights = "ema" if result.ema is not None else "model"
                to = result.output_dir / "pipeline"
                export_pipeline(pipeline, result.output_dir, to, weights=weights)
            else:
                if result.ema is not None:
                    result.ema.copy_to(cast(nn.Module, pipeline.denoiser))
                pipeline.save(result.output_dir / "pipeline")
    return 0


def _read_run(path: str, **train: Any) -> TrainRunConfig:
    """The run file at ``path``, with the ``train`` fields that are not None overridden."""
    import yaml

    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    overrides = {k: v for k, v in train.items() if v is not None}
    if overrides:
        data = {**data, "train": {**data.get("train", {}), **overrides}}
    return TrainRunConfig.model_validate(data)


def _build_pipeline(run: TrainRunConfig) -> "Pipeline":
    """The run's pipeline, its weights initialised from the run's seed."""
    from diffkit.builder import build

    # ``seed`` determines the whole run: the model's initialisation too, the same on every
    # rank, from a generator derived from the seed (not from the seed itself).
    init_seed = np.random.SeedSequence([run.train.seed, _INIT_STREAM]).generate_state(1)
    torch.manual_seed(int(init_seed[0]))
    return build(run.pipeline)


def _export_main(argv: Sequence[str]) -> int:
    """``export run.yaml --to DIR``: a sharded run's pipeline, consolidated, to ``DIR``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="diffkit-train export",
        description="save the pipeline of a sharded run's checkpoint as one safetensors pipeline",
    )
    parser.add_argument("config", help="the run's YAML or JSON TrainRunConfig file")
    parser.add_argument("--to", required=True, help="the folder to save the pipeline to")
    parser.add_argument("--output-dir", help="override train.output_dir")
    parser.add_argument("--checkpoint", help="a checkpoint folder (default: the newest intact)")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema")
    args = parser.parse_args(argv)
    run = _read_run(args.config, output_dir=args.output_dir)
    source = args.checkpoint or run.train.output_dir
    if source is None:
        parser.error("the run has no train.output_dir; give --output-dir or --checkpoint")
    export_pipeline(_build_pipeline(run), source, args.to, weights=args.weights)
    return 0
