"""Secure aggregation as a protocol over the Wire: Bonawitz et al., "Practical secure aggregation for
privacy-preserving machine learning" (CCS 2017), semi-honest server, with dropout recovery, hash
commitments to the masked inputs, and SecAgg+ neighbourhoods after Bell, Bonawitz, Gascon, Lepoint,
Raykova, "Secure single-server aggregation with (poly)logarithmic overhead" (CCS 2020).

The rounds (client ids are positions in the round's list of names; kinds are the Wire's):

0. **AdvertiseKeys** (stage ``"advertise"``, kind ``"secagg-keys"``). Each client draws two X25519
   key pairs, (c_pk, c_SK) to encrypt shares and (s_pk, s_SK) to agree on masks, and sends both
   public keys. The server needs t of them, then sends each client the keys of its neighbourhood
   (SecAgg: everyone who advertised; SecAgg+: its neighbours on the round's graph), its own included.
1. **ShareKeys** (``"share"``, kinds ``"secagg-shares"``, ``"secagg-seed-hash"``). Each client draws its
   self-mask seed b_u (``os.urandom(32)``), Shamir-shares s_u^SK and b_u t-of-m among the m clients
   of its key list, and for each peer v seals ``u || v || share of s_u^SK || share of b_u`` with
   ChaCha20-Poly1305 under the key it agrees with v from the c keys, associated data binding u, v and
   the round. The server routes each ciphertext by its clear ``u || v`` header, unread, to v (if v is
   still there). Each client also sends SHA-256(b_u), so the server can check the b_u it rebuilds.
2. **MaskedInputCollection** (``"masked"``, kinds ``"masked-input"``, ``"secagg-commit"``). The peers whose
   ciphertexts a client received (they all shared) are the peers it masks with:
   ``y_u = x_u + PRG(b_u) + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv) mod 2^bits``
   (:func:`~defenses.secagg.masks.masked_input`), sent bit-packed with a hash commitment to it
   (:mod:`defenses.commitments`). The server needs t of them.
3. **Unmasking** (``"unmask"``, kinds ``"secagg-survivors"``, ``"unmask-shares"``, ``"secagg-opening"``).
   The server sends the survivors the status of each peer: survived round 2 or dropped. A client
   returns, per peer, the share of b_v if v survived, else of s_v^SK, never both for one peer (asked
   for both, it refuses with a ValueError), and opens its commitment. The server needs t answers,
   checks every opening (a failed one names the client), reconstructs with the protocol's t (a share
   that does not verify is named), removes the survivors' self masks and the masks the survivors share
   with the dropped, and releases the ring sum of exactly the round-2 survivors' inputs.

A client dropped at stage s sent every message before round s and none from round s on. Fewer than
t answers in a round (or, with SecAgg+, in a neighbourhood) is a ValueError naming the round and the
counts, and nothing is released. X25519 keys, seeds, Shamir coefficients, AEAD and commitment nonces
come from the OS's cryptographic RNG on purpose; the graph and the dropouts come from the caller's
generator; the released sum depends on neither (the masks cancel).

SecAgg+: each client masks and shares with the k neighbours of a Harary graph H(k, n) (a circulant:
node i adjacent to i +- 1 .. i +- k/2 on a ring, one more neighbour on the opposite side for odd k)
whose labels are shuffled by ``torch.randperm`` from the generator; the threshold is relative to a
neighbourhood (k + 1 clients, itself included). Default k (:func:`default_neighbours`):
``2 ceil(log2 n)``, at most n - 1. Why: the survivors' masking graph must stay connected (else the
server learns the sums of its components); in the shuffled circulant with each client dropping
independently with probability p, it disconnects only if two runs of k/2 consecutive ring positions
all drop, with probability at most about ``(n p^(k/2))^2 <= n^(2 (1 + log2 p))`` for k/2 >= log2 n:
n^-2.6 at p = 0.1, n^-2 at p = 1/4 (Bell et al. prove k = O(log n) suffices; their constants, for
malicious clients and 2^-40 failure, are larger). Heavier dropout needs a larger k or a lower t.

Example (four clients, threshold 3; client:1 drops after sharing, its masks are removed):
    >>> import torch
    >>> from toolkit.wire import Wire
    >>> x = torch.tensor([[1, 2], [10, 20], [100, 200], [1000, 2000]])
    >>> wire = Wire()
    >>> out = secure_sum(wire, x, ["client:0", "client:1", "client:2", "client:3"], threshold=3, bits=16,
    ...                  round=1, dropouts={"masked": ["client:1"]})
    >>> out.total.tolist(), out.included
    ([1101, 2202], ('client:0', 'client:2', 'client:3'))
    >>> sorted({t.kind for t in wire.observed(by="server")})
    ['masked-input', 'secagg-commit', 'secagg-keys', 'secagg-opening', 'secagg-seed-hash', 'secagg-shares', 'unmask-shares']
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch import Tensor

from defenses.secagg.encoding import check_bits
from defenses.secagg.protocol_client import SecAggClient, empty_rows
from defenses.secagg.protocol_server import SecAggServer
from defenses.secagg.wireformat import MAX_CLIENTS, SHARES
from toolkit.wire import Wire

SERVER = "server"
STAGES = ("advertise", "share", "masked", "unmask")
KINDS = {"advertise": ("secagg-keys",), "share": ("secagg-shares", "secagg-seed-hash"),
         "masked": ("masked-input", "secagg-commit"),
         "unmask": ("secagg-survivors", "unmask-shares", "secagg-opening")}
VERSION = 1

__all__ = ["secure_sum", "SecAggResult", "STAGES", "KINDS", "VERSION", "default_neighbours", "neighbourhoods",
           "resolve_threshold", "resolve_neighbours"]


@dataclass(frozen=True)
class SecAggResult:
    """One round's outcome.

    Attributes:
        total: ``(d,)`` int64, the ring sum of the included clients' inputs.
        included: the round-2 survivors (their inputs are in ``total``), in input order.
        dropped: per stage, the clients that dropped there.
        answered: per stage, how many clients sent that round's message.
        bytes_up / bytes_down: per stage, bytes clients sent / the server sent (counted by the Wire).
        seconds: per stage, wall time of the round (clients and server, in this process).
        client_seconds / server_seconds: the clients' (summed over clients) and the server's own
            computation in the protocol's calls, timed call by call (the Wire's copying excluded).
        threshold: t; neighbours: k (n - 1 for SecAgg); bits: ring bits; unopened: commitments of
            clients that dropped after their masked input (they never opened them).
    """

    total: Tensor
    included: tuple[str, ...]
    dropped: dict[str, tuple[str, ...]]
    answered: dict[str, int]
    bytes_up: dict[str, int]
    bytes_down: dict[str, int]
    seconds: dict[str, float]
    threshold: int
    neighbours: int
    bits: int
    unopened: int = 0
    extra: dict = field(default_factory=dict)
    client_seconds: float = 0.0
    server_seconds: float = 0.0


def default_neighbours(n: int) -> int:
    """SecAgg+'s default degree for ``n`` clients: ``2 ceil(log2 n)``, at most ``n - 1`` (see the
    module docstring for the constant)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"secure aggregation needs at least 2 clients, got {n!r}")
    return min(n - 1, 2 * math.ceil(math.log2(n)))


