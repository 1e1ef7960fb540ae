"""Where a stochastic step's noise comes from: k-diffusion's ``noise_sampler``.

A step from noise level ``s_from`` to ``s_to`` (in ``s = sigma / alpha``) asks its
[`Noise`][diffkit.samplers.Noise] for a standard normal tensor. The default draws
independent Gaussians from the caller's generator, by logical index (see
``gaussian`` in ``samplers._base``).
[`BrownianTreeNoise`][diffkit.samplers.BrownianTreeNoise] returns the increments of one
Brownian motion in ``s`` (a ``torchsde.BrownianTree``, k-diffusion's
``BrownianTreeNoiseSampler``), so the draws of a step depend only on the interval it
covers: the same seed gives nearly the same sample at any step count.
"""

import math
import warnings

import torch
from torch import Tensor

from diffkit.samplers._base import gaussian

__all__ = ["BrownianTreeNoise", "Noise"]


class Noise:
    """Independent standard normal draws from ``generator``, whatever the interval."""

    def __init__(self, generator: torch.Generator | None) -> None:
        self.generator = generator

    def __call__(self, like: Tensor, s_from: float, s_to: float) -> Tensor:
        """A standard normal tensor of ``like``'s shape for the step ``s_from -> s_to``."""
        return gaussian(like, self.generator)


class BrownianTreeNoise(Noise):
    """Normalised increments ``(W(s_to) - W(s_from)) / sqrt|s_to - s_from|`` of one Brownian tree.

    The tree spans ``[s_min, s_max]``; its seed is ``seed`` if given, else one draw from
    ``generator`` (torch's global generator when ``None``: k-diffusion's
    ``torch.randint(0, 2**63 - 1, [])``), so a seeded generator gives the same tree, and
    k-diffusion's ``BrownianTreeNoiseSampler(x, s_min, s_max, seed=seed)`` is the same
    tree. Needs ``torchsde`` (installed with k-diffusion).
    """

    def __init__(
        self,
        like: Tensor,
        s_min: float,
        s_max: float,
        generator: torch.Generator | None,
        seed: int | None = None,
    ) -> None:
        super().__init__(generator)
        try:
            import torchsde  # optional dependency, loaded when used
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError(
                "Brownian-tree noise needs torchsde (pip install torchsde); or use noise='gaussian'"
            ) from error
        device = generator.device if generator is not None else torch.device("cpu")
        if seed is None:
            seed = int(torch.randint(0, 2**63 - 1, (), generator=generator, device=device))
        self.seed = seed
        w0 = torch.zeros(like.shape, dtype=like.dtype, device=like.device)
        self.tree = torchsde.BrownianTree(s_min, w0, s_max, entropy=self.seed)
        self.s_min, self.s_max = s_min, s_max

    def __call__(self, like: Tensor, s_from: float, s_to: float) -> Tensor:
        """The tree's increment over ``[s_to, s_from]``, scaled to unit variance.

        An interval reaching outside the tree (a step from pure noise, ``s = inf``) is
        clipped to it; one left empty draws plain Gaussians from the generator.
        """
        lo, hi = (min(max(v, self.s_min), self.s_max) for v in sorted((s_from, s_to)))
        if not hi > lo:
            return gaussian(like, self.generator)
        with warnings.catch_warnings():
            # torchsde rounds the tree's ends to its tolerance and warns when a query at
            # the end falls below the rounded value (it clamps it, as k-diffusion's does).
            warnings.filterwarnings("ignore", message="Should have t")
            w: Tensor = self.tree(lo, hi)  # type: ignore[assignment] # floats: no tensor sync
        sign = 1.0 if s_from < s_to else -1.0
        return w * (sign / math.sqrt(hi - lo))
