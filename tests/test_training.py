"""The training loop: it learns, resumes exactly, logs, checkpoints, and validates its config."""

import io
import itertools
import json
import math
import os
import statistics
import sys
import types
import warnings
from typing import ClassVar

import pytest
import torch
import yaml
from einops import rearrange
from torch import nn

from diffkit import training
from diffkit.checkpoint import latest_checkpoint, list_checkpoints, load_tensors
from diffkit.config import ValidationError
from diffkit.losses import DiffusionLoss
from diffkit.protocols import Conditioning
from diffkit.schedules import Cosine
from diffkit.training import TrainConfig, _reporting, learning_rate, step_generator, train
from diffkit_demo.datasets import DigitsDataset


class TinyDenoiser(nn.Module):
    """An MLP epsilon-predictor for 8x8 digits, label-conditioned (label 10 = no label)."""

    prediction = "epsilon"

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.label = nn.Embedding(11, 8)
        self.net = nn.Sequential(
            nn.Linear(64 + 1 + 8, width), nn.SiLU(), nn.Dropout(0.1), nn.Linear(width, 64)
        )

    def forward(self, x, t, cond=None):
        labels = torch.full((x.shape[0],), 10, device=x.device)
        if cond is not None and cond.labels is not None:
            labels = cond.labels
        h = torch.cat([rearrange(x, "b c h w -> b (c h w)"), t[:, None], self.label(labels)], 1)
        return rearrange(self.net(h), "b (c h w) -> b c h w", c=1, h=8)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models run fastest on one thread, and the CI machine's cores are shared.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    return DigitsDataset(8)


def _labels(batch):
    return Conditioning(labels=batch.labels)


NULL = Conditioning(labels=torch.tensor([10]))


def _config(tmp_path=None, **overrides):
    base = dict(
        steps=6,
        batch_size=8,
        micro_batch_size=4,
        lr=3e-3,
        lr_schedule="cosine",
        warmup_steps=2,
        grad_clip=0.5,
        ema_decay=0.9,
        loss=DiffusionLoss(cond_dropout=0.3, weighting="min_snr"),
        progress=False,
        output_dir=None if tmp_path is None else str(tmp_path),
    )
    base.update(overrides)
    return TrainConfig(**base)


def _fresh(seed: int) -> TinyDenoiser:
    torch.manual_seed(seed)
    return TinyDenoiser()


def test_training_lowers_the_loss_on_digits(digits):
    config = TrainConfig(steps=120, batch_size=32, lr=3e-3, ema_decay=None, progress=False)
    result = train(_fresh(0), Cosine(), digits, config)
    assert len(result.losses) == 120
    assert statistics.mean(result.losses[-30:]) < 0.7 * statistics.mean(result.losses[:10])


class Interrupted(Exception):
    pass


