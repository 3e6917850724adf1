"""Training with leakage over time: loss, accuracy, dCor, epsilon or any numeric history column,
one panel each, from a ``fit`` history. The one drawing of training curves: notebooks call it
directly, :class:`toolkit.widgets.TrainingMonitor` redraws it live."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from toolkit.plots.curves import plot_history

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TITLES = {"loss": ("loss", "loss (task objective)"), "accuracy": ("accuracy", "fraction correct"),
          "dcor": ("leakage at the cut", "distance correlation dCor"), "bytes": ("communication", "bytes sent")}
BOUNDED = {"accuracy", "dcor"}  # columns in [0, 1]: a fixed y range reads the same at every redraw
DEFAULT_METRICS = ("loss", "accuracy", "dcor")
XLABELS = {"step": "training step (batches)", "round": "round", "epoch": "epoch"}


def _progress(history: pd.DataFrame) -> pd.Series:
    """Each row's place in training in epochs: a step of epoch e (0-based) with k steps sits at
    e + (its rank + 1) / k, so the last step of the first epoch is at 1.0."""
    rank = history.groupby("epoch", sort=False).cumcount() + 1
    size = history.groupby("epoch", sort=False)["epoch"].transform("size")
    return history["epoch"] + rank / size


def _series_names(kind: str, column: str) -> tuple[str, str]:
    """Legend names of ``column`` and its ``test_`` twin in a history of this kind of protocol."""
    if kind == "federated":  # FedAvg's accuracy is the global model's, on the test set
        return ("test set (global model)" if column == "accuracy" else "clients' training batches"
                if column == "loss" else column), "test set (global model)"
    return ("training batch" if column in ("loss", "accuracy") else "fixed probe inputs" if column == "dcor"
            else column), "test set"


def plot_training(history: pd.DataFrame, metrics: Sequence[str] | None = None, *, x: str = "epoch",
                  kind: str = "split", title: str | None = None, fig: Figure | None = None,
                  xmax: float | None = None) -> tuple[Figure, list[Any]]:
    """One panel per history column in ``metrics``, its ``test_<column>`` twin overlaid as markers.

    Args:
        history: what ``fit`` returned (split: one row per step; federated: one per round).
        metrics: the columns to draw; a column the history lacks gets a panel saying so. Default:
            those of loss, accuracy and dCor (a ``LeakageProbe`` hook's column) the history has.
        x: ``"epoch"`` (training progress in epochs: step k of an epoch of K sits at e + k / K),
            ``"step"``, ``"round"`` or any column.
        kind: ``"split"`` or ``"federated"``: names the series in the legend.
        fig: draw on this figure (its axes are cleared and reused when there is one per metric:
            a live redraw); default a new pyplot figure.
        xmax: fix the x range to [0, xmax] (a live figure's curves then grow into a still frame).

    Returns ``(fig, axes)``, one axis per panel.
    """
    import seaborn as sns

    if not isinstance(history, pd.DataFrame):
        raise ValueError(f"history must be the DataFrame fit returns, got {type(history).__name__}")
    if x not in history.columns and len(history):  # an empty history (nothing trained yet) draws empty panels
        raise ValueError(f"history has no column {x!r}; it has {list(history.columns)}")
    if metrics is None:
        metrics = [c for c in DEFAULT_METRICS if c in history.columns or f"test_{c}" in history.columns]
        if not metrics:
            raise ValueError(f"history has none of the columns {list(DEFAULT_METRICS)}; it has {list(history.columns)}")
    metrics = list(metrics)
    h = history.reset_index(drop=True)
    if x == "epoch" and len(h):
        h = h.assign(epoch=_progress(h))
    n = len(metrics)
    with sns.axes_style("whitegrid"):
        if fig is not None and len(fig.axes) == n:  # a redraw: same axes, same layout (cheap)
            axes = fig.axes
            for ax in axes:
                ax.clear()
        else:
            if fig is None:
                import matplotlib.pyplot as plt

                fig = plt.figure()
            fig.clear()
            fig.set_size_inches(4.2 * n, 3.4)
            axes = list(fig.subplots(1, n, squeeze=False)[0])
            # fixed margins (inches), not a layout engine: a redraw must not re-run the layout
            fig.subplots_adjust(left=0.75 / (4.2 * n), right=1 - 0.2 / (4.2 * n), bottom=0.6 / 3.4,
                                top=1 - 0.65 / 3.4, wspace=1.0 / (4.2 - 0.95))
        for ax, column in zip(axes, metrics):
            _panel(ax, h, column, x=x, kind=kind)
        if xmax is not None:
            for ax in axes:
                ax.set_xlim(0, xmax * 1.03)  # room for the last marker
        elif x == "epoch" and len(h):
            last = max(int(np.ceil(float(h["epoch"].max()))), 1)
            for ax in axes:
                ax.set_xlim(0, last + 0.08)  # room for the points at the last epoch's end
                ax.set_xticks(range(0, last + 1))
    fig.suptitle(title or "")
    return fig, axes


def _panel(ax, history: pd.DataFrame, column: str, *, x: str, kind: str) -> None:
    title, ylabel = TITLES.get(column, (column, column))
    twin = f"test_{column}"
    drawn = 0
    for col, name in zip((column, twin), _series_names(kind, column)):
        if col not in history.columns or x not in history.columns:
            continue
        points = history[[x, col]].dropna()
        if len(points) == 0:
            continue
        sparse = col == twin or len(points) < len(history) / 2 or len(points) == 1
        plot_history(points, col, x=x, ax=ax, label=name, marker="o" if sparse else None, estimator=None,
                     linestyle="--" if col == twin else "-")
        drawn += 1
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.set_xlabel(XLABELS.get(x, x))
    if drawn:
        ax.legend(loc="best", fontsize="small")
    else:
        hint = "\n(log it with toolkit.split.leakage.LeakageProbe)" if column == "dcor" and len(history) else ""
        ax.text(0.5, 0.5, f"no '{column}' values yet{hint}" if len(history) else "waiting for the first values",
                ha="center", va="center", transform=ax.transAxes, fontsize="small", color="0.4")
    if column in BOUNDED:
        ax.set_ylim(-0.02, 1.02)
