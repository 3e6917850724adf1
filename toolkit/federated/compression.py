"""Update compression for federated learning: top-k sparsification and QSGD quantization.

Clients' updates arrive stacked, a float tensor ``(K, P)`` with one row per client, together
with ``clients`` ``(K,)``, the clients' global indices. A :class:`Compressor` turns them into a
:class:`~toolkit.wire.Packet` whose tensor fields are exactly what crosses the wire (and what
``Wire`` counts, byte for byte); the server calls ``decode()`` on what it received.

- :class:`TopK` keeps the ``k`` largest-magnitude coordinates of each row (positions as 16-bit
  offsets within blocks of 65,536 coordinates, plus a per-block count), with error feedback:
  what was dropped is remembered per client and added to that client's next update.
- :class:`QSGD` sends one norm per row and a stochastically rounded signed level per
  coordinate, packed into 2, 4 or 8 bits. Unbiased: ``E[decode] = update``.

Everything is vectorized over the ``K`` rows: no Python loop over clients or coordinates.

Example:
    >>> from toolkit.wire import Wire
    >>> comp = make_compressor("topk", ratio=0.5)
    >>> updates = torch.tensor([[1.0, -4.0, 2.0, 0.5], [0.0, 3.0, 0.0, -1.0]])  # (K, P)
    >>> packet = comp.compress(updates, torch.tensor([0, 1]))
    >>> packet
    SparsePacket(counts (2, 1) int32, offsets (2, 2) int16, values (2, 2) float32; numel=4, block=65536)
    >>> wire = Wire()
    >>> got = wire.send(packet, sender=("client:0", "client:1"), receiver="server", kind="update")
    >>> comp.decompress(got)
    tensor([[ 0., -4.,  2.,  0.],
            [ 0.,  3.,  0., -1.]])
    >>> wire.total_bytes == packet.nbytes == 2 * (4 + 2 * 2 + 2 * 4)
    True
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from toolkit.federated.packets import (MAX_BLOCK, OFFSET_SHIFT, QuantizedPacket, SparsePacket,
                                      pack_codes, row_norms, qsgd_bits)
from toolkit.wire import Packet

__all__ = ["SparsePacket", "QuantizedPacket", "Compressor", "TopK", "QSGD", "COMPRESSORS",
           "make_compressor", "qsgd_bits"]

def _check_inputs(updates: Any, clients: Any) -> tuple[Tensor, Tensor]:
    """Validate a stacked update ``(K, P)`` and its clients ``(K,)``; returns them (clients as int64)."""
    if not isinstance(updates, Tensor):
        raise TypeError(f"updates must be a torch.Tensor (K, P), got {type(updates).__name__}")
    if updates.dim() != 2:
        raise ValueError(f"updates must be 2-D (K clients, P coordinates), got shape {tuple(updates.shape)}")
    if not updates.is_floating_point():
        raise ValueError(f"updates must be a floating-point tensor, got dtype {updates.dtype}")
    K, P = updates.shape
    if K == 0 or P == 0:
        raise ValueError(f"updates must have at least one row and one column, got shape {tuple(updates.shape)}")
    if not isinstance(clients, Tensor):
        raise TypeError(f"clients must be a torch.Tensor of client indices (K,), got {type(clients).__name__}")
    if clients.dtype == torch.bool or clients.is_floating_point() or clients.is_complex():
        raise ValueError(f"clients must hold integer indices, got dtype {clients.dtype}")
    if clients.shape != (K,):
        raise ValueError(f"clients must hold one index per row of updates, shape ({K},), "
                         f"got shape {tuple(clients.shape)}")
    clients = clients.to(torch.int64)
    if bool((clients < 0).any()):
        raise ValueError(f"client indices must be non-negative, got {int(clients.min())}")
    sums = updates.sum(dim=1)  # (K,) finite only if every entry is (cheaper than isfinite on K x P)
    if not bool(torch.isfinite(sums).all()):
        rows = (~torch.isfinite(sums)).nonzero().flatten()
        bad = (~torch.isfinite(updates[rows])).nonzero()  # (n, 2): (row among rows, column)
        if len(bad):  # else the sums merely overflowed
            row, col = int(rows[bad[0, 0]]), int(bad[0, 1])
            raise ValueError(f"updates must be finite, got {float(updates[row, col])} at row {row} "
                             f"(client {int(clients[row])}), coordinate {col}")
    return updates.detach(), clients


class Compressor(ABC):
    """Compresses stacked client updates into a :class:`~toolkit.wire.Packet`.

    With ``error_feedback``, what compression loses is remembered per client (a dense
    ``(N, P)`` memory, grown when a larger client index appears) and added to that client's
    next update, so nothing is lost for good: over rounds, the decoded updates plus the memory
    sum to the raw updates. ``state_dict``/``load_state_dict`` save and restore that memory.
    """

    name: str = "compressor"

    def __init__(self, *, error_feedback: bool = False):
        if not isinstance(error_feedback, bool):
            raise ValueError(f"error_feedback must be True or False, got {error_feedback!r}")
        self.error_feedback = error_feedback
        self._memory: Tensor | None = None  # (N, P) error-feedback residuals, row = client index

    @abstractmethod
    def compress(self, updates: Tensor, clients: Tensor, *,
                 generator: torch.Generator | None = None) -> Packet:
        """Compress ``updates`` ``(K, P)`` of the clients ``clients`` ``(K,)`` into one packet of K rows."""

    def decompress(self, packet: Packet) -> Tensor:
        """The dense updates ``(K, P)`` the server reconstructs from ``packet`` (``packet.decode()``)."""
        if not hasattr(packet, "decode"):
            raise TypeError(f"{type(self).__name__} cannot decompress a {type(packet).__name__}")
        return packet.decode()

    # -- error-feedback memory -----------------------------------------------------------
    @property
    def residual(self) -> Tensor | None:
        """Error-feedback memory ``(N, P)``, one row per client index (zeros if never seen); None if empty."""
        return self._memory

    def _recall(self, updates: Tensor, clients: Tensor) -> Tensor:
        """``updates + residual[clients]`` (a new tensor), growing the memory as needed."""
        P = updates.shape[1]
        n = int(clients.max()) + 1
        if self._memory is None:
            self._memory = torch.zeros(n, P, dtype=updates.dtype)
        elif self._memory.shape[1] != P:
            raise ValueError(f"error-feedback memory holds updates of {self._memory.shape[1]} coordinates, "
                             f"got P={P}; call reset() before compressing another model's updates")
        elif n > len(self._memory):
            grow = self._memory.new_zeros(n - len(self._memory), P)
            self._memory = torch.cat([self._memory, grow])
        # advanced indexing, not index_select: the latter is many times slower on wide CPU rows
        recalled = self._memory[clients].to(updates.dtype)  # (K, P) a new tensor
        return recalled.add_(updates)

    def _remember(self, clients: Tensor, residual: Tensor) -> None:
        assert self._memory is not None
        self._memory.index_copy_(0, clients, residual.to(self._memory.dtype))

    def _prepare(self, updates: Tensor, clients: Tensor) -> tuple[Tensor, Tensor]:
        updates, clients = _check_inputs(updates, clients)
        if self.error_feedback:
            unique = torch.unique(clients)
            if len(unique) != len(clients):
                seen, counts = torch.unique(clients, return_counts=True)
                raise ValueError(f"with error feedback each client may send one row per call; client "
                                 f"{int(seen[counts > 1][0])} appears {int(counts.max())} times")
            return self._recall(updates, clients), clients
        return updates, clients

    def reset(self) -> None:
        """Forget the error-feedback memory."""
        self._memory = None

    def state_dict(self) -> dict:
        """``{"residual": (N, P) tensor or None}``: a copy of the error-feedback memory."""
        return {"residual": None if self._memory is None else self._memory.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the memory saved by :meth:`state_dict` (the next outputs match exactly)."""
        if not isinstance(state, dict) or set(state) != {"residual"}:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"expected a state dict with the key 'residual', got {got}")
        residual = state["residual"]
        if residual is None:
            self._memory = None
            return
        if not isinstance(residual, Tensor) or residual.dim() != 2 or not residual.is_floating_point():
            what = tuple(residual.shape) if isinstance(residual, Tensor) else type(residual).__name__
            raise ValueError(f"residual must be a 2-D floating-point tensor (N, P), got {what}")
        if not self.error_feedback:
            raise ValueError(f"{self!r} keeps no error-feedback memory, got a residual of shape "
                             f"{tuple(residual.shape)}")
        self._memory = residual.detach().clone()