def resolve_neighbours(neighbours, n: int) -> int:
    """k for a round of ``n`` clients: None is every other client (SecAgg), ``"log"`` the default of
    :func:`default_neighbours`, an int k >= 2 (capped at n - 1)."""
    if neighbours is None:
        return n - 1
    if neighbours == "log":
        return default_neighbours(n)
    if isinstance(neighbours, bool) or not isinstance(neighbours, int) or neighbours < 2:
        raise ValueError(f"neighbours must be None (every pair), 'log' or an int >= 2 (a single neighbour would "
                         f"reveal the sum of each pair), got {neighbours!r}")
    return min(neighbours, n - 1)


def neighbourhoods(n: int, k: int, generator: torch.Generator | None) -> list[frozenset[int]] | None:
    """Closed neighbourhoods (each client and its neighbours) on a Harary graph H(k, n) with labels
    shuffled from ``generator``; None when k >= n - 1 (the complete graph: SecAgg)."""
    if k >= n - 1:
        return None
    if not isinstance(generator, torch.Generator):
        raise ValueError("SecAgg+ draws its neighbourhood graph from a torch.Generator: pass generator=")
    graph = nx.hkn_harary_graph(k, n)
    label = torch.randperm(n, generator=generator).tolist()
    out: list[frozenset[int]] = [frozenset()] * n
    for i in range(n):
        out[label[i]] = frozenset([label[i]] + [label[j] for j in graph.neighbors(i)])
    return out


