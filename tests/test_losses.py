"""DiffusionLoss: targets, weightings, time sampling, condition dropout, determinism."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import diffkit as dk
from diffkit.losses import LOSSES, DiffusionLoss
from diffkit.prediction import from_x0_eps
from diffkit.schedules import EDM, Cosine, LinearBeta, RectifiedFlow


class Oracle(nn.Module):
    """Knows x0 and eps (set before the call) and predicts exactly, plus an optional bias."""

    def __init__(self, prediction: str, bias: float = 0.0) -> None:
        super().__init__()
        self.prediction = prediction
        self.bias = bias
        self.schedule: dk.NoiseSchedule = LinearBeta()
        self.x0 = torch.zeros(())

    def forward(self, x_t, t, cond=None):  # type: ignore[no-untyped-def]
        a = self.schedule.alpha(t.double())[:, None]
        s = self.schedule.sigma(t.double())[:, None]
        eps = (x_t.double() - a * self.x0) / s
        return from_x0_eps(self.x0, eps, self.prediction, a[:, 0], s[:, 0]).float() + self.bias


class Recorder(nn.Module):
    prediction = "epsilon"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dk.Conditioning | None] = []
        self.times: list[torch.Tensor] = []

    def forward(self, x_t, t, cond=None):  # type: ignore[no-untyped-def]
        self.seen.append(cond)
        self.times.append(t)
        return torch.zeros_like(x_t)


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v", "flow"])
@pytest.mark.parametrize("target", [None, "epsilon", "x0", "v", "flow"])
@pytest.mark.parametrize("weighting", ["simple", "min_snr", "edm", "v"])
def test_a_perfect_denoiser_has_zero_loss(prediction: str, target: str, weighting: str) -> None:
    model = Oracle(prediction)
    x0 = torch.randn(16, 6, dtype=torch.float64)
    model.x0 = x0
    loss = DiffusionLoss(target=target, weighting=weighting)  # type: ignore[arg-type]
    value = loss(model, model.schedule, x0.float(), generator=torch.Generator().manual_seed(0))
    assert value.item() == pytest.approx(0.0, abs=1e-6)


@given(t=st.floats(0.05, 0.95))
def test_min_snr_weight_equals_the_same_x0_weight_in_every_target_space(t: float) -> None:
    loss = DiffusionLoss(weighting="min_snr", min_snr_gamma=5.0)
    schedule = Cosine()
    tt = torch.tensor([t], dtype=torch.float64)
    a, s = schedule.alpha(tt), schedule.sigma(tt)
    snr = (a / s) ** 2
    x0_weight = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64))
    # errors of an x0 mistake d in each target space, at fixed x_t
    d = 0.1
    errors = {"x0": d, "epsilon": -a / s * d, "v": -(a**2 + s**2) / s * d, "flow": -(a + s) / s * d}
    for target, err in errors.items():
        weighted = loss.weight(a, s, target) * err**2  # type: ignore[arg-type]
        torch.testing.assert_close(weighted, x0_weight * d**2)


def test_loss_is_deterministic_given_the_generator_and_differs_across_seeds() -> None:
    model = Oracle("epsilon", bias=0.3)
    x0 = torch.randn(8, 4, dtype=torch.float64)
    model.x0 = x0
    loss = DiffusionLoss(weighting="min_snr")
    runs = [
        loss(model, model.schedule, x0.float(), generator=torch.Generator().manual_seed(s))
        for s in (1, 1, 2)
    ]
    assert runs[0].item() == runs[1].item() != runs[2].item()


@pytest.mark.parametrize("sampling", ["uniform", "log_normal", "logit_normal", "discrete"])
@pytest.mark.parametrize("schedule", [LinearBeta(), EDM(), RectifiedFlow()], ids=str)
def test_time_sampling_stays_inside_the_unit_interval(sampling: str, schedule) -> None:  # type: ignore[no-untyped-def]
    loss = DiffusionLoss(time_sampling=sampling, num_steps=10)  # type: ignore[arg-type]
    t = loss.sample_time(schedule, 4096, torch.Generator().manual_seed(0))
    assert t.dtype == torch.float64 and bool(((t > 0) & (t <= 1)).all())
    if sampling == "discrete":
        assert set((t * 10).round().long().tolist()) == set(range(1, 11))
    if sampling == "uniform":
        assert t.mean().item() == pytest.approx(0.5, abs=0.02)


def test_cond_dropout_replaces_the_condition_by_uncond_at_the_configured_rate() -> None:
    model = Recorder()
    x0 = torch.randn(4000, 2)
    cond = dk.Conditioning(pooled=torch.ones(4000, 3))
    uncond = dk.Conditioning(pooled=torch.full((1, 3), -1.0))
    loss = DiffusionLoss(cond_dropout=0.25)
    loss(
        model,
        LinearBeta(),
        x0,
        cond=cond,
        uncond=uncond,
        generator=torch.Generator().manual_seed(0),
    )
    seen = model.seen[-1]
    assert seen is not None and seen.pooled is not None
    dropped = (seen.pooled[:, 0] == -1).float().mean().item()
    assert dropped == pytest.approx(0.25, abs=0.03)
    assert set(seen.pooled[:, 0].tolist()) == {1.0, -1.0}


def test_cond_dropout_on_tokens_and_pooled_needs_an_uncond_with_those_fields() -> None:
    # Zero tokens and an all-False mask would be a null that sampling never guides against
    # (Pipeline.generate guides against the empty prompt).
    cond = dk.Conditioning(
        tokens=torch.ones(500, 2, 3),
        mask=torch.ones(500, 2, dtype=torch.bool),
        pooled=torch.ones(500, 4),
    )
    loss = DiffusionLoss(cond_dropout=0.5)
    model = Recorder()
    with pytest.raises(
        ValueError, match=r"cond_dropout=0\.5 on tokens/pooled/mask needs an uncond"
    ) as caught:
        loss(model, LinearBeta(), torch.randn(500, 2), cond=cond)
    assert 'text.condition([""])' in str(caught.value)
    partial = dk.Conditioning(tokens=torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match=r"on pooled/mask needs an uncond.*uncond without pooled"):
        loss(model, LinearBeta(), torch.randn(500, 2), cond=cond, uncond=partial)
    assert model.seen == []
    null = dk.Conditioning(
        tokens=torch.full((1, 2, 3), -1.0),
        mask=torch.tensor([[True, False]]),
        pooled=torch.full((1, 4), -1.0),
    )
    loss(
        model,
        LinearBeta(),
        torch.randn(500, 2),
        cond=cond,
        uncond=null,
        generator=torch.Generator().manual_seed(0),
    )
    seen = model.seen[-1]
    assert seen is not None and seen.tokens is not None
    assert seen.mask is not None and seen.pooled is not None
    dropped = seen.tokens[:, 0, 0] == -1
    assert 0.4 < dropped.float().mean().item() < 0.6
    assert torch.equal(seen.mask[:, 1], ~dropped)
    assert torch.equal(seen.pooled[:, 0] == -1, dropped)
    # Without dropout no null is needed.
    DiffusionLoss()(Recorder(), LinearBeta(), torch.randn(500, 2), cond=cond)


def test_cond_dropout_on_labels_needs_an_uncond_null_label() -> None:
    # Without uncond a dropped label would become class 0, a real class.
    cond = dk.Conditioning(labels=torch.full((8,), 2), pooled=torch.ones(8, 3))
    loss = DiffusionLoss(cond_dropout=0.5)
    for uncond in (None, dk.Conditioning(pooled=torch.zeros(1, 3))):
        model = Recorder()
        with pytest.raises(ValueError, match=r"cond_dropout=0\.5 on labels needs uncond="):
            loss(model, LinearBeta(), torch.randn(8, 2), cond=cond, uncond=uncond)
        assert model.seen == []
    model = Recorder()
    null = dk.Conditioning(labels=torch.tensor([10]), pooled=torch.zeros(1, 3))
    loss(
        model,
        LinearBeta(),
        torch.randn(8, 2),
        cond=cond,
        uncond=null,
        generator=torch.Generator().manual_seed(0),
    )
    seen = model.seen[-1]
    assert seen is not None and seen.labels is not None
    assert set(seen.labels.tolist()) == {2, 10}
    # Labels without dropout need no null label.
    DiffusionLoss()(Recorder(), LinearBeta(), torch.randn(8, 2), cond=cond)


def test_explicit_time_overrides_sampling() -> None:
    model = Recorder()
    t = torch.full((3,), 0.42, dtype=torch.float64)
    DiffusionLoss()(model, LinearBeta(), torch.randn(3, 2), t=t)
    torch.testing.assert_close(model.times[-1], t.float())


@pytest.mark.parametrize(
    ("dtype", "time_dtype"),
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_the_denoiser_gets_the_noising_time_unrounded_as_samplers_pass_it(
    dtype: torch.dtype, time_dtype: torch.dtype
) -> None:
    # A bf16 model told t rounded to bf16 (0.537 -> 0.5352) learns a shifted time;
    # samplers pass float32 (float64 for float64 data).
    model = Recorder()
    t = torch.tensor([0.537, 0.913, 0.0123], dtype=torch.float64)
    DiffusionLoss()(model, LinearBeta(), torch.randn(3, 2, dtype=dtype), t=t)
    assert model.times[-1].dtype == time_dtype
    torch.testing.assert_close(model.times[-1], t.to(time_dtype), rtol=0, atol=0)


def test_loss_config_round_trips_and_validates() -> None:
    config = DiffusionLoss(weighting="edm", time_sampling="log_normal", cond_dropout=0.1)
    assert LOSSES.parse(config.to_json()) == config
    assert LOSSES.build(config) is config  # the loss is its config
    with pytest.raises(Exception, match="cond_dropout"):
        DiffusionLoss(cond_dropout=1.5)
    with pytest.raises(Exception, match="weighting"):
        DiffusionLoss(weighting="snr")  # type: ignore[arg-type]
    with pytest.raises(Exception, match=r"t_min \(0\.9\) must not exceed t_max \(0\.1\)"):
        DiffusionLoss(t_min=0.9, t_max=0.1)
    assert DiffusionLoss(t_min=0.5, t_max=0.5).t_min == 0.5
