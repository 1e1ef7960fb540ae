"""The text -> video recipe on moving digits.

1. moving-digit clips (an 8x8 digit sliding over a 16x16 canvas for 8 frames) captioned
   with the digit and its direction; only clips that move the captioned way in every frame
   are kept (a digit that bounces off a border moves against its caption after the bounce;
   ``bounces=True`` keeps those, benchmarks/RESULTS.md measures what that costs),
2. CLIP with a frame-stacked image tower (the frames as channels; a small ResNet, whose
   convolutions find the digit wherever it has moved),
3. the same KL autoencoder as the image recipe, trained on single frames; it codes every
   clip frame by frame into a latent video ``(8, 2, 8, 8)``,
4. a space-time U-Net over the latent clips (the image demo's U-Net with temporal
   attention; frames in pairs, ``temporal.frame_patch=2``), cross-attending to the CLIP
   text tokens; ``joint_images`` adds VDM's image stacks, and a ``video_dit`` denoiser
   (a transformer over latent tubelets) is the other choice
   (benchmarks/RESULTS.md compares them),
5. one GIF per prompt and a frame grid, scored by an independent check (per-frame digit
   classifier + centre-of-mass motion, [`VideoJudge`][diffkit_demo.judges.VideoJudge]) for
   digit and direction.
6. longer clips than trained: one clip per direction (the first prompted digit) of twice
   the trained frames, made by [`Pipeline.extend`][diffkit.pipeline.Pipeline.extend] in
   windows of the trained length overlapping by half, as GIFs under ``long/``. Each new
   window is conditioned on the frames already made by VDM's replacement *with
   reconstruction guidance* (``reconstruction=4``): replacement alone leaves a visible
   seam (with an exact model of a Gaussian video, a mean squared frame difference of 0.75
   at the seam against 0.20 inside; 0.19 with the guidance, ``tests/test_extend.py``).
   ``summary.json`` records the seam: ``long_seam_difference`` (the largest mean absolute
   frame-to-frame difference where a new window starts), ``long_inside_difference`` (the
   mean of the others), their ratio ``long_seam_ratio`` (about 1: no visible seam; two
   independent windows side by side give about 2, ``tests/test_extend_trained.py``), and
   ``long_new_frames_digit_accuracy`` (the judge's digit on the new frames). On the
   default data these clips go where no training clip went: an 8-frame clip already
   crosses the canvas, so the digit reaches the border in the first window and, never
   having seen a bounce, the model loses its shape there (seam ratio 1.3-1.4, the digit
   read in about half the new frames); with ``bounces=True`` the model has seen clips
   continue off the border and the 16-frame clips have no seam (ratio about 1.0, the
   digit in all new frames; benchmarks/RESULTS.md).
"""

import os
from itertools import pairwise
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from diffkit.builder import PipelineConfig
from diffkit.nn.unet import UNetConfig
from diffkit.nn.vae import KLAutoencoder, KLAutoencoderConfig
from diffkit.pipeline import Pipeline
from diffkit.samplers import seam_differences
from diffkit_demo.datasets import DIGIT_NAMES, DIRECTIONS, MovingDigitsDataset
from diffkit_demo.judges import VideoJudge
from diffkit_demo.output import save_gif, to_unit, video_grid
from diffkit_demo.recipes import stages
from diffkit_demo.recipes.config import VideoDemoConfig
from diffkit_demo.recipes.stages import DemoResult, Run

__all__ = ["run_video_demo"]


def run_video_demo(
    config: VideoDemoConfig,
    out: str | os.PathLike[str],
    *,
    progress: bool = True,
    console: Any = None,
) -> DemoResult:
    """Train CLIP, the frame autoencoder and the latent video denoiser; sample GIFs, judge."""
    run = stages.start_run(config, "video", out, progress, console)
    with run.report.stage("data", "moving-digit clips with captions and the independent check"):
        x, labels, captions, _ = _video_data(config, "train", config.num_videos)
        test = _video_data(config, "test", TEST_CLIPS)
        judge = _judge(run, config, test)
        run.result.metrics["train_clips"] = len(labels)

    with run.report.stage("clip", "contrastive text + frame-stacked image towers"):
        clip, clip_losses = stages.train_clip(config, x[:, :, 0], captions, run.report)
        run.result.losses["clip"] = stages.tail_mean(clip_losses)

    pipeline_config, ae, data = config.pipeline, None, x
    if isinstance(config.pipeline.encoder, KLAutoencoderConfig):
        with run.report.stage("autoencoder", "KL autoencoder on single frames (latent video)"):
            ae, pipeline_config, data = _video_autoencoder(run, x, test, judge)

    text = stages.text_conditioner(config, clip)
    data, labels, captions, temporal = _with_image_stacks(config, data, labels, captions)
    denoiser = stages.denoiser_stage(
        run,
        pipeline_config,
        data,
        labels,
        captions,
        text,
        _describe(config, ae is None),
        temporal,
    )
    with run.report.stage("sample", "one GIF per prompt, a frame grid and longer clips"):
        pipeline = stages.save_pipeline(
            run, pipeline_config, denoiser=denoiser, encoder=ae, text=text
        )
        _sample(run, config, pipeline, judge)
        _long_clips(run, config, pipeline, judge)
    files = {
        "frames_png": run.folder / "frames.png",
        "gifs": run.folder / "gifs",
        "samples_npz": run.folder / "samples.npz",
        "long_gifs": run.folder / "long",
    }
    return stages.finish_run(run, files)


