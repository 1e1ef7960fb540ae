"""The text -> image recipe on 16x16 digits.

1. captioned digits (8x8 upscaled to 16x16, several caption templates per digit),
2. a small CLIP (text tower + ViT image tower) trained contrastively on them,
3. a KL autoencoder (16x16x1 -> 8x8 latents) trained on the images,
4. a U-Net that denoises those latents, cross-attending to the CLIP text tokens (and
   taking the pooled CLIP text embedding), trained with condition dropout so that
   classifier-free guidance works,
5. a grid sampled for one prompt per digit, judged by a classifier trained independently
   on the real digits ([`DigitJudge`][diffkit_demo.judges.DigitJudge]),
6. ``samples.png``, ``samples.npz`` and the saved [`Pipeline`][diffkit.pipeline.Pipeline].
"""

import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffkit.nn.clip import CLIP, ZeroShotClassifier
from diffkit.nn.vae import KLAutoencoder
from diffkit.pipeline import Pipeline
from diffkit_demo.datasets import DIGIT_NAMES, IMAGE_TEMPLATES, DigitsDataset
from diffkit_demo.judges import DigitJudge
from diffkit_demo.output import image_grid, to_unit
from diffkit_demo.recipes import stages
from diffkit_demo.recipes.config import ImageDemoConfig
from diffkit_demo.recipes.stages import DemoResult, Run

__all__ = ["run_image_demo"]


def run_image_demo(
    config: ImageDemoConfig,
    out: str | os.PathLike[str],
    *,
    progress: bool = True,
    console: Any = None,
) -> DemoResult:
    """Train CLIP, the autoencoder and the latent denoiser; sample, judge and save to ``out``."""
    run = stages.start_run(config, "image", out, progress, console)
    train_set, test_set, judge = _data_stage(run, config)
    clip = _clip_stage(run, config, train_set, test_set)
    ae, latents = _autoencoder_stage(run, train_set, test_set)
    pipeline_config = stages.with_encoder(config, ae.config)
    text = stages.text_conditioner(config, clip)
    denoiser = stages.denoiser_stage(
        run,
        pipeline_config,
        latents,
        train_set.labels,
        train_set.captions,
        text,
        "text-conditioned latent U-Net (CFG dropout, EMA)",
    )
    with run.report.stage("sample", "grid for one prompt per digit, judged, saved"):
        pipeline = stages.save_pipeline(
            run, pipeline_config, denoiser=denoiser, encoder=ae, text=text
        )
        _sample(run, config, pipeline, judge)
    return stages.finish_run(
        run, {"samples_png": run.folder / "samples.png", "samples_npz": run.folder / "samples.npz"}
    )


def _data_stage(
    run: Run, config: ImageDemoConfig
) -> tuple[DigitsDataset, DigitsDataset, DigitJudge]:
    size = config.pipeline.data_shape[1]
    with run.report.stage("data", f"captioned digits {size}x{size} and the independent judge"):
        train_set, test_set = (
            DigitsDataset(size, seed=config.seed, split=split, test_fraction=config.test_fraction)
            for split in ("train", "test")
        )
        judge = DigitJudge(size, seed=config.seed, test_fraction=config.test_fraction)
        run.result.metrics["judge_test_accuracy"] = judge.test_accuracy
        run.result.metrics["train_images"] = len(train_set)
    return train_set, test_set, judge


def _clip_stage(
    run: Run, config: ImageDemoConfig, train_set: DigitsDataset, test_set: DigitsDataset
) -> CLIP:
    result = run.result
    with run.report.stage("clip", "contrastive text + image towers"):
        clip, clip_losses = stages.train_clip(
            config, train_set.images, train_set.captions, run.report
        )
        result.losses["clip"] = stages.tail_mean(clip_losses)
        result.metrics["clip_zero_shot_accuracy"] = _zero_shot(config, clip, test_set)
        run.report.note(
            f"final loss {result.losses['clip']:.4f}, zero-shot accuracy on held-out digits "
            f"{100 * result.metrics['clip_zero_shot_accuracy']:.1f} %"
        )
    return clip


def _autoencoder_stage(
    run: Run, train_set: DigitsDataset, test_set: DigitsDataset
) -> tuple[KLAutoencoder, torch.Tensor]:
    """Train the autoencoder, set its latent scale; it and the training images' latents."""
    result = run.result
    with run.report.stage("autoencoder", "KL autoencoder into the latent space"):
        ae = stages.fit_autoencoder(run, train_set.images)
        with torch.no_grad():
            recon = ae.decode(ae.encode(test_set.images))
            stages.rescale_latents(ae, ae.posterior(train_set.images).mean)
        result.metrics["autoencoder_test_mse"] = float(F.mse_loss(recon, test_set.images))
        with torch.no_grad():
            latents = ae.encode(train_set.images)
        result.metrics["latent_std"] = float(latents.std())
        run.report.note(
            f"final loss {result.losses['autoencoder']:.4f}, held-out reconstruction MSE "
            f"{result.metrics['autoencoder_test_mse']:.4f}, latents {tuple(latents.shape[1:])}"
        )
    return ae, latents


def _image_prompts(config: ImageDemoConfig) -> tuple[list[str], list[int]]:
    prompts, labels = [], []
    for digit in range(10):
        prompt = config.prompt_template.format(digit=digit, name=DIGIT_NAMES[digit])
        prompts += [prompt] * config.samples_per_prompt
        labels += [digit] * config.samples_per_prompt
    return prompts, labels


def _sample(run: Run, config: ImageDemoConfig, pipeline: Pipeline, judge: DigitJudge) -> None:
    """Draw the grid, judge it, write ``samples.npz`` and ``samples.png``."""
    prompts, labels = _image_prompts(config)
    samples = stages.generate_samples(pipeline, prompts, config.seed)
    predicted = judge.predict(samples)
    run.result.metrics["prompt_accuracy"] = float((predicted == np.asarray(labels)).mean())
    run.report.note(
        f"prompt accuracy (independent judge) {100 * run.result.metrics['prompt_accuracy']:.1f} %"
    )
    np.savez(
        run.folder / "samples.npz",
        images=to_unit(samples)[:, 0].numpy().astype(np.float32),
        labels=np.asarray(labels, dtype=np.int64),
        predicted=predicted,
        prompts=np.asarray(prompts),
    )
    grid = image_grid(samples.float().clamp(-1, 1), nrow=config.samples_per_prompt)
    grid.save(run.folder / "samples.png")


def _zero_shot(config: ImageDemoConfig, clip: CLIP, test_set: DigitsDataset) -> float:
    tokenizer = stages.byte_tokenizer(config)
    templates = [
        (lambda c, t=t: t.format(digit=c, name=DIGIT_NAMES[int(c)])) for t in IMAGE_TEMPLATES
    ]
    classifier = ZeroShotClassifier.from_prompts(
        clip, tokenizer, [str(d) for d in range(10)], templates
    )
    with torch.no_grad():
        predicted = classifier.predict(test_set.images)
    return float((predicted == test_set.labels).float().mean())
