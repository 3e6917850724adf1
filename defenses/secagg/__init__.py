"""Secure aggregation after Bonawitz et al., "Practical secure aggregation for privacy-preserving
machine learning" (CCS 2017): the cryptographic primitives, each usable and tested on its own, and the
protocol built on them.

Primitives:

- :mod:`~defenses.secagg.keys`: X25519 key pairs (``cryptography``), public keys as 32 raw bytes or
  a ``uint8`` tensor, agreement to a 256-bit seed by HKDF-SHA256 bound to both client ids in
  ascending order;
- :mod:`~defenses.secagg.masks`: ChaCha20 expansion of >= 128-bit seeds into uniform masks mod
  ``2^bits`` (shorter seeds refused), the pairwise sign convention, a client's masked input;
- :mod:`~defenses.secagg.shamir`: t-of-n Shamir sharing of byte secrets over GF(2^127 - 1) with
  the OS's cryptographic RNG, reconstruction from any t shares with checks of every further share;
- :mod:`~defenses.secagg.encoding`: fixed-point encoding into Z_{2^bits} with the ring sized so that
  the sum of n clients cannot wrap, and ring arithmetic;
- :mod:`~defenses.secagg.aead`: ChaCha20-Poly1305 sealing of the shares between clients, bound to
  sender, recipient and round.

Protocol:

- :mod:`~defenses.secagg.protocol`: :func:`secure_sum`, the four rounds (advertise keys, share keys,
  masked input, unmask) over the Wire with dropout recovery at every stage, byte counts per stage,
  hash commitments to the masked inputs, and SecAgg+ neighbourhoods (Bell et al., 2020); the two
  sides in :mod:`~defenses.secagg.protocol_client` and :mod:`~defenses.secagg.protocol_server`,
  the message layouts in :mod:`~defenses.secagg.wireformat`;
- the aggregator plugged into the federated engine: :class:`defenses.secure_aggregation.SecureAggregation`.

Example (three clients, nobody drops; the server sees only the ``y``):
    >>> import os, torch
    >>> fp = FixedPoint(n_clients=3, bound=1.0, frac=16)
    >>> keys = [KeyPair.generate() for _ in range(3)]
    >>> self_seeds = [os.urandom(32) for _ in range(3)]
    >>> xs = [torch.tensor([0.5, -0.25]), torch.tensor([-1.0, 0.125]), torch.tensor([0.3, 0.3])]
    >>> ys = [masked_input(fp.encode(xs[u]), u,
    ...                    {v: keys[u].agree(u, v, keys[v].public_bytes) for v in range(3) if v != u},
    ...                    self_seeds[u], fp.bits) for u in range(3)]
    >>> total = ring_sum(ys + [ring_neg(expand(b, 2, fp.bits, purpose="self"), fp.bits) for b in self_seeds],
    ...                  fp.bits)
    >>> fp.decode(total)
    tensor([-0.2000,  0.1750], dtype=torch.float64)
"""
from defenses.secagg.encoding import FixedPoint, ring_add, ring_bits, ring_neg, ring_sum
from defenses.secagg.keys import KeyPair, derive_seed, public_key_from
from defenses.secagg.masks import MIN_SEED_BITS, expand, masked_input, pairwise_mask, sum_pairwise_masks
from defenses.secagg.protocol import STAGES, SecAggResult, default_neighbours, secure_sum
from defenses.secagg.protocol_client import SecAggClient
from defenses.secagg.protocol_server import SecAggServer
from defenses.secagg.shamir import Share, reconstruct, share

__all__ = [
    "FixedPoint", "ring_add", "ring_bits", "ring_neg", "ring_sum",
    "KeyPair", "derive_seed", "public_key_from",
    "MIN_SEED_BITS", "expand", "masked_input", "pairwise_mask", "sum_pairwise_masks",
    "Share", "reconstruct", "share",
    "STAGES", "SecAggResult", "default_neighbours", "secure_sum", "SecAggClient", "SecAggServer",
]
