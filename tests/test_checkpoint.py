"""Checkpoints: atomic writes, safetensors only, exact state round trips, clear errors."""

import pickle
import random

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import diffkit.checkpoint as ckpt
from diffkit.checkpoint import (
    CheckpointError,
    check_state_dict,
    flatten_state,
    latest_checkpoint,
    load_tensors,
    load_training_checkpoint,
    save_tensors,
    save_training_checkpoint,
    unflatten_state,
)
from diffkit.ema import EMA


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(4, width), nn.GroupNorm(2, width), nn.Linear(width, 3))


def _trained(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, EMA]:
    torch.manual_seed(seed)
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ema = EMA(model, 0.9)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
        ema.update(model)
    return model, opt, ema


def test_save_tensors_round_trips_bits_and_metadata(tmp_path):
    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.arange(6, dtype=torch.int64).reshape(2, 3).t(),  # non-contiguous view
        "c": torch.randn(2, dtype=torch.bfloat16),
    }
    tensors["d"] = tensors["a"]  # shared storage must still be storable
    save_tensors(tmp_path / "x.safetensors", tensors, {"note": "hello"})
    loaded, meta = load_tensors(tmp_path / "x.safetensors")
    assert meta == {"note": "hello"}
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype
        assert torch.equal(loaded[key], value)


def test_failed_write_leaves_previous_file_intact_and_no_temp_files(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_tensors(path, {"w": torch.ones(3)})

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial garbage")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_tensors(path, {"w": torch.zeros(3)})
    loaded, _ = load_tensors(path)
    assert torch.equal(loaded["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_truncated_file_raises_checkpoint_error_naming_the_file(tmp_path):
    path = tmp_path / "broken.safetensors"
    save_tensors(path, {"w": torch.randn(64, 64)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"broken\.safetensors.*truncated or corrupt"):
        load_tensors(path)
    path.write_bytes(b"\x00" * 7)
    with pytest.raises(CheckpointError):
        load_tensors(path)
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        load_tensors(tmp_path / "missing.safetensors")


def test_mismatched_state_lists_missing_unexpected_and_misshaped_keys():
    expected = {"a": torch.zeros(2), "b": torch.zeros(3, 3), "c": torch.zeros(1)}
    found = {"a": torch.zeros(2), "b": torch.zeros(3, 4), "z": torch.zeros(1)}
    with pytest.raises(CheckpointError) as info:
        check_state_dict(expected, found, what="weights")
    message = str(info.value)
    assert "missing keys: c" in message
    assert "unexpected keys: z" in message
    assert "mis-shaped keys: b (expected (3, 3), found (3, 4))" in message
    check_state_dict(expected, dict(expected))


nested = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=5)
    | st.builds(lambda n: torch.arange(n, dtype=torch.float32), st.integers(0, 4)),
    lambda children: (
        st.lists(children, max_size=3)
        | st.tuples(children, children)
        | st.dictionaries(st.text("abc", min_size=1, max_size=3), children, max_size=3)
        | st.dictionaries(st.integers(0, 5), children, max_size=3)
    ),
    max_leaves=12,
)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return type(b) is dict and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


@given(nested)
def test_flatten_then_unflatten_restores_any_nested_state(state):
    import json

    structure, tensors = flatten_state(state, "s")
    structure = json.loads(json.dumps(structure))  # what the header stores
    assert _same(unflatten_state(structure, tensors), state)


def test_training_checkpoint_restores_optimizer_ema_and_next_step_exactly(tmp_path):
    model, opt, ema = _trained(0)
    path = save_training_checkpoint(
        tmp_path / "c.safetensors", model=model, step=3, optimizer=opt, ema=ema, extra={"k": 1}
    )
    fresh, fresh_opt, fresh_ema = _trained(1)  # different weights and moments
    state = load_training_checkpoint(path, model=fresh, optimizer=fresh_opt, ema=fresh_ema)
    assert state.step == 3 and state.extra == {"k": 1}
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ema.state_dict().values(), fresh_ema.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(9))
    for m, o in ((model, opt), (fresh, fresh_opt)):
        o.zero_grad()
        m(x).pow(2).mean().backward()
        o.step()
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


def test_training_checkpoint_restores_torch_numpy_and_python_rngs(tmp_path):
    model = _model()
    torch.manual_seed(5)
    np.random.seed(5)  # noqa: NPY002
    random.seed(5)
    path = save_training_checkpoint(tmp_path / "c.safetensors", model=model, step=0)
    expected = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    torch.manual_seed(0)
    np.random.seed(0)  # noqa: NPY002
    random.seed(0)
    load_training_checkpoint(path, model=model)
    got = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1])
    assert expected[2] == got[2]


