"""The Wire: every tensor that crosses a party boundary goes through it.

``Wire.send`` applies the wire's transforms (defenses such as activation noise), counts the
bytes, delivers the tensor through its transport and records a detached copy of what was
delivered in the transcript, stamped with step, sender, receiver and kind (in-process that is
what was sent; across processes, what arrived in this process). Attacks read only
``wire.observed(by=...)``: exactly what that party received. Ground truth stays with the caller.

A vectorized simulation sends many parties' tensors in one call: pass a tuple of names as
``sender`` (or ``receiver``) and a tensor stacked along dim 0, one row per name. The Wire counts
and records that as ``len(names)`` transfers without a Python loop per party. ``broadcast``
sends one tensor to many receivers (each gets all of it and is counted for all of it).

What crosses is a tensor or a :class:`~toolkit.messages.Packet`: several tensors that travel as
one message (a compressed update: indices and values), counted byte for byte. The message and
transcript types live in :mod:`toolkit.messages` and are importable from here too.

Transforms run on the sender's side before anything is counted: ``transmit`` returns the
transformed tensor inside the sender's autograd graph as well as what is delivered, so a
protocol backpropagating across the boundary differentiates through the transforms.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from typing import Any, Protocol

import pandas as pd
import torch  # noqa: F401  (the docstring examples use it)
from torch import Tensor

from toolkit.messages import Names, Packet, Payload, Record, Transfer  # noqa: F401  (Transfer: re-exported)

Transform = Callable[..., Any]  # transform(tensor, *, kind) -> tensor; ignores kinds it does not handle
# A transform runs on the sender's side, inside its autograd graph: whatever it does (scale, mask,
# clip, reshape) is differentiated on the way back. One with no useful gradient says in its
# docstring what it does backward (e.g. straight-through, see straight_through).


def straight_through(forward: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """Wrap an operation with no useful gradient (rounding, quantization) for use in a wire
    transform: the forward value is ``forward(t)``, the backward pass is the identity
    (the straight-through estimator; Bengio, Léonard, Courville, "Estimating or propagating
    gradients through stochastic neurons", 2013).

    Example:
        >>> t = torch.tensor([0.2, 0.7], requires_grad=True)
        >>> q = straight_through(torch.round)(t)
        >>> q.sum().backward()
        >>> q.tolist(), t.grad.tolist()
        ([0.0, 1.0], [1.0, 1.0])
    """
    def apply(t: Tensor) -> Tensor:
        value = forward(t.detach())
        return t + (value - t).detach() if t.requires_grad else value
    return apply


class Transport(Protocol):
    """Delivers a tensor from one party to another (in-process, or across processes)."""

    def deliver(self, tensor: Payload, *, sender: Names, receiver: Names, kind: str) -> Payload: ...


class InProcess:
    """Default transport: the receiver gets a detached alias (no copy) in the same process."""

    def deliver(self, tensor: Payload, *, sender: Names, receiver: Names, kind: str) -> Payload:
        return tensor.detach()

    def __repr__(self) -> str:
        return "InProcess()"


class Wire:
    """Counts, records and delivers everything that crosses a party boundary.

    Args:
        transforms: callables ``t(tensor, *, kind) -> tensor`` applied in order to every send
            (defenses on the wire); each ignores kinds it does not handle. One with a
            ``report() -> dict`` method (e.g. a DP mechanism's epsilon) has it merged into the
            protocols' history rows (:meth:`reports`).
        record: keep a transcript of detached copies. Bytes are counted either way.
        transport: how tensors reach the receiver; in-process by default.

    Example:
        >>> wire = Wire()
        >>> z = wire.send(torch.ones(4, 3), sender="client", receiver="server", kind="activations")
        >>> wire.observed(by="server")
        [Transfer(step=0, client -> server, activations (4, 3) float32, 48 B)]
        >>> wire.total_bytes
        48
    """

    def __init__(self, transforms: Sequence[Transform] = (), *, record: bool = True,
                 transport: Transport | None = None):
        for t in transforms:
            if not callable(t):
                raise TypeError(f"wire transforms must be callables t(tensor, *, kind), got {t!r}")
        self.transforms = list(transforms)
        self.recording = record
        self.transport = transport if transport is not None else InProcess()
        self.step = 0
        self.phase = "train"
        self.total_bytes = 0
        self._records: list[Record] = []
        self._ledger: dict[tuple[Names, Names, str], list[int]] = {}  # key -> [rows, bytes]

    # -- sending -------------------------------------------------------------------------
    def send(self, tensor: Payload, *, sender: Names, receiver: Names, kind: str) -> Payload:
        """Transform, count, record and deliver ``tensor``; returns what the receiver gets.

        ``sender`` or ``receiver`` may be a tuple of names for a stacked tensor with one row
        per name (a vectorized simulation); both tuples pair rows one to one.
        """
        return self.transmit(tensor, sender=sender, receiver=receiver, kind=kind)[1]

    def transmit(self, tensor: Payload, *, sender: Names, receiver: Names, kind: str) -> tuple[Payload, Payload]:
        """:meth:`send`, also returning the sender's side: ``(sent, delivered)``.

        ``sent`` is the transformed tensor still inside the sender's autograd graph (the sender
        applies the wire's transforms); ``delivered`` is the detached copy the receiver gets. A
        protocol that backpropagates across the boundary continues from ``sent`` with the
        gradient the receiver sends back, so the backward pass goes through every transform
        exactly (scaling, masking, clipping, reshaping).
        """
        for t in self.transforms:
            tensor = t(tensor, kind=kind)
        nbytes = tensor.nbytes
        key = (sender, receiver, kind)
        entry = self._ledger.get(key)
        if entry is None:
            rows = self._check_rows(tensor, sender, receiver)
            self._ledger[key] = [rows, nbytes]
        else:
            if type(sender) is tuple or type(receiver) is tuple:
                rows = self._check_rows(tensor, sender, receiver)
            else:
                rows = 1
            entry[0] += rows
            entry[1] += nbytes
        self.total_bytes += nbytes
        delivered = self.transport.deliver(tensor, sender=sender, receiver=receiver, kind=kind)
        if self.recording:  # what was delivered: across processes, the receiver's copy is the real one
            if (isinstance(delivered, Tensor) and isinstance(sender, str) and type(receiver) is tuple
                    and len(delivered) > 1 and delivered.stride(0) == 0):
                # one row expanded to every receiver (transforms left it alone): record it once
                record = Record(self.step, sender, receiver, kind, delivered[0].detach().clone(), self.phase,
                                 broadcast=True)
            else:
                record = Record(self.step, sender, receiver, kind, delivered.detach().clone(), self.phase)
            self._records.append(record)
        return tensor, delivered

    def broadcast(self, tensor: Payload, *, sender: str, receivers: Sequence[str], kind: str) -> Payload:
        """Send one tensor to every receiver (e.g. global weights); each is counted in full."""
        receivers = tuple(receivers)
        if not isinstance(sender, str) or not receivers or not all(isinstance(r, str) for r in receivers):
            raise TypeError(f"broadcast needs one sender name and a non-empty sequence of receiver names, "
                            f"got {sender!r} and {receivers!r}")
        for t in self.transforms:
            tensor = t(tensor, kind=kind)
        nbytes = tensor.nbytes
        entry = self._ledger.setdefault((sender, receivers, kind), [0, 0])  # counted like a stacked send
        entry[0] += len(receivers)
        entry[1] += nbytes * len(receivers)
        self.total_bytes += nbytes * len(receivers)
        deliver = getattr(self.transport, "deliver_broadcast", None)  # a transport that sends it once per host
        if deliver is not None:
            delivered = deliver(tensor, sender=sender, receivers=receivers, kind=kind)
        else:
            delivered = self.transport.deliver(tensor, sender=sender, receiver=receivers, kind=kind)
        if self.recording:
            self._records.append(Record(self.step, sender, receivers, kind, delivered.detach().clone(),
                                         self.phase, broadcast=True))
        return delivered

    @staticmethod
    def _check_rows(tensor: Payload, sender: Names, receiver: Names) -> int:
        lengths = {len(n) for n in (sender, receiver) if isinstance(n, tuple)}
        if not lengths:
            if not (isinstance(sender, str) and isinstance(receiver, str)):
                raise TypeError(f"sender and receiver must be names (str) or tuples of names, "
                                f"got {sender!r} and {receiver!r}")
            return 1
        if len(lengths) > 1:
            raise ValueError(f"stacked send pairs senders with receivers one to one, got "
                             f"{len(sender)} senders and {len(receiver)} receivers")
        (n,) = lengths
        rows = len(tensor) if isinstance(tensor, Packet) or tensor.dim() > 0 else 0
        if rows != n:
            shape = len(tensor) if isinstance(tensor, Packet) else tuple(tensor.shape)
            raise ValueError(f"stacked send for {n} parties needs a tensor with {n} rows, got {shape}")
        return n

    def reports(self) -> dict[str, Any]:
        """What the transforms with a ``report()`` method report, merged in order (history columns)."""
        out: dict[str, Any] = {}
        for t in self.transforms:
            report = getattr(t, "report", None)
            if callable(report):
                out.update(report())
        return out

    def tick(self) -> int:
        """Advance the step counter (protocols call it once per batch or round)."""
        self.step += 1
        return self.step

    @contextmanager
    def during(self, phase: str) -> Iterator[Wire]:
        """Stamp transfers sent inside the block with ``phase`` (e.g. ``"eval"``)."""
        previous, self.phase = self.phase, phase
        try:
            yield self
        finally:
            self.phase = previous

    # -- reading -------------------------------------------------------------------------
    def observed(self, by: str | None = None, *, kind: str | None = None, sender: str | None = None,
                 phase: str | None = None) -> list[Transfer]:
        """The transcript, filtered: what party ``by`` received (all parties if None)."""
        out = []
        for rec in self._records:
            if kind is not None and rec.kind != kind:
                continue
            if phase is not None and rec.phase != phase:
                continue
            for tr in rec.expand():
                if (by is None or tr.receiver == by) and (sender is None or tr.sender == sender):
                    out.append(tr)
        return out

    def ledger(self) -> pd.DataFrame:
        """Transfers and bytes per (sender, receiver, kind), counted even when not recording."""
        rows: dict[tuple[str, str, str], list[int]] = {}
        for (sender, receiver, kind), (n, nbytes) in self._ledger.items():
            if isinstance(sender, str) and isinstance(receiver, str):
                pairs = [(sender, receiver)]
            else:
                k = len(sender) if isinstance(sender, tuple) else len(receiver)
                senders = sender if isinstance(sender, tuple) else (sender,) * k
                receivers = receiver if isinstance(receiver, tuple) else (receiver,) * k
                pairs = list(zip(senders, receivers))
            share_n, share_b = n // len(pairs), nbytes // len(pairs)
            for s, r in pairs:
                acc = rows.setdefault((s, r, kind), [0, 0])
                acc[0] += share_n
                acc[1] += share_b
        frame = pd.DataFrame([(s, r, k, n, b) for (s, r, k), (n, b) in rows.items()],
                             columns=["sender", "receiver", "kind", "transfers", "bytes"])
        return frame.sort_values(["sender", "receiver", "kind"], ignore_index=True)

    def summary(self) -> pd.DataFrame:
        """Per-party communication: bytes_up (sent by the party) and bytes_down (received)."""
        led = self.ledger()
        up = led.groupby("sender")[["bytes", "transfers"]].sum()
        down = led.groupby("receiver")[["bytes", "transfers"]].sum()
        frame = pd.DataFrame({"bytes_up": up["bytes"], "bytes_down": down["bytes"],
                              "transfers_up": up["transfers"], "transfers_down": down["transfers"]})
        frame = frame.fillna(0).astype("int64")
        frame.index.name = "party"
        return frame.reset_index()

    def __len__(self) -> int:
        """Number of transfers counted so far (a stacked send counts one per row)."""
        return sum(n for n, _ in self._ledger.values())

    def state_dict(self) -> dict:
        """Counters, ledger and transcript, for checkpoints (transforms and transport are not saved)."""
        return {"step": self.step, "phase": self.phase, "total_bytes": self.total_bytes,
                "ledger": [(k, list(v)) for k, v in self._ledger.items()],
                "records": [tuple(getattr(r, f.name) for f in fields(r)) for r in self._records]}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output; every entry is checked before anything changes
        (a ValueError names the first bad one), so a malformed checkpoint leaves the wire as it was."""
        if not isinstance(state, dict) or set(state) != {"step", "phase", "total_bytes", "ledger", "records"}:
            raise ValueError(f"not a wire state: expected keys step, phase, total_bytes, ledger, records, got "
                             f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
        for key in ("step", "total_bytes"):
            if isinstance(state[key], bool) or not isinstance(state[key], int) or state[key] < 0:
                raise ValueError(f"wire state: {key} must be a non-negative int, got {state[key]!r}")
        if not isinstance(state["phase"], str):
            raise ValueError(f"wire state: phase must be a str, got {state['phase']!r}")
        ledger = {}
        for i, entry in enumerate(state["ledger"]):
            ok = isinstance(entry, (tuple, list)) and len(entry) == 2
            key, counts = entry if ok else (None, None)
            ok = ok and isinstance(key, (tuple, list)) and len(key) == 3 and _names(key[0]) and _names(key[1]) \
                and isinstance(key[2], str) and isinstance(counts, (tuple, list)) and len(counts) == 2 \
                and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
            if not ok:
                raise ValueError(f"wire state: ledger entry {i} is not ((sender, receiver, kind), [rows, bytes])")
            ledger[(_as_names(key[0]), _as_names(key[1]), key[2])] = list(counts)
        records = []
        for i, r in enumerate(state["records"]):
            ok = isinstance(r, (tuple, list)) and len(r) == 7
            ok = ok and isinstance(r[0], int) and not isinstance(r[0], bool) and _names(r[1]) and _names(r[2]) \
                and isinstance(r[3], str) and isinstance(r[4], (Tensor, Packet)) and isinstance(r[5], str) \
                and isinstance(r[6], bool)
            if not ok:
                raise ValueError(f"wire state: record {i} is not (step, sender, receiver, kind, tensor or Packet, "
                                 f"phase, broadcast)")
            records.append(Record(r[0], _as_names(r[1]), _as_names(r[2]), *r[3:]))
        self.step, self.phase, self.total_bytes = state["step"], state["phase"], state["total_bytes"]
        self._ledger, self._records = ledger, records

    def reset(self) -> None:
        """Forget the transcript and the counters (the step counter too)."""
        self._records.clear()
        self._ledger.clear()
        self.total_bytes = 0
        self.step = 0

    def __repr__(self) -> str:
        return (f"Wire({len(self)} transfers, {self.total_bytes:,} bytes, "
                f"recording={'on' if self.recording else 'off'}, transforms={self.transforms!r}, "
                f"transport={self.transport!r})")


def _names(n: Any) -> bool:
    return isinstance(n, str) or (isinstance(n, (tuple, list)) and bool(n) and all(isinstance(x, str) for x in n))


def _as_names(n: str | Sequence[str]) -> Names:
    return n if isinstance(n, str) else tuple(n)
