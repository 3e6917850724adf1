"""The leakage explorer's two figures, from an :class:`~toolkit.widgets.session.Outcome`, as PNG bytes.

Drawn on a ``matplotlib.figure.Figure`` (not pyplot: runs can finish on a background thread, and
no figure is left open in the kernel) with :mod:`toolkit.plots` where it has the figure.
"""
from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure

from toolkit import plots
from toolkit.widgets.session import Outcome

__all__ = ["attribution_figure", "png", "reconstruction_figure"]


def _figure(pyplot: bool, figsize: tuple[float, float], layout: str | None = None) -> Figure:
    """A bare Figure (widgets, PNG bytes), or with ``pyplot`` one pyplot manages (a notebook shows it)."""
    if pyplot:
        import matplotlib.pyplot as plt

        return plt.figure(figsize=figsize, layout=layout)
    return Figure(figsize=figsize, layout=layout)


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


def reconstruction_figure(o: Outcome, *, pyplot: bool = False) -> Figure:
    """Images: originals above the attack's reconstructions (PSNR / SSIM where toolkit.plots gives
    them). Tabular: the attacked samples' features and their reconstruction as two heat maps on
    one colour scale (standardized units)."""
    n = len(o.originals)
    if o.originals.dim() == 4:
        fig = _figure(pyplot, (max(0.9 * n, 5), 3.2))
        ax = fig.subplots()
        plots.plot_reconstruction_grid({"original": o.originals, o.setting.attack: o.reconstruction}, n=n, ax=ax,
                                       title=f"What the server reconstructs ({o.setting.attack})\n{_title(o)}")
        return fig
    x, r = o.originals.numpy(), o.reconstruction.numpy()
    limit = float(np.abs(x).max())
    fig = _figure(pyplot, (8, 4.2), "constrained")
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


def attribution_figure(o: Outcome, top: int = 12, *, pyplot: bool = False) -> Figure:
    """Integrated gradients of the cut-layer activation norm with respect to each input
    (:func:`toolkit.plots.plot_attribution` under each input image; for tabular data
    :func:`toolkit.plots.plot_feature_attribution`, the ``top`` features)."""
    a, n = o.attribution, len(o.attribution)
    if a.dim() == 4:
        fig = _figure(pyplot, (max(1.3 * n + 1.2, 4), 3.7))
        plots.plot_attribution(o.originals, a, n=n, ax=fig.subplots(), label="attribution",
                               title=f"Which pixels the smashed data carries\n(integrated gradients of the activation "
                                     f"norm, from a black image)\n{_title(o)}")
        return fig
    fig = _figure(pyplot, (6.5, 0.3 * min(top, a.shape[1]) + 1.6), "constrained")
    plots.plot_feature_attribution(a, o.feature_names, top=top, ax=fig.subplots(),
                                   title=f"Which features the smashed data carries\n(integrated gradients of the "
                                         f"activation norm, from the training mean)\n{_title(o)}")
    return fig