def test_every_ranks_rng_states_round_trip_stacked_by_rank(tmp_path):
    states = []
    for rank in range(3):
        torch.manual_seed(rank)
        states.append(torch.get_rng_state())
    rank_rng = {"torch": torch.stack(states)}
    path = save_training_checkpoint(
        tmp_path / "c.safetensors", model=_model(), step=2, rank_rng=rank_rng
    )
    assert load_tensors(path)[0]["rng.rank.torch"].shape == (3, states[0].numel())
    state = load_training_checkpoint(path, model=_model())
    assert state.rank_rng.keys() == {"torch"}
    assert torch.equal(state.rank_rng["torch"], rank_rng["torch"])
    plain = save_training_checkpoint(tmp_path / "d.safetensors", model=_model(), step=2)
    assert load_training_checkpoint(plain, model=_model()).rank_rng == {}


def test_loading_never_unpickles(tmp_path, monkeypatch):
    model, opt, _ = _trained(0)
    path = save_training_checkpoint(tmp_path / "c.safetensors", model=model, step=1, optimizer=opt)

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling is forbidden")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    load_training_checkpoint(
        path, model=_model(), optimizer=torch.optim.AdamW(_model().parameters())
    )


def test_loading_into_a_different_architecture_names_the_bad_keys(tmp_path):
    model, _, _ = _trained(0)
    path = save_training_checkpoint(tmp_path / "c.safetensors", model=model, step=1)
    with pytest.raises(
        CheckpointError, match=r"mis-shaped keys: .*0.weight \(expected \(16, 4\), found \(8, 4\)\)"
    ):
        load_training_checkpoint(path, model=_model(width=16))
    with pytest.raises(CheckpointError, match=r"unexpected keys: 2\.bias, 2\.weight"):
        load_training_checkpoint(path, model=nn.Sequential(nn.Linear(4, 8), nn.GroupNorm(2, 8)))
    with pytest.raises(CheckpointError, match="no EMA"):
        load_training_checkpoint(path, model=_model(), ema=EMA(_model()))
    plain = tmp_path / "plain.safetensors"
    save_tensors(plain, {"w": torch.ones(1)})
    with pytest.raises(CheckpointError, match="not a diffkit training checkpoint"):
        load_training_checkpoint(plain, model=model)


def test_latest_checkpoint_ignores_temporary_and_foreign_files(tmp_path):
    assert latest_checkpoint(tmp_path / "nothing") is None
    model = _model()
    for step in (2, 10, 7):
        save_training_checkpoint(tmp_path / ckpt.checkpoint_name(step), model=model, step=step)
    (tmp_path / ".checkpoint-00000099.safetensors.abc.tmp").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("x")
    assert latest_checkpoint(tmp_path) == tmp_path / ckpt.checkpoint_name(10)


FLAT_MODEL = """
import torch
from torch import nn


class Flat(nn.Module):
    prediction = "epsilon"

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.SiLU(), nn.Linear(256, 64))

    def forward(self, x, t, cond=None):
        return self.net(x).reshape(x.shape)
"""

KILLED_WORKER = (
    FLAT_MODEL
    + """
import sys

from diffkit_demo.datasets import DigitsDataset
from diffkit.schedules import Cosine
from diffkit.training import TrainConfig, train

torch.set_num_threads(1)
config = TrainConfig(
    steps=100_000, batch_size=8, checkpoint_every=1, keep_checkpoints=2,
    output_dir=sys.argv[1], progress=False,
)
train(Flat(), Cosine(), DigitsDataset(8), config)
"""
)


def test_sigkill_mid_training_leaves_only_complete_checkpoints(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "worker.py"
    script.write_text(KILLED_WORKER)
    folder = tmp_path / "checkpoints"
    process = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while len(list(folder.glob("checkpoint-*"))) < 2 or ckpt.latest_checkpoint(folder) is None:
            assert process.poll() is None, process.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no checkpoints appeared"
            time.sleep(0.05)
        time.sleep(0.2)  # now almost surely in the middle of writing one
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    steps = [step for step, _ in ckpt.list_checkpoints(folder)]
    assert steps, "the kill left no complete checkpoint"
    for _, path in ckpt.list_checkpoints(folder):
        tensors, meta = load_tensors(path)  # every file that has a checkpoint name is whole
        assert meta["format"] == "diffkit-training-checkpoint"
        assert "model.net.1.weight" in tensors
    # and training picks up from the newest one
    namespace: dict = {}
    exec(FLAT_MODEL, namespace)
    from diffkit.schedules import Cosine
    from diffkit.training import TrainConfig, train
    from diffkit_demo.datasets import DigitsDataset

    config = TrainConfig(
        steps=steps[-1] + 1, batch_size=8, output_dir=str(tmp_path), progress=False
    )
    result = train(namespace["Flat"](), Cosine(), DigitsDataset(8), config)
    assert result.start_step == steps[-1] and len(result.losses) == 1


def _rewrite_header(path, edit) -> None:
    """Apply ``edit`` to a checkpoint's JSON header in place (to fake old or odd files)."""
    import json

    tensors, metadata = load_tensors(path)
    header = json.loads(metadata["state"])
    edit(header)
    save_tensors(path, tensors, {**metadata, "state": json.dumps(header)})


def _snapshot(*modules: nn.Module) -> list[torch.Tensor]:
    return [t.clone() for m in modules for t in m.state_dict().values()]


def _same_optimizer(opt: torch.optim.Optimizer, before: dict) -> bool:
    after = opt.state_dict()
    return _same(after["param_groups"], before["param_groups"]) and _same(
        after["state"], before["state"]
    )


def _copy_opt_state(opt: torch.optim.Optimizer) -> dict:
    import copy

    return copy.deepcopy(opt.state_dict())


def _step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(5, 4)).pow(2).mean().backward()
    opt.step()


