"""The offline demos: `diffkit demo --fast` end to end (image and video), judges, recipes."""

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image as PILImage

from diffkit.cli import main
from diffkit.nn.vae import KLAutoencoder
from diffkit.pipeline import Pipeline
from diffkit.training import TrainConfig
from diffkit_demo.datasets import DIRECTIONS
from diffkit_demo.judges import DigitJudge, VideoJudge
from diffkit_demo.recipes import (
    PIPELINE_DIR,
    ImageDemoConfig,
    VideoDemoConfig,
    default_config,
    fast_config,
    generate_samples,
    load_demo_config,
    parse_demo_config,
)
from diffkit_demo.recipes.video import _video_data, _with_image_stacks

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def image_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo_image")
    code = main(["demo", "--fast", "--out", str(out), "--threads", "1", "--no-progress"])
    assert code == 0
    return out


def test_image_demo_fast_writes_every_output(image_run: Path) -> None:
    for name in ("samples.png", "samples.npz", "summary.json"):
        assert (image_run / name).is_file(), name
    with PILImage.open(image_run / "samples.png") as picture:
        picture.load()
        assert picture.size[0] > 0 and picture.size[1] > 0
    data = np.load(image_run / "samples.npz")
    images, labels = data["images"], data["labels"]
    assert images.ndim == 3 and images.shape[1:] == (16, 16)
    assert images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert labels.shape == (images.shape[0],)
    assert sorted(set(labels.tolist())) == list(range(10))
    summary = json.loads((image_run / "summary.json").read_text())
    assert set(summary["times_s"]) == {"data", "clip", "autoencoder", "denoiser", "sample"}
    assert 0.0 <= summary["metrics"]["prompt_accuracy"] <= 1.0
    assert summary["metrics"]["judge_test_accuracy"] > 0.9


def test_image_demo_pipeline_reloads_and_regenerates_identical_samples(image_run: Path) -> None:
    data = np.load(image_run / "samples.npz")
    pipeline = Pipeline.load(image_run / PIPELINE_DIR)
    prompts = [str(p) for p in data["prompts"]]
    seed = json.loads((image_run / "summary.json").read_text())["config"]["seed"]
    again = generate_samples(pipeline, prompts, seed)
    unit = ((again.clamp(-1, 1) + 1) / 2)[:, 0].numpy().astype(np.float32)
    np.testing.assert_array_equal(unit, data["images"])
    other = generate_samples(pipeline, prompts, seed + 1)
    assert not torch.equal(other, again)


