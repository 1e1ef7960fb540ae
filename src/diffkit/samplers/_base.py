"""The one mechanism every sampler shares.

A sampler is a *plan*: for each step ``i -> i + 1`` of its time grid, the coefficients of
a linear combination of the current sample ``x_i``, the denoised estimates
``D_i, D_{i-1}, ...`` (``D = E[x0 | x_t]``, the data prediction), optionally a
corrector that also uses ``D_{i+1}`` (UniPC, Heun), and fresh Gaussian noise
(ancestral / SDE samplers). The linear multistep and predictor-corrector methods are
such plans once written in data-prediction form, so each of those samplers only writes
down its coefficients, in float64 and from the paper's formula, and this module runs the
plan (methods that are not linear in grid values are
[`StepSampler`][diffkit.samplers.StepSampler]s, whose step is code). ``run_reference``
runs a plan the way the paper writes it (about thirty lines: ``x = keep·x + Σ c·D +
noise·z``, corrector included); ``run_plan`` is the fast path, tested equal to it:

- the grid and every coefficient are computed once, before the loop;
- the denoiser is called through one helper that batches cond/uncond for
  classifier-free guidance ([`predict`][diffkit.guidance.predict]), checks that its
  output has its input's shape (a tuple comparison: ``sample`` checks its own arguments
  once, at the boundary), converts whatever it predicts to ``x0`` with
  [`diffkit.prediction`][diffkit.prediction] in float32/64 and passes the model ``x`` and
  the conditioning's embeddings in the dtype of the noise;
- one loop runs every plan, on linear combinations compiled before it: coefficients as
  Python floats (kernel scalar arguments: nothing to copy to the device, nothing to wait
  for), zero terms dropped, each combination accumulated in place into one fresh tensor,
  which fresh noise is drawn straight into when the step adds some. Plans that only
  ever combine ``x_i`` with ``D_i`` (and a re-evaluated ``D_{i+1}``: DDIM, Euler, Heun)
  fold the affine ``x0`` conversion into their coefficients and never form ``D``,
  unless a callback wants to see it;
- the loop has no host-device synchronisation: no ``.item()``, no ``nonzero()``, no
  Python branching on tensor values; non-finite outputs are recorded as tensors and
  reported, naming the first bad step, after the loop;
- nothing is stored on the sampler object, so one sampler serves many threads; the grid
  and the coefficients (a [`Plan`][diffkit.samplers.Plan], from ``prepare``) are plain
  immutable data that a caller may build once and reuse across calls and threads;
- sampling runs under ``torch.no_grad()`` (as k-diffusion's samplers do), whatever the
  caller's grad mode: the result carries no autograd graph and the steps keep none alive.
"""

import abc
import dataclasses
import functools
import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, NoReturn

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor

from diffkit.config import Config, Registry, field_error
from diffkit.guidance import OutputShapeError, predict, unused_uncond
from diffkit.prediction import _validate, _x0_of
from diffkit.protocols import Conditioning, Denoiser, NoiseSchedule, StepCallback
from diffkit.samplers.clipping import Clip
from diffkit.samplers.spacing import Spacing, SpacingBase
from diffkit.schedules import ScheduleBase
from diffkit.typing import Sample, ShapeError, checked, trusted

__all__ = [
    "SAMPLERS",
    "Grid",
    "NonFiniteError",
    "Plan",
    "Point",
    "SamplerBase",
    "Step",
    "StopsAt",
    "alpha_sigma",
    "ancestral_split",
    "final_step",
    "gaussian",
    "make_grid",
    "run_plan",
    "run_reference",
    "work_dtype",
]

_F64 = torch.float64


class NonFiniteError(FloatingPointError):
    """The denoiser returned NaN or inf during sampling; the message names the step."""


@dataclasses.dataclass(frozen=True)
class Grid:
    """A time grid and its noise levels as Python floats (computed once, in float64).

    Point ``i`` has time ``t[i]``, ``alpha[i]``, ``sigma[i]`` and half log-SNR
    ``lam[i] = log(alpha / sigma)``. The last point is the data (``alpha = 1``,
    ``sigma = 0``, ``lam = +inf``) unless the sampler stops at ``t_end > 0``, where it is
    that time's noise level. ``lam[0]`` is ``-inf`` when ``t_max`` is pure noise.
    ``model_t`` (when set) is the time the denoiser is told at each point, where the
    spacing rounds it to a training step (``snap``) while the noise levels stay exact.
    """

    t: tuple[float, ...]
    alpha: tuple[float, ...]
    sigma: tuple[float, ...]
    lam: tuple[float, ...]
    model_t: tuple[float, ...] | None = None

    @property
    def steps(self) -> int:
        """Number of steps (one fewer than points)."""
        return len(self.t) - 1

    def h(self, i: int) -> float:
        """Step size in ``lam`` of step ``i -> i + 1`` (``+inf`` for a step onto the data)."""
        return self.lam[i + 1] - self.lam[i]

    def ratio(self, i: int) -> float:
        """``(sigma/alpha)_{i+1} / (sigma/alpha)_i = exp(-h)``: the EDM ``sigma`` ratio."""
        return math.exp(-self.h(i))


