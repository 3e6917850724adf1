"""Authenticated encryption of the Shamir shares one client sends another through the server
(Bonawitz et al., "Practical secure aggregation for privacy-preserving machine learning", CCS 2017,
section 4: ``AE.enc``, ``AE.dec``), with ChaCha20-Poly1305 (RFC 8439) from ``cryptography``.

The key is the 256-bit seed two clients agree on with their encryption key pairs
(:meth:`~defenses.secagg.keys.KeyPair.agree` with ``purpose="share-encryption"``); the 96-bit
nonce is drawn from the OS's cryptographic RNG (``os.urandom``) for every message, on purpose (no
seeded mode: a repeated nonce under one key would leak the XOR of two plaintexts). The associated
data binds the sender, the recipient and the round, so a ciphertext replayed to another client,
sent back to its author, or carried into another round does not authenticate.

A sealed message is ``nonce (12 bytes) || ciphertext || tag (16 bytes)``.

Example:
    >>> key = bytes(range(32))
    >>> blob = seal(key, b"two shares", sender=1, recipient=4, round=3)
    >>> len(blob) - len(b"two shares")
    28
    >>> open_sealed(key, blob, sender=1, recipient=4, round=3)
    b'two shares'
    >>> open_sealed(key, blob, sender=4, recipient=1, round=3)
    Traceback (most recent call last):
    ...
    ValueError: the share ciphertext from client 4 to client 1 (round 3) does not authenticate: tampered, replayed or sent under another key
"""
from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

AEAD = "ChaCha20-Poly1305"
NONCE_BYTES = 12
TAG_BYTES = 16
OVERHEAD = NONCE_BYTES + TAG_BYTES
CONTEXT = b"leaklab-secagg-v1|share-encryption"

__all__ = ["AEAD", "NONCE_BYTES", "TAG_BYTES", "OVERHEAD", "associated_data", "seal", "open_sealed"]


def _check(key: bytes, sender: int, recipient: int, round: int) -> None:
    if not isinstance(key, (bytes, bytearray)) or len(key) != 32:
        raise ValueError("a ChaCha20-Poly1305 key is 32 bytes (the agreed share-encryption seed)")
    for name, v in (("sender", sender), ("recipient", recipient), ("round", round)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2 ** 32:
            raise ValueError(f"{name} must be an int in [0, 2^32), got {v!r}")


def associated_data(sender: int, recipient: int, round: int) -> bytes:
    """The authenticated (not encrypted) context of a share message: who to whom, which round."""
    return CONTEXT + struct.pack(">III", sender, recipient, round)


def seal(key: bytes, plaintext: bytes, *, sender: int, recipient: int, round: int) -> bytes:
    """Encrypt and authenticate ``plaintext`` from ``sender`` to ``recipient`` in ``round``."""
    _check(key, sender, recipient, round)
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(bytes(key)).encrypt(nonce, bytes(plaintext),
                                                         associated_data(sender, recipient, round))


def open_sealed(key: bytes, blob: bytes, *, sender: int, recipient: int, round: int) -> bytes:
    """The plaintext of a sealed message, or a ValueError naming the sender if it does not
    authenticate (tampered in transit, replayed, or addressed to someone else)."""
    _check(key, sender, recipient, round)
    if not isinstance(blob, (bytes, bytearray)) or len(blob) < OVERHEAD:
        raise ValueError(f"the share ciphertext from client {sender} to client {recipient} is shorter than "
                         f"{OVERHEAD} bytes (nonce and tag)")
    try:
        return ChaCha20Poly1305(bytes(key)).decrypt(bytes(blob[:NONCE_BYTES]), bytes(blob[NONCE_BYTES:]),
                                                    associated_data(sender, recipient, round))
    except InvalidTag:
        raise ValueError(f"the share ciphertext from client {sender} to client {recipient} (round {round}) does "
                         "not authenticate: tampered, replayed or sent under another key") from None
