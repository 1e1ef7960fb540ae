"""The training command line: ``python -m diffkit.training run.yaml`` (or under ``torchrun``)."""

from collections.abc import Sequence
from typing import Any, Literal, cast

import numpy as np
import torch
from pydantic import Field, SerializeAsAny, field_validator
from torch import nn

from diffkit.builder import PipelineConfig
from diffkit.config import Config
from diffkit.training._config import TrainConfig
from diffkit.training._distributed import distributed
from diffkit.training._pipeline import ConditionMode, train_pipeline

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
        # ``seed`` determines the whole run: the model's initialisation too, the same on every
        # rank, from a generator derived from the seed (not from the seed itself).
        init_seed = np.random.SeedSequence([run.train.seed, _INIT_STREAM]).generate_state(1)
        torch.manual_seed(int(init_seed[0]))
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
