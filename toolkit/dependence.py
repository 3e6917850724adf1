"""Distance correlation (Szekely, Rizzo, Bakirov, "Measuring and testing dependence by correlation of
distances", 2007; the u-centred, bias-corrected form of Szekely & Rizzo, 2014): how much of the raw
inputs the activations that cross a cut still carry, and NoPeek's training term.

Distance correlation is written in torch (float64, Euclidean distances, double- or u-centred)
rather than taken from ``dcor`` because it must be differentiable (NoPeek trains on it) and fast
on whole test sets. Distances take the matrix-product path (``|a|^2 + |b|^2 - 2ab``, as
``torch.cdist`` does, several times faster than pairwise differences) on data centred first, so
an offset such as ``x + 1000`` costs no precision; pairs too close to trust from it (duplicates)
are recomputed from differences, the diagonal set to 0. ``dcor`` is the reference in the tests: agreement
within 1e-10 relative, on plain, shifted (+1000), scaled (x1e3, x1e-3) and discrete (one-hot)
inputs. Without a gradient to compute (evaluation) every statistic takes the blocked one-pass
form of :func:`distance_correlation_chunked` (cache-sized row blocks: faster, and O(n * chunk)
memory instead of O(n^2)); with one, the (n, n) matrices are built in place and differentiated
by hand (:class:`_Distances`), which is what keeps NoPeek's term cheap.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from toolkit import validate


def _as_rows(t: Tensor | np.ndarray, name: str) -> Tensor:
    t = validate.finite(torch.as_tensor(t), name)
    if t.dim() == 0:
        raise ValueError(f"{name} must have a sample dimension, got a scalar")
    t = t.reshape(len(t), -1)  # (n, d); float32 stays float32 until centred (in float64)
    return t if t.dtype in (torch.float32, torch.float64) else t.double()


def _pair(x, z, min_n: int) -> tuple[Tensor, Tensor]:
    x, z = _as_rows(x, "x"), _as_rows(z, "z")
    if len(x) != len(z):
        raise ValueError(f"x and z must hold the same samples, got {len(x)} and {len(z)} rows")
    if len(x) < min_n:
        raise ValueError(f"distance correlation needs at least {min_n} samples, got {len(x)}")
    return x, z


def _needs_grad(x: Tensor, z: Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or z.requires_grad)


CLOSE = 1e-2  # pairs closer than this fraction of sqrt(|a|^2 + |b|^2) (centred) are recomputed


def _pair_distances(x: Tensor, i: Tensor, j: Tensor, chunk: int = 1 << 22) -> Tensor:
    """``|x[i] - x[j]|`` for index vectors ``i``, ``j`` (m,), ``chunk`` values at a time."""
    step = max(1, chunk // x.shape[1])
    parts = [(x[i[k:k + step]] - x[j[k:k + step]]).norm(dim=1) for k in range(0, len(i), step)]
    return torch.cat(parts) if parts else x.new_zeros(0)


def _close(d: Tensor, sq: Tensor, start: int = 0) -> Tensor:
    """Where a distance of rows ``start:`` (c, n) is too small to trust from the matrix product:
    ``d <= CLOSE * sqrt(|a|^2 + |b|^2)``, the pair's own norms (``sq``, (n,), squared), which bound
    the product's rounding error, so a few large rows do not send every small pair to the slow
    path (the diagonal, exactly 0, excluded)."""
    bound = torch.add(sq[start:start + len(d), None], sq[None, :]).sqrt_().mul_(CLOSE)  # (c, n)
    close = d <= bound
    close.diagonal(start).fill_(False)
    return close


@torch.no_grad()
def _centre(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Centred float64 rows (a new tensor; distances unchanged), squared norms (n,), largest norm."""
    x = x.to(torch.float64, copy=True)
    x -= x.mean(0, keepdim=True)
    sq = torch.linalg.vector_norm(x, dim=1).square_()
    return x, sq, sq.max().sqrt()


