"""Mask expansion for secure aggregation (Bonawitz et al., CCS 2017, section 4: ``PRG(s)``) with the
ChaCha20 stream cipher of ``cryptography``.

A seed of at least 128 bits (a 256-bit seed from :mod:`defenses.secagg.keys`, or a client's own
self-mask seed) is the ChaCha20 key (a seed of 16..31 or over 32 bytes is first stretched to 32
with HKDF-SHA256); the nonce is fixed per ``(round, purpose)`` (a SHA-256 of
both), so one seed never reuses a key stream across rounds or between pairwise and self masks.
Each ring element takes 8 key-stream bytes, read as a little-endian uint64, reduced mod ``2^bits``:
exactly uniform, because ``2^bits`` divides ``2^64``.

Shorter seeds are refused: a 32-bit seed (as Flower's SecAgg+ derives for numpy's generator) is
recovered by brute force over 2^32 candidates, and with it the client's update.

Pairwise sign convention: client ``u`` adds ``+PRG(s_uv)`` for every peer ``v > u`` and ``-PRG(s_uv)``
for ``v < u``; summed over all clients the pairwise masks cancel exactly mod ``2^bits``.

Example:
    >>> seeds = {(0, 1): bytes(range(32)), (0, 2): bytes(range(1, 33)), (1, 2): bytes(range(2, 34))}
    >>> seed = lambda u, v: seeds[(min(u, v), max(u, v))]
    >>> m = [sum_pairwise_masks(u, {v: seed(u, v) for v in range(3) if v != u}, 4, 16) for u in range(3)]
    >>> ring_sum(m, 16)
    tensor([0, 0, 0, 0])
"""
from __future__ import annotations

import hashlib
import struct

import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from defenses.secagg.encoding import check_bits, ring_add, ring_neg, ring_sum

MIN_SEED_BITS = 128
PURPOSES = ("pairwise", "self")
_CHUNK = 1 << 17  # ring elements per ChaCha20 update (1 MiB)

__all__ = ["MIN_SEED_BITS", "PURPOSES", "check_seed", "expand", "pairwise_mask", "sum_pairwise_masks",
           "masked_input", "ring_sum"]


def check_seed(seed) -> bytes:
    """The seed as bytes, refusing anything below 128 bits with the reason."""
    if isinstance(seed, int) and not isinstance(seed, bool):
        raise ValueError(f"mask seeds are bytes (>= {MIN_SEED_BITS // 8}), not an int: an int seed such "
                         "as numpy's 32-bit one is brute-forceable")
    if not isinstance(seed, (bytes, bytearray)):
        raise ValueError(f"a mask seed must be bytes, got {type(seed).__name__}")
    if 8 * len(seed) < MIN_SEED_BITS:
        raise ValueError(f"a {8 * len(seed)}-bit seed is too short: masks need >= {MIN_SEED_BITS} bits, "
                         f"since a 2^{8 * len(seed)} seed space can be searched by brute force, "
                         "recovering the mask and the masked update")
    return bytes(seed)


def _key(seed: bytes) -> bytes:
    if len(seed) == 32:
        return seed
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"leaklab-secagg-v1|chacha20-key").derive(seed)


def _nonce(round: int, purpose: str) -> bytes:
    if isinstance(round, bool) or not isinstance(round, int) or round < 0:
        raise ValueError(f"round must be a non-negative int, got {round!r}")
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    tag = hashlib.sha256(f"leaklab-secagg-v1|mask|{round}|{purpose}".encode()).digest()[:12]
    return struct.pack("<I", 0) + tag  # cryptography's ChaCha20: 4-byte counter, 12-byte nonce


def expand(seed: bytes, n: int, bits: int, round: int = 0, purpose: str = "pairwise") -> torch.Tensor:
    """``n`` uniform elements of Z_{2^bits} (int64) from ChaCha20 keyed by a >= 128-bit ``seed``."""
    seed, bits = check_seed(seed), check_bits(bits)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    enc = Cipher(algorithms.ChaCha20(_key(seed), _nonce(round, purpose)), mode=None).encryptor()
    out = torch.empty(n, dtype=torch.int64)
    view = out.numpy().view("u1")  # the tensor's bytes; little-endian on every platform torch ships
    zeros = bytes(8 * min(n, _CHUNK))
    for start in range(0, 8 * n, len(zeros) or 1):  # 1 MiB of key stream at a time
        stop = min(start + len(zeros), 8 * n)
        view[start:stop] = memoryview(enc.update(zeros[:stop - start]))
    return out.bitwise_and_((1 << bits) - 1)


def pairwise_mask(own_id: int, peer_id: int, seed: bytes, n: int, bits: int, round: int = 0) -> torch.Tensor:
    """``+PRG(seed)`` if ``own_id < peer_id`` else ``-PRG(seed)``, mod ``2^bits``."""
    if own_id == peer_id:
        raise ValueError(f"a pairwise mask needs two distinct client ids, got {own_id} twice")
    m = expand(seed, n, bits, round, "pairwise")
    return m if own_id < peer_id else ring_neg(m, bits)


def sum_pairwise_masks(own_id: int, peer_seeds: dict, n: int, bits: int, round: int = 0) -> torch.Tensor:
    """The sum of a client's signed pairwise masks over ``peer_seeds`` ({peer id: seed})."""
    total = torch.zeros(n, dtype=torch.int64)
    for peer, seed in peer_seeds.items():
        total = ring_add(total, pairwise_mask(own_id, peer, seed, n, bits, round), bits)
    return total


def masked_input(x: torch.Tensor, own_id: int, peer_seeds: dict, self_seed: bytes, bits: int,
                 round: int = 0) -> torch.Tensor:
    """``y_u = x_u + PRG(b_u) + sum_v +-PRG(s_uv) mod 2^bits`` for an encoded input ``x`` (int64 ring
    elements, 1-D): what a client sends in the masked-input round."""
    bits = check_bits(bits)
    if not isinstance(x, torch.Tensor) or x.dtype != torch.int64 or x.dim() != 1:
        raise ValueError("masked_input expects a 1-D int64 tensor of ring elements (FixedPoint.encode)")
    if ((x < 0) | (x >= (1 << bits))).any():
        raise ValueError(f"masked_input: x has values outside the ring [0, 2^{bits})")
    n = x.numel()
    y = ring_add(x, expand(self_seed, n, bits, round, "self"), bits)
    return ring_add(y, sum_pairwise_masks(own_id, peer_seeds, n, bits, round), bits)
