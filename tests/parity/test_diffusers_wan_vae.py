"""diffkit's causal video autoencoder reproduces diffusers' AutoencoderKLWan (Wan 2.1 VAE).

diffusers encodes in chunks of 1, 4, 4, ... frames and decodes one latent frame at a time
with a causal feature cache; diffkit codes the whole clip at once. Both are compared on small
randomly initialised models, videos ``(batch, frames, c, h, w)`` in diffkit against
``(batch, c, frames, h, w)`` in diffusers. diffusers upsamples in float32 even for float64
weights (``WanUpsample``), which bounds the float64 decode agreement near 1e-7.
"""

from typing import Any

import pytest
import torch

import diffkit as dk
from diffkit.interop._diffusers_wan_vae import wan_vae_config, wan_vae_keys
from diffkit.nn import CausalVideoAutoencoder, CausalVideoAutoencoderConfig

pytestmark = pytest.mark.parity
diffusers = pytest.importorskip("diffusers")

TINY: dict[str, Any] = {
    "base_dim": 8,
    "z_dim": 4,
    "dim_mult": [1, 2, 2, 2],  # 8x spatial
    "num_res_blocks": 1,
    "temperal_downsample": [False, True, True],  # 4x temporal
    "latents_mean": [0.1, -0.2, 0.3, 0.0],
    "latents_std": [1.5, 2.0, 0.5, 1.0],
}