class TopK(Compressor):
    """Top-k sparsification with error feedback (Stich, Cordonnier, Jaggi, "Sparsified SGD with
    memory", 2018; Karimireddy et al., "Error feedback fixes SignSGD and other gradient
    compression schemes", 2019).

    Each row keeps its ``k = max(1, round(ratio * P))`` largest-magnitude coordinates. With
    error feedback, client ``c`` compresses ``v = update + residual[c]`` and remembers
    ``residual[c] = v - kept``.

    Args:
        ratio: fraction of coordinates kept, ``0 < ratio <= 1``.
        error_feedback: keep and re-send what was dropped (default True).

    Returns (``compress``): a :class:`SparsePacket` of K rows.

    Example:
        >>> tk = TopK(0.5)
        >>> p = tk.compress(torch.tensor([[1.0, -4.0, 2.0, 0.5]]), torch.tensor([0]))
        >>> p.decode()
        tensor([[ 0., -4.,  2.,  0.]])
        >>> tk.residual  # dropped, sent next time with client 0's next update
        tensor([[1.0000, 0.0000, 0.0000, 0.5000]])
    """

    name = "topk"

    def __init__(self, ratio: float, *, error_feedback: bool = True):
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r}")
        super().__init__(error_feedback=error_feedback)
        self.ratio = float(ratio)

    def k_for(self, numel: int) -> int:
        """Entries kept per row for updates of ``numel`` coordinates."""
        return min(numel, max(1, round(self.ratio * numel)))

    def compress(self, updates: Tensor, clients: Tensor, *,
                 generator: torch.Generator | None = None) -> SparsePacket:
        """Keep the ``k`` largest ``|updates + residual|`` per row. ``generator`` is unused (deterministic)."""
        v, clients = self._prepare(updates, clients)                       # (K, P)
        K, P = v.shape
        k, block = self.k_for(P), MAX_BLOCK
        idx = v.abs().topk(k, dim=1, sorted=False).indices.sort(dim=1).values  # (K, k) positions
        values = v.gather(1, idx)                                          # (K, k)
        block_of = idx // block                                            # (K, k)
        counts = torch.zeros(K, -(-P // block), dtype=torch.int32)         # (K, n_blocks)
        counts.scatter_add_(1, block_of, torch.ones(K, k, dtype=torch.int32))
        offsets = (idx - block_of * block - OFFSET_SHIFT).to(torch.int16)  # (K, k)
        if self.error_feedback:
            self._remember(clients, v.scatter_(1, idx, 0.0))  # v is ours (updates + memory): v - kept
        return SparsePacket(counts=counts, offsets=offsets, values=values, numel=P, block=block)

    def __repr__(self) -> str:
        return f"TopK(ratio={self.ratio:g}, error_feedback={self.error_feedback})"


class QSGD(Compressor):
    """Stochastic quantization (Alistarh et al., "QSGD: communication-efficient SGD via gradient
    quantization and encoding", 2017).

    Per row: ``norm = ||v||_2``, ``r = |v| / norm * levels``, and each coordinate is rounded to
    ``level = floor(r)`` or ``floor(r) + 1``, up with probability ``r - floor(r)``, so
    ``norm * sign(v) * level / levels`` is an unbiased estimate of ``v``, within
    ``norm / levels`` of it. A zero row sends a zero norm and decodes to zeros.

    Args:
        levels: quantization levels ``s``, ``1 <= levels <= 127``; codes take 2 bits for 1 level,
            4 bits for 2-7, 8 bits for 8-127.
        error_feedback: remember ``v - decode`` per client and add it next time (default False:
            QSGD is unbiased on its own).

    Returns (``compress``): a :class:`QuantizedPacket` of K rows.

    Example:
        >>> q = QSGD(levels=4)
        >>> p = q.compress(torch.tensor([[0.0, -3.0, 4.0]]), torch.tensor([7]),
        ...                generator=torch.Generator().manual_seed(0))
        >>> p.bits, p.nbytes  # 4 B norm + 3 codes of 4 bits in 2 B
        (4, 6)
        >>> p.decode()  # -3 and 4 round to a neighbouring multiple of norm / levels = 1.25
        tensor([[ 0.0000, -2.5000,  5.0000]])
    """

    name = "qsgd"

    def __init__(self, levels: int = 16, *, error_feedback: bool = False):
        if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= 127:
            raise ValueError(f"levels must be an int in [1, 127], got {levels!r}")
        super().__init__(error_feedback=error_feedback)
        self.levels = levels
        self.bits = qsgd_bits(levels)

    def compress(self, updates: Tensor, clients: Tensor, *,
                 generator: torch.Generator | None = None) -> QuantizedPacket:
        """Quantize each row; the rounding draws ``U[0, 1)`` from ``generator`` (global RNG if None)."""
        v, clients = self._prepare(updates, clients)                       # (K, P)
        K, P = v.shape
        s = self.levels
        norms = row_norms(v)                                              # (K,)
        if not bool(torch.isfinite(norms).all()):
            row = int((~torch.isfinite(norms)).nonzero()[0])
            raise ValueError(f"the norm of row {row} (client {int(clients[row])}) overflows "
                             f"{str(v.dtype).removeprefix('torch.')}: got {float(norms[row])}")
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))        # (K,) zero rows stay zero
        # Few full-size temporaries, updated in place: each new (K, P) tensor costs page faults.
        frac = v.abs().div_(safe[:, None]).mul_(s)                         # (K, P) r in [0, s]
        signed = frac.floor()                                              # (K, P) floor(r)
        frac.sub_(signed)                                                  # (K, P) r - floor(r)
        up = torch.rand(K, P, generator=generator, dtype=v.dtype).lt_(frac)  # (K, P) 1.0 w.p. frac
        signed.add_(up).clamp_(max=s).copysign_(v)                         # (K, P) sign * level
        del up
        if self.error_feedback:  # v is ours (updates + memory): keep v - decode
            self._remember(clients, v.sub_(torch.mul(signed, (norms / s)[:, None], out=frac)))
        return QuantizedPacket(norms=norms, codes=pack_codes(signed.add_(s), self.bits), numel=P,
                               levels=s, bits=self.bits)

    def __repr__(self) -> str:
        return f"QSGD(levels={self.levels}, error_feedback={self.error_feedback})"


COMPRESSORS: dict[str, type[Compressor]] = {"topk": TopK, "qsgd": QSGD}


def make_compressor(name: str, **kwargs: Any) -> Compressor:
    """Build a compressor by name (a key of :data:`COMPRESSORS`), passing ``kwargs`` on.

    Example:
        >>> make_compressor("qsgd", levels=8)
        QSGD(levels=8, error_feedback=False)
    """
    cls = COMPRESSORS.get(name.lower() if isinstance(name, str) else name)
    if cls is None:
        raise ValueError(f"unknown compressor {name!r}; choose one of {', '.join(sorted(COMPRESSORS))}")
    return cls(**kwargs)
