"""NumPy's random generators re-implemented vectorized over many seeds: the first outputs of
``numpy.random.RandomState(seed)`` (MT19937 with the legacy 32-bit seeding) and of
``numpy.random.default_rng(seed)`` (SeedSequence, then PCG64) for a whole array of candidate seeds at
once, and the ring elements ``randint``/``integers`` would draw from them. What a brute-force search
over 32-bit seeds needs (:mod:`attacks.seed_recovery`); exact against NumPy itself (tested).

Written by hand because NumPy seeds one generator per call: a Python loop over 2^16 seeds spends
its time constructing generators (thousands a second: see :mod:`attacks.seed_recovery`), while the state recurrences below run on arrays of 65,536
seeds in a few hundred vector operations. The algorithms are NumPy's (``numpy/random/src/
mt19937``, ``pcg64``, ``_bounded_integers``, ``bit_generator.pyx``): Matsumoto and Nishimura,
"Mersenne Twister: a 623-dimensionally equidistributed uniform pseudo-random number generator"
(1998); O'Neill, "PCG: a family of simple fast space-efficient statistically good algorithms for
random number generation" (2014); Lemire, "Fast random integer generation in an interval" (2019).

Example:
    >>> import numpy as np
    >>> seeds = np.array([0, 7, 2**32 - 1], dtype=np.uint32)
    >>> values, rejected = ring_values("randomstate", seeds, 3, bits=20)  # (3, 3): element, seed
    >>> values[:, 1].tolist() == np.random.RandomState(7).randint(0, 2**20, 3).tolist(), bool(rejected.any())
    (True, False)
"""
from __future__ import annotations

import numpy as np

__all__ = ["PRGS", "mt19937_outputs", "pcg64_outputs", "ring_values", "reference"]

PRGS = ("flower", "randomstate", "default_rng")  # see ring_values
MT_MAX = 227  # outputs of MT19937's first twist that need no second one (624 - 397)
_U32 = np.uint32


def mt19937_outputs(seeds: np.ndarray, k: int) -> np.ndarray:
    """``(k, S)`` uint32: the first ``k <= 227`` 32-bit outputs of ``RandomState(seed)`` per seed
    (an int seed takes MT19937's ``init_genrand``; output ``i`` of the first twist needs state words
    ``i``, ``i + 1`` and ``i + 397``)."""
    if not 1 <= k <= MT_MAX:
        raise ValueError(f"k must be in [1, {MT_MAX}], got {k}")
    cur = np.asarray(seeds, dtype=_U32).copy()
    need = {i: None for i in (*range(k + 1), *range(397, 397 + k))}
    tmp = np.empty_like(cur)
    for i in range(397 + k):
        if i in need:
            need[i] = cur.copy()
        np.right_shift(cur, _U32(30), out=tmp)  # state[i+1] = 1812433253 (s ^ (s >> 30)) + i + 1
        np.bitwise_xor(tmp, cur, out=tmp)
        np.multiply(tmp, _U32(1812433253), out=tmp)
        np.add(tmp, _U32(i + 1), out=tmp)
        cur, tmp = tmp, cur
    out = np.empty((k, len(cur)), dtype=_U32)
    for i in range(k):
        y = (need[i] & _U32(0x80000000)) | (need[i + 1] & _U32(0x7FFFFFFF))
        v = need[i + 397] ^ (y >> _U32(1)) ^ np.where(y & _U32(1), _U32(0x9908B0DF), _U32(0))
        v ^= v >> _U32(11)  # tempering
        v ^= (v << _U32(7)) & _U32(0x9D2C5680)
        v ^= (v << _U32(15)) & _U32(0xEFC60000)
        v ^= v >> _U32(18)
        out[i] = v
    return out


# -- SeedSequence and PCG64 (default_rng) -------------------------------------------------------
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R = 0xCA01F9DD, 0x4973F715
_PCG_MULT = (0x2360ED051FC65DA4, 0x4385DF649FCCF645)  # (high, low) of PCG64's 128-bit multiplier
_M32, _M64 = 0xFFFFFFFF, (1 << 64) - 1


def _hash_consts() -> list[int]:
    """The values of SeedSequence's hash constant as ``hashmix`` multiplies it (data-independent)."""
    out, h = [], _INIT_A
    for _ in range(4 + 12):  # 4 pool words, then 12 mixing steps
        h = (h * _MULT_A) & _M32
        out.append(h)
    return out


def _hashmix(value: np.ndarray, const: int, prev: int) -> np.ndarray:
    value = value ^ _U32(prev)
    value = value * _U32(const)
    return value ^ (value >> _U32(16))


def _seed_sequence_state(seeds: np.ndarray) -> list[np.ndarray]:
    """``SeedSequence(seed).generate_state(4, uint64)`` per seed < 2^32 (entropy one word, pool of
    4), as 8 uint32 words (little-endian halves)."""
    consts, prevs = _hash_consts(), [_INIT_A] + _hash_consts()[:-1]
    s = np.asarray(seeds, dtype=_U32)
    pool = [_hashmix(s, consts[0], prevs[0])]
    pool += [_hashmix(np.zeros_like(s), consts[i], prevs[i]) for i in range(1, 4)]
    step = 4
    for src in range(4):
        for dst in range(4):
            if src != dst:
                h = _hashmix(pool[src], consts[step], prevs[step])
                step += 1
                r = _U32(_MIX_L) * pool[dst] - _U32(_MIX_R) * h
                pool[dst] = r ^ (r >> _U32(16))
    words, h = [], _INIT_B
    for i in range(8):
        v = pool[i % 4] ^ _U32(h)
        h = (h * _MULT_B) & _M32
        v = v * _U32(h)
        words.append(v ^ (v >> _U32(16)))
    return words