def test_resume_after_interruption_gives_the_same_next_losses_exactly(tmp_path, digits):
    schedule = Cosine()
    full = train(
        _fresh(0), schedule, digits, _config(), condition=_labels, uncond=NULL
    )  # never interrupted, writes nothing
    assert len(full.losses) == 6

    calls = 0

    def dies_in_step_five(batch):
        nonlocal calls
        calls += 1
        if calls > 8:  # two micro-batches per step: the 9th call is in step 5
            raise Interrupted
        return _labels(batch)

    model = _fresh(0)
    with pytest.raises(Interrupted):
        train(
            model,
            schedule,
            digits,
            _config(tmp_path, checkpoint_every=3),
            condition=dies_in_step_five,
            uncond=NULL,
        )
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [3]

    torch.manual_seed(123)  # disturb the global RNG: the checkpoint must restore it
    resumed_model = _fresh(7)  # different initial weights: the checkpoint overrides them
    resumed = train(
        resumed_model,
        schedule,
        digits,
        _config(tmp_path, checkpoint_every=3),
        condition=_labels,
        uncond=NULL,
    )
    assert resumed.start_step == 3
    assert resumed.losses == full.losses[3:]  # bit-for-bit
    uninterrupted = _fresh(0)
    again = train(uninterrupted, schedule, digits, _config(), condition=_labels, uncond=NULL)
    assert again.losses == full.losses
    for a, b in zip(resumed_model.state_dict().values(), uninterrupted.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.ema is not None and again.ema is not None
    for a, b in zip(resumed.ema.state_dict().values(), again.ema.state_dict().values()):
        assert torch.equal(a, b)


class _RecordingSummaryWriter:
    """Stands in for TensorBoard's SummaryWriter: records how it was opened and what it got."""

    opened: ClassVar[list[dict]] = []

    def __init__(self, **kwargs):
        self.opened.append(kwargs)

    def add_scalar(self, tag, value, step):
        pass

    def close(self):
        pass


def test_a_resumed_run_logs_each_step_once_like_an_uninterrupted_run(tmp_path, digits, monkeypatch):
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = _RecordingSummaryWriter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    monkeypatch.setattr(_RecordingSummaryWriter, "opened", [])

    def steps_and_losses(folder):
        lines = (folder / "log.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, lines)]

    config = dict(checkpoint_every=3, log_every=1, tensorboard=True)
    whole = tmp_path / "whole"
    train(_fresh(0), Cosine(), digits, _config(whole, **config), condition=_labels, uncond=NULL)

    calls = 0

    def dies_in_step_six(batch):
        nonlocal calls
        calls += 1
        if calls > 10:  # two micro-batches per step: steps 1-5 are logged, the checkpoint is 3
            raise Interrupted
        return _labels(batch)

    cut = tmp_path / "cut"
    with pytest.raises(Interrupted):
        train(
            _fresh(0),
            Cosine(),
            digits,
            _config(cut, **config),
            condition=dies_in_step_six,
            uncond=NULL,
        )
    assert [s for s, _ in steps_and_losses(cut)] == [1, 2, 3, 4, 5]
    (cut / "log.jsonl").open("a").write('{"step": 6, "lo')  # a record cut short by the crash
    resumed = train(
        _fresh(7), Cosine(), digits, _config(cut, **config), condition=_labels, uncond=NULL
    )
    assert resumed.start_step == 3
    assert [s for s, _ in steps_and_losses(cut)] == [1, 2, 3, 4, 5, 6]
    assert steps_and_losses(cut) == steps_and_losses(whole)  # the same losses, bit for bit
    assert not [p for p in cut.iterdir() if p.name.endswith(".tmp")]
    # TensorBoard drops its own events past the checkpoint: the resumed run logs from step 4.
    assert [w["purge_step"] for w in _RecordingSummaryWriter.opened] == [1, 1, 4]


def test_resume_applies_changed_adamw_settings_and_names_them(tmp_path, digits, monkeypatch):
    config = _config(tmp_path, steps=2, checkpoint_every=2, ema_decay=None)
    train(_fresh(0), Cosine(), digits, config, condition=_labels, uncond=NULL)
    seen: list[tuple[float, tuple[float, float], float]] = []
    step = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        seen.extend((g["weight_decay"], tuple(g["betas"]), g["eps"]) for g in self.param_groups)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    changed = config.model_copy(update={"steps": 4, "weight_decay": 0.5, "betas": (0.5, 0.9)})
    changed = changed.model_copy(update={"adam_eps": 1e-3})
    with pytest.warns(UserWarning, match="changed optimizer settings") as caught:
        train(_fresh(0), Cosine(), digits, changed, condition=_labels, uncond=NULL)
    message = str(caught[0].message)
    assert "weight_decay 0.0 -> 0.5" in message
    assert "betas (0.9, 0.999) -> (0.5, 0.9)" in message
    assert "adam_eps 1e-08 -> 0.001" in message
    assert seen and all(s == (0.5, (0.5, 0.9), 1e-3) for s in seen)
    # The same settings again: nothing to warn about.
    seen.clear()
    same = changed.model_copy(update={"steps": 6})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(_fresh(0), Cosine(), digits, same, condition=_labels, uncond=NULL)
    assert seen and all(s == (0.5, (0.5, 0.9), 1e-3) for s in seen)


def test_checkpoints_logs_and_sample_grids_are_written(tmp_path, digits):
    def sample(model, generator):
        return torch.randn(4, 1, 8, 8, generator=generator).clamp(-1, 1)

    config = _config(
        tmp_path, steps=5, checkpoint_every=2, keep_checkpoints=2, log_every=2, sample_every=2
    )
    result = train(
        _fresh(0), Cosine(), digits, config, condition=_labels, uncond=NULL, sample=sample
    )
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [4, 5]
    assert [p for _, p in list_checkpoints(tmp_path / "checkpoints")] == result.checkpoints
    tensors, meta = load_tensors(latest_checkpoint(tmp_path / "checkpoints"))
    assert any(k.startswith("ema.") for k in tensors)
    assert any(k.startswith("optimizer.") for k in tensors)
    assert "rng.torch" in tensors and tensors["rng.torch"].dtype == torch.uint8
    assert json.loads(meta["state"])["step"] == 5
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 5]
    assert {"loss", "lr", "grad_norm", "samples_per_s"} <= set(records[0])
    assert records[-1]["loss"] == pytest.approx(result.losses[-1])
    grids = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert grids == ["step-00000002.png", "step-00000004.png", "step-00000005.png"]
    # A finished run resumes to a no-op.
    done = train(_fresh(0), Cosine(), digits, config, condition=_labels, uncond=NULL, sample=sample)
    assert done.losses == [] and done.start_step == 5


def test_a_fresh_run_refuses_a_folder_with_an_earlier_runs_checkpoints(tmp_path, digits):
    config = _config(tmp_path, steps=4, checkpoint_every=2, keep_checkpoints=2)
    train(_fresh(0), Cosine(), digits, config, condition=_labels, uncond=NULL)
    before = {p.name: p.read_bytes() for _, p in list_checkpoints(tmp_path / "checkpoints")}
    assert sorted(before) == ["checkpoint-00000002.safetensors", "checkpoint-00000004.safetensors"]
    calls = 0

    def counts(batch):
        nonlocal calls
        calls += 1
        return _labels(batch)

    fresh = config.model_copy(update={"steps": 2, "resume": False})
    with pytest.raises(FileExistsError, match="resume=True") as caught:
        train(_fresh(1), Cosine(), digits, fresh, condition=counts, uncond=NULL)
    assert str(tmp_path / "checkpoints") in str(caught.value)
    assert "steps 2, 4" in str(caught.value) and "another output_dir" in str(caught.value)
    assert calls == 0  # refused before any training
    after = {p.name: p.read_bytes() for _, p in list_checkpoints(tmp_path / "checkpoints")}
    assert after == before  # the earlier run is untouched
    # A fresh run into an empty folder is fine, and so is resume=True here.
    train(_fresh(1), Cosine(), digits, _config(tmp_path / "new", steps=1, resume=False))
    assert train(_fresh(1), Cosine(), digits, config).start_step == 4


def test_bf16_autocast_on_cpu_trains_with_finite_losses(digits):
    result = train(_fresh(0), Cosine(), digits, _config(precision="bf16", steps=3))
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_fp16_on_cpu_trains_with_a_grad_scaler_and_fp32_master_weights(digits):
    # CPU autocast computes in float16, and torch.amp.GradScaler("cpu") unscales there too
    model = _fresh(0)
    loss = training.DenoiserLoss(Cosine(), condition=_labels, uncond=NULL)
    state = training.prepare(model, loss, digits, _config(precision="fp16", device="cpu"))
    try:
        losses = [training.train_step(state, step).loss for step in range(3)]
    finally:
        training.finish(state)
    assert isinstance(state.scaler, torch.amp.GradScaler) and state.scaler.get_scale() > 1
    assert all(math.isfinite(value) for value in losses)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_a_custom_loss_function_is_used(digits):
    seen = []

    def loss(denoiser, schedule, x0, *, cond=None, uncond=None, generator=None):
        seen.append(x0.shape[0])
        return DiffusionLoss()(denoiser, schedule, x0, generator=generator)

    train(_fresh(0), Cosine(), digits, _config(steps=2), loss=loss)
    assert seen == [4, 4, 4, 4]


def test_each_shard_of_each_step_gets_its_own_reproducible_generator():
    draws = {
        (s, k): torch.rand(3, generator=step_generator(0, s, k)) for s in range(3) for k in range(3)
    }
    values = [tuple(v.tolist()) for v in draws.values()]
    assert len(set(values)) == len(values)
    assert torch.equal(torch.rand(3, generator=step_generator(0, 2, 1)), draws[(2, 1)])


def test_learning_rate_warms_up_then_decays_to_min_lr():
    config = TrainConfig(steps=10, lr=1.0, warmup_steps=2, lr_schedule="cosine", min_lr=0.1)
    lrs = [learning_rate(config, s) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0]
    assert all(a >= b for a, b in itertools.pairwise(lrs[2:]))
    assert lrs[-1] == pytest.approx(
        0.1 + 0.45 * (1 + torch.cos(torch.tensor(torch.pi * 7 / 8)).item())
    )


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"batch_size": 10, "micro_batch_size": 4}, "micro_batch_size"),
        ({"lr": 0}, "lr"),
        ({"betas": (0.9, 1.5)}, "betas"),
        ({"precision": "fp8"}, "precision"),
        ({"steps": 0}, "steps"),
        ({"unknown": 1}, "unknown"),
        ({"loss": {"cond_dropout": 1.5}}, "cond_dropout"),
    ],
)
def test_invalid_train_configs_name_the_field(fields, name):
    with pytest.raises(ValidationError, match=name):
        TrainConfig(**fields)


