"""Figures for the documentation, drawn from diffkit itself (never pasted by hand).

Each figure is a function registered with :func:`figure`, which names the site path of
its PNG and the source files it depends on. The mkdocs hook (``docs/scripts/hooks.py``)
draws a figure only when its :meth:`Figure.key` is not in the cache, so editing one file
of ``src/`` redraws only the figures that declared it. Run this file directly to write
the PNGs somewhere to look at them::

    python docs/scripts/figures.py --out /tmp/figures [--only sampler-accuracy]
"""

import argparse
import hashlib
import inspect
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import torch

import diffkit as dk
from diffkit import schedules

if TYPE_CHECKING:
    from diffkit_demo.recipes import ImageDemoConfig

# What the sampler figures are drawn from.
SAMPLING = (
    "src/diffkit/schedules.py",
    "src/diffkit/prediction.py",
    "src/diffkit/guidance.py",
    "src/diffkit/samplers",
)
# The networks the demo and the tutorials train (not the transformers).
NETWORKS = (
    "src/diffkit/nn/__init__.py",
    "src/diffkit/nn/layers.py",
    "src/diffkit/nn/attention.py",
    "src/diffkit/nn/embeddings.py",
    "src/diffkit/nn/inputs.py",
    "src/diffkit/nn/resblocks.py",
    "src/diffkit/nn/unet.py",
    "src/diffkit/nn/clip.py",
    "src/diffkit/nn/vae.py",
)
# What every figure depends on: the package's core (configs, protocols, typing).
CORE = ("src/diffkit/__init__.py", "src/diffkit/config.py", "src/diffkit/typing.py")


@dataclass(frozen=True)
class Figure:
    """One PNG of the site: how to draw it and what its pixels depend on."""

    path: str
    draw: Callable[[], bytes]
    deps: tuple[str, ...]
    """Files or folders (relative to the repository root) whose contents it is drawn from."""
    uses: tuple[object, ...]
    """Helpers of this module it calls (their source is part of the key)."""
    env: tuple[str, ...] = ()
    """Environment variables that change what it draws."""

    def key(self, root: Path) -> str:
        """A hash of the figure's own inputs; any change to one of them redraws it."""
        digest = hashlib.sha256()
        for thing in (self.draw, _png, *self.uses):
            digest.update(inspect.getsource(thing).encode())  # type: ignore[arg-type]
        for dep in sorted({*CORE, *self.deps}):
            target = root / dep
            # (a declared module may be a file or a package, so both spellings are listed)
            files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
            files = [f for f in files if f.is_file()]
            for file in files:
                digest.update(str(file.relative_to(root)).encode())
                digest.update(file.read_bytes())
        for name in self.env:
            digest.update(f"{name}={os.environ.get(name, '')}".encode())
        digest.update(f"torch {torch.__version__}, matplotlib {matplotlib.__version__}".encode())
        return digest.hexdigest()[:16]


FIGURES: dict[str, Figure] = {}
"""Site path -> figure, in drawing order."""


def figure(
    path: str,
    *,
    deps: tuple[str, ...] = (),
    uses: tuple[object, ...] = (),
    env: tuple[str, ...] = (),
) -> Callable[[Callable[[], bytes]], Callable[[], bytes]]:
    """Register a drawing function as the figure at ``path`` of the site."""

    def register(draw: Callable[[], bytes]) -> Callable[[], bytes]:
        FIGURES[path] = Figure(path, draw, deps, uses, env)
        return draw

    return register


def _schedules() -> dict[str, dk.NoiseSchedule]:
    return {
        "LinearBeta (DDPM)": schedules.LinearBeta(),
        "SqrtLinearBeta (SD)": schedules.SqrtLinearBeta(),
        "ZeroTerminalSNR(SqrtLinearBeta)": schedules.ZeroTerminalSNR(
            base=schedules.SqrtLinearBeta()
        ),
        "Cosine": schedules.Cosine(),
        "EDM": schedules.EDM(),
        "RectifiedFlow": schedules.RectifiedFlow(),
    }


def _png(fig: "matplotlib.figure.Figure") -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


