"""Training with leakage over time: loss, accuracy and dCor per epoch from a ``fit`` history."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _progress(history: pd.DataFrame) -> pd.Series:
    """Each row's place in training in epochs: a step of epoch e (0-based) with k steps sits at
    e + (its rank + 1) / k, so the last step of the first epoch is at 1.0."""
    rank = history.groupby("epoch", sort=False).cumcount() + 1
    size = history.groupby("epoch", sort=False)["epoch"].transform("size")
    return history["epoch"] + rank / size


def plot_training(history: pd.DataFrame, *, fig: Figure | None = None, title: str | None = None,
                  ) -> tuple[Figure, np.ndarray]:
    """Loss, accuracy and leakage (dCor) against training progress in epochs, one panel each, from
    a ``fit`` history: per-step ``loss`` / ``accuracy`` as thin lines, the per-epoch
    ``test_loss`` / ``test_accuracy`` (``eval_each_epoch``) and ``dcor`` (a ``LeakageProbe``
    hook) where they are not NaN as points. Panels whose columns are absent are left out.

    Returns ``(fig, axes)`` (one axis per panel).
    """
    import matplotlib.pyplot as plt

    if not isinstance(history, pd.DataFrame):
        raise ValueError(f"history must be the DataFrame fit returns, got {type(history).__name__}")
    for col in ("epoch", "loss"):
        if col not in history.columns:
            raise ValueError(f"history has no column {col!r}; it has {list(history.columns)}")
    if history.empty:
        raise ValueError("history is empty")
    h = history.reset_index(drop=True)
    t = _progress(h)
    panels = [("loss", "test_loss", "loss (cross-entropy)"), ("accuracy", "test_accuracy", "accuracy"),
              ("dcor", None, "dCor(probe inputs, cut-layer output)")]
    panels = [p for p in panels if p[0] in h.columns or (p[1] and p[1] in h.columns)]
    if fig is None:
        fig = plt.figure(figsize=(4 * len(panels), 3.3), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharex=True))
    for ax, (step_col, epoch_col, label) in zip(axes, panels):
        if step_col in h.columns:
            keep = h[step_col].notna()
            if step_col == "dcor":
                ax.plot(t[keep], h.loc[keep, step_col], marker="o", color="tab:red", label="dCor")
            else:
                ax.plot(t[keep], h.loc[keep, step_col], linewidth=0.8, alpha=0.6, label="train (per step)")
        if epoch_col and epoch_col in h.columns:
            keep = h[epoch_col].notna()
            ax.plot(t[keep], h.loc[keep, epoch_col], marker="o", color="tab:orange", label="test (end of epoch)")
        ax.set_ylabel(label)
        ax.set_xlabel("epoch")
        if step_col in ("accuracy", "dcor"):
            ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    last = int(np.ceil(float(t.max())))
    axes[0].set_xlim(0, max(last, 1) + 0.08)  # room for the points at the last epoch's end
    axes[0].set_xticks(range(0, max(last, 1) + 1))
    if title:
        fig.suptitle(title)
    return fig, axes
