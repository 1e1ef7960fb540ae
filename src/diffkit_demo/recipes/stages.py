"""The stages both demo recipes share: training CLIP, the autoencoder and the denoiser,
assembling and saving the pipeline, timing and reporting each stage.

A recipe ([`run_image_demo`][diffkit_demo.recipes.image.run_image_demo],
[`run_video_demo`][diffkit_demo.recipes.video.run_video_demo]) is
[`start_run`][diffkit_demo.recipes.stages.start_run], its own data and judge, the stages
here, its own sampling and [`finish_run`][diffkit_demo.recipes.stages.finish_run].
"""

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffkit.builder import PipelineConfig, build
from diffkit.nn.clip import CLIP
from diffkit.nn.vae import KLAutoencoder, KLAutoencoderConfig
from diffkit.pipeline import Pipeline
from diffkit.protocols import Conditioning
from diffkit.text import CLIPTextConditioner, CLIPTextConditionerConfig
from diffkit.training import AutoencoderLoss, CLIPLoss, train
from diffkit_demo.recipes.config import PIPELINE_DIR, DemoConfig

__all__ = ["DemoResult", "generate_samples", "training_device"]


@dataclasses.dataclass
class DemoResult:
    """What a demo run measured and wrote."""

    task: str
    out: Path
    times: dict[str, float] = dataclasses.field(default_factory=dict)
    """Wall-clock seconds per stage."""
    cpu_times: dict[str, float] = dataclasses.field(default_factory=dict)
    """CPU seconds per stage (all threads of this process; on a busy machine this is what
    the stage would take alone on one core)."""
    losses: dict[str, float] = dataclasses.field(default_factory=dict)
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    files: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (written as ``summary.json``)."""
        return {
            "task": self.task,
            "out": str(self.out),
            "times_s": self.times,
            "total_s": sum(self.times.values()),
            "cpu_s": self.cpu_times,
            "total_cpu_s": sum(self.cpu_times.values()),
            "final_losses": self.losses,
            "metrics": self.metrics,
            "files": self.files,
        }


class Reporter:
    """Stage headers, per-stage timing; whether the stages show progress bars."""

    def __init__(self, result: DemoResult, progress: bool, console: Any) -> None:
        self.result, self.progress, self.console = result, progress, console

    @contextlib.contextmanager
    def stage(self, name: str, description: str) -> Iterator[None]:
        if self.console is not None:
            self.console.print(f"[bold cyan]▶ {name}[/]: {description}")
        start, cpu_start = time.perf_counter(), time.process_time()
        yield
        elapsed = time.perf_counter() - start
        self.result.times[name] = elapsed
        self.result.cpu_times[name] = time.process_time() - cpu_start
        if self.console is not None:
            self.console.print(
                f"  [green]✓[/] {name} done in {elapsed:.1f} s "
                f"(CPU {self.result.cpu_times[name]:.1f} s)"
            )

    def note(self, text: str) -> None:
        """A line under the current stage (a loss, an accuracy)."""
        if self.console is not None:
            self.console.print(f"    {text}")


def tail_mean(losses: Sequence[float], k: int = 20) -> float:
    tail = list(losses[-k:])
    return float(sum(tail) / max(len(tail), 1))


def train_clip(
    config: DemoConfig,
    images: Tensor,
    captions: Sequence[str],
    reporter: Reporter,
) -> tuple[CLIP, list[float]]:
    clip = CLIP(config.clip_config())
    pairs = _Items(images, captions=captions)
    stage = config.clip_train.train_config(config.seed + 11, len(pairs), reporter.progress)
    result = train(clip, CLIPLoss(byte_tokenizer(config)), pairs, stage)
    clip.clamp_logit_scale_()  # (training forwards clamp before use; this, after the last step)
    return clip.eval(), result.losses


def byte_tokenizer(config: DemoConfig) -> Any:
    from diffkit.tokenizers import ByteTokenizer

    text = config.pipeline.text
    assert isinstance(text, CLIPTextConditionerConfig)
    return ByteTokenizer(text.text.context_length)


def text_conditioner(config: DemoConfig, clip: CLIP) -> CLIPTextConditioner:
    text_config = config.pipeline.text
    assert isinstance(text_config, CLIPTextConditionerConfig)
    conditioner = CLIPTextConditioner.from_config(text_config)
    conditioner.tower.load_state_dict(clip.text.state_dict())
    return conditioner.eval().requires_grad_(False)


class _CaptionCache:
    """Caption -> its (frozen) text conditioning, computed once per distinct caption."""

    def __init__(self, text: CLIPTextConditioner, captions: Sequence[str]) -> None:
        unique = sorted(set(captions))
        with torch.no_grad():
            cond = text.condition(unique)
        self.index = {c: i for i, c in enumerate(unique)}
        self.cond = cond
        with torch.no_grad():
            self.null = text.condition([""])

    def __call__(self, captions: Sequence[str]) -> Conditioning:
        rows = torch.tensor([self.index[c] for c in captions], dtype=torch.long)
        return self.cond.map(lambda t: t[rows])


class _Items(torch.utils.data.Dataset[dict[str, Any]]):
    """Training items ``{"x", "label"?, "caption"?, "temporal"?}`` from tensors already in
    memory (``temporal``: false for a stack of independent images in a video batch)."""

    def __init__(
        self,
        x: Tensor,
        labels: Tensor | None = None,
        captions: Sequence[str] | None = None,
        temporal: Tensor | None = None,
    ) -> None:
        self.x, self.labels, self.temporal = x, labels, temporal
        self.captions = list(captions) if captions is not None else None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {"x": self.x[index]}
        if self.labels is not None:
            item["label"] = int(self.labels[index])
        if self.captions is not None:
            item["caption"] = self.captions[index]
        if self.temporal is not None:
            item["temporal"] = bool(self.temporal[index])
        return item


def train_denoiser(
    config: DemoConfig,
    pipeline_config: PipelineConfig,
    x: Tensor,
    labels: Tensor,
    captions: Sequence[str],
    text: CLIPTextConditioner,
    reporter: Reporter,
    temporal: Tensor | None = None,
) -> tuple[nn.Module, list[float]]:
    """Train the recipe's denoiser on ``x`` with the frozen text conditioning of each
    caption; ``temporal`` (per item) marks the clips of a joint image-video batch."""
    from diffkit.builder import registry

    torch.manual_seed(config.seed + 31)
    denoiser: nn.Module = registry("denoiser").build(pipeline_config.denoiser)
    cache = _CaptionCache(text, captions)
    schedule = registry("schedule").build(pipeline_config.schedule)
    # the recipe's train config as it stands (validation made its seed the demo's and
    # left it nothing to write); only the run's progress switch can turn the bar off
    train_config = config.train.model_copy(
        update={"progress": reporter.progress and config.train.progress}
    )
    result = train(
        denoiser,
        schedule,
        _Items(x, labels, captions, temporal),
        train_config,
        condition=lambda batch: cache(batch.captions or []),
        uncond=cache.null,
    )
    if result.ema is not None:
        result.ema.copy_to(denoiser)
    return denoiser.cpu().eval(), result.losses


def training_device(config: DemoConfig) -> torch.device:
    """Where the denoiser trains (``train.device``), checked before any stage runs."""
    name = config.train.device
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device is {name!r}, but CUDA is not available here")
    if config.train.precision == "fp16" and device.type != "cuda":
        raise ValueError(
            f"train.precision 'fp16' needs a CUDA device, but the denoiser trains on "
            f"{device}; use 'bf16' or 'fp32'"
        )
    return device


def set_threads(threads: int | None) -> int:
    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def generate_samples(
    pipeline: Pipeline, prompts: Sequence[str], seed: int, batch: int = 50
) -> Tensor:
    """Sample ``len(prompts)`` items with the pipeline's default steps, guidance and sampler,
    in chunks of ``batch``; one generator, so the result depends on the seed only."""
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    for start in range(0, len(prompts), batch):
        chunk = list(prompts[start : start + batch])
        chunks.append(pipeline.generate(chunk, generator=generator))
    return torch.cat(chunks)


def rescale_latents(ae: KLAutoencoder, raw: Tensor) -> KLAutoencoderConfig:
    """Set ``ae``'s shift and scale so the posterior means ``raw`` have zero mean, unit std.

    Returns (and installs on ``ae``) its config with the two factors, as saved with the
    pipeline.
    """
    scale = 1.0 / float(raw.std().clamp_min(1e-3))
    shift = float(raw.mean())
    config = ae.config.model_copy(update={"scaling_factor": scale, "shift_factor": shift})
    ae.scaling_factor, ae.shift_factor, ae.config = scale, shift, config
    return config


def train_autoencoder(
    config: DemoConfig,
    ae: KLAutoencoder,
    images: Tensor,
    reporter: Reporter,
) -> list[float]:
    items = _Items(images)
    stage = config.autoencoder_train.train_config(config.seed + 21, len(items), reporter.progress)
    result = train(ae, AutoencoderLoss(kl_weight=config.kl_weight), items, stage)
    ae.eval()
    return result.losses


def assemble(
    config: PipelineConfig,
    *,
    denoiser: nn.Module,
    encoder: nn.Module | None,
    text: nn.Module,
) -> Pipeline:
    """``build(config)``, then the trained weights of every part."""
    pipeline = build(config)
    assert isinstance(pipeline.denoiser, nn.Module)
    pipeline.denoiser.load_state_dict(denoiser.state_dict())
    if encoder is not None:
        assert isinstance(pipeline.encoder, nn.Module)
        pipeline.encoder.load_state_dict(encoder.state_dict())
    assert isinstance(pipeline.text, nn.Module)
    pipeline.text.load_state_dict(text.state_dict())
    return pipeline.eval()


def write_summary(result: DemoResult, config: DemoConfig) -> None:
    data = result.to_dict()
    data["config"] = config.to_dict()
    (result.out / "summary.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


@dataclasses.dataclass
class Run:
    """A recipe run under way: its output folder, its result so far, its reporter, and the
    device the denoiser trains on."""

    config: DemoConfig
    folder: Path
    result: DemoResult
    report: Reporter
    device: torch.device


def start_run(
    config: DemoConfig, task: str, out: str | os.PathLike[str], progress: bool, console: Any
) -> Run:
    """Check the device, make the output folder, set the threads and the global seed."""
    device = training_device(config)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    result = DemoResult(task=task, out=folder)
    report = Reporter(result, progress, console)
    result.metrics["threads"] = set_threads(config.threads)
    torch.manual_seed(config.seed)
    return Run(config, folder, result, report, device)


def fit_autoencoder(run: Run, images: Tensor) -> KLAutoencoder:
    """Train the recipe's KL autoencoder on ``images`` (single images or frames)."""
    encoder_config = run.config.pipeline.encoder
    assert isinstance(encoder_config, KLAutoencoderConfig)
    torch.manual_seed(run.config.seed + 21)
    ae = KLAutoencoder(encoder_config)
    losses = train_autoencoder(run.config, ae, images, run.report)
    run.result.losses["autoencoder"] = tail_mean(losses)
    return ae