@figure("figures/schedules.png", deps=("src/diffkit/schedules.py",), uses=(_schedules,))
def schedule_curves() -> bytes:
    """alpha(t), sigma(t) and log-SNR(t) for every built-in schedule, on one time axis."""
    t = torch.linspace(0.0, 1.0, 401, dtype=torch.float64)
    # Stacked, not side by side: one panel per screen width stays readable on a phone.
    fig, axes = plt.subplots(3, 1, figsize=(7, 8.4), sharex=True)
    for name, schedule in _schedules().items():
        axes[0].plot(t, schedule.alpha(t), label=name)
        axes[1].plot(t, schedule.sigma(t), label=name)
        log_snr = schedule.log_snr(t).clamp(-25.0, 25.0)  # ±inf at the ends for some
        axes[2].plot(t, log_snr, label=name)
    axes[0].set_title(r"signal scale $\alpha(t)$")
    axes[1].set_title(r"noise scale $\sigma(t)$ (log axis)")
    axes[1].set_yscale("log")
    axes[2].set_title(r"log-SNR $\lambda(t) = 2\log(\alpha/\sigma)$ (clipped to ±25)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[2].set_xlabel("t  (0 = data, 1 = noise)")
    axes[2].legend(fontsize=8, loc="lower left")
    return _png(fig)


@figure("figures/forward-strip.png", deps=("src/diffkit/schedules.py", "src/diffkit/forward.py"))
def forward_strip() -> bytes:
    """One sklearn digit noised by ``diffkit.forward.add_noise`` at t = 0, 0.1, ..., 1."""
    from sklearn.datasets import load_digits

    from diffkit import forward

    digit = torch.tensor(load_digits().images[0], dtype=torch.float32) / 8.0 - 1.0  # [-1, 1]
    times = torch.linspace(0.0, 1.0, 11)
    x0 = digit.expand(len(times), 1, 8, 8)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    rows = {"Cosine": schedules.Cosine(), "RectifiedFlow": schedules.RectifiedFlow()}
    fig, axes = plt.subplots(len(rows), len(times), figsize=(11, 2.4))
    for row, (name, schedule) in enumerate(rows.items()):
        x_t = forward.add_noise(schedule, x0, noise, times)
        for col, t in enumerate(times.tolist()):
            ax = axes[row, col]
            ax.imshow(np.asarray(x_t[col, 0]), cmap="gray", vmin=-1.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"t={t:.1f}", fontsize=9)
            if col == 0:
                ax.set_ylabel(name, fontsize=9)
    return _png(fig)


class EmpiricalDenoiser(torch.nn.Module):
    """The exact ``E[x0 | x_t]`` when the data is uniform over a finite set of images."""

    prediction: dk.typing.Prediction = "x0"

    def __init__(self, data: torch.Tensor, schedule: dk.NoiseSchedule):
        super().__init__()
        self.data, self.schedule = data.flatten(1).to(torch.float64), schedule

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: dk.Conditioning | None = None
    ) -> torch.Tensor:
        t64 = t.to(torch.float64)
        alpha = self.schedule.alpha(t64)[:, None]
        sigma = self.schedule.sigma(t64)[:, None].clamp_min(1e-4)
        x, y = x_t.flatten(1).to(torch.float64), self.data
        logits = (alpha * (x @ y.T) - 0.5 * alpha**2 * (y**2).sum(1)) / sigma**2
        return (torch.softmax(logits, dim=1) @ y).reshape(x_t.shape).to(x_t.dtype)


@figure("figures/reverse-strip.png", deps=SAMPLING, uses=(EmpiricalDenoiser,))
def reverse_strip() -> bytes:
    """The reverse process: x_t and the denoiser's x0 estimate at each step of a sampler."""
    from sklearn.datasets import load_digits

    from diffkit import samplers

    data = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    schedule = schedules.Cosine()
    denoiser = EmpiricalDenoiser(data, schedule)
    noise = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    # The callback reports each step's end: its t is the time x_t has reached, and x0 the
    # estimate that step was taken from. The first column is the starting noise.
    start = np.asarray(noise[0, 0])
    frames: list[tuple[float, np.ndarray, np.ndarray | None]] = [(1.0, start, None)]

    def record(step: int, t: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor) -> None:
        frames.append((float(t[0]), np.asarray(x_t[0, 0]), np.asarray(x0[0, 0])))

    with torch.no_grad():
        samplers.REGISTRY["ddim"]().sample(denoiser, schedule, noise, steps=10, callback=record)
    fig, axes = plt.subplots(2, len(frames), figsize=(1.0 * len(frames), 2.4))
    for col, (t, x_t, x0) in enumerate(frames):
        for row, image in enumerate((x_t, x0)):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if image is None:
                ax.axis("off")
                continue
            ax.imshow(image, cmap="gray", vmin=-1.5, vmax=1.5)
        axes[0, col].set_title("noise" if col == 0 else f"t={t:.3g}", fontsize=8)
    axes[0, 0].set_ylabel("$x_t$", fontsize=9)
    axes[1, 1].set_ylabel(r"$\hat x_0$", fontsize=9)
    return _png(fig)