def test_train_config_round_trips_through_json_and_yaml():
    config = _config(output_dir="runs/x", sample_every=5)
    assert TrainConfig.model_validate_json(config.to_json()) == config
    assert TrainConfig.model_validate(yaml.safe_load(yaml.safe_dump(config.to_dict()))) == config


def test_dataset_smaller_than_a_batch_is_refused(digits):
    small = torch.utils.data.Subset(digits, range(6))
    with pytest.raises(ValueError, match="smaller than one global batch"):
        train(_fresh(0), Cosine(), small, _config())


def test_a_prediction_that_contradicts_the_denoisers_own_is_refused(digits):
    config = _config(steps=1, loss=DiffusionLoss())
    with pytest.raises(ValueError, match=r"prediction='v' conflicts .* own prediction 'epsilon'"):
        train(_fresh(0), Cosine(), digits, config, prediction="v")
    # Agreeing is fine, and so is naming the prediction of a module that has none.
    assert len(train(_fresh(0), Cosine(), digits, config, prediction="epsilon").losses) == 1
    bare = _fresh(0)
    bare.prediction = None  # type: ignore[assignment]
    assert len(train(bare, Cosine(), digits, config, prediction="v").losses) == 1


RUN_YAML = """
pipeline:
  data_shape: [1, 8, 8]
  schedule: {kind: cosine}
  denoiser:
    kind: unet
    in_channels: 1
    base_channels: 8
    channel_mult: [1, 2]
    attention_resolutions: [2]
    attention_head_dim: 8
    norm_groups: 4
    blocks_per_level: 1
    context_dim: 16
  text:
    kind: clip_text
    tokenizer: byte
    text:
      {kind: clip_text_tower, vocab_size: 260, context_length: 8, width: 16, layers: 1, heads: 2}
  sampler: {kind: ddim}
data: {kind: digits, size: 8}
train:
  steps: 3
  batch_size: 8
  lr: 0.001
  sample_every: 2
  log_every: 1
  progress: false
  loss: {cond_dropout: 0.2}
sample_prompts: [a handwritten 3, the number 7]
"""


