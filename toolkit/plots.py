"""Figures. Every helper takes ``ax=None`` and returns ``(fig, ax)``; none calls ``plt.show()``."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _axes(ax: Axes | None, figsize: tuple[float, float] = (5, 3.5)) -> tuple[Figure, Axes]:
    try:
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as err:  # pragma: no cover - matplotlib is a dependency
        raise ModuleNotFoundError("plots need matplotlib: pip install matplotlib") from err
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def image_grid(images: Tensor | np.ndarray, *, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile images (B, C, H, W) or (B, H, W) into one (rows*H, cols*W[, 3]) array, NaN between tiles."""
    x = torch.as_tensor(images).detach().float().cpu()
    if x.dim() == 3:
        x = x[:, None]
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be (B, H, W) or (B, C, H, W) with 1 or 3 channels, got {tuple(x.shape)}")
    b, c, h, w = x.shape
    cols = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = np.full((c, rows * (h + pad) - pad, cols * (w + pad) - pad), np.nan, dtype=np.float32)
    for i in range(b):
        r, k = divmod(i, cols)
        grid[:, r * (h + pad):r * (h + pad) + h, k * (w + pad):k * (w + pad) + w] = x[i].numpy()
    return grid[0] if c == 1 else grid.transpose(1, 2, 0)


def plot_images(images: Tensor | np.ndarray, *, nrow: int | None = None, ax: Axes | None = None,
                title: str | None = None, cmap: str = "gray", vmin: float | None = 0.0,
                vmax: float | None = 1.0) -> tuple[Figure, Axes]:
    """Show a batch of images as one grid (pixels in [0, 1] by default)."""
    fig, ax = _axes(ax, (6, 6))
    grid = image_grid(images, nrow=nrow)
    if grid.ndim == 3:
        grid = np.nan_to_num(grid, nan=1.0).clip(0, 1)
    ax.imshow(grid, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return fig, ax


def plot_reconstruction_grid(rows: dict[str, Tensor], *, n: int = 8, ax: Axes | None = None,
                             title: str | None = None) -> tuple[Figure, Axes]:
    """One row of ``n`` images per entry (e.g. originals, then each attack's reconstructions),
    labelled on the left."""
    fig, ax = _axes(ax, (n * 0.9, len(rows) * 1.0 + 0.3))
    images = torch.cat([torch.as_tensor(v[:n]).detach().float().cpu().clamp(0, 1) for v in rows.values()])
    grid = image_grid(images, nrow=n)
    if grid.ndim == 3:
        grid = np.nan_to_num(grid, nan=1.0)
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    h = next(iter(rows.values())).shape[-2]
    ax.set_yticks([(h + 1) * i + h / 2 for i in range(len(rows))], list(rows))
    ax.set_xticks([])
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    if title:
        ax.set_title(title)
    return fig, ax


def plot_activations(activations: Tensor, *, sample: int = 0, ax: Axes | None = None,
                     title: str | None = None) -> tuple[Figure, Axes]:
    """What crossed the cut: one sample's feature maps (B, C, H, W) as a grid of C images, or a
    batch of vectors (B, D) as a heat map. Each map is scaled to its own range."""
    a = torch.as_tensor(activations).detach().float().cpu()
    if a.dim() == 4:
        maps = a[sample]  # (C, H, W)
        lo = maps.amin(dim=(1, 2), keepdim=True)
        span = (maps.amax(dim=(1, 2), keepdim=True) - lo).clamp(min=1e-12)
        fig, ax = plot_images((maps - lo) / span, ax=ax, title=title, cmap="viridis")
        return fig, ax
    if a.dim() == 2:
        fig, ax = _axes(ax, (6, 3))
        ax.imshow(a.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xlabel("unit")
        ax.set_ylabel("sample")
        if title:
            ax.set_title(title)
        return fig, ax
    raise ValueError(f"activations must be (B, C, H, W) or (B, D), got {tuple(a.shape)}")


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
    """Bytes sent (up) and received (down) per party, from ``wire.summary()``."""
    import seaborn as sns

    long = summary.melt(id_vars="party", value_vars=["bytes_up", "bytes_down"], var_name="direction",
                        value_name="bytes")
    fig, ax = _axes(ax)
    sns.barplot(data=long, x="party", y="bytes", hue="direction", ax=ax)
    ax.set_yscale("log")
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


LABELS = {"accuracy": "test accuracy", "dcor": "distance correlation dCor(X, Z)", "ssim": "attack SSIM",
          "psnr": "attack PSNR (dB)", "auc": "attack AUC", "epsilon_rdp": "epsilon (RDP)",
          "epsilon_prv": "epsilon (PRV)", "bytes": "bytes on the wire", "seconds": "seconds"}


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