def test_cli_sample_and_info_on_the_demo_run(
    image_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "seven.png"
    args = ["sample", str(image_run), "--prompt", "a handwritten digit seven", "--num", "3"]
    assert (
        main(
            [
                *args,
                "--steps",
                "3",
                "--sampler",
                "ddim",
                "--seed",
                "1",
                "--threads",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    with PILImage.open(out) as picture:
        assert picture.size == (3 * (16 + 1) + 1, 16 + 2)  # 1-pixel borders
    assert np.load(out.with_suffix(".npz"))["images"].shape == (3, 16, 16)
    assert main(["info", str(image_run)]) == 0
    text = capsys.readouterr().out
    for part in ("UNet", "KLAutoencoder", "CLIPTextConditioner", "(2, 8, 8)", "(1, 16, 16)"):
        assert part in text


@pytest.fixture(scope="module")
def video_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo_video")
    args = ["train", str(CONFIGS / "demo_video.yaml"), "--fast", "--out", str(out)]
    assert main([*args, "--threads", "1", "--no-progress", "--quiet"]) == 0
    return out


def test_video_recipe_fast_via_train_writes_gifs_and_frame_grid(video_run: Path) -> None:
    config = fast_config(default_config("video"))
    assert isinstance(config, VideoDemoConfig)
    frames = config.pipeline.data_shape[0]
    gifs = sorted((video_run / "gifs").glob("*.gif"))
    assert len(gifs) == len(config.prompt_digits) * len(config.directions)
    with PILImage.open(gifs[0]) as gif:
        assert getattr(gif, "n_frames", 1) == frames
        gif.seek(frames - 1)
        gif.load()
    with PILImage.open(video_run / "frames.png") as grid:
        grid.load()
        assert grid.size[0] > 0 and grid.size[1] > 0
    data = np.load(video_run / "samples.npz")
    videos = data["videos"]
    assert videos.shape[1:] == (frames, 16, 16) and videos.dtype == np.float32
    assert videos.min() >= 0.0 and videos.max() <= 1.0
    assert len(data["labels"]) == len(data["directions"]) == len(data["prompts"]) == len(videos)
    summary = json.loads((video_run / "summary.json").read_text())
    assert set(summary["times_s"]) == {"data", "clip", "autoencoder", "denoiser", "sample"}
    assert summary["metrics"]["check_on_real_clips"] > 0.9
    for name in ("digit_accuracy", "direction_accuracy", "accuracy"):
        assert 0.0 <= summary["metrics"][name] <= 1.0
    assert (video_run / PIPELINE_DIR / "model.safetensors").is_file()
    # the longer clips: one per direction, twice the trained frames, their seam measured
    long = sorted((video_run / "long").glob("*.gif"))
    assert len(long) == len(config.directions) and summary["files"]["long_gifs"]
    with PILImage.open(long[0]) as gif:
        assert getattr(gif, "n_frames", 1) == 2 * frames
    assert summary["metrics"]["long_seam_ratio"] > 0
    assert 0.0 <= summary["metrics"]["long_new_frames_digit_accuracy"] <= 1.0


def test_video_demo_pipeline_is_latent_reloads_and_regenerates_identical_samples(
    video_run: Path,
) -> None:
    data = np.load(video_run / "samples.npz")
    pipeline = Pipeline.load(video_run / PIPELINE_DIR)
    assert isinstance(pipeline.encoder, KLAutoencoder)
    assert pipeline.encoder.scaling_factor != 1.0  # rescaled to unit std by the demo
    assert pipeline.latent_shape() == (8, 2, 8, 8)
    prompts = [str(p) for p in data["prompts"]]
    seed = json.loads((video_run / "summary.json").read_text())["config"]["seed"]
    again = generate_samples(pipeline, prompts, seed)
    assert again.shape == (len(prompts), 8, 1, 16, 16)
    unit = ((again.clamp(-1, 1) + 1) / 2)[:, :, 0].numpy().astype(np.float32)
    np.testing.assert_array_equal(unit, data["videos"])
    other = generate_samples(pipeline, prompts, seed + 1)
    assert not torch.equal(other, again)


def test_video_config_accepts_pixel_space_and_rejects_a_bad_encoder() -> None:
    data = default_config("video").to_dict()
    pipeline: dict[str, Any] = data["pipeline"]
    pixel: dict[str, Any] = {**pipeline, "encoder": None}
    pixel["denoiser"] = {**pipeline["denoiser"], "in_channels": 1}
    assert VideoDemoConfig.model_validate({**data, "pipeline": pixel}).pipeline.encoder is None
    identity = {**pipeline, "encoder": {"kind": "identity", "channels": 1}}
    identity["denoiser"] = pixel["denoiser"]
    with pytest.raises(ValueError, match="must be a 'kl_autoencoder'"):
        VideoDemoConfig.model_validate({**data, "pipeline": identity})


def test_video_config_takes_either_clip_image_tower_and_checks_its_channels() -> None:
    data = default_config("video").to_dict()
    vit = {
        "kind": "clip_vit",
        "image_size": 16,
        "patch_size": 4,
        "channels": 8,
        "width": 32,
        "heads": 4,
    }
    resnet = {
        "kind": "clip_resnet",
        "image_size": 16,
        "channels": 8,
        "widths": (16, 32),
        "blocks": (1, 1),
    }
    for tower, kind in [(vit, "clip_vit"), (resnet, "clip_resnet")]:
        config = VideoDemoConfig.model_validate({**data, "clip_vision": tower})
        assert config.clip_vision.kind == kind
        assert config.clip_config().vision == config.clip_vision
        with pytest.raises(ValueError, match="frames stacked as channels"):
            VideoDemoConfig.model_validate({**data, "clip_vision": {**tower, "channels": 1}})
    untagged = {k: v for k, v in vit.items() if k != "kind"}  # a recipe from before ResNets
    config = VideoDemoConfig.model_validate({**data, "clip_vision": untagged})
    assert config.clip_vision.kind == "clip_vit"
    with pytest.raises(ValueError, match="clip_vit', 'clip_resnet"):
        VideoDemoConfig.model_validate({**data, "clip_vision": {**resnet, "kind": "clip_vgg"}})


def test_digit_judge_classifies_held_out_real_digits() -> None:
    judge = DigitJudge(16)
    assert judge.test_accuracy > 0.95
    with pytest.raises(ValueError, match="images must be"):
        judge.predict(torch.zeros(2, 1, 8, 8))


def test_video_judge_accepts_real_clips_and_rejects_wrong_captions() -> None:
    config = default_config("video")
    assert isinstance(config, VideoDemoConfig)
    videos, labels, _, directions = _video_data(config, "test", 240)
    judge = VideoJudge(config.digit_size, config.pipeline.data_shape[2])
    right = judge.score(videos, labels.tolist(), directions)
    assert right["accuracy"] > 0.9
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    wrong = judge.score(videos, ((labels + 1) % 10).tolist(), [opposite[d] for d in directions])
    assert wrong["digit_accuracy"] < 0.2 and wrong["direction_accuracy"] < 0.1


def test_video_clips_move_their_captioned_way_in_every_frame() -> None:
    config = default_config("video")
    assert isinstance(config, VideoDemoConfig)
    videos, _, captions, directions = _video_data(config, "train", 400)
    assert 40 < len(videos) < 200  # about 2 in 9 start far enough from the border
    steps = VideoJudge.centres(videos).diff(dim=1).round()
    for step, caption, direction in zip(steps, captions, directions, strict=True):
        assert caption.endswith(direction)
        want = torch.tensor(DIRECTIONS[direction], dtype=step.dtype)
        assert torch.equal(step, want.expand_as(step)), (caption, step)
    bouncing = config.model_copy(update={"bounces": True})
    videos, _, _, directions = _video_data(bouncing, "train", 400)
    assert len(videos) > 300  # all but the clips that start against the border
    steps = VideoJudge.centres(videos).diff(dim=1).round()
    wants = torch.tensor([DIRECTIONS[d] for d in directions], dtype=steps.dtype)
    assert torch.equal(steps[:, 0], wants)  # the first step still goes the captioned way
    assert (steps[:, 1:] == -wants[:, None]).all(-1).any(), "some clips bounce"


def test_a_canvas_too_small_to_move_without_bouncing_is_refused() -> None:
    data = default_config("video").to_dict()
    shape = data["pipeline"]["data_shape"]  # (8, 1, 16, 16) with an 8-pixel digit: 7 to move
    VideoDemoConfig.model_validate({**data, "digit_size": 9})
    with pytest.raises(ValueError, match=r"digit_size 10 digit .* cannot move 7 pixels"):
        VideoDemoConfig.model_validate({**data, "digit_size": 10})
    VideoDemoConfig.model_validate({**data, "digit_size": 10, "bounces": True})
    assert shape[0] == 8


@pytest.mark.parametrize("task", ["image", "video"])
def test_configs_folder_holds_the_builtin_recipes(task: str) -> None:
    from typing import Literal, cast

    loaded = load_demo_config(CONFIGS / f"demo_{task}.yaml")
    assert loaded == default_config(cast(Literal["image", "video"], task))


def test_fast_config_shrinks_every_stage() -> None:
    full = default_config("image")
    fast = fast_config(full)
    assert isinstance(full, ImageDemoConfig) and isinstance(fast, ImageDemoConfig)
    assert fast.train.steps < full.train.steps
    assert fast.clip_train.steps < full.clip_train.steps
    assert fast.autoencoder_train.steps < full.autoencoder_train.steps
    assert fast.pipeline.denoiser == full.pipeline.denoiser


def test_fast_config_shrinks_the_video_recipe_and_keeps_it_latent() -> None:
    full = default_config("video")
    fast = fast_config(full)
    assert isinstance(full, VideoDemoConfig) and isinstance(fast, VideoDemoConfig)
    assert fast.autoencoder_train.steps < full.autoencoder_train.steps
    assert fast.train.steps < full.train.steps and fast.num_videos < full.num_videos
    assert full.pipeline.encoder is not None
    assert fast.pipeline.encoder == full.pipeline.encoder
    assert fast.pipeline.denoiser == full.pipeline.denoiser


def test_a_prompt_template_with_an_unknown_placeholder_is_refused_before_training() -> None:
    image, video = default_config("image").to_dict(), default_config("video").to_dict()
    with pytest.raises(ValueError, match=r"prompt_template .*'nam'.*\{name\}, \{digit\}"):
        ImageDemoConfig.model_validate({**image, "prompt_template": "a digit {nam}"})
    with pytest.raises(ValueError, match=r"\{direction\}"):
        VideoDemoConfig.model_validate({**video, "prompt_template": "the digit {digit} {way}"})
    ImageDemoConfig.model_validate({**image, "prompt_template": "digit {digit}, {name}"})


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("output_dir", "runs/denoiser", "its own output folder"),
        ("resume", True, "cannot resume"),
        ("checkpoint_every", 100, "no training checkpoints"),
        ("sample_every", 100, "samples once, after training"),
        ("tensorboard", True, "no training logs"),
    ],
)
def test_train_fields_the_demo_owns_are_refused_not_overridden(
    field: str, value: object, why: str
) -> None:
    for task in ("image", "video"):
        data = default_config(task).to_dict()
        train = {**data["train"], field: value}
        with pytest.raises(ValueError, match=rf"train\.{field} is .*{why}"):
            parse_demo_config({**data, "train": train})


def test_train_seed_is_the_demos_seed() -> None:
    data = default_config("image").to_dict()
    assert data["train"]["seed"] == data["seed"] == 0
    with pytest.raises(ValueError, match=r"train\.seed \(5\) differs from seed \(0\)"):
        parse_demo_config({**data, "train": {**data["train"], "seed": 5}})
    # left out (as configs/*.yaml do), train.seed follows seed; so do --seed and fast_config
    train = {k: v for k, v in data["train"].items() if k != "seed"}
    config = parse_demo_config({**data, "seed": 7, "train": train})
    assert config.train.seed == 7 and fast_config(config).train.seed == 7
    assert "seed" not in yaml.safe_load((CONFIGS / "demo_image.yaml").read_text())["train"]


def test_omitted_train_fields_take_the_demo_values_and_device_is_the_recipes() -> None:
    data = default_config("image").to_dict()
    bare = {"steps": 5, "batch_size": 8}
    config = parse_demo_config({**data, "seed": 3, "train": bare})
    train = config.train
    assert (train.seed, train.resume, train.tensorboard, train.device) == (3, False, False, "cpu")
    assert train.output_dir is None and train.checkpoint_every is None
    # a TrainConfig object: the fields it did not set are filled the same way
    built = ImageDemoConfig.model_validate(
        {**data, "train": TrainConfig(steps=5, batch_size=8, device="cuda:1")}
    )
    assert (built.train.resume, built.train.tensorboard, built.train.device) == (
        False,
        False,
        "cuda:1",
    )
    for device in (None, "cuda", "mps", "cpu"):
        chosen = parse_demo_config({**data, "train": {**bare, "device": device}})
        assert chosen.train.device == device
    with pytest.raises(ValueError, match=r"train\.device 'gpu' is not a torch device"):
        parse_demo_config({**data, "train": {**bare, "device": "gpu"}})


def test_the_denoiser_trains_as_the_recipe_says(monkeypatch: pytest.MonkeyPatch) -> None:
    import diffkit_demo.recipes.stages as stages
    from diffkit.text import CLIPTextConditioner

    seen: list[TrainConfig] = []

    class Stop(Exception):
        pass

    def fake_train(*args: object, **kwargs: object) -> None:
        seen.append(args[3])  # type: ignore[arg-type]
        raise Stop

    monkeypatch.setattr(stages, "train", fake_train)
    base = default_config("image")
    data = base.to_dict()
    data["train"].pop("seed")  # (so that it follows seed)
    text = CLIPTextConditioner.from_config(base.pipeline.text)  # type: ignore[arg-type]
    x, labels, captions = torch.zeros(4, 2, 8, 8), torch.zeros(4, dtype=torch.long), ["a"] * 4
    for recipe, run_progress, progress in [
        ({"device": None, "progress": False}, True, False),
        ({"device": "cpu", "progress": True}, True, True),
        ({"device": "cpu", "progress": True}, False, False),
    ]:
        config = parse_demo_config({**data, "seed": 4, "train": {**data["train"], **recipe}})
        reporter = stages.Reporter(stages.DemoResult("image", Path(".")), run_progress, None)
        with pytest.raises(Stop):
            stages.train_denoiser(config, base.pipeline, x, labels, captions, text, reporter)
        used = seen.pop()
        assert used.device == recipe["device"] and used.progress is progress
        assert used.seed == 4 and used.output_dir is None and not used.resume


def test_training_device_is_checked_before_any_stage(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from diffkit_demo.recipes import run_demo, training_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = default_config("image").to_dict()
    assert training_device(default_config("image")) == torch.device("cpu")
    gpu = parse_demo_config({**data, "train": {**data["train"], "device": "cuda"}})
    with pytest.raises(ValueError, match=r"train\.device is 'cuda', but CUDA is not available"):
        run_demo(gpu, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    half = parse_demo_config({**data, "train": {**data["train"], "precision": "fp16"}})
    with pytest.raises(ValueError, match="fp16' needs a CUDA device"):
        training_device(half)
    assert training_device(
        parse_demo_config({**data, "train": {**data["train"], "device": None}})
    ) == torch.device("cpu")


def _space_time_recipe(**top: Any) -> VideoDemoConfig:
    """The video recipe with a small space-time U-Net as its denoiser."""
    data = default_config("video").to_dict()
    data["pipeline"]["denoiser"] = {
        "kind": "unet",
        "in_channels": 2,
        "base_channels": 16,
        "channel_mult": (1, 2),
        "blocks_per_level": 1,
        "attention_resolutions": (2,),
        "attention_head_dim": 16,
        "context_dim": 64,
        "pooled_dim": 64,
        "norm_groups": 8,
        "temporal": {"conv": False, "input_heads": None, "positions": "rotary"},
    }
    return VideoDemoConfig.model_validate({**data, **top})


def test_joint_images_add_stacks_of_frames_from_clips_with_the_same_caption() -> None:
    config = _space_time_recipe(joint_images=0.25)
    x = torch.arange(12 * 8, dtype=torch.float32).view(12, 8, 1, 1, 1)  # frame ids
    labels = torch.arange(12) % 3
    captions = [f"the digit {int(d)} moving left" for d in labels]
    data, all_labels, all_captions, temporal = _with_image_stacks(config, x, labels, captions)
    assert temporal is not None and temporal.tolist() == [True] * 12 + [False] * 4
    assert torch.equal(data[:12], x) and all_captions[:12] == captions
    for stack, label, caption in zip(data[12:], all_labels[12:], all_captions[12:], strict=True):
        clips = (stack.flatten() // 8).long()  # the clip each frame came from
        assert all(captions[int(c)] == caption for c in clips)
        assert (labels[clips] == label).all()
    assert len({tuple(s.flatten().tolist()) for s in data[12:]}) == 4
    unchanged = _with_image_stacks(_space_time_recipe(), x, labels, captions)
    assert unchanged[0] is x and unchanged[3] is None


def test_joint_images_need_a_space_time_unet() -> None:
    data = default_config("video").to_dict()  # the video transformer
    with pytest.raises(ValueError, match="joint_images"):
        VideoDemoConfig.model_validate({**data, "joint_images": 0.2})