def _wan(dtype: torch.dtype, **overrides: Any) -> Any:
    """A tiny AutoencoderKLWan with its RMS-norm scales randomised too."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(**{**TINY, **overrides})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    torch.nn.Module.to(vae, dtype=dtype)
    return vae.eval()


def _video(dtype: torch.dtype, frames: int = 9) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.rand(2, 3, frames, 16, 16, generator=g, dtype=dtype) * 2 - 1  # diffusers' layout


def _ours(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)  # (b, c, f, h, w) <-> (b, f, c, h, w)


@pytest.mark.parametrize(
    ("dtype", "enc_tol", "dec_tol"),
    [(torch.float32, 1e-5, 1e-5), (torch.float64, 1e-12, 1e-6)],
)
def test_wan_vae_whole_clip_matches_diffusers_chunked_encode_and_decode(
    dtype: torch.dtype, enc_tol: float, dec_tol: float
) -> None:
    vae = _wan(dtype)
    ours: Any = dk.interop.from_diffusers(vae)
    assert isinstance(ours, CausalVideoAutoencoder)
    x = _video(dtype)
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
        assert mean.shape == (2, 4, 3, 2, 2)  # 1 + (9 - 1) / 4 latent frames, 16 / 8
        posterior = ours.posterior(_ours(x))
        assert (posterior.mean - _ours(mean)).abs().max() <= enc_tol
        # encode: Wan's per-channel normalisation of the posterior mean
        shift, scale = (
            torch.tensor(TINY[k], dtype=dtype).view(1, 4, 1, 1, 1)
            for k in ("latents_mean", "latents_std")
        )
        normalised = (mean - shift) / scale
        assert (ours.encode(_ours(x)) - _ours(normalised)).abs().max() <= enc_tol
        decoded = vae.decode(mean).sample
        assert decoded.shape == x.shape
        assert (ours.decode(_ours(normalised)) - _ours(decoded)).abs().max() <= dec_tol


def test_wan_vae_image_is_a_one_frame_video():
    vae = _wan(torch.float64)
    ours: Any = dk.interop.from_diffusers(vae)
    video = _video(torch.float64)
    x = video[:, :, :1]
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean  # (2, 4, 1, 2, 2)
        image = ours.posterior(x[:, :, 0]).mean  # an image (b, c, h, w)
        assert image.shape == (2, 4, 2, 2)
        assert (image - mean[:, :, 0]).abs().max() <= 1e-12
        # and the first latent frame of a longer clip is that image's latent (causality)
        clip = ours.posterior(_ours(video)).mean
        assert (clip[:, 0] - image).abs().max() <= 1e-12
        assert ours.decode(ours.encode(x[:, :, 0])).shape == (2, 3, 16, 16)


def test_wan_vae_to_diffusers_loads_strict_and_round_trips():
    ours = CausalVideoAutoencoder(
        CausalVideoAutoencoderConfig(
            base_channels=8,
            decoder_base_channels=12,
            channel_mult=(1, 2, 2),
            blocks_per_level=2,
            temporal_downsample=(True, False),
            latent_channels=4,
        )
    ).double()
    vae: Any = dk.interop.to_diffusers(ours)  # loads with strict=True
    assert type(vae).__name__ == "AutoencoderKLWan"
    fresh = diffusers.AutoencoderKLWan(**vae.config).double()
    fresh.load_state_dict(dk.interop.to_diffusers_state_dict(ours), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), vae.parameters(), strict=True))
    assert vae.config.decoder_base_dim == 12
    back: Any = dk.interop.from_diffusers(vae)
    assert back.config == ours.config.model_copy(
        update={"out_channels": 3, "latents_mean": (0.0,) * 4, "latents_std": (1.0,) * 4}
    )
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 3, 5, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        z = ours.encode(_ours(x))
        assert z.shape == (1, 3, 4, 2, 2)  # 2x in time: 1 + 4 / 2
        assert (_ours(vae.encode(x).latent_dist.mean) - z).abs().max() <= 1e-12
        assert (_ours(vae.decode(_ours(z)).sample) - ours.decode(z)).abs().max() <= 1e-6


def test_wan_vae_refuses_what_it_cannot_honour_by_name():
    config = dict(_wan(torch.float32).config)
    for name, value in [
        ("is_residual", True),
        ("patch_size", 2),
        ("attn_scales", [1.0]),
        ("scale_factor_temporal", 8),
        ("scale_factor_spatial", 16),
        ("some_new_option", 1),
    ]:
        with pytest.raises(ValueError, match=name):
            wan_vae_config({**config, name: value})
    scaled = CausalVideoAutoencoder(
        CausalVideoAutoencoderConfig(
            base_channels=8, channel_mult=(1, 2), temporal_downsample=(True,), scaling_factor=0.5
        )
    )
    with pytest.raises(ValueError, match="scaling_factor"):
        dk.interop.to_diffusers(scaled)
    unclamped = CausalVideoAutoencoder(
        scaled.config.model_copy(update={"scaling_factor": 1.0, "clamp_output": False})
    )
    with pytest.raises(ValueError, match="clamp_output"):
        dk.interop.to_diffusers(unclamped)


def test_full_size_wan_vae_builds_on_meta_with_every_tensor_mapped():
    with torch.device("meta"):
        vae = diffusers.AutoencoderKLWan()  # diffusers' defaults: the Wan 2.1 VAE
        ours = CausalVideoAutoencoder(wan_vae_config(vae.config))
    assert ours.config.base_channels == 96 and ours.config.latent_channels == 16
    assert ours.config.temporal_downsampling_factor == 4
    assert ours.config.downsampling_factor == 8
    assert ours.config.latents_mean == tuple(vae.config.latents_mean)  # Wan's statistics
    assert ours.config.latents_std == tuple(vae.config.latents_std)
    theirs = vae.state_dict()
    mine = ours.state_dict()
    keys = wan_vae_keys(ours)
    assert set(keys) == set(mine)
    assert sorted(keys.values()) == sorted(theirs)
    for dk_name, df_name in keys.items():
        assert mine[dk_name].numel() == theirs[df_name].numel(), dk_name
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in vae.parameters())
    assert all(p.is_meta for p in ours.parameters())


def test_wan_vae_float64_decode_agrees_to_rounding_once_diffusers_upsamples_in_float64(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from diffusers.models.autoencoders import autoencoder_kl_wan

    # WanUpsample casts to float32 around nn.Upsample; without the cast the float64 gap is
    # rounding, which shows the 1e-7 above is that cast, not a difference in the maths
    monkeypatch.setattr(autoencoder_kl_wan.WanUpsample, "forward", torch.nn.Upsample.forward)
    vae = _wan(torch.float64)
    ours: Any = dk.interop.from_diffusers(vae)
    with torch.no_grad():
        mean = vae.encode(_video(torch.float64)).latent_dist.mean
        decoded = vae.decode(mean).sample
        assert (
            ours.decode(ours.encode(_ours(_video(torch.float64)))) - _ours(decoded)
        ).abs().max() <= 1e-12
