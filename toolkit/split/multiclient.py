"""Several clients on horizontally split data: relay with weight hand-off, and SplitFed.

Each client ``client:k`` has its own copy of the client part and its own data; the server part
is shared (relay, SplitFed v2) or copied per client (SplitFed v1). Every weight hand-off and
every aggregation crosses the Wire with kind ``"weights"``, so what the server or the
fed-server learns from them is in the transcript.
"""
from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict

import pandas as pd
import torch
from torch import nn

from toolkit.parties import Party, flat_state, load_flat_state
from toolkit.progress import progress
from toolkit.split.engine import Pipeline, Segment, Task
from toolkit.split.config import SplitConfig
from toolkit.split.configurations import _defaults, _holdings
from toolkit.split.splitnn import SplitNN
from toolkit.wire import Wire


class _MultiClient(ABC):
    """Shared machinery: one vanilla SplitNN lane per client over a common wire."""

    name = "multi-client"

    def __init__(self, client_part: nn.Module, server_parts: Sequence[nn.Module], datasets: Sequence, *,
                 config: SplitConfig | None, wire: Wire | None):
        if len(datasets) < 2:
            raise ValueError(f"{self.name} needs at least two clients' datasets, got {len(datasets)}")
        for k, ds in enumerate(datasets):
            if len(ds.y_train) == 0:
                raise ValueError(f"client:{k} has no training data")
        self.config, self.wire = _defaults(config, wire)
        self.server = Party("server", optimizer=self.config.make_optimizer())
        self.clients = [Party(f"client:{k}", optimizer=self.config.make_optimizer(),
                              data=_holdings(ds, labels=True)) for k, ds in enumerate(datasets)]
        self.client_parts = [copy.deepcopy(client_part) for _ in datasets]  # identical initial weights
        self.lanes = []
        for k, (client, part) in enumerate(zip(self.clients, self.client_parts)):
            server_part = server_parts[k] if len(server_parts) > 1 else server_parts[0]
            pipe = Pipeline([[Segment(client, part)], [Segment(self.server, server_part)]], self.wire)
            lane_config = SplitConfig(**{**asdict(self.config), "seed": self.config.seed + k})
            self.lanes.append(SplitNN(pipe, [Task("label", owner=client)], config=lane_config,
                                      name=f"{self.name} lane {k}"))
        self.sizes = torch.tensor([lane.n_train for lane in self.lanes], dtype=torch.float64)
        self.epoch = 0
        self.history = pd.DataFrame()

    @abstractmethod
    def _train_epoch(self) -> list[pd.DataFrame]:
        """One epoch of the protocol's schedule; one history frame per client lane."""

    def fit(self, epochs: int = 1, *, show_progress: bool = False, eval_each_epoch: bool = False) -> pd.DataFrame:
        """Train for ``epochs`` rounds over every client's data; one history row per step."""
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {epochs!r}")
        frames = []
        for _ in progress(range(epochs), show=show_progress, desc=self.name):
            frame = pd.concat(self._train_epoch(), ignore_index=True).sort_values("step", ignore_index=True)
            frame["epoch"] = self.epoch
            if eval_each_epoch:
                for key, value in self.evaluate().items():
                    frame.loc[frame.index[-1], f"test_{key}"] = value
            frames.append(frame)
            self.epoch += 1
        history = pd.concat(frames, ignore_index=True)
        self.history = pd.concat([self.history, history], ignore_index=True) if len(self.history) else history
        return history

    def _lane_frame(self, k: int, records: list[tuple]) -> pd.DataFrame:
        frame = self.lanes[k]._frame(records, client=self.clients[k].name)
        self.lanes[k].epoch += 1
        return frame

    def evaluate(self) -> dict[str, float]:
        """Test loss and accuracy of the model the protocol ends with (the evaluating lane)."""
        return self.lanes[self._eval_lane].evaluate()

    _eval_lane = 0

    def _fedavg_clients(self, via: str) -> None:
        """Clients send their client-part weights to ``via``, which averages them by sample count
        and sends the average back (McMahan et al., 2017)."""
        names = tuple(c.name for c in self.clients)
        stacked = torch.stack([flat_state(p) for p in self.client_parts])  # (K, P) one row per client
        got = self.wire.send(stacked, sender=names, receiver=via, kind="weights")
        avg = _weighted_mean(got, self.sizes)  # (P,)
        back = self.wire.send(avg.expand(len(names), -1), sender=via, receiver=names, kind="weights")
        for part, row in zip(self.client_parts, back):
            load_flat_state(part, row)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self.clients)} clients, "
                f"{[lane.n_train for lane in self.lanes]} training samples, config={asdict(self.config)})")


