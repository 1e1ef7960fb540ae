"""Longer clips than trained: VDM's replacement method (Ho et al. 2022, §3.1).

A video model trained on ``window`` frames makes a longer clip one window at a time, each
new window conditioned on the last ``overlap`` frames already made. The conditioning is
*replacement*: at every evaluation the known frames ``x^a`` of the model's input are
replaced by ``alpha_t x^a + sigma_t z`` (the forward process at the model's time, fresh
``z`` from the generator), and the known frames' ``x0`` estimate by ``x^a`` itself. That
is a denoiser wrapper ([`Replacement`][diffkit.samplers.Replacement]), so **any** diffkit
sampler runs it unchanged.

Why replacement first: it needs only forward passes, no gradient through the model, so
it costs what unconditional sampling costs. Its known weakness: the new frames' estimate
is ``E[x^b | x_t^a, x_t^b]``, conditioned on the *noised* known frames, not
``E[x^b | x^a, x_t^b]``; at high noise the known frames say little and the new frames
follow them only loosely. Measured on the exact denoiser of a Gaussian video process
(``tests/test_extend.py``: frame-to-frame correlation 0.9, inside a window a mean squared
difference of 0.20), replacement alone leaves a visible seam (0.75 with DPM-Solver++).
VDM's reconstruction guidance fixes it: the new frames' estimate is corrected by
``-(w_r alpha_t / 2) grad_{x_t^b} ||x^a - x̂^a(x_t)||²``, a gradient through the model (one
backward pass per evaluation, taken under ``torch.enable_grad()``). ``extend_video``
therefore uses both, with ``w_r = 4`` by default (seam 0.19 against 0.20 inside);
``reconstruction=0`` is replacement alone, gradient-free.

[`seam_differences`][diffkit.samplers.seam_differences] measures a made clip's continuity:
the frame-to-frame difference where a new window starts against the differences inside
the windows. With a small model trained on 8-frame clips (``tests/test_extend_trained.py``)
16-frame clips show seams of 0.27 against 0.245 inside (mean absolute difference; 0.48 for
independent windows), given enough steps: 20 DPM-Solver++ steps left a seam (0.36) that 50
did not.
"""

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from diffkit.forward import add_noise
from diffkit.prediction import to_x0_eps
from diffkit.protocols import Conditioning, Denoiser, NoiseSchedule, Prediction, Sampler
from diffkit.typing import Sample, Time, broadcast_to_sample

__all__ = ["Replacement", "extend_video", "frame_differences", "seam_differences"]

Video = Float[Tensor, "batch frames *frame"]


class Replacement:
    """A denoiser whose first ``known.shape[1]`` frames are the given ``known`` frames.

    ``known`` is ``(batch, k, *frame)``; the wrapped denoiser takes videos
    ``(batch, frames, *frame)`` with ``frames >= k``. Each call replaces frames ``:k`` of
    ``x_t`` by ``alpha(t) known + sigma(t) z`` (fresh ``z`` from ``generator``; a guided
    call's two halves get the same draw), evaluates the denoiser there, and returns the
    ``x0`` estimate (``prediction = "x0"``) with frames ``:k`` set to ``known``. The times
    are those the sampler tells the model (a snapping spacing's rounded training steps).
    ``reconstruction > 0`` adds VDM's reconstruction guidance with that weight ``w_r``: the
    estimate moves by ``-(w_r alpha_t / 2)`` times the gradient, with respect to ``x_t``,
    of the squared error of the known frames' estimate (a backward pass through the model).
    """

    prediction: Prediction = "x0"

    def __init__(
        self,
        denoiser: Denoiser,
        schedule: NoiseSchedule,
        known: Video,
        generator: torch.Generator | None = None,
        reconstruction: float = 0.0,
    ) -> None:
        if known.ndim < 3:
            raise ValueError(f"known must be (batch, frames, *frame), got {tuple(known.shape)}")
        self.denoiser, self.schedule, self.known = denoiser, schedule, known
        self.generator, self.reconstruction = generator, float(reconstruction)

    def __call__(self, x_t: Sample, t: Time, cond: Conditioning | None = None) -> Sample:
        """``x0`` estimate at ``x_t`` ``(batch, frames, *frame)``, known frames replaced."""
        known, k = self.known, self.known.shape[1]
        if x_t.shape[0] % known.shape[0] or x_t.shape[2:] != known.shape[2:]:
            raise ValueError(
                f"Replacement: x_t {tuple(x_t.shape)} does not fit known {tuple(known.shape)}"
            )
        known = known.to(x_t.device, x_t.dtype)
        z = torch.empty_like(known).normal_(generator=self.generator)
        repeats = x_t.shape[0] // known.shape[0]
        known, z = (
            known.repeat(repeats, *[1] * (known.ndim - 1)),
            z.repeat(repeats, *[1] * (known.ndim - 1)),
        )
        x_in = x_t.clone()
        x_in[:, :k] = add_noise(self.schedule, known, z, t[: x_t.shape[0]])
        t64 = t.to(torch.float64)
        alpha, sigma = self.schedule.alpha(t64), self.schedule.sigma(t64)
        with torch.enable_grad():
            x_in.requires_grad_(self.reconstruction > 0)
            out = self.denoiser(x_in, t, cond)
            x0, _ = to_x0_eps(out, self.denoiser.prediction, x_in, alpha, sigma)
            if self.reconstruction > 0:  # VDM eq. 7: a gradient through the model
                error = (x0[:, :k] - known).square().sum()
                (grad,) = torch.autograd.grad(error, x_in)
                w = self.reconstruction * broadcast_to_sample(alpha, x0) / 2
                x0 = x0 - w * grad
        x0 = x0.detach().to(x_t.dtype)
        x0[:, :k] = known
        return x0