TEST_CLIPS = 800
"""Held-out clips generated for the check on real clips (about 180 move without bouncing)."""

_Clips = tuple[Tensor, Tensor, list[str], list[str]]
"""Clips, their digit labels, captions and directions."""


def _judge(run: Run, config: VideoDemoConfig, test: _Clips) -> VideoJudge:
    """The independent check, and its score on the real held-out clips."""
    tx, tlabels, _, tdirections = test
    judge = VideoJudge(
        config.digit_size,
        config.pipeline.data_shape[2],
        seed=config.seed,
        test_fraction=config.test_fraction,
    )
    run.result.metrics["judge_test_accuracy"] = judge.test_accuracy
    real = judge.score(tx, tlabels.tolist(), tdirections)
    run.result.metrics["check_on_real_clips"] = real["accuracy"]
    return judge


def _consistent_clips(dataset: MovingDigitsDataset, bounces: bool) -> list[int]:
    """Clips whose every step goes the captioned way (a digit that bounces off a border
    moves against its caption after the bounce); with ``bounces``, clips whose first step
    does (a clip starting against a border bounces at once)."""
    keep = []
    for i in range(len(dataset)):
        want = DIRECTIONS[dataset.directions[int(dataset.direction[i])]]
        path = dataset.trajectory(i)
        steps = [
            (int(np.sign(r1 - r0)), int(np.sign(c1 - c0))) for (r0, c0), (r1, c1) in pairwise(path)
        ]
        if all(step == want for step in steps[: 1 if bounces else None]):
            keep.append(i)
    return keep


def _video_data(config: VideoDemoConfig, split: Literal["train", "test"], num: int) -> _Clips:
    frames, _, size, _ = config.pipeline.data_shape
    dataset = MovingDigitsDataset(
        num,
        frames=frames,
        size=size,
        digit_size=config.digit_size,
        max_speed=config.max_speed,
        seed=config.seed,  # the same seed: train and test clips use disjoint digits
        split=split,
        test_fraction=config.test_fraction,
        directions=config.directions,
    )
    keep = _consistent_clips(dataset, config.bounces)
    if not keep:
        raise ValueError(
            f"none of the {num} {split} clips moves its captioned way; raise num_videos"
        )
    items = [dataset[i] for i in keep]
    x = torch.stack([item["x"] for item in items])
    labels = torch.tensor([item["label"] for item in items], dtype=torch.long)
    return x, labels, [item["caption"] for item in items], [item["direction"] for item in items]


def _describe(config: VideoDemoConfig, pixels: bool) -> str:
    """The denoiser stage's line: which network, over what, trained how."""
    space = "pixel" if pixels else "latent"
    if not isinstance(config.pipeline.denoiser, UNetConfig):
        return f"text-conditioned video transformer over {space} tubelets"
    joint = f", {100 * config.joint_images:.0f} % image stacks" if config.joint_images else ""
    return f"text-conditioned space-time U-Net over {space} clips{joint}"


def _with_image_stacks(
    config: VideoDemoConfig, x: Tensor, labels: Tensor, captions: list[str]
) -> tuple[Tensor, Tensor, list[str], Tensor | None]:
    """The clips, plus ``joint_images`` of stacks of independent frames (VDM's joint
    training): each stack's frames come from random clips with one caption, which the
    stack takes; ``temporal`` (per item) is false for the stacks. Unchanged without."""
    if not config.joint_images:
        return x, labels, captions, None
    count = round(config.joint_images * len(x) / (1 - config.joint_images))
    gen = torch.Generator().manual_seed(config.seed + 41)
    groups: dict[str, list[int]] = {}
    for i, caption in enumerate(captions):
        groups.setdefault(caption, []).append(i)
    frames = x.shape[1]
    picks = torch.randint(len(x), (count,), generator=gen).tolist()
    stacks = []
    for pick in picks:
        group = torch.tensor(groups[captions[pick]])
        clips = group[torch.randint(len(group), (frames,), generator=gen)]
        stacks.append(x[clips, torch.randint(frames, (frames,), generator=gen)])
    temporal = torch.cat(
        [torch.ones(len(x), dtype=torch.bool), torch.zeros(count, dtype=torch.bool)]
    )
    return (
        torch.cat([x, torch.stack(stacks)]),
        torch.cat([labels, labels[picks]]),
        captions + [captions[p] for p in picks],
        temporal,
    )


