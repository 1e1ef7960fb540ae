"""Untrusted folders, checkpoints and configs (issue 22): confined, bounded, one-line errors."""

import gzip
import math
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from torch import nn

from diffkit import files
from diffkit.builder import registry
from diffkit.config import MAX_PARAMETERS, REGISTRIES, NetworkConfig
from diffkit.files import UnreadableFileError, confined, read_gzip
from diffkit.protocols import Conditioning
from diffkit.schedules import Cosine
from diffkit.tokenizers import CLIPTokenizer
from diffkit.typing import Prediction

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")


def _merges(path: Path) -> Path:
    """A valid CLIP merges file (49152 - 256 - 2 merges after a header), gzipped."""
    merges = [f"a{i} b{i}" for i in range(49152 - 256 - 2)]
    path.write_bytes(gzip.compress(("#version: 0.2\n" + "\n".join(merges)).encode()))
    return path


def _bomb(path: Path, inflated: int) -> Path:
    """``inflated`` zero bytes, gzipped (a gzip bomb when ``inflated`` is large)."""
    with gzip.open(path, "wb", compresslevel=9) as handle:
        block = bytes(2**20)
        for _ in range(inflated // len(block)):
            handle.write(block)
    return path


def _in_thread(fn: object, timeout: float = 20) -> BaseException | None:
    """Run ``fn`` in a daemon thread; fail if it hangs, else return what it raised."""
    raised: list[BaseException | None] = [None]

    def run() -> None:
        try:
            fn()  # type: ignore[operator]
        except BaseException as err:
            raised[0] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "hung"
    return raised[0]


# ------------------------------------------------------------------ reads (issue case 1)


def test_confined_refuses_absolute_dotdot_and_symlinks_leaving_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "pipe"
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "tokenizer" / "v.gz").write_bytes(b"x")
    (tmp_path / "secret").write_text("s")
    os.symlink(tmp_path / "secret", folder / "tokenizer" / "out.gz")
    os.symlink("v.gz", folder / "tokenizer" / "in.gz")
    assert confined(folder, "tokenizer/v.gz") == (folder / "tokenizer" / "v.gz").resolve()
    assert confined(folder, "tokenizer/in.gz").name == "v.gz"  # a link inside is fine
    for name, message in [
        ("/etc/passwd", "relative"),
        (str(tmp_path / "secret"), "relative"),
        ("../secret", r"\.\."),
        ("tokenizer/../../secret", r"\.\."),
        ("tokenizer/out.gz", "leaves the folder"),
        ("tokenizer/missing.gz", "no such file"),
        ("tokenizer", "a directory"),
        ("", "relative"),
    ]:
        with pytest.raises(UnreadableFileError, match=message):
            confined(folder, name)


@needs_fifo
def test_confined_refuses_a_fifo(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UnreadableFileError, match="FIFO"):
        confined(tmp_path, "fifo")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p, "cannot read .*No such file"),
        (lambda p: (p.mkdir(), p)[1], "a directory"),
        (lambda p: (p.write_bytes(b"not gzip at all"), p)[1], "not a gzip file"),
        (lambda p: (p.write_bytes(gzip.compress(b"x" * 1000)[:20]), p)[1], "truncated"),
        (lambda p: (p.write_bytes(gzip.compress(b"#v\nhello")), p)[1], "not a CLIP merges"),
        (lambda p: (p.write_bytes(gzip.compress(b"\xff\xfe\xfa")), p)[1], "not UTF-8"),
    ],
    ids=["missing", "directory", "not-gzip", "truncated", "bad-merges", "not-utf8"],
)
def test_tokenizer_file_errors_are_one_line_naming_the_file(
    tmp_path: Path, make: object, message: str
) -> None:
    path = make(tmp_path / "vocab.txt.gz")  # type: ignore[operator]
    with pytest.raises(UnreadableFileError, match=message) as info:
        CLIPTokenizer(path)
    assert isinstance(info.value, ValueError) and isinstance(info.value, OSError)
    assert "vocab.txt.gz" in str(info.value) and "\n" not in str(info.value)


def test_tokenizer_reads_a_valid_merges_file(tmp_path: Path) -> None:
    assert CLIPTokenizer(_merges(tmp_path / "v.gz")).vocab_size == 49408