def extend_video(
    sampler: Sampler,
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    first: Video | None,
    *,
    window: int,
    overlap: int,
    total_frames: int,
    steps: int,
    shape: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    cond: Conditioning | None = None,
    guidance: float = 1.0,
    uncond: Conditioning | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
    reconstruction: float = 4.0,
) -> Video:
    """A ``(batch, total_frames, *frame)`` clip made window by window (VDM replacement).

    ``first`` ``(batch, f, *frame)`` starts the clip (``f >= overlap``); ``None`` samples a
    first window of ``shape = (batch, window, *frame)`` (its noise in ``dtype`` on
    ``device``). Each further window of ``window`` frames is sampled by ``sampler`` with
    its first ``overlap`` frames replaced by the clip's last ``overlap`` frames
    ([`Replacement`][diffkit.samplers.Replacement]); its new ``window - overlap`` frames
    are appended (the last window trimmed to ``total_frames``).
    ``reconstruction`` is the weight ``w_r`` of VDM's reconstruction guidance added to the
    replacement (0: replacement alone, which leaves a seam; see the module's text).
    """
    if not 0 < overlap < window:
        raise ValueError(f"overlap must be in [1, window - 1], got {overlap} (window {window})")
    if first is None:
        if shape is None or len(shape) < 3 or shape[1] != window:
            raise ValueError(f"without first, shape must be (batch, {window}, *frame)")
        noise = torch.empty(tuple(shape), dtype=dtype, device=device).normal_(generator=generator)
        first = sampler.sample(
            denoiser,
            schedule,
            noise,
            steps=steps,
            cond=cond,
            guidance=guidance,
            uncond=uncond,
            generator=generator,
        )
    if first.shape[1] < overlap:
        raise ValueError(f"first has {first.shape[1]} frames, fewer than overlap={overlap}")
    clip = first
    while clip.shape[1] < total_frames:
        known = clip[:, -overlap:]
        wrapped = Replacement(denoiser, schedule, known, generator, reconstruction)
        noise = torch.empty(
            (clip.shape[0], window, *clip.shape[2:]), dtype=clip.dtype, device=clip.device
        ).normal_(generator=generator)
        new = sampler.sample(
            wrapped,
            schedule,
            noise,
            steps=steps,
            cond=cond,
            guidance=guidance,
            uncond=uncond,
            generator=generator,
        )
        clip = torch.cat([clip, new[:, overlap:]], dim=1)
    return clip[:, :total_frames]


def frame_differences(clip: Video, p: float = 1.0) -> Float[Tensor, " pairs"]:
    """Mean ``|clip[:, i + 1] - clip[:, i]|^p`` over batch and pixels, per frame pair ``i``."""
    if clip.ndim < 3 or clip.shape[1] < 2:
        raise ValueError(f"clip must be (batch, frames >= 2, *frame), got {tuple(clip.shape)}")
    step = (clip[:, 1:] - clip[:, :-1]).abs().double() ** p
    return step.transpose(0, 1).flatten(1).mean(dim=1)


def seam_differences(
    clip: Video, *, window: int, overlap: int, p: float = 1.0
) -> tuple[float, dict[int, float]]:
    """``(inside, seams)``: frame differences inside the windows and at each seam.

    ``clip`` ``(batch, frames, *frame)`` is laid out as
    [`extend_video`][diffkit.samplers.extend_video] makes it: a first window of ``window``
    frames, then ``window - overlap`` new frames per further window, so the seams are the
    pairs ``(s - 1, s)`` with ``s = window + j (window - overlap) < frames``
    (``overlap=0``: windows side by side, e.g. independent ones). Differences are
    [`frame_differences`][diffkit.samplers.frame_differences] with exponent ``p``;
    ``inside`` is their mean over every pair that is not a seam, ``seams`` maps each seam's
    pair index ``s - 1`` to its difference. A clip without a visible seam has ``seams``
    close to ``inside``.
    """
    if window < 2 or not 0 <= overlap < window:
        raise ValueError(f"need window >= 2 and 0 <= overlap < window, got {window}, {overlap}")
    if clip.ndim < 3 or clip.shape[1] <= window:
        raise ValueError(
            f"clip must be (batch, frames > window={window}, *frame), got {tuple(clip.shape)}"
        )
    diffs = frame_differences(clip, p)
    at = list(range(window - 1, clip.shape[1] - 1, window - overlap))
    inside = [float(d) for i, d in enumerate(diffs) if i not in at]
    return sum(inside) / len(inside), {i: float(diffs[i]) for i in at}
