"""Krum and Multi-Krum: keep the update(s) inside the densest cluster of client updates.

Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine learning with adversaries: Byzantine tolerant
gradient descent" (NeurIPS 2017); El Mhamdi, Guerraoui, Rouault, "The hidden vulnerability of
distributed learning in Byzantium" (ICML 2018) for Multi-Krum. Part of the aggregators of
:mod:`toolkit.federated.aggregators` (checks, registry), split out to keep files small.

Example:
    >>> updates = torch.tensor([[1., 1.], [1.1, 0.9], [0.9, 1.1], [1., 1.2], [9., -9.]])
    >>> Krum(f=1)(updates)  # an update of the honest cluster, never the outlier
    tensor([0.9000, 1.1000])
"""
from __future__ import annotations

import torch
from torch import Tensor

from toolkit.federated.aggregators import (_GRAM_ROW_BLOCKS, _RECENTER_RATIO, Aggregator, _block_step, _check_int,
                                           _weighted_mean, check_updates)

__all__ = ["Krum", "MultiKrum"]


class Krum(Aggregator):
    """Krum (Blanchard et al., "Machine learning with adversaries: Byzantine tolerant gradient
    descent", 2017): keep the single update closest to its neighbours.

    ``score_i`` is the sum of squared Euclidean distances from update ``i`` to its ``K - f - 2``
    nearest other updates; Krum returns (a copy of) the row with the lowest score, the lowest
    index among ties. Tolerates ``f`` Byzantine clients; needs ``K >= 2f + 3``. Weights are
    checked and ignored.

    Distances are computed in float64 as ``|a|^2 + |b|^2 - 2 a.b`` on column-mean-centred
    updates, clamped at 0 (exactly 0 on the diagonal). When the centre lies far from the chosen
    update (huge outliers: the cancellation would cost precision), they are recomputed centred
    on that update, which keeps the honest distances accurate to ~1e-10 relative.

    Args:
        f: number of Byzantine clients tolerated (non-negative int; default 1).

    Example:
        >>> u = torch.tensor([[0.], [1.], [2.5], [4.], [20.]])
        >>> krum = Krum(f=1)
        >>> [round(s, 6) for s in krum.scores(u).tolist()]
        [7.25, 3.25, 4.5, 11.25, 562.25]
        >>> krum.select(u)
        tensor([1])
        >>> krum(u)
        tensor([1.])
    """

    name = "krum"

    def __init__(self, f: int = 1):
        self.f = _check_int("f", f, 0)

    def _neighbours(self, k: int) -> int:
        if k < 2 * self.f + 3:
            raise ValueError(f"{type(self).__name__}(f={self.f}) needs at least 2f + 3 = {2 * self.f + 3} "
                             f"updates, got K={k}")
        return k - self.f - 2

    @staticmethod
    def _distances(updates: Tensor, center_row: int | None = None) -> tuple[Tensor, Tensor]:
        """Pairwise squared distances (K, K) in float64, and the squared norms of the centred rows.

        Centred on the column means (``center_row=None``) or on row ``center_row``; distances are
        translation-invariant, centring only keeps the cancellation in ``|a|^2 + |b|^2 - 2 a.b`` small.
        """
        k, p = updates.shape
        step = _block_step(k)
        # lower block triangle only (the Gram matrix is symmetric): ~5/8 of the multiply-adds
        edges = [k * i // _GRAM_ROW_BLOCKS for i in range(_GRAM_ROW_BLOCKS + 1)]
        gram = torch.zeros(k, k, dtype=torch.float64, device=updates.device)
        for lo in range(0, p, step):
            block = updates[:, lo:lo + step].to(torch.float64)  # may be a view of the input: no in-place ops
            block = block - (block.mean(0) if center_row is None else block[center_row])
            for top, bottom in zip(edges[:-1], edges[1:]):
                gram[top:bottom, :bottom].addmm_(block[top:bottom], block[:bottom].T)
        gram = torch.tril(gram) + torch.tril(gram, -1).T
        sq = gram.diagonal().clone()
        dist = (sq[:, None] + sq[None, :] - 2 * gram).clamp_(min=0)
        dist.fill_diagonal_(0)
        return dist, sq

    @staticmethod
    def _scores(dist: Tensor, neighbours: int) -> Tensor:
        dist = dist.clone()
        dist.fill_diagonal_(float("inf"))
        return dist.topk(neighbours, dim=1, largest=False).values.sum(1)

    def scores(self, updates: Tensor) -> Tensor:
        """Krum score of every update: the sum of squared distances to its ``K - f - 2`` nearest others.

        Args:
            updates: ``(K, P)`` floating tensor, ``K >= 2f + 3``.

        Returns:
            ``(K,)`` float64 tensor; lower is more central.
        """
        updates, _ = check_updates(updates)
        return self._checked_scores(updates)

    def _checked_scores(self, updates: Tensor) -> Tensor:
        neighbours = self._neighbours(updates.shape[0])
        dist, sq = self._distances(updates)
        scores = self._scores(dist, neighbours)
        best = int(scores.argmin())
        # the centre (column mean) is far from the best update relative to its neighbour distances:
        # honest distances would carry an absolute error ~1e-16 * sq[best]; recentre on that update
        if sq[best] > _RECENTER_RATIO * scores[best] / neighbours:
            dist, _ = self._distances(updates, center_row=best)
            scores = self._scores(dist, neighbours)
        return scores

    def _m(self, k: int) -> int:
        return 1

    def select(self, updates: Tensor) -> Tensor:
        """Indices of the chosen rows, lowest score first (ties: lowest index first).

        Args:
            updates: ``(K, P)`` floating tensor, ``K >= 2f + 3``.

        Returns:
            LongTensor of shape ``(1,)`` for Krum, ``(m,)`` for MultiKrum.
        """
        updates, _ = check_updates(updates)
        return self._checked_select(updates)

    def _checked_select(self, updates: Tensor) -> Tensor:
        m = self._m(updates.shape[0])
        scores = self._checked_scores(updates)
        return torch.sort(scores, stable=True).indices[:m]

    def _aggregate(self, updates: Tensor, weights: Tensor | None) -> Tensor:
        return updates[int(self._checked_select(updates)[0])].clone()

    def __repr__(self) -> str:
        return f"Krum(f={self.f})"


class MultiKrum(Krum):
    """Multi-Krum (Blanchard et al., "Machine learning with adversaries: Byzantine tolerant
    gradient descent", 2017): average the ``m`` updates with the lowest Krum scores.

    Scores as in :class:`Krum`; the result is the plain (unweighted) mean of the ``m`` selected
    rows, in float64, returned in ``updates.dtype``. ``m = 1`` is Krum; ``m = K`` is the plain
    mean. Needs ``K >= 2f + 3`` and ``m <= K``. Weights are checked and ignored.

    Args:
        f: number of Byzantine clients tolerated (non-negative int; default 1).
        m: rows averaged (positive int), or None for ``K - f``.

    Example:
        >>> u = torch.tensor([[0.], [1.], [2.5], [4.], [20.]])
        >>> MultiKrum(f=1).select(u)  # m = K - f = 4
        tensor([1, 2, 0, 3])
        >>> MultiKrum(f=1)(u)
        tensor([1.8750])
        >>> MultiKrum(f=1, m=2)(u)
        tensor([1.7500])
    """

    name = "multi_krum"

    def __init__(self, f: int = 1, m: int | None = None):
        super().__init__(f)
        self.m = None if m is None else _check_int("m", m, 1)

    def _m(self, k: int) -> int:
        if self.m is None:
            return k - self.f
        if self.m > k:
            raise ValueError(f"MultiKrum m={self.m} exceeds the number of updates K={k}")
        return self.m

    def _aggregate(self, updates: Tensor, weights: Tensor | None) -> Tensor:
        chosen = torch.zeros(updates.shape[0], dtype=torch.float64, device=updates.device)
        chosen[self._checked_select(updates)] = 1.0
        return _weighted_mean(updates, chosen)  # 0 * finite == 0: the plain mean of the chosen rows

    def __repr__(self) -> str:
        return f"MultiKrum(f={self.f}, m={self.m})"
