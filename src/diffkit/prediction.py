"""Conversions between what a denoiser predicts: epsilon, x0, v and flow (pure functions).

With ``x_t = alpha * x0 + sigma * eps``:

- ``epsilon``: the noise ``eps``;
- ``x0``: the clean data;
- ``v``: ``alpha * eps - sigma * x0`` (Salimans & Ho, 2022);
- ``flow``: ``eps - x0``, the rectified-flow velocity ``d x_t / d t`` when
  ``alpha = 1 - t`` and ``sigma = t``; defined by that formula for every schedule.

Every conversion goes through ``(x0, eps)``, which both determine ``x_t``. ``alpha``
and ``sigma`` are per-item ``(batch,)`` tensors; arithmetic happens in the wider of their
dtype and ``x_t``'s (samplers pass float32 or float64). ``to_x0_eps`` returns ``(x0, eps)``
in that dtype (a float16 model's prediction gives float32); ``convert`` casts its result
back to ``x_t``'s dtype.
"""

from typing import Any, get_args, overload

import numpy as np
import torch
from torch import Tensor

from diffkit.typing import PerItem, Prediction, Sample, broadcast_to_sample, checked

__all__ = ["PREDICTIONS", "convert", "from_x0_eps", "to_x0_eps"]

PREDICTIONS: tuple[Prediction, ...] = get_args(Prediction)


def _validate(kind: str, argument: str) -> None:
    if kind not in PREDICTIONS:
        raise ValueError(f"{argument} must be one of {PREDICTIONS}, got {kind!r}")


def _per_element(
    alpha: Tensor, sigma: Tensor, like: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``alpha`` and ``sigma`` ``(batch,)`` broadcast against ``like``, in ``dtype``."""
    return broadcast_to_sample(alpha, like).to(dtype), broadcast_to_sample(sigma, like).to(dtype)


@overload
def _x0_of(kind: str, x: Tensor, p: Tensor, a: Tensor, s: Tensor) -> Tensor: ...
@overload
def _x0_of(kind: str, x: np.ndarray, p: np.ndarray, a: np.ndarray, s: np.ndarray) -> np.ndarray: ...
def _x0_of(kind: str, x: Any, p: Any, a: Any, s: Any) -> Any:
    """``x0`` implied by a ``kind`` prediction ``p`` at ``x_t = x``, operands already broadcast.

    Plain arithmetic, so it serves tensors and NumPy arrays alike (the samplers
    evaluate it once on the whole time grid for the coefficients of ``x0 = cx x + cp p``).
    """
    if kind == "epsilon":
        return (x - s * p) / a
    if kind == "x0":
        return p
    if kind == "v":
        # x_t = a x0 + s eps and v = a eps - s x0  =>  (a^2 + s^2) x0 = a x_t - s v.
        return (a * x - s * p) / (a * a + s * s)
    # flow f = eps - x0  =>  x_t = (a + s) x0 + s f.
    return (x - s * p) / (a + s)


@checked
def to_x0_eps(
    prediction: Sample, kind: Prediction, x_t: Sample, alpha: PerItem, sigma: PerItem
) -> tuple[Sample, Sample]:
    """``(x0, eps)`` implied by a prediction of type ``kind`` at ``x_t``."""
    _validate(kind, "kind")
    dtype = alpha.dtype if alpha.dtype.itemsize >= x_t.dtype.itemsize else x_t.dtype
    a, s = _per_element(alpha, sigma, x_t, dtype)
    x, p = x_t.to(dtype), prediction.to(dtype)
    x0 = _x0_of(kind, x, p, a, s)
    if kind == "epsilon":
        eps = p
    elif kind == "x0":
        eps = (x - a * x0) / s
    elif kind == "v":
        eps = (s * x + a * p) / (a * a + s * s)
    else:
        eps = p + x0
    return x0, eps


@checked
def from_x0_eps(
    x0: Sample, eps: Sample, kind: Prediction, alpha: PerItem, sigma: PerItem
) -> Sample:
    """The prediction of type ``kind`` that corresponds to ``(x0, eps)``."""
    _validate(kind, "kind")
    a, s = _per_element(alpha, sigma, x0, x0.dtype)
    if kind == "epsilon":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        return a * eps - s * x0
    return eps - x0


@checked
def convert(
    prediction: Sample,
    source: Prediction,
    target: Prediction,
    x_t: Sample,
    alpha: PerItem,
    sigma: PerItem,
) -> Sample:
    """Convert a ``source``-type prediction at ``x_t`` into a ``target``-type one."""
    _validate(source, "source")
    _validate(target, "target")
    if source == target:
        return prediction
    x0, eps = to_x0_eps(prediction, source, x_t, alpha, sigma)
    return from_x0_eps(x0, eps, target, alpha, sigma).to(x_t.dtype)
