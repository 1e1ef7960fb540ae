"""Tests for diffkit.nn.vae: latent shapes, the Gaussian posterior and KL, videos, identity."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffkit as dk
from diffkit.nn import (
    ENCODERS,
    DiagonalGaussian,
    IdentityEncoder,
    KLAutoencoder,
    KLAutoencoderConfig,
)
from diffkit.typing import ShapeError


def _tiny(**overrides) -> KLAutoencoder:
    config = {
        "in_channels": 3,
        "base_channels": 8,
        "channel_mult": (1, 2),
        "blocks_per_level": 1,
        "latent_channels": 2,
        "norm_groups": 4,
    }
    config.update(overrides)
    return KLAutoencoder(KLAutoencoderConfig(**config)).eval()


@settings(max_examples=6)
@given(
    levels=st.integers(1, 3),
    latent=st.integers(1, 4),
    channels=st.integers(1, 3),
    h=st.integers(1, 2),
    w=st.integers(1, 2),
    frames=st.none() | st.integers(1, 2),
)
def test_latent_shape_is_what_the_config_promises(levels, latent, channels, h, w, frames):
    model = _tiny(
        channel_mult=(1,) * levels,
        latent_channels=latent,
        in_channels=channels,
        mid_attention=False,
    )
    f = 2 ** (levels - 1)
    shape = (channels, 2 * h * f, 2 * w * f)
    if frames is not None:
        shape = (frames, *shape)
    promised = model.latent_shape(shape)
    expected = (latent, 2 * h, 2 * w) if frames is None else (frames, latent, 2 * h, 2 * w)
    assert promised == expected
    with torch.no_grad():
        x = torch.randn(2, *shape)
        z = model.encode(x)
        assert tuple(z.shape[1:]) == promised
        assert model.decode(z).shape == x.shape


@given(
    mean=st.floats(-3, 3),
    logvar=st.floats(-4, 4),
    n=st.integers(1, 5),
)
def test_kl_is_nonnegative_and_zero_only_for_the_standard_normal(mean, logvar, n):
    posterior = DiagonalGaussian(torch.full((2, n), mean), torch.full((2, n), logvar))
    kl = posterior.kl()
    assert kl.shape == (2,)
    assert (kl >= 0).all()
    closed_form = 0.5 * n * (mean**2 + torch.tensor(logvar).exp() - 1 - logvar)
    assert torch.allclose(kl, closed_form.float().expand(2), rtol=1e-4, atol=1e-5)
    standard = DiagonalGaussian(torch.zeros(3, 4, 2, 2), torch.zeros(3, 4, 2, 2))
    assert torch.equal(standard.kl(), torch.zeros(3))


def test_posterior_samples_are_reparameterised_and_reproducible():
    mean = torch.zeros(4, 2, requires_grad=True)
    logvar = torch.zeros(4, 2, requires_grad=True)
    posterior = DiagonalGaussian(mean, logvar)
    a = posterior.sample(torch.Generator().manual_seed(1))
    b = posterior.sample(torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    a.sum().backward()
    assert mean.grad is not None and logvar.grad is not None


def test_encode_scales_the_posterior_mean_or_a_sample():
    model = _tiny(scaling_factor=0.5, shift_factor=0.1)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        posterior = model.posterior(x)
        z = model.encode(x)
        assert torch.allclose(z, (posterior.mean - 0.1) * 0.5)
        g = torch.Generator().manual_seed(0)
        sampled = model.encode(x, sample=True, generator=g)
        expected = (posterior.sample(torch.Generator().manual_seed(0)) - 0.1) * 0.5
        assert torch.allclose(sampled, expected)


def test_videos_are_coded_frame_by_frame():
    model = _tiny()
    video = torch.randn(2, 3, 3, 8, 8)
    with torch.no_grad():
        z = model.encode(video)
        per_frame = torch.stack([model.encode(video[:, i]) for i in range(3)], dim=1)
        assert torch.allclose(z, per_frame, atol=1e-6)
        decoded = model.decode(z)
        assert torch.allclose(decoded[:, 1], model.decode(z[:, 1]), atol=1e-6)


def test_encoder_rejects_bad_shapes_before_computing():
    model = _tiny(channel_mult=(1, 1, 1, 1))
    with pytest.raises(ShapeError, match="height 28 is not a multiple of 8"):
        model.encode(torch.randn(1, 3, 28, 32))
    with pytest.raises(ShapeError, match="1 channels, expected 3"):
        model.encode(torch.randn(1, 1, 32, 32))
    with pytest.raises(ShapeError, match="latents have 3 channels"):
        model.decode(torch.randn(1, 3, 4, 4))


def test_autoencoder_items_do_not_leak_and_forward_gives_the_kl_term():
    model = _tiny()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        before = model.encode(x)
        x2 = x.clone()
        x2[1] += 1.0
        after = model.encode(x2)
    assert torch.allclose(before[[0, 2]], after[[0, 2]], atol=1e-6)
    recon, posterior = model.train()(x, generator=torch.Generator().manual_seed(0))
    assert recon.shape == x.shape and posterior.kl().shape == (3,)


def test_encoders_satisfy_the_protocol_and_build_from_the_registry():
    vae = ENCODERS.build({"kind": "kl_autoencoder", "base_channels": 8, "norm_groups": 4})
    identity = ENCODERS.build({"kind": "identity", "channels": 1})
    assert isinstance(vae, dk.Encoder) and isinstance(identity, dk.Encoder)
    x = torch.randn(2, 1, 5, 7)
    assert identity.encode(x) is x and identity.decode(x) is x
    assert identity.latent_shape((4, 1, 5, 7)) == (4, 1, 5, 7)
    with pytest.raises(ShapeError):
        IdentityEncoder(3).encode(x)