def make_grid(
    schedule: NoiseSchedule,
    spacing: Spacing,
    steps: int,
    device: torch.device | None = None,
    t_end: float = 0.0,
) -> Grid:
    """Evaluate ``spacing`` on ``schedule`` and tabulate ``alpha``, ``sigma``, ``lam``.

    ``t_end > 0`` replaces the final ``t = 0`` (the data) by that time, at or below the
    last evaluation time (equal to it: the last step has zero length and changes nothing,
    as diffusers' DDIM with ``set_alpha_to_one=False`` ending at its first training step).
    The schedule is evaluated on tensors built here, so its shape checks are skipped
    ([`trusted`][diffkit.typing.trusted]); what it returns is checked here instead.
    """
    with trusted():
        t = spacing(schedule, steps, device).to(_F64)
    if t.ndim != 1 or t.numel() != steps + 1:
        raise ValueError(f"spacing returned shape {tuple(t.shape)}, expected ({steps + 1},)")
    if t_end > 0:
        if not t_end <= float(t[-2]):
            raise ValueError(
                f"t_end ({t_end:g}) must not be above the last evaluation time ({float(t[-2]):g})"
            )
        t = torch.cat([t[:-1], t.new_full((1,), t_end)])
    kept = t if t_end > 0 else t[:-1]
    alpha, sigma = alpha_sigma(schedule, kept, device)
    lam = [_half_log_snr(a, s) for a, s in zip(alpha, sigma)]
    zero_last = t_end > 0 and len(lam) > 1 and lam[-1] == lam[-2]  # allowed: see above
    if any(b <= a for a, b in itertools.pairwise(lam[:-1] if zero_last else lam)):
        raise ValueError("the time grid must run from noise to data (log-SNR increasing)")
    model_t = None
    if isinstance(spacing, SpacingBase):
        told = spacing.model_times(t)
        model_t = None if told is None else tuple(told.tolist())
    if t_end > 0:
        return Grid(tuple(t.tolist()), tuple(alpha), tuple(sigma), tuple(lam), model_t)
    return Grid(
        t=tuple(t.tolist()),
        alpha=(*alpha, 1.0),
        sigma=(*sigma, 0.0),
        lam=(*lam, math.inf),
        model_t=model_t,
    )


def alpha_sigma(
    schedule: NoiseSchedule, t: Tensor, device: torch.device | None = None
) -> tuple[list[float], list[float]]:
    """``alpha(t)`` and ``sigma(t)`` as Python floats, evaluated in float64 on ``device``.

    The schedule is evaluated on tensors built here, so its shape checks are skipped
    ([`trusted`][diffkit.typing.trusted]); what it returns is checked here instead.
    """
    dtype = torch.float32 if device is not None and device.type == "mps" else _F64
    inner = t.to(device=device, dtype=dtype)
    with trusted():
        if isinstance(schedule, ScheduleBase):  # both in one call
            alpha_t, sigma_t = schedule.alpha_sigma(inner)
        else:
            alpha_t, sigma_t = schedule.alpha(inner), schedule.sigma(inner)
    for name, value in (("alpha", alpha_t), ("sigma", sigma_t)):
        if not isinstance(value, Tensor) or value.shape != inner.shape:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ShapeError(f"schedule.{name} returned {got} for times of shape ({len(t)},)")
    return alpha_t.to("cpu", _F64).tolist(), sigma_t.to("cpu", _F64).tolist()


def _half_log_snr(alpha: float, sigma: float) -> float:
    if alpha <= 0:
        return -math.inf
    if sigma <= 0:
        return math.inf
    return math.log(alpha) - math.log(sigma)