@torch.no_grad()
def _block_distances(x: Tensor, sq: Tensor, start: int, stop: int, radius: Tensor) -> Tensor:
    """Rows ``start:stop`` of the distance matrix of the centred ``x`` (n, d) with squared norms
    ``sq`` (n,): (c, n), not squared (that is another statistic), built in place.

    The matrix product computes ``|a|^2 + |b|^2 - 2ab`` with an absolute error of ~1e-16
    (|a|^2 + |b|^2): centring removes any offset from the norms; pairs closer than ``CLOSE``
    times ``sqrt(|a|^2 + |b|^2)``, where the error could pass ~1e-12 relative (duplicates, common
    in discrete data, come out as 1.5e-8 instead of 0), are recomputed from differences, and the
    diagonal is set to its exact 0.
    """
    if radius == 0:  # every row equal (a collapsed layer): all distances 0, no pair to recompute
        return x.new_zeros(stop - start, len(x))
    d = torch.addmm(sq[None, :], x[start:stop], x.T, alpha=-2)  # (c, n): |b|^2 - 2ab
    d.add_(sq[start:stop, None]).clamp_min_(0).sqrt_()
    d.diagonal(start).zero_()
    i, j = _close(d, sq, start).nonzero(as_tuple=True)  # close pairs, (m,)
    return d.index_put_((i, j), _pair_distances(x, i + start, j)) if len(i) else d


class _Distances(torch.autograd.Function):
    """(n, n) distances between the rows of ``x`` (n, d), differentiated by hand.

    Backward: ``dL/dx_i = sum_j w_ij (x_i - x_j) / d_ij`` with ``w = g + g^T``, i.e.
    ``(diag(W 1) - W) x`` for ``W = w / d``: one (n, n) x (n, d) product. The close pairs (zeroed
    in ``W``) take their term from differences instead; a zero distance contributes nothing (the
    subgradient 0, as ``norm`` gives). The gradient sums to 0 over samples, so centring's
    backward (subtracting its mean) is the identity and skipped; it is cast to ``x``'s dtype.
    Written by hand because autograd's version keeps and differentiates (n, d) float64 copies
    (NoPeek's term on a batch of 64 cost 2-3x as much); no second derivative."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        xc, sq, radius = _centre(x)
        d = _block_distances(xc, sq, 0, len(xc), radius)
        ctx.save_for_backward(xc, d, sq, radius)
        return d

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor) -> Tensor:
        x, d, sq, radius = ctx.saved_tensors
        if radius == 0:
            return torch.zeros_like(x)
        close = _close(d, sq)
        w = (g + g.T).div_(d).masked_fill_(close, 0.0)  # (n, n) W
        w.diagonal().zero_()  # (0 / 0 there)
        ws = w.sum(1)
        w.neg_().diagonal().add_(ws)  # diag(W 1) - W
        grad = w @ x  # (n, d)
        i, j = close.nonzero(as_tuple=True)  # both orders: each adds its term to row i only
        if len(i):
            diff = x[i] - x[j]  # (m, d)
            dist = diff.norm(dim=1)
            coef = torch.where(dist > 0, (g[i, j] + g[j, i]) / dist, 0.0)
            grad.index_add_(0, i, diff * coef[:, None])
        return grad


def _distances(x: Tensor) -> Tensor:
    """(n, n) Euclidean distances between the rows of ``x`` (n, d), differentiable."""
    if x.requires_grad and torch.is_grad_enabled():
        return _Distances.apply(x)
    xc, sq, radius = _centre(x)
    return _block_distances(xc, sq, 0, len(xc), radius)


def _double_centred(x: Tensor) -> Tensor:
    d = _distances(x)
    row = d.mean(0, keepdim=True)  # (1, n); d is symmetric, so the column means are row.T
    out = d - row if d.requires_grad else d.sub_(row)  # one (n, n) copy at most (d is saved for backward)
    return out.sub_(row.T - row.mean())


def _products(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``sum a*b``, ``sum a*a``, ``sum b*b`` as dot products: no (n, n) temporaries."""
    a, b = a.reshape(-1), b.reshape(-1)
    return a @ b, a @ a, b @ b


def _ratio(cov: Tensor, vx: Tensor, vz: Tensor, *, root: bool) -> Tensor:
    denom = (vx * vz).sqrt()
    if denom <= 0:
        return torch.zeros((), dtype=torch.float64)
    r = cov / denom
    if not root:
        return r
    return (r.clamp(min=0) if r.requires_grad else r.clamp(0, 1)).sqrt()