def with_encoder(config: DemoConfig, encoder: KLAutoencoderConfig) -> PipelineConfig:
    """The recipe's pipeline config with the trained autoencoder's (rescaled) config."""
    return PipelineConfig.model_validate(
        {**config.pipeline.to_dict(), "encoder": encoder.to_dict()}
    )


def denoiser_stage(
    run: Run,
    pipeline_config: PipelineConfig,
    data: Tensor,
    labels: Tensor,
    captions: Sequence[str],
    text: CLIPTextConditioner,
    description: str,
    temporal: Tensor | None = None,
) -> nn.Module:
    """The "denoiser" stage: train it on ``data`` (pixels or latents), conditioned on text;
    ``temporal`` as in ``train_denoiser``."""
    with run.report.stage("denoiser", description):
        if run.device.type != "cpu":
            run.report.note(f"training on {run.device}")
        denoiser, losses = train_denoiser(
            run.config, pipeline_config, data, labels, captions, text, run.report, temporal
        )
        run.result.losses["denoiser"] = tail_mean(losses)
    return denoiser


def save_pipeline(
    run: Run,
    pipeline_config: PipelineConfig,
    *,
    denoiser: nn.Module,
    encoder: nn.Module | None,
    text: nn.Module,
) -> Pipeline:
    """Assemble the trained parts and save the pipeline under ``PIPELINE_DIR``."""
    pipeline = assemble(pipeline_config, denoiser=denoiser, encoder=encoder, text=text)
    pipeline.save(run.folder / PIPELINE_DIR)
    return pipeline


def finish_run(run: Run, files: Mapping[str, Path]) -> DemoResult:
    """Record the files written (the pipeline's folder added) and write ``summary.json``."""
    run.result.files = {name: str(path) for name, path in files.items()}
    run.result.files["pipeline"] = str(run.folder / PIPELINE_DIR)
    write_summary(run.result, run.config)
    return run.result