class MixtureDenoiser(torch.nn.Module):
    """The exact ``E[x0 | x_t]`` for an equal-weight mixture of isotropic Gaussians."""

    prediction: dk.typing.Prediction = "x0"

    def __init__(self, means: torch.Tensor, std: float, schedule: dk.NoiseSchedule):
        super().__init__()
        self.means, self.var, self.schedule = means, std**2, schedule
        self.calls = 0

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: dk.Conditioning | None = None
    ) -> torch.Tensor:
        self.calls += 1
        t64 = t.to(torch.float64)
        alpha = self.schedule.alpha(t64)[:, None, None]
        total = alpha**2 * self.var + self.schedule.sigma(t64)[:, None, None] ** 2
        x, mu = x_t.to(torch.float64)[:, None, :], self.means[None]  # (b, 1, d), (1, k, d)
        weights = torch.softmax(-((x - alpha * mu) ** 2).sum(-1) / (2 * total[..., 0]), dim=1)
        per_component = mu + alpha * self.var / total * (x - alpha * mu)
        return (weights[..., None] * per_component).sum(1).to(x_t.dtype)


@figure("figures/sampler-accuracy.png", deps=SAMPLING, uses=(MixtureDenoiser,))
def sampler_accuracy() -> bytes:
    """Error against a converged reference vs network evaluations, for each sampler.

    The data is a mixture of Gaussians whose exact denoiser is known, so the only error
    is the sampler's: the distance (RMS over 128 samples) between its output and the
    probability-flow ODE solution from the same noise, taken as Heun with 300 steps.
    """
    from diffkit import samplers

    curves = [
        "ddim",
        "euler",
        "heun",
        "dpmpp_2m",
        "dpmpp_2m_logsnr",
        "dpmpp_3m_logsnr",
        "unipc",
        "unipc_3",
        "unipc_3_trailing",
    ]
    g = torch.Generator().manual_seed(0)
    means = torch.randn(6, 8, generator=g, dtype=torch.float64)
    schedule = schedules.Cosine()
    denoiser = MixtureDenoiser(means, 0.25, schedule)
    noise = torch.randn(128, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        reference = samplers.REGISTRY["heun"]().sample(denoiser, schedule, noise, steps=300)
        fig, ax = plt.subplots(figsize=(7.5, 4.6))
        for name in curves:
            nfe, err = [], []
            for steps in (4, 6, 10, 16, 25, 40):
                denoiser.calls = 0
                x0 = samplers.REGISTRY[name]().sample(denoiser, schedule, noise, steps=steps)
                nfe.append(denoiser.calls)
                err.append(float((x0 - reference).pow(2).mean().sqrt()))
            style = "--" if name in {"ddim", "euler", "heun"} else "-"
            ax.loglog(nfe, err, style, marker="o", markersize=3, label=name)
    ax.set_xticks([4, 6, 10, 16, 25, 40, 64])
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel("RMS error vs converged ODE solution")
    ax.set_title("Accuracy vs NFE: 8-D Gaussian mixture, exact denoiser, Cosine schedule")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    return _png(fig)


@figure("figures/sampler-grids.png", deps=SAMPLING)
def sampler_grids() -> bytes:
    """The 10-step time grid of each spacing, on Cosine and on LinearBeta.

    A multistep sampler evaluates the denoiser at the first 10 of the 11 points.
    """
    from diffkit import samplers

    presets = {
        "Karras (dpmpp_2m, euler, heun)": "dpmpp_2m",
        "log-SNR (unipc, dpmpp_2m_logsnr)": "unipc",
        "uniform in t (ddim)": "ddim",
        "trailing (unipc_3_trailing)": "unipc_3_trailing",
    }
    rows = {"Cosine": schedules.Cosine(), "LinearBeta (DDPM)": schedules.LinearBeta()}
    fig, axes = plt.subplots(len(rows), 1, figsize=(7.5, 4.4), sharex=True)
    for ax, (title, schedule) in zip(axes, rows.items(), strict=True):
        for y, name in enumerate(presets.values()):
            t = [float(v) for v in samplers.REGISTRY[name]().grid(schedule, 10).t]
            late = sum(v > 0.98 for v in t[:-1])  # the last point is the end, not evaluated
            ax.plot(t, [y] * len(t), "|", markersize=14, markeredgewidth=2)
            ax.text(1.04, y, f"{late} of {len(t) - 1} at t > 0.98", va="center", fontsize=8)
        ax.set_yticks(range(len(presets)), list(presets), fontsize=8)
        ax.set_ylim(-0.6, len(presets) - 0.4)
        ax.invert_yaxis()
        ax.set_title(f"{title}: where 10 steps evaluate the denoiser", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    axes[-1].set_xlabel("t  (0 = data, 1 = noise)")
    axes[-1].set_xlim(-0.02, 1.02)
    return _png(fig)


def _page_output(page: str) -> tuple[dict[str, object], str]:
    """Run the ``python`` blocks of a docs page in a temporary folder, as the docs test
    does; returns the page's namespace and what it printed (kept out of the build log)."""
    import contextlib
    import tempfile

    root = Path(__file__).resolve().parents[2]
    lines = (root / page).read_text(encoding="utf-8").splitlines()
    namespace: dict[str, object] = {"__name__": "__docs__"}
    printed = io.StringIO()
    torch.manual_seed(0)  # as the docs test does
    with (
        tempfile.TemporaryDirectory() as folder,
        contextlib.chdir(folder),
        contextlib.redirect_stdout(printed),
    ):
        for i, line in enumerate(lines):
            if line != "```python":
                continue
            previous = next((x.strip() for x in reversed(lines[:i]) if x.strip()), "")
            end = lines.index("```", i + 1)
            if previous != "<!-- docs-test: skip -->":
                code = "\n" * (i + 1) + "\n".join(lines[i + 1 : end])  # line numbers as in page
                exec(compile(code, page, "exec"), namespace)
    return namespace, printed.getvalue()


@figure(
    "figures/tutorial-digits.png",
    deps=(
        *SAMPLING,
        "docs/tutorials/train-on-digits.md",
        *NETWORKS,
        "src/diffkit/losses.py",
        "src/diffkit/forward.py",
        "src/diffkit/ema.py",
        "src/diffkit/data.py",
        "src/diffkit/training",
        "src/diffkit/training.py",
        "src/diffkit_demo/datasets.py",
    ),
    uses=(_page_output,),
)
def tutorial_digits() -> bytes:
    """What the train-on-digits tutorial's code samples: its ``digits``, one per label."""
    digits = _page_output("docs/tutorials/train-on-digits.md")[0]["digits"]
    assert isinstance(digits, torch.Tensor)
    fig, axes = plt.subplots(1, len(digits), figsize=(len(digits) * 0.8, 1.2))
    for label, (ax, image) in enumerate(zip(axes, digits, strict=True)):
        ax.imshow(np.asarray(image[0].clamp(-1, 1)), cmap="gray", vmin=-1, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"label {label}", fontsize=8)
    return _png(fig)


def _output_figure(
    page: str, printed: str, images: tuple[str, torch.Tensor] | None = None, width: int = 100
) -> bytes:
    """The printed output of a page as a terminal-like panel, with a row of its images."""
    import textwrap

    shown: list[str] = []
    for line in printed.rstrip().splitlines():
        shown.extend(textwrap.wrap(line, width, subsequent_indent="    ") or [""])
    if len(shown) > 60:  # a long repr: its head and tail
        shown = [*shown[:40], "    ...", *shown[-15:]]
    text_height = 0.45 + 0.14 * len(shown)
    rows = 2 if images is not None else 1
    heights = [text_height, 1.3] if images is not None else [text_height]
    fig = plt.figure(figsize=(8.6, sum(heights) + 0.2))
    grid = fig.add_gridspec(rows, 1, height_ratios=heights, hspace=0.45)
    ax = fig.add_subplot(grid[0])
    ax.set_axis_off()
    ax.set_facecolor("#f5f5f5")
    ax.add_patch(plt.Rectangle((0, 0), 1, 1, transform=ax.transAxes, color="#f5f5f5", zorder=0))
    ax.set_title(f"what the code of {page} prints", fontsize=9, loc="left")
    ax.text(
        0.01, 0.98, "\n".join(shown), va="top", ha="left", family="monospace", fontsize=7.5,
        transform=ax.transAxes,
    )  # fmt: skip
    if images is not None:
        title, batch = images
        holder = fig.add_subplot(grid[1])
        holder.set_axis_off()
        holder.set_title(title, fontsize=8)
        count = min(len(batch), 16)
        strip = grid[1].subgridspec(1, max(count, 10), wspace=0.05)  # one image stays small
        for k in range(count):
            image_ax = fig.add_subplot(strip[k])
            image = batch[k].detach().float().clamp(-1, 1)
            image_ax.imshow(np.asarray(image[0]), cmap="gray", vmin=-1, vmax=1)
            image_ax.set_xticks([])
            image_ax.set_yticks([])
    return _png(fig)


# Pages whose output figure is drawn from the whole package: each runs in seconds.
PACKAGE = ("src/diffkit",)

# Each page's printed output, and optionally the images one of its variables holds:
# page -> (variable, title) or None.
PAGE_OUTPUTS: dict[str, tuple[str, str] | None] = {
    "docs/getting-started.md": None,
    "docs/tutorials/compose-a-pipeline.md": (
        "images",
        "the last pipeline.generate(...) of the page: untrained networks, so noise",
    ),
    "docs/tutorials/forward-process.md": None,
    "docs/tutorials/load-weights.md": None,
    "docs/tutorials/torchrun.md": None,
    "docs/tutorials/write-your-own.md": (
        "mine",  # (the same as MyDDIM's: both are DDIM with eta = 0)
        "the 16 samples of PlannedDDIM (25 steps, the exact denoiser of the 8x8 digits)",
    ),
}


def _page_figure(page: str) -> Callable[[], bytes]:
    """The figure of what ``page``'s code prints (and the images it names, if any)."""

    def draw() -> bytes:
        namespace, printed = _page_output(page)
        shown = PAGE_OUTPUTS[page]
        images = None
        if shown is not None:
            variable, title = shown
            tensor = namespace[variable]
            assert isinstance(tensor, torch.Tensor)
            images = (title, tensor)
        return _output_figure(Path(page).name, printed, images)

    return draw


for _page in PAGE_OUTPUTS:
    figure(
        f"figures/out-{Path(_page).stem}.png",
        deps=(*PACKAGE, _page),
        uses=(_page_output, _output_figure, _page_figure),
    )(_page_figure(_page))


@figure("figures/patches.png", deps=("src/diffkit/patches.py",))
def patch_grids() -> bytes:
    """A digit cut into 2x2 patches by ``SpatialPatches``, and the tokens it becomes."""
    from sklearn.datasets import load_digits

    from diffkit import patches

    digit = torch.tensor(load_digits().images[3], dtype=torch.float32)[None, None] / 8.0
    spatial = patches.SpatialPatches(2)
    tokens = spatial.patchify(digit)[0]  # (16 tokens, 4 features)
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.0), width_ratios=(1, 1, 2.2))
    axes[0].imshow(digit[0, 0], cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("image (1, 8, 8)", fontsize=9)
    for k in range(1, 4):
        axes[0].axhline(2 * k - 0.5, color="#ffb300", lw=1.5)
        axes[0].axvline(2 * k - 0.5, color="#ffb300", lw=1.5)
    grid = np.full((4 * 3 - 1, 4 * 3 - 1), np.nan)  # the patches pulled apart, in row-major order
    for n, token in enumerate(tokens):
        r, c = divmod(n, 4)
        grid[3 * r : 3 * r + 2, 3 * c : 3 * c + 2] = np.asarray(token.reshape(2, 2))
        axes[1].text(3 * c + 0.5, 3 * r - 0.7, str(n), ha="center", fontsize=6, color="#311b92")
    gaps = matplotlib.colormaps["gray"].with_extremes(bad="#d1c4e9")  # between patches
    axes[1].imshow(grid, cmap=gaps, vmin=0, vmax=1)
    axes[1].set_title("16 patches of 2x2 (token order)", fontsize=9)
    axes[2].imshow(np.asarray(tokens.T), cmap="gray", vmin=0, vmax=1, aspect="auto")
    axes[2].set_title("patchify: (16 tokens, 4 features)", fontsize=9)
    axes[2].set_xlabel("token")
    axes[2].set_ylabel("feature")
    for ax in axes[:2]:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[2].set_xticks(range(16))
    axes[2].set_yticks(range(4))
    return _png(fig)


@figure(
    "figures/latent-reconstructions.png",
    deps=(
        "docs/concepts/latent-space.md",
        "src/diffkit/nn/__init__.py",
        "src/diffkit/nn/layers.py",
        "src/diffkit/nn/vae.py",
        "src/diffkit_demo/datasets.py",
    ),
    uses=(_page_output,),
)
def latent_reconstructions() -> bytes:
    """The latent-space page's autoencoder: held-out digits, latents, reconstructions."""
    page = _page_output("docs/concepts/latent-space.md")[0]
    x, z, y = (page[k] for k in ("held_out", "latents", "decoded"))
    assert isinstance(x, torch.Tensor) and isinstance(z, torch.Tensor)
    assert isinstance(y, torch.Tensor)
    rows = {
        "image (1, 16, 16)": (x[:, 0], (-1, 1)),
        "latent channel 0 (8x8)": (z[:, 0], (-2.5, 2.5)),
        "latent channel 1 (8x8)": (z[:, 1], (-2.5, 2.5)),
        "decoded": (y[:, 0].clamp(-1, 1), (-1, 1)),
    }
    fig, axes = plt.subplots(len(rows), 8, figsize=(8 * 0.9, len(rows) * 1.0))
    for r, (label, (images, (lo, hi))) in enumerate(rows.items()):
        for c in range(8):
            ax = axes[r, c]
            ax.imshow(np.asarray(images[c]), cmap="gray", vmin=lo, vmax=hi)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    return _png(fig)


@figure(
    "figures/clip-similarity.png",
    deps=(
        "docs/concepts/clip.md",
        "src/diffkit/nn/clip.py",
        "src/diffkit/tokenizers.py",
        "src/diffkit_demo/datasets.py",
    ),
    uses=(_page_output,),
)
def clip_similarity() -> bytes:
    """The CLIP page's model: cosine similarity of one held-out image per digit to the
    ten prompts."""
    page = _page_output("docs/concepts/clip.md")[0]
    similarity, test = page["similarity"], page["test"]
    assert isinstance(similarity, torch.Tensor)
    labels = torch.as_tensor(test.labels)  # type: ignore[attr-defined]
    rows = [int(torch.nonzero(labels == d)[0]) for d in range(10)]
    images = test.images[rows]  # type: ignore[attr-defined]
    matrix = np.asarray(similarity[rows])
    fig, ax = plt.subplots(figsize=(6.8, 6.0))
    shown = ax.imshow(matrix, cmap="viridis")
    for i in range(10):
        for j in range(10):
            colour = "black" if matrix[i, j] > matrix.mean() else "white"
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6, color=colour)
        image = np.asarray(images[i][0])  # the row's held-out digit, left of the matrix
        ax.imshow(image, cmap="gray", vmin=-1, vmax=1, extent=(-1.45, -0.55, i + 0.45, i - 0.45))
    ax.set_xlim(-1.5, 9.5)
    ax.set_ylim(9.5, -0.5)
    prompts = page["prompts"]
    assert isinstance(prompts, list)
    ax.set_xticks(range(10), [p.rsplit(" ", 1)[-1] for p in prompts], rotation=60, fontsize=7)
    ax.set_yticks([])
    ax.set_title('cosine similarity: held-out image vs "a handwritten digit …"', fontsize=9)
    fig.colorbar(shown, ax=ax, shrink=0.7)
    return _png(fig)


