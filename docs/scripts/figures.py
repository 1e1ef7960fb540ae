"""Figures for the documentation, drawn from diffkit itself (never pasted by hand).

The mkdocs hook (``docs/scripts/hooks.py``) calls :func:`render_all` on every build;
run this file directly to write the PNGs somewhere to look at them::

    python docs/scripts/figures.py --out /tmp/figures
"""

import argparse
import io
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import torch

import diffkit as dk
from diffkit import schedules


def _schedules() -> dict[str, dk.NoiseSchedule]:
    return {
        "LinearBeta (DDPM)": schedules.LinearBeta(),
        "SqrtLinearBeta (SD)": schedules.SqrtLinearBeta(),
        "ZeroTerminalSNR(SqrtLinearBeta)": schedules.ZeroTerminalSNR(schedules.SqrtLinearBeta()),
        "Cosine": schedules.Cosine(),
        "EDM": schedules.EDM(),
        "RectifiedFlow": schedules.RectifiedFlow(),
    }


def _png(fig: "matplotlib.figure.Figure") -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def schedule_curves() -> bytes:
    """alpha(t), sigma(t) and log-SNR(t) for every built-in schedule, on one time axis."""
    t = torch.linspace(0.0, 1.0, 401, dtype=torch.float64)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
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
        ax.set_xlabel("t  (0 = data, 1 = noise)")
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8, loc="lower left")
    return _png(fig)


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
            ax.imshow(np.asarray(x_t[col, 0]), cmap="gray", vmin=-2.0, vmax=2.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"t={t:.1f}", fontsize=9)
            if col == 0:
                ax.set_ylabel(name, fontsize=9)
    return _png(fig)


FIGURES: dict[str, Callable[[], bytes]] = {
    "figures/schedules.png": schedule_curves,
    "figures/forward-strip.png": forward_strip,
}
"""Site path -> function returning the PNG bytes."""


def render_all() -> dict[str, bytes]:
    """Every figure, keyed by its path inside the site."""
    return {path: draw() for path, draw in FIGURES.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("site-figures"))
    args = parser.parse_args()
    for path, png in render_all().items():
        target = args.out / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(png)
        print(target)


if __name__ == "__main__":
    main()
