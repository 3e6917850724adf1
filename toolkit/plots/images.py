"""Image figures: image grids, what the server sees at the cut, reconstructions with their scores."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from toolkit.plots._base import _axes, _bare, _tensor, image_grid

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

ORIGINAL_KEYS = ("original", "originals", "private", "truth", "input", "inputs")


def _cmap(name: str):
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad="white")  # white gaps between tiles


def plot_images(images: Tensor | np.ndarray, *, nrow: int | None = None, ax: Axes | None = None,
                title: str | None = None, cmap: str = "gray", vmin: float | None = 0.0,
                vmax: float | None = 1.0) -> tuple[Figure, Axes]:
    """Show a batch of images as one grid (pixels in [0, 1] by default)."""
    fig, ax = _axes(ax, (6, 6))
    grid = image_grid(images, nrow=nrow)
    if grid.ndim == 3:
        grid = np.nan_to_num(grid, nan=1.0).clip(0, 1)
    ax.imshow(grid, cmap=_cmap(cmap), vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return fig, ax


def _channel_grid(ax: Axes, maps: Tensor, *, vmin: float, vmax: float, cmap: str = "viridis",
                  numbers: bool = True, wide: bool = False):
    """One sample's (C, H, W) feature maps as a grid of C tiles on one colour scale, each tile
    numbered with its channel (``wide``: about 2.5 times as many columns as rows); returns the
    image artist (for a colorbar)."""
    import matplotlib.patheffects as pe

    c, h, w = maps.shape
    cols = _wide_columns(c, h, w) if wide else int(np.ceil(np.sqrt(c)))
    im = ax.imshow(image_grid(maps[:, None], nrow=cols), cmap=_cmap(cmap), vmin=vmin, vmax=vmax,
                   interpolation="nearest")
    if numbers and c > 1:
        size = float(np.clip(ax.get_position().width * ax.figure.get_figwidth() * 72 / cols / 3, 4, 8))
        for k in range(c):
            r, q = divmod(k, cols)
            ax.text(q * (w + 1) - 0.4, r * (h + 1) - 0.4, str(k), fontsize=size, color="white", va="top",
                    ha="left", path_effects=[pe.withStroke(linewidth=1.5, foreground="black")])
    _bare(ax)
    return im


def _wide_columns(c: int, h: int, w: int, aspect: float = 4.0) -> int:
    """Columns for C tiles of h x w whose grid is about ``aspect`` times as wide as tall, with few
    empty tiles."""
    def cost(rows: int) -> float:
        cols = -(-c // rows)
        return abs(np.log(cols * w / (rows * h) / aspect)) + 0.5 * (rows * cols - c) / c
    rows = min(range(1, c + 1), key=cost)
    return -(-c // rows)


def _range(a: Tensor) -> tuple[float, float]:
    lo, hi = float(a.min()), float(a.max())
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


def plot_activations(activations: Tensor, *, sample: int = 0, ax: Axes | None = None,
                     title: str | None = None) -> tuple[Figure, Axes]:
    """What crossed the cut: one sample's feature maps (B, C, H, W) as a grid of C tiles numbered by
    channel, or a batch of vectors (B, D) as a heat map (one row per sample); one colour scale with a
    colorbar in activation units."""
    a = _tensor(activations, "activations")
    if a.dim() == 4:
        if not -a.shape[0] <= sample < a.shape[0]:
            raise ValueError(f"sample {sample} is out of range for {a.shape[0]} samples")
        fig, ax = _axes(ax, (5, 4.5))
        maps = a[sample]
        im = _channel_grid(ax, maps, vmin=_range(maps)[0], vmax=_range(maps)[1])
        c, h, w = maps.shape
        ax.set_xlabel(f"image {sample}: {c} channel maps of {h}x{w} (number = channel)", fontsize="small")
    elif a.dim() == 2:
        fig, ax = _axes(ax, (6, 3))
        im = ax.imshow(a.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xlabel("unit")
        ax.set_ylabel("sample")
    else:
        raise ValueError(f"activations must be (B, C, H, W) or (B, D), got {tuple(a.shape)}")
    fig.colorbar(im, ax=ax, label="activation", fraction=0.046, pad=0.03)
    if title:
        ax.set_title(title)
    return fig, ax


def _show_input(ax: Axes, x: Tensor) -> None:
    """One input: an image (C, H, W) / (H, W) in [0, 1], or a feature vector (F,) as a strip."""
    if x.dim() == 1:
        ax.imshow(x[None].numpy(), aspect="auto", cmap="gray", interpolation="nearest")
        ax.set_yticks([])
        return
    img = x[0] if x.dim() == 3 and x.shape[0] == 1 else (x.permute(1, 2, 0) if x.dim() == 3 else x)
    ax.imshow(img.clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    _bare(ax)


def plot_server_view(inputs: Tensor, activations: Tensor, *, n: int = 4, fig: Figure | None = None,
                     title: str | None = None) -> tuple[Figure, np.ndarray]:
    """Inputs (what the client keeps) beside their cut-layer activations (what the server
    receives), one row per sample: feature maps (B, C, H, W) as a grid of numbered channel tiles,
    flat activations (B, D) as a heat strip; one colour scale and colorbar for all rows.

    Returns ``(fig, axes)`` with ``axes`` of shape (n, 2): inputs left, activations right.
    """
    import matplotlib.pyplot as plt

    x, a = _tensor(inputs, "inputs"), _tensor(activations, "activations")
    if x.dim() not in (2, 3, 4) or (x.dim() == 4 and x.shape[1] not in (1, 3)):
        raise ValueError(f"inputs must be images (B, C, H, W) with 1 or 3 channels, (B, H, W), or tabular (B, F), "
                         f"got {tuple(x.shape)}")
    if a.dim() not in (2, 4):
        raise ValueError(f"activations must be (B, C, H, W) or (B, D), got {tuple(a.shape)}")
    if len(x) != len(a):
        raise ValueError(f"{len(x)} inputs but {len(a)} activations: pass the activations of these inputs")
    if not 1 <= n:
        raise ValueError(f"n must be at least 1, got {n}")
    n = min(n, len(x))
    flat = a.dim() == 2
    if fig is None:
        fig = plt.figure(figsize=(8, (1.0 if flat else 1.6) * n + 0.8), layout="constrained")
    axes = np.asarray(fig.subplots(n, 2, width_ratios=[1, 4], squeeze=False))
    lo, hi = _range(a[:n])
    for i in range(n):
        _show_input(axes[i, 0], x[i])
        axes[i, 0].set_ylabel(f"sample {i}", fontsize="small")
        if flat:
            im = axes[i, 1].imshow(a[i][None].numpy(), aspect="auto", cmap="viridis", vmin=lo, vmax=hi,
                                   interpolation="nearest")
            axes[i, 1].set_yticks([])
        else:
            im = _channel_grid(axes[i, 1], a[i], vmin=lo, vmax=hi, wide=True)
    axes[0, 0].set_title("input (stays with the client)", fontsize="small")
    shape = f"{a.shape[1]} units" if flat else f"{a.shape[1]} channels of {a.shape[2]}x{a.shape[3]}, number = channel"
    axes[0, 1].set_title(f"cut-layer activations (sent to the server): {shape}", fontsize="small")
    if flat:
        axes[-1, 1].set_xlabel("unit")
    if x.dim() == 2:
        axes[-1, 0].set_xlabel("feature")
    fig.colorbar(im, ax=axes[:, 1].tolist(), label="activation", shrink=0.9)
    if title:
        fig.suptitle(title)
    return fig, axes


def _as_originals(images, like: Tensor | None, name: str) -> Tensor:
    t = _tensor(images, f"row {name!r}")
    if like is not None and t.shape[1:] != like.shape[1:]:
        if t[0].numel() != like[0].numel():
            raise ValueError(f"row {name!r} holds images of shape {tuple(t.shape[1:])}, the originals "
                             f"{tuple(like.shape[1:])}")
        t = t.reshape(len(t), *like.shape[1:])
    if t.dim() == 3:
        t = t[:, None]
    if t.dim() != 4 or t.shape[1] not in (1, 3):
        raise ValueError(f"row {name!r} must hold images (B, C, H, W) with 1 or 3 channels, got {tuple(t.shape)}")
    return t


def plot_reconstruction_grid(rows: dict[str, Tensor], *, n: int = 8, ax: Axes | None = None,
                             title: str | None = None, scores: bool = True) -> tuple[Figure, Axes]:
    """Originals above reconstructions: one row of ``n`` images per entry, labelled on the left.

    The first entry holds the originals (e.g. ``{"original": x, "cut conv1": rec1, "cut pool2": rec2}``);
    each further entry is one condition (a cut layer, an attack, a defense strength). With
    ``scores``, each reconstruction shows its PSNR (dB) / SSIM against the original above it
    (:func:`toolkit.metrics.psnr`, :func:`toolkit.metrics.ssim`, images clipped to [0, 1]).
    """
    from toolkit import metrics

    if not isinstance(rows, dict) or not rows:
        raise ValueError("rows must be a non-empty dict: label -> images, the originals first")
    names = list(rows)
    first = _as_originals(rows[names[0]], None, names[0])
    images = [first] + [_as_originals(rows[k], first, k) for k in names[1:]]
    m = min([n] + [len(t) for t in images])
    images = [t[:m].clamp(0, 1) for t in images]
    b, c, h, w = images[0].shape
    gap = int(np.ceil(0.42 * h)) if scores and len(images) > 1 else 1
    canvas = np.full((len(images) * (h + gap) - (1 if gap == 1 else 0), m * (w + 1) - 1, c), np.nan, dtype=np.float32)
    for r, t in enumerate(images):
        for k in range(m):
            canvas[r * (h + gap):r * (h + gap) + h, k * (w + 1):k * (w + 1) + w] = t[k].permute(1, 2, 0).numpy()
    fig, ax = _axes(ax, (max(m * 0.9, 3), len(images) * (1.35 if scores else 1.0) + 0.5))
    if c == 1:
        ax.imshow(canvas[..., 0], cmap=_cmap("gray"), vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(np.nan_to_num(canvas, nan=1.0), interpolation="nearest")
    ax.set_yticks([(h + gap) * i + h / 2 for i in range(len(images))], names)
    ax.set_xticks([])
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    if scores and len(images) > 1:
        box = ax.get_position()
        inch = min(box.width * fig.get_figwidth() / canvas.shape[1], box.height * fig.get_figheight() / canvas.shape[0])
        size = float(np.clip(w * inch * 72 / 6.5, 4.5, 9))
        for r, t in enumerate(images[1:], start=1):
            p, s = metrics.psnr(t, images[0]), metrics.ssim(t, images[0])
            for k in range(m):
                ax.text(k * (w + 1) + w / 2, r * (h + gap) + h + gap * 0.1, f"{float(p[k]):.1f} / {float(s[k]):.2f}",
                        ha="center", va="top", fontsize=size)
        ax.set_xlabel(f"under each reconstruction: PSNR (dB) / SSIM against the {names[0]} above", fontsize="small")
    if title:
        ax.set_title(title)
    return fig, ax
