"""`diffkit` command line: user mistakes give one line on stderr and exit status 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from diffkit.builder import build
from diffkit.cli import main
from diffkit_demo.recipes import default_config


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("diffkit: error: ")
    assert "Traceback" not in captured.err
    return lines[0]


def _usage_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("diffkit: error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's pipeline with fresh (untrained) weights, saved: enough for the CLI's checks."""
    folder = tmp_path_factory.mktemp("run")
    build(default_config("image").pipeline).save(folder / "pipeline")
    return folder


def test_missing_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = _error(capsys, ["train", str(tmp_path / "nope.yaml")])
    assert "config file not found" in line


def test_config_that_is_not_yaml(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("kind: demo_image\nseed: [1, 2\n")
    assert "not valid YAML" in _error(capsys, ["train", str(path)])


def test_config_with_bad_field_names_the_field(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    text = (Path(__file__).resolve().parents[1] / "configs" / "demo_image.yaml").read_text()
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace("seed: 0", "seed: -3"))
    line = _error(capsys, ["train", str(path)])
    assert "bad config" in line and "seed" in line
    path.write_text(text.replace("  in_channels: 2\n", "  in_channels: 3\n", 1))
    line = _error(capsys, ["train", str(path)])
    assert "in_channels" in line


def test_misspelled_recipe_fields_suggest_the_field_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    text = (Path(__file__).resolve().parents[1] / "configs" / "demo_image.yaml").read_text()
    path = tmp_path / "typo.yaml"
    path.write_text(text.replace("\n  layers: 2\n", "\n  layer: 2\n", 1))
    line = _error(capsys, ["train", str(path)])
    assert line.endswith(
        "clip_vision.clip_vit.layer: unknown field 'layer' for VisionTowerConfig; "
        "did you mean 'layers'?"
    )
    path.write_text(text.replace("    base_channels: 32\n", "    base_channel: 32\n", 1))
    line = _error(capsys, ["train", str(path)])
    assert line.endswith(
        "pipeline.denoiser.base_channel: unknown field 'base_channel' for UNetConfig; "
        "did you mean 'base_channels'?"
    )


def test_config_of_unknown_kind(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "other.yaml"
    path.write_text("kind: demo_audio\n")
    assert "unknown demo kind" in _error(capsys, ["train", str(path)])
    path.write_text("- 1\n- 2\n")
    assert "mapping" in _error(capsys, ["train", str(path)])


def test_train_run_config_points_at_python_m_diffkit_training(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("kind: train_run\npipeline: {}\ndata: {kind: digits}\ntrain: {steps: 2}\n")
    line = _error(capsys, ["train", str(path)])
    assert f"python -m diffkit.training {path}" in line and "train_run" in line


def test_run_dir_missing_or_without_pipeline(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert "not found" in _error(capsys, ["info", str(tmp_path / "absent")])
    assert "no saved pipeline" in _error(capsys, ["sample", str(tmp_path), "--prompt", "a one"])


def test_corrupt_pipeline_weights(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    folder = tmp_path / "run" / "pipeline"
    build(default_config("image").pipeline).save(folder)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    assert "cannot load the pipeline" in _error(capsys, ["info", str(tmp_path / "run")])


def test_prompt_too_long(capsys: pytest.CaptureFixture[str], saved_pipeline: Path) -> None:
    line = _error(capsys, ["sample", str(saved_pipeline), "--prompt", "seven " * 20])
    assert "prompt too long" in line and "at most 40" in line


def test_sample_argument_mistakes(capsys: pytest.CaptureFixture[str], saved_pipeline: Path) -> None:
    run = str(saved_pipeline)
    assert "unknown sampler" in _error(capsys, ["sample", run, "--prompt", "a", "--sampler", "x"])
    assert "--steps" in _error(capsys, ["sample", run, "--prompt", "a", "--steps", "0"])
    assert "--prompt" in _error(capsys, ["sample", run])
    assert "empty --prompt" in _error(capsys, ["sample", run, "--prompt", " "])


def test_argparse_mistakes_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--task", "audio"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffkit: error:")
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2


def test_info_prints_the_component_graph(
    capsys: pytest.CaptureFixture[str], saved_pipeline: Path
) -> None:
    assert main(["info", str(saved_pipeline)]) == 0
    out = capsys.readouterr().out
    assert "denoiser" in out and "UNet" in out and "total" in out
    assert "(2, 8, 8)" in out and "(1, 16, 16)" in out


def test_module_entry_point_reports_errors_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "diffkit.cli", "train", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == f"diffkit: error: config file not found: {tmp_path}/missing.yaml"


def test_demo_task_that_contradicts_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    config = str(Path(__file__).resolve().parents[1] / "configs" / "demo_image.yaml")
    line = _error(capsys, ["demo", "--task", "video", "--config", config])
    assert "--task video" in line and "demo_image" in line


@pytest.mark.parametrize("command", [["demo"], ["train", "x.yaml"], ["sample", "run"]])
def test_threads_must_be_positive(capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    for value in ("0", "-1", "two"):
        line = _usage_error(capsys, [*command, "--threads", value])
        assert "--threads" in line and ">= 1" in line


@pytest.mark.parametrize("command", [["demo"], ["train", "x.yaml"], ["sample", "run"]])
def test_seed_must_be_in_range(capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    for value in ("-3", str(2**63), "99999999999999999999999", "x"):
        line = _usage_error(capsys, [*command, "--seed", value])
        assert "--seed" in line
    assert "2**63 - 1" in _usage_error(capsys, [*command, "--seed", str(2**63)])


def test_recipe_that_fast_cannot_shrink(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    text = (Path(__file__).resolve().parents[1] / "configs" / "demo_image.yaml").read_text()
    path = tmp_path / "micro.yaml"
    path.write_text(text.replace("micro_batch_size: null", "micro_batch_size: 32"))
    line = _error(capsys, ["train", str(path), "--fast", "--threads", "1", "--quiet"])
    assert "--fast" in line and "micro_batch_size (32)" in line


def test_recipe_seed_out_of_range(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    text = (Path(__file__).resolve().parents[1] / "configs" / "demo_image.yaml").read_text()
    path = tmp_path / "seed.yaml"
    path.write_text(text.replace("seed: 0", f"seed: {2**64}"))
    line = _error(capsys, ["train", str(path), "--threads", "1", "--quiet"])
    assert "seed" in line and "2**63" in line  # every config refuses ints beyond 64 bits


def test_sample_guidance_must_be_finite(
    capsys: pytest.CaptureFixture[str], saved_pipeline: Path
) -> None:
    run = [str(saved_pipeline), "--prompt", "a one", "--num", "1", "--steps", "1"]
    for value in ("nan", "inf", "-1"):
        line = _error(capsys, ["sample", *run, "--guidance", value, "--threads", "1"])
        assert "--guidance must be a finite number >= 0" in line


def test_sample_out_must_be_a_writable_image_path(
    capsys: pytest.CaptureFixture[str], saved_pipeline: Path, tmp_path: Path
) -> None:
    run = ["sample", str(saved_pipeline), "--prompt", "a one", "--num", "1", "--steps", "1"]
    run += ["--threads", "1"]
    for out in ("x.txt", "samples"):
        line = _error(capsys, [*run, "--out", str(tmp_path / out)])
        assert "unknown image extension" in line and ".png" in line
    assert not list(tmp_path.iterdir())
    (tmp_path / "file").write_text("")
    line = _error(capsys, [*run, "--out", str(tmp_path / "file" / "x.png")])
    assert "cannot create the folder" in line
    (tmp_path / "folder.png").mkdir()
    line = _error(capsys, [*run, "--out", str(tmp_path / "folder.png")])
    assert "cannot write" in line and "folder.png" in line


def test_recipe_out_that_is_a_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = str(Path(__file__).resolve().parents[1] / "configs" / "demo_image.yaml")
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        line = _error(capsys, ["train", config, "--out", str(out), "--threads", "1", "--quiet"])
        assert "cannot create the folder" in line and str(out) in line


def test_pipeline_config_that_is_not_an_object(
    capsys: pytest.CaptureFixture[str], saved_pipeline: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "pipeline"
    folder.mkdir()
    weights = (saved_pipeline / "pipeline" / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights)
    for text in ("1", "null", "[1]", '"pipeline"'):
        (folder / "config.json").write_text(text)
        assert "does not hold a JSON object" in _error(capsys, ["info", str(tmp_path)])
    (folder / "config.json").write_bytes(b"\xff\xfe\x00")
    assert "is not a text file" in _error(capsys, ["info", str(tmp_path)])
    (folder / "config.json").write_text("{")
    assert "is not valid JSON" in _error(capsys, ["info", str(tmp_path)])


def test_recipe_fields_the_demo_owns_are_refused_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    text = (Path(__file__).resolve().parents[1] / "configs" / "demo_image.yaml").read_text()
    path = tmp_path / "resume.yaml"
    for old, new, field in [
        ("resume: false", "resume: true", "train.resume"),
        ("output_dir: null", "output_dir: runs/x", "train.output_dir"),
        ("  precision: fp32\n", "  precision: fp32\n  seed: 5\n", "train.seed (5)"),
    ]:
        assert old in text
        path.write_text(text.replace(old, new))
        out = tmp_path / "run"
        line = _error(capsys, ["train", str(path), "--fast", "--out", str(out), "--quiet"])
        assert "bad config" in line and field in line
        assert not out.exists()


def test_recipe_device_without_cuda_is_refused_before_training(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    text = (Path(__file__).resolve().parents[1] / "configs" / "demo_image.yaml").read_text()
    path = tmp_path / "gpu.yaml"
    path.write_text(text.replace("device: cpu", "device: cuda"))
    out = tmp_path / "run"
    argv = ["train", str(path), "--fast", "--seed", "3", "--out", str(out), "--quiet"]
    line = _error(capsys, argv)
    assert "train.device is 'cuda', but CUDA is not available" in line
    assert not out.exists()


def test_python_dash_m_diffkit_runs_the_command_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "diffkit", "train", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == f"diffkit: error: config file not found: {tmp_path}/missing.yaml"


def test_sample_writes_into_run_dir_by_default_even_a_bare_pipeline_folder(
    saved_pipeline: Path,
) -> None:
    for run_dir in (saved_pipeline, saved_pipeline / "pipeline"):
        argv = ["sample", str(run_dir), "--prompt", "a one", "--num", "1", "--steps", "1"]
        assert main([*argv, "--threads", "1", "--quiet"]) == 0
        assert (run_dir / "sample.png").is_file() and (run_dir / "sample.npz").is_file()
        (run_dir / "sample.png").unlink()
        (run_dir / "sample.npz").unlink()
    assert not (saved_pipeline.parent / "sample.png").exists()


_PIXEL_UNET = {
    "kind": "unet",
    "in_channels": 1,
    "base_channels": 16,
    "channel_mult": [1, 2],
    "blocks_per_level": 1,
    "attention_resolutions": [],
    "norm_groups": 8,
    "prediction": "v",
}


@pytest.fixture(scope="module")
def small_pipelines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fresh tiny pipelines: ``uncond`` (no conditioning) and ``classes`` (10 labels)."""
    root = tmp_path_factory.mktemp("pipes")
    base = {"data_shape": [1, 16, 16], "schedule": {"kind": "cosine"}, "steps": 1}
    build({**base, "denoiser": _PIXEL_UNET}).save(root / "uncond")
    build({**base, "denoiser": {**_PIXEL_UNET, "num_classes": 10}}).save(root / "classes")
    rgb = {**base, "data_shape": [3, 16, 16], "denoiser": {**_PIXEL_UNET, "in_channels": 3}}
    build(rgb).save(root / "rgb")
    video = {"kind": "video_dit", "in_channels": 3, "patch_size": [2, 4, 4], "dim": 32}
    video |= {"depth": 1, "num_heads": 2}
    build({**base, "data_shape": [4, 3, 8, 8], "denoiser": video}).save(root / "rgb_video")
    return root


def test_sample_an_unconditional_pipeline_without_prompt(
    capsys: pytest.CaptureFixture[str], small_pipelines: Path
) -> None:
    import numpy as np

    run = small_pipelines / "uncond"
    assert main(["sample", str(run), "--num", "3", "--threads", "1", "--quiet"]) == 0
    data = np.load(run / "sample.npz")
    assert data["images"].shape == (3, 16, 16) and "prompts" not in data
    line = _error(capsys, ["sample", str(run), "--prompt", "a one"])
    assert "no text conditioner" in line and "--num" in line
    line = _error(capsys, ["sample", str(run), "--label", "1"])
    assert "not class-conditioned" in line and "--label" in line
    assert "unconditional" in _error(capsys, ["sample", str(run), "--guidance", "3"])


def test_sample_a_class_conditioned_pipeline_with_labels(
    capsys: pytest.CaptureFixture[str], small_pipelines: Path
) -> None:
    import numpy as np

    run = str(small_pipelines / "classes")
    argv = ["sample", run, "--label", "3,4", "--label", "7", "--num", "2", "--threads", "1"]
    assert main([*argv, "--quiet"]) == 0
    data = np.load(small_pipelines / "classes" / "sample.npz")
    assert data["images"].shape == (6, 16, 16)
    assert data["labels"].tolist() == [3, 3, 4, 4, 7, 7]
    assert main([*argv, "--guidance", "2", "--null-label", "9", "--quiet"]) == 0
    assert "give --label" in _error(capsys, ["sample", run])
    assert "10 classes (0 to 9)" in _error(capsys, ["sample", run, "--label", "10"])
    assert "--null-label" in _error(capsys, ["sample", run, "--label", "1", "--guidance", "2"])
    assert "--label" in _error(capsys, ["sample", run, "--prompt", "a one"])
    for bad in ("x", "-1", "1,,2"):
        assert "--label" in _usage_error(capsys, ["sample", run, "--label", bad])


def test_a_text_pipeline_refuses_labels_and_still_needs_a_prompt(
    capsys: pytest.CaptureFixture[str], saved_pipeline: Path
) -> None:
    run = str(saved_pipeline)
    assert "not class-conditioned" in _error(capsys, ["sample", run, "--label", "1"])
    assert "give at least one --prompt" in _error(capsys, ["sample", run])
    line = _error(capsys, ["sample", run, "--prompt", "a one", "--label", "1"])
    assert "--prompt or --label" in line


def test_sample_keeps_the_channels_of_rgb_images_and_videos(small_pipelines: Path) -> None:
    import numpy as np
    from PIL import Image as PILImage

    run = small_pipelines / "rgb"
    assert main(["sample", str(run), "--num", "2", "--threads", "1", "--quiet"]) == 0
    images = np.load(run / "sample.npz")["images"]
    assert images.shape == (2, 3, 16, 16) and images.dtype == np.float32
    assert not np.array_equal(images[:, 0], images[:, 1])  # not one channel repeated
    run = small_pipelines / "rgb_video"
    assert main(["sample", str(run), "--num", "2", "--threads", "1", "--quiet"]) == 0
    assert np.load(run / "sample.npz")["images"].shape == (2, 4, 3, 8, 8)
    with PILImage.open(run / "sample-0.gif") as gif:
        assert getattr(gif, "n_frames", 1) == 4 and gif.size == (4 * 2 * (8 + 2), 4 * (8 + 2))


def test_save_gif_writes_rgb_clips_in_colour_and_refuses_other_channel_counts(
    tmp_path: Path,
) -> None:
    import torch
    from PIL import Image as PILImage

    from diffkit_demo.output import save_gif

    red = torch.full((1, 2, 3, 4, 4), -1.0)
    red[:, :, 0] = 1.0
    with PILImage.open(save_gif(red, tmp_path / "red.gif", scale=1)) as gif:
        assert gif.convert("RGB").getpixel((2, 2)) == (255, 0, 0)
        assert gif.convert("RGB").getpixel((0, 0)) == (128, 128, 128)  # the grey frame
    grey = torch.linspace(-1, 1, 3).view(1, 3, 1, 1, 1).expand(2, 3, 1, 4, 4)  # frames differ
    with PILImage.open(save_gif(grey, tmp_path / "grey.gif", scale=1)) as gif:
        assert getattr(gif, "n_frames", 1) == 3 and gif.size == (2 * 6, 6)
    for shape in [(1, 2, 2, 4, 4), (1, 2, 4, 4, 4), (2, 1, 4, 4)]:
        with pytest.raises(ValueError, match=r"1 \(grey\) or 3 \(RGB\) channels"):
            save_gif(torch.zeros(shape), tmp_path / "bad.gif")


def test_info_draws_only_the_conditioning_a_pipeline_has(
    capsys: pytest.CaptureFixture[str], small_pipelines: Path, saved_pipeline: Path
) -> None:
    assert main(["info", str(small_pipelines / "uncond")]) == 0
    out = capsys.readouterr().out
    assert "prompts" not in out and "cond ─┐" not in out and "noise (1, 16, 16)" in out
    assert main(["info", str(small_pipelines / "classes")]) == 0
    out = capsys.readouterr().out
    assert "labels (10 classes) ─▶ cond ─┐" in out and "prompts" not in out
    assert main(["info", str(saved_pipeline)]) == 0
    assert "prompts ─▶ text ─▶ cond ─┐" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "missing"),
    [
        (["demo", "--fast"], "diffkit_demo"),
        (["demo", "--fast"], "sklearn"),
        (["info", "RUN"], "rich"),
    ],
)
def test_a_command_missing_the_demo_extra_names_it(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    saved_pipeline: Path,
    argv: list[str],
    missing: str,
) -> None:
    import diffkit.cli

    def absent(*args: object, **kwargs: object) -> None:
        raise ModuleNotFoundError(f"No module named '{missing}'", name=missing)

    # the first lazy import each command makes: the demo's recipes, or rich's console
    target = "_console" if missing == "rich" else "_run_recipe"
    monkeypatch.setattr(diffkit.cli, target, absent)
    argv = [str(saved_pipeline) if a == "RUN" else a for a in argv]
    line = _error(capsys, argv)
    assert f"needs the module '{missing}'" in line and "pip install 'diffkit[demo]'" in line


def test_another_missing_module_is_not_blamed_on_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import diffkit.cli

    def absent(*args: object, **kwargs: object) -> None:
        raise ModuleNotFoundError("No module named 'torchvision'", name="torchvision")

    monkeypatch.setattr(diffkit.cli, "_run_recipe", absent)
    with pytest.raises(ModuleNotFoundError, match="torchvision"):
        main(["demo", "--fast"])


def test_the_cli_and_the_demo_agree_on_the_pipeline_folder() -> None:
    import diffkit.cli
    import diffkit_demo

    assert diffkit.cli.PIPELINE_DIR == diffkit_demo.PIPELINE_DIR


def test_the_help_runs_without_importing_the_demo() -> None:
    code = (
        "import sys\n"
        "from diffkit.cli import build_parser\n"
        "build_parser().format_help()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'diffkit_demo', 'rich', 'PIL', 'sklearn', 'yaml'}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
