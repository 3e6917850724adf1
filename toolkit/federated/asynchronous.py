"""Asynchronous federated learning with simulated client delays: FedAsync and FedBuff.

Time is simulated: each dispatched client finishes after a delay drawn from a straggler model,
and the server handles arrivals in time order, never waiting for the slowest client. Clients
dispatched together from the same model version train together (vectorized) from the weights
the Wire delivered to them at dispatch; a client's training depends only on those, so it is
computed when first needed.
"""
from __future__ import annotations

import heapq
import math
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from toolkit.federated.base import FederatedProtocol
from toolkit.federated.clients import RoundPlan
from toolkit.federated.server import make_server_optimizer
from toolkit.progress import progress
from toolkit.provenance import from_plain, to_plain
from toolkit.validate import non_negative, non_negative_int


class StragglerDelays:
    """Simulated seconds a client takes to train and answer.

    Each client has a fixed speed: most take ``mean``, a ``slow_fraction`` of them take
    ``slow_factor`` times longer (chosen by ``seed``, the same for every protocol); every task
    adds lognormal jitter with log-std ``sigma``, drawn from the protocol's generator.
    """

    def __init__(self, n_clients: int, *, mean: float = 1.0, sigma: float = 0.3, slow_fraction: float = 0.1,
                 slow_factor: float = 10.0, seed: int = 0):
        if n_clients < 1 or mean <= 0 or sigma < 0 or not 0 <= slow_fraction <= 1 or slow_factor < 1:
            raise ValueError(f"bad delay model: n_clients={n_clients}, mean={mean}, sigma={sigma}, "
                             f"slow_fraction={slow_fraction}, slow_factor={slow_factor}")
        g = torch.Generator().manual_seed(seed)
        slow = torch.rand(n_clients, generator=g, dtype=torch.float64) < slow_fraction
        self.base = torch.where(slow, mean * slow_factor, mean)  # (N,)
        self.sigma = sigma
        self._repr = (f"StragglerDelays({n_clients} clients, mean={mean}, sigma={sigma}, "
                      f"slow_fraction={slow_fraction}, slow_factor={slow_factor}, seed={seed})")

    def draw(self, clients: Tensor, generator: torch.Generator) -> Tensor:
        jitter = torch.randn(len(clients), generator=generator, dtype=torch.float64) * self.sigma
        return self.base[clients] * jitter.exp()

    def __repr__(self) -> str:
        return self._repr


STALENESS: dict[str, Callable[[float, float, float], float]] = {
    "constant": lambda tau, a, b: 1.0,
    "polynomial": lambda tau, a, b: (tau + 1) ** -a,
    "hinge": lambda tau, a, b: 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1),
}


@dataclass
class _Batch:
    """Clients dispatched together from one model version; trained on first need."""

    version: int
    plan: RoundPlan
    start: Tensor  # what the Wire delivered to plan.clients: (P,) shared, or (M, P) one row each
    updates: Tensor | None = None
    losses: Tensor | None = None


@dataclass(order=True)
class _Task:
    finish: float
    seq: int
    client: int = field(compare=False)
    row: int = field(compare=False)
    batch: _Batch = field(compare=False)


