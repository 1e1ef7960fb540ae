"""Longer clips than trained: VDM replacement (diffkit.samplers.extend_video), no training.

The model is the *exact* denoiser of a known Gaussian video process: every pixel is a
stationary AR(1) sequence along time (unit variance, correlation ``RHO`` between
consecutive frames), independent across pixels. On an 8-frame window the covariance is
``S_ij = RHO^|i-j|`` and the posterior mean is closed form at every t:
``E[x0 | x_t] = alpha S (alpha² S + sigma² I)^-1 x_t``: the ideal model "trained on 8
frames". The expected mean squared frame-to-frame difference is ``2 (1 - RHO)``
everywhere; two independent windows side by side give 2 at their seam.
"""

import math

import pytest
import torch
from torch import Tensor

import diffkit as dk
from diffkit.builder import build
from diffkit.pipeline_config import PipelineConfig
from diffkit.protocols import Conditioning
from diffkit.samplers import (
    DDIM,
    DPMSolverPP,
    Replacement,
    UniPC,
    extend_video,
    frame_differences,
    seam_differences,
)

RHO, WINDOW = 0.9, 8
BATCH, SIDE = 32, 8  # 32 clips x 64 pixels = 2048 pixel sequences per frame pair


class GaussianVideo:
    """Exact x0 predictor of the AR(1) video process on windows of any length."""

    prediction = "x0"

    def __init__(self, schedule: dk.schedules.ScheduleBase) -> None:
        self.schedule = schedule

    def __call__(self, x_t: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
        f = x_t.shape[1]
        i = torch.arange(f, dtype=torch.float64)
        cov = RHO ** (i[:, None] - i[None, :]).abs()
        a = self.schedule.alpha(t.double())[:, None, None]
        s = self.schedule.sigma(t.double())[:, None, None]
        m = a * cov @ torch.linalg.inv(a * a * cov + s * s * torch.eye(f, dtype=torch.float64))
        return torch.einsum("bij,bj...->bi...", m, x_t.double()).to(x_t.dtype)


def corr(clip: Tensor, i: int) -> float:
    """Correlation of frames ``i`` and ``i + 1`` over batch and pixels (zero mean, unit var)."""
    a, b = clip[:, i].flatten(), clip[:, i + 1].flatten()
    return float((a * b).mean() / (a.square().mean() * b.square().mean()).sqrt())


def make(sampler, total: int, overlap: int, seed: int = 0, reconstruction: float = 4.0) -> Tensor:
    schedule = dk.schedules.LinearBeta()
    g = torch.Generator().manual_seed(seed)
    return extend_video(
        sampler,
        GaussianVideo(schedule),
        schedule,
        None,
        window=WINDOW,
        overlap=overlap,
        total_frames=total,
        steps=50,
        shape=(BATCH, WINDOW, 1, SIDE, SIDE),
        generator=g,
        dtype=torch.float64,
        reconstruction=reconstruction,
    )


EXPECTED = 2 * (1 - RHO)  # 0.2 (DPM-Solver++ and UniPC in 50 steps reach it; DDIM's 50 do not)
# Per pair, the estimate's relative standard error is sqrt(2 / 2048) ~ 3 %: 15 % is 5 sigma.
TOL = 0.15


@pytest.mark.parametrize(
    ("sampler", "total", "overlap"),
    [(DPMSolverPP(), 16, 4), (UniPC(), 16, 2), (DPMSolverPP(), 24, 4)],
)
def test_extended_clip_has_no_seam(sampler, total: int, overlap: int) -> None:
    clip = make(sampler, total, overlap)
    assert clip.shape == (BATCH, total, 1, SIDE, SIDE)
    inside, seams = seam_differences(clip, window=WINDOW, overlap=overlap, p=2)
    print(f"inside {inside:.4f}, seams", {i: round(d, 4) for i, d in seams.items()})
    assert len(seams) == math.ceil((total - WINDOW) / (WINDOW - overlap)) and WINDOW - 1 in seams
    assert abs(inside - EXPECTED) < TOL * EXPECTED
    for i, seam in seams.items():
        assert abs(seam - inside) < TOL * EXPECTED, (i, seam, inside)
        assert abs(corr(clip, i) - RHO) < 0.02, (i, corr(clip, i))
    # every pair of the clip keeps the process's statistics; the pair just after a seam is
    # the least exact (0.23 with UniPC and overlap 2; 0.20 is ideal), hence 25 % here
    for i, msd in enumerate(frame_differences(clip, p=2).tolist()):
        assert abs(msd - EXPECTED) < 0.25 * EXPECTED, (i, msd)


def test_replacement_alone_leaves_a_seam() -> None:
    """VDM's known weakness of replacement, measured: the seam is ~3.5x the inside."""
    clip = make(DPMSolverPP(), 16, 4, reconstruction=0.0)
    inside, seams = seam_differences(clip, window=WINDOW, overlap=4, p=2)
    print(f"replacement alone: inside {inside:.4f}, seams {seams}")
    assert list(seams) == [7, 11] and all(seam > 2.5 * inside for seam in seams.values())


def test_without_conditioning_the_seam_shows() -> None:
    """Independent windows side by side: the seam difference is ~2, ten times the inside."""
    a, b = make(DPMSolverPP(), WINDOW, 4, seed=0), make(DPMSolverPP(), WINDOW, 4, seed=1)
    clip = torch.cat([a, b], dim=1)
    inside, seams = seam_differences(clip, window=WINDOW, overlap=0, p=2)
    (seam,) = seams.values()
    print(f"unconditioned: inside {inside:.4f}, seam {seam:.4f}")
    assert abs(seam - 2.0) < 0.15 * 2.0
    assert seam > 5 * inside
    assert abs(corr(clip, WINDOW - 1)) < 0.1


def test_replacement_keeps_the_known_frames() -> None:
    schedule = dk.schedules.LinearBeta()
    known = torch.randn(2, 3, 1, 4, 4, dtype=torch.float64)
    wrapped = Replacement(GaussianVideo(schedule), schedule, known, torch.Generator())
    x = torch.randn(2, WINDOW, 1, 4, 4, dtype=torch.float64)
    out = wrapped(x, torch.full((2,), 0.5, dtype=torch.float64))
    assert torch.equal(out[:, :3], known)
    assert math.isfinite(float(out.abs().max()))
    g = torch.Generator().manual_seed(0)
    clip = extend_video(
        DDIM(),
        GaussianVideo(schedule),
        schedule,
        known,
        window=WINDOW,
        overlap=3,
        total_frames=11,
        steps=5,
        generator=g,
    )
    assert torch.equal(clip[:, :3], known) and clip.shape == (2, 11, 1, 4, 4)
    with pytest.raises(ValueError, match="overlap"):
        extend_video(DDIM(), wrapped, schedule, known, window=4, overlap=4, total_frames=8, steps=2)


def test_video_pipeline_extends_in_latent_space() -> None:
    """``Pipeline.extend``: a 4-frame video pipeline makes 10 frames, the first 4 its own."""
    config = PipelineConfig(
        data_shape=(4, 1, 8, 8),
        schedule={"kind": "rectified_flow"},
        denoiser={
            "kind": "video_dit",
            "in_channels": 1,
            "patch_size": [2, 2, 2],
            "dim": 16,
            "depth": 1,
            "num_heads": 2,
            "freq_dim": 16,
            "prediction": "flow",
        },
        patchifier={"kind": "tubelet_patches", "patch_size": [2, 2, 2]},
        sampler={"kind": "euler"},
        steps=3,
    )
    pipeline = build(config)
    video = pipeline.extend(
        frames=10, overlap=2, num_samples=2, generator=torch.Generator().manual_seed(0)
    )
    first = pipeline.generate(num_samples=2, generator=torch.Generator().manual_seed(0))
    assert video.shape == (2, 10, 1, 8, 8) and torch.isfinite(video).all()
    assert torch.equal(video[:, :4], first)
    more = pipeline.extend(frames=7, overlap=2, first=video[:, :5], generator=torch.Generator())
    assert more.shape == (2, 7, 1, 8, 8) and torch.equal(more[:, :5], video[:, :5])
    image = PipelineConfig(
        data_shape=(1, 8, 8),
        schedule={"kind": "rectified_flow"},
        denoiser={
            "kind": "unet",
            "in_channels": 1,
            "base_channels": 8,
            "channel_mult": [1],
            "blocks_per_level": 1,
            "attention_resolutions": [],
            "norm_groups": 4,
            "attention_head_dim": 8,
            "prediction": "flow",
        },
    )
    with pytest.raises(ValueError, match="needs a video pipeline"):
        build(image).extend(frames=8, overlap=2)


def test_replacement_serves_a_guided_batch() -> None:
    """Under classifier-free guidance the sampler doubles the batch; both halves see one draw."""
    schedule = dk.schedules.LinearBeta()
    seen: list[Tensor] = []

    class Recording(GaussianVideo):
        def __call__(self, x_t: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
            seen.append(x_t.clone())
            return super().__call__(x_t, t, cond)

    known = torch.randn(2, 3, 1, 4, 4, dtype=torch.float64)
    wrapped = Replacement(Recording(schedule), schedule, known, torch.Generator(), 4.0)
    x = torch.randn(4, WINDOW, 1, 4, 4, dtype=torch.float64)
    out = wrapped(x, torch.full((4,), 0.5, dtype=torch.float64))
    assert out.shape == x.shape and torch.equal(out[:2, :3], known)
    assert torch.equal(seen[0][:2, :3], seen[0][2:, :3])  # one draw for both halves
    assert not torch.equal(seen[0][:, :3], x[:, :3])  # the known frames were replaced
