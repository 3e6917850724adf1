"""Why a 32-bit mask seed is not enough: recover a client's update from its masked vector by brute
force over the seed space.

Secure aggregation (Bonawitz et al., "Practical secure aggregation for privacy-preserving machine
learning", CCS 2017) hides a client's encoded update ``x`` (ring elements mod ``2^bits``) behind
masks ``PRG(seed)``; its security is that of the seed. Flower's SecAgg+ derives its masks with
NumPy (``flwr.common.secure_aggregation.secaggplus_utils.pseudo_rand_gen``): the 256-bit agreed
secret is folded by XOR into 32 bits (:func:`flower_seed`), which seeds
``np.random.RandomState(seed32).randint(0, num_range - 1, shape)``. A server that knows every other
term of a client's masked vector (the threat model below) then searches at most 2^32 seeds.

The search (:class:`SeedRecovery`): for each candidate seed, the first ``probe`` mask elements
are computed for a whole chunk of seeds at once (:mod:`attacks.numpy_prg`: NumPy's generators
vectorized over seeds), subtracted from ``y``, and the candidate is kept only if every residue
decodes into the clip bound: a real update is small, ``|round(x 2^frac)| <= B = floor(bound 2^frac
+ 1/2)``, whereas under a wrong seed each residue is uniform over the ring and falls in the bound
with probability ``p = (2B + 1) / (2^bits - 1)``. ``probe`` is the least number of elements for
which ``seeds * p^probe <= 1/64`` (few survivors); each survivor is checked exactly, with NumPy
itself, over all ``d`` elements; the first that passes is the seed, and ``x = y - PRG(seed)``
exactly. A wrong seed passes with probability ``p^d``: the search refuses to run when
``seeds * p^d > 1e-6`` (a vector too short, or a ring too small against the bound, to tell).

Measured once on the (shared, 2-core) development machine, one core (``torch.set_num_threads(1)``):
0.8 to 3 million seeds a second vectorized (with the machine's load), against 2,500 to 6,000
``RandomState`` and 12,000 to 35,000 ``default_rng`` constructions a second in a Python loop; a planted seed at the end of a 2^16
space is found in under 0.1 s, of a 2^20 space in 0.3 to 1 s, and all of 2^32 would take 0.4 to 1.5
hours on one core (minutes on a small cluster). ``run`` reports the rate it achieved and the same
extrapolations. ChaCha20 masks keyed by >= 128-bit seeds (``defenses.secagg.masks``) leave 2^128
candidates: ~10^25 years at this rate, ~10^13 years at 10^18 seeds a second.

Threat model: an honest-but-curious server that knows every mask term of ``y`` but one, whose seed
is a 32-bit NumPy seed: e.g. the pairwise mask of two clients with the self mask's seed revealed
at unmasking, or a client whose other neighbours collude with the server in SecAgg+. The known
terms are passed in explicitly (``known``); each further unknown seed multiplies the search by 2^32.

Example:
    >>> import numpy as np, torch
    >>> from toolkit.wire import Wire
    >>> x = torch.tensor([3, 2**20 - 5, 17, 0, 40, 2**20 - 1] * 4)  # small values, mod 2^20
    >>> y = (x + torch.from_numpy(weak_mask(12345, 24, 20))) % 2**20
    >>> wire = Wire()
    >>> _ = wire.send(y, sender="client:0", receiver="server", kind="masked-input")
    >>> result = SeedRecovery(bits=20, frac=6, bound=1.0, seeds=2**14).run(wire.observed(by="server"))
    >>> result.extras["seeds"], result.reconstruction[0, :3].tolist()
    ([12345], [0.046875, -0.078125, 0.265625])
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from attacks.base import (Attack, AttackResult, check_generator, describe, non_negative_int, positive, positive_int,
                          select)
from attacks.numpy_prg import MT_MAX, PRGS, reference, ring_values
from toolkit.progress import progress
from toolkit.wire import Transfer

__all__ = ["SeedRecovery", "flower_seed", "weak_mask", "search_seed", "SEED_SPACE"]

SEED_SPACE = 2 ** 32  # a NumPy seed of Flower's derivation: seed32 < 2^32
FALSE_POSITIVE = 1e-6  # the largest expected number of wrong seeds passing the whole vector
_YEAR = 365.25 * 24 * 3600


def flower_seed(secret: bytes) -> int:
    """Flower's derivation of a NumPy seed from an agreed secret: its 4-byte little-endian words
    XORed together, a number below 2^32 whatever the secret's length."""
    if not isinstance(secret, (bytes, bytearray)) or not secret or len(secret) % 4:
        raise ValueError("the secret must be a non-empty bytes whose length is a multiple of 4")
    out = 0
    for i in range(0, len(secret), 4):
        out ^= int.from_bytes(secret[i:i + 4], "little")
    return out


