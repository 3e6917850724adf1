"""Audits of a transcript: "no raw data leaves the client" as a check, not a claim."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from toolkit.wire import Transfer


def _rows(t: Tensor, width: int) -> Tensor | None:
    """View a transferred tensor as rows of ``width`` values (per sample), if it can be."""
    if t.dim() == 0 or t.numel() % width:
        return None
    if t.dim() >= 2 and t[0].numel() == width:
        return t.reshape(len(t), width)
    return t.reshape(-1, width) if t.dim() == 1 else None


def find_rows(transfers: Iterable[Transfer], raw: Tensor, *, atol: float = 0.0) -> list[Transfer]:
    """The transfers that carry any sample (row) of ``raw``.

    Args:
        transfers: e.g. ``wire.observed(by="server")``.
        raw: private samples, ``(N, ...)``; each sample is compared flattened.
        atol: 0 for exact equality (after casting to float32); otherwise the largest Euclidean
            distance that still counts as a copy.

    Returns:
        The offending transfers (empty when nothing raw crossed).

    Example:
        >>> from toolkit.wire import Wire
        >>> w = Wire(); x = torch.rand(5, 3)
        >>> _ = w.send(x[:2] * 2, sender="c", receiver="s", kind="activations")
        >>> find_rows(w.observed(), x)
        []
    """
    flat = raw.reshape(len(raw), -1).float()
    width = flat.shape[1]
    exact = {row.numpy().tobytes() for row in flat} if atol == 0 else None
    hits = []
    for tr in transfers:
        rows = _rows(tr.tensor, width)
        if rows is None:
            continue
        rows = rows.float()
        if exact is not None:
            found = any(r.numpy().tobytes() in exact for r in rows)
        else:
            d = torch.cdist(rows.double(), flat.double(), compute_mode="donot_use_mm_for_euclid_dist")
            found = bool((d.min() <= atol).item())
        if found:
            hits.append(tr)
    return hits
