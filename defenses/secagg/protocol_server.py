"""The server's side of secure aggregation (Bonawitz et al., "Practical secure aggregation for
privacy-preserving machine learning", CCS 2017, figure 4, semi-honest server; SecAgg+ neighbourhoods
after Bell et al., "Secure single-server aggregation with (poly)logarithmic overhead", CCS 2020).
The rounds are described in :mod:`defenses.secagg.protocol`.

A :class:`SecAggServer` computes only with what clients sent it: public keys, ciphertexts it
forwards unread, seed digests, masked inputs, commitments and openings, and the shares it is owed.
Every message is checked where it arrives; a problem is a ValueError naming the client (a client
submitting twice, shares addressed outside its neighbourhood, a share that does not verify, a
commitment whose opening fails) or the round and the counts (fewer than t clients answered), and the
round releases nothing.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor

from defenses.commitments import Opening, check_openings
from defenses.secagg.encoding import ring_add, ring_neg, ring_sum
from defenses.secagg.keys import KeyPair, public_key_from
from defenses.secagg.masks import expand, pairwise_mask
from defenses.secagg.protocol_client import DROPPED, SURVIVED, seed_digest
from defenses.secagg.shamir import Share, reconstruct
from defenses.secagg.wireformat import (DIGEST_BYTES, KEY_LIST, KEYS, REQUEST, SHARE_BYTES, SHARES, UNMASK,
                                        check_rows, pack_id, packed_bytes, rows, to_bytes, unpack_id, unpack_ids,
                                        unpack_ring)

ROUNDS = {"advertise": "round 0 (AdvertiseKeys)", "share": "round 1 (ShareKeys)",
          "masked": "round 2 (MaskedInputCollection)", "unmask": "round 3 (Unmasking)"}

__all__ = ["SecAggServer", "ROUNDS"]


class SecAggServer:
    """The server of one secure-aggregation round.

    Args:
        names: the round's client names; a client's id is its position.
        dim: d, the length of the inputs; bits: ring bits; threshold: t; round: the round number.
        neighbourhoods: None (SecAgg: every client masks and shares with every other) or, per client id,
            the frozenset of ids in its closed neighbourhood (itself and its neighbours; SecAgg+).
        commitments: whether clients commit to their masked inputs (checked at unmasking).
    """

    def __init__(self, names: tuple[str, ...], *, dim: int, bits: int, threshold: int, round: int,
                 neighbourhoods: list[frozenset[int]] | None = None, commitments: bool = True):
        self.names, self.n = tuple(names), len(names)
        self.ids = {name: i for i, name in enumerate(self.names)}
        self.dim, self.bits, self.t, self.round, self.commitments = dim, bits, threshold, round, commitments
        self.full = neighbourhoods is None
        everyone = frozenset(range(self.n))
        self.nbhd = [everyone] * self.n if neighbourhoods is None else list(neighbourhoods)
        self.keys: dict[int, tuple[bytes, bytes]] = {}
        self.digests: dict[int, bytes] = {}
        self.masked: dict[int, Tensor] = {}
        self.commits: dict[int, bytes] = {}
        self.u1: list[int] = []
        self.u2: list[int] = []
        self.u3: list[int] = []
        self.u4: list[int] = []
        self.unopened = 0

    # -- checks where messages arrive ------------------------------------------------------------
    def _senders(self, senders, stage: str, what: str, allowed=None, once: bool = True) -> list[int]:
        unknown = sorted({s for s in senders if s not in self.ids})
        if unknown:
            raise ValueError(f"{ROUNDS[stage]}: {what} from unknown clients {unknown}")
        ids = [self.ids[s] for s in senders]
        if once:
            twice = sorted((self.names[i], c) for i, c in Counter(ids).items() if c > 1)
            if twice:
                raise ValueError(f"{ROUNDS[stage]}: {', '.join(f'{n} submitted {c} {what}' for n, c in twice)}; "
                                 "each client submits once per round: nothing is released")
        if allowed is not None:
            late = sorted({self.names[i] for i in ids if i not in allowed})
            if late:
                raise ValueError(f"{ROUNDS[stage]}: {what} from {late}, who did not take part in the previous "
                                 "round")
        return ids

    def _enough(self, ids, stage: str) -> None:
        if len(ids) < self.t:
            raise ValueError(f"{ROUNDS[stage]}: {len(ids)} of {self.n} clients answered, fewer than the threshold "
                             f"t = {self.t}: no sum is released")
        present = set(ids)
        for u in ids:
            m = len(self.nbhd[u] & present)
            if m < self.t:
                raise ValueError(f"{ROUNDS[stage]}: only {m} clients of {self.names[u]}'s neighbourhood (itself "
                                 f"included) answered, fewer than the threshold t = {self.t}: no sum is released")

    def holders(self, owner: int) -> list[int]:
        """The clients ``owner`` Shamir-shared with (its neighbourhood among the key advertisers), by id;
        holder ``holders[j]`` got share index ``j + 1``."""
        return sorted(self.nbhd[owner] & set(self.u1))

    # -- round 0 ----------------------------------------------------------------------------------
    def receive_keys(self, senders: tuple[str, ...], keys: Tensor) -> list[tuple[tuple[int, ...], Tensor]]:
        """Record the advertised public keys; returns the outbox: ``[(receiver ids, key list rows)]``
        (one broadcast of every key for SecAgg, each client its neighbourhood's keys for SecAgg+)."""
        keys = check_rows(keys, KEYS, f"{ROUNDS['advertise']}: public keys")
        ids = self._senders(senders, "advertise", "public keys")
        for i, r in zip(ids, keys):
            raw = to_bytes(r)
            try:
                public_key_from(raw[:32]), public_key_from(raw[32:])
            except ValueError as exc:
                raise ValueError(f"{ROUNDS['advertise']}: {self.names[i]} sent malformed public keys: {exc}") from None
            self.keys[i] = (raw[:32], raw[32:])
        owners: dict[bytes, list[int]] = {}
        for i in ids:
            for pk in self.keys[i]:
                owners.setdefault(pk, []).append(i)
        replayed = sorted({self.names[i] for who in owners.values() if len(who) > 1 for i in who})
        if replayed:
            raise ValueError(f"{ROUNDS['advertise']}: {replayed} advertised the same public key twice (a replayed "
                             "key): nothing is released")
        self.u1 = sorted(ids)
        self._enough(self.u1, "advertise")
        row = {i: pack_id(i) + self.keys[i][0] + self.keys[i][1] for i in self.u1}
        if self.full:
            return [(tuple(self.u1), rows([row[i] for i in self.u1], KEY_LIST))]
        return [((u,), rows([row[v] for v in self.holders(u)], KEY_LIST)) for u in self.u1]

    # -- round 1 ----------------------------------------------------------------------------------
    def receive_shares(self, senders: tuple[str, ...], shares: Tensor, digest_senders: tuple[str, ...],
                       digests: Tensor) -> tuple[tuple[int, ...], Tensor]:
        """Check the share ciphertexts' routing headers (never their contents) and the seed digests;
        returns ``(recipient ids, rows)`` to forward: every ciphertext addressed to a client still here."""
        shares = check_rows(shares, SHARES, f"{ROUNDS['share']}: share ciphertexts")
        digests = check_rows(digests, DIGEST_BYTES, f"{ROUNDS['share']}: seed digests")
        d_ids = self._senders(digest_senders, "share", "seed digests", allowed=set(self.u1))
        ids = self._senders(senders, "share", "share messages", allowed=set(self.u1), once=False)
        routes: dict[int, list[int]] = {}
        seen = set()
        for row, (i, r) in enumerate(zip(ids, shares)):
            frm, to = unpack_ids(to_bytes(r[:4]))
            if frm != i:
                raise ValueError(f"{ROUNDS['share']}: {self.names[i]} sent shares claiming to come from client id {frm}")
            if (frm, to) in seen:
                raise ValueError(f"{ROUNDS['share']}: {self.names[i]} submitted two share messages for client id "
                                 f"{to}; each client submits once per round: nothing is released")
            if to == i or to not in self.holders(i):
                raise ValueError(f"{ROUNDS['share']}: {self.names[i]} sent shares to client id {to}, outside "
                                 "its neighbourhood of key advertisers")
            seen.add((frm, to))
            routes.setdefault(i, []).append(row)
        for i in routes:
            if len(routes[i]) != len(self.holders(i)) - 1:
                raise ValueError(f"{ROUNDS['share']}: {self.names[i]} sent shares to {len(routes[i])} of its "
                                 f"{len(self.holders(i)) - 1} peers")
        if set(routes) != set(d_ids):
            odd = sorted(self.names[i] for i in set(routes) ^ set(d_ids))
            raise ValueError(f"{ROUNDS['share']}: {odd} sent shares without a seed digest or the reverse")
        self.digests = {i: to_bytes(r) for i, r in zip(d_ids, digests)}
        self.u2 = sorted(routes)
        self._enough(self.u2, "share")
        alive = set(self.u2)
        keep = [row for i in self.u2 for row in routes[i] if unpack_ids(to_bytes(shares[row, :4]))[1] in alive]
        recipients = tuple(unpack_ids(to_bytes(shares[row, :4]))[1] for row in keep)
        return recipients, shares[torch.tensor(keep, dtype=torch.long)]

    # -- round 2 ----------------------------------------------------------------------------------
    def receive_masked(self, senders: tuple[str, ...], masked: Tensor, commit_senders: tuple[str, ...] = (),
                       commitments: Tensor | None = None) -> list[tuple[tuple[int, ...], Tensor]]:
        """Record the masked inputs (and commitments); returns the outbox of unmask requests: the status
        (survived or dropped) of every client whose shares the recipient holds."""
        width = packed_bytes(self.dim, self.bits)
        masked = check_rows(masked, width, f"{ROUNDS['masked']}: masked inputs")
        ids = self._senders(senders, "masked", "masked inputs", allowed=set(self.u2))
        if self.commitments:
            commitments = check_rows(commitments, DIGEST_BYTES, f"{ROUNDS['masked']}: commitments")
            c_ids = self._senders(commit_senders, "masked", "commitments", allowed=set(self.u2))
            if set(c_ids) != set(ids):
                odd = sorted(self.names[i] for i in set(c_ids) ^ set(ids))
                raise ValueError(f"{ROUNDS['masked']}: {odd} sent a masked input without a commitment or the reverse")
            self.commits = {i: to_bytes(r) for i, r in zip(c_ids, commitments)}
        self.masked = {i: r for i, r in zip(ids, masked)}
        self.u3 = sorted(ids)
        self._enough(self.u3, "masked")
        survived = set(self.u3)
        status = {i: pack_id(i) + bytes([SURVIVED if i in survived else DROPPED]) for i in self.u2}
        if self.full:
            return [(tuple(self.u3), rows([status[i] for i in self.u2], REQUEST))]
        return [((u,), rows([status[i] for i in sorted(self.nbhd[u] & set(self.u2))], REQUEST)) for u in self.u3]

    # -- round 3 ----------------------------------------------------------------------------------
    def receive_unmask(self, senders: tuple[str, ...], shares: Tensor, open_senders: tuple[str, ...] = (),
                       openings: Tensor | None = None) -> Tensor:
        """Check the shares and openings, reconstruct the survivors' self-mask seeds and the dropped
        clients' masking keys, remove their masks; returns the ring sum ``(d,)`` int64 of exactly the
        masked-input round's survivors."""
        shares = check_rows(shares, UNMASK, f"{ROUNDS['unmask']}: shares")
        ids = self._senders(senders, "unmask", "shares", allowed=set(self.u3), once=False)
        self.u4 = sorted(set(ids))
        self._enough(self.u4, "unmask")
        survived, u2 = set(self.u3), set(self.u2)
        got: dict[int, dict[int, Share]] = {}  # owner -> holder -> share
        for h, r in zip(ids, shares):
            raw = to_bytes(r)
            owner, status = unpack_id(raw), raw[2]
            who = f"{ROUNDS['unmask']}: {self.names[h]}"
            if owner not in u2 or owner not in self.nbhd[h]:
                raise ValueError(f"{who} sent a share of client id {owner}, which it does not hold")
            if status != (SURVIVED if owner in survived else DROPPED):
                raise ValueError(f"{who} sent the share of {self.names[owner]}'s "
                                 f"{'b' if status == SURVIVED else 's_SK'}, which the server did not ask for")
            if h in got.get(owner, {}):
                raise ValueError(f"{who} submitted two shares of {self.names[owner]}; each client submits once "
                                 "per round: nothing is released")
            try:
                s = Share.from_bytes(raw[3:3 + SHARE_BYTES])
            except ValueError as exc:
                raise ValueError(f"{who} sent a malformed share of {self.names[owner]}: {exc}") from None
            expected = self.holders(owner).index(h) + 1
            if (s.index, s.threshold, s.length) != (expected, self.t, 32):
                raise ValueError(f"{who}'s share of {self.names[owner]} does not verify: index {s.index}, threshold "
                                 f"{s.threshold}, length {s.length}; expected {expected}, {self.t}, 32")
            got.setdefault(owner, {})[h] = s
        if self.commitments:
            self._check_openings(open_senders, openings)
        total = ring_sum([unpack_ring(self.masked[u], self.dim, self.bits) for u in self.u3], self.bits)
        for u in self.u3:
            b = self._recover(got.get(u, {}), u, "self-mask seed b",
                              lambda secret, u=u: seed_digest(secret, self.names[u], self.round) == self.digests[u])
            total = ring_add(total, ring_neg(expand(b, self.dim, self.bits, self.round, "self"), self.bits), self.bits)
        for v in sorted(u2 - survived):
            sk = self._recover(got.get(v, {}), v, "masking key s_SK",
                               lambda secret, v=v: KeyPair.from_private_bytes(secret).public_bytes == self.keys[v][1])
            pair = KeyPair.from_private_bytes(sk)
            for u in sorted(self.nbhd[v] & survived):
                mask = pairwise_mask(u, v, pair.agree(v, u, self.keys[u][1]), self.dim, self.bits, self.round)
                total = ring_add(total, ring_neg(mask, self.bits), self.bits)
        return total

    def _check_openings(self, open_senders, openings) -> None:
        openings = check_rows(openings, DIGEST_BYTES, f"{ROUNDS['unmask']}: openings")
        o_ids = self._senders(open_senders, "unmask", "openings", allowed=set(self.u3))
        opened = {self.names[i]: (self.masked[i], Opening(to_bytes(r))) for i, r in zip(o_ids, openings)}
        committed = {self.names[i]: self.commits[i] for i in self.u4}
        check_openings(committed, opened, self.round)  # names every client whose opening fails
        self.unopened = len(self.u3) - len(self.u4)  # dropped after their masked input: never opened

    def _recover(self, shares: dict[int, Share], owner: int, what: str, check) -> bytes:
        """Reconstruct ``owner``'s secret from the holders' shares; a share that does not verify (the
        polynomial or the public check disagrees) is named by leaving each share out in turn."""
        if len(shares) < self.t:
            raise ValueError(f"{ROUNDS['unmask']}: only {len(shares)} shares of {self.names[owner]}'s {what} came back, "
                             f"fewer than the threshold t = {self.t}: no sum is released")

        def attempt(subset) -> bytes | None:
            try:
                secret = reconstruct([shares[h] for h in subset], self.t)
            except ValueError:
                return None
            return secret if check(secret) else None

        secret = attempt(sorted(shares))
        if secret is not None:
            return secret
        culprits = [h for h in sorted(shares) if len(shares) > self.t
                    and attempt([g for g in sorted(shares) if g != h]) is not None]
        named = [self.names[h] for h in (culprits if len(culprits) == 1 else sorted(shares))]
        blame = f"the share from {named[0]}" if len(culprits) == 1 else f"one of the shares from {named}"
        raise ValueError(f"{ROUNDS['unmask']}: {blame} of {self.names[owner]}'s {what} does not verify "
                         "(tampered): no sum is released")

    def __repr__(self) -> str:
        return f"SecAggServer({self.n} clients, t={self.t}, bits={self.bits}, {'full' if self.full else 'neighbours'})"