def _video_prompts(config: VideoDemoConfig) -> tuple[list[str], list[int], list[str]]:
    prompts, digits, directions = [], [], []
    for digit in config.prompt_digits:
        for direction in config.directions:
            prompts.append(
                config.prompt_template.format(
                    digit=digit, name=DIGIT_NAMES[digit], direction=direction
                )
            )
            digits.append(digit)
            directions.append(direction)
    return prompts, digits, directions


def _video_autoencoder(
    run: Run, x: Tensor, test: _Clips, judge: VideoJudge
) -> tuple[KLAutoencoder, PipelineConfig, Tensor]:
    """Train the autoencoder on the clips' frames; return it, the pipeline config with its
    latent scale, and the training clips as latent videos."""
    tx, tlabels, _, tdirections = test
    result = run.result
    ae = stages.fit_autoencoder(run, x.flatten(0, 1))  # frames: (clips * frames, 1, h, w)
    with torch.no_grad():
        raw = torch.cat([ae.posterior(chunk).mean for chunk in x.split(256)])
        encoder_config = stages.rescale_latents(ae, raw)
        latents = (raw - ae.shift_factor) * ae.scaling_factor  # = ae.encode(x), encoded once
        recon = ae.decode(ae.encode(tx))
    result.metrics["autoencoder_test_mse"] = float(F.mse_loss(recon, tx))
    coded = judge.score(recon, tlabels.tolist(), tdirections)
    result.metrics["check_on_autoencoded_clips"] = coded["accuracy"]
    run.report.note(
        f"final loss {result.losses['autoencoder']:.4f}, held-out reconstruction MSE "
        f"{result.metrics['autoencoder_test_mse']:.4f}, check on coded real clips "
        f"{100 * coded['accuracy']:.1f} %, latent clips {tuple(latents.shape[1:])}"
    )
    return ae, stages.with_encoder(run.config, encoder_config), latents


def _sample(run: Run, config: VideoDemoConfig, pipeline: Pipeline, judge: VideoJudge) -> None:
    """Draw ``samples_per_prompt`` clips per prompt, check them, write GIFs, grid and npz."""
    prompts, digits, directions = _video_prompts(config)
    k = config.samples_per_prompt
    repeated = [p for p in prompts for _ in range(k)]
    digits_k = [d for d in digits for _ in range(k)]
    directions_k = [d for d in directions for _ in range(k)]
    videos = stages.generate_samples(pipeline, repeated, config.seed)
    run.result.metrics.update(judge.score(videos, digits_k, directions_k))
    gif_dir = run.folder / "gifs"
    gif_dir.mkdir(exist_ok=True)
    for i, prompt in enumerate(prompts):
        save_gif(videos[i * k : (i + 1) * k], gif_dir / f"{i:02d}_{_slug(prompt)}.gif")
    video_grid(videos.float().clamp(-1, 1)).save(run.folder / "frames.png")
    np.savez(
        run.folder / "samples.npz",
        videos=to_unit(videos)[:, :, 0].numpy().astype(np.float32),
        labels=np.asarray(digits_k, dtype=np.int64),
        directions=np.asarray(directions_k),
        prompts=np.asarray(repeated),
    )


def _long_clips(run: Run, config: VideoDemoConfig, pipeline: Pipeline, judge: VideoJudge) -> None:
    """One clip per direction (the first prompted digit), twice the trained length, made by
    ``pipeline.extend``; GIFs under ``long/``, its seams and its new frames' digit measured."""
    window = pipeline.latent_shape()[0]  # latent frames = frames (frame-wise autoencoder)
    overlap = window // 2
    prompts, digits, _ = _video_prompts(config)
    count = len(config.directions)  # the prompts run digit-major: the first digit's
    generator = torch.Generator().manual_seed(config.seed + 41)
    videos = pipeline.extend(
        prompts[:count], frames=2 * window, overlap=overlap, generator=generator
    )
    inside, seams = seam_differences(videos.float(), window=window, overlap=overlap)
    new = judge.score(videos[:, window:], digits[:count], list(config.directions))
    run.result.metrics.update(
        long_inside_difference=inside,
        long_seam_difference=max(seams.values()),
        long_seam_ratio=max(seams.values()) / inside,
        long_new_frames_digit_accuracy=new["digit_accuracy"],
    )
    folder = run.folder / "long"
    folder.mkdir(exist_ok=True)
    for prompt, video in zip(prompts[:count], videos, strict=True):
        save_gif(video[None], folder / f"{_slug(prompt)}.gif")
    run.report.note(
        f"{2 * window}-frame clips: seam difference {max(seams.values()):.4f}, inside "
        f"{inside:.4f}; digit kept in the new frames {100 * new['digit_accuracy']:.0f} %"
    )


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text).strip("_")[:60]
