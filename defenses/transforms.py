"""The base of the Wire-transform defenses: act on the transfer kinds chosen, pass the others
through untouched, refuse what cannot be transformed (a compressed Packet, integer tensors)
with an error that names it.

A subclass defines ``apply(t)`` on a floating-point tensor, inside the sender's autograd graph
(or ``apply_on(t, kind)`` when what it does depends on the kind, as row clipping does). One that
acts entry by entry on top-k compressed updates too sets ``on_sparse_values = True``: behind
:class:`~toolkit.federated.compression.TopK` it then transforms the values that cross.

Rows. A defense that acts per row (clipping, the Gaussian mechanism) reads dim 0 as the rows: a
sample's activations in a split batch ``(B, ...)``, a client's update in a stacked send ``(K, P)``.
What a 1-D tensor is depends on the kind (:func:`row_count`): on the batch-first kinds the split
engine sends, ``"activations"`` and the ``"gradients"`` that come back for them
(:data:`BATCH_KINDS`), dim 0 is always the batch, so ``(B,)`` is B samples of one entry each; on
every other kind (``"update"``, ``"weights"``, ...) a 1-D tensor is one party's vector, one row.

Example:
    >>> clip_rows(torch.tensor([3.0, 4.0]), 1.0, kind="update").tolist()  # one client's update
    [0.6000000238418579, 0.800000011920929]
    >>> clip_rows(torch.tensor([3.0, 0.5]), 1.0, kind="activations").tolist()  # two samples
    [1.0, 0.5]
"""
from __future__ import annotations

from collections.abc import Sequence

import torch  # noqa: F401  (the docstring examples use it)
from torch import Tensor

from toolkit import validate
from toolkit.federated.packets import SparsePacket
from toolkit.wire import Packet


BATCH_KINDS = ("activations", "gradients")  # dim 0 is the batch, even for a 1-D tensor


def row_count(t: Tensor, kind: str) -> int:
    """How many rows ``t`` holds as ``kind`` (see the module docstring); ValueError for a 0-d tensor."""
    if t.dim() == 0:
        raise ValueError(f"a per-row defense needs rows along dim 0, but the {kind} sent are a 0-d tensor")
    return len(t) if t.dim() > 1 or kind in BATCH_KINDS else 1


def clip_rows(t: Tensor, max_norm: float, *, kind: str) -> Tensor:
    """Scale each row of ``t`` (as ``kind``) to L2 norm at most ``max_norm``; rows inside the ball
    are unchanged. Differentiable: the gradient flows through the norm."""
    if t.numel() == 0:
        return t  # no rows (an empty batch): nothing to clip
    norms = t.reshape(row_count(t, kind), -1).norm(dim=1)  # (N,)
    scale = (max_norm / norms.clamp(min=1e-12)).clamp(max=1.0)  # 1 for rows already inside the ball
    return t * scale.view(-1, *([1] * (t.dim() - 1)))


def check_kinds(kinds: str | Sequence[str]) -> tuple[str, ...]:
    """``kinds`` as a tuple of kind names (one name, or a non-empty sequence of them)."""
    out = (kinds,) if isinstance(kinds, str) else tuple(kinds) if isinstance(kinds, (list, tuple)) else None
    if not out or not all(isinstance(k, str) and k for k in out):
        raise ValueError(f"kinds must be a kind name or a non-empty sequence of them (e.g. 'activations'), "
                         f"got {kinds!r}")
    return out


class KindTransform:
    """A Wire transform ``t(tensor, *, kind)`` acting on ``kinds`` only."""

    on_sparse_values = False  # also transform the values of a top-k SparsePacket

    def __init__(self, kinds: str | Sequence[str]):
        self.kinds = check_kinds(kinds)

    def __call__(self, t: Tensor | Packet, *, kind: str) -> Tensor | Packet:
        if kind not in self.kinds:
            return t
        name = type(self).__name__
        if isinstance(t, SparsePacket) and self.on_sparse_values:
            return SparsePacket(counts=t.counts, offsets=t.offsets, values=self(t.values, kind=kind),
                                numel=t.numel, block=t.block)
        if isinstance(t, Packet):
            also = " and on the values of top-k SparsePackets" if self.on_sparse_values else ""
            raise ValueError(f"{name} acts on tensors{also}, but kind {kind!r} crossed as a {type(t).__name__}; "
                             f"apply it before compressing, or drop the compressor")
        t = validate.tensor(t, f"{name}: the {kind} sent")
        if not t.is_floating_point():
            raise ValueError(f"{name} acts on floating-point tensors, but the {kind} sent are {t.dtype}")
        return self.apply_on(t, kind)

    def apply_on(self, t: Tensor, kind: str) -> Tensor:
        """The transformed ``t`` (a floating-point tensor of kind ``kind``): :meth:`apply` unless the
        transform overrides this because its action depends on the kind."""
        return self.apply(t)

    def apply(self, t: Tensor) -> Tensor:
        raise NotImplementedError  # pragma: no cover  (every transform defines it or apply_on)
