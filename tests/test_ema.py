"""EMA of weights: the update rule, warm-up, buffers, and copying back."""

from pathlib import Path
from typing import cast

import pytest
import torch
from torch import Tensor, nn

from diffkit.ema import EMA


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_update_moves_shadow_by_one_minus_decay_towards_the_weights():
    model = _model()
    ema = EMA(model, decay=0.9, warmup=False)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(3.0)  # type: ignore[index]
    ema.update(model)
    after = ema.module.state_dict()
    for name, p in model.named_parameters():
        expected = before[name] + 0.1 * (p - before[name])
        assert torch.allclose(after[name], expected, atol=1e-6)
    assert torch.equal(after["1.running_mean"], torch.full((4,), 3.0))  # buffers are copied
    assert int(ema.num_updates) == 1


def test_warmup_decay_follows_one_plus_n_over_ten_plus_n():
    model = _model()
    ema = EMA(model, decay=0.999)
    seen = []
    for _ in range(3):
        seen.append(ema.current_decay())
        ema.update(model)
    assert seen == pytest.approx([1 / 10, 2 / 11, 3 / 12])
    assert EMA(model, decay=0.5).current_decay() == pytest.approx(0.1)


def test_decay_one_without_warmup_keeps_the_initial_weights_and_copy_to_restores_them():
    model = _model()
    ema = EMA(model, decay=1.0, warmup=False)
    initial = [p.clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-2.0)
    ema.update(model)
    ema.copy_to(model)
    for a, b in zip(model.parameters(), initial, strict=True):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in ema.averaged().parameters())


def test_invalid_decay_and_mismatched_model_are_rejected():
    with pytest.raises(ValueError, match="decay"):
        EMA(_model(), decay=1.5)
    ema = EMA(_model())
    with pytest.raises(ValueError, match="do not match"):
        ema.update(nn.Linear(3, 4))


def test_a_parameter_added_after_the_ema_was_created_is_refused_by_name():
    model = _model()
    ema = EMA(model)
    model.register_parameter("extra", nn.Parameter(torch.ones(3)))
    with pytest.raises(ValueError, match=r"do not match.*parameters \['extra'\].*added after"):
        ema.update(model)


def test_a_parameter_whose_shape_changed_is_refused_even_when_it_broadcasts():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    ema = EMA(model)
    model[1] = nn.Linear(4, 1)  # weight (1, 4) would broadcast onto the averaged (2, 4)
    with pytest.raises(
        ValueError, match=r"parameter '1.weight' has shape \(1, 4\) in the model but \(2, 4\)"
    ):
        ema.update(model)
    assert int(ema.num_updates) == 0


class _Buffers(nn.Module):
    def __init__(self, order: tuple[str, ...], size: int = 3) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        for name in order:
            self.register_buffer(name, torch.full((size,), float(ord(name) - ord("a") + 1)))


def test_buffers_are_matched_by_name_and_shape_not_by_order():
    ema = EMA(_Buffers(("a", "b")))
    ema.update(_Buffers(("b", "a")))
    assert ema.module.a.tolist() == [1.0] * 3 and ema.module.b.tolist() == [2.0] * 3
    with pytest.raises(ValueError, match=r"buffer 'a' has shape \(4,\) in the model but \(3,\)"):
        ema.update(_Buffers(("a", "b"), size=4))
    with pytest.raises(ValueError, match=r"buffers do not match.*lacks buffers \['b'\]"):
        ema.update(_Buffers(("a",)))


# ------------------------------------------------------------------ 16-bit models: a float32 shadow


def _constant(dtype: torch.dtype, value: float = 1.0) -> nn.Linear:
    model = nn.Linear(1, 1, bias=False).to(dtype)
    with torch.no_grad():
        model.weight.fill_(value)
    return model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_ema_keeps_moving_towards_the_weights(dtype: torch.dtype):
    # In 16 bits 0.001 * (2 - 1) rounds away: bfloat16 never moved, float16 stopped at 1.51.
    model = _constant(dtype)
    ema = EMA(model, decay=0.999, warmup=False)
    with torch.no_grad():
        model.weight.fill_(2.0)
    for _ in range(3000):
        ema.update(model)
    expected = torch.tensor(2.0 - 0.999**3000)
    averaged = cast(Tensor, ema.averaged().weight)
    assert averaged.dtype == dtype  # given back in the model's dtype
    assert float(averaged) == float(expected.to(dtype))  # the float32 average, rounded once
    assert ema.state_dict()["module.weight"].dtype == torch.float32
    assert float(ema.state_dict()["module.weight"]) == pytest.approx(float(expected), abs=1e-5)
    target = _constant(dtype, 0.0)
    ema.copy_to(target)
    assert target.weight.dtype == dtype and torch.equal(target.weight, averaged)


