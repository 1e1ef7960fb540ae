"""Every protocol method rejects a wrong shape or dtype with an error naming the argument."""

from typing import Any

import pytest
import torch

import diffkit as dk
from diffkit.nn import (
    DiT,
    DiTConfig,
    KLAutoencoder,
    KLAutoencoderConfig,
    UNet,
    UNetConfig,
    VideoDiT,
    VideoDiTConfig,
)
from diffkit.schedules import Cosine


def _unet() -> UNet:
    return UNet(
        UNetConfig(
            in_channels=2,
            base_channels=8,
            channel_mult=(1, 2),
            blocks_per_level=1,
            attention_resolutions=(),
            norm_groups=4,
            attention_head_dim=8,
        )
    )


def _vae() -> KLAutoencoder:
    return KLAutoencoder(
        KLAutoencoderConfig(
            in_channels=1,
            base_channels=8,
            channel_mult=(1, 2),
            blocks_per_level=1,
            latent_channels=2,
            norm_groups=4,
            mid_attention=False,
        )
    )


def _raises(fn: Any, *args: Any, match: str, **kwargs: Any) -> None:
    with pytest.raises(dk.ShapeError, match=match):
        fn(*args, **kwargs)


@pytest.mark.parametrize("method", ["alpha", "sigma", "log_snr", "t_of_log_snr"])
def test_noise_schedule_methods_name_the_bad_argument(method: str) -> None:
    fn = getattr(Cosine(), method)
    _raises(fn, torch.zeros(2, 2), match=r"argument '(t|log_snr)' has 2 dimensions")
    _raises(fn, torch.zeros(2, dtype=torch.int64), match=r"argument '(t|log_snr)' has dtype")


def test_unet_denoiser_names_the_bad_argument_and_dimension() -> None:
    net = _unet()
    assert isinstance(net, dk.Denoiser)
    _raises(net, torch.zeros(2, 2, 8, 8), torch.zeros(3), match=r"'t' dimension 'batch' is 3")
    _raises(net, torch.zeros(2, 8, 8), torch.zeros(2), match=r"'x_t' has 3 dimensions")


def test_dit_and_video_denoisers_name_the_bad_argument() -> None:
    dit = DiT(DiTConfig(in_channels=2, patch_size=2, dim=16, depth=1, num_heads=2))
    _raises(dit, torch.zeros(2, 2, 8, 8), torch.zeros(1), match=r"'t' dimension 'batch' is 1")
    video = VideoDiT(
        VideoDiTConfig(in_channels=2, patch_size=(2, 2, 2), dim=16, depth=1, num_heads=2)
    )
    _raises(video, torch.zeros(2, 2, 8, 8), torch.zeros(2), match=r"'x_t' has 4 dimensions")


def test_sampler_names_the_bad_argument() -> None:
    sampler = dk.samplers.REGISTRY["dpmpp_2m"]()
    assert isinstance(sampler, dk.Sampler)
    _raises(
        sampler.sample,
        _unet(),
        Cosine(),
        torch.zeros(2, 2, 8, 8, dtype=torch.int64),
        steps=2,
        match=r"argument 'noise' has dtype",
    )


def test_encoder_methods_name_the_bad_argument() -> None:
    vae = _vae()
    assert isinstance(vae, dk.Encoder)
    _raises(vae.encode, torch.zeros(8, 8), match=r"KLAutoencoder.*got \(8,\)")
    _raises(vae.decode, torch.zeros(2, 8), match=r"got shape \(2, 8\)")
    _raises(vae.encode, torch.zeros(2, 1, 8, 8, dtype=torch.int64), match=r"'x' has dtype")


def test_patchifier_methods_name_the_bad_argument() -> None:
    spatial = dk.patches.SpatialPatches(2)
    assert isinstance(spatial, dk.Patchifier)
    _raises(spatial.patchify, torch.zeros(2, 8, 8), match=r"argument 'x' has 3 dimensions")
    _raises(spatial.unpatchify, torch.zeros(2, 16), (1, 8, 8), match=r"argument 'tokens'")
    tubelets = dk.patches.TubeletPatches((2, 2, 2))
    _raises(tubelets.patchify, torch.zeros(2, 1, 8, 8), match=r"argument 'x' has 4 dimensions")
    with pytest.raises(ValueError, match="height"):
        spatial.patchify(torch.zeros(1, 1, 7, 8))


def test_text_conditioner_rejects_empty_and_non_text_input() -> None:
    from diffkit.nn.clip import TextTowerConfig
    from diffkit.text import CLIPTextConditioner, CLIPTextConditionerConfig

    conditioner = CLIPTextConditioner.from_config(
        CLIPTextConditionerConfig(
            text=TextTowerConfig(vocab_size=260, context_length=8, width=16, layers=1, heads=2),
            tokenizer="byte",
        )
    )
    assert isinstance(conditioner, dk.TextConditioner)
    with pytest.raises(ValueError, match="empty list of texts"):
        conditioner.condition([])
    out = conditioner.condition(["a seven", "a one"])
    assert out.tokens is not None and out.tokens.shape == (2, 8, 16)