def distance_correlation(x: Tensor | np.ndarray, z: Tensor | np.ndarray) -> Tensor:
    """Sample distance correlation dCor(x, z) in [0, 1] (the V-statistic).

    Székely, Rizzo, Bakirov, "Measuring and testing dependence by correlation of distances"
    (2007); used by NoPeek (Vepakomma et al., 2020) between inputs and cut-layer activations.
    Rows are samples; other dimensions are flattened. Differentiable; returns a float64 scalar
    within 1e-10 relative of ``dcor.distance_correlation``. With no gradient to compute (no input
    requires one, or grad mode is off) this is :func:`distance_correlation_chunked`. NaN or Inf
    in ``x`` or ``z`` is a ValueError naming the first bad index. The V-statistic is biased
    upward when the dimension is much larger than the number of samples; see
    :func:`u_distance_correlation_sqr`.

    Example:
        >>> x = torch.randn(100, 3)
        >>> round(float(distance_correlation(x, 2 * x + 1)), 6)
        1.0
    """
    x, z = _pair(x, z, 2)
    if not _needs_grad(x, z):  # evaluation: the one-pass blocked sums
        return _ratio(*_centred_products(_chunked_sums(x, z, _chunk(None, len(x))), len(x), unbiased=False),
                      root=True)
    return _ratio(*_products(_double_centred(x), _double_centred(z)), root=True)  # sums: n^2 cancels


def _u_centred(x: Tensor) -> Tensor:
    n = len(x)
    d = _distances(x)
    row = d.sum(0, keepdim=True) / (n - 2)  # (1, n)
    u = d - row if d.requires_grad else d.sub_(row)
    u.sub_(row.T - row.sum() / (n - 1))  # sum / ((n-1)(n-2)) = row.sum / (n-1)
    return u.masked_fill_(torch.eye(n, dtype=torch.bool), 0.0)


def _u_statistics(x, z) -> tuple[Tensor, Tensor, Tensor]:
    x, z = _pair(x, z, 4)
    n = len(x)
    scale = n * (n - 3)
    if not _needs_grad(x, z):  # evaluation: the one-pass blocked sums
        sums = _centred_products(_chunked_sums(x, z, _chunk(None, n)), n, unbiased=True)
    else:
        sums = _products(_u_centred(x), _u_centred(z))
    return tuple(s / scale for s in sums)


def u_distance_covariance_sqr(x: Tensor | np.ndarray, z: Tensor | np.ndarray) -> Tensor:
    """Unbiased (u-centred) squared distance covariance, as ``dcor.u_distance_covariance_sqr``.

    Székely & Rizzo, "Partial distance correlation with methods for dissimilarities" (2014):
    ``sum_{i != j} A_ij B_ij / (n (n - 3))`` with ``A``, ``B`` the u-centred distance matrices.
    Its expectation is 0 for independent ``x`` and ``z``, so it can be slightly negative; the
    test of independence in high dimension uses it. Needs n >= 4; differentiable; float64,
    within 1e-10 relative of ``dcor`` (tested on dependent data, where it is far from 0).

    Example:
        >>> x = torch.randn(50, 3)
        >>> bool(u_distance_covariance_sqr(x, x) > 0)
        True
    """
    return _u_statistics(x, z)[0]


def u_distance_correlation_sqr(x: Tensor | np.ndarray, z: Tensor | np.ndarray) -> Tensor:
    """Bias-corrected squared distance correlation (Székely & Rizzo, "The distance correlation
    t-test of independence in high dimension", 2013); near 0 for independent data even when the
    dimension exceeds the number of samples. Can be slightly negative. Needs n >= 4; within
    1e-10 relative of ``dcor.u_distance_correlation_sqr``."""
    return _ratio(*_u_statistics(x, z), root=False)


# -- chunked statistics, for large n (evaluation) ---------------------------------------------
BLOCK = 1 << 17  # distance values per row block of the chunked statistics (1 MB: stays in cache)
MIN_ROWS = 32    # ... but at least this many rows, for the matrix product's sake