def weak_mask(seed: int, n: int, bits: int, prg: str = "flower") -> np.ndarray:
    """The mask a NumPy-seeded implementation would add: ``n`` int64 elements of Z_{2^bits} from a
    seed < 2^32 (``prg``: ``"flower"``, ``"randomstate"`` or ``"default_rng"``, see
    :func:`attacks.numpy_prg.ring_values`). Never use it to mask anything: it is the attack's target."""
    seed, n = non_negative_int("seed", seed), non_negative_int("n", n)
    if seed >= SEED_SPACE:
        raise ValueError(f"a NumPy seed of this kind is below 2^32, got {seed}")
    return reference(prg, seed, n, _bits(bits))


def _bits(bits: Any) -> int:
    bits = positive_int("bits", bits)
    if not 2 <= bits <= 62:
        raise ValueError(f"bits must be in [2, 62] (int64 ring elements), got {bits}")
    return bits


def search_seed(y: np.ndarray, *, bits: int, limit: int, prg: str, start: int, seeds: int, chunk: int,
                max_chunks: int | None = None, show_progress: bool = False) -> dict[str, Any]:
    """Search seeds ``start .. start + seeds - 1`` for the one whose mask leaves every element of
    ``y`` (int64 ring elements) within ``[-limit, limit]`` (signed); stops at the first. Returns
    ``seed`` (None if none), ``x`` (the signed residues of that seed, int64), ``searched``, ``seconds``
    and ``probe`` (the elements tested per candidate before the exact check)."""
    ring, d = 1 << bits, len(y)
    p = (2 * limit + 1) / (ring - 1)
    cap = MT_MAX if bits <= 32 or prg == "default_rng" else MT_MAX // 2
    probe = min(d, cap, max(1, math.ceil(math.log(64 * seeds) / -math.log(p))))
    head = y[:probe, None]  # (probe, 1)

    def plausible(values: np.ndarray) -> np.ndarray:  # values (probe or d, S): all residues small?
        r = np.remainder(head if len(values) == probe else y[:, None], ring) - values
        r = np.remainder(r, ring)
        return ((r <= limit) | (r >= ring - limit)).all(axis=0)

    found, searched, begin = None, 0, time.perf_counter()
    starts = range(start, start + seeds, chunk)
    if max_chunks is not None:
        starts = starts[:max_chunks]
    for lo in progress(starts, show=show_progress, desc="seeds", total=len(starts)):
        candidates = np.arange(lo, min(lo + chunk, start + seeds), dtype=np.int64)
        values, rejected = ring_values(prg, candidates.astype(np.uint32), probe, bits)
        survivors = candidates[plausible(values) | rejected]
        for s in survivors.tolist():  # the exact check, with NumPy itself, over all d elements
            if plausible(reference(prg, s, d, bits)[:, None])[0]:
                found = s
                break
        searched += len(candidates)
        if found is not None:
            searched = found - start + 1
            break
    seconds = time.perf_counter() - begin
    x = None
    if found is not None:
        x = np.remainder(y - reference(prg, found, d, bits), ring)
        x = np.where(x >= ring // 2, x - ring, x)
    return {"seed": found, "x": x, "searched": searched, "seconds": seconds, "probe": probe}


class SeedRecovery(Attack):
    """Brute-force the 32-bit NumPy seed of a masked vector and recover the update it hides (see the
    module docstring).

    Args:
        bits: the ring's bits (the protocol's ``ring_bits``; y's elements are in ``[0, 2^bits)``).
        frac: the fixed-point fraction bits (decoded ``x = signed(y - mask) * 2^-frac``).
        bound: the clip bound of the encoded values (|x| <= bound: the plausibility test).
        prg: the weak generator (``"flower"``, ``"randomstate"``, ``"default_rng"``).
        seeds: how many candidate seeds to search (from ``start``; at most 2^32).
        start: the first candidate.
        chunk: seeds tested together (memory: a few arrays of ``chunk`` 64-bit words per probe).
        kind: the transcript kind of the masked vectors.
    """

    threat_model: ClassVar[str] = ("honest-but-curious server that knows every mask term of a client's "
                                   "masked vector but one, whose seed is a 32-bit NumPy seed")
    needs: ClassVar[str] = "masked-input"

    def __init__(self, *, bits: int, frac: int, bound: float, prg: str = "flower", seeds: int = 2 ** 16,
                 start: int = 0, chunk: int = 2 ** 16, kind: str = "masked-input"):
        self.bits, self.frac = _bits(bits), non_negative_int("frac", frac)
        self.bound = positive("bound", bound)
        if prg not in PRGS:
            raise ValueError(f"prg must be one of {PRGS}, got {prg!r}")
        self.prg = prg
        self.seeds, self.start = positive_int("seeds", seeds), non_negative_int("start", start)
        if self.start + self.seeds > SEED_SPACE:
            raise ValueError(f"start + seeds = {self.start + self.seeds} passes 2^32, the seed space")
        self.chunk = positive_int("chunk", chunk)
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"kind must be a non-empty str, got {kind!r}")
        self.kind = kind
        self._limit = math.floor(self.bound * 2.0 ** self.frac + 0.5)  # largest |round(x 2^frac)|
        if 2 * self._limit + 1 >= (1 << self.bits) - 1:
            raise ValueError(f"bound {bound} at frac {frac} fills the {bits}-bit ring: every residue is "
                             "plausible, a wrong seed cannot be told from the right one")

    def false_positives(self, d: int) -> float:
        """The expected number of wrong seeds that pass all ``d`` elements: ``seeds * p^d``."""
        p = (2 * self._limit + 1) / ((1 << self.bits) - 1)
        return self.seeds * math.exp(d * math.log(p))

    def run(self, observed: Sequence[Transfer], *, sender: str | None = None,
            known: Tensor | Mapping[str, Tensor] | None = None, show_progress: bool = False,
            generator: torch.Generator | None = None, max_steps: int | None = None) -> AttackResult:
        """Search the seed of every masked vector of ``kind`` in ``observed`` (only ``sender``'s
        when given). ``known``: mask terms the server already knows, subtracted first (a (d,) int64
        tensor of ring elements, or one per sender). ``max_steps`` caps the chunks searched per
        vector. The search is deterministic (``generator`` is accepted and unused).

        Returns an AttackResult: ``reconstruction`` (N, d) float64 decoded updates (NaN rows where
        no seed was found); ``extras``: per vector ``senders``, ``seeds`` (None: not found),
        ``searched``, ``seconds``, and ``seeds_per_second``, ``hours_for_2_32`` and
        ``years_for_2_128`` (the same rate extrapolated), ``probe``, ``false_positives``.
        """
        check_generator(generator)
        steps = None if max_steps is None else positive_int("max_steps", max_steps)
        transfers = select(observed, self.kind, "SeedRecovery")
        if sender is not None:
            transfers = [t for t in transfers if t.sender == sender]
            if not transfers:
                raise ValueError(f"SeedRecovery: no {self.kind!r} transfer from {sender!r}")
        vectors = [self._read(t, known) for t in transfers]  # every input checked before searching
        rows, out = [], {"senders": [], "seeds": [], "searched": [], "seconds": []}
        for t, y in zip(transfers, vectors):
            fp = self.false_positives(len(y))
            if fp > FALSE_POSITIVE:
                raise ValueError(f"SeedRecovery: {describe(t)} has {len(y)} elements; {fp:.3g} wrong seeds of "
                                 f"{self.seeds} would pass the bound test (more than {FALSE_POSITIVE:g}): "
                                 "too short a vector, or too small a ring against the bound, to tell")
            found = search_seed(y, bits=self.bits, limit=self._limit, prg=self.prg, start=self.start,
                                seeds=self.seeds, chunk=self.chunk, max_chunks=steps, show_progress=show_progress)
            x = found["x"]
            rows.append(torch.full((len(y),), float("nan"), dtype=torch.float64) if x is None
                        else torch.from_numpy(x).double() * 2.0 ** -self.frac)
            for key, value in (("senders", t.sender), ("seeds", found["seed"]), ("searched", found["searched"]),
                               ("seconds", found["seconds"])):
                out[key].append(value)
            probe = found["probe"]
        rate = sum(out["searched"]) / max(sum(out["seconds"]), 1e-12)
        out.update(seeds_per_second=rate, hours_for_2_32=SEED_SPACE / rate / 3600,
                   years_for_2_128=2.0 ** 128 / rate / _YEAR, probe=probe,
                   false_positives=max(self.false_positives(len(y)) for y in vectors))
        return AttackResult("seed_recovery", reconstruction=torch.stack(rows), config=self.config(), extras=out)

    def _read(self, t: Transfer, known: Tensor | Mapping[str, Tensor] | None) -> np.ndarray:
        """The transfer's ring elements (1-D int64 in [0, 2^bits)) minus the known terms, checked."""
        y = t.tensor
        if not isinstance(y, Tensor) or y.dtype != torch.int64 or y.dim() != 1 or not len(y):
            what = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"SeedRecovery: {describe(t)} is {what}; it reads 1-D int64 ring elements")
        ring = 1 << self.bits
        if bool(((y < 0) | (y >= ring)).any()):
            raise ValueError(f"SeedRecovery: {describe(t)} has values outside the ring [0, 2^{self.bits}): "
                             "is bits the protocol's ring_bits?")
        extra = known.get(t.sender) if isinstance(known, Mapping) else known
        if extra is not None:
            if not isinstance(extra, Tensor) or extra.dtype != torch.int64 or extra.shape != y.shape:
                raise ValueError(f"SeedRecovery: the known mask terms for {t.sender} must be an int64 tensor of "
                                 f"shape {tuple(y.shape)}")
            y = torch.remainder(y - extra, ring)
        return y.numpy().astype(np.int64)
