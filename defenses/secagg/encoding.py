"""Fixed-point encoding of float vectors into the ring Z_{2^bits} for secure aggregation
(Bonawitz et al., CCS 2017, section 3: inputs are vectors over Z_R, masks and sums are taken mod R).

A value ``x`` in ``[-bound, bound]`` is encoded as ``round(x * 2^frac) mod 2^bits`` (negative values
in two's complement); decoding maps ``y >= 2^(bits-1)`` back to ``y - 2^bits`` and divides by
``2^frac``. Each encoding is off by at most half a step, ``2^-(frac+1)``, so the decoded sum of ``n``
encodings is within ``n * 2^-(frac+1)`` of the true sum (tested).

Ring size: with ``|round(x 2^frac)| <= bound 2^frac + 1/2`` the sum of ``n`` clients lies in
``[-n(bound 2^frac + 1/2), n(bound 2^frac + 1/2)]``, which the signed range ``[-2^(bits-1), 2^(bits-1))``
holds without wrapping when ``2^bits > 2n(bound 2^frac + 1/2)``. :func:`ring_bits` returns
``ceil(log2(2 n bound 2^frac)) + 1``, giving ``2^bits >= 4 n bound 2^frac``, enough whenever
``bound 2^frac >= 1`` (required). Elements are int64 tensors, so ``bits <= 62`` (a sum of two ring
elements then still fits in int64 before reduction).

Example:
    >>> fp = FixedPoint(n_clients=3, bound=1.0, frac=16)
    >>> fp.bits
    20
    >>> xs = [torch.tensor([0.5, -0.25]), torch.tensor([-1.0, 0.125]), torch.tensor([0.3, 0.3])]
    >>> fp.decode(ring_sum([fp.encode(x) for x in xs], fp.bits))
    tensor([-0.2000,  0.1750], dtype=torch.float64)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MAX_BITS = 62


def check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"ring bits must be an int in [1, {MAX_BITS}] (int64 elements), got {bits!r}")
    return bits


def ring_add(a: torch.Tensor, b: torch.Tensor, bits: int) -> torch.Tensor:
    """``(a + b) mod 2^bits`` for int64 tensors of ring elements in ``[0, 2^bits)``."""
    return torch.remainder(a + b, 1 << check_bits(bits))


def ring_neg(a: torch.Tensor, bits: int) -> torch.Tensor:
    """``-a mod 2^bits``."""
    return torch.remainder(-a, 1 << check_bits(bits))


def ring_sum(tensors, bits: int) -> torch.Tensor:
    """The sum of int64 ring-element tensors mod ``2^bits``, reduced after every addition."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("ring_sum needs at least one tensor")
    total = tensors[0].clone()
    for t in tensors[1:]:
        if t.shape != total.shape:
            raise ValueError(f"ring_sum: shapes differ, {tuple(total.shape)} and {tuple(t.shape)}")
        total = ring_add(total, t, bits)
    return total


def ring_bits(n_clients: int, bound: float, frac: int) -> int:
    """Ring bits so that the sum of ``n_clients`` encodings of values in ``[-bound, bound]`` at scale
    ``2^frac`` cannot wrap: ``ceil(log2(2 n bound 2^frac)) + 1`` (see the module docstring)."""
    if isinstance(n_clients, bool) or not isinstance(n_clients, int) or n_clients < 1:
        raise ValueError(f"n_clients must be a positive int, got {n_clients!r}")
    if isinstance(frac, bool) or not isinstance(frac, int) or frac < 0:
        raise ValueError(f"frac must be a non-negative int, got {frac!r}")
    if not (isinstance(bound, (int, float)) and math.isfinite(bound) and bound > 0):
        raise ValueError(f"bound must be a finite positive number, got {bound!r}")
    if bound * 2.0 ** frac < 1:
        raise ValueError(f"bound * 2^frac = {bound * 2.0 ** frac:g} < 1: every value would encode to "
                         "(almost) zero; raise frac")
    bits = math.ceil(math.log2(2 * n_clients * bound * 2.0 ** frac)) + 1
    if bits > MAX_BITS:
        raise ValueError(f"{n_clients} clients with bound {bound} and frac {frac} need a {bits}-bit ring, "
                         f"more than {MAX_BITS} (int64); lower frac or bound")
    return bits


@dataclass(frozen=True)
class FixedPoint:
    """Encode values in ``[-bound, bound]`` at scale ``2^frac`` into a ring sized for ``n_clients``."""

    n_clients: int
    bound: float
    frac: int

    def __post_init__(self):
        ring_bits(self.n_clients, self.bound, self.frac)  # validates all three

    @property
    def bits(self) -> int:
        return ring_bits(self.n_clients, self.bound, self.frac)

    @property
    def step(self) -> float:
        """One quantization step, ``2^-frac``."""
        return 2.0 ** -self.frac

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Ring elements (int64 in ``[0, 2^bits)``) for a float tensor; refuses NaN, inf and values
        outside ``[-bound, bound]`` (no clipping: a silently clipped update would bias the sum)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"encode expects a floating-point tensor, got "
                             f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        x = x.detach().to(torch.float64)
        bad = ~torch.isfinite(x)
        if bad.any():
            raise ValueError(f"encode: {int(bad.sum())} non-finite value(s) (NaN or inf), first at flat "
                             f"index {int(bad.flatten().nonzero()[0])}")
        out = x.abs() > self.bound
        if out.any():
            i = int(out.flatten().nonzero()[0])
            raise ValueError(f"encode: {int(out.sum())} value(s) outside [-{self.bound}, {self.bound}], "
                             f"first {x.flatten()[i].item():g} at flat index {i}; clip before encoding")
        q = torch.round(x * 2.0 ** self.frac).to(torch.int64)
        return torch.remainder(q, 1 << self.bits)

    def decode(self, y: torch.Tensor) -> torch.Tensor:
        """Float64 values for ring elements (one encoding or the ring sum of up to ``n_clients``)."""
        if not isinstance(y, torch.Tensor) or y.dtype != torch.int64:
            raise ValueError(f"decode expects an int64 tensor of ring elements, got "
                             f"{y.dtype if isinstance(y, torch.Tensor) else type(y).__name__}")
        bits = self.bits
        if ((y < 0) | (y >= (1 << bits))).any():
            raise ValueError(f"decode: values outside the ring [0, 2^{bits})")
        signed = torch.where(y >= (1 << (bits - 1)), y - (1 << bits), y)
        return signed.to(torch.float64) * 2.0 ** -self.frac
