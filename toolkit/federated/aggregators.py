"""Robust aggregation of client updates: Mean (FedAvg), Median, TrimmedMean, Krum, MultiKrum.

Updates arrive stacked, a float tensor ``(K, P)`` with one row per client (``K`` clients, ``P``
parameters), plus optional ``weights`` ``(K,)`` (e.g. sample counts). An :class:`Aggregator` is
called as ``aggregator(updates, weights=None)`` and returns the ``(P,)`` aggregated update, a new
tensor of ``updates.dtype`` (never a view of the input).

- :class:`Mean`: weighted mean (FedAvg). Not robust: one client can move it anywhere.
- :class:`Median`: coordinate-wise median; for even ``K`` the mean of the two middle values.
- :class:`TrimmedMean`: per coordinate, drop the ``f`` largest and ``f`` smallest values.
- :class:`Krum` / :class:`MultiKrum`: keep the update(s) closest to their ``K - f - 2`` nearest
  neighbours (squared Euclidean distance), i.e. inside the densest cluster.

Every input is checked by :func:`check_updates`: a 2-D floating tensor with at least one row and
no NaN/Inf (the error names the offending rows); weights of shape ``(K,)``, non-negative, with a
positive sum. Only Mean uses the weights; the others check them and ignore them.

Everything is vectorized over clients and coordinates: no Python loop over ``K`` or ``P``.
Sums accumulate in float64 without ever holding a float64 copy of all the updates (numpy's
buffered casts for the means; Krum's Gram matrix over float64 column blocks of ~32 MB). Input
tensors are never modified. Coordinate-wise sorts use numpy's vectorized sort, several times
faster on CPU than ``torch.sort`` along dim 0. The numpy parts run on CPU (results come back on the
input's device) and nothing here is meant for autograd.

Example:
    >>> updates = torch.tensor([[1., 2., 3.], [4., 5., 6.], [7., 8., 9.], [-4., -5., -6.]])
    >>> make_aggregator("mean")(updates)  # one sign-flipped client drags the mean
    tensor([2.0000, 2.5000, 3.0000])
    >>> make_aggregator("trimmed_mean", f=1)(updates)
    tensor([2.5000, 3.5000, 4.5000])
"""
from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["Aggregator", "Mean", "Median", "TrimmedMean", "Krum", "MultiKrum", "AGGREGATORS",
           "make_aggregator", "check_updates"]

_BLOCK_ELEMENTS = 1 << 22  # float64 work proceeds over (K, ~4M / K) column blocks (32 MB)
_GRAM_ROW_BLOCKS = 4       # Krum's Gram matrix: row blocks of the lower triangle
_RECENTER_RATIO = 1e6      # see Krum._checked_scores
_MAX_ROWS_SHOWN = 20


# -- validation ------------------------------------------------------------------------------
def check_updates(updates: Any, weights: Any = None) -> tuple[Tensor, Tensor | None]:
    """Validate stacked client updates and optional weights; the checks every Aggregator runs.

    Args:
        updates: ``(K, P)`` floating tensor (or array), one row per client, ``K >= 1``, finite.
        weights: ``(K,)`` non-negative, finite, positive sum (e.g. sample counts), or None.

    Returns:
        ``(updates, weights)``: updates as a tensor (unchanged), weights as float64 on the same
        device (or None).

    Raises:
        ValueError: naming the bad shape, dtype or value; for NaN/Inf, the rows that hold them.

    Example:
        >>> check_updates(torch.tensor([[0.0, 1.0], [float("nan"), 2.0]]))
        Traceback (most recent call last):
        ...
        ValueError: updates contain NaN/Inf in row(s) [1] of K=2; drop or repair those clients before aggregating
    """
    if not isinstance(updates, Tensor):
        updates = torch.as_tensor(updates)
    if updates.dim() != 2:
        raise ValueError(f"updates must be a 2-D (K, P) tensor, one row per client, got shape {tuple(updates.shape)}")
    if not updates.is_floating_point():
        raise ValueError(f"updates must be a floating-point tensor, got dtype {updates.dtype}")
    k = updates.shape[0]
    if k < 1:
        raise ValueError(f"updates must hold at least one row (client), got shape {tuple(updates.shape)}")
    # fast path: a row sum is finite unless the row holds NaN/Inf (or overflows: then check exactly)
    if not bool(torch.isfinite(updates.detach().sum(dim=1)).all()):
        finite = torch.isfinite(updates).all(dim=1)
        rows = (~finite).nonzero().flatten().tolist()
    else:
        rows = []
    if rows:
        shown = str(rows[:_MAX_ROWS_SHOWN])[:-1] + (", ...]" if len(rows) > _MAX_ROWS_SHOWN else "]")
        raise ValueError(f"updates contain NaN/Inf in row(s) {shown} of K={k}; "
                         "drop or repair those clients before aggregating")
    if weights is None:
        return updates, None
    w = torch.as_tensor(weights).detach()
    if w.shape != (k,):
        raise ValueError(f"weights must have shape (K,) = ({k},), one per update, got shape {tuple(w.shape)}")
    w = w.to(device=updates.device, dtype=torch.float64)
    bad = (~torch.isfinite(w)).nonzero().flatten()
    if len(bad):
        raise ValueError(f"weights must be finite, got {w[bad[0]].item()} at index {bad[0].item()}")
    bad = (w < 0).nonzero().flatten()
    if len(bad):
        raise ValueError(f"weights must be non-negative, got {w[bad[0]].item()} at index {bad[0].item()}")
    total = w.sum().item()
    if not total > 0:
        raise ValueError(f"weights must have a positive sum, got {total}")
    return updates, w


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        what = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


