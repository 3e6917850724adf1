"""What every decentralized protocol shares: peers on a topology found through the discovery
server, each with its own copy of the model, sending one another the shared part of it over the
Wire (kind ``"weights"``), training locally with the federated executors, failing, and evaluating.

Local training is the federated one (:class:`~toolkit.federated.base.FederatedProtocol`'s
``_local_train``: the configured executor, sequential or vectorized, over the round plan's batches
of each node's data); node ``i`` trains on the ``i``-th dataset, its party name is ``"node:i"``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import networkx as nx
import pandas as pd
import torch
from torch import Tensor, nn

from toolkit.decentralized.discovery import DiscoveryServer, node_name
from toolkit.decentralized.topology import check_node, check_topology
from toolkit.federated.base import FederatedProtocol
from toolkit.federated.config import FedConfig
from toolkit.parties import flat_state, load_flat_state
from toolkit.progress import progress
from toolkit.validate import non_negative, positive_int

__all__ = ["DecentralizedProtocol", "shared_mask"]


def shared_mask(model: nn.Module, personal: Sequence[str] = ()) -> Tensor:
    """(P,) bool over :func:`~toolkit.parties.flat_state`'s layout: True where a value is shared
    (sent to peers), False for the ``personal`` layers a node keeps (names or name prefixes of
    parameters and buffers, e.g. ``"fc3"``; Arivazhagan et al., "Federated learning with
    personalization layers", 2019).

    Example:
        >>> from toolkit import models
        >>> mask = shared_mask(models.mlp([8, 4, 2]), ["fc2"])
        >>> int(mask.sum()), len(mask)
        (36, 46)
    """
    if isinstance(personal, str):
        personal = [personal]
    named = [(n, t) for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_floating_point()]
    hits = {p: False for p in personal}
    mask = []
    for name, t in named:
        mine = [p for p in personal if name == p or name.startswith(p + ".")]
        for p in mine:
            hits[p] = True
        mask.append(torch.full((t.numel(),), not mine, dtype=torch.bool))
    unknown = [p for p, hit in hits.items() if not hit]
    if unknown:
        layers = sorted({n.rsplit(".", 1)[0] for n, _ in named})
        raise ValueError(f"personal layer(s) {unknown} are not in the model; its layers are {layers}")
    out = torch.cat(mask) if mask else torch.zeros(0, dtype=torch.bool)
    if not bool(out.any()):
        raise ValueError(f"personal={list(personal)} keeps every layer local: nothing would be shared")
    return out


class DecentralizedProtocol(FederatedProtocol):
    """Base of :class:`RingTraining`, :class:`ParallelRing` and :class:`Gossip` (see those).

    At construction every node registers with a :class:`DiscoveryServer` (in id order) on the
    protocol's wire; the protocol then runs on the topology and initiator the broadcast delivered.

    Args:
        model: the model every node starts from (its weights; each node then keeps its own copy).
        nodes: one dataset per node (node ``i`` holds ``nodes[i]``), e.g. ``data.partition(ds, n)``.
        topology: a networkx graph on ids ``0..len(nodes)-1`` (:mod:`toolkit.decentralized.topology`).
        test: the held-out split every node evaluates on (default: the first node's test split).
        config: a :class:`~toolkit.federated.FedConfig` for local training (local_epochs, batch_size,
            lr, momentum, weight_decay, mu, loss, executor, seed, record); the server-side fields
            (fraction, dropout, server optimizer) have no meaning here and must keep their defaults.
        wire: the Wire every message crosses.
        personal: layers each node keeps to itself (never sent): see :func:`shared_mask`.
        initiator: the node that starts (default: the first to register, node 0).
        malicious: node id -> callable rewriting that node's local updates (as in FedAvg).
    """

    name = "decentralized"
    consults_liveness = False  # whether fit(liveness=...) is asked at each turn (RingTraining: True)

    def __init__(self, model: nn.Module, nodes: Sequence, topology: nx.Graph, *, test: Any = None,
                 config: FedConfig | None = None, wire: Any = None, personal: Sequence[str] = (),
                 initiator: int | None = None, malicious: Mapping[int, Any] | None = None):
        topology = check_topology(topology)
        if len(nodes) != topology.number_of_nodes():
            raise ValueError(f"the topology has {topology.number_of_nodes()} nodes but {len(nodes)} datasets were "
                             f"given: one dataset per node")
        super().__init__(model, nodes, test=test, config=config, wire=wire, malicious=malicious)
        _check_config(self.config)
        self.names = tuple(node_name(v) for v in range(len(nodes)))
        self.discovery = DiscoveryServer(topology, wire=self.wire, initiator=initiator)
        for v in range(len(nodes)):
            self.discovery.register(v)
        self.topology, self.initiator = self.discovery.view(self.discovery.registered[0])
        self.shared = shared_mask(model, personal)  # (P,) True where values are sent to peers
        self.personal = tuple([personal] if isinstance(personal, str) else personal)
        self.node_weights = self.weights.expand(len(nodes), len(self.weights)).clone()  # (N, P) each node's model
        self.alive = list(range(len(nodes)))
        self.failed: list[int] = []  # in the order they failed
        self._alive_at: Any = None  # fit's liveness callable while it runs

    # -- the loop ----------------------------------------------------------------------------
    def fit(self, rounds: int = 1, *, failures: Mapping[int, int] | None = None, patience: int | None = None,
            tol: float = 0.0, show_progress: bool = False,
            liveness: Callable[[int, int], bool] | None = None) -> pd.DataFrame:
        """Run up to ``rounds`` rounds; returns one history row per round (also in ``self.history``).

        Args:
            rounds: the round budget.
            failures: node id -> the round (counted from 1 over the protocol's life) from which that
                node stops answering: its peers skip it and the topology re-forms around it
                (:func:`~toolkit.decentralized.topology.heal`).
            patience: stop early once ``test_loss`` has not improved on its best by more than ``tol``
                (relative) for this many rounds (None: use the whole budget).
            tol: the relative improvement that counts, e.g. 0.001.
            liveness: ``(round, node) -> bool``, asked at each live node's turn (RingTraining): False
                makes the node fail there, exactly as a ``failures`` entry for that round would;
                :class:`toolkit.distributed.ring.StoreLiveness` agrees it across processes. It may
                raise to abort the round (nothing of the round is committed).
        """
        rounds = positive_int("rounds", rounds)
        if liveness is not None and not callable(liveness):
            raise ValueError(f"liveness must be a callable (round, node) -> bool, got {liveness!r}")
        if liveness is not None and not self.consults_liveness:
            raise ValueError(f"{type(self).__name__} does not consult liveness (RingTraining does): "
                             f"schedule its failures with failures=...")
        self._alive_at = liveness
        schedule = self._check_failures(failures or {})
        if patience is not None:
            patience = positive_int("patience", patience)
            if self.config.eval_every != 1:
                raise ValueError(f"patience needs test_loss every round: eval_every is {self.config.eval_every}")
        tol = non_negative("tol", tol)
        rows: list[dict[str, Any]] = []
        best, since = float("inf"), 0
        for _ in progress(range(rounds), show=show_progress, desc=type(self).__name__):
            failing = {v for v, r in schedule.items() if r <= self.round + 1 and v in self.alive}
            before, live = self.wire.total_bytes, len(self.alive)
            self.wire.tick()
            row = self._round(failing)
            self.round += 1
            row = {"round": self.round, "epoch": self.round * self.config.local_epochs, **row}
            if self.round % self.config.eval_every == 0:
                row.update(self._evaluate_model())
            row.update({"bytes": self.wire.total_bytes - before, "nodes": len(self.alive),
                        "failed": live - len(self.alive), **self._reports(None)})
            rows.append(row)
            if patience is not None:
                loss = row["test_loss"]
                best, since = (loss, 0) if loss < best * (1 - tol) else (best, since + 1)
                if since >= patience:
                    break
        return self._record(rows)

    def _fails(self, node: int, failing: set[int]) -> bool:
        """Whether ``node`` fails at its turn in the coming round: scheduled, or its liveness says so."""
        if node in failing:
            return True
        if self._alive_at is None:
            return False
        answer = self._alive_at(self.round + 1, node)
        if not isinstance(answer, bool):
            raise ValueError(f"liveness({self.round + 1}, {node}) returned {answer!r}, not True or False")
        return not answer

    def _round(self, failing: set[int]) -> dict[str, Any]:
        """One round, with the nodes in ``failing`` failing in it; commits its state only at the end.
        Returns the round's columns (at least ``loss``)."""
        raise NotImplementedError  # each protocol defines its round

    def _evaluate_model(self) -> dict[str, float]:
        """The history's test columns: the protocol's reference model (``self.weights``)."""
        return self.evaluate()

    def _check_failures(self, failures: Mapping[int, int]) -> dict[int, int]:
        if not isinstance(failures, Mapping):
            raise ValueError(f"failures maps node id -> round, got {type(failures).__name__}")
        out = {}
        for v, r in failures.items():
            check_node(self.discovery.topology, v, "failing node")
            out[v] = positive_int(f"the failure round of node:{v}", r)
            if v not in self.alive:
                raise ValueError(f"node:{v} has already failed")
        if len(set(self.alive) - set(out)) < 2:
            raise ValueError(f"failures {dict(failures)} would leave fewer than two live nodes")
        return out

    # -- messages ----------------------------------------------------------------------------
    def _send(self, values: Tensor, src: int, dst: int, topology: nx.Graph) -> Tensor:
        """Node ``src`` sends shared values (S,) to ``dst``: directly over their link, else relayed
        hop by hop along the shortest path in ``topology`` (each relay receives it and sends it on).
        Returns what ``dst`` received, checked at every hop."""
        path = nx.shortest_path(topology, src, dst)
        for a, b in zip(path, path[1:]):
            values = self._check_message(self.wire.send(values, sender=node_name(a), receiver=node_name(b),
                                                        kind="weights"), (a,), (b,))[0]
        return values

    def _check_message(self, got: Any, senders: Sequence[int], receivers: Sequence[int]) -> Tensor:
        """``got`` as (len(senders), S) if it is what the model's shared part can take; a ValueError
        naming the sender and the receiver otherwise (nothing is changed)."""
        s, m = int(self.shared.sum()), len(senders)
        who = (f"{node_name(receivers[0])} received from {node_name(senders[0])}" if m == 1
               else f"the messages {node_name(senders[0])} -> {node_name(receivers[0])} ... ({m})")
        if not isinstance(got, Tensor) or not got.is_floating_point() or got.shape not in ((s,), (m, s)) or (
                got.dim() == 1 and m != 1):
            shape = tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__
            raise ValueError(f"{who} a message of shape {shape} that does not fit the model: its shared part "
                             f"is {s} floating values per message")
        rows = got.reshape(m, s)
        bad = (~torch.isfinite(rows).all(1)).nonzero().flatten()
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"{node_name(receivers[i])} received from {node_name(senders[i])} weights holding "
                             f"NaN or Inf: refused")
        return rows

    def _with_shared(self, own: Tensor, values: Tensor) -> Tensor:
        """A node's full weights: its own (P,) or (M, P) with the shared entries set to ``values``."""
        out = own.clone()
        out[..., self.shared] = values.to(out.dtype)
        return out

    # -- local training and evaluation -------------------------------------------------------
    def _train(self, nodes: Sequence[int], start: Tensor) -> tuple[Tensor, Tensor]:
        """Local training of ``nodes`` from ``start`` (M, P) at once; returns (new weights (M, P),
        mean training loss per node (M,)), with the federated executors."""
        plan = self._plan(torch.tensor(list(nodes), dtype=torch.long))
        updates, losses = self._local_train(start, plan)
        return start + updates, losses

    def _evaluate_weights(self, weights: Tensor) -> dict[str, float]:
        saved = self.weights
        self.weights = weights
        try:
            return self.evaluate()
        finally:
            self.weights = saved
            load_flat_state(self.model, saved)

    def evaluate_nodes(self) -> pd.DataFrame:
        """Each live node's own model (shared part and personal layers) on the held-out split:
        one row per node (``node``, ``test_loss``, ``accuracy`` for classification)."""
        return pd.DataFrame([{"node": v, **self._evaluate_weights(self.node_weights[v])} for v in self.alive])

    # -- provenance and checkpoints ----------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        out = super().manifest()
        out.update(topology=sorted(map(list, self.topology.edges)), initiator=self.initiator,
                   personal=list(self.personal), failed=list(self.failed))
        return out

    def _extra_state(self) -> dict[str, Any]:
        return {"node_weights": self.node_weights.clone(), "alive": list(self.alive), "failed": list(self.failed),
                "edges": sorted(map(list, self.topology.edges)), "initiator": self.initiator}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        w = state["node_weights"]
        if type(w) is not Tensor or w.shape != self.node_weights.shape or w.dtype != self.node_weights.dtype:
            got = f"shape {tuple(w.shape)} {w.dtype}" if isinstance(w, Tensor) else type(w).__name__
            raise ValueError(f"the checkpoint's node weights have {got}, expected {tuple(self.node_weights.shape)}")
        n = len(self.names)
        alive, failed = state["alive"], state["failed"]
        for what, ids in (("live", alive), ("failed", failed)):
            if type(ids) is not list or not all(type(v) is int and 0 <= v < n for v in ids):
                raise ValueError(f"the checkpoint's {what} nodes must be a list of ids in 0..{n - 1}, got {ids!r}")
        if sorted(alive + failed) != list(range(n)):
            raise ValueError(f"the checkpoint's live {alive} and failed {failed} nodes are not the {n} nodes")
        edges = state["edges"]
        if type(edges) is not list or not all(type(e) is list and len(e) == 2 and set(e) <= set(alive) for e in edges):
            raise ValueError("the checkpoint's edges must be [a, b] pairs of live nodes")
        graph = nx.Graph()
        graph.add_nodes_from((v, self.discovery.topology.nodes[v]) for v in sorted(alive))
        graph.add_edges_from(map(tuple, edges))
        if not nx.is_connected(graph):
            raise ValueError("the checkpoint's topology is disconnected")
        self.initiator = check_node(graph, state["initiator"], "the checkpoint's initiator")
        self.node_weights, self.alive, self.failed, self.topology = w.clone(), list(alive), list(failed), graph

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self.alive)} of {len(self.names)} nodes live, round {self.round}, "
                f"{self.topology.number_of_edges()} links, initiator node:{self.initiator}, "
                f"{int(self.shared.sum())} of {len(self.shared)} values shared)")


def _check_config(config: FedConfig) -> None:
    """Refuse the FedConfig fields a decentralized run has no use for (a server, sampling, dropout)."""
    defaults = FedConfig()
    for name in ("fraction", "dropout", "server_optimizer", "server_lr"):
        if getattr(config, name) != getattr(defaults, name):
            raise ValueError(f"FedConfig.{name}={getattr(config, name)!r} has no meaning in decentralized training "
                             f"(no server samples or aggregates; failures are fit(failures=...)): leave it at "
                             f"{getattr(defaults, name)!r}")


def initial_weights(model: nn.Module, n: int, generator: torch.Generator) -> Tensor:
    """(n, P): ``n`` independent initializations of ``model`` (every module's ``reset_parameters``
    under a torch seed drawn from ``generator``), as peers that start on their own would draw them;
    ``model`` is left as it was."""
    saved = flat_state(model).clone()
    rows = []
    for _ in range(n):
        seed = int(torch.randint(2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for m in model.modules():
                if callable(getattr(m, "reset_parameters", None)):
                    m.reset_parameters()
        rows.append(flat_state(model).clone())
    load_flat_state(model, saved)
    return torch.stack(rows)
