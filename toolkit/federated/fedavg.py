"""Synchronous federated learning: FedAvg and its family (FedProx, FedAvgM, FedAdam)."""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from toolkit.federated.base import FederatedProtocol, _finite_rows
from toolkit.federated.privacy import LocalDPAccountant
from toolkit.federated.server import make_server_optimizer
from toolkit.federated.wire_aggregation import Uploads, WireAggregator
from toolkit.progress import progress
from toolkit.validate import non_negative


class FederatedAveraging(FederatedProtocol):
    """FedAvg (McMahan et al., "Communication-efficient learning of deep networks from
    decentralized data", 2017), with the FedConfig switches for FedProx (``mu``), FedAvgM and
    FedAdam (``server_optimizer``), robust aggregators, compression and malicious clients.

    Each round: sample clients, send them the global weights (kind ``"weights"``), let the ones
    that do not drop out train locally from the weights the Wire delivered to them, receive their
    updates (kind ``"update"``: new weights minus the weights that client received), aggregate
    (weighted by sample counts), step the server optimizer from the server's own weights, evaluate.
    A transform on the download thus changes what clients train from, not the server's copy.

    Args: see :class:`toolkit.federated.base.FederatedProtocol`; ``delays`` optionally gives
    each round a simulated duration (the slowest training client's delay) in column ``time``;
    ``monitors`` are callables ``fn(protocol, plan) -> dict`` called after every round, whose
    columns join that round's history row (e.g. :class:`~toolkit.federated.privacy.LocalDPAccountant`'s epsilon, attached by itself to a run
    with per-sample DP), and an
    aggregator with a ``report() -> dict`` method is read the same way (``defenses.DPFedAvg``).
    An aggregator or monitor with an ``attach(protocol)`` method is shown the protocol once, here,
    and may refuse it with a ValueError (e.g. an accountant built for another cohort).

    Example:
        >>> from toolkit import data, models
        >>> ds = data.load("digits")
        >>> fl = FederatedAveraging(models.mlp([64, 128, 10]), data.partition(ds, 10))
        >>> history = fl.fit(rounds=2)
        >>> list(history.columns[:4])
        ['round', 'loss', 'test_loss', 'accuracy']
    """

    name = "fedavg"
    wire_aggregation = True

    def __init__(self, *args: Any, delays: Any = None, monitors: Sequence[Callable[..., Any]] = (), **kwargs: Any):
        super().__init__(*args, **kwargs)
        for m in monitors:
            if not callable(m):
                raise ValueError(f"a monitor must be callable as fn(protocol, plan) -> dict, got {m!r}")
        monitors = list(monitors)
        if self.config.per_sample_dp and not any(isinstance(m, LocalDPAccountant) for m in monitors):
            monitors.append(LocalDPAccountant())  # every DP run reports its epsilon
        for part in (self.aggregator, *monitors):
            if callable(getattr(part, "attach", None)):
                part.attach(self)
        self.monitors = monitors
        self.server_optimizer = make_server_optimizer(self.config)
        self.delays = delays
        self.clock = 0.0
        self._updates: Tensor | None = None  # (sampled, P) reused every round: big fresh buffers page-fault

    def fit(self, rounds: int = 1, *, show_progress: bool = False) -> pd.DataFrame:
        """Run ``rounds`` rounds; returns one history row per round (also kept in ``self.history``)."""
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds must be a positive int, got {rounds!r}")
        rows = [self._round() for _ in progress(range(rounds), show=show_progress, desc=type(self).__name__)]
        return self._record(rows)

    def _round(self) -> dict[str, Any]:
        start = time.perf_counter()
        self.wire.tick()
        plan = self._plan()
        received_weights, bytes_down = self._download(self.weights, plan)
        loss, rejected, bytes_up = float("nan"), 0, 0
        if len(plan.clients):
            m = len(plan.clients)
            if self._updates is None or len(self._updates) < m:
                self._updates = torch.empty(max(m, plan.sampled), len(self.weights), dtype=self.weights.dtype)
            updates, losses = self._local_train(received_weights, plan, out=self._updates[:m])
            loss = float(losses.mean())
            if isinstance(self.aggregator, WireAggregator):
                durations = self.delays.draw(plan.clients, self.generator) if self.delays is not None else None
                kept, bytes_up, extra = self._wire_aggregate(updates, plan.clients, durations)
                bytes_down += extra
                rejected = len(plan.clients) - len(kept)
                if durations is not None:  # a shuffled round waits past the slowest client until its deadline
                    self.clock += float(durations.max()) + float(self._wire_report.get("shuffle_delay", 0.0))
            else:
                received, kept, bytes_up = self._upload(updates, plan.clients)
                rejected = len(plan.clients) - len(kept)
                if len(kept):
                    weights = self.data.counts[kept].double()
                    self.weights = self.server_optimizer.step(self.weights, self.aggregator(received, weights))
                if self.delays is not None:
                    self.clock += float(self.delays.draw(plan.clients, self.generator).max())
        self.round += 1
        row: dict[str, Any] = {"round": self.round, "loss": loss}
        if self.round % self.config.eval_every == 0:
            row.update(self.evaluate())
        row.update({"bytes_up": bytes_up, "bytes_down": bytes_down, "sampled": plan.sampled,
                    "clients": len(plan.clients), "dropped": len(plan.dropped), "rejected": rejected,
                    "time": self.clock if self.delays is not None else float("nan")})
        row.update(self._reports(plan))
        row["seconds"] = time.perf_counter() - start
        return row

    def _wire_aggregate(self, updates: Tensor, clients: Tensor, durations: Tensor | None) -> tuple[Tensor, int, int]:
        """Aggregate with a :class:`WireAggregator` (it sends its own messages, clients in the order
        their uploads reach the server: ``Uploads.times``); returns (the clients
        whose update is in the aggregate, bytes up, bytes down). A client whose update holds NaN/Inf
        does not take part (with a warning): it could not encode it."""
        finite = _finite_rows(updates)
        if not bool(finite.all()):
            bad = clients[~finite].tolist()
            warnings.warn(f"round {self.round + 1}: clients {[self.data.names[i] for i in bad]} hold non-finite "
                          f"(NaN/Inf) updates and do not take part", RuntimeWarning, stacklevel=4)
            updates, clients = updates[finite], clients[finite]
            durations = durations[finite] if durations is not None else None
        if not len(clients):
            self._wire_report = {}
            return clients, 0, 0
        times = durations if durations is not None else self.data.counts[clients]
        uploads = Uploads(updates, tuple(self.data.names[i] for i in clients.tolist()),
                          self.data.counts[clients].double(), times.double(), self.round + 1, self.generator)
        # Messages reach the server in the order they finish (a side channel a shuffling wrapper hides)
        uploads = uploads.subset(torch.argsort(uploads.times, stable=True))
        result = self.aggregator.over_wire(self.wire, uploads)
        index = {name: i for i, name in enumerate(self.data.names)}
        kept = torch.tensor([index[n] for n in result.included], dtype=torch.long)
        if len(kept):
            self.weights = self.server_optimizer.step(self.weights, result.update.to(self.weights.dtype))
        self._wire_report = dict(result.report)
        return kept, result.bytes_up, result.bytes_down

    def _reports(self, plan: Any) -> dict[str, Any]:
        row = super()._reports(plan)
        if isinstance(self.aggregator, WireAggregator):
            row = {**getattr(self, "_wire_report", {}), **row}
        return row

    def _extra_state(self) -> dict[str, Any]:
        return {"server_optimizer": self.server_optimizer.state_dict(), "clock": self.clock}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.server_optimizer.load_state_dict(state["server_optimizer"])
        self._check_like_weights("server optimizer state", state["server_optimizer"])
        self.clock = non_negative("the checkpoint's clock", state["clock"])
