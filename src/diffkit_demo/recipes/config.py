"""The offline demos behind ``diffkit demo``: text -> image and text -> video on real digits.

Everything is trained from scratch on scikit-learn's bundled handwritten digits (no
download), on the CPU, in minutes (``train.device`` can move the denoiser's training to a
GPU):

**Image** ([`run_image_demo`][diffkit.demo.run_image_demo]):

1. captioned digits (8x8 upscaled to 16x16, several caption templates per digit),
2. a small CLIP (text tower + ViT image tower) trained contrastively on them,
3. a KL autoencoder (16x16x1 -> 8x8 latents) trained on the images,
4. a U-Net that denoises those latents, cross-attending to the CLIP text tokens (and
   taking the pooled CLIP text embedding), trained with condition dropout so that
   classifier-free guidance works,
5. a grid sampled for one prompt per digit, judged by a classifier trained independently
   on the real digits ([`DigitJudge`][diffkit.demo.DigitJudge]),
6. ``samples.png``, ``samples.npz`` and the saved [`Pipeline`][diffkit.pipeline.Pipeline].

**Video** ([`run_video_demo`][diffkit.demo.run_video_demo]):

1. moving-digit clips (an 8x8 digit sliding over a 16x16 canvas for 8 frames) captioned
   with the digit and its direction,
2. CLIP with a frame-stacked image tower (the frames as channels; a small ResNet, whose
   convolutions find the digit wherever it has moved),
3. the same KL autoencoder as the image demo, trained on single frames; it codes every
   clip frame by frame into a latent video ``(8, 2, 8, 8)``,
4. a video transformer over latent spatio-temporal patches (tubelets), full attention,
   a per-frame depthwise convolution in each MLP, cross-attending to the CLIP text tokens,
5. one GIF per prompt and a frame grid, scored by an independent check (per-frame digit
   classifier + centre-of-mass motion, [`VideoJudge`][diffkit.demo.VideoJudge]) for
   digit and direction.

Each recipe is a config ([`ImageDemoConfig`][diffkit.demo.ImageDemoConfig],
[`VideoDemoConfig`][diffkit.demo.VideoDemoConfig]); ``configs/*.yaml`` hold copies that
``diffkit train`` runs.
"""

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Discriminator, Field, Tag, model_validator
from torch import Tensor, nn

from diffkit.builder import PipelineConfig, build
from diffkit.config import SEED_MAX, Config
from diffkit.data import (
    DIGIT_NAMES,
    DIRECTIONS,
    IMAGE_TEMPLATES,
    DigitsDataset,
    MovingDigitsDataset,
    image_grid,
    video_grid,
)
from diffkit.nn.clip import (
    CLIP,
    CLIPConfig,
    ResNetTowerConfig,
    VisionTowerConfig,
    ZeroShotClassifier,
)
from diffkit.nn.vae import KLAutoencoder, KLAutoencoderConfig
from diffkit.pipeline import Pipeline
from diffkit.protocols import Conditioning
from diffkit.text import CLIPTextConditioner, CLIPTextConditionerConfig
from diffkit.training import TrainConfig, _progress_bar, train

__all__ = [
    "DemoResult",
    "DigitJudge",
    "ImageDemoConfig",
    "StageTrainConfig",
    "VideoDemoConfig",
    "VideoJudge",
    "default_config",
    "fast_config",
    "load_demo_config",
    "parse_demo_config",
    "recipe_yaml",
    "run_demo",
    "run_image_demo",
    "run_video_demo",
    "training_device",
]

PIPELINE_DIR = "pipeline"
"""Sub-folder of a demo's output folder that holds the saved pipeline."""


# --------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------


