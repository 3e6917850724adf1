"""X25519 key agreement for secure aggregation (Bonawitz et al., "Practical secure aggregation for
privacy-preserving machine learning", CCS 2017, section 4: ``KA.gen``, ``KA.agree``).

Each client draws a key pair (the private key from the OS's cryptographic RNG, through
``cryptography``); the public key travels as 32 raw bytes (or a ``uint8`` tensor of 32 for the
Wire). Two clients ``u`` and ``v`` agree on a shared X25519 secret and derive a 256-bit seed from
it with HKDF-SHA256, whose ``info`` names both client ids in ascending order and a purpose, so
``u, v`` and ``v, u`` derive the same seed, and different pairs or purposes different ones.

Example:
    >>> a, b = KeyPair.generate(), KeyPair.generate()
    >>> s_ab = a.agree(own_id=1, peer_id=2, peer_public=b.public_bytes)
    >>> s_ba = b.agree(own_id=2, peer_id=1, peer_public=a.public_tensor())
    >>> len(s_ab), s_ab == s_ba
    (32, True)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

PUBLIC_KEY_BYTES = 32
SEED_BYTES = 32
CONTEXT = b"leaklab-secagg-v1"


def _client_id(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int client id, got {value!r}")
    return value


def public_key_from(data) -> X25519PublicKey:
    """An X25519 public key from 32 raw bytes or a ``uint8`` tensor of 32 elements."""
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8 or data.numel() != PUBLIC_KEY_BYTES:
            raise ValueError(f"a public key tensor must be uint8 with {PUBLIC_KEY_BYTES} elements, "
                             f"got dtype {data.dtype} with {data.numel()}")
        data = bytes(data.flatten().tolist())
    if not isinstance(data, (bytes, bytearray)) or len(data) != PUBLIC_KEY_BYTES:
        raise ValueError(f"a public key is {PUBLIC_KEY_BYTES} raw bytes, got {type(data).__name__}"
                         + (f" of length {len(data)}" if isinstance(data, (bytes, bytearray)) else ""))
    return X25519PublicKey.from_public_bytes(bytes(data))


def derive_seed(shared_secret: bytes, u: int, v: int, purpose: str = "pairwise") -> bytes:
    """A 256-bit seed from an X25519 shared secret with HKDF-SHA256; ``info`` holds the context, the
    purpose and the two ids in ascending order, so the seed does not depend on who computes it."""
    u, v = _client_id(u, "u"), _client_id(v, "v")
    if u == v:
        raise ValueError(f"a pairwise seed needs two distinct client ids, got {u} twice")
    lo, hi = sorted((u, v))
    info = b"|".join((CONTEXT, purpose.encode(), str(lo).encode(), str(hi).encode()))
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(shared_secret)


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair; :meth:`generate` draws it from the OS's cryptographic RNG."""

    private: X25519PrivateKey

    @classmethod
    def generate(cls) -> "KeyPair":
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, data: bytes) -> "KeyPair":
        """The key pair of 32 raw private-key bytes (as reconstructed from Shamir shares)."""
        if not isinstance(data, (bytes, bytearray)) or len(data) != 32:
            raise ValueError("an X25519 private key is 32 raw bytes")
        return cls(X25519PrivateKey.from_private_bytes(bytes(data)))

    @property
    def private_bytes(self) -> bytes:
        """The private key as 32 raw bytes: only to be Shamir-shared, never sent in the clear."""
        return self.private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    @property
    def public_bytes(self) -> bytes:
        """The public key as 32 raw bytes (RFC 7748 encoding), for transport."""
        return self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def public_tensor(self) -> torch.Tensor:
        """The public key as a ``uint8`` tensor of 32 elements, for the Wire."""
        return torch.tensor(list(self.public_bytes), dtype=torch.uint8)

    def agree(self, own_id: int, peer_id: int, peer_public, purpose: str = "pairwise") -> bytes:
        """The 256-bit seed this client shares with ``peer_id`` (whose public key is ``peer_public``:
        bytes or tensor). ``cryptography`` refuses a low-order peer key (an all-zero shared secret)."""
        shared = self.private.exchange(public_key_from(peer_public))
        return derive_seed(shared, own_id, peer_id, purpose)
