"""Shared pieces of the figures: axes creation, image tiling, axis labels, byte units."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

LABELS = {"accuracy": "test accuracy", "dcor": "distance correlation dCor(X, Z)", "ssim": "attack SSIM",
          "psnr": "attack PSNR (dB)", "auc": "attack AUC", "epsilon_rdp": "epsilon (RDP)",
          "epsilon_prv": "epsilon (PRV)", "bytes": "bytes on the wire", "seconds": "seconds"}


def _axes(ax: Axes | None, figsize: tuple[float, float] = (5, 3.5)) -> tuple[Figure, Axes]:
    try:
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as err:  # pragma: no cover - matplotlib is a dependency
        raise ModuleNotFoundError("plots need matplotlib: pip install matplotlib") from err
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def _tensor(x, name: str) -> Tensor:
    try:
        return torch.as_tensor(x).detach().float().cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} must be a tensor or array, got {type(x).__name__}") from err


def byte_unit(largest: float) -> tuple[float, str]:
    """The decimal unit that prints ``largest`` bytes as a short number: (divisor, name)."""
    for scale, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if largest >= scale:
            return scale, name
    return 1.0, "bytes"


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


def _bare(ax: Axes) -> None:
    """No ticks and no frame (an image panel that keeps its x/y labels)."""
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
