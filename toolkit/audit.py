"""Audits of a transcript: "no raw data leaves the client" as a check, not a claim.

:func:`find_rows` looks for every raw sample's values in everything that crossed, whatever the
layout they crossed in, so that a reshape, a transpose or a cast cannot hide a copy.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from toolkit import validate
from toolkit.wire import Packet, Payload, Transfer

__all__ = ["find_rows", "carries"]

_EPS = torch.finfo(torch.float64).eps


def _carriers(payload: Payload) -> list[Tensor]:
    """The tensors a payload puts on the wire: itself, or a Packet's tensor fields and, when the
    packet can be decoded, what the receiver decodes (a compressed update, densely)."""
    if isinstance(payload, Tensor):
        return [payload]
    if not isinstance(payload, Packet):
        raise TypeError(f"a transfer carries a tensor or a Packet, got {type(payload).__name__}")
    out = list(payload.tensors().values())
    decode = getattr(payload, "decode", None)
    if callable(decode):
        try:
            out.append(decode())
        except (ValueError, RuntimeError):  # a corrupt packet: its fields are still audited
            pass
    return out


def _flat_strides(shape: tuple[int, ...]) -> set[int]:
    """The steps between neighbours along each axis of a contiguous tensor of ``shape``."""
    strides, step = set(), 1
    for size in reversed(shape):
        strides.add(step)
        step *= size
    return strides


class _Rows:
    """The raw rows (N, d), prepared once per carrier dtype: the rows as that dtype holds them
    (float64), sorted by their sums (for runs), and their sorted non-zero values (for value sets)."""

    def __init__(self, raw: Tensor, atol: float):
        self.raw = raw.reshape(len(raw), -1)  # (N, d)
        self.width = self.raw.shape[1]
        self.atol = atol
        self._cache: dict[torch.dtype, dict | None] = {}

    def prepared(self, dtype: torch.dtype) -> dict | None:
        if dtype not in self._cache:
            self._cache[dtype] = self._prepare(dtype)
        return self._cache[dtype]

    def _prepare(self, dtype: torch.dtype) -> dict | None:
        rows = self.raw.to(dtype)
        keep = torch.ones(len(rows), dtype=torch.bool)
        if not dtype.is_floating_point:  # an integer carrier holds a row only if it is whole numbers in range
            keep &= (rows.to(self.raw.dtype) == self.raw).all(1)
        rows = rows.to(torch.float64)  # (N, d) the values as the carrier's dtype holds them
        keep &= (rows != rows[:, :1]).any(1)  # a constant row would match any constant block (padding)
        rows = rows[keep]
        if not len(rows):
            return None
        sums = rows.sum(1)  # (N,)
        order = sums.argsort()
        # |sum(window) - sum(row)| <= sqrt(d) |window - row| (Cauchy-Schwarz), plus rounding of both sums
        slack = 4 * self.width * _EPS * float(rows.abs().sum(1).max())
        sets: dict[int, set[bytes]] = {}
        nonzero = rows != 0
        for row, mask in zip(rows, nonzero):
            if int(mask.sum()) >= 2:
                sets.setdefault(int(mask.sum()), set()).add(row[mask].sort().values.numpy().tobytes())
        return {"rows": rows[order], "sums": sums[order], "tol": slack + self.atol * self.width ** 0.5,
                "sets": sets, "counts": torch.tensor(sorted(sets), dtype=torch.int64)}

    # -- runs: the row's values in order, at a fixed step -----------------------------------
    def run_at_some_step(self, v: Tensor, shape: tuple[int, ...], prep: dict) -> bool:
        """``v`` (L,) float64: the carrier flattened, of ``shape``."""
        d, L = self.width, len(v)
        bad = ~torch.isfinite(v)
        if bool(bad.any()):  # NaN or Inf equals no raw value (raw is finite): zero them, and no window
            v = v.masked_fill(bad, 0.0)  # that holds one may match
        for step in sorted(_flat_strides(shape)):
            if step * (d - 1) >= L:
                continue
            cols = -(-L // step)
            lanes = v.new_zeros(cols * step)
            lanes[:L] = v
            lanes = lanes.reshape(cols, step).T.contiguous()  # (step, cols): lane r holds v[r], v[r + step], ...
            invalid = None
            if bool(bad.any()) or cols * step > L:
                holes = torch.ones(cols * step, dtype=torch.bool)
                holes[:L] = bad  # a padded or non-finite place
                invalid = holes.reshape(cols, step).T.contiguous()
            if self._some_window_is_a_row(lanes, invalid, prep):
                return True
        return False

    def _some_window_is_a_row(self, lanes: Tensor, invalid: Tensor | None, prep: dict) -> bool:
        """Whether a run of ``d`` neighbours in some lane (rows of ``lanes``) is a raw row. Windows
        whose sum (from prefix sums, to within their rounding) is about a row's sum are compared
        value by value; a coarse table of the row sums screens the windows first."""
        d, (n_lanes, cols) = self.width, lanes.shape
        zero = lanes.new_zeros(n_lanes, 1)
        prefix = torch.cat([zero, lanes.cumsum(1)], 1)  # (lanes, cols + 1)
        sums = prefix[:, d:] - prefix[:, :-d]           # (lanes, W) window sums
        if invalid is not None:
            holes = torch.cat([zero, invalid.double().cumsum(1)], 1)
            sums.masked_fill_((holes[:, d:] - holes[:, :-d]) > 0, float("inf"))
        # prefix sums round by up to ~cols * eps * (sum of |values| in the lane)
        tol = prep["tol"] + 4 * cols * _EPS * float(lanes.abs().sum(1).max())
        ref = prep["sums"]
        low, high = float(ref[0]) - tol, float(ref[-1]) + tol
        bucket = (high - low) / (64 * len(ref)) if high > low else 1.0
        if bucket > 2 * tol:  # screen: windows in a bucket at most tol from a row sum
            table = torch.zeros(64 * len(ref) + 2, dtype=torch.bool)
            table[((ref - tol - low) / bucket).long().clamp_(0, len(table) - 1)] = True
            table[((ref + tol - low) / bucket).long().clamp_(0, len(table) - 1)] = True
            inside = (sums >= low) & (sums <= high)
            slot = ((sums - low) / bucket).nan_to_num_(0.0).clamp_(0, len(table) - 1).long()
            screened = (inside & table[slot]).nonzero()
        else:
            screened = ((sums >= low) & (sums <= high)).nonzero()
        for r, q in screened.tolist():  # candidates: almost always none
            s = float(sums[r, q])
            lo = int(torch.searchsorted(ref, torch.tensor(s - tol, dtype=ref.dtype)))
            hi = int(torch.searchsorted(ref, torch.tensor(s + tol, dtype=ref.dtype), right=True))
            if lo == hi:
                continue
            rows, window = prep["rows"][lo:hi], lanes[r, q:q + d]  # raw rows with about that sum
            if self.atol == 0:
                if bool((rows == window).all(1).any()):
                    return True
            elif bool(((rows - window).norm(dim=1) <= self.atol).any()):
                return True
        return False

    # -- value sets: one slice along an axis holds exactly a row's non-zero values --------------
    def fills_a_slice(self, v: Tensor, prep: dict) -> bool:
        """``v`` float64 in the carrier's shape."""
        if not prep["sets"]:
            return False
        slices = [v.reshape(1, -1)] + [v.movedim(i, 0).reshape(n, -1) for i, n in enumerate(v.shape) if n > 1]
        for s in slices:  # (m, w): m slices of w values
            if s.shape[1] < self.width:
                continue
            nnz = (s != 0).sum(1)
            for k in torch.isin(nnz, prep["counts"]).nonzero().flatten().tolist():
                values = s[k][s[k] != 0].sort().values
                if values.numpy().tobytes() in prep["sets"][len(values)]:
                    return True
        return False