def test_command_line_run_trains_a_text_pipeline_and_saves_it(tmp_path):
    from diffkit.pipeline import Pipeline
    from diffkit.training import main

    config = tmp_path / "run.yaml"
    config.write_text(RUN_YAML)
    assert main([str(config), "--output-dir", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    assert len((out / "log.jsonl").read_text().splitlines()) == 3
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "step-00000002.png",
        "step-00000003.png",
    ]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-00000003.safetensors"]
    pipeline = Pipeline.load(out / "pipeline")
    images = pipeline.generate(["a 5"], steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 1, 8, 8)
    # resuming the finished run from the command line is a no-op that still saves
    assert main([str(config), "--output-dir", str(out)]) == 0


def test_train_pipeline_on_labels_in_a_latent_space(digits):
    from diffkit.builder import PipelineConfig, build
    from diffkit.training import train_pipeline

    pipeline = build(
        PipelineConfig(
            data_shape=(1, 8, 8),
            schedule={"kind": "cosine"},
            denoiser={
                "kind": "dit",
                "in_channels": 2,
                "patch_size": 2,
                "dim": 16,
                "depth": 1,
                "num_heads": 2,
                "freq_dim": 16,
                "num_classes": 11,
            },
            encoder={
                "kind": "kl_autoencoder",
                "in_channels": 1,
                "base_channels": 8,
                "channel_mult": [1, 2],
                "blocks_per_level": 1,
                "latent_channels": 2,
                "norm_groups": 4,
                "mid_attention": False,
            },
        )
    )
    encoder_before = {k: v.clone() for k, v in pipeline.encoder.state_dict().items()}
    config = _config(steps=3)
    result = train_pipeline(pipeline, digits, config, condition="labels", null_label=10)
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    for k, v in pipeline.encoder.state_dict().items():  # the encoder stays frozen
        assert torch.equal(v, encoder_before[k])
    with pytest.raises(ValueError, match="needs null_label"):
        train_pipeline(pipeline, digits, config, condition="labels")
    with pytest.raises(ValueError, match="data_shape"):
        train_pipeline(pipeline, DigitsDataset(16), config, condition="labels", null_label=10)


def test_training_gives_the_denoiser_back_in_the_mode_it_came_in(digits):
    """A pipeline trained in-process samples deterministically afterwards (dropout off)."""
    from diffkit.builder import PipelineConfig, build
    from diffkit.training import train_pipeline

    pipeline = build(
        PipelineConfig(
            data_shape=(1, 8, 8),
            schedule={"kind": "cosine"},
            denoiser={
                "kind": "unet",
                "in_channels": 1,
                "base_channels": 8,
                "channel_mult": [1],
                "attention_resolutions": [],
                "norm_groups": 4,
                "attention_head_dim": 8,
                "dropout": 0.3,
            },
            steps=3,
        )
    )
    assert not pipeline.denoiser.training  # build gives eval mode
    train_pipeline(pipeline, digits, _config(steps=2), condition="none")
    assert not pipeline.denoiser.training
    draws = [
        pipeline.generate(num_samples=2, generator=torch.Generator().manual_seed(0))
        for _ in range(2)
    ]
    assert torch.equal(draws[0], draws[1])
    pipeline.denoiser.train()
    train_pipeline(pipeline, digits, _config(steps=1), condition="none")
    assert pipeline.denoiser.training  # and a module in train mode stays so


def test_run_config_round_trips_through_yaml_and_names_bad_fields():
    from diffkit.training import TrainRunConfig

    run = TrainRunConfig.model_validate(yaml.safe_load(RUN_YAML))
    again = TrainRunConfig.model_validate(yaml.safe_load(yaml.safe_dump(run.to_dict())))
    assert again == run
    assert TrainRunConfig.model_validate_json(run.to_json()) == run
    broken = yaml.safe_load(RUN_YAML)
    broken["data"]["size"] = 4
    with pytest.raises(ValidationError, match="size"):
        TrainRunConfig.model_validate(broken)
    broken = yaml.safe_load(RUN_YAML)
    broken["pipeline"]["denoiser"]["context_dim"] = 24
    with pytest.raises(ValidationError, match=r"denoiser\.context_dim is 24"):
        TrainRunConfig.model_validate(broken)


def test_dataloader_workers_feed_the_same_batches(digits):
    inline = train(_fresh(0), Cosine(), digits, _config(steps=3), condition=_labels, uncond=NULL)
    workers = train(
        _fresh(0),
        Cosine(),
        digits,
        _config(steps=3, num_workers=2),
        condition=_labels,
        uncond=NULL,
    )
    assert workers.losses == inline.losses


def test_sample_every_without_an_output_dir_is_refused_naming_both(digits) -> None:
    called = []

    def sample(model, generator):
        called.append(1)
        return torch.zeros(4, 1, 8, 8)

    config = _config(steps=2, sample_every=1)  # valid alone: a run file's output_dir may come later
    with pytest.raises(ValueError, match=r"sample_every \(1\) saves .* output_dir is None"):
        train(_fresh(0), Cosine(), digits, config, sample=sample)
    assert called == []


class _PidCaptions(torch.utils.data.Dataset):
    """Digits whose captions name the process that loaded them."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {**self.items[i], "caption": str(os.getpid())}


def test_dataloader_workers_start_once_and_resume_exactly(tmp_path, digits):
    data = _PidCaptions(torch.utils.data.Subset(digits, range(16)))  # 2 steps per epoch
    inline = train(_fresh(0), Cosine(), data, _config(), condition=_labels, uncond=NULL)
    loaders: set[str] = set()

    def labels_noting_loaders(batch):
        loaders.update(batch.captions)
        return _labels(batch)

    config = _config(num_workers=2)
    workers = train(_fresh(0), Cosine(), data, config, condition=labels_noting_loaders, uncond=NULL)
    assert workers.losses == inline.losses
    # 6 steps are 3 epochs: the 2 workers start once, not once per epoch (6 processes).
    assert len(loaders) == 2 and str(os.getpid()) not in loaders

    calls = 0

    def dies_in_step_five(batch):
        nonlocal calls
        calls += 1
        if calls > 8:
            raise Interrupted
        return _labels(batch)

    config = _config(tmp_path, num_workers=2, checkpoint_every=3)  # resumes mid-epoch
    with pytest.raises(Interrupted):
        train(_fresh(0), Cosine(), data, config, condition=dies_in_step_five, uncond=NULL)
    resumed = train(_fresh(7), Cosine(), data, config, condition=_labels, uncond=NULL)
    assert resumed.start_step == 3 and resumed.losses == inline.losses[3:]


def test_train_config_refuses_settings_that_would_be_ignored() -> None:
    with pytest.raises(ValidationError, match="lr_schedule='constant' it would be ignored"):
        TrainConfig(steps=10, lr=1e-3, min_lr=1e-4)
    for decay in (0.0, 1.0):  # 1: only the warm-up formula; 0: a plain copy
        with pytest.raises(ValidationError, match="ema_decay"):
            TrainConfig(steps=10, ema_decay=decay)
    TrainConfig(steps=10, lr=1e-3, min_lr=1e-4, lr_schedule="cosine")


class _Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_progress_off_a_terminal_writes_plain_lines_not_carriage_returns(
    digits, capsys, monkeypatch
):
    # capsys' stderr is no terminal, like a CI log or `2> log.txt`
    train(_fresh(0), Cosine(), digits, _config(steps=3, progress=True))
    assert "\r" not in capsys.readouterr().err  # < 30 s: nothing at all
    monkeypatch.setattr(_reporting, "_PROGRESS_LINE_EVERY_S", 0.0)
    train(_fresh(0), Cosine(), digits, _config(steps=3, progress=True))
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"train: {k}/3 steps" for k in (1, 2, 3)]
    assert "loss" in lines[-1] and "samples_s" in lines[-1]


def test_progress_on_a_terminal_is_a_live_bar_and_disabled_writes_nothing() -> None:
    terminal = _Terminal()
    with training.progress_bar(4, "stage", file=terminal) as bar:
        for _ in range(4):
            bar.update(1)
    assert "\r" in terminal.getvalue() and "stage" in terminal.getvalue()
    quiet = _Terminal()
    with training.progress_bar(4, "stage", enabled=False, file=quiet) as bar:
        bar.update(4)
    assert quiet.getvalue() == ""
    log = io.StringIO()
    lines = _reporting._ProgressLines(10, "stage", 0, log, interval=3600.0)
    lines.update(5)
    lines.close()
    assert log.getvalue() == ""  # fast: no line at all, not even on close


# --- the autoencoder and CLIP through the same loop --------------------------------------


def _tiny_autoencoder(seed: int = 0):
    from diffkit.nn.vae import KLAutoencoder, KLAutoencoderConfig

    torch.manual_seed(seed)
    return KLAutoencoder(
        KLAutoencoderConfig(
            in_channels=1,
            base_channels=8,
            channel_mult=(1, 2),
            blocks_per_level=1,
            latent_channels=2,
            norm_groups=4,
            mid_attention=False,
        )
    )


def _tiny_clip(seed: int = 0):
    from diffkit.nn.clip import CLIP, CLIPConfig, TextTowerConfig, VisionTowerConfig

    torch.manual_seed(seed)
    return CLIP(
        CLIPConfig(
            embed_dim=16,
            text=TextTowerConfig(vocab_size=260, context_length=40, width=16, layers=1, heads=2),
            vision=VisionTowerConfig(
                image_size=8, patch_size=4, channels=1, width=16, layers=1, heads=2
            ),
        )
    )


def _aux_config(tmp_path=None, **overrides):
    base = dict(
        steps=12,
        batch_size=16,
        micro_batch_size=8,
        lr=3e-3,
        lr_schedule="cosine",
        warmup_steps=2,
        ema_decay=None,
        progress=False,
        output_dir=None if tmp_path is None else str(tmp_path),
    )
    base.update(overrides)
    return TrainConfig(**base)


def _clip_loss():
    from diffkit.tokenizers import ByteTokenizer

    return training.CLIPLoss(ByteTokenizer(40))


def _falls(losses):
    return statistics.mean(losses[-3:]) < 0.9 * statistics.mean(losses[:3])


def test_train_lowers_a_kl_autoencoders_reconstruction_and_kl_loss(digits):
    ae = _tiny_autoencoder()
    result = train(ae, training.AutoencoderLoss(kl_weight=1e-3), digits, _aux_config())
    assert len(result.losses) == 12 and _falls(result.losses)


def test_train_lowers_clips_contrastive_loss_below_chance(digits):
    # 32 pairs with distinct captions (a caption shared by two images is no signal), two
    # micro-batches of 8 per step: chance is ln 8 per micro-batch
    first: dict[str, int] = {}
    for i in range(len(digits)):
        first.setdefault(digits[i]["caption"], i)
        if len(first) == 32:
            break
    pairs = torch.utils.data.Subset(digits, list(first.values()))
    config = _aux_config(steps=30, warmup_steps=0, lr_schedule="constant")
    result = train(_tiny_clip(), _clip_loss(), pairs, config)
    assert len(result.losses) == 30 and _falls(result.losses)
    assert statistics.mean(result.losses[-5:]) < 0.75 * math.log(8)


def test_the_clip_loss_equals_clips_own_loss_and_the_autoencoder_loss_the_demos_recipe(digits):
    from diffkit.data import collate
    from diffkit.tokenizers import ByteTokenizer

    batch = collate([digits[i] for i in range(6)])
    clip = _tiny_clip()
    ids = ByteTokenizer(40)(batch.captions or [])
    generator = torch.Generator()
    assert torch.allclose(_clip_loss()(clip, batch, generator), clip.loss(batch.x, ids))
    ae = _tiny_autoencoder()
    ours = training.AutoencoderLoss(kl_weight=0.1)(ae, batch, torch.Generator().manual_seed(3))
    recon, posterior = ae(batch.x, generator=torch.Generator().manual_seed(3))
    recipe = torch.nn.functional.mse_loss(recon, batch.x) + 0.1 * posterior.kl().mean() / (
        posterior.mean[0].numel()
    )
    assert torch.allclose(ours, recipe)


@pytest.mark.parametrize("kind", ["autoencoder", "clip"])
def test_autoencoder_and_clip_runs_resume_to_the_uninterrupted_losses(tmp_path, digits, kind):
    def run(folder, steps, **kw):
        model = _tiny_autoencoder() if kind == "autoencoder" else _tiny_clip()
        loss = training.AutoencoderLoss() if kind == "autoencoder" else _clip_loss()
        return train(model, loss, digits, _aux_config(folder, steps=steps, **kw)), model

    whole, whole_model = run(tmp_path / "whole", 6)
    run(tmp_path / "parts", 3, checkpoint_every=3)
    resumed, resumed_model = run(tmp_path / "parts", 6)
    assert resumed.start_step == 3
    assert resumed.losses == whole.losses[3:]
    for a, b in zip(whole_model.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(a, b)


def test_denoiser_options_with_a_loss_object_are_refused(digits):
    with pytest.raises(TypeError, match="condition= belong"):
        train(
            _tiny_autoencoder(),
            training.AutoencoderLoss(),
            digits,
            _aux_config(),
            condition=_labels,
        )


def test_a_denoiser_loss_object_trains_like_the_schedule_shorthand(digits):
    config = _config(steps=3)
    short = train(_fresh(0), Cosine(), digits, config, condition=_labels, uncond=NULL)
    loss = training.DenoiserLoss(Cosine(), loss=config.loss, condition=_labels, uncond=NULL)
    explicit = train(_fresh(0), loss, digits, config)
    assert explicit.losses == short.losses


def test_the_loop_runs_by_hand_prepare_step_after_step_finish(tmp_path, digits):
    config = _config(tmp_path, steps=2, log_every=1)
    loss = training.DenoiserLoss(
        Cosine(),
        loss=config.loss,
        condition=_labels,
        uncond=NULL,
        prediction="epsilon",
    )
    state = training.prepare(_fresh(0), loss, digits, config)
    try:
        first = training.train_step(state, 0)
        assert first.step == 1 and first.lr == training.learning_rate(config, 0)
        training.after_step(state, first)
        assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 1
        training.after_step(state, training.train_step(state, 1))  # the last step: a checkpoint
    finally:
        training.finish(state)
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [2]
    assert state.result().losses == [first.loss, state.losses[1]]


class _MixedVideos(torch.utils.data.Dataset):
    """Videos (3 frames, 1 channel, 8x8); item i is a clip when i is odd, else independent
    images stacked as frames (``temporal=False``), as in VDM's joint image-video training."""

    def __init__(self, size: int, images_only: bool = False) -> None:
        self.x = torch.randn(size, 3, 1, 8, 8, generator=torch.Generator().manual_seed(3))
        self.images_only = images_only

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, object]:
        return {"x": self.x[i], "temporal": bool(i % 2) and not self.images_only}