def _chunked_sums(x: Tensor, z: Tensor, chunk: int) -> tuple[Tensor, ...]:
    """One pass over row blocks: ``sum a*b``, ``sum a*a``, ``sum b*b`` and the row sums of the
    distance matrices ``a`` of ``x`` and ``b`` of ``z``; O(n * chunk) memory."""
    n = len(x)
    (x, sx, rx), (z, sz, rz) = _centre(x), _centre(z)  # centred, squared norms (n,), largest norm
    ab, aa, bb = (torch.zeros((), dtype=torch.float64) for _ in range(3))
    row_a, row_b = x.new_empty(n), z.new_empty(n)  # (n,)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        a, b = _block_distances(x, sx, start, stop, rx), _block_distances(z, sz, start, stop, rz)  # (c, n)
        a_, b_ = a.view(-1), b.view(-1)  # dot products: no (c, n) temporaries
        ab += a_ @ b_
        aa += a_ @ a_
        bb += b_ @ b_
        row_a[start:stop], row_b[start:stop] = a.sum(1), b.sum(1)
    return ab, aa, bb, row_a, row_b


def _centred_products(sums: tuple[Tensor, ...], n: int, *, unbiased: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``sum A*B``, ``sum A*A``, ``sum B*B`` of the double- (or u-) centred matrices from raw sums.

    A centred matrix has zero row sums, so ``sum A*B = sum a*B``, which expands into
    ``sum a*b - 2 / k sum_i ra_i rb_i + Sa Sb / m`` with ``k, m = n, n^2`` (double-centred) or
    ``n - 2, (n - 1)(n - 2)`` (u-centred, diagonal excluded, where ``a`` is 0 anyway).
    """
    ab, aa, bb, ra, rb = sums
    k, m = (n - 2, (n - 1) * (n - 2)) if unbiased else (n, n * n)
    sa, sb = ra.sum(), rb.sum()
    return (ab - 2 * (ra @ rb) / k + sa * sb / m, aa - 2 * (ra @ ra) / k + sa * sa / m,
            bb - 2 * (rb @ rb) / k + sb * sb / m)


def _chunk(chunk: int | None, n: int) -> int:
    return min(n, max(MIN_ROWS, BLOCK // n)) if chunk is None else validate.positive_int("chunk", chunk)


@torch.no_grad()
def distance_correlation_chunked(x: Tensor | np.ndarray, z: Tensor | np.ndarray, *,
                                 chunk: int | None = None) -> Tensor:
    """:func:`distance_correlation` for large n, in O(n * chunk) memory instead of O(n^2).

    One pass over blocks of ``chunk`` rows of both distance matrices (default: as many rows as
    fit in 2^17 values, so a block stays in cache, and at least 32) accumulates ``sum a_ij b_ij``,
    ``sum a_ij^2``, ``sum b_ij^2`` and the row sums; double centring is then applied
    algebraically (a centred matrix has zero row sums, so its products follow from those sums).
    Same distances as the (n, n) differentiable form; within 1e-10 relative of it and of
    ``dcor``. Not differentiable (evaluation only); float64 scalar.

    Example:
        >>> x = torch.randn(300, 4, dtype=torch.float64)
        >>> z = x.square() + torch.randn(300, 4, dtype=torch.float64)
        >>> full = distance_correlation(x, z.requires_grad_())  # the (n, n) differentiable form
        >>> bool(torch.isclose(distance_correlation_chunked(x, z, chunk=64), full, rtol=1e-10))
        True
    """
    x, z = _pair(x, z, 2)
    return _ratio(*_centred_products(_chunked_sums(x, z, _chunk(chunk, len(x))), len(x), unbiased=False),
                  root=True)


@torch.no_grad()
def u_distance_correlation_sqr_chunked(x: Tensor | np.ndarray, z: Tensor | np.ndarray, *,
                                       chunk: int | None = None) -> Tensor:
    """:func:`u_distance_correlation_sqr` (bias-corrected) in O(n * chunk) memory, from the same
    one pass as :func:`distance_correlation_chunked` (u-centring is as cheap as double centring
    there). Needs n >= 4; within 1e-10 relative of the exact form on dependent data."""
    x, z = _pair(x, z, 4)
    return _ratio(*_centred_products(_chunked_sums(x, z, _chunk(chunk, len(x))), len(x), unbiased=True),
                  root=False)
