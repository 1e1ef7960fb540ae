"""The demo recipes as configs: what ``diffkit demo`` and ``diffkit train`` run.

Each recipe is a config ([`ImageDemoConfig`][diffkit_demo.recipes.config.ImageDemoConfig],
[`VideoDemoConfig`][diffkit_demo.recipes.config.VideoDemoConfig]); ``configs/*.yaml`` hold
copies that ``diffkit train`` runs. [`default_config`][diffkit_demo.recipes.config.default_config]
gives the built-in ones, [`fast_config`][diffkit_demo.recipes.config.fast_config] their
one-minute smoke versions.
"""

import json
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Discriminator, Field, Tag, model_validator

from diffkit.builder import PipelineConfig
from diffkit.config import SEED_MAX, Config
from diffkit.nn.clip import CLIPConfig, ResNetTowerConfig, VisionTowerConfig
from diffkit.nn.unet import UNetConfig
from diffkit.nn.vae import KLAutoencoderConfig
from diffkit.text import CLIPTextConditionerConfig
from diffkit.training import TrainConfig
from diffkit_demo.datasets import DIRECTIONS

__all__ = [
    "PIPELINE_DIR",
    "DemoConfig",
    "ImageDemoConfig",
    "StageTrainConfig",
    "VideoDemoConfig",
    "default_config",
    "fast_config",
    "load_demo_config",
    "parse_demo_config",
    "recipe_yaml",
]

PIPELINE_DIR = "pipeline"
"""Sub-folder of a demo's output folder that holds the saved pipeline."""


# --------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------


class StageTrainConfig(Config):
    """Optimisation of one auxiliary stage (CLIP or the autoencoder), run by ``train()``.

    AdamW, linear warm-up then cosine decay to 0, as ``TrainConfig`` (``train_config``).
    """

    kind: Literal["stage"] = "stage"
    steps: int = Field(default=300, ge=1, description="optimizer steps")
    batch_size: int = Field(default=128, ge=2, description="items per step")
    lr: float = Field(default=2e-3, gt=0, description="peak learning rate (cosine decay to 0)")
    warmup_steps: int = Field(default=20, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW decoupled weight decay")

    def train_config(self, seed: int, items: int, progress: bool) -> TrainConfig:
        """This stage as a [`train`][diffkit.training.train] config: on the CPU, cosine decay
        to 0 after the warm-up, gradient norm clipped to 1, no EMA, nothing written; a batch
        of at most ``items`` (the stage's data)."""
        return TrainConfig(
            steps=self.steps,
            batch_size=min(self.batch_size, items),
            lr=self.lr,
            lr_schedule="cosine",
            warmup_steps=self.warmup_steps,
            weight_decay=self.weight_decay,
            grad_clip=1.0,
            ema_decay=None,
            seed=seed,
            progress=progress,
            tensorboard=False,
            device="cpu",
        )


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
    """The text -> video demo: moving digits, a space-time U-Net over latent clips.

    With ``pipeline.encoder`` set (a KL autoencoder, the default) the autoencoder is trained
    on single frames and codes every clip frame by frame; the denoiser (a space-time U-Net,
    or a ``video_dit`` transformer over tubelets) then denoises the latent video. With
    ``encoder: null`` it works on pixels.
    """

    kind: Literal["demo_video"] = "demo_video"
    autoencoder_train: StageTrainConfig = Field(
        default_factory=lambda: StageTrainConfig(),
        description="autoencoder training (on single frames); unused in pixel space",
    )
    kl_weight: float = Field(
        default=1e-3, ge=0, description="weight of the KL term per latent element"
    )
    num_videos: int = Field(
        default=16384,
        ge=16,
        description="training clips generated; those that move against their caption are "
        "dropped (see bounces: about 2 in 9 are kept on the default canvas)",
    )
    bounces: bool = Field(
        default=False,
        description="keep clips whose digit bounces off a border (and then moves against its "
        "caption); false keeps only clips that move the captioned way in every frame",
    )
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
    joint_images: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="share of the denoiser's training items that are stacks of independent "
        "frames, each from another clip with the same caption (VDM's joint image-video "
        "training: Conditioning.temporal false, so they train only the per-frame layers); "
        "needs a space-time U-Net",
    )

    @model_validator(mode="after")
    def _video(self) -> "VideoDemoConfig":
        _check_template(self.prompt_template, ("name", "digit", "direction"))
        shape = self.pipeline.data_shape
        if len(shape) != 4 or shape[1] != 1 or shape[2] != shape[3]:
            raise ValueError(f"pipeline.data_shape must be (frames, 1, size, size), got {shape}")
        if self.digit_size > shape[2]:
            raise ValueError(f"digit_size {self.digit_size} exceeds the canvas {shape[2]}")
        if not self.bounces and shape[2] - self.digit_size < shape[0] - 1:
            raise ValueError(
                f"a digit_size {self.digit_size} digit on the {shape[2]}-pixel canvas cannot "
                f"move {shape[0] - 1} pixels (pipeline.data_shape's {shape[0]} frames) without "
                "bouncing off a border, so no clip would match its caption (bounces=true "
                "keeps the clips that bounce)"
            )
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
        denoiser = self.pipeline.denoiser
        temporal = denoiser.temporal if isinstance(denoiser, UNetConfig) else None
        if self.joint_images and (temporal is None or temporal.frame_patch > 1):
            raise ValueError(
                f"joint_images {self.joint_images} needs pipeline.denoiser to be a space-time "
                "U-Net (kind 'unet' with temporal set) without temporal.frame_patch: only its "
                "temporal layers can skip the frames of an image stack"
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
        "# Every field is documented in diffkit_demo.recipes (ImageDemoConfig / VideoDemoConfig);\n"
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
    return _image_recipe() if task == "image" else _video_recipe()


def _image_recipe() -> ImageDemoConfig:
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


def _video_recipe() -> VideoDemoConfig:
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
                # A space-time U-Net (the image demo's U-Net with temporal attention), its
                # frames in pairs: digits and directions both right where the video
                # transformer drew the wrong digit (benchmarks/RESULTS.md, "Space-time
                # U-Net vs the video transformer").
                "denoiser": {
                    "kind": "unet",
                    "in_channels": 2,
                    "base_channels": 16,
                    "channel_mult": (1, 2),
                    "blocks_per_level": 1,
                    "attention_resolutions": (2,),
                    "attention_head_dim": 16,
                    "mid_attention": True,
                    "context_dim": 64,
                    "pooled_dim": 64,
                    "norm_groups": 8,
                    "prediction": "v",
                    "temporal": {
                        "conv": False,
                        "attention": True,
                        "input_heads": 1,
                        "dropout": 0.0,
                        "positions": "sinusoidal",
                        "cross_attention": True,
                        "frame_patch": 2,
                    },
                },
                "text": _text_config(40, 64, 2, 64),
                # Stochastic: the re-drawn noise corrects the model's errors along the way
                # (RESULTS: every stochastic sampler beat every deterministic one here).
                "sampler": {"kind": "euler_ancestral"},
                "steps": 50,
                "guidance": 3.0,
            },
            "train": {
                "steps": 2400,
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
        update["num_videos"] = 256
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
