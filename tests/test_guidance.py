"""Classifier-free guidance: the formula and the batched wrapper."""

import torch
from hypothesis import given
from hypothesis import strategies as st

import diffkit as dk
from diffkit.guidance import Guided, classifier_free


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