def _u64(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return lo.astype(np.uint64) | (hi.astype(np.uint64) << np.uint64(32))


def _mul64(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The full 128-bit product of uint64 arrays as (high, low)."""
    m = np.uint64(_M32)
    a0, a1, b0, b1 = a & m, a >> np.uint64(32), b & m, b >> np.uint64(32)
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    mid = (p00 >> np.uint64(32)) + (p01 & m) + (p10 & m)
    low = (p00 & m) | (mid << np.uint64(32))
    high = p11 + (p01 >> np.uint64(32)) + (p10 >> np.uint64(32)) + (mid >> np.uint64(32))
    return high, low


def _step(hi, lo, inc_hi, inc_lo):
    """PCG64's state update ``state * MULT + inc`` mod 2^128."""
    mh, ml = np.uint64(_PCG_MULT[0]), np.uint64(_PCG_MULT[1])
    ph, pl = _mul64(lo, np.full_like(lo, ml))
    ph = ph + lo * mh + hi * ml
    new_lo = pl + inc_lo
    carry = (new_lo < pl).astype(np.uint64)
    return ph + inc_hi + carry, new_lo


def pcg64_outputs(seeds: np.ndarray, k: int) -> np.ndarray:
    """``(k, S)`` uint64: the first ``k`` 64-bit outputs of ``default_rng(seed)`` per seed < 2^32."""
    w = _seed_sequence_state(seeds)
    v = [_u64(w[2 * i], w[2 * i + 1]) for i in range(4)]  # generate_state(4, uint64)
    init_hi, init_lo, seq_hi, seq_lo = v
    one = np.uint64(1)
    inc_hi = (seq_hi << one) | (seq_lo >> np.uint64(63))
    inc_lo = (seq_lo << one) | one
    hi, lo = _step(np.zeros_like(init_hi), np.zeros_like(init_lo), inc_hi, inc_lo)
    lo2 = lo + init_lo
    hi = hi + init_hi + (lo2 < lo).astype(np.uint64)
    hi, lo = _step(hi, lo2, inc_hi, inc_lo)
    out = np.empty((k, len(hi)), dtype=np.uint64)
    for i in range(k):
        hi, lo = _step(hi, lo, inc_hi, inc_lo)
        x, rot = hi ^ lo, hi >> np.uint64(58)  # XSL-RR output
        out[i] = (x >> rot) | (x << ((np.uint64(64) - rot) & np.uint64(63)))
    return out


# -- ring elements ------------------------------------------------------------------------------
def ring_values(prg: str, seeds: np.ndarray, k: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` ring elements (``(k, S)`` int64 in ``[0, 2^bits)``) each seed's mask would
    start with, and ``(S,)`` bool: seeds whose draws hit a rejection within them (then the values
    are not the mask's: check those seeds with :func:`reference`). ``prg``:

    - ``"flower"``: ``RandomState(seed).randint(0, 2**bits - 1, n)``, Flower's ``pseudo_rand_gen``
      (its ``num_range - 1`` upper bound included: values in ``[0, 2^bits - 2]``, masked rejection);
    - ``"randomstate"``: ``RandomState(seed).randint(0, 2**bits, n)``;
    - ``"default_rng"``: ``default_rng(seed).integers(0, 2**bits, n)`` (Lemire's method, which
      for a power-of-two range takes the top ``bits`` bits and never rejects).
    """
    if prg not in PRGS:
        raise ValueError(f"prg must be one of {PRGS}, got {prg!r}")
    mask = (1 << bits) - 1
    if prg == "default_rng":
        if bits <= 32:  # 32-bit draws: the low half of each 64-bit output first, then the high half
            raw = pcg64_outputs(seeds, (k + 1) // 2)
            halves = np.stack([raw & np.uint64(_M32), raw >> np.uint64(32)], axis=1).reshape(-1, raw.shape[1])[:k]
            vals = halves >> np.uint64(32 - bits)
        else:
            vals = pcg64_outputs(seeds, k) >> np.uint64(64 - bits)
        return vals.astype(np.int64), np.zeros(len(seeds), dtype=bool)
    if bits <= 32:
        vals = mt19937_outputs(seeds, k).astype(np.uint64) & np.uint64(mask)
    else:  # 64-bit draws: the first output is the high word
        if 2 * k > MT_MAX:
            raise ValueError(f"at most {MT_MAX // 2} ring elements of more than 32 bits, got k = {k}")
        raw = mt19937_outputs(seeds, 2 * k).astype(np.uint64)
        vals = ((raw[0::2] << np.uint64(32)) | raw[1::2]) & np.uint64(mask)
    vals = vals.astype(np.int64)
    rng = mask - 1 if prg == "flower" else mask  # the largest value randint accepts
    return vals, (vals > rng).any(axis=0)


def reference(prg: str, seed: int, n: int, bits: int) -> np.ndarray:
    """The weak mask itself, from NumPy: ``n`` int64 ring elements from seed ``seed`` (see
    :func:`ring_values` for the three ``prg``)."""
    if prg == "flower":
        return np.random.RandomState(seed).randint(0, (1 << bits) - 1, n).astype(np.int64)
    if prg == "randomstate":
        return np.random.RandomState(seed).randint(0, 1 << bits, n).astype(np.int64)
    if prg == "default_rng":
        return np.random.default_rng(seed).integers(0, 1 << bits, n).astype(np.int64)
    raise ValueError(f"prg must be one of {PRGS}, got {prg!r}")
