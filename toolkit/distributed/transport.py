"""A Wire transport that crosses processes: the same protocol code runs in every process (SPMD).

Every process runs the same protocol with the same seed and *hosts* some parties (a mapping party
name -> rank). The others are shadows: placeholders of the right shape and dtype. Each send runs in
every process, in the same order, so sends and receives pair up:

- this process hosts the sender but not the receiver: the tensor goes to the receiver's rank and
  ``deliver`` returns ``tensor.detach()`` (what it delivered);
- it hosts the receiver but not the sender: it receives from the sender's rank and returns the
  arrival; the local tensor is the shadow and fixes the expected dtype and shape (a mismatch is a
  ValueError naming sender, receiver, kind and both shapes);
- it hosts both, or neither: ``tensor.detach()`` (as :class:`~toolkit.wire.InProcess`; for neither,
  a shadow value that is never sent).

Stacked sends (a tuple of senders or receivers, one row per party) move only the rows whose two
ends live on different ranks, one message per peer rank. A :class:`~toolkit.messages.Packet`
travels as one message per tensor field (kind ``"<kind>/<field>"``) and is rebuilt with
``dataclasses.replace(shadow, **fields)``. A broadcast (``Wire.broadcast``) sends the tensor once
to each rank hosting a receiver.

Byte counts and the transcript are the Wire's own, identical to an in-process run. On a process,
transcript entries where a hosted party is sender or receiver hold the real tensors; entries
between two shadow parties hold shadow values.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import Tensor

from toolkit.distributed.group import Group
from toolkit.messages import Names, Packet, Payload


class ProcessTransport:
    """Delivers Wire traffic between parties hosted by different processes of ``group``.

    Args:
        group: this process's :class:`~toolkit.distributed.group.Group`.
        hosts: party name -> the rank that hosts it (the same mapping in every process).
        timeout: seconds to wait for each message (default: the group's).
    """

    def __init__(self, group: Group, hosts: Mapping[str, int], *, timeout: float | None = None):
        if not isinstance(group, Group):
            raise TypeError(f"ProcessTransport needs a Group (toolkit.distributed.join), got {type(group).__name__}")
        hosts = dict(hosts)
        for name, rank in hosts.items():
            if not isinstance(name, str):
                raise TypeError(f"party names must be str, got {name!r}")
            if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < group.world_size:
                raise ValueError(f"party {name!r} is hosted by {rank!r}, not a rank in [0, {group.world_size})")
        self.group, self.hosts, self.timeout = group, hosts, timeout
        self.rank = group.rank
        self.sent_bytes = 0  # payload bytes this process put on the network (headers excluded)
        self.received_bytes = 0

    def hosted(self) -> list[str]:
        """The parties this process hosts."""
        return [n for n, r in self.hosts.items() if r == self.rank]

    def _rank(self, name: str) -> int:
        try:
            return self.hosts[name]
        except KeyError:
            raise ValueError(f"party {name!r} has no rank in this transport's hosts "
                             f"({sorted(self.hosts)})") from None

    # -- the Wire's entry points ---------------------------------------------------------
    def deliver(self, tensor: Payload, *, sender: Names, receiver: Names, kind: str) -> Payload:
        """Send, receive or pass through ``tensor`` as the module docstring describes."""
        if isinstance(sender, str) and isinstance(receiver, str):
            src, dst = self._rank(sender), self._rank(receiver)
            if src == dst or self.rank not in (src, dst):
                return tensor.detach()
            if self.rank == src:
                self._send(tensor, dst, kind).wait(self.timeout)
                return tensor.detach()
            return self._recv(tensor, src, kind, sender, receiver)
        return self._stacked(tensor, sender, receiver, kind)

    def deliver_broadcast(self, tensor: Payload, *, sender: str, receivers: tuple[str, ...], kind: str) -> Payload:
        """One tensor to every receiver: sent once to each other rank hosting one of them."""
        src = self._rank(sender)
        ranks = sorted({self._rank(r) for r in receivers} - {src})
        if self.rank == src:
            pending = [self._send(tensor, dst, kind) for dst in ranks]
            for p in pending:
                p.wait(self.timeout)
        elif self.rank in ranks:
            mine = next(r for r in receivers if self.hosts[r] == self.rank)
            return self._recv(tensor, src, kind, sender, mine)
        return tensor.detach()

    # -- stacked sends: one row per (sender, receiver) pair ------------------------------
    def _stacked(self, tensor: Payload, sender: Names, receiver: Names, kind: str) -> Payload:
        n = len(sender) if isinstance(sender, tuple) else len(receiver)
        senders = sender if isinstance(sender, tuple) else (sender,) * n
        receivers = receiver if isinstance(receiver, tuple) else (receiver,) * n
        pairs = [(self._rank(s), self._rank(r)) for s, r in zip(senders, receivers)]
        outgoing: dict[int, list[int]] = {}
        incoming: dict[int, list[int]] = {}
        for i, (src, dst) in enumerate(pairs):
            if src == dst:
                continue
            if src == self.rank:
                outgoing.setdefault(dst, []).append(i)
            elif dst == self.rank:
                incoming.setdefault(src, []).append(i)
        detached = tensor.detach()
        pending = [self._send(_rows(detached, rows), dst, kind) for dst, rows in sorted(outgoing.items())]
        out = detached
        if incoming:
            out = detached.clone()
            for src, rows in sorted(incoming.items()):
                got = self._recv(_rows(detached, rows), src, kind, senders[rows[0]], receivers[rows[0]])
                out = _set_rows(out, rows, got)
        for p in pending:
            p.wait(self.timeout)
        return out

    # -- one message (a tensor, or one per Packet field) ---------------------------------
    def _send(self, payload: Payload, dst: int, kind: str) -> _Pending:
        if isinstance(payload, Packet):
            parts = [(f"{kind}/{name}", t) for name, t in payload.tensors().items()]
        else:
            parts = [(kind, payload)]
        pending = []
        for k, t in parts:
            pending.append(self.group.isend(t.detach(), dst, kind=k))
            self.sent_bytes += t.nbytes
        return _Pending(pending)

    def _recv(self, shadow: Payload, src: int, kind: str, sender: str, receiver: str) -> Payload:
        if isinstance(shadow, Packet):
            fields = {name: self._recv_one(t, src, f"{kind}/{name}", sender, receiver)
                      for name, t in shadow.tensors().items()}
            return replace(shadow, **fields)
        return self._recv_one(shadow, src, kind, sender, receiver)

    def _recv_one(self, shadow: Tensor, src: int, kind: str, sender: str, receiver: str) -> Tensor:
        try:
            got, _ = self.group.recv(src, like=shadow, kind=kind, timeout=self.timeout)
        except ValueError as e:
            raise ValueError(f"{kind!r} from {sender!r} (rank {src}) to {receiver!r} (rank {self.rank}), "
                             f"expected {tuple(shadow.shape)} {shadow.dtype}: {e}") from None
        except TimeoutError as e:
            raise TimeoutError(f"{receiver!r} (rank {self.rank}) waited for {kind!r} from {sender!r} "
                               f"(rank {src}): {e}") from None
        self.received_bytes += got.nbytes
        return got

    def __repr__(self) -> str:
        return f"ProcessTransport(rank={self.rank}, hosts={self.hosts})"


class _Pending:
    def __init__(self, sends: list):
        self.sends = sends

    def wait(self, timeout: float | None) -> None:
        for s in self.sends:
            s.wait(timeout)


def _rows(payload: Payload, rows: list[int]) -> Payload:
    index = torch.tensor(rows)
    if isinstance(payload, Packet):
        return payload.map(lambda t: t.index_select(0, index))
    return payload.index_select(0, index)


def _set_rows(out: Payload, rows: list[int], got: Payload) -> Payload:
    index = torch.tensor(rows)
    if isinstance(out, Packet):
        theirs = got.tensors()
        return replace(out, **{k: v.index_copy(0, index, theirs[k]) for k, v in out.tensors().items()})
    return out.index_copy(0, index, got)
