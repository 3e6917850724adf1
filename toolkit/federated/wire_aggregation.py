"""Aggregations that run their own messages over the Wire: the hook secure aggregation, homomorphic
aggregation, DP with secure aggregation and cohorts plug into.

A plain :class:`~toolkit.federated.aggregators.Aggregator` receives the updates the engine already
uploaded (kind ``"update"``). A :class:`WireAggregator` replaces that upload: the engine hands it the
training clients' updates on the clients' side (:class:`Uploads`), and it sends whatever its
protocol sends (public keys, encrypted shares, masked inputs, ciphertexts) through the Wire, so
bytes are counted per message and the server's transcript holds only what the protocol lets it
see. It returns the aggregated update the server optimizer steps with (:class:`Aggregate`).

The implementations live in ``defenses`` (``toolkit`` never imports it); :class:`PlainSum` here is
the unprotected baseline with the same interface, the inner aggregation wrappers (cohorts, DP) use
when they wrap no cryptography.

Example:
    >>> from toolkit import data, models
    >>> from toolkit.federated import FederatedAveraging
    >>> fl = FederatedAveraging(models.mlp([64, 16, 10]), data.partition(data.load("digits"), 4),
    ...                         aggregator=PlainSum())
    >>> history = fl.fit(rounds=1)
    >>> int(history["bytes_up"].iloc[0]) == 4 * len(fl.weights) * 4  # four float32 updates
    True
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from toolkit.wire import Wire

__all__ = ["Uploads", "Aggregate", "WireAggregator", "PlainSum", "SERVER", "aggregation_manifest"]

SERVER = "server"


@dataclass
class Uploads:
    """What the engine hands a :class:`WireAggregator` each round, on the clients' side.

    Attributes:
        updates: ``(M, P)`` float, each training client's update (finite: the engine keeps a client
            whose update holds NaN/Inf from taking part, with a warning).
        names: the M clients' names, in the same order.
        weights: ``(M,)`` float64 sample counts (FedAvg's weights).
        times: ``(M,)`` float64 simulated times at which each client's upload would reach the
            server (the round's delays when the protocol has them, else each client's sample
            count: compute time grows with data). The engine hands the uploads over sorted by it
            (arrival order): the order and the times are a side channel, hidden by shuffling.
        round: the 1-based round number (binds commitments and mask streams to the round).
        generator: the protocol's generator, for every random draw (dropouts, noise, cohorts).
    """

    updates: Tensor
    names: tuple[str, ...]
    weights: Tensor
    times: Tensor
    round: int
    generator: torch.Generator

    def __post_init__(self) -> None:
        m = len(self.names)
        if self.updates.dim() != 2 or len(self.updates) != m or self.weights.shape != (m,) or self.times.shape != (m,):
            raise ValueError(f"uploads of {m} clients need updates (M, P), weights (M,) and times (M,), got "
                             f"{tuple(self.updates.shape)}, {tuple(self.weights.shape)}, {tuple(self.times.shape)}")
        if len(set(self.names)) != m:
            dup = sorted({n for n in self.names if self.names.count(n) > 1})
            raise ValueError(f"duplicate client ids {dup}: each client takes part once per round")

    def subset(self, rows: Tensor) -> Uploads:
        """The uploads of the clients at ``rows`` (a 1-D index tensor), in that order."""
        idx = rows.tolist()
        return Uploads(self.updates[rows], tuple(self.names[i] for i in idx), self.weights[rows],
                       self.times[rows], self.round, self.generator)


@dataclass
class Aggregate:
    """A wire aggregation's outcome for one round.

    Attributes:
        update: ``(P,)`` the aggregated update (the weighted mean, or what a DP mechanism releases).
        included: the names of the clients whose update is in it.
        bytes_up: bytes clients sent (to the server or, routed through it, to each other).
        bytes_down: bytes the server (or a key holder) sent to clients.
        report: further history columns for this round (e.g. dropouts per stage, epsilon).
    """

    update: Tensor
    included: tuple[str, ...]
    bytes_up: int
    bytes_down: int
    report: dict[str, Any] = field(default_factory=dict)


class WireAggregator(ABC):
    """An aggregation that sends its own messages over the Wire (see the module docstring).

    Subclasses implement :meth:`over_wire`; :meth:`manifest` gives the auditable record of the
    protocol (name, version, cryptographic and DP parameters) the run's manifest embeds, and
    :meth:`report` the history columns (merged after the round's :attr:`Aggregate.report`).
    """

    name = "wire"

    @abstractmethod
    def over_wire(self, wire: Wire, uploads: Uploads) -> Aggregate:
        """Run one round of the protocol over ``wire`` for ``uploads``; return the aggregate.

        Raises a ValueError naming the client(s) at fault when the round cannot release a sum
        (too few survivors, a failed commitment, a share that does not verify): then nothing is
        released and the engine's weights are unchanged."""

    def __call__(self, updates: Tensor, weights: Tensor | None = None) -> Tensor:
        raise TypeError(f"{type(self).__name__} runs its own messages over the Wire: pass it to a "
                        f"FederatedAveraging as aggregator=, it cannot be called on received updates")

    def manifest(self) -> dict[str, Any]:
        """The protocol's auditable parameters (plain data)."""
        return {"protocol": self.name}

    def report(self) -> dict[str, Any]:
        return {}


class PlainSum(WireAggregator):
    """No protection: each client sends its update in the clear (kind ``"update"``); the server
    takes the weighted mean. The baseline the protected aggregations are compared with, and the
    inner aggregation of wrappers that add no cryptography (e.g. central DP, cohorts)."""

    name = "plain"

    def over_wire(self, wire: Wire, uploads: Uploads) -> Aggregate:
        before = wire.total_bytes
        received = wire.send(uploads.updates, sender=uploads.names, receiver=SERVER, kind="update")
        w = uploads.weights.to(torch.float64)
        update = (w @ received.to(torch.float64) / w.sum()).to(uploads.updates.dtype)
        return Aggregate(update, uploads.names, wire.total_bytes - before, 0)

    def manifest(self) -> dict[str, Any]:
        return {"protocol": self.name, "version": 1}

    def __repr__(self) -> str:
        return "PlainSum()"


def aggregation_manifest(aggregator: Any) -> dict[str, Any]:
    """The aggregation's auditable record for a run's manifest: a wire aggregator's ``manifest()``
    (protocol, version, cryptographic and DP parameters), or a plain aggregator's name."""
    record = getattr(aggregator, "manifest", None)
    return dict(record()) if callable(record) else {"protocol": getattr(aggregator, "name", type(aggregator).__name__)}
