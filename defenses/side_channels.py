"""Side channels of an aggregation: the order and the times at which the clients' messages reach the
server, and a wrapper that hides both.

Secure aggregation hides the values of the clients' updates, not when they arrive. The federated
engine hands a :class:`~toolkit.federated.wire_aggregation.WireAggregator` the uploads in the order
they would reach the server (sorted by ``uploads.times``, the simulated finish times: the round's
delays, or each client's sample count when the run has none), and every message of the protocol
goes over the Wire in that order: the server's transcript (``wire.observed(by="server")``) lists
the clients fastest first. Arrival times and order correlate with what a client holds (more data:
longer local training; a slow device), and a server that links them across rounds can single out a
client or follow it (Kairouz et al., "Advances and open problems in federated learning", 2021,
section 4.4: the timing side channel; Bonawitz et al., "Towards federated learning at scale:
system design", MLSys 2019, the reporting window).

:class:`Shuffled` is the mitigation the issue asks for: before the inner aggregation runs, the
uploads are permuted uniformly at random (one ``randperm`` from ``uploads.generator``) and every
upload is held back until the round's deadline, ``max(times) * (1 + jitter * U)`` with ``U`` uniform
in [0, 1) drawn from the same generator (a random delay in the simulation clock, so the deadline
does not give away the slowest client's time either). The inner aggregation therefore sees every
client arrive at the same time, in an order independent of the clients' times (tested: over 200
rounds each client's position is uniform, chi-square and Kendall's tau). The realized deadline and
waits are history columns: ``shuffle_deadline``, ``shuffle_delay`` (the deadline minus the slowest
client's time: what the round takes longer), ``shuffle_wait_mean`` and ``shuffle_wait_max`` (the
clients' waits). The engine's clock advances by the slowest client's time; add ``shuffle_delay`` to
compare wall-clock rounds.

What it does not hide: who took part (the senders' names are on every message) and anything the
inner protocol itself reveals. Shuffling is what a mixing relay or a trusted shuffler provides in a
deployment; here the simulation plays that role (the clients' side of the Wire).

Example:
    >>> from toolkit.federated.wire_aggregation import PlainSum, Uploads
    >>> from toolkit.wire import Wire
    >>> g = torch.Generator().manual_seed(0)
    >>> uploads = Uploads(torch.eye(4), ("a", "b", "c", "d"), torch.ones(4, dtype=torch.float64),
    ...                   torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64), 1, g)
    >>> wire = Wire()
    >>> result = Shuffled(PlainSum(), jitter=0.5).over_wire(wire, uploads)
    >>> [t.sender for t in wire.observed(by="server")], round(result.report["shuffle_deadline"], 3)
    (['a', 'b', 'd', 'c'], 4.112)
"""
from __future__ import annotations

from typing import Any

import torch

from toolkit.federated.wire_aggregation import Aggregate, Uploads, WireAggregator
from toolkit.validate import non_negative
from toolkit.wire import Wire

__all__ = ["Shuffled", "equalized"]


def equalized(uploads: Uploads, jitter: float) -> tuple[Uploads, float]:
    """``uploads`` in a uniformly random order, every one arriving at the deadline
    ``max(times) * (1 + jitter * U)``; returns them and the deadline. Draws one permutation and one
    uniform from ``uploads.generator``."""
    g = uploads.generator
    perm = torch.randperm(len(uploads.names), generator=g)
    u = float(torch.rand((), generator=g, dtype=torch.float64))
    latest = float(uploads.times.max()) if len(uploads.names) else 0.0
    deadline = latest + jitter * max(latest, 0.0) * u
    shuffled = uploads.subset(perm)
    shuffled.times = torch.full_like(shuffled.times, deadline)
    return shuffled, deadline


class Shuffled(WireAggregator):
    """Run ``inner`` on uploads shuffled uniformly and all released at one random deadline (see the
    module docstring).

    Args:
        inner: the aggregation to protect (a WireAggregator: PlainSum, SecureAggregation, ...).
        jitter: the deadline's random delay, as a fraction of the round's latest arrival time
            (>= 0; 0 releases everything at the slowest client's time). Relative, so that it means
            the same whether the times are seconds (the run's delays) or sample counts.
    """

    name = "shuffled"

    def __init__(self, inner: WireAggregator, *, jitter: float = 0.1):
        if not isinstance(inner, WireAggregator):
            raise ValueError(f"Shuffled wraps a WireAggregator (an aggregation that sends its own messages), "
                             f"got {type(inner).__name__}")
        self.inner = inner
        self.jitter = non_negative("jitter", jitter)

    def over_wire(self, wire: Wire, uploads: Uploads) -> Aggregate:
        shuffled, deadline = equalized(uploads, self.jitter)
        result = self.inner.over_wire(wire, shuffled)
        waits = deadline - uploads.times
        report = {**result.report, "shuffle_deadline": deadline,
                  "shuffle_delay": deadline - float(uploads.times.max()),
                  "shuffle_wait_mean": float(waits.mean()), "shuffle_wait_max": float(waits.max())}
        return Aggregate(result.update, result.included, result.bytes_up, result.bytes_down, report)

    def report(self) -> dict[str, Any]:
        return self.inner.report()

    # The engine checkpoints an aggregator with state (e.g. a DP accountant inside): the inner's.
    @property
    def state_dict(self):
        return getattr(self.inner, "state_dict", None)

    @property
    def load_state_dict(self):
        return getattr(self.inner, "load_state_dict", None)

    def attach(self, protocol: Any) -> None:
        """Pass the engine's ``attach`` on to the inner aggregation when it has one."""
        attach = getattr(self.inner, "attach", None)
        if callable(attach):
            attach(protocol)

    def manifest(self) -> dict[str, Any]:
        return {"protocol": self.name, "version": 1, "order": "uniform permutation per round",
                "times": "all at max(times) * (1 + jitter * U(0, 1))", "jitter": self.jitter,
                "inner": self.inner.manifest()}

    def __repr__(self) -> str:
        return f"Shuffled({self.inner!r}, jitter={self.jitter:g})"
