"""Leakage figures: distance correlation at every layer, activation / gradient embeddings by label."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from toolkit.plots._base import _axes, _tensor

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

STATISTICS = {"dcor": "distance correlation dCor(X, layer output)",
              "dcor_unbiased": "bias-corrected dCor(X, layer output)"}


def plot_leakage_profile(frame: pd.DataFrame, *, statistic: str | None = None, hue: str | None = None,
                         ax: Axes | None = None, title: str | None = None) -> tuple[Figure, Axes]:
    """Distance correlation between the inputs and each layer's output, layers in network order,
    from :func:`toolkit.leakage.leakage_profile`; with a ``hue`` column (e.g. "defense"), one line
    per value (concatenate the profiles with and without a defense).

    ``statistic`` None picks ``dcor_unbiased`` when some layer's output has more values per sample
    than there are samples (where the plain V-statistic is biased upward), else ``dcor``.
    """
    need = ["index", "layer", "n", "dim", "dcor", "dcor_unbiased"] + ([hue] if hue else [])
    missing = [c for c in need if c not in frame.columns]
    if missing:
        raise ValueError(f"the profile has no column {missing[0]!r}; it has {list(frame.columns)} "
                         f"(pass toolkit.leakage.leakage_profile(...))")
    if frame.empty:
        raise ValueError("the profile is empty")
    if statistic is None:
        statistic = "dcor_unbiased" if (frame["dim"] > frame["n"]).any() else "dcor"
    if statistic not in STATISTICS:
        raise ValueError(f"unknown statistic {statistic!r}; choose one of {list(STATISTICS)}")
    layers = frame.drop_duplicates("index").sort_values("index")
    fig, ax = _axes(ax, (max(4.5, 0.55 * len(layers) + 2), 3.5))
    groups = frame.groupby(hue, sort=False) if hue else [(None, frame)]
    for value, part in groups:
        part = part.sort_values("index")
        ax.plot(part["index"], part[statistic], marker="o", label=None if value is None else str(value))
    ax.set_xticks(layers["index"], layers["layer"], rotation=45, ha="right")
    ax.set_xlabel("output of layer (a cut just after it sends this)")
    ax.set_ylabel(STATISTICS[statistic])
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    n = sorted(frame["n"].unique())
    ax.set_title(title or f"leakage by layer (n = {', '.join(map(str, n))} samples)", fontsize="medium")
    if hue:
        ax.legend(title=hue, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig, ax


def plot_embedding(features, labels, *, method: str = "pca", seed: int = 0, ax: Axes | None = None,
                   title: str | None = None, perplexity: float | None = None) -> tuple[Figure, Axes]:
    """Features (N, ...) (cut-layer activations or gradients) in 2-D, one colour per label: how well
    labels separate in what the server sees. ``method`` "pca" (scikit-learn PCA, axes in % of
    variance) or "tsne" (scikit-learn TSNE, PCA-initialised, ``random_state=seed``; perplexity
    defaults to min(30, (N - 1) / 3))."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    if method not in ("pca", "tsne"):
        raise ValueError(f"unknown method {method!r}; choose 'pca' or 'tsne'")
    z = _tensor(features, "features")
    y = np.asarray(torch.as_tensor(labels).detach().cpu()).reshape(-1)
    if z.dim() < 2 or len(z) < 3:
        raise ValueError(f"features must be (N, ...) with N >= 3 samples, got shape {tuple(z.shape)}")
    if len(y) != len(z):
        raise ValueError(f"{len(z)} feature rows but {len(y)} labels")
    if not torch.isfinite(z).all():
        raise ValueError("features hold NaN or Inf")
    z = z.flatten(1).double().numpy()
    if method == "pca":
        pca = PCA(n_components=2, svd_solver="full")
        xy = pca.fit_transform(z)
        names = [f"PC {k + 1} ({100 * r:.0f}% of variance)" for k, r in enumerate(pca.explained_variance_ratio_)]
    else:
        p = perplexity if perplexity is not None else min(30.0, (len(z) - 1) / 3)
        xy = TSNE(n_components=2, perplexity=p, init="pca", random_state=seed).fit_transform(z)
        names = ["t-SNE 1 (no unit)", "t-SNE 2 (no unit)"]
    fig, ax = _axes(ax, (5, 4.2))
    classes = np.unique(y)
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
    for k, c in enumerate(classes):
        at = y == c
        ax.scatter(xy[at, 0], xy[at, 1], s=12, color=cmap(k % cmap.N), label=str(c), alpha=0.8, linewidths=0)
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.legend(title="label", fontsize="small", markerscale=1.5, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title(title or f"{'PCA' if method == 'pca' else 't-SNE'} of {len(z)} samples, coloured by label",
                 fontsize="medium")
    return fig, ax
