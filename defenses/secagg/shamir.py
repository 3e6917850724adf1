"""t-of-n Shamir secret sharing (Shamir, "How to share a secret", CACM 1979) over the prime field
GF(2^127 - 1), as secure aggregation uses it to recover a dropped client's pairwise key and a
survivor's self-mask seed (Bonawitz et al., CCS 2017, section 4: ``SS.share``, ``SS.recon``).

A secret of bytes (a 32-byte seed or private key) is cut into 15-byte chunks (120 bits < 127); each
chunk is the constant term of its own random polynomial of degree ``t - 1``, and share ``i``
(``i = 1..n``) holds every polynomial's value at ``x = i``. The coefficients are drawn with
:func:`secrets.randbelow`, the OS's cryptographic RNG; there is no seeded mode, so tests check
properties that hold for any draw. Any ``t`` shares give the secret by Lagrange interpolation at 0;
``t - 1`` shares are consistent with every secret (each value of the missing share gives another).

Example:
    >>> shares = share(b"a 32-byte self-mask seed .......", t=3, n=5)
    >>> reconstruct([shares[4], shares[0], shares[2]])
    b'a 32-byte self-mask seed .......'
    >>> Share.from_bytes(shares[1].to_bytes()) == shares[1]
    True
"""
from __future__ import annotations

import secrets
import struct
from collections import Counter
from dataclasses import dataclass

PRIME = 2**127 - 1
CHUNK_BYTES = 15
ELEMENT_BYTES = 16
MAX_SHARES = 65535
_HEADER = struct.Struct(">HHH")  # index, threshold, secret length


@dataclass(frozen=True)
class Share:
    """Share ``index`` (the x coordinate, 1..n) of a secret of ``length`` bytes at ``threshold`` t;
    ``values`` holds one field element per 15-byte chunk."""

    index: int
    threshold: int
    length: int
    values: tuple

    def to_bytes(self) -> bytes:
        """6 header bytes, then 16 bytes per chunk (big-endian): what crosses the Wire."""
        return _HEADER.pack(self.index, self.threshold, self.length) + b"".join(
            v.to_bytes(ELEMENT_BYTES, "big") for v in self.values)

    @classmethod
    def from_bytes(cls, data: bytes) -> "Share":
        if not isinstance(data, (bytes, bytearray)) or len(data) < _HEADER.size:
            raise ValueError("a share is at least 6 bytes (index, threshold, length)")
        index, t, length = _HEADER.unpack_from(data)
        chunks = _n_chunks(length)
        if len(data) != _HEADER.size + ELEMENT_BYTES * chunks:
            raise ValueError(f"share {index}: {len(data)} bytes, expected "
                             f"{_HEADER.size + ELEMENT_BYTES * chunks} for a {length}-byte secret")
        values = tuple(int.from_bytes(data[_HEADER.size + ELEMENT_BYTES * k:_HEADER.size + ELEMENT_BYTES * (k + 1)],
                                      "big") for k in range(chunks))
        if any(v >= PRIME for v in values):
            raise ValueError(f"share {index}: a value is not a field element (>= 2^127 - 1)")
        if not 1 <= index or not 1 <= t:
            raise ValueError(f"share {index}: index and threshold must be >= 1 (threshold {t})")
        return cls(index, t, length, values)


