"""Attribution figures: which input pixels or features a part of the smashed data carries (the
maps come from :func:`toolkit.attribution.attribute`, captum)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from toolkit.plots._base import _axes, _tensor, image_grid

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def plot_attribution(x, attributions, *, n: int = 6, ax: Axes | None = None, title: str | None = None,
                     label: str = "attribution") -> tuple[Figure, Axes]:
    """Inputs (top row) above their attribution maps (bottom row) for ``n`` images (N, C, H, W):
    red where a pixel raises the explained quantity, blue where it lowers it, on one colour scale
    symmetric about 0 shared by all maps, with the input's outline drawn over each map and a
    colorbar. Colour channels are summed."""
    a, xs = _tensor(attributions, "attributions"), _tensor(x, "x")
    if a.shape != xs.shape:
        raise ValueError(f"attributions {tuple(a.shape)} and x {tuple(xs.shape)} differ in shape")
    if xs.dim() == 3:
        a, xs = a[:, None], xs[:, None]
    if xs.dim() != 4 or xs.shape[1] not in (1, 3):
        raise ValueError(f"plot_attribution needs images (N, C, H, W) with 1 or 3 channels; got {tuple(xs.shape)} "
                         f"(tabular data: plot_feature_attribution)")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    m = min(n, len(xs))
    xs, a = xs[:m], a[:m].sum(1, keepdim=True)
    fig, ax = _axes(ax, (max(1.3 * m + 1.2, 4), 3.2))
    pix = image_grid(xs, nrow=m)
    heat = image_grid(a, nrow=m)
    h = xs.shape[-2]
    gray = pix if pix.ndim == 2 else pix.mean(-1)
    top = np.nan_to_num(pix, nan=1.0).clip(0, 1) if pix.ndim == 3 else pix
    canvas_h = 2 * h + 2
    import matplotlib

    ax.imshow(top, cmap=matplotlib.colormaps["gray"].with_extremes(bad="white"), vmin=0, vmax=1,
              interpolation="nearest", extent=(-0.5, top.shape[1] - 0.5, h - 0.5, -0.5))
    vmax = float(np.nanmax(np.abs(heat))) or 1.0
    im = ax.imshow(heat, cmap=matplotlib.colormaps["RdBu_r"].with_extremes(bad="white"), vmin=-vmax, vmax=vmax,
                   interpolation="nearest", extent=(-0.5, heat.shape[1] - 0.5, canvas_h - 0.5, h + 1.5))
    yy, xx = np.mgrid[0:gray.shape[0], 0:gray.shape[1]]
    level = 0.5 * (np.nanmin(gray) + np.nanmax(gray))
    ax.contour(xx, yy + h + 2, np.nan_to_num(gray, nan=float(np.nanmin(gray))), levels=[level], colors="k",
               linewidths=0.6)
    ax.set_xlim(-0.5, top.shape[1] - 0.5)
    ax.set_ylim(canvas_h - 0.5, -0.5)
    ax.set_yticks([h / 2 - 0.5, h + 1.5 + h / 2], ["input", label])
    ax.set_xticks([])
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    fig.colorbar(im, ax=ax, label=f"{label} (red raises, blue lowers)", fraction=0.046, pad=0.02)
    ax.set_xlabel("black line: the input's outline", fontsize="small")
    if title:
        ax.set_title(title)
    return fig, ax


def plot_feature_attribution(attributions, feature_names=None, *, top: int | None = 20, ax: Axes | None = None,
                             title: str | None = None) -> tuple[Figure, Axes]:
    """Tabular data: one horizontal bar per feature, the mean attribution over samples (N, F) (or
    one sample's (F,)), largest magnitude at the top, the ``top`` largest shown; a bar's length
    is the attribution, its sign whether the feature raises (right) or lowers (left) it."""
    a = _tensor(attributions, "attributions")
    if a.dim() == 1:
        a = a[None]
    if a.dim() != 2:
        raise ValueError(f"feature attributions must be (N, F) or (F,), got {tuple(a.shape)} (images: plot_attribution)")
    names = [f"feature {k}" for k in range(a.shape[1])] if feature_names is None else [str(f) for f in feature_names]
    if len(names) != a.shape[1]:
        raise ValueError(f"{len(names)} feature names for {a.shape[1]} features")
    mean = a.mean(0).numpy()
    order = np.argsort(-np.abs(mean), kind="stable")[:top]
    fig, ax = _axes(ax, (5.5, 0.28 * len(order) + 1.2))
    colors = ["tab:red" if mean[k] >= 0 else "tab:blue" for k in order]
    ax.barh(np.arange(len(order)), mean[order], color=colors)
    ax.set_yticks(np.arange(len(order)), [names[k] for k in order])
    ax.invert_yaxis()
    ax.axvline(0, color="k", linewidth=0.8)
    signs = " (red raises, blue lowers)" if (mean[order] < 0).any() and (mean[order] > 0).any() else ""
    ax.set_xlabel(f"mean attribution over {len(a)} sample{'s' if len(a) > 1 else ''}{signs}")
    ax.set_ylabel("feature")
    shown = f"top {len(order)} of {a.shape[1]} features" if len(order) < a.shape[1] else f"{a.shape[1]} features"
    ax.set_title(title or f"attribution per feature ({shown})", fontsize="medium")
    return fig, ax