def _space_time_unet() -> nn.Module:
    from diffkit.nn import UNet, UNetConfig
    from diffkit.nn.unet import TemporalConfig

    config = UNetConfig(
        in_channels=1,
        base_channels=8,
        channel_mult=(1, 2),
        blocks_per_level=1,
        attention_resolutions=(1,),
        attention_head_dim=4,
        norm_groups=4,
        temporal=TemporalConfig(input_heads=2, dropout=0.0),
    )
    unet = UNet(config)
    with torch.no_grad():  # random everywhere: the zero-initialised temporal convs too
        g = torch.Generator().manual_seed(0)
        for p in unet.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return unet


@pytest.mark.parametrize("images_only", [False, True], ids=["mixed", "images-only"])
def test_a_mixed_image_video_batch_trains_one_step_through_the_loop(images_only):
    """One step of train() on a batch of clips and image stacks: the spatial weights move;
    the temporal weights move only when the batch has clips (images give them no gradient,
    and with weight_decay=0 AdamW leaves a zero-gradient weight exactly where it was)."""
    unet = _space_time_unet()
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    config = TrainConfig(steps=1, batch_size=4, lr=1e-2, progress=False, log_every=1)
    result = train(unet, Cosine(), _MixedVideos(4, images_only), config)
    assert len(result.losses) == 1 and math.isfinite(result.losses[0])
    moved = {n for n, p in unet.named_parameters() if not torch.equal(p.detach(), before[n])}
    temporal = {n for n in before if n.startswith("temporal_in") or ".temporal_" in n}
    assert temporal and (set(before) - temporal) <= moved  # every spatial weight trained
    assert (moved & temporal) == (set() if images_only else temporal)