class StageTrainConfig(Config):
    """Optimisation of one auxiliary stage (CLIP or the autoencoder): AdamW with warm-up."""

    kind: Literal["stage"] = "stage"
    steps: int = Field(default=300, ge=1, description="optimizer steps")
    batch_size: int = Field(default=128, ge=2, description="items per step")
    lr: float = Field(default=2e-3, gt=0, description="peak learning rate (cosine decay to 0)")
    warmup_steps: int = Field(default=20, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW decoupled weight decay")


def _tower_kind(value: Any) -> str:
    """The image tower's ``kind``; a recipe without one (written before ResNets) means a ViT."""
    kind = value.get("kind", "clip_vit") if isinstance(value, dict) else value.kind
    return str(kind)


def _check_template(template: str, keys: tuple[str, ...]) -> None:
    """``prompt_template`` may only use ``keys`` as placeholders (checked before any training)."""
    try:
        template.format_map({key: key for key in keys})
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(
            f"prompt_template {template!r}: {type(err).__name__} {err}; its placeholders are "
            + ", ".join("{" + key + "}" for key in keys)
        ) from None


_ImageTowerConfig = Annotated[
    Annotated[VisionTowerConfig, Tag("clip_vit")]
    | Annotated[ResNetTowerConfig, Tag("clip_resnet")],
    Discriminator(_tower_kind),
]
"""A CLIP image tower config of either kind (``clip_vit`` or ``clip_resnet``)."""


_DEMO_TRAIN: dict[str, Any] = {
    "output_dir": None,
    "checkpoint_every": None,
    "sample_every": None,
    "resume": False,
    "tensorboard": False,
}
"""The train fields a demo recipe cannot change: the demo writes only to its own folder."""

_DEMO_TRAIN_WHY = {
    "output_dir": "the demo writes its results to its own output folder (--out, run_demo's "
    "out) and keeps no training checkpoints or logs",
    "checkpoint_every": "the demo keeps no training checkpoints",
    "sample_every": "the demo samples once, after training, into its output folder",
    "resume": "the demo cannot resume: it keeps no checkpoints and retrains CLIP and the "
    "autoencoder on every run",
    "tensorboard": "the demo writes no training logs (it has no train.output_dir)",
}


class _DemoBase(Config):
    seed: int = Field(
        default=0,
        ge=0,
        le=SEED_MAX,
        description="seeds data, initialisation, training (train.seed is this), noise",
    )
    threads: int | None = Field(
        default=None, ge=1, description="torch CPU threads; None: all cores (os.cpu_count())"
    )
    test_fraction: float = Field(
        default=0.1, gt=0, lt=1, description="share of the digits held out for evaluation"
    )
    clip_vision: _ImageTowerConfig = Field(
        description="CLIP image tower, a ViT (clip_vit) or a small ResNet (clip_resnet); the "
        "text tower is pipeline.text",
    )
    clip_train: StageTrainConfig = Field(
        default_factory=lambda: StageTrainConfig(), description="CLIP training"
    )
    pipeline: PipelineConfig = Field(
        description="the pipeline that is trained and saved; pipeline.text is CLIP's text "
        "tower (with projection_dim = the CLIP embedding size)"
    )
    train: TrainConfig = Field(
        description="denoiser training (diffkit.training.train) on train.device ('cpu' in "
        "the recipes and when left out; null: a GPU if there is one; the other stages run "
        "on the CPU), with its bar when train.progress and the run's progress are both on. "
        "The demo writes only to its own output folder and uses one seed: train.seed must "
        "equal seed (leave it out), output_dir, checkpoint_every and sample_every must be "
        "null, resume and tensorboard false (left out, they are)"
    )
    samples_per_prompt: int = Field(default=10, ge=1, description="samples drawn per prompt")

    @model_validator(mode="before")
    @classmethod
    def _demo_train_defaults(cls, data: Any) -> Any:
        """Fill the train fields the demo owns (``_DEMO_TRAIN``) that a recipe leaves out."""
        if not isinstance(data, dict) or "train" not in data:
            return data
        seed = data.get("seed", 0)
        owned: dict[str, Any] = {**_DEMO_TRAIN, "device": "cpu"}
        if isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= SEED_MAX:
            owned["seed"] = seed  # (an invalid seed is reported by the seed field alone)
        train = data["train"]
        if isinstance(train, dict):
            return {**data, "train": {**owned, **train}}
        if isinstance(train, TrainConfig):
            missing = {k: v for k, v in owned.items() if k not in train.model_fields_set}
            return {**data, "train": train.model_copy(update=missing)}
        return data

    @model_validator(mode="after")
    def _demo_owns_train_outputs(self) -> "_DemoBase":
        train = self.train
        if train.seed != self.seed:
            raise ValueError(
                f"train.seed ({train.seed}) differs from seed ({self.seed}): the demo seeds "
                "every stage, the denoiser's training included, from seed; set seed (or "
                "--seed) and leave train.seed out"
            )
        for name, value in _DEMO_TRAIN.items():
            if getattr(train, name) != value:
                raise ValueError(
                    f"train.{name} is {getattr(train, name)!r}, but {_DEMO_TRAIN_WHY[name]}; "
                    f"set it to {json.dumps(value)} or leave it out"
                )
        if train.device is not None:
            try:
                torch.device(train.device)
            except (RuntimeError, ValueError):
                raise ValueError(
                    f"train.device {train.device!r} is not a torch device ('cpu', 'cuda', "
                    "'cuda:1', ...)"
                ) from None
        return self

    @model_validator(mode="after")
    def _text_is_clip(self) -> "_DemoBase":
        text = self.pipeline.text
        if not isinstance(text, CLIPTextConditionerConfig):
            raise ValueError("pipeline.text must be a 'clip_text' conditioner (trained as CLIP)")
        if text.projection_dim is None:
            raise ValueError("pipeline.text.projection_dim must be set: it is CLIP's embed size")
        if text.tokenizer != "byte":
            raise ValueError("pipeline.text.tokenizer must be 'byte' (the demo is offline)")
        return self

    def clip_config(self) -> CLIPConfig:
        """The CLIP model: the pipeline's text tower and ``clip_vision``."""
        text = self.pipeline.text
        assert isinstance(text, CLIPTextConditionerConfig)
        assert text.projection_dim is not None
        return CLIPConfig(
            embed_dim=text.projection_dim,
            text=text.text,
            vision=self.clip_vision,
            init_logit_scale=math.log(10.0),
        )


class ImageDemoConfig(_DemoBase):
    """The text -> image demo: CLIP, KL autoencoder and latent denoiser on 16x16 digits."""

    kind: Literal["demo_image"] = "demo_image"
    autoencoder_train: StageTrainConfig = Field(
        default_factory=lambda: StageTrainConfig(), description="autoencoder training"
    )
    kl_weight: float = Field(
        default=1e-3, ge=0, description="weight of the KL term per latent element"
    )
    prompt_template: str = Field(
        default="a handwritten digit {name}",
        description="prompt per digit; {name} is 'seven', {digit} is '7'",
    )

    @model_validator(mode="after")
    def _image(self) -> "ImageDemoConfig":
        _check_template(self.prompt_template, ("name", "digit"))
        shape = self.pipeline.data_shape
        if len(shape) != 3 or shape[0] != 1 or shape[1] != shape[2]:
            raise ValueError(f"pipeline.data_shape must be (1, size, size), got {shape}")
        if not isinstance(self.pipeline.encoder, KLAutoencoderConfig):
            raise ValueError("pipeline.encoder must be a 'kl_autoencoder' (trained by the demo)")
        if self.clip_vision.channels != 1 or self.clip_vision.image_size != shape[1]:
            raise ValueError(
                f"clip_vision must take (1, {shape[1]}, {shape[1]}) images, got channels "
                f"{self.clip_vision.channels}, image_size {self.clip_vision.image_size}"
            )
        return self


class VideoDemoConfig(_DemoBase):
    """The text -> video demo: moving digits, a video transformer over latent tubelets.

    With ``pipeline.encoder`` set (a KL autoencoder, the default) the autoencoder is trained
    on single frames and codes every clip frame by frame; the transformer then denoises
    tubelets of the latent video. With ``encoder: null`` it works on pixel tubelets.
    """

    kind: Literal["demo_video"] = "demo_video"
    autoencoder_train: StageTrainConfig = Field(
        default_factory=lambda: StageTrainConfig(),
        description="autoencoder training (on single frames); unused in pixel space",
    )
    kl_weight: float = Field(
        default=1e-3, ge=0, description="weight of the KL term per latent element"
    )
    num_videos: int = Field(default=4096, ge=16, description="training clips generated")
    digit_size: int = Field(default=8, ge=8, description="side of the moving digit in pixels")
    max_speed: int = Field(default=1, ge=1, description="largest speed in pixels per frame")
    directions: tuple[str, ...] = Field(
        default=("left", "right", "up", "down"), min_length=1, description="motions used"
    )
    prompt_template: str = Field(
        default="the digit {digit} moving {direction}",
        description="prompt per (digit, direction); {name}, {digit}, {direction}",
    )
    prompt_digits: tuple[int, ...] = Field(
        default=(0, 1, 2, 3, 4, 5, 6, 7, 8, 9), min_length=1, description="digits prompted"
    )

    @model_validator(mode="after")
    def _video(self) -> "VideoDemoConfig":
        _check_template(self.prompt_template, ("name", "digit", "direction"))
        shape = self.pipeline.data_shape
        if len(shape) != 4 or shape[1] != 1 or shape[2] != shape[3]:
            raise ValueError(f"pipeline.data_shape must be (frames, 1, size, size), got {shape}")
        if self.digit_size > shape[2]:
            raise ValueError(f"digit_size {self.digit_size} exceeds the canvas {shape[2]}")
        unknown = [d for d in self.directions if d not in DIRECTIONS]
        if unknown:
            raise ValueError(f"unknown directions {unknown}; known: {list(DIRECTIONS)}")
        # (the pipeline config already checks encoder.in_channels against data_shape)
        encoder = self.pipeline.encoder
        if encoder is not None and not isinstance(encoder, KLAutoencoderConfig):
            raise ValueError(
                "pipeline.encoder must be a 'kl_autoencoder' (trained by the demo) or null "
                "(pixel space)"
            )
        frames = shape[0]
        if self.clip_vision.channels != frames or self.clip_vision.image_size != shape[2]:
            raise ValueError(
                f"clip_vision sees the {frames} frames stacked as channels: it needs "
                f"channels={frames} and image_size={shape[2]}"
            )
        return self


DemoConfig = ImageDemoConfig | VideoDemoConfig


def default_config(task: Literal["image", "video"] = "image") -> DemoConfig:
    """The built-in recipe of ``diffkit demo --task {image,video}`` (``configs/`` holds copies)."""
    if task not in ("image", "video"):
        raise ValueError(f"task must be 'image' or 'video', got {task!r}")
    return _builtin(task)


def recipe_yaml(config: DemoConfig) -> str:
    """A recipe as YAML (what ``configs/demo_*.yaml`` hold), readable by ``diffkit train``."""
    import yaml

    header = (
        f"# diffkit {config.kind} recipe: run with `diffkit train THIS.yaml --out DIR`.\n"
        "# Every field is documented in diffkit.demo (ImageDemoConfig / VideoDemoConfig);\n"
        "# train.seed is left out: the demo's training takes the seed above.\n"
    )
    data = config.to_dict()
    data["train"].pop("seed")
    ordered = {"kind": data.pop("kind"), **data}
    return header + yaml.safe_dump(ordered, sort_keys=False)


def _text_config(context: int, width: int, layers: int, embed: int) -> dict[str, Any]:
    return {
        "kind": "clip_text",
        "tokenizer": "byte",
        "projection_dim": embed,
        "project_pooled": True,
        "text": {
            "vocab_size": 259,
            "context_length": context,
            "width": width,
            "layers": layers,
            "heads": 4,
        },
    }


def _autoencoder_config() -> dict[str, Any]:
    """The KL autoencoder of both recipes: 16x16x1 images (or frames) -> 8x8x2 latents."""
    return {
        "kind": "kl_autoencoder",
        "in_channels": 1,
        "base_channels": 16,
        "channel_mult": (1, 2),
        "blocks_per_level": 1,
        "latent_channels": 2,
        "norm_groups": 8,
        "mid_attention": False,
        "scaling_factor": 1.0,
    }


def _builtin(task: Literal["image", "video"]) -> DemoConfig:
    """The recipes in Python (the YAML files in ``configs/`` are dumps of these)."""
    if task == "image":
        return ImageDemoConfig.model_validate(
            {
                "clip_vision": {
                    "image_size": 16,
                    "patch_size": 4,
                    "channels": 1,
                    "width": 64,
                    "layers": 2,
                    "heads": 4,
                },
                "clip_train": {"steps": 300, "batch_size": 128, "lr": 2e-3},
                "autoencoder_train": {"steps": 300, "batch_size": 64, "lr": 2e-3},
                "pipeline": {
                    "data_shape": (1, 16, 16),
                    "schedule": {"kind": "cosine"},
                    "encoder": _autoencoder_config(),
                    "denoiser": {
                        "kind": "unet",
                        "in_channels": 2,
                        "base_channels": 32,
                        "channel_mult": (1, 2),
                        "blocks_per_level": 1,
                        "attention_resolutions": (2,),
                        "attention_head_dim": 32,
                        "mid_attention": True,
                        "context_dim": 64,
                        "pooled_dim": 64,
                        "norm_groups": 8,
                        "prediction": "v",
                    },
                    "text": _text_config(40, 64, 2, 64),
                    "sampler": {"kind": "dpmpp", "order": 2},
                    "steps": 20,
                    "guidance": 3.0,
                },
                "train": {
                    "steps": 1000,
                    "batch_size": 64,
                    "lr": 1e-3,
                    "warmup_steps": 50,
                    "lr_schedule": "cosine",
                    "ema_decay": 0.995,
                    "log_every": 50,
                    "device": "cpu",
                    "loss": {"cond_dropout": 0.1},
                },
                "samples_per_prompt": 10,
            }
        )
    return VideoDemoConfig.model_validate(
        {
            # A ResNet, not a ViT: its convolutions follow the moving digit wherever it is
            # (zero-shot digit on held-out clips 57-65 % vs 36 %; benchmarks/RESULTS.md).
            "clip_vision": {
                "kind": "clip_resnet",
                "image_size": 16,
                "channels": 8,
                "widths": (32, 64),
                "blocks": (1, 1),
                "norm_groups": 8,
            },
            "clip_train": {"steps": 400, "batch_size": 128, "lr": 2e-3},
            "autoencoder_train": {"steps": 300, "batch_size": 64, "lr": 2e-3},
            "pipeline": {
                "data_shape": (8, 1, 16, 16),
                "schedule": {"kind": "cosine"},
                "encoder": _autoencoder_config(),
                "denoiser": {
                    "kind": "video_dit",
                    "in_channels": 2,
                    "patch_size": (2, 2, 2),
                    "dim": 96,
                    "depth": 4,
                    "num_heads": 4,
                    "attention": "full",
                    "local_mlp": True,
                    "context_dim": 64,
                    "pooled_dim": 64,
                    "freq_dim": 64,
                    "prediction": "v",
                },
                "text": _text_config(40, 64, 2, 64),
                # Stochastic: the re-drawn noise corrects the model's errors along the way
                # (both right 32.9 -> 44.2 % over 3 seeds vs DPM++(2M) 20 steps, RESULTS).
                "sampler": {"kind": "euler_ancestral"},
                "steps": 100,
                "guidance": 3.0,
            },
            "train": {
                "steps": 3000,
                "batch_size": 32,
                "lr": 3e-3,
                "warmup_steps": 50,
                "lr_schedule": "cosine",
                "ema_decay": 0.995,
                "log_every": 50,
                "device": "cpu",
                "loss": {"cond_dropout": 0.1, "weighting": "min_snr"},
            },
            "samples_per_prompt": 4,
        }
    )


def fast_config(config: DemoConfig) -> DemoConfig:
    """A smoke-test version of a recipe (tens of steps per stage, few samples): ≤ 1 minute."""

    def stage(s: StageTrainConfig) -> StageTrainConfig:
        return s.model_copy(update={"steps": 15, "batch_size": 32, "warmup_steps": 2})

    update: dict[str, Any] = {
        "clip_train": stage(config.clip_train),
        "train": config.train.model_copy(
            update={"steps": 20, "batch_size": 16, "warmup_steps": 2, "log_every": 5}
        ),
        "samples_per_prompt": 1,
        "pipeline": config.pipeline.model_copy(update={"steps": 4}),
        "autoencoder_train": stage(config.autoencoder_train),
    }
    if isinstance(config, VideoDemoConfig):
        update["num_videos"] = 64
        update["prompt_digits"] = config.prompt_digits[:2]
    return type(config).model_validate({**config.to_dict(), **_dump(update)})


def _dump(update: dict[str, Any]) -> dict[str, Any]:
    return {k: v.to_dict() if isinstance(v, Config) else v for k, v in update.items()}


def load_demo_config(path: str | os.PathLike[str]) -> DemoConfig:
    """Read a demo recipe from YAML or JSON; its ``kind`` says image or video."""
    import yaml

    text = Path(path).read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    return parse_demo_config(data)


def parse_demo_config(data: Any) -> DemoConfig:
    """Validate a mapping into the demo config its ``kind`` names."""
    if not isinstance(data, dict):
        raise ValueError("a demo config must be a mapping with a 'kind' field")
    kind = data.get("kind")
    if kind == "demo_image":
        return ImageDemoConfig.model_validate(data)
    if kind == "demo_video":
        return VideoDemoConfig.model_validate(data)
    raise ValueError(f"unknown demo kind {kind!r}; expected 'demo_image' or 'demo_video'")


# --------------------------------------------------------------------------------------
# Independent judges
# --------------------------------------------------------------------------------------


def _flat(images: Tensor) -> np.ndarray:
    """``(n, 1, h, w)`` in [-1, 1] -> ``(n, h*w)`` features in [0, 1]."""
    x = (images.detach().float().cpu().clamp(-1, 1) + 1) / 2
    return x.flatten(1).numpy()


class DigitJudge:
    """An RBF support-vector classifier trained on the real digits only (never on samples).

    It is fitted on the train split of ``DigitsDataset(size)`` and scored on the held-out
    split (``test_accuracy``); it then says which digit a generated image shows.
    """

    def __init__(self, size: int, *, seed: int = 0, test_fraction: float = 0.1) -> None:
        from sklearn.svm import SVC

        train_set = DigitsDataset(size, seed=seed, split="train", test_fraction=test_fraction)
        test_set = DigitsDataset(size, seed=seed, split="test", test_fraction=test_fraction)
        self.size = size
        self.model = SVC(C=10.0, gamma="scale")
        self.model.fit(_flat(train_set.images), train_set.labels.numpy())
        self.test_accuracy = float(
            (self.predict(test_set.images) == test_set.labels.numpy()).mean()
        )

    def predict(self, images: Tensor) -> np.ndarray:
        """Digit labels ``(n,)`` of images ``(n, 1, size, size)`` in ``[-1, 1]``."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (1, self.size, self.size):
            raise ValueError(
                f"DigitJudge: images must be (n, 1, {self.size}, {self.size}), got "
                f"{tuple(images.shape)}"
            )
        return np.asarray(self.model.predict(_flat(images)), dtype=np.int64)


class VideoJudge:
    """Checks a clip's digit and direction without any learned video model.

    - digit: each frame is cropped to a ``digit_size`` square around its centre of mass
      and classified by an RBF support-vector classifier trained on *real* digits pasted
      at random places on the canvas and cropped the same way (so the crop's own offsets
      are learned); the majority over frames wins;
    - direction: the displacement of the centre of mass from frame 0 to frame 1 (the
      initial direction, before any bounce), each axis counted as moving when it exceeds
      ``threshold`` pixels.

    ``test_accuracy`` is the per-frame digit accuracy on the held-out real digits.
    """

    def __init__(
        self,
        digit_size: int,
        canvas: int,
        *,
        seed: int = 0,
        test_fraction: float = 0.1,
        threshold: float = 0.4,
    ) -> None:
        from sklearn.svm import SVC

        if canvas < digit_size:
            raise ValueError(f"canvas {canvas} is smaller than digit_size {digit_size}")
        self.digit_size, self.canvas, self.threshold = digit_size, canvas, threshold
        gen = torch.Generator().manual_seed(seed + 5)
        sets = {
            split: DigitsDataset(digit_size, seed=seed, split=split, test_fraction=test_fraction)
            for split in ("train", "test")
        }
        self.model = SVC(C=10.0, gamma="scale")
        train_set = sets["train"]
        features = [_flat(self._pasted_crops(train_set.images, gen)) for _ in range(3)]
        self.model.fit(np.concatenate(features), np.tile(train_set.labels.numpy(), 3))
        test_set = sets["test"]
        found = self.model.predict(_flat(self._pasted_crops(test_set.images, gen)))
        self.test_accuracy = float((found == test_set.labels.numpy()).mean())

    def _pasted_crops(self, digits: Tensor, gen: torch.Generator) -> Tensor:
        n, d, size = digits.shape[0], self.digit_size, self.canvas
        frames = torch.full((n, 1, 1, size, size), -1.0)
        corner = torch.randint(size - d + 1, (n, 2), generator=gen)
        for i in range(n):
            r, c = int(corner[i, 0]), int(corner[i, 1])
            frames[i, 0, :, r : r + d, c : c + d] = digits[i]
        return self.crops(frames)

    @staticmethod
    def centres(videos: Tensor) -> Tensor:
        """Centre of mass ``(row, col)`` per frame, ``(n, frames, 2)``, of clips in [-1, 1]."""
        mass = ((videos.float()[:, :, 0].clamp(-1, 1) + 1) / 2) ** 2  # (n, f, h, w)
        h, w = mass.shape[-2:]
        rows = torch.arange(h, dtype=torch.float32).view(h, 1)
        cols = torch.arange(w, dtype=torch.float32).view(1, w)
        total = mass.sum(dim=(-2, -1)).clamp_min(1e-6)
        r = (mass * rows).sum(dim=(-2, -1)) / total
        c = (mass * cols).sum(dim=(-2, -1)) / total
        return torch.stack([r, c], dim=-1)

    def crops(self, videos: Tensor) -> Tensor:
        """``(n * frames, 1, d, d)`` windows centred on each frame's centre of mass."""
        n, f, _, h, w = videos.shape
        d = self.digit_size
        centres = self.centres(videos)
        out = torch.empty(n * f, 1, d, d)
        for i in range(n):
            for j in range(f):
                r0 = round(float(centres[i, j, 0]) - (d - 1) / 2)
                c0 = round(float(centres[i, j, 1]) - (d - 1) / 2)
                r0, c0 = min(max(r0, 0), h - d), min(max(c0, 0), w - d)
                out[i * f + j] = videos[i, j, :, r0 : r0 + d, c0 : c0 + d].float()
        return out

    def predict(self, videos: Tensor) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Per clip ``(n, frames, 1, h, w)``: the digit, and the (row, col) step signs."""
        n, f = videos.shape[:2]
        found = self.model.predict(_flat(self.crops(videos)))
        per_frame = np.asarray(found, dtype=np.int64).reshape(n, f)
        digits = np.array([np.bincount(row, minlength=10).argmax() for row in per_frame])
        step = self.centres(videos)[:, 1] - self.centres(videos)[:, 0]
        signs = [
            tuple(int(math.copysign(1, v)) if abs(v) > self.threshold else 0 for v in s.tolist())
            for s in step
        ]
        return digits, [(a, b) for a, b in signs]

    def score(
        self, videos: Tensor, digits: Sequence[int], directions: Sequence[str]
    ) -> dict[str, float]:
        """Fractions of clips whose digit, direction, and both, are right."""
        found_digits, found_moves = self.predict(videos)
        digit_ok = found_digits == np.asarray(digits)
        move_ok = np.array(
            [DIRECTIONS[d] == m for d, m in zip(directions, found_moves, strict=True)]
        )
        return {
            "digit_accuracy": float(digit_ok.mean()),
            "direction_accuracy": float(move_ok.mean()),
            "accuracy": float((digit_ok & move_ok).mean()),
        }


# --------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------


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


class _Reporter:
    """Stage headers, per-stage timing, progress bars on or off."""

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

    def bar(self, total: int, desc: str) -> Any:
        """A stage's bar (``TrainConfig.progress`` says how it shows where)."""
        return _progress_bar(total, desc, enabled=self.progress, leave=False)


def _lr(stage: StageTrainConfig, step: int) -> float:
    if stage.warmup_steps and step < stage.warmup_steps:
        return stage.lr * (step + 1) / stage.warmup_steps
    span = max(1, stage.steps - stage.warmup_steps)
    progress = min(1.0, (step - stage.warmup_steps) / span)
    return 0.5 * stage.lr * (1 + math.cos(math.pi * progress))


def _fit(
    module: nn.Module,
    loss_of: Callable[[Tensor, torch.Generator], Tensor],
    size: int,
    stage: StageTrainConfig,
    seed: int,
    reporter: _Reporter,
    desc: str,
    after_step: Callable[[], None] | None = None,
) -> list[float]:
    """Minimise ``loss_of(indices, generator)`` over random batches of ``range(size)``."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    module.train()
    with reporter.bar(stage.steps, desc) as bar:
        for step in range(stage.steps):
            for group in opt.param_groups:
                group["lr"] = _lr(stage, step)
            index = torch.randint(size, (min(stage.batch_size, size),), generator=gen)
            loss = loss_of(index, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if after_step is not None:
                after_step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"{desc}: the loss is {value} at step {step + 1}")
            losses.append(value)
            bar.set_postfix(loss=f"{value:.4f}")
            bar.update(1)
    module.eval()
    return losses


def _tail_mean(losses: Sequence[float], k: int = 20) -> float:
    tail = list(losses[-k:])
    return float(sum(tail) / max(len(tail), 1))


def _train_clip(
    config: _DemoBase,
    images: Tensor,
    captions: Sequence[str],
    reporter: _Reporter,
) -> tuple[CLIP, list[float]]:
    clip = CLIP(config.clip_config())
    tokenizer = _byte_tokenizer(config)
    ids = tokenizer(list(captions))

    def loss_of(index: Tensor, _: torch.Generator) -> Tensor:
        return clip.loss(images[index], ids[index])

    losses = _fit(
        clip,
        loss_of,
        len(ids),
        config.clip_train,
        config.seed + 11,
        reporter,
        "clip",
        after_step=clip.clamp_logit_scale_,
    )
    return clip, losses


def _byte_tokenizer(config: _DemoBase) -> Any:
    from diffkit.tokenizers import ByteTokenizer

    text = config.pipeline.text
    assert isinstance(text, CLIPTextConditionerConfig)
    return ByteTokenizer(text.text.context_length)


def _text_conditioner(config: _DemoBase, clip: CLIP) -> CLIPTextConditioner:
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
    """Training items ``{"x", "label", "caption"}`` from tensors already in memory."""

    def __init__(self, x: Tensor, labels: Tensor, captions: Sequence[str]) -> None:
        self.x, self.labels, self.captions = x, labels, list(captions)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "x": self.x[index],
            "label": int(self.labels[index]),
            "caption": self.captions[index],
        }


def _train_denoiser(
    config: _DemoBase,
    pipeline_config: PipelineConfig,
    x: Tensor,
    labels: Tensor,
    captions: Sequence[str],
    text: CLIPTextConditioner,
    reporter: _Reporter,
) -> tuple[nn.Module, list[float]]:
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
        _Items(x, labels, captions),
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


def _set_threads(threads: int | None) -> int:
    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def _to_unit(x: Tensor) -> Tensor:
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2).contiguous()


def _generate(pipeline: Pipeline, prompts: Sequence[str], seed: int, batch: int = 50) -> Tensor:
    """Samples for ``prompts`` in chunks; one generator, so the result depends on the seed only."""
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    for start in range(0, len(prompts), batch):
        chunk = list(prompts[start : start + batch])
        chunks.append(pipeline.generate(chunk, generator=generator))
    return torch.cat(chunks)


def generate_samples(
    pipeline: Pipeline, prompts: Sequence[str], seed: int, batch: int = 50
) -> Tensor:
    """Sample ``len(prompts)`` items with the pipeline's default steps, guidance and sampler."""
    return _generate(pipeline, prompts, seed, batch)


# --------------------------------------------------------------------------------------
# Image demo
# --------------------------------------------------------------------------------------


def _image_prompts(config: ImageDemoConfig) -> tuple[list[str], list[int]]:
    prompts, labels = [], []
    for digit in range(10):
        prompt = config.prompt_template.format(digit=digit, name=DIGIT_NAMES[digit])
        prompts += [prompt] * config.samples_per_prompt
        labels += [digit] * config.samples_per_prompt
    return prompts, labels


def run_image_demo(
    config: ImageDemoConfig,
    out: str | os.PathLike[str],
    *,
    progress: bool = True,
    console: Any = None,
) -> DemoResult:
    """Train CLIP, the autoencoder and the latent denoiser; sample, judge and save to ``out``."""
    device = training_device(config)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    result = DemoResult(task="image", out=folder)
    report = _Reporter(result, progress, console)
    threads = _set_threads(config.threads)
    result.metrics["threads"] = threads
    size = config.pipeline.data_shape[1]
    torch.manual_seed(config.seed)

    with report.stage("data", f"captioned digits {size}x{size} and the independent judge"):
        train_set = DigitsDataset(
            size, seed=config.seed, split="train", test_fraction=config.test_fraction
        )
        test_set = DigitsDataset(
            size, seed=config.seed, split="test", test_fraction=config.test_fraction
        )
        judge = DigitJudge(size, seed=config.seed, test_fraction=config.test_fraction)
        result.metrics["judge_test_accuracy"] = judge.test_accuracy
        result.metrics["train_images"] = len(train_set)

    with report.stage("clip", "contrastive text + image towers"):
        clip, clip_losses = _train_clip(config, train_set.images, train_set.captions, report)
        result.losses["clip"] = _tail_mean(clip_losses)
        result.metrics["clip_zero_shot_accuracy"] = _zero_shot(config, clip, test_set)
        report.note(
            f"final loss {result.losses['clip']:.4f}, zero-shot accuracy on held-out digits "
            f"{100 * result.metrics['clip_zero_shot_accuracy']:.1f} %"
        )

    encoder_config = config.pipeline.encoder
    assert isinstance(encoder_config, KLAutoencoderConfig)
    with report.stage("autoencoder", "KL autoencoder into the latent space"):
        torch.manual_seed(config.seed + 21)
        ae = KLAutoencoder(encoder_config)
        ae_losses = _train_autoencoder(config, ae, train_set.images, report)
        result.losses["autoencoder"] = _tail_mean(ae_losses)
        with torch.no_grad():
            recon = ae.decode(ae.encode(test_set.images))
            encoder_config = _rescale_latents(ae, ae.posterior(train_set.images).mean)
        result.metrics["autoencoder_test_mse"] = float(F.mse_loss(recon, test_set.images))
        with torch.no_grad():
            latents = ae.encode(train_set.images)
        result.metrics["latent_std"] = float(latents.std())
        report.note(
            f"final loss {result.losses['autoencoder']:.4f}, held-out reconstruction MSE "
            f"{result.metrics['autoencoder_test_mse']:.4f}, latents {tuple(latents.shape[1:])}"
        )

    pipeline_config = PipelineConfig.model_validate(
        {**config.pipeline.to_dict(), "encoder": encoder_config.to_dict()}
    )
    text = _text_conditioner(config, clip)
    with report.stage("denoiser", "text-conditioned latent U-Net (CFG dropout, EMA)"):
        if device.type != "cpu":
            report.note(f"training on {device}")
        denoiser, den_losses = _train_denoiser(
            config,
            pipeline_config,
            latents,
            train_set.labels,
            train_set.captions,
            text,
            report,
        )
        result.losses["denoiser"] = _tail_mean(den_losses)

    with report.stage("sample", "grid for one prompt per digit, judged, saved"):
        pipeline = _assemble(pipeline_config, denoiser=denoiser, encoder=ae, text=text)
        pipeline.save(folder / PIPELINE_DIR)
        prompts, labels = _image_prompts(config)
        samples = _generate(pipeline, prompts, config.seed)
        predicted = judge.predict(samples)
        result.metrics["prompt_accuracy"] = float((predicted == np.asarray(labels)).mean())
        report.note(
            f"prompt accuracy (independent judge) {100 * result.metrics['prompt_accuracy']:.1f} %"
        )
        images = _to_unit(samples)[:, 0]
        np.savez(
            folder / "samples.npz",
            images=images.numpy().astype(np.float32),
            labels=np.asarray(labels, dtype=np.int64),
            predicted=predicted,
            prompts=np.asarray(prompts),
        )
        grid = image_grid(samples.float().clamp(-1, 1), nrow=config.samples_per_prompt)
        grid.save(folder / "samples.png")
    result.files = {
        "samples_png": str(folder / "samples.png"),
        "samples_npz": str(folder / "samples.npz"),
        "pipeline": str(folder / PIPELINE_DIR),
    }
    _write_summary(result, config)
    return result


def _zero_shot(config: _DemoBase, clip: CLIP, test_set: DigitsDataset) -> float:
    tokenizer = _byte_tokenizer(config)
    templates = [
        (lambda c, t=t: t.format(digit=c, name=DIGIT_NAMES[int(c)])) for t in IMAGE_TEMPLATES
    ]
    classifier = ZeroShotClassifier.from_prompts(
        clip, tokenizer, [str(d) for d in range(10)], templates
    )
    with torch.no_grad():
        predicted = classifier.predict(test_set.images)
    return float((predicted == test_set.labels).float().mean())


def _rescale_latents(ae: KLAutoencoder, raw: Tensor) -> KLAutoencoderConfig:
    """Set ``ae``'s shift and scale so the posterior means ``raw`` have zero mean, unit std.

    Returns (and installs on ``ae``) its config with the two factors, as saved with the
    pipeline.
    """
    scale = 1.0 / float(raw.std().clamp_min(1e-3))
    shift = float(raw.mean())
    config = ae.config.model_copy(update={"scaling_factor": scale, "shift_factor": shift})
    ae.scaling_factor, ae.shift_factor, ae.config = scale, shift, config
    return config


def _train_autoencoder(
    config: ImageDemoConfig | VideoDemoConfig,
    ae: KLAutoencoder,
    images: Tensor,
    reporter: _Reporter,
) -> list[float]:
    def loss_of(index: Tensor, gen: torch.Generator) -> Tensor:
        x = images[index]
        recon, posterior = ae(x, generator=gen)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        return F.mse_loss(recon, x) + config.kl_weight * kl

    return _fit(
        ae, loss_of, len(images), config.autoencoder_train, config.seed + 21, reporter, "vae"
    )


def _assemble(
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


def _write_summary(result: DemoResult, config: DemoConfig) -> None:
    data = result.to_dict()
    data["config"] = config.to_dict()
    (result.out / "summary.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------
# Video demo
# --------------------------------------------------------------------------------------


def _consistent_clips(dataset: MovingDigitsDataset) -> list[int]:
    """Clips whose first step goes the captioned way (a clip starting against a wall bounces
    at once, which would contradict its caption)."""
    keep = []
    for i in range(len(dataset)):
        (r0, c0), (r1, c1) = dataset.trajectory(i)[:2]
        step = (int(np.sign(r1 - r0)), int(np.sign(c1 - c0)))
        if step == DIRECTIONS[dataset.directions[int(dataset.direction[i])]]:
            keep.append(i)
    return keep


def _video_data(
    config: VideoDemoConfig, split: Literal["train", "test"], num: int
) -> tuple[Tensor, Tensor, list[str], list[str]]:
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
    keep = _consistent_clips(dataset)
    items = [dataset[i] for i in keep]
    x = torch.stack([item["x"] for item in items])
    labels = torch.tensor([item["label"] for item in items], dtype=torch.long)
    return x, labels, [item["caption"] for item in items], [item["direction"] for item in items]


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


def run_video_demo(
    config: VideoDemoConfig,
    out: str | os.PathLike[str],
    *,
    progress: bool = True,
    console: Any = None,
) -> DemoResult:
    """Train CLIP, the frame autoencoder and a latent video transformer; sample GIFs, judge."""
    device = training_device(config)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    result = DemoResult(task="video", out=folder)
    report = _Reporter(result, progress, console)
    result.metrics["threads"] = _set_threads(config.threads)
    torch.manual_seed(config.seed)

    with report.stage("data", "moving-digit clips with captions and the independent check"):
        x, labels, captions, _ = _video_data(config, "train", config.num_videos)
        tx, tlabels, _, tdirections = _video_data(config, "test", 200)
        judge = VideoJudge(
            config.digit_size,
            config.pipeline.data_shape[2],
            seed=config.seed,
            test_fraction=config.test_fraction,
        )
        result.metrics["judge_test_accuracy"] = judge.test_accuracy
        real = judge.score(tx, tlabels.tolist(), tdirections)
        result.metrics["check_on_real_clips"] = real["accuracy"]
        result.metrics["train_clips"] = len(labels)

    with report.stage("clip", "contrastive text + frame-stacked image towers"):
        clip, clip_losses = _train_clip(config, x[:, :, 0], captions, report)
        result.losses["clip"] = _tail_mean(clip_losses)

    pipeline_config, ae, data = config.pipeline, None, x
    if isinstance(config.pipeline.encoder, KLAutoencoderConfig):
        with report.stage("autoencoder", "KL autoencoder on single frames (latent video)"):
            ae, pipeline_config, data = _video_autoencoder(
                config, x, tx, tlabels, tdirections, judge, result, report
            )

    text = _text_conditioner(config, clip)
    space = "pixel" if ae is None else "latent"
    with report.stage("denoiser", f"text-conditioned video transformer over {space} tubelets"):
        if device.type != "cpu":
            report.note(f"training on {device}")
        denoiser, den_losses = _train_denoiser(
            config, pipeline_config, data, labels, captions, text, report
        )
        result.losses["denoiser"] = _tail_mean(den_losses)

    with report.stage("sample", "one GIF per prompt and a frame grid, checked"):
        pipeline = _assemble(pipeline_config, denoiser=denoiser, encoder=ae, text=text)
        pipeline.save(folder / PIPELINE_DIR)
        prompts, digits, directions = _video_prompts(config)
        k = config.samples_per_prompt
        repeated = [p for p in prompts for _ in range(k)]
        videos = _generate(pipeline, repeated, config.seed)
        scores = judge.score(
            videos, [d for d in digits for _ in range(k)], [d for d in directions for _ in range(k)]
        )
        result.metrics.update(scores)
        gif_dir = folder / "gifs"
        gif_dir.mkdir(exist_ok=True)
        for i, prompt in enumerate(prompts):
            save_gif(videos[i * k : (i + 1) * k], gif_dir / f"{i:02d}_{_slug(prompt)}.gif")
        video_grid(videos.float().clamp(-1, 1)).save(folder / "frames.png")
        np.savez(
            folder / "samples.npz",
            videos=_to_unit(videos)[:, :, 0].numpy().astype(np.float32),
            labels=np.asarray([d for d in digits for _ in range(k)], dtype=np.int64),
            directions=np.asarray([d for d in directions for _ in range(k)]),
            prompts=np.asarray(repeated),
        )
    result.files = {
        "frames_png": str(folder / "frames.png"),
        "gifs": str(gif_dir),
        "samples_npz": str(folder / "samples.npz"),
        "pipeline": str(folder / PIPELINE_DIR),
    }
    _write_summary(result, config)
    return result


def _video_autoencoder(
    config: VideoDemoConfig,
    x: Tensor,
    tx: Tensor,
    tlabels: Tensor,
    tdirections: Sequence[str],
    judge: "VideoJudge",
    result: DemoResult,
    report: _Reporter,
) -> tuple[KLAutoencoder, PipelineConfig, Tensor]:
    """Train the autoencoder on the clips' frames; return it, the pipeline config with its
    latent scale, and the training clips as latent videos."""
    encoder_config = config.pipeline.encoder
    assert isinstance(encoder_config, KLAutoencoderConfig)
    torch.manual_seed(config.seed + 21)
    ae = KLAutoencoder(encoder_config)
    frames = x.flatten(0, 1)  # (clips * frames, 1, h, w)
    losses = _train_autoencoder(config, ae, frames, report)
    result.losses["autoencoder"] = _tail_mean(losses)
    with torch.no_grad():
        raw = torch.cat([ae.posterior(chunk).mean for chunk in x.split(256)])
        encoder_config = _rescale_latents(ae, raw)
        latents = (raw - ae.shift_factor) * ae.scaling_factor  # = ae.encode(x), encoded once
        recon = ae.decode(ae.encode(tx))
    result.metrics["autoencoder_test_mse"] = float(F.mse_loss(recon, tx))
    coded = judge.score(recon, tlabels.tolist(), tdirections)
    result.metrics["check_on_autoencoded_clips"] = coded["accuracy"]
    report.note(
        f"final loss {result.losses['autoencoder']:.4f}, held-out reconstruction MSE "
        f"{result.metrics['autoencoder_test_mse']:.4f}, check on coded real clips "
        f"{100 * coded['accuracy']:.1f} %, latent clips {tuple(latents.shape[1:])}"
    )
    pipeline_config = PipelineConfig.model_validate(
        {**config.pipeline.to_dict(), "encoder": encoder_config.to_dict()}
    )
    return ae, pipeline_config, latents


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text).strip("_")[:60]


def save_gif(
    videos: Tensor, path: str | os.PathLike[str], *, scale: int = 4, duration_ms: int = 150
) -> Path:
    """Animate clips ``(n, frames, c, h, w)``, c 1 (grey) or 3 (RGB), in [-1, 1] as a GIF.

    The clips play side by side, each framed by a grey pixel, and loop.
    """
    from PIL import Image as PILImage

    if videos.ndim != 5 or videos.shape[2] not in (1, 3):
        raise ValueError(
            "save_gif: videos must be (n, frames, channels, h, w) with 1 (grey) or 3 (RGB) "
            f"channels, got shape {tuple(videos.shape)}"
        )
    unit = _to_unit(videos)
    padded = F.pad(unit, (1, 1, 1, 1), value=0.5)
    frames = rearrange(padded, "n f c h w -> f h (n w) c")
    if frames.shape[-1] == 1:
        frames = frames[..., 0]  # (f, h, n w): PIL's 8-bit grey
    pictures = []
    for frame in frames:
        array = (frame.numpy() * 255).round().astype(np.uint8)
        picture = PILImage.fromarray(array).resize(
            (array.shape[1] * scale, array.shape[0] * scale), PILImage.Resampling.NEAREST
        )
        pictures.append(picture)
    target = Path(path)
    pictures[0].save(
        target, save_all=True, append_images=pictures[1:], duration=duration_ms, loop=0
    )
    return target


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def run_demo(
    config: DemoConfig,
    out: str | os.PathLike[str],
    *,
    progress: bool = True,
    console: Any = None,
) -> DemoResult:
    """Run the image or the video recipe, as ``config.kind`` says."""
    if isinstance(config, ImageDemoConfig):
        return run_image_demo(config, out, progress=progress, console=console)
    return run_video_demo(config, out, progress=progress, console=console)
