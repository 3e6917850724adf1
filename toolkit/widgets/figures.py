"""The leakage explorer's two figures, from an :class:`~toolkit.widgets.session.Outcome`, as PNG bytes.

Drawn on a ``matplotlib.figure.Figure`` (not pyplot: runs can finish on a background thread, and
no figure is left open in the kernel) with :mod:`toolkit.plots` where it has the figure.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from matplotlib.figure import Figure

from toolkit import plots
from toolkit.widgets.session import Outcome

__all__ = ["attribution_figure", "png", "reconstruction_figure"]


def png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def _title(o: Outcome) -> str:
    s = o.setting
    defense = "no defense" if s.defense == "none" else f"{s.defense} {s.strength:g}"
    stopped = f" - STOPPED after {o.steps}/{o.total_steps} steps" if o.stopped else ""
    return f"{s.dataset}, {s.model} cut after {s.cut}, {defense}{stopped}"


def reconstruction_figure(o: Outcome) -> Figure:
    """Images: originals above the attack's reconstructions (PSNR / SSIM where toolkit.plots gives
    them). Tabular: the attacked samples' features and their reconstruction as two heat maps on
    one colour scale (standardized units)."""
    n = len(o.originals)
    if o.originals.dim() == 4:
        fig = Figure(figsize=(max(0.9 * n, 5), 3.2))
        ax = fig.subplots()
        plots.plot_reconstruction_grid({"original": o.originals, o.setting.attack: o.reconstruction}, n=n, ax=ax,
                                       title=f"What the server reconstructs ({o.setting.attack})\n{_title(o)}")
        return fig
    x, r = o.originals.numpy(), o.reconstruction.numpy()
    limit = float(np.abs(x).max())
    fig = Figure(figsize=(8, 4.2), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    for ax, values, label in zip(axes, (x, r), ("original", o.setting.attack)):
        image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
        ax.set_ylabel(f"{label}\n(test sample)")
        ax.set_yticks(range(n))
    axes[-1].set_xlabel("feature (index)")
    fig.colorbar(image, ax=list(axes), label="feature value (standard deviations)")
    fig.suptitle(f"What the server reconstructs ({o.setting.attack}; MSE {o.scores['mse']:.2f})\n{_title(o)}",
                 fontsize="medium")
    return fig


def attribution_figure(o: Outcome, top: int = 12) -> Figure:
    """Integrated gradients of the cut-layer activation norm with respect to each input pixel
    (under each input, red = raises the norm, blue = lowers it, one colour scale), or for
    tabular data the mean |attribution| per feature, the ``top`` largest as bars."""
    a = o.attribution
    if a.dim() == 4:
        n = len(a)
        limit = float(a.abs().max()) or 1.0
        fig = Figure(figsize=(max(0.9 * n, 5), 3.0), layout="constrained")
        top_ax, bottom_ax = fig.subplots(2, 1)
        plots.plot_images(o.originals, nrow=n, ax=top_ax, title="input")
        plots.plot_images(a[:, :1], nrow=n, ax=bottom_ax, cmap="RdBu_r", vmin=-limit, vmax=limit,
                          title="attribution of the activation norm (integrated gradients from a black image)")
        fig.colorbar(bottom_ax.images[0], ax=bottom_ax, label="attribution\n(norm units)")
        fig.suptitle(f"Which pixels the smashed data carries\n{_title(o)}", fontsize="medium")
        return fig
    mean = a.abs().mean(0)
    order = torch.argsort(mean, descending=True)[:top].flip(0)
    names = o.feature_names or [f"feature {i}" for i in range(len(mean))]
    fig = Figure(figsize=(6.5, 0.3 * len(order) + 1.4), layout="constrained")
    ax = fig.subplots()
    ax.barh([names[i] for i in order], mean[order].numpy(), color="#4C72B0")
    ax.set_xlabel("mean |attribution| of the activation norm\n(integrated gradients from the training mean)")
    ax.set_title(f"Which features the smashed data carries (top {len(order)})\n{_title(o)}", fontsize="medium")
    return fig