@figure(
    "figures/unet-shapes.png",
    deps=("docs/concepts/unet.md", *NETWORKS),
    uses=(_page_output,),
)
def unet_shapes() -> bytes:
    """The U-Net page's recorded block outputs: resolution and channels in call order."""
    page = _page_output("docs/concepts/unet.md")[0]
    shapes = page["shapes"]
    assert isinstance(shapes, list)
    names = [name for name, _ in shapes]
    channels = [shape[0] for _, shape in shapes]
    sides = [shape[1] for _, shape in shapes]
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    x = np.arange(len(shapes))
    ax.bar(x, sides, color="#673ab7", width=0.6)
    ax.set_ylabel("resolution (pixels per side)")
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=7)
    for i, c in enumerate(channels):
        ax.text(i, sides[i] + 0.5, f"{c} ch", ha="center", fontsize=7)
    ax.set_ylim(0, max(sides) * 1.15)
    ax.set_title("x_t (4, 32, 32): each residual block's output, in call order", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


RESULTS = "benchmarks/RESULTS.md"


def _recorded(after: str, header: str) -> list[list[str]]:
    """The rows of the first table in ``benchmarks/RESULTS.md`` after ``after`` whose
    header line starts with ``header``, split on whitespace (up to the next blank line)."""
    text = (Path(__file__).resolve().parents[2] / RESULTS).read_text(encoding="utf-8")
    lines = text[text.index(after) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows: list[list[str]] = [lines[start].split()]
    for line in lines[start + 1 :]:
        if not line.strip() or line.startswith("```"):
            break
        if not line.startswith("---"):
            rows.append(line.split())
    return rows


@figure("figures/bench-sampler-accuracy.png", deps=(RESULTS,), uses=(_recorded,))
def bench_sampler_accuracy() -> bytes:
    """The recorded sampler-accuracy benchmark: sliced W2 against NFE, diffkit and peers."""
    rows = _recorded("The decisive run", "sampler ")
    nfe = [int(v) for v in rows[0][2::2]]
    fitted = {
        r[0]: [float(v) for v in r[1:]] for r in _recorded("### Samplers fitted", "sampler ")[1:]
    }
    floor = float(_recorded("The decisive run", "sliced W2")[0][-1])
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    shown = {
        "diffkit:unipc_3_trailing",
        "diffkit:unipc",
        "diffkit:dpmpp_2m_logsnr",
        "diffusers:UniPC-3",
        "diffusers:DPM++2M+lu_lambdas",
        "diffusers:DPM++3M+karras",
        "k-diffusion:dpmpp_3m/exponential",
        "k-diffusion:lms/karras",
    }
    for name, *values in rows[1:]:
        if name not in shown:
            continue
        style = "-" if name.startswith("diffkit") else "--"
        ax.loglog(nfe, [float(v) for v in values], style, marker="o", markersize=3, label=name)
    fit = fitted["diffkit:fit_solver"]
    ax.loglog([5, 8, 10], fit, "k-", marker="s", markersize=4, label="diffkit:fit_solver")
    ax.axhline(floor, color="grey", lw=1, ls=":", label=f"floor (two true sample sets) {floor}")
    ax.set_xticks(nfe)
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel("sliced W2 to true samples")
    ax.set_title("64-D Gaussian mixture, exact denoiser, DDPM betas (recorded run)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


@figure("figures/bench-sampler-overhead.png", deps=(RESULTS,), uses=(_recorded,))
def bench_sampler_overhead() -> bytes:
    """The recorded per-step overhead of each sampler against its diffusers scheduler."""
    rows = _recorded("**Latest (commit f7820b5", "sampler ")[1:]
    rows = [r for r in rows if r[0] != "geometric"]
    names = [r[0] for r in rows]
    ours, theirs = [float(r[5]) for r in rows], [float(r[6]) for r in rows]
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax.barh(y - 0.2, theirs, height=0.4, label="diffusers scheduler", color="#bbbbbb")
    ax.barh(y + 0.2, ours, height=0.4, label="diffkit sampler", color="#673ab7")
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("µs per step besides the network (CPU time, zero-cost denoiser)")
    ax.set_title("latent (1, 4, 64, 64), 50 steps (recorded run)", fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8)
    return _png(fig)


DEMO_DEPS = ("src/diffkit_demo",)
"""The trained-demo figure is keyed on the demo's own package (its recipes), not on the
library's sources: an edit to ``src/diffkit`` does not retrain it in a local rebuild (a
fresh clone, as in CI, always draws it from the current code). A new value of
``DIFFKIT_DOCS_DEMO`` (``full``, or any other) redraws it."""
DEMO_ENV = "DIFFKIT_DOCS_DEMO"
"""``full``: the home page's figure runs the default recipe (~3 min on 2 free cores, 15+
on a loaded machine); otherwise the short docs recipe of :func:`_docs_recipe`."""


def _docs_recipe(config: "ImageDemoConfig") -> "ImageDemoConfig":
    """The default image recipe shortened to ~50 s of CPU on one thread (the default's
    ~240 s): 100 CLIP and autoencoder steps, 200 denoiser steps of 48, 4 samples per prompt.
    """

    def steps(stage: Any, n: int, **more: Any) -> dict[str, Any]:
        return stage.model_copy(update={"steps": n, **more}).to_dict()

    update = {
        "threads": 1,
        "samples_per_prompt": 4,
        "clip_train": steps(config.clip_train, 100),
        "autoencoder_train": steps(config.autoencoder_train, 100),
        "train": steps(config.train, 200, batch_size=48),
    }
    return type(config).model_validate({**config.to_dict(), **update})


@figure("figures/demo-samples.png", deps=DEMO_DEPS, uses=(_docs_recipe,), env=(DEMO_ENV,))
def demo_samples() -> bytes:
    """`diffkit demo`'s image recipe, trained from scratch at build time: one row per prompt.

    By default a shortened recipe (:func:`_docs_recipe`, about a minute on one free core);
    with ``DIFFKIT_DOCS_DEMO=full`` the default recipe of ``diffkit demo``. Draws its
    ``samples.npz`` with each sample's prompt and the independent judge's verdict, so the
    figure always shows what the current code produces.
    """
    import tempfile

    from diffkit_demo.recipes import ImageDemoConfig, default_config, run_image_demo

    config = default_config("image")
    assert isinstance(config, ImageDemoConfig)
    full = os.environ.get(DEMO_ENV, "") == "full"
    if not full:
        config = _docs_recipe(config)
    with tempfile.TemporaryDirectory() as folder:
        result = run_image_demo(config, folder, progress=False)
        data = np.load(Path(folder) / "samples.npz")
        images, labels, predicted = data["images"], data["labels"], data["predicted"]
    accuracy = result.metrics.get("prompt_accuracy")
    columns = int(np.bincount(labels).max())
    fig, axes = plt.subplots(10, columns, figsize=(columns * 0.62, 10 * 0.66))
    for digit in range(10):
        rows = np.flatnonzero(labels == digit)
        for k, ax in enumerate(axes[digit]):
            ax.set_xticks([])
            ax.set_yticks([])
            if k >= len(rows):
                ax.axis("off")
                continue
            ax.imshow(images[rows[k]], cmap="gray", vmin=0, vmax=1)
            if predicted[rows[k]] != digit:
                for spine in ax.spines.values():
                    spine.set_color("red")
                    spine.set_linewidth(2)
        axes[digit][0].set_ylabel(str(digit), rotation=0, labelpad=10, fontsize=9)
    train = config.train
    recipe = "the default recipe" if full else "the docs' shortened recipe"
    recipe += f" (denoiser: {train.steps} steps x {train.batch_size})"
    title = f'"a handwritten digit {{zero … nine}}", one row per prompt\n{recipe}'
    if isinstance(accuracy, float):
        title += f"; judged correct: {accuracy:.0%}"
    fig.suptitle(title, fontsize=9)
    return _png(fig)


def render_all(only: str | None = None) -> dict[str, bytes]:
    """Every figure (or those whose path contains ``only``), keyed by its site path."""
    return {p: f.draw() for p, f in FIGURES.items() if only is None or only in p}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("site-figures"))
    parser.add_argument("--only", help="draw only the figures whose path contains this")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for path, png in render_all(args.only).items():
        target = args.out / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(png)
        print(target)


if __name__ == "__main__":
    main()
