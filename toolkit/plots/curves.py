"""Curves and bars: training histories, bytes per party, label partitions, privacy-utility trade-offs."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from toolkit.plots._base import LABELS, _axes, byte_unit

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def plot_history(history: pd.DataFrame, y: str = "loss", *, x: str = "step", hue: str | None = None,
                 ax: Axes | None = None, **kwargs: Any) -> tuple[Figure, Axes]:
    """Line plot of a history DataFrame column (seaborn), e.g. loss or accuracy over steps."""
    import seaborn as sns

    for col in (x, y, hue):
        if col is not None and col not in history.columns:
            raise ValueError(f"history has no column {col!r}; it has {list(history.columns)}")
    fig, ax = _axes(ax)
    sns.lineplot(data=history, x=x, y=y, hue=hue, ax=ax, **kwargs)
    return fig, ax


def plot_communication(summary: pd.DataFrame, *, ax: Axes | None = None) -> tuple[Figure, Axes]:
    """Bytes sent (up) and received (down) per party, from ``wire.summary()``: a linear axis from
    zero (bar lengths compare honestly), in decimal kB / MB / GB, each bar labelled with its value."""
    import seaborn as sns

    for col in ("party", "bytes_up", "bytes_down"):
        if col not in summary.columns:
            raise ValueError(f"the summary has no column {col!r}; it has {list(summary.columns)} (pass wire.summary())")
    long = summary.melt(id_vars="party", value_vars=["bytes_up", "bytes_down"], var_name="direction",
                        value_name="bytes")
    long["direction"] = long["direction"].map({"bytes_up": "sent", "bytes_down": "received"})
    scale, unit = byte_unit(float(long["bytes"].max()))
    long["value"] = long["bytes"] / scale
    fig, ax = _axes(ax)
    sns.barplot(data=long, x="party", y="value", hue="direction", ax=ax)
    for bars in ax.containers:
        ax.bar_label(bars, fmt="%.3g", fontsize="small", padding=2)
    ax.set_ylim(0, float(long["value"].max()) * 1.15 or 1.0)
    ax.set_ylabel(f"{unit} on the wire")
    ax.set_xlabel("party")
    ax.legend(title=None, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig, ax


def plot_partition(datasets, *, ax: Axes | None = None, n_classes: int | None = None) -> tuple[Figure, Axes]:
    """Label counts per client as stacked bars: how non-IID a partition is."""
    counts = [torch.bincount(ds.y_train, minlength=n_classes or 0) for ds in datasets]
    width = max(len(c) for c in counts)
    table = torch.stack([torch.nn.functional.pad(c, (0, width - len(c))) for c in counts]).numpy()  # (clients, classes)
    fig, ax = _axes(ax, (7, 3.5))
    bottom = np.zeros(len(table))
    cmap = __import__("matplotlib").colormaps["tab10" if width <= 10 else "tab20"]
    for k in range(width):
        ax.bar(np.arange(len(table)), table[:, k], bottom=bottom, color=cmap(k % cmap.N), label=str(k), width=0.9)
        bottom += table[:, k]
    ax.set_xlabel("client")
    ax.set_ylabel("samples")
    ax.legend(title="label", ncols=2, fontsize="small", bbox_to_anchor=(1.01, 1), loc="upper left")
    return fig, ax


def plot_tradeoff(results: pd.DataFrame, x: str = "dcor", y: str = "accuracy", *, parameter: str | None = None,
                  ax: Axes | None = None, label: str | None = None, annotate: bool = True) -> tuple[Figure, Axes]:
    """A privacy-utility curve from a sweep (:func:`toolkit.experiments.sweep`): the mean of ``y``
    against the mean of ``x`` per value of ``parameter``, joined in parameter order, with bars of
    one standard deviation over seeds in both directions, each point labelled with its value.

    ``parameter`` defaults to the sweep's first column. Draw several defenses on one ``ax`` (each
    with its ``label``) to compare them at equal leakage or equal utility.
    """
    parameter = parameter or results.columns[0]
    for col in (x, y, parameter):
        if col not in results.columns:
            raise ValueError(f"the sweep has no column {col!r}; it has {list(results.columns)}")
    if results[[x, y]].isna().all().any():
        raise ValueError(f"the sweep's {x!r} or {y!r} column holds no values")
    stats = results.groupby(parameter, sort=True)[[x, y]].agg(["mean", "std"]).fillna(0.0)  # std of one seed: 0
    fig, ax = _axes(ax, (5.5, 4))
    line = ax.errorbar(stats[(x, "mean")], stats[(y, "mean")], xerr=stats[(x, "std")], yerr=stats[(y, "std")],
                       marker="o", capsize=3, label=label or parameter)
    if annotate:
        for value, (mx, my) in zip(stats.index, zip(stats[(x, "mean")], stats[(y, "mean")])):
            ax.annotate(f"{parameter}={value:g}" if isinstance(value, (int, float)) else str(value), (mx, my),
                        textcoords="offset points", xytext=(4, 4), fontsize="x-small", color=line[0].get_color())
    ax.margins(0.1)  # room for the labels of the points at the ends
    n_seeds = results.groupby(parameter).size().max()
    ax.set_xlabel(LABELS.get(x, x))
    ax.set_ylabel(LABELS.get(y, y))
    ax.set_title(f"{LABELS.get(y, y)} against {LABELS.get(x, x)}" + (f" (mean ± sd of {n_seeds} seeds)" if n_seeds > 1 else ""),
                 fontsize="medium")
    ax.legend(fontsize="small")
    return fig, ax
