"""Gossip: decentralized SGD, every node training at once and then averaging with its neighbours."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from toolkit.decentralized.base import DecentralizedProtocol, initial_weights
from toolkit.decentralized.discovery import node_name
from toolkit.decentralized.topology import heal, metropolis_hastings

__all__ = ["Gossip", "consensus_distance"]


def consensus_distance(weights: Tensor) -> float:
    """Mean squared distance of the nodes' weights (N, S) to their average,
    ``(1/N) sum_i ||x_i - mean_j x_j||^2``: zero exactly when the nodes agree.

    Example:
        >>> consensus_distance(torch.tensor([[0.0, 0.0], [2.0, 0.0]]))
        1.0
    """
    w = weights.double()
    return float(((w - w.mean(0)) ** 2).sum(1).mean())


class Gossip(DecentralizedProtocol):
    """Decentralized parallel SGD (D-PSGD; Lian et al., "Can decentralized algorithms outperform
    centralized algorithms? A case study for decentralized parallel stochastic gradient descent",
    2017), in its train-then-average form: each round every live node trains on its data
    (all at once, the vectorized executor), sends the shared part of its model to each neighbour
    (one stacked send of kind ``"weights"``, one row per directed link), and replaces it with the
    average ``x_i <- sum_j W_ij x_j`` over itself and what it received, ``W`` the Metropolis-Hastings
    matrix of the current topology (doubly stochastic, so the network average is kept and the
    nodes are drawn to it). Personal layers are neither sent nor averaged. A failed node drops
    out; its neighbours link up (:func:`~toolkit.decentralized.topology.heal`) and ``W`` is
    recomputed.

    Args: see :class:`~toolkit.decentralized.base.DecentralizedProtocol`, and
        independent_init: every node starts from its own initialization (drawn from the config's
            seed) instead of the one model, as peers that never shared a starting point.

    The history adds ``consensus`` (:func:`consensus_distance` of the shared parts after
    averaging); ``test_loss``/``accuracy`` are the means over live nodes of each one's own model,
    and ``self.weights`` is the network average.

    Example:
        >>> from toolkit import data, models
        >>> from toolkit.decentralized import topology
        >>> ds = data.load("loan", n_samples=800)
        >>> g = Gossip(models.tabular_mlp(8, 2), data.partition(ds, 4), topology.ring(4), independent_init=True)
        >>> h = g.fit(rounds=3)
        >>> bool(h.consensus.iloc[-1] < g.initial_consensus)
        True
    """

    name = "gossip"

    def __init__(self, *args: Any, independent_init: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not isinstance(independent_init, bool):
            raise ValueError(f"independent_init must be True or False, got {independent_init!r}")
        if independent_init:
            self.node_weights = initial_weights(self.model, len(self.names), self.generator)
            self.weights = self.node_weights.mean(0)
        self.independent_init = independent_init
        self.initial_consensus = consensus_distance(self.node_weights[:, self.shared])

    def mixing_matrix(self) -> Tensor:
        """The current Metropolis-Hastings matrix over the live nodes (rows in ``self.alive`` order)."""
        return metropolis_hastings(self.topology, self.alive)

    def _round(self, failing: set[int]) -> dict[str, Any]:
        topology = self.topology
        for v in sorted(failing):
            topology = heal(topology, v)
        alive = [v for v in self.alive if v not in failing]
        new, losses = self._train(alive, self.node_weights[alive])  # (M, P) every live node trained
        row = {v: i for i, v in enumerate(alive)}
        src = torch.tensor([row[a] for a, b in topology.edges] + [row[b] for a, b in topology.edges])
        dst = torch.tensor([row[b] for a, b in topology.edges] + [row[a] for a, b in topology.edges])
        shared = new[:, self.shared]  # (M, S)
        senders = tuple(node_name(alive[i]) for i in src.tolist())
        receivers = tuple(node_name(alive[i]) for i in dst.tolist())
        got = self._check_message(self.wire.send(shared[src], sender=senders, receiver=receivers, kind="weights"),
                                  [alive[i] for i in src.tolist()], [alive[i] for i in dst.tolist()])  # (2E, S)
        w = metropolis_hastings(topology, alive).to(new.dtype)  # (M, M)
        mixed = shared * w.diagonal()[:, None]
        mixed.index_add_(0, dst, got * w[dst, src][:, None])  # each node averages what it received
        new[:, self.shared] = mixed
        weights = self.node_weights.clone()
        weights[alive] = new
        self.node_weights, self.topology, self.alive = weights, topology, alive
        self.failed += sorted(failing)
        self.weights = new.mean(0)
        return {"loss": float(losses.mean()), "consensus": consensus_distance(mixed)}

    def _evaluate_model(self) -> dict[str, float]:
        """Mean over live nodes of each one's own model."""
        per_node = self.evaluate_nodes()
        return {k: float(per_node[k].mean()) for k in per_node.columns if k != "node"}

    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "independent_init": self.independent_init}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if state["independent_init"] != self.independent_init:
            raise ValueError(f"the checkpoint was made with independent_init={state['independent_init']!r}, "
                             f"this run has {self.independent_init!r}")
        super()._load_extra_state(state)
