"""Classifier-free guidance: the formula and the batched wrapper."""

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import diffkit as dk
from diffkit import samplers
from diffkit.guidance import Guided, classifier_free, unused_uncond
from diffkit.schedules import Cosine


@given(scale=st.floats(-2, 10))
def test_classifier_free_is_uncond_plus_scaled_difference(scale: float) -> None:
    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    torch.testing.assert_close(classifier_free(c, u, scale), u + scale * (c - u))


def test_scale_one_is_the_conditional_and_zero_the_unconditional() -> None:
    c, u = torch.randn(2, 4), torch.randn(2, 4)
    torch.testing.assert_close(classifier_free(c, u, 1.0), c)
    torch.testing.assert_close(classifier_free(c, u, 0.0), u)


def test_half_precision_inputs_are_combined_in_float32() -> None:
    c, u = torch.randn(2, 4).bfloat16(), torch.randn(2, 4).bfloat16()
    out = classifier_free(c, u, 7.5)
    assert out.dtype == torch.bfloat16
    expected = (u.float() + 7.5 * (c.float() - u.float())).bfloat16()
    torch.testing.assert_close(out, expected)


class _Model:
    prediction = "v"

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, x, t, cond=None):
        self.batches.append(x.shape[0])
        return x * t[:, None] + cond.pooled


def test_guided_wrapper_makes_one_batched_call_matching_two_calls() -> None:
    model = _Model()
    cond = dk.Conditioning(pooled=torch.full((1, 3), 2.0))
    uncond = dk.Conditioning(pooled=torch.zeros(1, 3))
    x, t = torch.randn(4, 3), torch.rand(4)
    guided = Guided(model, uncond, 3.0)
    assert guided.prediction == "v"
    out = guided(x, t, cond)
    assert model.batches == [8]
    expected = classifier_free(model(x, t, cond.expand(4)), model(x, t, uncond.expand(4)), 3.0)
    torch.testing.assert_close(out, expected)


def test_guided_at_scale_one_warns_that_uncond_is_unused_and_skips_it() -> None:
    uncond = dk.Conditioning(pooled=torch.zeros(1, 3))
    model = _Model()
    with pytest.warns(UserWarning, match="^Guided: uncond is unused with guidance 1") as seen:
        guided = Guided(model, uncond, 1.0)
    assert [w.filename for w in seen] == [__file__]
    cond = dk.Conditioning(pooled=torch.full((1, 3), 2.0))
    x, t = torch.randn(4, 3), torch.rand(4)
    torch.testing.assert_close(guided(x, t, cond), model(x, t, cond.expand(4)))
    assert model.batches == [4, 4]  # the conditional model alone
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Guided(_Model(), uncond, 0.0)  # scale 0 is the unconditional model: uncond is used


def test_an_uncond_with_guidance_one_is_dropped_with_a_warning_naming_the_call() -> None:
    uncond = dk.Conditioning(pooled=torch.zeros(1, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert unused_uncond("f", 2.0, uncond) is uncond
        assert unused_uncond("f", 1.0, None) is None
    with pytest.warns(UserWarning, match="^f: uncond is unused with guidance 1 .* pass guidance"):
        assert unused_uncond("f", 1.0, uncond) is None


@pytest.mark.parametrize(
    ("where", "call"),
    [
        (
            "DDIMInversion.invert",
            lambda den, x, **kw: samplers.DDIMInversion().invert(den, Cosine(), x, steps=2, **kw),
        ),
        (
            "fit_solver",
            lambda den, x, **kw: samplers.fit_solver(den, Cosine(), x, 2, teacher_steps=4, **kw),
        ),
        (
            "fit_grid",
            lambda den, x, **kw: samplers.fit_grid(den, Cosine(), x, 2, teacher_steps=4, **kw),
        ),
    ],
)
def test_inversion_and_fitting_warn_once_on_an_unused_uncond(where, call) -> None:
    model = _Model()
    cond = dk.Conditioning(pooled=torch.full((1, 3), 2.0))
    uncond = dk.Conditioning(pooled=torch.zeros(1, 3))
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        call(model, x, cond=cond, uncond=uncond, guidance=1.0)
    assert [str(w.message).split(":")[0] for w in seen] == [where]
    assert [w.filename for w in seen] == [__file__]
    assert set(model.batches) == {4}  # never the doubled cond + uncond batch


def test_sampler_guidance_and_the_guided_wrapper_are_one_implementation() -> None:
    # The sampler batches the conditioning once and calls guidance.predict at every step;
    # Guided calls the same function: the same samples, bit for bit.
    model = _Model()
    cond = dk.Conditioning(pooled=torch.full((1, 3), 2.0))
    uncond = dk.Conditioning(pooled=torch.zeros(1, 3))
    noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    sampler = samplers.DDIM()
    inside = sampler.sample(model, Cosine(), noise, steps=4, cond=cond, uncond=uncond, guidance=3.0)
    wrapped = sampler.sample(Guided(model, uncond, 3.0), Cosine(), noise, steps=4, cond=cond)
    assert torch.equal(inside, wrapped)


def test_a_guided_output_of_another_shape_is_named() -> None:
    def half(x, t, cond=None):
        return x[: x.shape[0] // 2]

    half.prediction = "x0"  # type: ignore[attr-defined]
    uncond = dk.Conditioning(pooled=torch.zeros(1, 3))
    guided = Guided(half, uncond, 2.0)
    with pytest.raises(dk.ShapeError, match=r"output is \(4, 3\), expected .* \(8, 3\) \(cond and"):
        guided(torch.randn(4, 3), torch.rand(4), dk.Conditioning(pooled=torch.ones(1, 3)))


@pytest.mark.parametrize("rescale", [0.0, 0.3, 1.0])
def test_guidance_rescale_is_lin_et_als_formula(rescale: float) -> None:
    # diffusers' rescale_noise_cfg, written out: std over all but the batch dimension.
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)

    def model(x, t, c=None):
        return torch.cat([cond, uncond])

    model.prediction = "epsilon"  # type: ignore[attr-defined]
    out = dk.guidance.predict(model, cond, torch.zeros(6), None, 7.5, rescale=rescale)
    cfg = uncond + 7.5 * (cond - uncond)
    std_text = cond.std(dim=[1, 2, 3], keepdim=True)
    std_cfg = cfg.std(dim=[1, 2, 3], keepdim=True)
    expected = rescale * (cfg * (std_text / std_cfg)) + (1 - rescale) * cfg
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    if rescale == 1.0:
        torch.testing.assert_close(out.std(dim=[1, 2, 3]), cond.std(dim=[1, 2, 3]))
