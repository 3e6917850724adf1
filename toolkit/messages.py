"""What crosses the Wire: a tensor or a :class:`Packet` (several tensors as one message), and the
transcript's entries: :class:`Transfer` (one tensor as its receiver got it) and the
:class:`Record` the :class:`~toolkit.wire.Wire` stores per send (one for a stacked send of many
parties' rows, expanded into their transfers when read).

Example:
    >>> r = Record(0, ("client:0", "client:1"), "server", "update", torch.ones(2, 3), "train")
    >>> [t.sender for t in r.expand()], r.expand().__next__().nbytes
    (['client:0', 'client:1'], 12)
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from typing import Union

import torch  # noqa: F401  (the docstring example uses it)
from torch import Tensor

__all__ = ["Names", "Packet", "Payload", "Transfer", "Record"]

Names = Union[str, tuple[str, ...]]


class Packet:
    """Several tensors that cross the wire together as one message, e.g. a sparse update.

    Subclasses are dataclasses. Tensor fields are what travels (and is counted: ``nbytes``);
    other fields are metadata both sides already know (shapes, settings). In a stacked send
    every tensor field has one row per party.
    """

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)  # type: ignore[arg-type]
                if isinstance(getattr(self, f.name), Tensor)}

    def map(self, fn: Callable[[Tensor], Tensor]) -> Packet:
        """The same packet with ``fn`` applied to every tensor field."""
        return replace(self, **{k: fn(v) for k, v in self.tensors().items()})  # type: ignore[type-var]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors().values())

    def __len__(self) -> int:
        return len(next(iter(self.tensors().values())))

    def __getitem__(self, i) -> Packet:
        return self.map(lambda t: t[i])

    def detach(self) -> Packet:
        return self.map(Tensor.detach)

    def clone(self) -> Packet:
        return self.map(Tensor.clone)

    def describe(self) -> str:
        parts = ", ".join(f"{k} {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}"
                          for k, v in self.tensors().items())
        return f"{type(self).__name__}({parts})"


Payload = Union[Tensor, Packet]


@dataclass(frozen=True, slots=True, repr=False)
class Transfer:
    """One tensor that crossed the wire, as its receiver got it (after the wire's transforms)."""

    step: int       # protocol step (batch or round) when it was sent
    sender: str
    receiver: str
    kind: str       # "activations", "gradients", "labels", "weights", "update", ...
    tensor: Payload  # detached copy of what crossed (a tensor, or a Packet of tensors)
    phase: str = "train"  # "train" or "eval"

    @property
    def nbytes(self) -> int:
        return self.tensor.nbytes

    def __repr__(self) -> str:
        if isinstance(self.tensor, Packet):
            what = self.tensor.describe()
        else:
            what = f"{tuple(self.tensor.shape)} {str(self.tensor.dtype).removeprefix('torch.')}"
        return (f"Transfer(step={self.step}, {self.sender} -> {self.receiver}, {self.kind} "
                f"{what}, {self.nbytes:,} B{', ' + self.phase if self.phase != 'train' else ''})")


@dataclass(frozen=True, slots=True)
class Record:
    """A transcript entry as the Wire stores it; ``sender``/``receiver`` may be tuples for a stacked
    send (``expand`` gives its :class:`Transfer` rows)."""

    step: int
    sender: Names
    receiver: Names
    kind: str
    tensor: Payload
    phase: str
    broadcast: bool = False  # one tensor, every receiver got all of it

    def expand(self) -> Iterator[Transfer]:
        if isinstance(self.sender, str) and isinstance(self.receiver, str):
            yield Transfer(self.step, self.sender, self.receiver, self.kind, self.tensor, self.phase)
            return
        if self.broadcast:
            for r in self.receiver:
                yield Transfer(self.step, self.sender, r, self.kind, self.tensor, self.phase)  # type: ignore[arg-type]
            return
        n = len(self.tensor)
        senders = (self.sender,) * n if isinstance(self.sender, str) else self.sender
        receivers = (self.receiver,) * n if isinstance(self.receiver, str) else self.receiver
        for i, (s, r) in enumerate(zip(senders, receivers)):
            yield Transfer(self.step, s, r, self.kind, self.tensor[i], self.phase)