def resolve_threshold(threshold, size: int) -> int:
    """t for a neighbourhood of ``size`` clients (the round's n for SecAgg, k + 1 for SecAgg+): an int
    t in [2, size], or a fraction f in (0, 1] giving ``max(2, ceil(f size))``."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ValueError(f"threshold must be an int t or a fraction in (0, 1], got {threshold!r}")
    if isinstance(threshold, float):
        if not 0 < threshold <= 1:
            raise ValueError(f"a fractional threshold must lie in (0, 1], got {threshold!r}")
        t = max(2, math.ceil(threshold * size - 1e-9))
    else:
        t = threshold
    if t < 2:
        raise ValueError(f"threshold t = {t} < 2: a single share would reveal a client's secrets")
    if t > size:
        raise ValueError(f"threshold t = {t} is larger than the {size} clients of a neighbourhood: the round "
                         "could never reconstruct")
    return t


def _check_inputs(inputs, names, bits) -> tuple[str, ...]:
    names = tuple(names)
    bad = [n for n in names if not isinstance(n, str) or not n or n == SERVER]
    if bad:
        raise ValueError(f"client names must be non-empty strings other than {SERVER!r}, got {bad}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate client ids {dup}: each client takes part once per round")
    if not 2 <= len(names) <= MAX_CLIENTS:
        raise ValueError(f"secure aggregation needs 2..{MAX_CLIENTS} clients, got {len(names)}")
    if not isinstance(inputs, Tensor) or inputs.dtype != torch.int64 or inputs.shape[:1] != (len(names),) \
            or inputs.dim() != 2:
        raise ValueError(f"inputs must be an (M, d) int64 tensor of ring elements, one row per name ({len(names)}), "
                         f"got {tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__}")
    outside = ((inputs < 0) | (inputs >= (1 << check_bits(bits)))).any(dim=1)
    if outside.any():
        raise ValueError(f"inputs of {[names[i] for i in outside.nonzero().flatten().tolist()]} lie outside the "
                         f"ring [0, 2^{bits})")
    return names


def _check_dropouts(dropouts, names) -> dict[str, frozenset[str]]:
    dropouts = dict(dropouts or {})
    unknown = sorted(set(dropouts) - set(STAGES))
    if unknown:
        raise ValueError(f"dropout stages must be among {STAGES}, got {unknown}")
    out = {s: frozenset(dropouts.get(s, ())) for s in STAGES}
    seen: dict[str, str] = {}
    for s in STAGES:
        strangers = sorted(out[s] - set(names))
        if strangers:
            raise ValueError(f"dropouts at {s!r} name clients not in the round: {strangers}")
        for n in out[s]:
            if n in seen:
                raise ValueError(f"{n} is scheduled to drop at both {seen[n]!r} and {s!r}")
            seen[n] = s
    return out


class _Ledger:
    """Sends a round's messages through the Wire and counts them per stage (the Wire's own byte count)."""

    def __init__(self, wire: Wire, names: tuple[str, ...]):
        self.wire, self.names = wire, names
        self.up = {s: 0 for s in STAGES}
        self.down = {s: 0 for s in STAGES}

    def gather(self, stage: str, kind: str, messages: Sequence[tuple[int, Tensor]]) -> tuple[tuple[str, ...], Tensor]:
        """Clients' messages (rows each) to the server in one stacked send; returns (sender per row, rows)."""
        parts = [(i, m.reshape(1, -1) if m.dim() == 1 else m) for i, m in messages]
        senders = tuple(self.names[i] for i, m in parts for _ in range(len(m)))
        if not senders:
            return (), torch.empty(0, 0, dtype=torch.uint8)
        before = self.wire.total_bytes
        delivered = self.wire.send(torch.cat([m for _, m in parts]), sender=senders, receiver=SERVER, kind=kind)
        self.up[stage] += self.wire.total_bytes - before
        return senders, delivered

    def deliver(self, stage: str, kind: str, outbox) -> dict[int, Tensor]:
        """The server's outbox ``[(receiver ids, tensor)]``: a broadcast to many, a send to one."""
        inbox: dict[int, Tensor] = {}
        before = self.wire.total_bytes
        for ids, tensor in outbox:
            if len(ids) == 1:
                got = self.wire.send(tensor, sender=SERVER, receiver=self.names[ids[0]], kind=kind)
            else:
                got = self.wire.broadcast(tensor, sender=SERVER, receivers=[self.names[i] for i in ids], kind=kind)
            inbox.update({i: got for i in ids})
        self.down[stage] += self.wire.total_bytes - before
        return inbox

    def forward(self, stage: str, kind: str, recipients: tuple[int, ...], rows: Tensor) -> dict[int, Tensor]:
        """Rows routed to their recipients in one stacked send; returns each recipient's rows."""
        if not recipients:
            return {}
        before = self.wire.total_bytes
        got = self.wire.send(rows, sender=SERVER, receiver=tuple(self.names[r] for r in recipients), kind=kind)
        self.down[stage] += self.wire.total_bytes - before
        index = torch.tensor(recipients)
        return {int(r): got[index == r] for r in index.unique()}