class Step(NamedTuple):
    """Step ``i -> i + 1`` as a linear combination (all coefficients float64 scalars).

    ``x_{i+1} = keep * x_i + sum_k data[k] * D_{i-k} + noise * z`` with ``z ~ N(0, I)``.
    With ``correct`` set, ``D_{i+1}`` is evaluated at that prediction and the step is
    redone as ``keep * x_i + correct[0] * D_{i+1} + sum_k correct[k+1] * D_{i-k} +
    noise * z`` (same ``z``); ``reevaluate`` evaluates ``D_{i+1}`` again at the corrected
    point (PECE, e.g. Heun) instead of reusing the predictor's (PEC, e.g. UniPC).
    ``past`` adds ``sum_k past[k] * x_{i-1-k}`` (earlier samples) to both: the
    noise-prediction DPM-Solver's ``eps_j = (x_j - alpha_j D_j) / sigma_j`` of earlier
    points are linear in them.

    A named tuple (cheap to build: ``sample`` plans on every call unless given a plan);
    the loop checks that every coefficient is finite before it starts, naming the step.
    """

    keep: float
    data: tuple[float, ...]
    noise: float = 0.0
    correct: tuple[float, ...] | None = None
    reevaluate: bool = False
    past: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class Point:
    """A point off the grid where a step evaluates the model: time, ``alpha``, ``sigma``, ``lam``.

    Computed from the schedule before the loop (``prepare``), as the grid's points are.
    """

    t: float
    alpha: float
    sigma: float
    lam: float


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a sampler runs for one step count on one schedule: immutable and reusable.

    ``grid`` is the time grid; ``steps`` one [`Step`][diffkit.samplers.Step] per step for
    a sampler whose steps are linear combinations (empty for a
    [`StepSampler`][diffkit.samplers.StepSampler], whose steps are code); ``points[i]``
    the points off the grid where step ``i`` evaluates the model (a ``StepSampler``'s
    midpoints). ``sampler`` is the sampler that made it. Nothing in it changes during
    sampling, so one plan serves many calls and threads (and CUDA-graph capture).
    """

    sampler: "SamplerBase"
    grid: Grid
    steps: tuple[Step, ...]
    points: tuple[tuple[Point, ...], ...] = ()


def ancestral_split(grid: Grid, i: int, eta: float) -> tuple[float, float]:
    """``(s_up, s_down) / s_{i+1}`` of an ancestral step ``i -> i + 1`` (k-diffusion's rule).

    With ``rho = s_{i+1} / s_i``: ``s_up = min(s_{i+1}, eta s_{i+1} sqrt(1 - rho²))`` of
    fresh noise and a deterministic step to ``s_down = sqrt(s_{i+1}² - s_up²)``; together
    they reach ``s_{i+1}`` with the posterior's variance (``eta = 1``).
    """
    rho = grid.ratio(i)
    up = min(1.0, eta * math.sqrt(1 - rho * rho))
    return up, math.sqrt(1 - up * up)


def final_step(grid: Grid, final: str) -> tuple[float, ...]:
    """Coefficients of ``D_{N-1}, D_{N-2}`` for the step onto the data.

    ``"denoised"`` lands on the last estimate ``D_{N-1}``. ``"extrapolated"`` uses that,
    along the ODE trajectory, ``D = x0 + O(s²)`` in ``s = sigma / alpha`` (Tweedie: the
    correction is ``s² grad log p``), and extrapolates the last two estimates to ``s = 0``
    (Richardson): ``(D_{N-1} - q D_{N-2}) / (1 - q)`` with ``q = (s_{N-1} / s_{N-2})²``.
    """
    n = grid.steps
    if final == "denoised" or n < 2 or not math.isfinite(grid.lam[n - 2]):
        return (1.0,)
    q = math.exp(-2 * grid.h(n - 2))
    return (1 / (1 - q), -q / (1 - q))


def gaussian(like: Tensor, generator: torch.Generator | None, std: float = 1.0) -> Tensor:
    """``std * z``, ``z ~ N(0, I)`` of ``like``'s shape, dtype and device, contiguous.

    The draws fill a fresh contiguous tensor, so element ``[b, c, h, w]`` gets the same
    draw whatever ``like``'s memory layout (channels-last, permuted): the samples do not
    depend on it. For a contiguous ``like`` these are ``torch.randn_like``'s draws.
    """
    out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    return out.normal_(0.0, std, generator=generator)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the sampler integrates in: float64 stays, anything narrower becomes float32."""
    return _F64 if dtype == _F64 else torch.float32


class _Model:
    """The denoiser as the loop sees it: ``(x, point) -> D`` in the working dtype.

    Everything that depends only on the grid (times, guidance batching, the affine
    prediction -> x0 conversion) is prepared here, before the loop.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        grid: Grid,
        like: Tensor,
        cond: Conditioning | None,
        guidance: float,
        uncond: Conditioning | None,
        points: Sequence[Point] = (),
        rescale: float = 0.0,
        clip: Clip | None = None,
    ) -> None:
        batch, device = like.shape[0], like.device
        self.clip = clip
        self.denoiser, self.guidance, self.rescale = denoiser, float(guidance), float(rescale)
        self.model_dtype, self.dtype = like.dtype, work_dtype(like.dtype)
        self.cast = self.model_dtype != self.dtype
        self.guided = self.guidance != 1.0
        if self.guided and (cond is None or uncond is None):
            raise ValueError("classifier-free guidance (guidance != 1) needs cond and uncond")
        # The conditioning's embeddings go to the model in x's dtype (a float32 text
        # encoder's tokens with bf16 noise); the mask and labels keep theirs.
        dtype = self.model_dtype

        def place(v: Tensor) -> Tensor:
            return v.to(device, dtype) if v.is_floating_point() else v.to(device)

        if cond is not None:
            cond = cond.map(place).expand(batch)
        if self.guided and cond is not None and uncond is not None:
            uncond = uncond.map(place).expand(batch)
            cond = cond.cat(uncond)
        self.cond = cond
        n = grid.steps
        self.batch, self.device, self.grid = batch, device, grid
        self._t = torch.tensor(grid.t, dtype=self.dtype, device=device)
        told = self._t if grid.model_t is None else torch.tensor(grid.model_t, dtype=self.dtype)
        calls = 2 * batch if self.guided else batch
        self.times = told.to(device)[:, None].expand(n + 1, calls).unbind(0)
        # Every prediction kind is affine in (x_t, prediction): x0 = cx * x_t + cp * pred.
        # The coefficients come from diffkit.prediction's own formula, evaluated once on
        # the grid's float64 values: unit predictions at x_t = 0, unit x_t with zero
        # predictions (IEEE semantics: an epsilon model at alpha = 0 gets inf).
        _validate(denoiser.prediction, "denoiser.prediction")
        alpha, sigma = np.array(grid.alpha[:n]), np.array(grid.sigma[:n])
        one, zero = np.ones(n), np.zeros(n)
        with np.errstate(divide="ignore", invalid="ignore"):
            cp = _x0_of(denoiser.prediction, zero, one, alpha, sigma)
            cx = _x0_of(denoiser.prediction, one, zero, alpha, sigma)
        self.cp_float, self.cx_float = cp.tolist(), cx.tolist()
        if not math.isfinite(sum(self.cp_float) + sum(self.cx_float)):  # one test, usually
            for i, pair in enumerate(zip(self.cp_float, self.cx_float)):
                if not all(map(math.isfinite, pair)):
                    self._no_x0(i)
        # Points off the grid (a StepSampler's midpoints): their times and coefficients.
        self.off_grid: dict[Point, tuple[Tensor, float, float]] = {}
        if points:
            alpha, sigma = np.array([p.alpha for p in points]), np.array([p.sigma for p in points])
            one, zero = np.ones(len(points)), np.zeros(len(points))
            px = _x0_of(denoiser.prediction, one, zero, alpha, sigma).tolist()
            pp = _x0_of(denoiser.prediction, zero, one, alpha, sigma).tolist()
            for p, cx_p, cp_p in zip(points, px, pp):
                t = torch.full((calls,), p.t, dtype=self.dtype, device=device)
                self.off_grid[p] = (t, cx_p, cp_p)
        self.sums: list[Tensor] = []
        self.points: list[int] = []

    def _no_x0(self, i: int) -> NoReturn:
        grid, prediction = self.grid, self.denoiser.prediction
        raise ValueError(
            f"prediction '{prediction}' does not determine x0 at step {i} of {grid.steps} "
            f"(t = {grid.t[i]:.6g}, alpha = {grid.alpha[i]:.3g}, sigma = {grid.sigma[i]:.3g}): "
            "x_t there is pure noise; start the spacing below it (t_max < 1) or use a model "
            "that predicts v, flow or x0"
        )

    @functools.cached_property
    def callback_times(self) -> tuple[Tensor, ...]:
        """The grid times as ``(batch,)`` tensors, for callbacks."""
        return self._t[:, None].expand(self.grid.steps + 1, self.batch).unbind(0)

    def predict(self, x: Tensor, i: int, times: Tensor | None = None) -> Tensor:
        """The (guided) raw prediction at ``x``, grid point ``i``, in the working dtype.

        ``times`` (a point off the grid, within step ``i``) replaces the grid's time. The
        denoiser's output must have the shape of its input, checked on every call as a
        plain shape comparison (``sample`` checked its own arguments once).
        """
        x_in = x.to(self.model_dtype) if self.cast else x
        t = self.times[i] if times is None else times
        try:
            return predict(
                self.denoiser, x_in, t, self.cond, self.guidance, self.dtype, self.rescale
            )
        except OutputShapeError as error:
            where = f" at step {i} of {self.grid.steps}"
            raise OutputShapeError(error.out, error.x_in, self.guided, where) from None

    def raw(self, x: Tensor, i: int) -> Tensor:
        """The raw prediction at ``x``, grid point ``i``, recorded.

        Every evaluation leaves a finiteness witness on the device, checked after the loop:
        a sum is finite iff every element is (barring float overflow), one reduction.
        """
        pred = self.predict(x, i)
        self.sums.append(pred.sum())
        self.points.append(i)
        return pred

    def __call__(self, x: Tensor, i: int) -> Tensor:
        """The denoised estimate ``D = cx x + cp pred`` at ``x``, grid point ``i`` (recorded),
        clipped when the sampler clips."""
        d = self.unclipped(x, i)
        return d if self.clip is None else self.clip(d)

    def unclipped(self, x: Tensor, i: int) -> Tensor:
        """``D = cx x + cp pred`` at ``x``, grid point ``i`` (recorded), never clipped."""
        d = self.estimate(x, self.predict(x, i), i)
        self.sums.append(d.sum())
        self.points.append(i)
        return d

    def at(self, x: Tensor, point: Point, i: int) -> Tensor:
        """The estimate ``D`` at ``x`` and ``point``, a point off the grid within step ``i``."""
        times, cx, cp = self.off_grid[point]
        d = x * cx
        d.add_(self.predict(x, i, times), alpha=cp)
        self.sums.append(d.sum())
        self.points.append(i)
        return d if self.clip is None else self.clip(d)

    def estimate(self, x: Tensor, pred: Tensor, i: int) -> Tensor:
        """``D = cx x + cp pred`` from the raw prediction ``pred`` at ``x``, grid point ``i``."""
        d = x * self.cx_float[i]
        d.add_(pred, alpha=self.cp_float[i])
        return d

    def raise_if_nonfinite(self) -> None:
        """Raise NonFiniteError naming the first evaluation that was not finite (one sync)."""
        if not self.sums:
            return
        sums = torch.stack(self.sums)
        if math.isfinite(float(sums.sum())):  # the usual case: one reduction, one sync
            return
        ok = torch.isfinite(sums).cpu()
        if bool(ok.all()):  # only the total overflowed
            return
        first = int((~ok).nonzero()[0, 0])
        i = self.points[first]
        raise NonFiniteError(
            f"the denoiser output was NaN or inf at step {i} of {self.grid.steps} "
            f"(t = {self.grid.t[i]:.6g}, evaluation {first + 1}); check the model, its dtype "
            f"and its prediction type '{self.denoiser.prediction}'"
        )


def _affine(
    keep: float,
    x: Tensor,
    coefs: Sequence[float],
    estimates: Sequence[Tensor],
    noise: float,
    z: Tensor | None,
) -> Tensor:
    """``keep·x + Σ_k c_k·D_k + noise·z``, term by term (``a.add(b, alpha=c)`` is ``a + c·b``)."""
    out = x * keep
    for c, d in zip(coefs, estimates):
        out = out.add(d, alpha=c)
    return out.add(z, alpha=noise) if z is not None else out


def run_reference(
    steps: Sequence[Step], model: _Model, x: Tensor, generator: torch.Generator | None
) -> Tensor:
    """The plan as the paper writes it: ``x_{i+1} = keep·x_i + Σ_k c_k·D_{i-k} + noise·z``.

    With a corrector, ``D_{i+1}`` is evaluated at that prediction and the step redone with
    it as one more estimate (same ``z``); ``reevaluate`` then evaluates ``D_{i+1}`` again
    at the corrected point. The last step, onto the data, has no corrector. No fusion, no
    buffers, no callback: the reference that the fast path, ``run_plan``, is tested
    against (it draws the same noise).
    """
    depth = max(max(len(s.data), len(s.correct or ()) - 1) for s in steps)
    past_depth = max(len(s.past) for s in steps)
    history = [model(x, 0)]  # D_i, D_{i-1}, ...: newest first
    earlier: list[Tensor] = []  # x_{i-1}, x_{i-2}, ...: newest first
    last = len(steps) - 1
    for i, (keep, data, noise, correct, reevaluate, past) in enumerate(steps):
        z = gaussian(x, generator) if noise else None
        x_next = _affine(keep, x, data, history, noise, z)
        for c, x_k in zip(past, earlier):
            x_next = x_next.add(x_k, alpha=c)
        if i == last:
            return x_next
        d_next = model(x_next, i + 1)
        if correct is not None:  # redo the step with D_{i+1} as one more estimate
            new, *old = correct
            estimates = [*history[: len(old)], d_next]  # the new one last, as run_plan adds it
            x_next = _affine(keep, x, [*old, new], estimates, noise, z)
            for c, x_k in zip(past, earlier):
                x_next = x_next.add(x_k, alpha=c)
            if reevaluate:
                d_next = model(x_next, i + 1)
        history = [d_next, *history][:depth]
        earlier = [x, *earlier][:past_depth]
        x = x_next
    return x


# --------------------------------------------------------------------------------------
# The fast path
# --------------------------------------------------------------------------------------

# The operands of a step's linear combinations, as slots of the loop's operand list: the
# current point ``x`` and the raw prediction there, the prediction and the estimate D at
# the predictor's point (for correctors), the step's noise, and from ``_HIST`` on the
# estimates ``D_i, D_{i-1}, ...``, then the earlier samples ``x_{i-1}, ...`` (``Step.past``).
_X, _PRED, _PREDP, _DP, _Z, _HIST = range(6)

# A linear combination: its (operand, coefficient) terms. The coefficients are Python
# floats, passed to the kernels as scalar arguments: no tensor to build, no copy to the
# device, nothing the host waits for.
_Terms = tuple[tuple[int, float], ...]


class _Compiled(NamedTuple):
    """One step of a compiled plan.

    ``fresh``: the standard deviation of the noise the predictor starts from, drawn
    straight into its output tensor (0: none). A step whose corrector reuses the same
    ``z`` draws it into the loop's buffer instead (``buffered``), where both combinations
    have it as a term.
    """

    predictor: _Terms
    corrector: _Terms | None
    reevaluate: bool
    fresh: float
    buffered: bool


def _combination(
    terms: _Terms, ops: list[Any], noise: float = 0.0, generator: torch.Generator | None = None
) -> Tensor:
    """``sum_k c_k * ops[j_k]`` (+ ``noise * z``, ``z ~ N(0, I)``) in one fresh tensor.

    The operands are never written to. Noise is drawn straight into the output (the same
    draws as ``gaussian(ops[_X])``), one elementwise pass fewer than adding it.
    """
    if noise:
        out, rest = gaussian(ops[_X], generator, noise), terms
    else:
        (j, c), rest = terms[0], terms[1:]
        out = ops[j] * c
    for j, c in rest:
        out.add_(ops[j], alpha=c)
    return out


def _fusable(plan: Sequence[Step]) -> bool:
    """Whether every step uses ``D_i`` alone, plus at most a re-evaluated ``D_{i+1}``."""
    return all(
        len(s.data) == 1
        and not s.past
        and (s.correct is None or (s.reevaluate and len(s.correct) == 2))
        for s in plan
    )


def _compile(
    plan: Sequence[Step], model: _Model, fused: bool, depth: int = 1
) -> list[_Compiled] | None:
    """Each step's combinations as Python-float terms, zero terms dropped.

    ``fused`` (plans that pass ``_fusable``: DDIM, Euler, Heun, ...) writes
    ``D = cx x + cp pred`` into the terms, so a step is ``A x_i + B pred_i`` and no ``D``
    is formed; a re-evaluated corrector, linear in ``x_i``, ``pred_i`` and the prediction
    ``pred'`` at ``x' = A x_i + B pred_i``, becomes three terms in them. ``None`` when such
    a coefficient is not finite (a product of finite ones that overflows), where the
    general form reports the bad step. Otherwise the terms combine ``x_i`` and the
    estimates ``D`` (``depth`` slots from ``_HIST``), then the earlier samples.
    """
    cx, cp = model.cx_float, model.cp_float
    last = len(plan) - 1
    steps: list[_Compiled] = []
    for i, s in enumerate(plan):
        keep, data, noise, correct, reevaluate, past = s
        if not all(map(math.isfinite, (keep, noise, *data, *past, *(correct or ())))):
            raise ValueError(f"step {i} of the sampler's plan has a non-finite coefficient: {s}")
        if i == last:
            correct = None
        second: list[tuple[int, float]] = []
        if fused:
            c = data[0]
            a, b = keep + c * cx[i], c * cp[i]
            first = [(_X, a), (_PRED, b)]
            if correct is not None:
                # keep x + old D_i + new D', D' = cx' xp + cp' pred', xp = A x + B pred
                new, old = correct
                at_xp = new * cx[i + 1]
                second = [
                    (_X, keep + old * cx[i] + at_xp * a),
                    (_PRED, old * cp[i] + at_xp * b),
                    (_PREDP, new * cp[i + 1]),
                ]
            if not all(map(math.isfinite, (a, b, *[v for _, v in second]))):
                return None
        else:
            earlier = list(zip(itertools.count(_HIST + depth), past))
            first = [(_X, keep), *zip(itertools.count(_HIST), data), *earlier]
            if correct is not None:
                older = zip(itertools.count(_HIST), correct[1:])
                second = [(_X, keep), *older, (_DP, correct[0]), *earlier]
        buffered = correct is not None and noise != 0.0
        if buffered:  # predictor and corrector add the same z: the loop's buffer
            first.append((_Z, noise))
            second.append((_Z, noise))
        # Zero terms dropped; a combination left with none is an exact zero (unless the
        # predictor is all fresh noise).
        predictor = tuple([term for term in first if term[1]])
        fresh = 0.0 if buffered else noise
        if not predictor and not fresh:
            predictor = ((_X, 0.0),)
        corrector = None
        if correct is not None:
            corrector = tuple([term for term in second if term[1]]) or ((_X, 0.0),)
        steps.append(_Compiled(predictor, corrector, reevaluate, fresh, buffered))
    return steps


def run_plan(
    plan: Sequence[Step],
    model: _Model,
    x: Tensor,
    generator: torch.Generator | None,
    callback: StepCallback | None,
) -> Tensor:
    """Integrate ``x`` (at grid point 0) through ``plan``; returns the sample at the last point.

    One loop for every plan. Plans that allow it run fused on the raw predictions (see
    ``_compile``); the others on the estimates ``D``, keeping as many as their steps
    combine. A callback does not change the path (so nor the result): on a fused path the
    ``D`` it is shown is formed for it alone.
    """
    fused = _fusable(plan) and model.clip is None  # a clipped D is not affine in pred
    depth = max(max(len(s.data), len(s.correct or ()) - 1) for s in plan)
    program = _compile(plan, model, fused) if fused else None
    if program is None:
        fused, program = False, _compile(plan, model, False, depth)
        assert program is not None
    # Fused steps see the raw prediction (slots _PRED, _PREDP), the others D (_HIST, _DP).
    evaluate, here, there = (model.raw, _PRED, _PREDP) if fused else (model, _HIST, _DP)
    past = max(len(s.past) for s in plan)  # earlier samples, from slot _HIST + depth
    ops: list[Any] = [None] * (_HIST + depth + past)
    # Noise shared by a predictor and its corrector goes into the loop's own buffer,
    # refilled in place: it is only ever an operand, never handed to the model or caller.
    if any(step.buffered for step in program):
        # contiguous, so the draws do not depend on x's memory layout (see ``gaussian``)
        ops[_Z] = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    ops[_X], ops[here] = x, evaluate(x, 0)
    last = len(program) - 1
    for i, (predictor, corrector, reevaluate, fresh, buffered) in enumerate(program):
        if buffered:
            ops[_Z].normal_(generator=generator)
        x = _combination(predictor, ops, fresh, generator)
        if i < last:
            value = evaluate(x, i + 1)
            if corrector is not None:
                ops[there] = value
                x = _combination(corrector, ops)
                if reevaluate:
                    value = evaluate(x, i + 1)
            if depth > 1:
                ops[_HIST + 1 : _HIST + depth] = ops[_HIST : _HIST + depth - 1]
            ops[here] = value
            if past:
                xs = _HIST + depth
                ops[xs + 1 : xs + past] = ops[xs : xs + past - 1]
                ops[xs] = ops[_X]
        ops[_X] = x
        if callback is not None:
            callback(i, model.callback_times[i + 1], x, _shown(model, ops, x, i, last, fused))
    return x


def _shown(model: _Model, ops: list[Any], x: Tensor, i: int, last: int, fused: bool) -> Tensor:
    """The estimate ``D`` at the end of step ``i`` for a callback (the sample after the last)."""
    if i == last:
        return x
    return model.estimate(x, ops[_PRED], i + 1) if fused else ops[_HIST]


def _check_steps(steps: int) -> None:
    """Plain Python checks: no tensor op, no device sync (bool passes as an int)."""
    if isinstance(steps, bool):
        raise TypeError(f"steps must be an int, got bool {steps}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")


def _off_grid(plan: Plan) -> list[Point]:
    return [p for points in plan.points for p in points]


class SamplerBase(Config):
    """A sampler that is its own config: ``kind``, fields, ``spacing`` and ``plan(grid)``.

    A subclass declares its ``kind``, its fields, a ``spacing: AnySpacing`` field (the
    time grid: any [`SpacingBase`][diffkit.samplers.SpacingBase]) and writes ``plan(grid)``: the
    coefficients of every step (see [`Step`][diffkit.samplers.Step]); the loop is shared.
    ``prepare(schedule, steps)`` makes the immutable [`Plan`][diffkit.samplers.Plan]
    (grid and coefficients) that ``sample`` computes on every call unless given one.

    ``sample`` always runs under ``torch.no_grad()``, so it needs no wrapper: called bare in
    a training script it records no autograd graph across the steps (whose memory would
    grow with every step), and its result has ``requires_grad=False``. A
    ``torch.enable_grad()`` around the call does not change that. A denoiser that needs
    gradients itself (gradient guidance wrapped around the model) can turn them on inside
    its own ``__call__`` with ``torch.enable_grad()`` and ``x_t.detach().requires_grad_()``.
    To backpropagate through the sampling trajectory, run the steps yourself:
    ``prepare(schedule, steps).steps`` gives each step's coefficients.
    """

    if TYPE_CHECKING:  # each sampler declares the field, with its own default
        spacing: SpacingBase

    clip: Clip | None = Field(
        default=None, description="clip or threshold each data estimate (None: as it is)"
    )

    @abc.abstractmethod
    def plan(self, grid: Grid) -> list[Step]:
        """The coefficients of every step on ``grid`` (Python floats, computed in float64)."""

    def grid(self, schedule: NoiseSchedule, steps: int, device: torch.device | None = None) -> Grid:
        """The time grid this sampler uses for ``steps`` steps on ``schedule``."""
        return make_grid(schedule, self.spacing, steps, device)

    def prepare(
        self, schedule: NoiseSchedule, steps: int, device: torch.device | None = None
    ) -> Plan:
        """The grid and the coefficients for ``steps`` steps on ``schedule``, to reuse.

        ``sample(..., plan=plan)`` then skips computing them; the plan holds no state,
        so it may serve many calls and threads at once.
        """
        _check_steps(steps)
        grid = self.grid(schedule, steps, device)
        return Plan(self, grid, tuple(self.plan(grid)))

    def _run(
        self,
        plan: Plan,
        model: "_Model",
        x: Tensor,
        generator: torch.Generator | None,
        callback: StepCallback | None,
    ) -> Tensor:
        """Integrate ``x`` from the first grid point through ``plan`` (the fast path)."""
        return run_plan(plan.steps, model, x, generator, callback)

    def _check_plan(self, plan: Plan, steps: int) -> None:
        if plan.grid.steps != steps:
            raise ValueError(
                f"the plan was prepared for steps={plan.grid.steps}, but sample was called "
                f"with steps={steps}; pass steps={plan.grid.steps} or prepare a plan for "
                f"{steps} steps"
            )
        if plan.sampler is not self and plan.sampler != self:
            raise ValueError(
                f"the plan was prepared by {plan.sampler!r}, not by this sampler ({self!r}); "
                "use that sampler's sample, or this sampler's prepare"
            )

    @torch.no_grad()
    @checked
    def sample(
        self,
        denoiser: Denoiser,
        schedule: NoiseSchedule,
        noise: Sample,
        *,
        steps: int,
        cond: Conditioning | None = None,
        guidance: float = 1.0,
        uncond: Conditioning | None = None,
        generator: torch.Generator | None = None,
        callback: StepCallback | None = None,
        plan: Plan | None = None,
        guidance_rescale: float = 0.0,
        t_start: float | None = None,
        start: Literal["noise", "sample"] = "noise",
    ) -> Sample:
        """Sample ``x0`` ``(batch, *shape)`` from standard normal ``noise`` in ``steps`` steps.

        Where sampling starts: by default ``noise`` is standard normal and is scaled to
        ``sigma`` at the grid's first time. ``start="sample"`` takes ``noise`` as the
        sample itself at that time, unscaled: given latents ``x_T`` (diffusers' DDPM, DDIM
        and DPM-Solver latents are ``x_T``; its Euler, Heun and LMS latents, scaled by
        ``init_noise_sigma = sigma / alpha``, are ``x_T / alpha``). ``t_start=t`` starts the
        grid at ``t`` (the spacing's ``t_max``, any Karras ceiling lifted; an
        ``Explicit`` grid must start there): with ``start="sample"``, ``noise`` is a given
        ``x_t``, e.g. ``alpha(t) x0 + sigma(t) eps`` for image-to-image.
        The model is called in ``noise.dtype`` (so
        pass noise in the model's dtype), with the floating fields of ``cond`` / ``uncond``
        cast to it, while the sampler integrates in float32 (float64 if ``noise`` is).
        ``guidance != 1`` needs ``cond`` and ``uncond``; with ``guidance == 1`` an
        ``uncond`` is unused, and a ``UserWarning`` says so. ``plan`` (from ``prepare`` on
        this ``schedule``, for these ``steps``) skips computing the grid and coefficients.
        ``guidance_rescale`` in ``[0, 1]`` rescales the guided prediction towards the
        conditional one's standard deviation (Lin et al., 2024; diffusers'
        ``guidance_rescale``; see [`predict`][diffkit.guidance.predict]).
        Runs under ``torch.no_grad()``.
        """
        _check_steps(steps)
        # A NaN guidance would only surface after the whole loop, as a NonFiniteError.
        if not (math.isfinite(guidance) and guidance >= 0):
            raise ValueError(f"guidance must be finite and at least 0, got {guidance}")
        if noise.device.type == "meta":
            raise ValueError("noise is on the meta device (it holds no values)")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
        if not noise.is_floating_point():
            raise ValueError(f"noise must be a floating-point tensor, got {noise.dtype}")
        if start not in ("noise", "sample"):
            raise ValueError(f"start must be 'noise' or 'sample', got {start!r}")
        uncond = unused_uncond(f"{type(self).__name__}.sample", guidance, uncond)
        sampler = self
        if t_start is not None:
            spacing = self.spacing.starting_at(float(t_start))
            sampler = self.model_copy(update={"spacing": spacing})
        if plan is None:
            plan = sampler.prepare(schedule, steps, noise.device)
        else:
            sampler._check_plan(plan, steps)
        model = _Model(
            denoiser,
            plan.grid,
            noise,
            cond,
            guidance,
            uncond,
            _off_grid(plan),
            guidance_rescale,
            sampler.clip,
        )
        x = noise.to(model.dtype)
        x = x * plan.grid.sigma[0] if start == "noise" else x.clone()
        x = sampler._run(plan, model, x, generator, callback)
        model.raise_if_nonfinite()
        return x.to(noise.dtype)


T_END = (
    "time the last step lands on: 0 is the data; diffusers' final_sigmas_type='sigma_min' "
    "and DDIM's set_alpha_to_one=False are the first training step's, 1 / N"
)
"""The description of a sampler's ``t_end`` field."""


class StopsAt(SamplerBase):
    """A linear sampler that may stop at ``t_end > 0`` instead of on the data.

    Its last step is then an ordinary step to that noise level (with ``lower_order_final``
    a first-order one, as diffusers'), and ``sample`` returns ``x`` there. A last step of
    zero length (``t_end`` equal to the last evaluation time) is the identity.
    """

    t_end: float = Field(default=0.0, ge=0, lt=1, description=T_END)

    @model_validator(mode="after")
    def _end_below_the_grid(self) -> "StopsAt":
        floor = self.spacing.t_floor()
        if self.t_end > floor:
            owner = type(self).__name__
            message = (
                f"{owner}: t_end ({self.t_end}) must not be above the spacing's last "
                f"evaluation time ({floor}; 0: not known for {type(self.spacing).__name__})"
            )
            raise field_error(owner, "t_end", message, self.t_end)
        return self

    def grid(self, schedule: NoiseSchedule, steps: int, device: torch.device | None = None) -> Grid:
        """The time grid, ending at ``t_end``."""
        return make_grid(schedule, self.spacing, steps, device, self.t_end)

    def prepare(
        self, schedule: NoiseSchedule, steps: int, device: torch.device | None = None
    ) -> Plan:
        """As ``SamplerBase.prepare``; a last step of zero length is the identity."""
        _check_steps(steps)
        grid = self.grid(schedule, steps, device)
        if grid.steps < 2 or grid.lam[-1] != grid.lam[-2]:
            return Plan(self, grid, tuple(self.plan(grid)))
        # The last step has zero length: the others are planned as if it went on to the
        # data (their coefficients see only the points before it), then the identity.
        onto_data = dataclasses.replace(
            grid,
            t=(*grid.t[:-1], 0.0),
            alpha=(*grid.alpha[:-1], 1.0),
            sigma=(*grid.sigma[:-1], 0.0),
            lam=(*grid.lam[:-1], math.inf),
        )
        planned = self.plan(onto_data)[:-1]
        return Plan(self, grid, (*planned, Step(keep=1.0, data=(0.0,))))


SAMPLERS: Registry[SamplerBase] = Registry("sampler")
"""``kind`` -> sampler (each sampler is its own config)."""
