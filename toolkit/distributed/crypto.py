"""Authenticated encryption of messages between processes, with per-pair keys from X25519.

Each process draws an X25519 key pair when it joins (from the operating system's CSPRNG: key
material deliberately does not come from a seeded torch.Generator) and publishes its public key
in the store. For every ordered pair (src -> dst) both ends derive the same 256-bit key with
HKDF-SHA256 (RFC 5869) from the X25519 shared secret (RFC 7748), the cipher name, both ranks
and both public keys; a key is used in one direction only. The nonce is the 96-bit sequence
number of the message on that directed pair, so no nonce repeats under a key, and the
associated data is the frame header with the expected sender, receiver, kind and sequence
number: a modified, replayed, reordered or redirected message fails authentication.

Ciphers: AES-256-GCM (NIST SP 800-38D) and ChaCha20-Poly1305 (RFC 8439), from ``cryptography``.
The public keys cross an unauthenticated store, so this protects against eavesdropping and
tampering on the wire, not against an active attacker who controls the store (key substitution);
for that, run the store on a private network or a VPN.
"""
from __future__ import annotations

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from torch import Tensor

from toolkit.distributed.framing import TAG_BYTES

AEADS = {"aes-gcm": AESGCM, "chacha20-poly1305": ChaCha20Poly1305}
MAX_MESSAGE = (1 << 31) - 1 - TAG_BYTES  # one AEAD call per message; cryptography caps its length


def pair_key(shared: bytes, cipher: str, src: int, dst: int, src_public: bytes, dst_public: bytes) -> bytes:
    """The 32-byte key for messages src -> dst (HKDF-SHA256 over the X25519 shared secret)."""
    info = b"leaklab/distributed/v1 " + cipher.encode() + f" {src}->{dst} ".encode() + src_public + dst_public
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"leaklab-distributed", info=info).derive(shared)


def nonce(seq: int) -> bytes:
    """The 96-bit nonce for message ``seq`` on a directed pair (each key encrypts one direction)."""
    if not 0 <= seq < 1 << 96:
        raise ValueError(f"sequence number {seq} out of range for a 96-bit nonce")
    return seq.to_bytes(12, "big")


class KeyExchange:
    """This process's X25519 key pair for one group."""

    def __init__(self, cipher: str):
        if cipher not in AEADS:
            raise ValueError(f"cipher must be one of {sorted(AEADS)}, got {cipher!r}")
        self.cipher = cipher
        self._private = X25519PrivateKey.generate()
        self.public = self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def derive(self, rank: int, peers: dict[int, bytes]) -> PairCiphers:
        """Per-pair AEADs with every peer, from their raw public keys."""
        send, recv = {}, {}
        for peer, public in peers.items():
            if len(public) != 32:
                raise ValueError(f"rank {peer} published a malformed X25519 public key ({len(public)} bytes)")
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(public))
            aead = AEADS[self.cipher]
            send[peer] = aead(pair_key(shared, self.cipher, rank, peer, self.public, public))
            recv[peer] = aead(pair_key(shared, self.cipher, peer, rank, public, self.public))
        return PairCiphers(self.cipher, send, recv)


class PairCiphers:
    """Seals messages to, and opens messages from, each peer (flat uint8 tensors, no copies of the bytes
    beyond the output buffer)."""

    def __init__(self, cipher: str, send: dict, recv: dict):
        self.cipher, self._send, self._recv = cipher, send, recv

    def seal(self, payload: Tensor, *, dst: int, seq: int, aad: bytes) -> Tensor:
        if payload.numel() > MAX_MESSAGE:
            raise ValueError(f"an encrypted message is at most {MAX_MESSAGE:,} bytes, got {payload.numel():,}; "
                             f"split the tensor")
        out = torch.empty(payload.numel() + TAG_BYTES, dtype=torch.uint8)
        self._send[dst].encrypt_into(nonce(seq), payload.numpy(), aad, out.numpy())
        return out

    def open(self, raw: Tensor, *, src: int, seq: int, aad: bytes, kind: str) -> Tensor:
        if raw.numel() < TAG_BYTES:
            raise ValueError(f"message {kind!r} from rank {src} failed authentication: shorter than its tag")
        out = torch.empty(raw.numel() - TAG_BYTES, dtype=torch.uint8)
        try:
            self._recv[src].decrypt_into(nonce(seq), raw.numpy(), aad, out.numpy())
        except InvalidTag:
            raise ValueError(f"message {kind!r} from rank {src} failed authentication (tampered, replayed, "
                             f"reordered or not encrypted with this group's key); rejected") from None
        return out

    def __repr__(self) -> str:
        return f"PairCiphers({self.cipher}, peers={sorted(self._send)})"