def secure_sum(wire: Wire, inputs: Tensor, names: Sequence[str], *, threshold, bits: int, round: int,
               neighbours=None, dropouts: Mapping[str, Collection[str]] | None = None,
               generator: torch.Generator | None = None, commitments: bool = True,
               client: Callable[..., SecAggClient] = SecAggClient) -> SecAggResult:
    """Run the four rounds for the clients ``names`` with ``inputs`` over ``wire``.

    Args:
        wire: the Wire every message crosses (clients <-> ``"server"``).
        inputs: ``(M, d)`` int64 ring elements in ``[0, 2^bits)``, client i's input in row i.
        names: the M client names (unique; a client's id is its position).
        threshold: t (int) or a fraction of the neighbourhood (:func:`resolve_threshold`).
        bits: ring bits (size the ring so the sum cannot wrap: :class:`~defenses.secagg.FixedPoint`).
        round: the round number (binds masks, AEAD and commitments to it).
        neighbours: None (SecAgg), ``"log"`` or an int k (SecAgg+, :func:`resolve_neighbours`).
        dropouts: ``{stage: names}``, the clients that drop at each stage (:data:`STAGES`).
        generator: draws the SecAgg+ graph.
        commitments: commit to the masked inputs and check the openings.
        client: the client class (a test hook for misbehaving clients).

    Returns:
        :class:`SecAggResult`. Raises a ValueError naming the client(s) at fault, or the round and
        the counts, when the round cannot release the sum; then nothing is released.
    """
    names = _check_inputs(inputs, names, bits)
    n, d = inputs.shape
    k = resolve_neighbours(neighbours, n)
    nbhd = neighbourhoods(n, k, generator)
    t = resolve_threshold(threshold, n if nbhd is None else k + 1)
    if isinstance(round, bool) or not isinstance(round, int) or round < 0:
        raise ValueError(f"round must be a non-negative int, got {round!r}")
    schedule = _check_dropouts(dropouts, names)
    clients = [client(i, names, inputs[i], bits=bits, threshold=t, round=round, full=nbhd is None,
                      commitments=commitments) for i in range(n)]
    server = SecAggServer(names, dim=d, bits=bits, threshold=t, round=round, neighbourhoods=nbhd,
                          commitments=commitments)
    ledger, seconds, answered = _Ledger(wire, names), {}, {}
    present = list(range(n))

    def start(stage: str) -> list[int]:
        present[:] = [i for i in present if names[i] not in schedule[stage]]
        answered[stage] = len(present)
        seconds[stage] = time.perf_counter()
        return list(present)

    def stop(stage: str) -> None:
        seconds[stage] = time.perf_counter() - seconds[stage]

    clock = {"client": 0.0, "server": 0.0}

    def timed(party: str, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            clock[party] += time.perf_counter() - t0

    ids = start("advertise")
    advertised = [(i, timed("client", clients[i].advertise)) for i in ids]
    senders, keys = ledger.gather("advertise", "secagg-keys", advertised)
    key_lists = ledger.deliver("advertise", "secagg-keys", timed("server", server.receive_keys, senders, keys))
    stop("advertise")

    ids = start("share")
    sent = [(i, timed("client", clients[i].share_keys, key_lists[i])) for i in ids]
    s_senders, shares = ledger.gather("share", "secagg-shares", [(i, m[0]) for i, m in sent])
    h_senders, hashes = ledger.gather("share", "secagg-seed-hash", [(i, m[1]) for i, m in sent])
    recipients, fwd = timed("server", server.receive_shares, s_senders, shares, h_senders, hashes)
    forwarded = ledger.forward("share", "secagg-shares", recipients, fwd)
    stop("share")

    ids = start("masked")
    sent = [(i, timed("client", clients[i].masked_input, forwarded.get(i, empty_rows(SHARES)))) for i in ids]
    m_senders, masked = ledger.gather("masked", "masked-input", [(i, m[0]) for i, m in sent])
    c_senders, commits = ledger.gather("masked", "secagg-commit", [(i, m[1]) for i, m in sent if m[1] is not None])
    requests = timed("server", server.receive_masked, m_senders, masked, c_senders,
                     commits if commitments else None)
    stop("masked")

    ids = start("unmask")
    requests = ledger.deliver("unmask", "secagg-survivors", requests)
    sent = [(i, timed("client", clients[i].unmask, requests[i])) for i in ids]
    u_senders, unmask = ledger.gather("unmask", "unmask-shares", [(i, m[0]) for i, m in sent])
    o_senders, openings = ledger.gather("unmask", "secagg-opening", [(i, m[1]) for i, m in sent if m[1] is not None])
    total = timed("server", server.receive_unmask, u_senders, unmask, o_senders,
                  openings if commitments else None)
    stop("unmask")

    dropped, before = {}, set(names)
    for s in STAGES:
        dropped[s] = tuple(nm for nm in names if nm in before and nm in schedule[s])
        before -= schedule[s]
    return SecAggResult(total, tuple(names[i] for i in server.u3), dropped, answered, dict(ledger.up),
                        dict(ledger.down), seconds, t, k, bits, server.unopened,
                        client_seconds=clock["client"], server_seconds=clock["server"])
