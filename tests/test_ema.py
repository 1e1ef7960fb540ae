"""EMA of weights: the update rule, warm-up, buffers, and copying back."""

import pytest
import torch
from torch import nn

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