def carries(tensor: Payload, raw: Tensor, *, atol: float = 0.0) -> bool:
    """Whether ``tensor`` (a tensor or a Packet) holds any row of ``raw``; see :func:`find_rows`."""
    return bool(find_rows([Transfer(0, "?", "?", "?", tensor)], raw, atol=atol))


def find_rows(transfers: Iterable[Transfer], raw: Tensor, *, atol: float = 0.0) -> list[Transfer]:
    """The transfers that carry any sample (row) of ``raw``, in whatever layout it crossed.

    Each transfer's tensor is searched (for a :class:`~toolkit.wire.Packet`, each tensor field and,
    when the packet has ``decode()``, the decoded tensor), with the raw rows cast to its dtype
    first (a float16 or float64 copy of float32 data is found; an integer tensor is searched only
    for rows of whole numbers), in two exact ways:

    - **runs**: the row's ``d`` values in their order, at a fixed step through the flattened
      tensor, for every step between neighbours along one of its axes: a reshape, a batch stacked
      or concatenated with other rows or features, zero padding before or after a row (step 1),
      a transpose that moves the sample axis (``x.T``, ``x.permute(1, 2, 3, 0)``: step N) or a
      ``stack(..., dim=-1)`` (step 2). A window whose sum is a row's sum is compared value by
      value, so a step costs about ``d`` additions per value of the tensor.
    - **value sets**: a slice along one axis (or the whole tensor) whose non-zero values are
      exactly a row's non-zero values (sorted): any permutation of the sample's own axes (an
      image transposed, channels moved) and zero padding anywhere (``F.pad`` on the image).

    Limits: values must be equal (or, for runs only, within ``atol``); noise, scaling and lossy
    compression are what attacks and distance correlation measure, not this audit. Rows whose
    values are all equal are not searched (they match any constant block, such as padding), nor,
    for value sets, rows with fewer than two non-zero values. A sample split across transfers, or
    shuffled together with other values within one slice, is not found.

    Args:
        transfers: e.g. ``wire.observed(by="server")``.
        raw: private samples, ``(N, ...)``, finite; each sample is compared flattened.
        atol: 0 for exact equality; otherwise the largest Euclidean distance between a run and a
            row that still counts as a copy.

    Returns:
        The offending transfers (empty when nothing raw crossed).

    Example:
        >>> from toolkit.wire import Wire
        >>> w = Wire(); x = torch.rand(5, 3)
        >>> _ = w.send(x[:2] * 2, sender="c", receiver="s", kind="activations")
        >>> find_rows(w.observed(), x)
        []
        >>> _ = w.send(x[1:3].T.half(), sender="c", receiver="s", kind="activations")
        >>> find_rows(w.observed(), x)
        [Transfer(step=0, c -> s, activations (3, 2) float16, 12 B)]
    """
    raw = validate.finite(validate.tensor(raw, "raw", min_dim=1), "raw")
    atol = validate.non_negative("atol", atol)
    rows = _Rows(raw, atol)
    verdicts: dict[int, tuple[Payload, bool]] = {}  # id(payload) -> verdict: a broadcast is searched once
    hits = []
    for tr in transfers:
        key = id(tr.tensor)
        if key not in verdicts:
            verdicts[key] = (tr.tensor, _carries(tr.tensor, rows))  # keeps the payload alive: ids stay unique
        if verdicts[key][1]:
            hits.append(tr)
    return hits


def _carries(payload: Payload, rows: _Rows) -> bool:
    for t in _carriers(payload):
        if t.is_complex() or t.dtype == torch.bool or t.numel() < rows.width:
            continue
        prep = rows.prepared(t.dtype)
        if prep is None:
            continue
        v = t.detach().to(torch.float64)
        if rows.run_at_some_step(v.reshape(-1), tuple(t.shape), prep):
            return True
        if rows.atol == 0 and rows.fills_a_slice(v, prep):
            return True
    return False
