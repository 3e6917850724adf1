"""Leakage and cost metrics: distance correlation, bytes.

Distance correlation is written in torch (float64, Euclidean distances, double-centred) rather
than taken from ``dcor`` because it must be differentiable (NoPeek trains on it) and fast on
whole test sets; ``dcor`` is its reference in the tests (agreement ~1e-10 relative).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _as_rows(t: Tensor | np.ndarray, name: str) -> Tensor:
    t = torch.as_tensor(t)
    if t.dim() == 0:
        raise ValueError(f"{name} must have a sample dimension, got a scalar")
    return t.reshape(len(t), -1).double()  # (n, d)


def _pair(x, z, min_n: int) -> tuple[Tensor, Tensor]:
    x, z = _as_rows(x, "x"), _as_rows(z, "z")
    if len(x) != len(z):
        raise ValueError(f"x and z must hold the same samples, got {len(x)} and {len(z)} rows")
    if len(x) < min_n:
        raise ValueError(f"distance correlation needs at least {min_n} samples, got {len(x)}")
    return x, z


def _double_centred(x: Tensor) -> Tensor:
    d = torch.cdist(x, x)  # (n, n) Euclidean distances (not squared: that is another statistic)
    return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()


def distance_correlation(x: Tensor | np.ndarray, z: Tensor | np.ndarray) -> Tensor:
    """Sample distance correlation dCor(x, z) in [0, 1] (the V-statistic).

    Székely, Rizzo, Bakirov, "Measuring and testing dependence by correlation of distances"
    (2007); used by NoPeek (Vepakomma et al., 2020) between inputs and cut-layer activations.
    Rows are samples; other dimensions are flattened. Differentiable; returns a float64 scalar.
    The V-statistic is biased upward when the dimension is much larger than the number of
    samples; see :func:`u_distance_correlation_sqr`.

    Example:
        >>> x = torch.randn(100, 3)
        >>> round(float(distance_correlation(x, 2 * x + 1)), 6)
        1.0
    """
    x, z = _pair(x, z, 2)
    a, b = _double_centred(x), _double_centred(z)
    dcov2, vx, vz = (a * b).mean(), (a * a).mean(), (b * b).mean()
    denom = (vx * vz).sqrt()
    if denom == 0:
        return torch.zeros((), dtype=torch.float64)
    return (dcov2 / denom).clamp(min=0).sqrt()


def _u_centred(x: Tensor) -> Tensor:
    n = len(x)
    d = torch.cdist(x, x)
    u = d - d.sum(0, keepdim=True) / (n - 2) - d.sum(1, keepdim=True) / (n - 2) + d.sum() / ((n - 1) * (n - 2))
    return u * (1 - torch.eye(n, dtype=u.dtype))


def u_distance_correlation_sqr(x: Tensor | np.ndarray, z: Tensor | np.ndarray) -> Tensor:
    """Bias-corrected squared distance correlation (Székely & Rizzo, "The distance correlation
    t-test of independence in high dimension", 2013); near 0 for independent data even when the
    dimension exceeds the number of samples. Can be slightly negative. Needs n >= 4."""
    x, z = _pair(x, z, 4)
    n = len(x)
    a, b = _u_centred(x), _u_centred(z)
    scale = n * (n - 3)
    cov, vx, vz = (a * b).sum() / scale, (a * a).sum() / scale, (b * b).sum() / scale
    denom = (vx * vz).sqrt()
    if denom == 0:
        return torch.zeros((), dtype=torch.float64)
    return cov / denom


def format_bytes(n: float) -> str:
    """Human-readable byte count: ``format_bytes(1536) == '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
