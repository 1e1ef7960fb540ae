"""What a sampler does to each data estimate before a step uses it: clipping, thresholding.

Pixel-space models trained on data in ``[-1, 1]`` are often sampled with the estimate
``D = E[x0 | x_t]`` held in that range: clipped to ``[-limit, limit]`` (diffusers'
``clip_sample`` with ``clip_sample_range``), or Imagen's dynamic thresholding (Saharia et
al., 2022; diffusers' ``thresholding``): per sample, ``s`` is the ``ratio`` quantile of
``|D|``, held in ``[1, limit]`` (``sample_max_value``), and ``D`` becomes
``clamp(D, -s, s) / s``. A sampler with ``clip`` set applies it to every estimate it
evaluates; its steps then use the clipped ``D`` (DDIM keeps the unclipped noise estimate,
as diffusers' ``DDIMScheduler`` does: see [`DDIM`][diffkit.samplers.DDIM]).
"""

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from diffkit.config import Config

__all__ = ["Clip"]


class Clip(Config):
    """Clip (``dynamic=False``) or dynamically threshold (``dynamic=True``) each estimate ``D``."""

    kind: Literal["clip"] = "clip"
    dynamic: bool = Field(default=False, description="Imagen's dynamic thresholding")
    limit: float = Field(
        default=1.0, gt=0, description="clip range; dynamic: the most s may be (sample_max_value)"
    )
    ratio: float = Field(
        default=0.995, ge=0, le=1, description="dynamic: the quantile of |D| that sets s"
    )

    def __call__(self, d: Tensor) -> Tensor:
        """``D`` clipped, or thresholded per sample (``(batch, *shape)``, same dtype)."""
        if not self.dynamic:
            return d.clamp(-self.limit, self.limit)
        flat = d.reshape(d.shape[0], -1)
        work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
        s = torch.quantile(work.abs(), self.ratio, dim=1).clamp(1.0, self.limit)[:, None]
        return (torch.clamp(work, -s, s) / s).to(d.dtype).reshape(d.shape)
