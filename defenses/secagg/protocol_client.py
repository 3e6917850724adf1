"""A client's side of secure aggregation (Bonawitz et al., "Practical secure aggregation for
privacy-preserving machine learning", CCS 2017, figure 4, semi-honest setting; the rounds are
described in :mod:`defenses.secagg.protocol`).

A :class:`SecAggClient` holds one client's encoded input and secrets and turns what the server
delivered into its next message; it never sees another client's input or secret, only public
keys, the ciphertexts addressed to it and the server's survivor list. It refuses, with a
ValueError naming itself and the reason, whatever would break the protocol's guarantees: a key list
without its own keys, fewer than t clients in a round, a ciphertext that does not authenticate,
and above all a request for both shares of one peer (the share of its self-mask seed b *and* of its
masking key s_SK would let the server unmask that peer's input).

Randomness: both X25519 key pairs, the self-mask seed b (``os.urandom(32)``), the Shamir
coefficients and the AEAD nonces come from the OS's cryptographic RNG on purpose, never from a
seeded generator; the released sum does not depend on them (the masks cancel).
"""
from __future__ import annotations

import hashlib
import os
import struct

import torch
from torch import Tensor

from defenses.commitments import commit
from defenses.secagg.aead import open_sealed, seal
from defenses.secagg.keys import KeyPair
from defenses.secagg.masks import masked_input
from defenses.secagg.shamir import Share, share
from defenses.secagg.wireformat import (KEY_LIST, REQUEST, SHARE_BYTES, SHARES, UNMASK, check_rows, pack_id,
                                        pack_ids, pack_ring, rows, to_bytes, to_tensor, unpack_id, unpack_ids)

SURVIVED, DROPPED = 1, 0  # request statuses: send the share of b, or of s_SK
SHARE_PURPOSE = "share-encryption"
SEED_BYTES = 32

__all__ = ["SecAggClient", "seed_digest", "empty_rows", "SURVIVED", "DROPPED", "SHARE_PURPOSE"]


def seed_digest(seed: bytes, name: str, round: int) -> bytes:
    """SHA-256 commitment to a self-mask seed b (256 uniform bits, so the hash hides it): lets the
    server check the seed it reconstructs and name the holder of a share that does not verify."""
    return hashlib.sha256(b"leaklab-secagg-v1|self-seed|" + name.encode() + struct.pack(">Q", round) + seed).digest()


