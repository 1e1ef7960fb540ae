"""Training a built [`Pipeline`][diffkit.pipeline.Pipeline]: its denoiser, the rest frozen."""

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from diffkit.data import Batch, collate
from diffkit.protocols import Conditioning
from diffkit.training._config import TrainConfig
from diffkit.training._distributed import init_distributed, leaves_what_it_joins, resolve_device
from diffkit.training._loop import TrainResult, train
from diffkit.training._losses import ConditionFn, DenoiserView
from diffkit.training._reporting import SampleFn

if TYPE_CHECKING:
    from diffkit.pipeline import Pipeline

__all__ = ["ConditionMode", "train_pipeline"]

ConditionMode = Literal["auto", "text", "labels", "none"]


@leaves_what_it_joins
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
    device = resolve_device(config.device, info)
    pipeline.to(device)
    for part in (pipeline.encoder, pipeline.text):
        if isinstance(part, nn.Module):
            part.eval().requires_grad_(False)
    if not isinstance(pipeline.denoiser, nn.Module):
        raise TypeError("train_pipeline: the pipeline's denoiser must be an nn.Module")
    _check_data_shape(pipeline, dataset)
    mode = condition
    if mode == "auto":
        mode = "text" if pipeline.text is not None else "none"
    condition_fn, uncond = _conditioning(pipeline, mode, null_label, config)
    sample = None
    if config.sample_every is not None:
        sample = _sampler(pipeline, dataset, mode, sample_prompts, sample_steps, device)
    return train(
        pipeline.denoiser,
        pipeline.schedule,
        dataset,
        config,
        condition=condition_fn,
        uncond=uncond,
        encode=pipeline.encode if pipeline.encoder is not None else None,
        sample=sample,
    )


def _check_data_shape(pipeline: "Pipeline", dataset: Dataset[Any]) -> None:
    if pipeline.data_shape is not None and len(dataset) > 0:  # type: ignore[arg-type]
        first = collate([dataset[0]]).x.shape[1:]
        if tuple(first) != pipeline.data_shape:
            raise ValueError(
                f"train_pipeline: the dataset's samples have shape {tuple(first)} but the "
                f"pipeline's data_shape is {pipeline.data_shape}"
            )


def _conditioning(
    pipeline: "Pipeline", mode: ConditionMode, null_label: int | None, config: TrainConfig
) -> tuple[ConditionFn | None, Conditioning | None]:
    """The condition of each batch under ``mode``, and the null condition of dropout."""
    if mode == "text":
        text = pipeline.text
        if text is None:
            raise ValueError("train_pipeline: condition='text' needs a text conditioner")

        def text_condition(batch: Batch) -> Conditioning:
            if batch.captions is None:
                raise ValueError("train_pipeline: condition='text' needs captions in the data")
            with torch.no_grad():
                return text.condition(batch.captions)

        with torch.no_grad():
            return text_condition, text.condition([""])
    if mode == "labels":
        if config.loss.cond_dropout > 0 and null_label is None:
            raise ValueError("train_pipeline: label dropout (cond_dropout > 0) needs null_label")

        def label_condition(batch: Batch) -> Conditioning:
            if batch.labels is None:
                raise ValueError("train_pipeline: condition='labels' needs labels in the data")
            return Conditioning(labels=batch.labels)

        null = Conditioning(labels=torch.tensor([null_label])) if null_label is not None else None
        return label_condition, null
    return None, None


def _sampler(
    pipeline: "Pipeline",
    dataset: Dataset[Any],
    mode: ConditionMode,
    sample_prompts: Sequence[str] | None,
    steps: int,
    device: torch.device,
) -> SampleFn:
    """The sample grid's function: ``sample_prompts`` (or the first captions), 8 labels, or
    8 unconditional samples."""
    prompts: list[str] | None = None
    if mode == "text":
        prompts = list(sample_prompts or [])
        if not prompts:  # the captions of the first items
            first = collate([dataset[i] for i in range(min(8, len(dataset)))])  # type: ignore[arg-type]
            prompts = first.captions or [""]
    labels = torch.arange(8) % 10 if mode == "labels" else None
    prediction = pipeline.denoiser.prediction

    def sample(model: nn.Module, generator: torch.Generator) -> Tensor:
        return pipeline.generate(
            prompts,
            cond=Conditioning(labels=labels.to(device)) if labels is not None else None,
            num_samples=8 if prompts is None and labels is None else None,
            steps=steps,
            guidance=1.0,
            generator=generator,
            denoiser=DenoiserView(model, prediction),
        )

    return sample