class _Asynchronous(FederatedProtocol, ABC):
    """Event loop shared by FedAsync and FedBuff: dispatch, arrive, update, dispatch again."""

    def __init__(self, *args: Any, delays: StragglerDelays | None = None, concurrency: int | None = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.config.per_sample_dp:
            raise ValueError(f"{type(self).__name__} does not account per-sample DP (its clients train at "
                             f"different times, and no accountant follows them): use FederatedAveraging "
                             f"with FedConfig(dp_max_grad_norm=...), which reports every client's epsilon")
        self.delays = delays if delays is not None else StragglerDelays(len(self.data))
        self.concurrency = concurrency or max(1, round(self.config.fraction * len(self.data)))
        if not 1 <= self.concurrency <= len(self.data):
            raise ValueError(f"concurrency must lie in 1..{len(self.data)} (clients), got {self.concurrency}")
        self.clock = 0.0
        self._queue: list[_Task] = []
        self._seq = 0
        self._snapshots: dict[int, list] = {}  # version -> [weights, tasks still out]
        self._since = {"loss": [], "staleness": [], "bytes_up": 0, "bytes_down": 0, "rejected": 0,
                       "dropped": 0, "arrived": 0}

    # -- the event loop ------------------------------------------------------------------------
    def _dispatch(self, n: int) -> None:
        """Start ``n`` idle clients (random) from the current weights; replace drop-outs."""
        for _ in range(100):
            busy = torch.tensor([t.client for t in self._queue], dtype=torch.long)
            idle = torch.ones(len(self.data), dtype=torch.bool)
            idle[busy] = False
            pool = idle.nonzero().flatten()
            n = min(n, len(pool))
            if n == 0:
                return
            chosen = pool[torch.randperm(len(pool), generator=self.generator)[:n]].sort().values
            plan = self._plan(clients=chosen)
            start, nbytes = self._download(self.weights, plan)
            self._since["bytes_down"] += nbytes
            self._since["dropped"] += len(plan.dropped)
            if len(plan.clients):
                self._snapshots.setdefault(self.round, [self.weights, 0])[1] += len(plan.clients)
                batch = _Batch(self.round, plan, start)
                finish = self.clock + self.delays.draw(plan.clients, self.generator)
                for row, (client, t) in enumerate(zip(plan.clients.tolist(), finish.tolist())):
                    heapq.heappush(self._queue, _Task(t, self._seq, client, row, batch))
                    self._seq += 1
            n = len(plan.dropped)
            if n == 0:
                return
        raise RuntimeError("clients keep dropping out: lower config.dropout")

    def _arrive(self) -> None:
        task = heapq.heappop(self._queue)
        self.clock = task.finish
        batch = task.batch
        snapshot = self._snapshots[batch.version]
        start = snapshot[0]
        snapshot[1] -= 1
        if snapshot[1] == 0:
            del self._snapshots[batch.version]
        if batch.updates is None:  # train the whole batch, vectorized, from what it was delivered
            batch.updates, batch.losses = self._local_train(batch.start, batch.plan)
        update = batch.updates[task.row:task.row + 1]
        received, kept, nbytes = self._upload(update, torch.tensor([task.client]))
        self._since["bytes_up"] += nbytes
        self._since["arrived"] += 1
        self._since["loss"].append(float(batch.losses[task.row]))  # type: ignore[index]
        if len(kept):
            staleness = self.round - batch.version
            self._since["staleness"].append(staleness)
            self._apply(received[0], task.client, staleness, start)
        else:
            self._since["rejected"] += 1
        self._dispatch(1)

    @abstractmethod
    def _apply(self, update: Tensor, client: int, staleness: int, start: Tensor) -> None:
        """Fold one arrived update into the server state; advance ``self.round`` when the global
        model changes. ``update`` is relative to the weights the client received; ``start`` is the
        server's own weights at the version the client was dispatched from (before the wire's
        transforms)."""

    def fit(self, rounds: int = 1, *, show_progress: bool = False) -> pd.DataFrame:
        """Run until the server model has advanced ``rounds`` versions; one history row per version."""
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds must be a positive int, got {rounds!r}")
        if not self._queue:
            self.wire.tick()
            self._dispatch(self.concurrency)
        rows = []
        for _ in progress(range(rounds), show=show_progress, desc=type(self).__name__):
            target = self.round + 1
            while self.round < target:
                if not self._queue:
                    raise RuntimeError("no client is training: every dispatched client dropped out")
                self._arrive()
            self.wire.tick()
            rows.append(self._row())
        return self._record(rows)

    def _row(self) -> dict[str, Any]:
        s = self._since
        row: dict[str, Any] = {"round": self.round,
                               "loss": sum(s["loss"]) / len(s["loss"]) if s["loss"] else math.nan}
        if self.round % self.config.eval_every == 0:
            row.update(self.evaluate())
        row.update({"bytes_up": s["bytes_up"], "bytes_down": s["bytes_down"], "clients": s["arrived"],
                    "dropped": s["dropped"], "rejected": s["rejected"],
                    "staleness": sum(s["staleness"]) / len(s["staleness"]) if s["staleness"] else math.nan,
                    "time": self.clock})
        row.update(self.wire.reports())  # wire transforms' (e.g. local DP's epsilon)
        self._since = {"loss": [], "staleness": [], "bytes_up": 0, "bytes_down": 0, "rejected": 0,
                       "dropped": 0, "arrived": 0}
        return row

    # The classes a checkpoint may rebuild, by name (never a class the file names itself).
    _CHECKPOINT_CLASSES: dict[str, type] = {"_Task": _Task, "_Batch": _Batch, "RoundPlan": RoundPlan}

    def _extra_state(self) -> dict[str, Any]:
        # one encoding, so the tasks of one batch (and any other shared object) stay shared
        events = {"clock": self.clock, "queue": self._queue, "seq": self._seq, "snapshots": self._snapshots,
                  "since": self._since}
        return {"events": to_plain(events, self._CHECKPOINT_CLASSES)}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        events = from_plain(state["events"], self._CHECKPOINT_CLASSES, what="the event queue")
        self._check_events(events["queue"], events["snapshots"])
        if type(events["since"]) is not dict or set(events["since"]) != set(self._since):
            raise ValueError(f"the checkpoint's running totals must have the keys {sorted(self._since)}")
        self.clock = non_negative("the checkpoint's clock", events["clock"])
        self._seq = non_negative_int("the checkpoint's task counter", events["seq"])
        self._queue, self._snapshots, self._since = events["queue"], events["snapshots"], events["since"]

    def _check_events(self, queue: Any, snapshots: Any) -> None:
        """Refuse a decoded queue that is not client tasks in time order, each the row of its batch
        that its client trains, or whose versions do not match the snapshots' counts of tasks out."""
        if type(queue) is not list or not all(isinstance(t, _Task) and isinstance(t.batch, _Batch)
                                              and isinstance(t.batch.plan, RoundPlan) for t in queue):
            raise ValueError("the checkpoint's event queue holds something other than client tasks")
        if type(snapshots) is not dict or not all(type(v) is list and len(v) == 2 for v in snapshots.values()):
            raise ValueError("the checkpoint's snapshots must map model versions to [weights, tasks out]")
        self._check_like_weights("snapshot of version", {k: v[0] for k, v in snapshots.items()})
        out, counts = dict(Counter(t.batch.version for t in queue)), {k: v[1] for k, v in snapshots.items()}
        if out != counts:
            raise ValueError(f"the checkpoint's event queue has tasks out per version {out}, its snapshots "
                             f"count {counts}")
        for t in queue:
            if type(t.client) is not int or not 0 <= t.client < len(self.data) or type(t.row) is not int \
                    or not 0 <= t.row < len(t.batch.plan.clients) or int(t.batch.plan.clients[t.row]) != t.client:
                raise ValueError(f"the checkpoint's task {t.seq} (client {t.client!r}, row {t.row!r}) is not a "
                                 f"row of its batch among these {len(self.data)} clients")
        if any(queue[i] < queue[(i - 1) // 2] for i in range(1, len(queue))):
            raise ValueError("the checkpoint's event queue is not in time order")


class FedAsync(_Asynchronous):
    """FedAsync (Xie, Koyejo, Gupta, "Asynchronous federated optimization", 2019).

    Every arrival moves the global model: ``w <- (1 - a_t) w + a_t w_client`` with
    ``a_t = alpha * s(staleness)``, where ``s`` is ``"constant"``, ``"polynomial"``
    (``(tau + 1) ** -a``) or ``"hinge"`` (1 up to ``b``, then ``1 / (a (tau - b) + 1)``).

    ``w_client = start + update``, where ``start`` is the server's own weights at the version the
    client was dispatched from, not the (possibly transformed) weights the client received: the
    client trained from what the Wire delivered, and the server adds what it learned (its update)
    to the copy the server holds, as FedAvg and FedBuff do. A transform on the download (noise,
    quantization) thus changes the clients' training, never the server's model directly.
    """

    name = "fedasync"

    def __init__(self, *args: Any, alpha: float = 0.6, staleness: str = "polynomial", a: float = 0.5,
                 b: float = 4.0, **kwargs: Any):
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
        if staleness not in STALENESS:
            raise ValueError(f"unknown staleness function {staleness!r}; choose one of {sorted(STALENESS)}")
        if a < 0 or b < 0:
            raise ValueError(f"staleness parameters must be non-negative, got a={a}, b={b}")
        self.alpha, self.staleness, self.a, self.b = alpha, staleness, a, b
        super().__init__(*args, **kwargs)

    def _apply(self, update: Tensor, client: int, staleness: int, start: Tensor) -> None:
        mix = self.alpha * STALENESS[self.staleness](staleness, self.a, self.b)
        self.weights = (1 - mix) * self.weights + mix * (start + update)
        self.round += 1


class FedBuff(_Asynchronous):
    """FedBuff (Nguyen et al., "Federated learning with buffered asynchronous aggregation", 2022).

    Arrived updates, scaled by ``1 / sqrt(1 + staleness)``, wait in a buffer; every
    ``buffer_size`` arrivals the server aggregates them (the configured aggregator, weighted by
    sample counts) and steps its optimizer.
    """

    name = "fedbuff"

    def __init__(self, *args: Any, buffer_size: int = 10, **kwargs: Any):
        if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1:
            raise ValueError(f"buffer_size must be a positive int, got {buffer_size!r}")
        self.buffer_size = buffer_size
        super().__init__(*args, **kwargs)
        self.server_optimizer = make_server_optimizer(self.config)
        self._buffer: list[Tensor] = []
        self._buffer_clients: list[int] = []

    def _apply(self, update: Tensor, client: int, staleness: int, start: Tensor) -> None:
        self._buffer.append(update / math.sqrt(1 + staleness))
        self._buffer_clients.append(client)
        if len(self._buffer) == self.buffer_size:
            weights = self.data.counts[self._buffer_clients].double()
            self.weights = self.server_optimizer.step(self.weights, self.aggregator(torch.stack(self._buffer), weights))
            self._buffer, self._buffer_clients = [], []
            self.round += 1

    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "buffer": list(self._buffer), "buffer_clients": list(self._buffer_clients),
                "server_optimizer": self.server_optimizer.state_dict()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        super()._load_extra_state(state)
        buffer, clients = state["buffer"], state["buffer_clients"]
        if type(buffer) is not list or type(clients) is not list or len(buffer) != len(clients) \
                or len(buffer) >= self.buffer_size:
            raise ValueError(f"the checkpoint's update buffer must be two lists of one length below "
                             f"buffer_size={self.buffer_size}")
        if any(type(c) is not int or not 0 <= c < len(self.data) for c in clients):
            raise ValueError(f"the checkpoint's buffered clients {clients} are not all among {len(self.data)} clients")
        self._check_like_weights("buffered update", dict(enumerate(buffer)))
        self._buffer, self._buffer_clients = buffer, clients
        self.server_optimizer.load_state_dict(state["server_optimizer"])
        self._check_like_weights("server optimizer state", state["server_optimizer"])