def test_a_refused_checkpoint_leaves_model_ema_and_optimizer_untouched(tmp_path):
    model, opt, ema = _trained(0)
    path = save_training_checkpoint(tmp_path / "c.safetensors", model=model, step=3, optimizer=opt)
    fresh, fresh_opt, fresh_ema = _trained(1)
    before, opt_before = _snapshot(fresh, fresh_ema), _copy_opt_state(fresh_opt)
    # The optimizer covers fewer parameters than the one saved: refused after the model fit.
    few = torch.optim.AdamW(list(fresh.parameters())[:2])
    with pytest.raises(CheckpointError) as info:
        load_training_checkpoint(path, model=fresh, optimizer=few)
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(fresh, fresh_ema), strict=True))
    assert "group 0 holds 6 parameters in the checkpoint, 2 in the optimizer" in str(info.value)
    # EMA asked for but not saved, and an EMA of another shape.
    with pytest.raises(CheckpointError, match="no EMA"):
        load_training_checkpoint(path, model=fresh, optimizer=fresh_opt, ema=fresh_ema)
    with_ema = save_training_checkpoint(tmp_path / "e.safetensors", model=model, step=3, ema=ema)
    with pytest.raises(CheckpointError, match=r"\(ema\) does not match"):
        load_training_checkpoint(with_ema, model=fresh, ema=EMA(_model(width=16)))
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(fresh, fresh_ema), strict=True))
    assert _same_optimizer(fresh_opt, opt_before)


def test_an_optimizer_of_another_class_is_refused_naming_both(tmp_path):
    model, adamw, _ = _trained(0)
    from_adamw = save_training_checkpoint(
        tmp_path / "a.safetensors", model=model, step=3, optimizer=adamw
    )
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _step(model, sgd)
    from_sgd = save_training_checkpoint(
        tmp_path / "s.safetensors", model=model, step=1, optimizer=sgd
    )
    for path, target in ((from_adamw, sgd), (from_sgd, adamw)):
        before = _copy_opt_state(target)
        saved, into = ("AdamW", "SGD") if target is sgd else ("SGD", "AdamW")
        with pytest.raises(CheckpointError, match=f"saved from {saved}, but .* into {into}"):
            load_training_checkpoint(path, model=model, optimizer=target)
        assert _same_optimizer(target, before)
        _step(model, target)  # still usable


def test_an_old_checkpoint_without_the_class_name_is_checked_by_its_hyper_parameters(tmp_path):
    model, adamw, _ = _trained(0)
    path = save_training_checkpoint(
        tmp_path / "a.safetensors", model=model, step=3, optimizer=adamw
    )
    _rewrite_header(path, lambda h: h.pop("optimizer_class", None))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(CheckpointError, match=r"hyper-parameters \[.*'betas'.*\] that SGD"):
        load_training_checkpoint(path, model=model, optimizer=sgd)
    assert sgd.param_groups[0]["lr"] == 0.1 and "betas" not in sgd.param_groups[0]
    fresh, fresh_opt, _ = _trained(1)
    load_training_checkpoint(path, model=fresh, optimizer=fresh_opt)  # same class: loads
    assert _same(fresh_opt.state_dict()["state"], adamw.state_dict()["state"])


def test_optimizer_state_in_the_wrong_parameter_order_is_refused(tmp_path):
    model, opt, _ = _trained(0)
    path = save_training_checkpoint(tmp_path / "c.safetensors", model=model, step=3, optimizer=opt)
    fresh = _model()
    reversed_opt = torch.optim.AdamW(list(fresh.parameters())[::-1])
    with pytest.raises(CheckpointError, match=r"mis-shaped: .*exp_avg \(parameter"):
        load_training_checkpoint(path, model=fresh, optimizer=reversed_opt)
    assert len(reversed_opt.state) == 0


def test_an_optimizer_that_torch_refuses_is_rolled_back(tmp_path):
    model, opt, _ = _trained(0)
    path = save_training_checkpoint(tmp_path / "c.safetensors", model=model, step=3, optimizer=opt)

    def drop_step(header):  # AdamW fails on a state without 'step', after rebinding its state
        for _, param_state in header["optimizer"]["state"]["__items__"]:
            param_state.pop("step")

    _rewrite_header(path, drop_step)
    fresh, fresh_opt, _ = _trained(1)
    before, opt_before = _snapshot(fresh), _copy_opt_state(fresh_opt)
    with pytest.raises(CheckpointError, match="optimizer state does not fit"):
        load_training_checkpoint(path, model=fresh, optimizer=fresh_opt)
    assert _same_optimizer(fresh_opt, opt_before)
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(fresh), strict=True))
    _step(fresh, fresh_opt)