class SecAggClient:
    """One client of a secure-aggregation round.

    Args:
        index: the client's id, its position in ``names``.
        names: the round's client names (public).
        x: ``(d,)`` int64, the client's encoded input in ``[0, 2^bits)``.
        bits: ring bits; threshold: t; round: the round number (binds AEAD, masks, commitments).
        full: every pair masks (SecAgg) or neighbours only (SecAgg+): decides only the client's
            check that t clients survived masking (its neighbourhood is whatever keys it is sent).
        commitments: commit to the masked input (round 2), open at unmasking (round 3).
    """

    def __init__(self, index: int, names: tuple[str, ...], x: Tensor, *, bits: int, threshold: int, round: int,
                 full: bool = True, commitments: bool = True):
        self.index, self.names, self.name = index, tuple(names), names[index]
        self.x, self.bits, self.t, self.round = x, bits, threshold, round
        self.full, self.commitments = full, commitments
        self._c, self._s = KeyPair.generate(), KeyPair.generate()  # encryption and masking key pairs
        self._b: bytes | None = None
        self._keys: dict[int, tuple[bytes, bytes]] = {}
        self._enc: dict[int, bytes] = {}  # peer -> share-encryption key (agreed once, both directions)
        self._held: dict[int, tuple[Share, Share]] = {}  # owner -> (share of its s_SK, share of its b)
        self._opening = None
        self._revealed: dict[int, int] = {}  # owner -> the status whose share this client revealed

    def _refuse(self, why: str) -> ValueError:
        return ValueError(f"{self.name} refuses: {why}")

    def _agree(self, pair: KeyPair, peer: int, public: bytes, purpose: str) -> bytes:
        try:
            return pair.agree(self.index, peer, public, purpose)
        except ValueError as exc:
            raise self._refuse(f"key agreement with {self.names[peer]} failed ({exc}): "
                               "a malformed or low-order public key") from None

    # -- round 0: AdvertiseKeys ---------------------------------------------------------------------
    def advertise(self) -> Tensor:
        """``(1, 64)`` uint8: the client's two public keys (c_pk for share encryption, s_pk for masks)."""
        return rows([self._c.public_bytes + self._s.public_bytes], 64)

    # -- round 1: ShareKeys -------------------------------------------------------------------------
    def share_keys(self, key_list: Tensor) -> tuple[Tensor, Tensor]:
        """From the server's key list (its neighbourhood's keys, its own among them): draw b, Shamir
        share s_SK and b t-of-m among the m listed clients, encrypt each peer's pair of shares.

        Returns ``(rows (m - 1, 144) uint8, seed digest (32,) uint8)``."""
        key_list = check_rows(key_list, KEY_LIST, f"{self.name}: the key list")
        keys: dict[int, tuple[bytes, bytes]] = {}
        for r in key_list:
            raw = to_bytes(r)
            i = unpack_id(raw)
            if i >= len(self.names) or i in keys:
                raise self._refuse(f"the key list names client id {i} twice or out of range")
            keys[i] = (raw[2:34], raw[34:66])
        if keys.get(self.index) != (self._c.public_bytes, self._s.public_bytes):
            raise self._refuse("the key list does not hold its own public keys")
        if len({pk for pair in keys.values() for pk in pair}) != 2 * len(keys):
            raise self._refuse("a public key appears twice in the key list (a replayed key)")
        if len(keys) < self.t:
            raise self._refuse(f"only {len(keys)} clients advertised keys, fewer than the threshold t = {self.t}")
        self._keys = keys
        holders = sorted(keys)
        self._b = os.urandom(SEED_BYTES)
        s_shares = share(self._s.private_bytes, self.t, len(holders))
        b_shares = share(self._b, self.t, len(holders))
        out = []
        for j, v in enumerate(holders):
            if v == self.index:
                self._held[v] = (s_shares[j], b_shares[j])
                continue
            key = self._enc[v] = self._agree(self._c, v, keys[v][0], SHARE_PURPOSE)
            plain = pack_ids(self.index, v) + s_shares[j].to_bytes() + b_shares[j].to_bytes()
            out.append(pack_ids(self.index, v) + seal(key, plain, sender=self.index, recipient=v, round=self.round))
        return rows(out, SHARES), to_tensor(seed_digest(self._b, self.name, self.round))

    # -- round 2: MaskedInputCollection -------------------------------------------------------------
    def masked_input(self, forwarded: Tensor) -> tuple[Tensor, Tensor | None]:
        """Decrypt the shares forwarded to it; the senders are the peers it masks with. Returns
        ``(y packed (ceil(d bits / 8),) uint8, commitment to it (32,) uint8 or None)`` with
        ``y = x + PRG(b) + sum_v +-PRG(s_uv) mod 2^bits``."""
        if self._b is None:
            raise self._refuse("asked for its masked input before it shared its keys")
        forwarded = check_rows(forwarded, SHARES, f"{self.name}: the forwarded shares")
        for r in forwarded:
            raw = to_bytes(r)
            frm, to = unpack_ids(raw)
            if to != self.index:
                raise self._refuse(f"was forwarded a share ciphertext addressed to client id {to}")
            if frm not in self._keys or frm == self.index:
                raise self._refuse(f"was forwarded shares from client id {frm}, who is not in its key list")
            if frm in self._held:
                raise self._refuse(f"was forwarded two share messages from {self.names[frm]}")
            key = self._enc.get(frm) or self._agree(self._c, frm, self._keys[frm][0], SHARE_PURPOSE)
            try:
                plain = open_sealed(key, raw[4:], sender=frm, recipient=self.index, round=self.round)
            except ValueError as exc:
                raise ValueError(f"{self.name}: the shares from {self.names[frm]} do not verify: {exc}") from None
            if unpack_ids(plain) != (frm, self.index):
                raise ValueError(f"{self.name}: the shares from {self.names[frm]} name other clients inside")
            pair = tuple(Share.from_bytes(plain[4 + k * SHARE_BYTES:4 + (k + 1) * SHARE_BYTES]) for k in range(2))
            if any(s.threshold != self.t or s.length != SEED_BYTES for s in pair):
                raise ValueError(f"{self.name}: the shares from {self.names[frm]} are not {self.t}-of-m shares "
                                 f"of {SEED_BYTES}-byte secrets")
            self._held[frm] = pair
        peers = sorted(set(self._held) - {self.index})
        if len(peers) + 1 < self.t:
            raise self._refuse(f"only {len(peers) + 1} clients shared keys with it, fewer than the threshold "
                               f"t = {self.t}")
        seeds = {v: self._agree(self._s, v, self._keys[v][1], "pairwise") for v in peers}
        y = pack_ring(masked_input(self.x, self.index, seeds, self._b, self.bits, self.round), self.bits)
        commitment = None
        if self.commitments:
            digest, self._opening = commit(y, self.name, self.round)
            commitment = to_tensor(digest)
        return y, commitment

    # -- round 3: Unmasking -------------------------------------------------------------------------
    def unmask(self, request: Tensor) -> tuple[Tensor, Tensor | None]:
        """For each peer in the server's list whose shares it holds: the share of its b if it survived
        the masked-input round, of its s_SK if it dropped; never both for one peer, across requests.
        Returns ``(rows (R, 57) uint8, opening nonce (32,) uint8 or None)``."""
        request = check_rows(request, REQUEST, f"{self.name}: the unmask request")
        status: dict[int, int] = {}
        for r in request:
            raw = to_bytes(r)
            i, s = unpack_id(raw), raw[2]
            if i >= len(self.names) or i in status or s not in (SURVIVED, DROPPED):
                raise self._refuse(f"malformed unmask request (client id {i}, status {s})")
            status[i] = s
        if status.get(self.index) != SURVIVED:
            raise self._refuse("the server did not list it as a survivor although it sent its masked input: "
                               "it would be asked for the share of its own key s_SK")
        if self.full and sum(status.values()) < self.t:
            raise self._refuse(f"only {sum(status.values())} clients survived the masked-input round, fewer "
                               f"than the threshold t = {self.t}")
        owners = [o for o in sorted(status) if o in self._held]
        both = [self.names[o] for o in owners if self._revealed.get(o, status[o]) != status[o]]
        if both:
            raise self._refuse(f"asked for both the share of b and the share of s_SK of {both}: revealing both "
                               "would let the server unmask their inputs")
        out = []
        for o in owners:  # every check passed: only now reveal
            self._revealed[o] = status[o]
            s_share, b_share = self._held[o]
            out.append(pack_id(o) + bytes([status[o]]) + (b_share if status[o] == SURVIVED else s_share).to_bytes())
        opening = to_tensor(self._opening.nonce) if self._opening is not None else None
        return rows(out, UNMASK), opening

    def __repr__(self) -> str:
        return f"SecAggClient({self.name!r}, id {self.index}, t={self.t}, bits={self.bits})"


def empty_rows(width: int) -> Tensor:
    """No rows of ``width`` bytes (a client that was forwarded nothing)."""
    return torch.empty(0, width, dtype=torch.uint8)