class Relay(_MultiClient):
    """Round-robin split learning with client-weight hand-off (Gupta & Raskar, 2018).

    Clients take turns: client k trains one pass over its data with the server, then hands its
    client-part weights to client k+1, directly (``handoff="peer"``) or through the server
    (``handoff="server"``, which lets the server see them). The last client hands back to the
    first at the next epoch.
    """

    name = "relay"

    def __init__(self, client_part: nn.Module, server_part: nn.Module, datasets: Sequence, *,
                 handoff: str = "peer", config: SplitConfig | None = None, wire: Wire | None = None):
        if handoff not in ("peer", "server"):
            raise ValueError(f"handoff must be 'peer' or 'server', got {handoff!r}")
        self.handoff = handoff
        super().__init__(client_part, [server_part], datasets, config=config, wire=wire)
        self._holder = 0  # the client whose weights are current

    def _hand(self, src: int, dst: int) -> None:
        flat = flat_state(self.client_parts[src])
        a, b = self.clients[src].name, self.clients[dst].name
        if self.handoff == "server":
            flat = self.wire.send(flat, sender=a, receiver="server", kind="weights")
            flat = self.wire.send(flat, sender="server", receiver=b, kind="weights")
        else:
            flat = self.wire.send(flat, sender=a, receiver=b, kind="weights")
        load_flat_state(self.client_parts[dst], flat)

    def _train_epoch(self) -> list[pd.DataFrame]:
        frames = []
        for k in range(len(self.clients)):
            if k != self._holder:
                self._hand(self._holder, k)
            frames.append(self._lane_frame(k, list(self.lanes[k].steps())))
            self._holder = k
        return frames

    @property
    def _eval_lane(self) -> int:  # type: ignore[override]
        return self._holder


class SplitFed(_MultiClient):
    """SplitFed (Thapa, Chamikara, Camtepe, Sun, "SplitFed: when federated learning meets split
    learning", 2022).

    ``version=1``: clients train in parallel, each with its own copy of the server part; after
    every epoch the fed-server averages the client parts (weights cross the wire) and the server
    averages its copies. ``version=2``: one server part, updated by the clients one after another
    in a random order each epoch; the client parts are averaged as in v1.
    """

    name = "splitfed"

    def __init__(self, client_part: nn.Module, server_part: nn.Module, datasets: Sequence, *,
                 version: int = 1, aggregator: str = "fedserver", config: SplitConfig | None = None,
                 wire: Wire | None = None):
        if version not in (1, 2):
            raise ValueError(f"SplitFed version must be 1 or 2, got {version!r}")
        if aggregator.startswith("client:"):
            raise ValueError(f"the aggregator must not be a client, got {aggregator!r}")
        self.version, self.aggregator = version, aggregator
        server_parts = ([copy.deepcopy(server_part) for _ in datasets] if version == 1 else [server_part])
        super().__init__(client_part, server_parts, datasets, config=config, wire=wire)
        self.server_parts = server_parts
        self._order = torch.Generator().manual_seed(self.config.seed)

    def _train_epoch(self) -> list[pd.DataFrame]:
        if self.version == 1:
            running = {k: self.lanes[k].steps() for k in range(len(self.lanes))}
            records: dict[int, list[tuple]] = {k: [] for k in running}
            while running:  # clients in parallel: one step each, in turn
                for k in list(running):
                    try:
                        records[k].append(next(running[k]))
                    except StopIteration:
                        del running[k]
            frames = [self._lane_frame(k, recs) for k, recs in records.items()]
            self._average_server_copies()
        else:
            order = torch.randperm(len(self.lanes), generator=self._order).tolist()
            frames = [self._lane_frame(k, list(self.lanes[k].steps())) for k in order]
        self._fedavg_clients(self.aggregator)
        return frames

    def _average_server_copies(self) -> None:
        """The server averages its per-client copies locally (nothing crosses the wire)."""
        avg = _weighted_mean(torch.stack([flat_state(p) for p in self.server_parts]), self.sizes)
        for part in self.server_parts:
            load_flat_state(part, avg)


def _weighted_mean(stacked: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Row average of ``stacked`` (K, P) weighted by sample counts ``sizes`` (K,), in float64."""
    weights = sizes.double() / sizes.sum()
    return (stacked.double() * weights[:, None]).sum(0).to(stacked.dtype)