@needs_fifo
def test_tokenizer_refuses_a_fifo_without_hanging(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.gz")
    err = _in_thread(lambda: CLIPTokenizer(tmp_path / "fifo.gz"))
    assert isinstance(err, UnreadableFileError) and "FIFO" in str(err)


def test_tokenizer_refuses_dev_stdin_and_dev_zero_without_hanging() -> None:
    for device in ("/dev/stdin", "/dev/zero"):
        if not os.path.exists(device):
            continue
        err = _in_thread(lambda device=device: CLIPTokenizer(device))
        assert isinstance(err, UnreadableFileError), err


def test_gzip_bomb_is_refused_in_bounded_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bomb = _bomb(tmp_path / "bomb.gz", 200 * 2**20)  # 200 MiB of zeros, ~200 KB on disk
    assert bomb.stat().st_size < 2**20
    monkeypatch.setattr(files, "MAX_READ_BYTES", 8 * 2**20)
    with pytest.raises(UnreadableFileError, match=r"bomb\.gz is larger than 8,388,608 bytes"):
        CLIPTokenizer(bomb)
    with pytest.raises(UnreadableFileError, match="larger than 1,000 bytes inflated"):
        read_gzip(bomb, limit=1000)
    assert len(read_gzip(_bomb(tmp_path / "small.gz", 2**20), limit=2**20)) == 2**20


# ------------------------------------------------------------------ the CLI


def _cli_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run ``diffkit argv``: exit status 2 and one ``diffkit: error:`` line, no traceback."""
    from diffkit.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured.err
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("diffkit: error: ") and "Traceback" not in captured.err
    return lines[0]


_TINY_UNET = {
    "kind": "unet",
    "in_channels": 1,
    "base_channels": 8,
    "channel_mult": [1],
    "attention_head_dim": 8,
    "blocks_per_level": 1,
    "attention_resolutions": [],
    "norm_groups": 4,
    "prediction": "v",
}


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh unconditional pixel-space pipeline, saved."""
    from diffkit.builder import build

    folder = tmp_path_factory.mktemp("tiny") / "pipe"
    base = {"data_shape": [1, 8, 8], "schedule": {"kind": "cosine"}, "steps": 1}
    build({**base, "denoiser": _TINY_UNET}).save(folder)
    return folder


def _copy(folder: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(folder, to)
    return to


@pytest.mark.parametrize("which", ["sample.png", "sample.npz"])
def test_sample_refuses_to_write_through_a_symlink(
    capsys: pytest.CaptureFixture[str], tiny_pipeline: Path, tmp_path: Path, which: str
) -> None:
    run = _copy(tiny_pipeline, tmp_path / "run")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.symlink(victim, run / which)
    argv = ["sample", str(run), "--num", "1", "--threads", "1", "--quiet"]
    line = _cli_error(capsys, argv)
    assert "symbolic link" in line and which in line
    assert victim.read_bytes() == b"precious"
    assert (run / which).is_symlink()
    assert not [p.name for p in run.iterdir() if p.name.startswith(".sample")]


def test_sample_refuses_a_directory_in_the_way(
    capsys: pytest.CaptureFixture[str], tiny_pipeline: Path, tmp_path: Path
) -> None:
    run = _copy(tiny_pipeline, tmp_path / "run")
    (run / "sample.npz").mkdir()
    line = _cli_error(capsys, ["sample", str(run), "--num", "1", "--threads", "1", "--quiet"])
    assert "not a regular file" in line


def test_sample_writes_atomically_in_the_output_folder(tiny_pipeline: Path, tmp_path: Path) -> None:
    from diffkit.cli import main

    run = _copy(tiny_pipeline, tmp_path / "run")
    (run / "sample.png").write_bytes(b"old")  # a regular file is replaced, not written into
    hard = tmp_path / "hardlink.png"
    os.link(run / "sample.png", hard)
    assert main(["sample", str(run), "--num", "1", "--threads", "1", "--quiet"]) == 0
    assert (run / "sample.png").read_bytes()[:4] == b"\x89PNG"
    assert hard.read_bytes() == b"old"  # a new inode: the old file's other names keep it
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


def _edit(folder: Path, edit: object = None, tensors_edit: object = None) -> Path:
    """Rewrite ``config.json`` (``edit(data)``) and the weights (``tensors_edit(tensors)``),
    the weights' record of the config kept in step (as a whole save would leave them)."""
    import json

    from diffkit.checkpoint import load_tensors, save_tensors
    from diffkit.pipeline import CONFIG_FILE, CONFIG_KEY, WEIGHTS_FILE

    data = json.loads((folder / CONFIG_FILE).read_text())
    if edit is not None:
        edit(data)  # type: ignore[operator]
    text = json.dumps(data)
    (folder / CONFIG_FILE).write_text(text)
    tensors, metadata = load_tensors(folder / WEIGHTS_FILE)
    if tensors_edit is not None:
        tensors_edit(tensors)  # type: ignore[operator]
    save_tensors(folder / WEIGHTS_FILE, tensors, {**metadata, CONFIG_KEY: text})
    return folder


@pytest.fixture(scope="module")
def text_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh pipeline with a CLIP-BPE text conditioner over a (made-up) merges file, saved."""
    from diffkit.builder import build

    root = tmp_path_factory.mktemp("text")
    vocab = _merges(root / "merges.txt.gz")
    tower = {"vocab_size": 49408, "context_length": 8, "width": 8, "layers": 1, "heads": 1}
    text = {"kind": "clip_text", "text": tower, "vocab_path": str(vocab)}
    config = {
        "data_shape": [1, 8, 8],
        "schedule": {"kind": "cosine"},
        "steps": 1,
        "denoiser": {**_TINY_UNET, "context_dim": 8},
        "text": text,
    }
    build(config).save(root / "pipe")
    return root / "pipe"


def _vocab(folder: Path) -> Path:
    return next((folder / "tokenizer").iterdir())


def _replace_vocab(data: bytes | None) -> object:
    def change(folder: Path) -> None:
        path = _vocab(folder)
        path.unlink()
        if data is None:
            path.mkdir()
        else:
            path.write_bytes(data)

    return change


def _deep_json(folder: Path) -> None:
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)


def _nan_weights(folder: Path) -> None:
    def poison(tensors: dict[str, object]) -> None:
        import torch

        for name, value in tensors.items():
            if name.startswith("denoiser.") and isinstance(value, torch.Tensor):
                value.fill_(float("nan"))

    _edit(folder, tensors_edit=poison)


def _schedule(**fields: object) -> object:
    return lambda folder: _edit(folder, lambda d: (d["schedule"].update(fields), d.update(steps=4)))


def _denoiser(**fields: object) -> object:
    return lambda folder: _edit(folder, lambda d: d["denoiser"].update(fields))


def _data_shape(shape: list[int]) -> object:
    return lambda folder: _edit(folder, lambda d: d.update(data_shape=shape))


def _relabel(dtype: str, name: str = "denoiser.conv_out.weight") -> object:
    """One weight stored in another dtype (the rest of its module as saved)."""

    def relabel(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = tensors[name].to(getattr(torch, dtype))

    return lambda folder: _edit(folder, tensors_edit=relabel)


_TRUNCATED = gzip.compress(bytes(range(256)) * 64)[:100]
_CASES = {
    # tokenizer files (the pipeline's tokenizer/ folder)
    "vocab-missing": ("text", lambda f: _vocab(f).unlink(), "merges.txt.gz"),
    "vocab-not-gzip": ("text", _replace_vocab(b"plain text"), "not a gzip file"),
    "vocab-truncated": (
        "text",
        _replace_vocab(_TRUNCATED),
        "truncated",
    ),
    "vocab-directory": ("text", _replace_vocab(None), "directory"),
    "vocab-bad-merges": ("text", _replace_vocab(gzip.compress(b"#v\na b")), "not a CLIP merges"),
    "vocab-gzip-bomb": ("text", lambda f: _bomb(_vocab(f), 65 * 2**20), "bytes inflated"),
    # configs
    "json-100000-deep": ("tiny", _deep_json, "config.json"),
    "schedule-min-log-snr": ("tiny", _schedule(min_log_snr=50.0), "log-SNR"),
    "schedule-offset": ("tiny", _schedule(offset=2.0), "schedule.offset"),
    "unknown-kind": ("tiny", _schedule(kind="nope"), "nope"),
    # sizes (case 3)
    "base-channels-1e6": ("tiny", _denoiser(base_channels=10**6), "MAX_PARAMETERS"),
    "base-channels-1e400": ("tiny", _denoiser(base_channels=10**400), "base_channels"),
    "data-shape-65536": ("tiny", _data_shape([1, 65536, 65536]), "data_shape"),
    # weights (cases 4 and 6)
    "nan-weights": ("tiny", _nan_weights, "NaN or inf"),
    "weights-int32": ("tiny", _relabel("int32"), "denoiser.conv_out.weight"),
    "weights-complex": ("tiny", _relabel("complex64"), "denoiser.conv_out.weight"),
    "weights-float8": ("tiny", _relabel("float8_e4m3fn"), "denoiser.conv_out.weight"),
    "weights-one-float16": ("tiny", _relabel("float16"), "denoiser.conv_out.weight"),
}


_SAMPLING_ERRORS = ("nan-weights", "schedule-min-log-snr")  # only `sample` samples
_COMMAND_CASES = [
    (command, case)
    for case in _CASES
    for command in ("sample", "info")
    if command == "sample" or case not in _SAMPLING_ERRORS
]


@pytest.mark.parametrize(("command", "case"), _COMMAND_CASES)
def test_cli_user_errors_are_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
    tmp_path: Path,
    case: str,
    command: str,
) -> None:
    which, damage, message = _CASES[case]
    source = request.getfixturevalue("text_pipeline" if which == "text" else "tiny_pipeline")
    run = _copy(source, tmp_path / "run")
    damage(run)  # type: ignore[operator]
    argv = [command, str(run)]
    if command == "sample":
        argv += ["--num", "1", "--threads", "1", "--quiet"]
        argv += ["--prompt", "a"] if which == "text" else []
    line = _cli_error(capsys, argv)
    assert message in line, line


# ------------------------------------------------------------------ resume (issue case 7)


def _ckpt_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.GroupNorm(2, 8))


def _save_steps(folder: Path, *steps: int) -> None:
    from diffkit.checkpoint import checkpoint_name, save_training_checkpoint

    model = _ckpt_model()
    for step in steps:
        save_training_checkpoint(folder / checkpoint_name(step), model=model, step=step)


def test_resume_falls_back_to_the_newest_intact_checkpoint_and_says_which_it_skipped(
    tmp_path: Path,
) -> None:
    from diffkit.checkpoint import checkpoint_name, latest_checkpoint

    _save_steps(tmp_path, 2, 4, 6, 8)
    newest = tmp_path / checkpoint_name(8)
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated
    (tmp_path / checkpoint_name(6)).write_bytes(b"\xff" * 64)  # garbage
    with pytest.warns(UserWarning) as record:
        assert latest_checkpoint(tmp_path) == tmp_path / checkpoint_name(4)
    messages = [str(w.message) for w in record]
    assert any(checkpoint_name(8) in m and "truncated or corrupt" in m for m in messages)
    assert any(checkpoint_name(6) in m for m in messages)


def test_a_header_step_that_disagrees_with_the_file_name_is_refused(tmp_path: Path) -> None:
    from diffkit.checkpoint import (
        CheckpointError,
        checkpoint_name,
        latest_checkpoint,
        load_training_checkpoint,
        save_training_checkpoint,
    )

    lying = tmp_path / checkpoint_name(12)
    save_training_checkpoint(lying, model=_ckpt_model(), step=999)
    with pytest.raises(
        CheckpointError, match="header says step 999 but the file name says step 12"
    ):
        load_training_checkpoint(lying, model=_ckpt_model())
    with pytest.warns(UserWarning, match="999"), pytest.raises(CheckpointError, match="intact"):
        latest_checkpoint(tmp_path)  # nothing to fall back to: refused, not a silent restart
    _save_steps(tmp_path, 5)
    with pytest.warns(UserWarning, match=checkpoint_name(12)):
        assert latest_checkpoint(tmp_path) == tmp_path / checkpoint_name(5)


def test_a_directory_with_a_checkpoint_name_is_refused_before_training(tmp_path: Path) -> None:
    from diffkit.checkpoint import (
        CheckpointError,
        checkpoint_name,
        latest_checkpoint,
        list_checkpoints,
        save_training_checkpoint,
    )

    _save_steps(tmp_path, 2)
    (tmp_path / checkpoint_name(4)).mkdir()
    for look in (latest_checkpoint, list_checkpoints):
        with pytest.raises(CheckpointError, match="not a regular file"):
            look(tmp_path)
    with pytest.raises(IsADirectoryError, match="in the way"):
        save_training_checkpoint(tmp_path / checkpoint_name(4), model=_ckpt_model(), step=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint_name(2), checkpoint_name(4)]


def test_stale_temporaries_of_a_dead_writer_are_removed_and_no_others(tmp_path: Path) -> None:
    import subprocess
    import sys

    from diffkit import checkpoint as ckpt

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = ckpt._HOST
    names = {
        "dead": f".checkpoint-00000007.safetensors.{host}-{dead.pid}.a1b2c3.tmp",
        "alive": f".checkpoint-00000008.safetensors.{host}-{os.getpid()}.d4e5f6.tmp",
        "other-host": f".checkpoint-00000009.safetensors.elsewhere-{dead.pid}.g7h8.tmp",
        "foreign": ".notes.txt.tmp",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"x" * 1000)
    _save_steps(tmp_path, 3)
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / ckpt.checkpoint_name(3)
    left = {p.name for p in tmp_path.iterdir()}
    assert names["dead"] not in left
    assert {names["alive"], names["other-host"], names["foreign"]} <= left


FLAT = """
import torch
from torch import nn


class Flat(nn.Module):
    prediction = "epsilon"

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.SiLU(), nn.Linear(16, 64))

    def forward(self, x, t, cond=None):
        return self.net(x).reshape(x.shape)
"""


def test_training_resumes_from_the_newest_intact_checkpoint(tmp_path: Path) -> None:
    from diffkit.checkpoint import checkpoint_name
    from diffkit.schedules import Cosine
    from diffkit.training import TrainConfig, train
    from diffkit_demo.datasets import DigitsDataset

    namespace: dict[str, object] = {}
    exec(FLAT, namespace)

    def run(steps: int, resume: bool) -> object:
        config = TrainConfig(
            steps=steps,
            batch_size=4,
            checkpoint_every=2,
            keep_checkpoints=5,
            output_dir=str(tmp_path),
            progress=False,
            resume=resume,
        )
        return train(namespace["Flat"](), Cosine(), DigitsDataset(8), config)  # type: ignore[operator]

    run(4, resume=False)
    newest = tmp_path / "checkpoints" / checkpoint_name(4)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with pytest.warns(UserWarning, match=f"skipping the checkpoint .*{checkpoint_name(4)}"):
        result = run(6, resume=True)
    assert result.start_step == 2  # type: ignore[attr-defined]


# ------------------------------------------------------------------ dtypes (issue case 4)


@pytest.mark.parametrize(
    ("dtype", "message"),
    [
        ("int32", "int32 integers for torch.float32 floats"),
        ("complex64", "complex"),
        ("float16", "torch.float16, the module's is torch.float32"),
        ("float64", "torch.float64, the module's is torch.float32"),
        ("float8_e4m3fn", "not one of float16"),
    ],
)
def test_load_state_dict_refuses_other_dtypes_by_tensor_name(dtype: str, message: str) -> None:
    import torch

    from diffkit.checkpoint import CheckpointError, load_state_dict

    model = _ckpt_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = dict(model.state_dict())
    tensors["0.weight"] = torch.zeros(8, 4).to(getattr(torch, dtype))
    with pytest.raises(CheckpointError, match=message) as info:
        load_state_dict(model, tensors)
    assert "0.weight" in str(info.value) and "1.weight" not in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_load_state_dict_casts_between_floats_only_when_asked() -> None:
    import torch

    from diffkit.checkpoint import CheckpointError, load_state_dict

    model = _ckpt_model()
    tensors = {k: v.to(torch.float16) for k, v in model.state_dict().items()}
    load_state_dict(model, tensors, cast=True)
    assert model[0].weight.dtype == torch.float32  # type: ignore[index]
    tensors["0.bias"] = torch.zeros(8, dtype=torch.int64)
    with pytest.raises(CheckpointError, match=r"0\.bias"):
        load_state_dict(model, tensors, cast=True)  # integers are never cast


def test_check_dtypes_allows_one_floating_dtype_per_module() -> None:
    import torch

    from diffkit.checkpoint import CheckpointError, check_dtypes

    tensors = {
        "denoiser.a": torch.zeros(2),
        "denoiser.b": torch.zeros(2),
        "denoiser.c": torch.zeros(2, dtype=torch.float16),
        "denoiser.steps": torch.zeros(2, dtype=torch.long),
        "text.a": torch.zeros(2, dtype=torch.bfloat16),
    }
    with pytest.raises(CheckpointError, match=r"denoiser\.c \(torch\.float16, the rest") as info:
        check_dtypes(tensors)
    assert "denoiser.a" not in str(info.value) and "text.a" not in str(info.value)
    check_dtypes(tensors, mixed={"denoiser"})  # a module saved in mixed precision
    tensors["text.z"] = torch.zeros(2, dtype=torch.complex64)
    with pytest.raises(CheckpointError, match=r"text\.z"):
        check_dtypes(tensors, mixed={"denoiser"})


@pytest.mark.parametrize("dtype", ["int32", "complex64"])
def test_pipeline_load_refuses_integer_and_complex_weights_by_name(
    tiny_pipeline: Path, tmp_path: Path, dtype: str
) -> None:
    import torch

    from diffkit.checkpoint import CheckpointError
    from diffkit.pipeline import Pipeline

    run = _copy(tiny_pipeline, tmp_path / "run")
    name = "denoiser.conv_out.weight"

    def relabel(tensors: dict[str, torch.Tensor]) -> None:
        assert name in tensors, sorted(tensors)[:20]
        tensors[name] = tensors[name].to(getattr(torch, dtype))

    _edit(run, tensors_edit=relabel)
    with pytest.raises(CheckpointError, match=name):
        Pipeline.load(run)


# ------------------------------------------------------------------ Pipeline.load (case 1, 3, 5)


def _set_vocab(value: str) -> object:
    return lambda folder: _edit(folder, lambda d: d["text"].update(vocab_path=value))


def _load_error(folder: Path) -> str:
    """``Pipeline.load(folder)``'s ``CheckpointError``, one line, raised without hanging."""
    from diffkit.checkpoint import CheckpointError
    from diffkit.pipeline import Pipeline

    err = _in_thread(lambda: Pipeline.load(folder))
    assert isinstance(err, CheckpointError), repr(err)
    assert "\n" not in str(err)
    return str(err)


def _fifo_vocab(folder: Path) -> None:
    path = _vocab(folder)
    path.unlink()
    os.mkfifo(path)


def _symlinked_vocab(target: str) -> object:
    def change(folder: Path) -> None:
        path = _vocab(folder)
        path.unlink()
        os.symlink(target, path)

    return change


_LOAD_CASES = {
    "absolute": (_set_vocab("/etc/passwd"), "relative"),
    "dev-stdin": (_set_vocab("/dev/stdin"), "relative"),
    "dotdot": (_set_vocab("../../etc/passwd"), ".."),
    "symlink-out": (_symlinked_vocab("/etc/passwd"), "leaves the folder"),
    "symlink-stdin": (_symlinked_vocab("/dev/stdin"), "leaves the folder"),
    "fifo": (_fifo_vocab, "FIFO"),
    "deep-json": (_deep_json, "nested too deeply"),
}


@needs_fifo
@pytest.mark.parametrize("case", list(_LOAD_CASES))
def test_pipeline_load_reads_only_regular_files_inside_the_folder(
    text_pipeline: Path, tmp_path: Path, case: str
) -> None:
    damage, message = _LOAD_CASES[case]
    run = _copy(text_pipeline, tmp_path / "run")
    damage(run)  # type: ignore[operator]
    error = _load_error(run)
    assert message in error and "root:" not in error  # nothing of the file read shows


@needs_fifo
@pytest.mark.parametrize("case", ["absolute", "dev-stdin", "symlink-stdin", "fifo"])
@pytest.mark.parametrize("command", ["info", "sample"])
def test_cli_refuses_a_vocab_outside_the_folder_in_one_line_without_hanging(
    capsys: pytest.CaptureFixture[str], text_pipeline: Path, tmp_path: Path, case: str, command: str
) -> None:
    damage, message = _LOAD_CASES[case]
    run = _copy(text_pipeline, tmp_path / "run")
    damage(run)  # type: ignore[operator]
    argv = [command, str(run)] + (
        ["--prompt", "a", "--num", "1", "--quiet"] if command == "sample" else []
    )
    line: list[str] = []
    err = _in_thread(lambda: line.append(_cli_error(capsys, argv)))
    assert err is None, err
    assert message in line[0]


def test_pipeline_load_refuses_a_gzip_bomb_for_a_vocabulary(
    text_pipeline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _copy(text_pipeline, tmp_path / "run")
    _bomb(_vocab(run), 200 * 2**20)
    monkeypatch.setattr(files, "MAX_READ_BYTES", 8 * 2**20)
    assert "larger than 8,388,608 bytes inflated" in _load_error(run)


@needs_fifo
@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_pipeline_load_refuses_a_fifo_or_outside_link_for_its_own_files(
    tiny_pipeline: Path, tmp_path: Path, name: str
) -> None:
    run = _copy(tiny_pipeline, tmp_path / "run")
    outside = tmp_path / "outside"
    (run / name).rename(outside)
    os.symlink(outside, run / name)
    assert "leaves the folder" in _load_error(run)
    (run / name).unlink()
    os.mkfifo(run / name)
    assert "FIFO" in _load_error(run)


def test_pipeline_load_refuses_one_module_in_two_floating_dtypes(
    tiny_pipeline: Path, tmp_path: Path
) -> None:
    import torch

    run = _copy(tiny_pipeline, tmp_path / "run")
    name = "denoiser.conv_out.weight"

    def half(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = tensors[name].half()

    _edit(run, tensors_edit=half)
    assert name in _load_error(run) and "torch.float16" in _load_error(run)


def test_a_module_saved_in_mixed_precision_loads_back(tiny_pipeline: Path, tmp_path: Path) -> None:
    import torch

    from diffkit.pipeline import Pipeline

    pipeline = Pipeline.load(tiny_pipeline).to(torch.bfloat16)
    pipeline.denoiser.conv_out.float()
    loaded = Pipeline.load(pipeline.save(tmp_path / "mixed"))
    for key, value in pipeline.state_dict().items():
        assert loaded.state_dict()[key].dtype == value.dtype, key


# ------------------------------------------------------------------ sizes (case 3)


def test_sizes_no_machine_can_hold_are_refused_before_allocating(
    tiny_pipeline: Path, tmp_path: Path
) -> None:
    from diffkit.pipeline import Pipeline

    run = _copy(tiny_pipeline, tmp_path / "run")
    _edit(run, lambda d: d["denoiser"].update(base_channels=10**400))
    assert "base_channels" in _load_error(run)
    _edit(run, lambda d: d["denoiser"].update(base_channels=1_000_000))  # 16 TB
    err = _in_thread(lambda: Pipeline.load(run))
    assert isinstance(err, ValidationError), repr(err)  # the config's own bound
    assert err.errors()[0]["loc"] == ("denoiser", "base_channels")
    assert "MAX_PARAMETERS" in str(err)


def test_the_meta_device_build_still_counts_the_parameters(
    tiny_pipeline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A network whose config does not bound it (a user's, or an estimate too low) is
    refused by the count of the network built on the meta device."""
    from diffkit.nn.unet import UNetConfig

    monkeypatch.setattr(UNetConfig, "parameter_estimate", lambda self: 0)
    run = _copy(tiny_pipeline, tmp_path / "run")
    _edit(run, lambda d: d["denoiser"].update(base_channels=1_000_000))
    assert "base_channels" in _load_error(run) and "MAX_PARAMETERS" in _load_error(run)


def test_weights_are_checked_against_the_meta_device_build_before_allocating(
    tiny_pipeline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from diffkit.pipeline import Pipeline

    run = _copy(tiny_pipeline, tmp_path / "run")
    _edit(run, lambda d: d["denoiser"].update(base_channels=16))  # weights are for 8
    devices: list[str] = []
    build = Pipeline.from_config.__func__

    def spy(cls: type, config: object) -> object:
        devices.append(str(torch.get_default_device()))
        return build(cls, config)

    monkeypatch.setattr(Pipeline, "from_config", classmethod(spy))
    read: list[object] = []
    monkeypatch.setattr("diffkit.pipeline.load_tensors", lambda *a, **k: read.append(a))
    assert "mis-shaped" in _load_error(run)
    assert devices == ["meta"] and read == []  # refused from the header, no data read


def test_steps_and_data_shape_are_bounded(tiny_pipeline: Path, tmp_path: Path) -> None:
    from pydantic import ValidationError

    from diffkit.builder import build
    from diffkit.pipeline import Pipeline

    config = {"data_shape": [1, 8, 8], "schedule": {"kind": "cosine"}, "denoiser": _TINY_UNET}
    with pytest.raises(ValidationError, match="steps"):
        build({**config, "steps": 10**12})
    with pytest.raises(ValidationError, match="data_shape"):
        build({**config, "data_shape": [1, 65536, 65536]})
    pipeline = Pipeline.load(tiny_pipeline)
    with pytest.raises(ValueError, match="steps"):
        pipeline.generate(num_samples=1, steps=10**12)


def test_cli_refuses_steps_past_the_bound_in_one_line(
    capsys: pytest.CaptureFixture[str], tiny_pipeline: Path, tmp_path: Path
) -> None:
    run = _copy(tiny_pipeline, tmp_path / "run")
    argv = ["sample", str(run), "--num", "1", "--steps", str(10**12), "--quiet"]
    assert "MAX_STEPS" in _cli_error(capsys, argv)


def test_seed_determines_the_run_model_initialisation_included(tmp_path: Path) -> None:
    import json

    import torch
    import yaml

    from diffkit.training import main

    run = {
        "pipeline": {
            "data_shape": [1, 8, 8],
            "schedule": {"kind": "cosine"},
            "denoiser": _TINY_UNET,
        },
        "data": {"kind": "digits", "size": 8},
        "train": {"steps": 1, "batch_size": 4, "log_every": 1, "progress": False, "seed": 0},
    }
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run))
    losses = []
    for attempt in range(2):
        torch.manual_seed(attempt)  # the global RNG's state before a run must not matter
        out = tmp_path / f"out{attempt}"
        assert main([str(config), "--output-dir", str(out)]) == 0
        losses.append(json.loads((out / "log.jsonl").read_text().splitlines()[0])["loss"])
    assert losses[0] == losses[1]


class _Zero:
    """A toy denoiser: predicts zero noise."""

    prediction: Prediction = "epsilon"

    def __call__(self, x_t: Any, t: Any, cond: Conditioning | None = None) -> Any:
        return x_t * 0


def test_negative_guidance_is_refused_by_sample_and_generate(tiny_pipeline: Path) -> None:
    import torch

    from diffkit.pipeline import Pipeline
    from diffkit.samplers import DDIM
    from diffkit.schedules import Cosine

    pipeline = Pipeline.load(tiny_pipeline)
    with pytest.raises(ValueError, match="guidance must be"):
        pipeline.generate(num_samples=1, steps=2, guidance=-2.0)
    noise = torch.randn(1, 1, 8, 8)
    cond = Conditioning(labels=torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="guidance must be"):
        DDIM().sample(_Zero(), Cosine(), noise, steps=2, guidance=-2.0, cond=cond, uncond=cond)


@pytest.mark.parametrize("method", ["alpha", "sigma", "alpha_sigma", "log_snr"])
@pytest.mark.parametrize("value", [-0.5, 1.5, float("nan"), 999.0])
def test_schedules_refuse_times_outside_0_1_naming_t(method: str, value: float) -> None:
    import torch

    from diffkit.schedules import Cosine, RectifiedFlow

    for schedule in (Cosine(), RectifiedFlow()):
        with pytest.raises(ValueError, match=r"\bt must be"):
            getattr(schedule, method)(torch.tensor([0.5, value]))
        getattr(schedule, method)(torch.tensor([0.0, 0.5, 1.0]))  # the ends are fine


def test_a_unet_without_classes_refuses_labels_naming_both() -> None:
    import torch

    from diffkit.nn._registry import DENOISERS

    net = DENOISERS.build({**_TINY_UNET, "context_dim": 8})
    x = torch.randn(1, 1, 8, 8)
    cond = Conditioning(tokens=torch.randn(1, 3, 8), labels=torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels.*num_classes"):
        net(x, torch.full((1,), 0.5), cond)


def test_meta_device_noise_is_one_clear_error_naming_noise(tiny_pipeline: Path) -> None:
    import torch

    from diffkit.pipeline import Pipeline
    from diffkit.samplers import DDIM
    from diffkit.schedules import Cosine

    noise = torch.empty(1, 1, 8, 8, device="meta")
    with pytest.raises(ValueError, match=r"noise.*meta"):
        Pipeline.load(tiny_pipeline).generate(noise=noise, steps=2)
    with pytest.raises(ValueError, match=r"noise.*meta"):
        DDIM().sample(_Zero(), Cosine(), noise, steps=2)


def _location(err: pytest.ExceptionInfo[Exception]) -> tuple[Any, ...]:
    from pydantic import ValidationError

    assert isinstance(err.value, ValidationError) and isinstance(err.value, ValueError)
    return tuple(err.value.errors()[0]["loc"])


@pytest.mark.parametrize("data", [{"kind": "nope"}, {"offset": 0.1}, {"kind": 3}])
def test_a_bad_kind_is_a_validation_error_located_at_kind(data: dict[str, Any]) -> None:
    from diffkit.schedules import SCHEDULES

    with pytest.raises(ValueError) as err:
        SCHEDULES.parse(data)
    assert _location(err) == ("kind",)


@pytest.mark.parametrize(
    ("group", "data", "field"),
    [
        ("schedule", {"kind": "linear_beta", "beta_start": 0.5, "beta_end": 0.1}, "beta_end"),
        ("schedule", {"kind": "sqrt_linear_beta", "beta_start": 0.5, "beta_end": 0.1}, "beta_end"),
        ("schedule", {"kind": "edm", "sigma_min": 2.0, "sigma_max": 1.0}, "sigma_max"),
        ("spacing", {"kind": "uniform", "t_min": 0.9, "t_max": 0.5}, "t_min"),
        ("spacing", {"kind": "leading", "num_train": 10, "steps_offset": 10}, "steps_offset"),
        ("spacing", {"kind": "karras", "rho": -1.0}, "rho"),
    ],
)
def test_cross_field_checks_are_located_at_the_field(
    group: str, data: dict[str, Any], field: str
) -> None:
    from diffkit.builder import registry

    with pytest.raises(ValueError) as err:
        registry(group).parse(data)
    assert _location(err) == (field,)


@pytest.mark.parametrize(
    ("group", "data", "field"),
    [
        ("schedule", {"kind": "linear_beta", "num_steps": 2**63}, "num_steps"),
        ("spacing", {"kind": "leading", "num_train": 2**64}, "num_train"),
        ("schedule", {"kind": "edm", "rho": 1e-3}, "rho"),
        ("schedule", {"kind": "rectified_flow", "shift": 1e-293}, "shift"),
        ("encoder", {"kind": "kl_autoencoder", "scaling_factor": 1e-300}, "scaling_factor"),
        ("dataset", {"kind": "moving_digits", "size": 16, "digit_size": 24}, "digit_size"),
        # found by the every-config property below
        ("encoder", {"kind": "kl_autoencoder", "shift_factor": 1e300}, "shift_factor"),
        ("denoiser", {"kind": "dit", "pos_interpolation_scale": 1e-300}, "pos_interpolation_scale"),
        ("denoiser", {"kind": "dit", "time_scale": 1e300}, "time_scale"),
        ("denoiser", {"kind": "unet", "time_scale": 1e300}, "time_scale"),
        ("encoder", {"kind": "identity", "channels": 2**40}, "channels"),
        ("dataset", {"kind": "digits", "size": 2**40}, "size"),
        ("dataset", {"kind": "moving_digits", "frames": 2**20, "size": 1024}, "frames"),
    ],
)
def test_configs_that_would_fail_later_are_refused_by_field(
    group: str, data: dict[str, Any], field: str
) -> None:
    import diffkit_demo.datasets as demo_datasets  # registers the demo datasets
    from diffkit.builder import registry

    assert demo_datasets.MovingDigitsConfig
    with pytest.raises(ValueError) as err:
        registry(group).parse(data)
    assert _location(err) == (field,)


_TOWER = {"vocab_size": 300, "width": 16, "heads": 2}


@pytest.mark.parametrize(
    ("group", "data", "loc"),
    [
        ("denoiser", {"kind": "unet", "base_channels": 10**6}, ("base_channels",)),
        ("denoiser", {"kind": "unet", "num_classes": 10**12}, ("num_classes",)),
        ("denoiser", {"kind": "dit", "dim": 10**6}, ("dim",)),
        ("denoiser", {"kind": "video_dit", "mlp_ratio": 1e12}, ("mlp_ratio",)),
        ("encoder", {"kind": "kl_autoencoder", "latent_channels": 10**6}, ("latent_channels",)),
        ("clip", {"kind": "clip", "embed_dim": 10**10}, ("embed_dim",)),
        ("clip", {"kind": "clip", "text": {"vocab_size": 10**12}}, ("text", "vocab_size")),
        (
            "text_conditioner",
            {"kind": "clip_text", "tokenizer": "byte", "text": _TOWER, "projection_dim": 10**10},
            ("projection_dim",),
        ),
    ],
)
def test_networks_no_machine_can_build_are_refused_at_their_largest_field(
    group: str, data: dict[str, Any], loc: tuple[str, ...]
) -> None:
    """The parameter estimate passes MAX_PARAMETERS: refused before anything is built."""
    with pytest.raises(ValueError) as err:
        registry(group).parse(data)
    assert _location(err) == loc
    assert "MAX_PARAMETERS" in str(err.value)


def test_a_large_network_within_the_bound_is_valid() -> None:
    """The bound is the estimate, not a cap on each field: a wide, shallow U-Net is fine."""
    config = registry("denoiser").parse(
        {"kind": "unet", "base_channels": 4096, "channel_mult": [1], "attention_resolutions": [1]}
    )
    assert isinstance(config, NetworkConfig) and config.parameter_estimate() < MAX_PARAMETERS


def test_ddim_with_a_huge_eta_adds_at_most_the_marginal_noise() -> None:
    """eta > 1 asked for more noise than sigma_{i+1}: it draws x_{i+1} afresh instead of NaN."""
    from diffkit.samplers import DDIM

    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    outs = [
        DDIM(eta=eta).sample(
            _Zero(), Cosine(), noise, steps=3, generator=torch.Generator().manual_seed(1)
        )
        for eta in (1e300, 50.0)
    ]
    assert torch.isfinite(outs[0]).all() and torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("beta_start", [1e-8, 1e-7, 8.5e-4])
def test_sqrt_linear_beta_is_data_at_t_0_for_any_beta_start(beta_start: float) -> None:
    """Found by the every-config property: a last-bit difference gave NaN at t = 0."""
    from diffkit.schedules import SqrtLinearBeta

    a, s = SqrtLinearBeta(beta_start=beta_start).alpha_sigma(torch.zeros(1, dtype=torch.float64))
    assert a.item() == 1.0 and s.item() == 0.0


def test_karras_spacing_with_a_tiny_rho_gives_a_finite_grid() -> None:
    import torch

    from diffkit.samplers import Karras
    from diffkit.schedules import Cosine

    grid = Karras(rho=1e-3, sigma_max=None)(Cosine(), 8)
    assert torch.isfinite(grid).all() and (grid.diff() < 0).all()


# ---- every registered config: refused with a location, or builds and runs ----


def _library_kinds(group: str) -> list[str]:
    """The kinds of a group that the library (or its demo) registers, not a test's own."""
    reg = registry(group)
    packages = {"diffkit", "diffkit_demo"}
    return [k for k in reg.kinds if reg.config_class(k).__module__.split(".")[0] in packages]


def _all_groups() -> list[str]:
    """Every registered component group with a kind of the library's or the demo's."""
    import diffkit_demo.datasets as demo_datasets  # registers the demo datasets

    assert demo_datasets.DigitsConfig
    registry("schedule")  # imports every built-in group
    return sorted(group for group in REGISTRIES if _library_kinds(group))


_GROUPS = _all_groups()

_NUMBERS = st.one_of(
    st.sampled_from([0, 1, 2, -1, 0.5, 1e-3, 1e-300, 1e300, 2**62, 2**63, 2**64, -(2**63) - 1]),
    st.sampled_from([10**6, 10**9, 10**12, 3 * 10**5, 2**31]),  # sizes no machine can build
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**70), 2**70),
)
_SMALL = st.one_of(
    st.sampled_from([1, 2, 4, 8, 16, 32]), st.integers(0, 33), st.sampled_from([0.0, 0.25, 2.5])
)
_JUNK = st.sampled_from(["x", None, [], True, [1, 2, 3]])

_TEXT = {"vocab_size": 300, "context_length": 8, "width": 16, "layers": 1, "heads": 2}
_TINY: dict[str, dict[str, Any]] = {
    # small valid starting points, by kind; a kind not here starts from its defaults
    "unet": {**_TINY_UNET, "attention_resolutions": [1], "context_dim": 8},
    "dit": {"kind": "dit", "in_channels": 1, "dim": 16, "depth": 1, "num_heads": 2},
    "video_dit": {
        "kind": "video_dit",
        "in_channels": 1,
        "patch_size": [1, 2, 2],
        "dim": 16,
        "depth": 1,
        "num_heads": 2,
    },
    "kl_autoencoder": {
        "kind": "kl_autoencoder",
        "in_channels": 1,
        "base_channels": 8,
        "channel_mult": [1, 2],
        "blocks_per_level": 1,
        "latent_channels": 2,
        "norm_groups": 4,
    },
    "identity": {"kind": "identity", "channels": 1},
    "clip": {
        "kind": "clip",
        "embed_dim": 8,
        "text": _TEXT,
        "vision": {
            "kind": "clip_vit",
            "image_size": 8,
            "patch_size": 4,
            "channels": 1,
            "width": 16,
            "layers": 1,
            "heads": 2,
        },
    },
    "clip_text": {"kind": "clip_text", "tokenizer": "byte", "text": _TEXT},
    "spatial_patches": {"kind": "spatial_patches", "patch_size": [2, 2]},
    "tubelet_patches": {"kind": "tubelet_patches", "patch_size": [1, 2, 2]},
    "digits": {"kind": "digits", "size": 8},
    "moving_digits": {"kind": "moving_digits", "num_videos": 2, "frames": 2, "size": 8},
}


def _leaves(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """The paths of the numbers in a nested dict / list (``kind`` left alone)."""
    if isinstance(value, dict):
        return [p for k, v in value.items() if k != "kind" for p in _leaves(v, (*path, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _leaves(v, (*path, i))]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [path]
    return []


def _numeric_fields(cls: Any) -> list[tuple[Any, ...]]:
    out = []
    for name, field in cls.model_fields.items():
        ann = str(field.annotation)
        if name != "kind" and ("float" in ann or "int" in ann) and "tuple" not in ann:
            out.append((name,))
    return out


def _put(data: Any, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


def _drawn_configs(group: str) -> st.SearchStrategy[dict[str, Any]]:
    """A kind's small valid config, or its defaults, with up to two numbers replaced by
    small, extreme or ill-typed values."""
    reg = registry(group)

    @st.composite
    def configs(draw: Any) -> dict[str, Any]:
        import copy

        kind = draw(st.sampled_from(_library_kinds(group)))
        raw = copy.deepcopy(_TINY.get(kind, {"kind": kind}))
        paths = sorted(set(_leaves(raw)) | set(_numeric_fields(reg.config_class(kind))))
        chosen = draw(st.lists(st.sampled_from(paths), unique=True, max_size=2)) if paths else []
        for path in chosen:
            _put(raw, path, draw(st.one_of(_SMALL, _SMALL, _SMALL, _NUMBERS, _JUNK)))
        return raw

    return configs()


_EXAMPLES_PER_GROUP = int(os.environ.get("DIFFKIT_CONFIG_EXAMPLES", "60"))
"""Examples per group (CI: 60, about 600 in all); another number hunts with fresh ones."""
_SLACK = 4
"""How far beyond MAX_PARAMETERS a valid network may be: its estimate counts the largest
weights (at least a quarter of the whole), and Pipeline.load counts them all."""
_AFFORDABLE = 400_000
"""Networks up to this many parameters are also built for real and run once."""


def _inputs_of(spec: Any) -> tuple[torch.Tensor, Conditioning] | None:
    """A tiny input ``x_t`` for a denoiser config and the conditioning it asks for; ``None``
    if the smallest input it takes is not tiny."""
    # twice the factor: at the factor itself the coarsest level can be 1x1, and a GroupNorm
    # group of one channel would hold a single value, which torch refuses to normalise
    size = 2 * spec.downsampling_factor
    frames = (spec.patch_size[0],) if spec.is_video else ()
    shape = (1, *frames, spec.in_channels, size, size)
    if math.prod(shape) > 2**16:
        return None
    x = torch.randn(shape)
    micro = getattr(spec, "micro_conditions", 0) or (
        3 if getattr(spec, "size_conditions", 0) else 0
    )
    labels = getattr(spec, "num_classes", None)
    cond = Conditioning(
        tokens=torch.randn(1, 3, spec.context_dim) if spec.context_dim else None,
        pooled=torch.randn(1, spec.pooled_dim) if spec.pooled_dim else None,
        labels=torch.zeros(1, dtype=torch.long) if labels else None,
        micro=torch.rand(1, micro) * 64 if micro else None,
    )
    return x, cond


def _run_network(group: str, config: Any) -> None:
    """Built on the meta device, within MAX_PARAMETERS and its own estimate; then, if small,
    built for real and run once, giving finite numbers of the declared shape."""
    with torch.device("meta"):
        probe = registry(group).build(config)
    count = sum(t.numel() for t in probe.state_dict().values())
    if issubclass(type(config), NetworkConfig):
        # a lower bound, close enough that no valid config is far beyond MAX_PARAMETERS
        assert config.parameter_estimate() <= count <= _SLACK * MAX_PARAMETERS, (config, count)
    else:
        assert count <= MAX_PARAMETERS, (config, count)
    event("built on the meta device")
    if count > _AFFORDABLE:
        return
    torch.manual_seed(0)
    net = registry(group).build(config).eval()
    with torch.no_grad():
        if group == "denoiser":
            inputs = _inputs_of(config)
            if inputs is None:
                return
            x, cond = inputs
            out = net(x, torch.full((1,), 0.5), cond)
            channels = config.out_channels or config.in_channels
            assert out.shape[-3] == channels and out.shape[-2:] == x.shape[-2:], config
        elif group == "encoder":
            # twice the factor: at the factor itself a 1-channel level can be 1x1, a single
            # value per GroupNorm group, which torch refuses to normalise
            shape = (1, config.in_channels, *[2 * config.downsampling_factor] * 2)
            if math.prod(shape) > 2**16:
                return
            x = torch.randn(shape)
            out = net.decode(net.encode(x))
        elif group == "text_conditioner":
            out = net(["a digit", ""]).tokens
        else:  # clip
            ids = torch.randint(0, config.text.vocab_size, (1, config.text.context_length))
            images = torch.randn(1, config.vision.channels, *[config.vision.image_size] * 2)
            if images.numel() > 2**16:
                return
            out = net(images, ids)
    assert torch.isfinite(out).all(), config
    event("built and run")


def _run_config(group: str, config: Any) -> None:
    t = torch.linspace(0, 1, 65, dtype=torch.float64)
    if group == "schedule":
        a, s = config.alpha_sigma(t)
        assert torch.isfinite(a).all() and torch.isfinite(s).all(), config
    elif group == "spacing":
        grid = config(Cosine(), 1)  # Leading allows at most num_train (>= 1) steps
        assert torch.isfinite(grid).all(), config
    elif group == "sampler":
        out = config.sample(
            _Zero(),
            Cosine(),
            torch.randn(1, 1, 4, 4),
            steps=2,
            generator=torch.Generator().manual_seed(0),
        )
        assert torch.isfinite(out).all(), config
    elif group == "loss":
        x0 = torch.randn(2, 1, 4, 4)
        loss = config(_Zero(), Cosine(), x0, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(loss), config
    elif group == "patchifier":
        *frames, height, width = config.patch_size  # one patch (one tubelet) of 2 channels
        shape = (1, *frames, 2, height, width)
        if math.prod(shape) > 2**16:
            return
        x = torch.randn(shape)
        assert torch.equal(config.unpatchify(config.patchify(x), x.shape[1:]), x), config
    elif group == "dataset":
        sizes = config.model_dump()
        if sizes["size"] > 32 or sizes.get("num_videos", 1) * sizes.get("frames", 1) > 256:
            return
        item = registry(group).build(config)[0]
        assert torch.isfinite(item["x"]).all(), config
    else:  # networks, and any group registered later: built on the meta device at least
        _run_network(group, config)
        return
    event("built and run")


def _at_a_field(raw: Any, loc: tuple[Any, ...]) -> bool:
    """Whether an error's location names a field, not a whole (nested) config: a check
    across fields that pydantic would locate at the config itself fails this."""
    value = raw
    for key in loc:
        if isinstance(value, dict) and key not in value and key == value.get("kind"):
            continue  # the tag pydantic adds for a discriminated union
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            return True  # a missing field, or a position within a value
    return not isinstance(value, dict)


@pytest.mark.parametrize("group", _GROUPS)
@settings(
    max_examples=_EXAMPLES_PER_GROUP,
    deadline=None,
    derandomize=_EXAMPLES_PER_GROUP == 60,  # CI: the same examples every run
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
    ],
)
@given(data=st.data())
def test_every_config_is_refused_with_a_location_or_builds_and_runs(group: str, data: Any) -> None:
    raw = data.draw(_drawn_configs(group))
    try:
        config = registry(group).parse(raw)
    except ValidationError as err:
        assert all(_at_a_field(raw, e["loc"]) for e in err.errors()), (raw, err)
        event("refused with a location")
        return
    _run_config(group, config)


_NETWORKS = {"denoiser", "encoder", "text_conditioner", "clip"}


def test_every_group_is_covered() -> None:
    """The groups come from the registries: the built-in ones are all there."""
    expected = {"schedule", "spacing", "sampler", "loss", "patchifier", "dataset"}
    assert expected | _NETWORKS <= set(_GROUPS)
