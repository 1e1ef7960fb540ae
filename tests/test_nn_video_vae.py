"""Tests for diffkit.nn.video_vae: the causal 3-D KL autoencoder and its use in a pipeline."""

from pathlib import Path
from typing import Any

import pytest
import torch

import diffkit as dk
from diffkit.builder import build
from diffkit.data import Batch
from diffkit.nn import ENCODERS, CausalVideoAutoencoder, CausalVideoAutoencoderConfig
from diffkit.pipeline import Pipeline
from diffkit.pipeline_config import PipelineConfig
from diffkit.training import AutoencoderLoss
from diffkit.typing import ShapeError

TINY: dict[str, Any] = {
    "kind": "causal_video_autoencoder",
    "base_channels": 8,
    "channel_mult": (1, 2, 2),  # 4x in space
    "blocks_per_level": 1,
    "temporal_downsample": (True, True),  # 4x in time
    "latent_channels": 4,
}


def _tiny(**overrides: Any) -> CausalVideoAutoencoder:
    torch.manual_seed(0)
    model = ENCODERS.build({**TINY, **overrides})
    assert isinstance(model, CausalVideoAutoencoder)
    return model.double().eval()


def _video(frames: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, frames, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1


def test_latent_shape_compresses_time_and_space_and_keeps_the_first_frame_alone():
    model = _tiny()
    assert isinstance(model, dk.Encoder)
    assert model.latent_shape((9, 3, 16, 16)) == (3, 4, 4, 4)
    assert model.latent_shape((1, 3, 8, 8)) == (1, 4, 2, 2)
    assert model.latent_shape((3, 8, 8)) == (4, 2, 2)  # an image
    with pytest.raises(ShapeError, match="1 \\+ 4 k"):
        model.latent_shape((8, 3, 8, 8))
    with pytest.raises(ShapeError, match="height 6"):
        model.latent_shape((5, 3, 6, 8))
    with torch.no_grad():
        assert model.encode(_video(5)).shape == (2, 2, 4, 2, 2)
        assert model.decode(model.encode(_video(5))).shape == (2, 5, 3, 8, 8)


def test_later_frames_never_change_earlier_latents():
    model = _tiny()
    x = _video(9)
    changed = x.clone()
    changed[:, 5:] = _video(9, seed=1)[:, 5:]  # frames 5..8: the third latent frame's group
    with torch.no_grad():
        a, b = model.encode(x), model.encode(changed)
        assert torch.equal(a[:, :2], b[:, :2])
        assert (a[:, 2] - b[:, 2]).abs().max() > 1e-3
        # decoding is causal too: latent frame 2 only reaches output frames 5..8
        da, db = model.decode(a), model.decode(b)
        assert torch.equal(da[:, :5], db[:, :5])
        assert (da[:, 5:] - db[:, 5:]).abs().max() > 1e-6


def test_encode_normalises_per_channel_and_decode_inverts_it():
    mean, std = (0.5, -1.0, 0.0, 2.0), (2.0, 0.5, 1.0, 4.0)
    model = _tiny(latents_mean=mean, latents_std=std, scaling_factor=0.7, clamp_output=False)
    plain = _tiny(clamp_output=False)
    x = _video(5)
    with torch.no_grad():
        mu = plain.posterior(x).mean
        shift = torch.tensor(mean, dtype=mu.dtype).view(4, 1, 1)
        scale = torch.tensor(std, dtype=mu.dtype).view(4, 1, 1)
        z = model.encode(x)
        assert torch.allclose(z, (mu - shift) / scale * 0.7)
        assert torch.allclose(model.decode(z), plain.decode(mu))


def test_config_refuses_mismatched_temporal_downsample_and_statistics():
    with pytest.raises(ValueError, match="temporal_downsample"):
        CausalVideoAutoencoderConfig(channel_mult=(1, 2), temporal_downsample=(True, True))
    with pytest.raises(ValueError, match="latents_std"):
        CausalVideoAutoencoderConfig(latent_channels=4, latents_std=(1.0, 2.0))
    with pytest.raises(ValueError, match="decoder_base_channels"):
        CausalVideoAutoencoderConfig(
            decoder_base_channels=3, channel_mult=(1, 1), temporal_downsample=(False,)
        )


def test_video_pipeline_uses_the_causal_autoencoder_and_refuses_bad_frame_counts(
    tmp_path: Path,
) -> None:
    denoiser: dict[str, Any] = {
        "kind": "video_dit",
        "in_channels": 4,
        "patch_size": [1, 2, 2],
        "dim": 16,
        "depth": 1,
        "num_heads": 2,
        "freq_dim": 16,
        "prediction": "flow",
    }
    parts: dict[str, Any] = {
        "schedule": {"kind": "rectified_flow"},
        "denoiser": denoiser,
        "encoder": TINY,
        "patchifier": {"kind": "tubelet_patches", "patch_size": [1, 2, 2]},
        "sampler": {"kind": "euler"},
    }
    pipeline = build(PipelineConfig(data_shape=(5, 3, 16, 16), **parts))
    assert isinstance(pipeline.encoder, CausalVideoAutoencoder)
    assert pipeline.latent_shape() == (2, 4, 4, 4)
    g = torch.Generator().manual_seed(0)
    videos = pipeline.generate(num_samples=2, steps=2, generator=g)
    assert videos.shape == (2, 5, 3, 16, 16)
    assert videos.abs().max() <= 1.0
    pipeline.save(tmp_path)
    again = Pipeline.load(tmp_path).generate(
        num_samples=2, steps=2, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(videos, again)
    with pytest.raises(ValueError, match="6 frames"):
        PipelineConfig(data_shape=(6, 3, 16, 16), **parts)
    # the tubelets tile the latent frames (2), not the data frames (5)
    tubelets: dict[str, Any] = {
        **parts,
        "patchifier": {"kind": "tubelet_patches", "patch_size": [2, 2, 2]},
        "denoiser": {**denoiser, "patch_size": [2, 2, 2]},
    }
    PipelineConfig(data_shape=(5, 3, 16, 16), **tubelets)
    with pytest.raises(ValueError, match="frames 3 is not a multiple"):
        PipelineConfig(data_shape=(9, 3, 16, 16), **tubelets)


def test_autoencoder_loss_trains_the_time_layers_too():
    model = _tiny().float().train()
    x = _video(5).float()
    loss = AutoencoderLoss(kl_weight=1e-3)(model, Batch(x=x), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    loss.backward()
    temporal = [
        p for name, p in model.named_parameters() if ".temporal." in name and "weight" in name
    ]
    assert len(temporal) == 4  # two time halvings in the encoder, two doublings in the decoder
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in temporal)