def test_a_float32_ema_is_bit_identical_to_lerp_in_float32_and_float64_stays_float64():
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4)).to(dtype)
        ema = EMA(model, decay=0.99)
        reference = [p.detach().clone() for p in model.parameters()]
        for _ in range(20):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.1)
            model(torch.randn(4, 8, dtype=dtype))
            decay = ema.current_decay()
            for r, p in zip(reference, model.parameters(), strict=True):
                r.lerp_(p.detach(), 1.0 - decay)
            ema.update(model)
        for r, s in zip(reference, ema.averaged().parameters(), strict=True):
            assert s.dtype == dtype and torch.equal(r, s)
        assert [n for n, _ in ema.named_buffers() if not n.startswith("module.")] == [
            "num_updates"
        ]  # no float32 shadows beside the module
        assert sorted(ema.state_dict()) == sorted(
            ["num_updates", *(f"module.{k}" for k in model.state_dict())]
        )
        for key, value in model.state_dict().items():
            assert ema.state_dict()[f"module.{key}"].dtype == value.dtype


def test_a_16_bit_shadow_saves_as_float32_and_an_older_16_bit_one_loads_upcast(
    tmp_path: Path,
):
    from diffkit.checkpoint import load_training_checkpoint, save_training_checkpoint

    model = _constant(torch.bfloat16)
    ema = EMA(model, decay=0.999, warmup=False)
    with torch.no_grad():
        model.weight.fill_(2.0)
    for _ in range(3):
        ema.update(model)
    shadow = ema.state_dict()["module.weight"].clone()  # 1.003: bfloat16 rounds it to 1
    assert shadow.dtype == torch.float32 and float(shadow) == pytest.approx(2 - 0.999**3)
    assert float(cast(Tensor, ema.averaged().weight)) == 1.0
    path = save_training_checkpoint(tmp_path / "ckpt.safetensors", model=model, step=5, ema=ema)
    restored = EMA(_constant(torch.bfloat16), decay=0.999, warmup=False)
    load_training_checkpoint(path, model=_constant(torch.bfloat16), ema=restored)
    assert torch.equal(restored.state_dict()["module.weight"], shadow)  # the float32 shadow
    assert torch.equal(cast(Tensor, restored.averaged().weight), shadow.to(torch.bfloat16))
    # the same updates continue from the same float32 shadow
    ema.update(model)
    restored.update(model)
    assert torch.equal(restored.state_dict()["module.weight"], ema.state_dict()["module.weight"])
    # an older checkpoint held the bfloat16 shadow: it loads, upcast
    old = {"module.weight": torch.full((1, 1), 1.5, dtype=torch.bfloat16)}
    old["num_updates"] = torch.tensor(7)
    fresh = EMA(_constant(torch.bfloat16))
    fresh.load_state_dict(old)
    assert fresh.state_dict()["module.weight"].dtype == torch.float32
    assert float(fresh.state_dict()["module.weight"]) == 1.5 and int(fresh.num_updates) == 7
    assert fresh.averaged().weight.dtype == torch.bfloat16


def test_tied_16_bit_weights_share_one_float32_shadow():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    model[1].weight = model[0].weight  # type: ignore[index]
    model = model.to(torch.bfloat16)
    ema = EMA(model, decay=0.5, warmup=False)
    with torch.no_grad():
        model[0].weight.add_(1.0)  # type: ignore[index]
    ema.update(model)
    state = ema.state_dict()
    assert state["module.0.weight"].dtype == state["module.1.weight"].dtype == torch.float32
    assert torch.equal(state["module.0.weight"], state["module.1.weight"])
    ema.load_state_dict(state)


# ------------------------------------------------------------------ wrappers


def _compiled(model: nn.Module) -> nn.Module:
    return cast(nn.Module, torch.compile(model))  # nothing compiles: only the wrapper is built


def test_a_compiled_or_data_parallel_model_is_averaged_as_the_module_inside():
    model = _model()
    plain, compiled, parallel = EMA(model), EMA(_compiled(model)), EMA(nn.DataParallel(model))
    for ema in (compiled, parallel):
        assert sorted(ema.averaged().state_dict()) == sorted(model.state_dict())  # no prefix
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    plain.update(model)
    compiled.update(model)
    parallel.update(_compiled(model))
    for ema in (compiled, parallel):
        for a, b in zip(ema.averaged().parameters(), plain.averaged().parameters(), strict=True):
            assert torch.equal(a, b)
    target = _model()
    plain.copy_to(_compiled(target))
    assert all(
        torch.equal(a, b)
        for a, b in zip(target.parameters(), plain.averaged().parameters(), strict=True)
    )


def test_the_ema_itself_is_no_denoiser_but_its_averaged_model_is():
    # docs/getting-started.md: sample with ema.averaged(); the EMA object is refused by name.
    import diffkit as dk
    from diffkit.nn.dit import DiT, DiTConfig
    from diffkit.typing import ShapeError

    torch.manual_seed(0)
    ema = EMA(DiT(DiTConfig(in_channels=1, dim=32, depth=1, num_heads=2)))
    sampler = dk.samplers.REGISTRY["ddim"]()
    noise = torch.randn(1, 1, 8, 8)
    with pytest.raises(ShapeError, match=r"must be Denoiser, got EMA \(missing: prediction\)"):
        sampler.sample(ema, dk.schedules.Cosine(), noise, steps=2)  # type: ignore[arg-type]
    with torch.no_grad():
        out = sampler.sample(ema.averaged(), dk.schedules.Cosine(), noise, steps=2)  # type: ignore[arg-type]
    assert out.shape == noise.shape
    docs = Path(__file__).parents[1] / "docs" / "getting-started.md"
    text = " ".join(docs.read_text().split())
    assert "got EMA (missing: prediction)`): sample with `ema.averaged()`" in text
