"""The Wire: every tensor that crosses a party boundary goes through it.

``Wire.send`` applies the wire's transforms (defenses such as activation noise), counts the
bytes, records a detached copy in the transcript stamped with step, sender, receiver and kind,
and delivers the tensor through its transport. Attacks read only ``wire.observed(by=...)``:
exactly what that party received. Ground truth stays with the caller.

A vectorized simulation sends many parties' tensors in one call: pass a tuple of names as
``sender`` (or ``receiver``) and a tensor stacked along dim 0, one row per name. The Wire counts
and records that as ``len(names)`` transfers without a Python loop per party.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import pandas as pd
import torch
from torch import Tensor

Names = str | tuple[str, ...]
Transform = Callable[..., Tensor]  # transform(tensor, *, kind) -> tensor; ignores kinds it does not handle


@dataclass(frozen=True, slots=True, repr=False)
class Transfer:
    """One tensor that crossed the wire, as its receiver got it (after the wire's transforms)."""

    step: int       # protocol step (batch or round) when it was sent
    sender: str
    receiver: str
    kind: str       # "activations", "gradients", "labels", "weights", "update", ...
    tensor: Tensor  # detached copy of what crossed
    phase: str = "train"  # "train" or "eval"

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def __repr__(self) -> str:
        shape = tuple(self.tensor.shape)
        dtype = str(self.tensor.dtype).removeprefix("torch.")
        return (f"Transfer(step={self.step}, {self.sender} -> {self.receiver}, {self.kind} "
                f"{shape} {dtype}, {self.nbytes:,} B{', ' + self.phase if self.phase != 'train' else ''})")


@dataclass(frozen=True, slots=True)
class _Record:
    """A transcript entry; ``sender``/``receiver`` may be tuples for a stacked send."""

    step: int
    sender: Names
    receiver: Names
    kind: str
    tensor: Tensor
    phase: str

    def expand(self) -> Iterator[Transfer]:
        if isinstance(self.sender, str) and isinstance(self.receiver, str):
            yield Transfer(self.step, self.sender, self.receiver, self.kind, self.tensor, self.phase)
            return
        n = len(self.tensor)
        senders = (self.sender,) * n if isinstance(self.sender, str) else self.sender
        receivers = (self.receiver,) * n if isinstance(self.receiver, str) else self.receiver
        for s, r, row in zip(senders, receivers, self.tensor):
            yield Transfer(self.step, s, r, self.kind, row, self.phase)


class Transport(Protocol):
    """Delivers a tensor from one party to another (in-process, or across processes)."""

    def deliver(self, tensor: Tensor, *, sender: Names, receiver: Names, kind: str) -> Tensor: ...


class InProcess:
    """Default transport: the receiver gets a detached alias (no copy) in the same process."""

    def deliver(self, tensor: Tensor, *, sender: Names, receiver: Names, kind: str) -> Tensor:
        return tensor.detach()

    def __repr__(self) -> str:
        return "InProcess()"


class Wire:
    """Counts, records and delivers everything that crosses a party boundary.

    Args:
        transforms: callables ``t(tensor, *, kind) -> tensor`` applied in order to every send
            (defenses on the wire); each ignores kinds it does not handle.
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
        self._records: list[_Record] = []
        self._ledger: dict[tuple[Names, Names, str], list[int]] = {}  # key -> [rows, bytes]

    # -- sending -------------------------------------------------------------------------
    def send(self, tensor: Tensor, *, sender: Names, receiver: Names, kind: str) -> Tensor:
        """Transform, count, record and deliver ``tensor``; returns what the receiver gets.

        ``sender`` or ``receiver`` may be a tuple of names for a stacked tensor with one row
        per name (a vectorized simulation); both tuples pair rows one to one.
        """
        for t in self.transforms:
            tensor = t(tensor, kind=kind)
        nbytes = tensor.numel() * tensor.element_size()
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
        if self.recording:
            self._records.append(_Record(self.step, sender, receiver, kind,
                                         tensor.detach().clone(), self.phase))
        return self.transport.deliver(tensor, sender=sender, receiver=receiver, kind=kind)

    @staticmethod
    def _check_rows(tensor: Tensor, sender: Names, receiver: Names) -> int:
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
        if tensor.dim() == 0 or tensor.shape[0] != n:
            raise ValueError(f"stacked send for {n} parties needs a tensor with {n} rows, "
                             f"got shape {tuple(tensor.shape)}")
        return n

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
