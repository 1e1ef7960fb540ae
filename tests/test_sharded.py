"""Sharded checkpoints (torch.distributed.checkpoint): resume 2 -> 1 -> 2, kill -9, export."""

import json
import os
import pickle
import runpy
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from diffkit.checkpoint import CheckpointError
from torchrun import torchrun

WORKER = textwrap.dedent(
    '''
    """A tiny U-Net pipeline trained with sharded checkpoints; rank 0 records what it did."""
    import json
    import os
    import sys
    import time

    import torch
    from safetensors.torch import save_file

    from diffkit.builder import PipelineConfig, build
    from diffkit.losses import DiffusionLoss
    from diffkit.training import TrainConfig, distributed, init_distributed, train_pipeline
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from diffkit_demo.datasets import DigitsDataset


    def pipeline():
        torch.manual_seed(0)
        return build(
            PipelineConfig(
                data_shape=(1, 8, 8),
                schedule={"kind": "cosine"},
                denoiser={
                    "kind": "unet", "in_channels": 1, "base_channels": 8, "channel_mult": [1],
                    "attention_resolutions": [], "norm_groups": 4, "attention_head_dim": 8,
                },
                steps=3,
            )
        )


    def config(output_dir, steps, every=4, strategy="auto"):
        return TrainConfig(
            strategy=strategy,
            steps=steps,
            batch_size=8,
            micro_batch_size=2,  # 4 shards: 2 on each of 2 processes, or 4 accumulated in one
            lr=3e-3,
            grad_clip=0.5,
            ema_decay=0.9,
            loss=DiffusionLoss(weighting="min_snr"),
            output_dir=str(output_dir),
            checkpoint_every=every,
            checkpoint_format="sharded",
            progress=False,
            tensorboard=False,
        )


    def train(output_dir, steps, samples=None, every=4, strategy="auto"):
        torch.set_num_threads(1)
        info = init_distributed()
        run = config(output_dir, steps, every, strategy)
        result = train_pipeline(pipeline(), DigitsDataset(8), run)
        if samples is not None:  # what the trained (EMA) model draws, gathered whole
            whole = get_model_state_dict(
                result.ema.module, options=StateDictOptions(full_state_dict=True)
            )
            if info.is_main:
                drawer = pipeline()
                drawer.denoiser.load_state_dict(whole)
                drawn = drawer.generate(num_samples=2, generator=torch.Generator().manual_seed(3))
                save_file({"samples": drawn.contiguous()}, samples)
        return info, result


    def hang_at(point, step):
        """Stop (for the test's kill -9) when checkpoint ``step`` is at ``point``."""
        from diffkit.training import _sharded

        def hang(marker):
            open(marker, "w").close()
            time.sleep(120)

        if point == "publishing":  # shards written, manifest and rename not yet
            publish = _sharded._publish

            def stalled(tmp, target, manifest):
                if target.name.endswith(f"{step:08d}"):
                    hang(os.environ["MARKER"])
                publish(tmp, target, manifest)

            _sharded._publish = stalled
        else:  # "writing": the shard file half written
            import safetensors.torch

            save = safetensors.torch.save

            def half(tensors, metadata=None):
                data = save(tensors, metadata=metadata)
                if any(k.startswith("model.") for k in tensors) and step_now[0] == step:
                    hang(os.environ["MARKER"])  # the shard file is open, nothing written yet
                return data

            safetensors.torch.save = half


    step_now = [0]


    def two_processes(root, phase, strategy):
        if phase == "first":  # the uninterrupted run, and the first 2 steps
            _, whole = train(f"{root}/whole", 6, every=6, strategy=strategy)
            _, parts = train(f"{root}/parts", 2, every=2, strategy=strategy)
            return {"whole": whole.losses, "parts": parts.losses}
        # from the 1-process checkpoint of step 4 to step 6
        samples = f"{root}/samples.safetensors"
        _, parts = train(f"{root}/parts", 6, samples=samples, every=2, strategy=strategy)
        return {"start": parts.start_step, "parts": parts.losses}


    def main(root, phase):
        if phase in ("first", "last"):  # 2 processes, under DDP and under FSDP
            info, record = init_distributed(), {}
            for strategy in ("ddp", "fsdp"):
                record[strategy] = two_processes(f"{root}/{strategy}", phase, strategy)
        else:  # one process, killed -9 while writing checkpoint 4
            hang_at(phase, 4)
            from diffkit.training import _loop

            after = _loop.after_step

            def counting(state, result):
                step_now[0] = result.step
                after(state, result)

            _loop.after_step = counting
            info, _ = train(f"{root}/killed", 6, every=2)
            record = {}
        with open(f"{root}/{phase}-rank{info.rank}.json", "w") as fh:
            json.dump(record, fh)


    if __name__ == "__main__":
        with distributed():  # one process group for every run of the phase
            main(sys.argv[1], sys.argv[2])
    '''
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    path = tmp_path_factory.mktemp("worker") / "worker.py"
    path.write_text(WORKER)
    return runpy.run_path(str(path), run_name="worker") | {"path": path}


def test_checkpoints_of_2_processes_resume_on_1_then_2_with_the_uninterrupted_losses(
    tmp_path, worker
):
    """Under DDP and under FSDP: steps 1-2 on 2 processes, 3-4 on 1, 5-6 on 2 again."""
    from diffkit.pipeline import Pipeline
    from diffkit.training import export_pipeline
    from diffkit.training._sharded import sharded_checkpoint_damage

    torchrun(worker["path"], tmp_path, "first")
    first = json.loads((tmp_path / "first-rank0.json").read_text())
    middle = {}
    for strategy in ("ddp", "fsdp"):
        step2 = tmp_path / strategy / "parts/checkpoints/checkpoint-00000002"
        manifest = json.loads((step2 / "diffkit.json").read_text())
        assert manifest["world_size"] == 2 and manifest["extra"]["shards"] == [2, 4]
        assert len(manifest["files"]) == 2  # each process wrote its own file
        assert sorted(os.listdir(step2)) == ["diffkit.json", *sorted(manifest["files"])]
        with pytest.warns(UserWarning, match="RNG states of 2 process"):  # one plain process
            _, run = worker["train"](tmp_path / strategy / "parts", 4, every=2)
        assert run.start_step == 2
        middle[strategy] = run.losses
    torchrun(worker["path"], tmp_path, "last")
    last = json.loads((tmp_path / "last-rank0.json").read_text())

    for strategy in ("ddp", "fsdp"):
        assert last[strategy]["start"] == 4
        whole = first[strategy]["whole"]
        resumed = first[strategy]["parts"] + middle[strategy] + last[strategy]["parts"]
        assert len(resumed) == len(whole) == 6
        assert resumed[:2] == whole[:2]
        diffs = [abs(a - b) for a, b in zip(resumed, whole, strict=True)]
        print(f"{strategy} 2->1->2: max |loss - uninterrupted loss| = {max(diffs):.3g}")
        assert resumed == pytest.approx(whole, rel=1e-5, abs=1e-6)

        # The consolidated export draws exactly what the trained EMA model draws.
        root = tmp_path / strategy
        exported = export_pipeline(worker["pipeline"](), root / "parts", root / "exported")
        loaded = Pipeline.load(exported)
        drawn = loaded.generate(num_samples=2, generator=torch.Generator().manual_seed(3))
        assert torch.equal(drawn, load_file(root / "samples.safetensors")["samples"])

    # A folder that lacks one rank's file (written off a shared file system, say) is damaged.
    step2 = tmp_path / "broken/checkpoint-00000002"
    shutil.copytree(tmp_path / "fsdp/parts/checkpoints/checkpoint-00000002", step2)
    manifest = json.loads((step2 / "diffkit.json").read_text())
    rank0_file = min(manifest["files"])
    (step2 / rank0_file).unlink()
    del manifest["files"][rank0_file]
    (step2 / "diffkit.json").write_text(json.dumps(manifest))
    assert "pieces of these tensors are missing" in str(sharded_checkpoint_damage(step2))


@pytest.fixture(scope="module")
def uninterrupted(worker, tmp_path_factory):
    """The losses of 6 steps in this process, checkpoints every 2."""
    return worker["train"](tmp_path_factory.mktemp("whole"), 6, every=2)[1].losses


@pytest.mark.parametrize("point", ["writing", "publishing"])
def test_kill_9_while_writing_a_sharded_checkpoint_loses_nothing(
    tmp_path, worker, uninterrupted, point
):
    from diffkit.training import latest_sharded_checkpoint

    marker = tmp_path / "hanging"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MARKER": str(marker)}
    env.pop("WORLD_SIZE", None)
    process = subprocess.Popen(
        [sys.executable, str(worker["path"]), str(tmp_path), point],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert process.poll() is None, process.stderr.read().decode()[-3000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the worker never reached the checkpoint"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    folder = tmp_path / "killed/checkpoints"
    left = sorted(p.name for p in folder.iterdir())  # (a temporary name sorts first)
    assert left[1] == "checkpoint-00000002" and len(left) == 2
    assert left[0].startswith(".checkpoint-00000004.") and left[0].endswith(".tmp")
    assert any((folder / left[0]).iterdir())  # the killed writer's shard file
    assert latest_sharded_checkpoint(folder) == folder / "checkpoint-00000002"
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-00000002"]  # cleaned up

    _, resumed = worker["train"](tmp_path / "killed", 6, every=2)
    assert resumed.start_step == 2
    assert resumed.losses == uninterrupted[2:]  # one process, as before: bit for bit


def test_loading_a_sharded_checkpoint_unpickles_nothing(tmp_path, worker, monkeypatch):
    from diffkit.training import load_consolidated, load_sharded_checkpoint
    from diffkit.training._distributed import DistributedInfo

    worker["train"](tmp_path / "run", 4)
    step4 = tmp_path / "run/checkpoints/checkpoint-00000004"
    assert {p.suffix for p in step4.iterdir()} == {".json", ".safetensors"}

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    for module, name in [(pickle, "load"), (pickle, "loads"), (torch, "load")]:
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    model = worker["pipeline"]().denoiser
    optimizer = torch.optim.AdamW(model.parameters())
    state = load_sharded_checkpoint(
        step4,
        model=model,
        info=DistributedInfo(),
        device=torch.device("cpu"),
        seed=0,
        optimizer=optimizer,
    )
    assert state.step == 4 and state.world_size == 1
    weights = load_consolidated(step4, weights="model")
    for key, value in model.state_dict().items():
        assert torch.equal(weights[key], value)
    assert optimizer.state_dict()["state"][0]["step"].item() == 4.0


def test_damaged_or_mismatched_sharded_checkpoints_are_skipped_or_refused(tmp_path, worker):
    from diffkit.training import latest_sharded_checkpoint, load_sharded_checkpoint
    from diffkit.training._distributed import DistributedInfo

    worker["train"](tmp_path / "run", 8)
    folder = tmp_path / "run/checkpoints"
    step8 = folder / "checkpoint-00000008"
    shard = next(step8.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated
    with pytest.warns(UserWarning, match="checkpoint-00000008: its files"):
        assert latest_sharded_checkpoint(folder) == folder / "checkpoint-00000004"
    (folder / "checkpoint-00000004/diffkit.json").unlink()
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="none of the 2"):
        latest_sharded_checkpoint(folder)

    worker["train"](tmp_path / "other", 4)
    other = tmp_path / "other/checkpoints/checkpoint-00000004"
    model = torch.nn.Linear(3, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(CheckpointError, match=r"missing keys: model\.bias"):
        load_sharded_checkpoint(
            other,
            model=model,
            info=DistributedInfo(),
            device=torch.device("cpu"),
            seed=0,
            optimizer=optimizer,
        )
    assert not optimizer.state  # refused: nothing changed
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_run_refuses_to_mix_checkpoint_formats(tmp_path, worker):
    from diffkit.training import train_pipeline
    from diffkit_demo.datasets import DigitsDataset

    worker["train"](tmp_path / "run", 4)
    config = worker["config"](tmp_path / "run", 6).model_copy(
        update={"checkpoint_format": "safetensors"}
    )
    with pytest.raises(ValueError, match=r"checkpoint_format='safetensors'.*1 sharded"):
        train_pipeline(worker["pipeline"](), DigitsDataset(8), config)
    fresh = worker["config"](tmp_path / "run", 6).model_copy(update={"resume": False})
    with pytest.raises(FileExistsError, match="resume=False"):
        train_pipeline(worker["pipeline"](), DigitsDataset(8), fresh)


RUN_YAML = """
pipeline:
  data_shape: [1, 8, 8]
  schedule: {kind: cosine}
  denoiser:
    kind: unet
    in_channels: 1
    base_channels: 8
    channel_mult: [1]
    attention_resolutions: []
    norm_groups: 4
    attention_head_dim: 8
  steps: 2
data: {kind: digits, size: 8}
train:
  steps: 2
  batch_size: 8
  lr: 0.001
  progress: false
  tensorboard: false
  checkpoint_format: sharded
"""


def test_the_command_line_exports_a_sharded_run_as_one_pipeline(tmp_path):
    from diffkit.pipeline import Pipeline
    from diffkit.training import main

    config = tmp_path / "run.yaml"
    config.write_text(RUN_YAML)
    out = tmp_path / "out"
    assert main([str(config), "--output-dir", str(out)]) == 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-00000002"]
    saved = Pipeline.load(out / "pipeline")  # consolidated at the end of the run
    assert main(["export", str(config), "--output-dir", str(out), "--to", str(tmp_path / "x")]) == 0
    exported = Pipeline.load(tmp_path / "x")
    for (key, value), (_, again) in zip(
        saved.denoiser.state_dict().items(), exported.denoiser.state_dict().items(), strict=True
    ):
        assert torch.equal(value, again), key
    generator = torch.Generator().manual_seed(0)
    images = exported.generate(num_samples=1, generator=generator)
    assert images.shape == (1, 1, 8, 8)


def test_fsdp_writes_sharded_checkpoints_and_refuses_single_files_by_name():
    from diffkit.training import TrainConfig
    from diffkit.training._config import checkpoint_format

    assert checkpoint_format(TrainConfig(strategy="fsdp")) == "sharded"
    assert checkpoint_format(TrainConfig(strategy="ddp")) == "safetensors"
    assert checkpoint_format(TrainConfig(checkpoint_format="sharded")) == "sharded"
    with pytest.raises(ValueError, match="checkpoint_format='safetensors' with strategy='fsdp'"):
        TrainConfig(strategy="fsdp", checkpoint_format="safetensors")
