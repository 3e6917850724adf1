"""The base of the Wire-transform defenses: act on the transfer kinds chosen, pass the others
through untouched, refuse what cannot be transformed (a compressed Packet, integer tensors)
with an error that names it.

A subclass defines ``apply(t)`` on a floating-point tensor, inside the sender's autograd graph.
One that acts entry by entry on top-k compressed updates too sets ``on_sparse_values = True``:
behind :class:`~toolkit.federated.compression.TopK` it then transforms the values that cross.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from toolkit import validate
from toolkit.federated.packets import SparsePacket
from toolkit.wire import Packet


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
        return self.apply(t)

    def apply(self, t: Tensor) -> Tensor:
        raise NotImplementedError  # pragma: no cover  (every transform defines it)