# -- vectorized helpers ----------------------------------------------------------------------
def _block_step(k: int) -> int:
    """Columns per block, so that a (K, step) float64 block is ~32 MB."""
    return max(1, _BLOCK_ELEMENTS // max(k, 1))


def _as_numpy(updates: Tensor) -> np.ndarray:
    """The updates as a numpy array without a copy where possible (bfloat16 -> float32, exact)."""
    x = updates.detach()
    if x.dtype not in (torch.float16, torch.float32, torch.float64):
        x = x.float()
    return x.cpu().numpy()


def _weighted_mean(updates: Tensor, weights: Tensor | None) -> Tensor:
    """``sum_i w_i x_i / sum_i w_i`` (uniform when None) accumulated in float64, returned in ``updates.dtype``.

    numpy's buffered einsum / sum cast to float64 chunk by chunk: no float64 copy of the updates.
    """
    x = _as_numpy(updates)
    if weights is None:
        out = x.sum(axis=0, dtype=np.float64) / x.shape[0]
    else:
        w = weights.detach().cpu().numpy()
        out = np.einsum("k,kp->p", w, x, dtype=np.float64, casting="safe") / w.sum()
    return _to_tensor(out, updates)


def _sorted_columns(updates: Tensor) -> np.ndarray:
    """Every column sorted ascending, as a (K, P) numpy array (float16 is sorted as float32)."""
    x = _as_numpy(updates)
    return np.sort(x.astype(np.float32) if x.dtype == np.float16 else x, axis=0)


def _to_tensor(values: np.ndarray, like: Tensor) -> Tensor:
    return torch.from_numpy(np.array(values, copy=True)).to(device=like.device, dtype=like.dtype)


# -- aggregators -----------------------------------------------------------------------------
class Aggregator(ABC):
    """Turns stacked client updates ``(K, P)`` (and optional weights ``(K,)``) into one ``(P,)`` update.

    Call it: ``aggregator(updates, weights=None)``. The input is validated by
    :func:`check_updates` (ValueError on bad shape, dtype, NaN/Inf rows or weights), then
    :meth:`_aggregate` computes the result. Subclasses validate their hyperparameters in
    ``__init__`` and implement ``_aggregate``.
    """

    name = ""

    def __call__(self, updates: Tensor, weights: Tensor | None = None) -> Tensor:
        updates, weights = check_updates(updates, weights)
        return self._aggregate(updates, weights)

    @abstractmethod
    def _aggregate(self, updates: Tensor, weights: Tensor | None) -> Tensor:
        """Aggregate validated ``updates`` (K, P) with float64 ``weights`` (K,) or None into (P,)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Mean(Aggregator):
    """Weighted mean of the updates: FedAvg's aggregation (McMahan et al., "Communication-efficient
    learning of deep networks from decentralized data", 2017).

    Uniform when ``weights`` is None; with sample counts as weights it is FedAvg's
    ``sum_i n_i x_i / sum_i n_i``. Accumulates in float64 and returns ``updates.dtype``.
    Breakdown point 0: a single client can move the result arbitrarily far.

    Args (of the call):
        updates: ``(K, P)`` floating tensor.
        weights: ``(K,)`` non-negative weights with a positive sum, or None.

    Returns:
        ``(P,)`` tensor of ``updates.dtype``.

    Example:
        >>> u = torch.tensor([[1., 2.], [3., 4.]])
        >>> Mean()(u)
        tensor([2., 3.])
        >>> Mean()(u, torch.tensor([3., 1.]))
        tensor([1.5000, 2.5000])
    """

    name = "mean"

    def _aggregate(self, updates: Tensor, weights: Tensor | None) -> Tensor:
        return _weighted_mean(updates, weights)


class Median(Aggregator):
    """Coordinate-wise median (Yin et al., "Byzantine-robust distributed learning: towards optimal
    statistical rates", 2018).

    For odd ``K`` the middle value of each coordinate; for even ``K`` the mean of the two middle
    values (computed in float64), like ``numpy.median`` and unlike ``torch.median``, which returns
    the lower one. Tolerates fewer than ``K / 2`` Byzantine clients per coordinate. Weights are
    checked and ignored.

    Args (of the call):
        updates: ``(K, P)`` floating tensor.
        weights: ignored (checked if given).

    Returns:
        ``(P,)`` tensor of ``updates.dtype``.

    Example:
        >>> Median()(torch.tensor([[1., 0.], [2., 5.], [10., 1.], [4., -7.]]))
        tensor([3.0000, 0.5000])
    """

    name = "median"

    def _aggregate(self, updates: Tensor, weights: Tensor | None) -> Tensor:
        k = updates.shape[0]
        s = _sorted_columns(updates)
        if k % 2:
            return _to_tensor(s[k // 2], updates)
        lower, upper = s[k // 2 - 1].astype(np.float64), s[k // 2].astype(np.float64)
        return _to_tensor(lower / 2 + upper / 2, updates)  # halves first: no overflow near float64's max


class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean (Yin et al., "Byzantine-robust distributed learning: towards
    optimal statistical rates", 2018).

    Per coordinate, drop the ``f`` largest and ``f`` smallest values and average the remaining
    ``K - 2f`` (in float64). Tolerates up to ``f`` Byzantine clients; needs ``K > 2f``.
    ``f = 0`` is the plain mean. Weights are checked and ignored.

    Args:
        f: values trimmed at each end of every coordinate (non-negative int; default 1).

    Returns (of the call):
        ``(P,)`` tensor of ``updates.dtype``.

    Example:
        >>> u = torch.tensor([[1., 2., 3.], [4., 5., 6.], [7., 8., 9.], [-4., -5., -6.]])
        >>> TrimmedMean(f=1)(u)
        tensor([2.5000, 3.5000, 4.5000])
    """

    name = "trimmed_mean"

    def __init__(self, f: int = 1):
        self.f = _check_int("f", f, 0)

    def _aggregate(self, updates: Tensor, weights: Tensor | None) -> Tensor:
        k, f = updates.shape[0], self.f
        if k <= 2 * f:
            raise ValueError(f"TrimmedMean(f={f}) needs more than 2f = {2 * f} updates, got K={k}")
        kept = _sorted_columns(updates)[f:k - f]
        return _to_tensor(kept.sum(axis=0, dtype=np.float64) / (k - 2 * f), updates)

    def __repr__(self) -> str:
        return f"TrimmedMean(f={self.f})"


# Krum and MultiKrum live in krum.py (they need the helpers above, which are all defined by now).
from toolkit.federated.krum import Krum, MultiKrum  # noqa: E402


AGGREGATORS: dict[str, type[Aggregator]] = {
    "mean": Mean, "median": Median, "trimmed_mean": TrimmedMean, "krum": Krum, "multi_krum": MultiKrum,
}


def make_aggregator(name: str, **kwargs: Any) -> Aggregator:
    """Build an aggregator by name: one of ``AGGREGATORS`` (mean, median, trimmed_mean, krum, multi_krum).

    Args:
        name: the aggregator's name.
        **kwargs: its hyperparameters (``f`` for trimmed_mean/krum/multi_krum, ``m`` for multi_krum).

    Returns:
        The Aggregator.

    Raises:
        ValueError: for an unknown name (listing the known ones) or a bad hyperparameter.

    Example:
        >>> make_aggregator("multi_krum", f=2, m=5)
        MultiKrum(f=2, m=5)
    """
    if not isinstance(name, str) or name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; choose one of {sorted(AGGREGATORS)}")
    return AGGREGATORS[name](**kwargs)