def _n_chunks(length: int) -> int:
    return max(1, -(-length // CHUNK_BYTES))


def _check_tn(t, n):
    for name, v in (("t", t), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be an int, got {v!r}")
    if t < 1:
        raise ValueError(f"threshold t = {t} < 1: at least one share must be needed")
    if n > MAX_SHARES:
        raise ValueError(f"n = {n} shares, more than {MAX_SHARES} supported")
    if t > n:
        raise ValueError(f"threshold t = {t} > n = {n}: the secret could never be reconstructed")


def share(secret: bytes, t: int, n: int) -> list[Share]:
    """``n`` shares of ``secret`` (bytes, 1..65535 long), any ``t`` of which reconstruct it."""
    if not isinstance(secret, (bytes, bytearray)) or not 1 <= len(secret) <= 65535:
        raise ValueError("the secret must be 1..65535 bytes")
    _check_tn(t, n)
    chunks = [int.from_bytes(secret[k:k + CHUNK_BYTES], "big") for k in range(0, len(secret), CHUNK_BYTES)]
    polys = [[c] + [secrets.randbelow(PRIME) for _ in range(t - 1)] for c in chunks]
    return [Share(i, t, len(secret), tuple(_evaluate(p, i) for p in polys)) for i in range(1, n + 1)]


def _evaluate(coeffs, x: int) -> int:
    y = 0
    for c in reversed(coeffs):
        y = (y * x + c) % PRIME
    return y


def coefficients(points) -> list[int]:
    """The coefficients (constant first) of the polynomial of degree ``len(points) - 1`` through
    ``points`` ([(x_i, y_i)], distinct x_i) mod 2^127 - 1, by Lagrange interpolation in O(t^2):
    the product ``P(x) = prod_j (x - x_j)`` once, then each basis ``P(x) / (x - x_i)`` by synthetic
    division, scaled by ``y_i`` over its value at ``x_i``."""
    master = [1]  # coefficients of prod_j (x - x_j), constant first
    for xj, _ in points:
        master = [(a - xj * b) % PRIME for a, b in zip([0] + master, master + [0])]
    out = [0] * len(points)
    for xi, yi in points:
        # quotient of master by (x - xi), highest degree first
        q, carry = [0] * len(points), 0
        for k in range(len(points), 0, -1):
            carry = (master[k] + carry * xi) % PRIME
            q[k - 1] = carry
        scale = yi * pow(_evaluate(q, xi), -1, PRIME) % PRIME
        out = [(o + scale * c) % PRIME for o, c in zip(out, q)]
    return out


def interpolate(points, x: int = 0) -> int:
    """The value at ``x`` of the polynomial of degree ``len(points) - 1`` through ``points``
    ([(x_i, y_i)], distinct x_i), by the Lagrange formula mod 2^127 - 1."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if j != i:
                num = num * (x - xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total


def reconstruct(shares, t: int | None = None) -> bytes:
    """The secret from at least ``t`` shares. The first ``t`` (by index) interpolate it; every
    further share must lie on the same polynomials, else a ValueError names it (a share that
    does not verify). Fewer than ``t`` shares, duplicate indices or mixed secrets are refused; pass
    the protocol's ``t`` so that shares claiming a lower threshold are refused too."""
    shares = list(shares)
    if not shares:
        raise ValueError("no shares to reconstruct from")
    if not all(isinstance(s, Share) for s in shares):
        raise ValueError("reconstruct expects Share objects")
    if t is not None and shares[0].threshold != t:
        raise ValueError(f"the shares claim threshold {shares[0].threshold}, the protocol's is {t}")
    t, length = shares[0].threshold, shares[0].length
    if any((s.threshold, s.length, len(s.values)) != (t, length, len(shares[0].values)) for s in shares):
        raise ValueError("shares of different secrets (threshold, length or chunk count differ)")
    dup = sorted(i for i, c in Counter(s.index for s in shares).items() if c > 1)
    if dup:
        raise ValueError(f"duplicate share indices {dup}: each client's share counts once")
    if len(shares) < t:
        raise ValueError(f"{len(shares)} share(s) < threshold t = {t}: the secret cannot be reconstructed")
    shares.sort(key=lambda s: s.index)
    base, extra = shares[:t], shares[t:]
    out = b""
    for k in range(len(base[0].values)):
        points = [(s.index, s.values[k]) for s in base]
        coeffs = coefficients(points) if extra else None  # O(t^2) once, then O(t) per checked share
        for s in extra:
            if _evaluate(coeffs, s.index) != s.values[k]:
                raise ValueError(f"share {s.index} does not lie on the polynomial of shares "
                                 f"{[b.index for b in base]}: tampered or from another secret")
        c = coeffs[0] if extra else interpolate(points, 0)
        size = min(CHUNK_BYTES, length - k * CHUNK_BYTES)
        if c >= 1 << (8 * size):
            raise ValueError(f"shares {[b.index for b in base]} reconstruct a value outside the secret's "
                             "range: at least one is tampered")
        out += c.to_bytes(size, "big")
    return out
