"""Compressed updates as wire packets: top-k (sparse) and QSGD (quantized), with their codecs.

Tensor fields are exactly what crosses the wire (and what ``Wire`` counts, byte for byte);
``decode()`` gives the dense update back, on a stacked packet (K, P) or a single row (P,).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from toolkit.wire import Packet

__all__ = ["SparsePacket", "QuantizedPacket", "qsgd_bits"]

OFFSET_SHIFT = 32768  # offsets travel as int16: position within the block minus 2**15
MAX_BLOCK = 65536


# -- packets ---------------------------------------------------------------------------------
@dataclass(eq=False, repr=False)
class SparsePacket(Packet):
    """Top-k update: kept values and their positions, in 16-bit offsets within blocks of 65,536.

    Coordinates ``0..P-1`` are cut into ``n_blocks = ceil(P / block)`` blocks. For each row,
    ``counts`` says how many kept entries fall in each block and ``offsets`` gives each entry's
    position within its block (minus 32,768, to fit int16), entries sorted by position, so a
    position costs 2 bytes instead of 8 and a block 4 bytes.

    Tensor fields (what travels; a single row ``packet[i]`` drops the ``K`` dimension):
        counts: ``(K, n_blocks)`` int32.
        offsets: ``(K, k)`` int16.
        values: ``(K, k)`` kept values, the update's dtype (float32).

    Metadata (known to both sides, not counted): ``numel`` (P) and ``block``.

    Example:
        >>> p = SparsePacket(counts=torch.tensor([[1, 1]], dtype=torch.int32),
        ...                  offsets=torch.tensor([[2, 0]], dtype=torch.int16) - 32768,
        ...                  values=torch.tensor([[5.0, -1.0]]), numel=7, block=4)
        >>> p.positions()
        tensor([[2, 4]])
        >>> p.decode()
        tensor([[ 0.,  0.,  5.,  0., -1.,  0.,  0.]])
        >>> p[0].decode()
        tensor([ 0.,  0.,  5.,  0., -1.,  0.,  0.])
    """

    counts: Tensor   # (K, n_blocks) int32
    offsets: Tensor  # (K, k) int16
    values: Tensor   # (K, k) float32
    numel: int
    block: int = MAX_BLOCK

    def __post_init__(self) -> None:
        if not 1 <= self.block <= MAX_BLOCK:
            raise ValueError(f"block must be in [1, {MAX_BLOCK}] so offsets fit int16, got {self.block!r}")
        if self.numel < 1:
            raise ValueError(f"numel must be at least 1, got {self.numel!r}")

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.block)

    def positions(self) -> Tensor:
        """Coordinates of the kept entries: ``(K, k)`` int64 (``(k,)`` for a single row), sorted."""
        counts, offsets = self.counts, self.offsets
        single = offsets.dim() == 1
        if single:
            counts, offsets = counts[None], offsets[None]
        K, k = offsets.shape
        if counts.shape != (K, self.n_blocks):
            raise ValueError(f"counts must have shape {(K, self.n_blocks)} for numel={self.numel} and "
                             f"block={self.block}, got {tuple(counts.shape)}")
        ends = counts.to(torch.int64).cumsum(1)  # (K, n_blocks): entries up to the end of each block
        wrong = (ends[:, -1] != k).nonzero().flatten()
        if len(wrong):
            row = int(wrong[0])
            raise ValueError(f"corrupt packet: counts must sum to k={k} in every row, "
                             f"got {int(ends[row, -1])} in row {row}")
        slot = torch.arange(k).expand(K, k).contiguous()                       # (K, k)
        block_of = torch.searchsorted(ends, slot, right=True)                  # (K, k)
        pos = block_of * self.block + offsets.to(torch.int64) + OFFSET_SHIFT  # (K, k)
        return pos[0] if single else pos

    def decode(self) -> Tensor:
        """The dense update: ``(K, P)`` (or ``(P,)`` for a single row), zeros where nothing was kept."""
        pos = self.positions()
        out = torch.zeros(*pos.shape[:-1], self.numel, dtype=self.values.dtype)  # (K, P)
        return out.scatter_(-1, pos, self.values)

    def __repr__(self) -> str:
        return f"{self.describe()[:-1]}; numel={self.numel}, block={self.block})"


@dataclass(eq=False, repr=False)
class QuantizedPacket(Packet):
    """QSGD update: one norm per row and packed signed levels.

    Each coordinate's ``code = sign * level + levels`` lies in ``[0, 2 * levels]`` and takes
    ``bits`` bits; codes are packed ``8 // bits`` to a byte, little end first (coordinate ``j``
    sits at bit ``(j % (8 // bits)) * bits`` of byte ``j // (8 // bits)``), the last byte padded
    with zero bits.

    Tensor fields (a single row ``packet[i]`` drops the ``K`` dimension):
        norms: ``(K,)`` L2 norm of each row, the update's dtype (float32).
        codes: ``(K, ceil(P * bits / 8))`` uint8.

    Metadata: ``numel`` (P), ``levels``, ``bits`` (see :func:`qsgd_bits`).

    Example:
        >>> codes = torch.tensor([[0b01010001, 1]], dtype=torch.uint8)  # (K=1, ceil(5 * 2 / 8))
        >>> p = QuantizedPacket(norms=torch.tensor([3.0]), codes=codes, numel=5, levels=1, bits=2)
        >>> p.decode()  # codes 1, 0, 1, 1, 1 -> levels 0, -1, 0, 0, 0
        tensor([[ 0., -3.,  0.,  0.,  0.]])
    """

    norms: Tensor  # (K,) float32
    codes: Tensor  # (K, ceil(P * bits / 8)) uint8
    numel: int
    levels: int
    bits: int

    def __post_init__(self) -> None:
        if self.numel < 1:
            raise ValueError(f"numel must be at least 1, got {self.numel!r}")
        if not 1 <= self.levels <= 127:
            raise ValueError(f"levels must be in [1, 127], got {self.levels!r}")
        if self.bits != qsgd_bits(self.levels):
            raise ValueError(f"{self.levels} levels take {qsgd_bits(self.levels)} bits per code, "
                             f"got bits={self.bits!r}")

    def unpack(self) -> Tensor:
        """The codes, one uint8 per coordinate: ``(K, P)`` (or ``(P,)``), in ``[0, 2 * levels]``."""
        return unpack_codes(self.codes, self.bits, self.numel)

    def decode(self) -> Tensor:
        """``norm * sign * level / levels`` per coordinate: ``(K, P)`` (or ``(P,)`` for a single row)."""
        signed = self.unpack().to(self.norms.dtype).sub_(self.levels)  # (K, P) sign * level
        return dequantize(signed, self.norms, self.levels)

    def __repr__(self) -> str:
        return f"{self.describe()[:-1]}; numel={self.numel}, levels={self.levels}, bits={self.bits})"


def qsgd_bits(levels: int) -> int:
    """Bits per QSGD code: the smallest of 2, 4, 8 with ``2**bits >= 2 * levels + 1``.

    Example:
        >>> [qsgd_bits(s) for s in (1, 2, 7, 8, 127)]
        [2, 4, 4, 8, 8]
    """
    for bits in (2, 4, 8):
        if 2 ** bits >= 2 * levels + 1:
            return bits
    raise ValueError(f"levels must be at most 127 to fit 8-bit codes, got {levels!r}")


def row_norms(v: Tensor) -> Tensor:
    """L2 norm of each row of ``v`` (K, P), in ``v``'s dtype; rows whose squares may under- or
    overflow in that dtype are recomputed in float64."""
    norms = torch.linalg.vector_norm(v, dim=1)  # (K,) fast, but squares of |x| > 1e19 overflow float32
    risky = ~((norms > 1e-15) & (norms < 1e15))
    if bool(risky.any()):
        rows = risky.nonzero().flatten()
        norms[rows] = torch.linalg.vector_norm(v[rows], dim=1, dtype=torch.float64).to(norms.dtype)
    return norms


def dequantize(signed: Tensor, norms: Tensor, levels: int) -> Tensor:
    """``signed`` (..., P) levels in [-levels, levels] -> values; ``norms`` (...,). In place on ``signed``."""
    return signed.mul_((norms / levels).unsqueeze(-1))


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """``codes`` (K, P), integers in [0, 2**bits) of any dtype -> (K, ceil(P * bits / 8)) uint8,
    little end first."""
    per = 8 // bits
    K, P = codes.shape
    n_bytes = -(-P // per)
    if per == 1:
        return codes.to(torch.uint8)
    padded = torch.zeros(K, n_bytes * per, dtype=torch.uint8)
    padded[:, :P] = codes                 # converts to uint8 while copying
    grouped = padded.view(K, n_bytes, per)
    out = grouped[..., 0].clone()         # (K, n_bytes)
    for j in range(1, per):               # at most 4 slots per byte: a loop over bit fields, not data
        out |= grouped[..., j] << (j * bits)
    return out


def unpack_codes(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_codes`: (..., n_bytes) uint8 -> (..., numel) uint8."""
    per = 8 // bits
    if packed.shape[-1] != -(-numel // per):
        raise ValueError(f"{numel} codes of {bits} bits take {-(-numel // per)} bytes, got {packed.shape[-1]}")
    if per == 1:
        return packed
    mask = (1 << bits) - 1
    fields = [(packed >> (j * bits)) & mask for j in range(per)]  # per x (..., n_bytes)
    return torch.stack(fields, dim=-1).flatten(-2)[..., :numel]


# -- compressors -----------------------------------------------------------------------------
