"""Ring propagation: one model travels the ring, each node trains it on its data and forwards it
to its successor (sequential), or several segments of the ring train at once and merge (parallel).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import networkx as nx
import torch

from toolkit.decentralized.base import DecentralizedProtocol
from toolkit.decentralized.topology import check_node, heal, ring_order

__all__ = ["ParallelRing", "RingTraining"]


class RingTraining(DecentralizedProtocol):
    """Sequential ring propagation, the FedUp design of issue 13 and cyclical weight transfer
    (Chang et al., "Distributed deep learning networks among institutions for medical imaging",
    2018): each node receives the model from its predecessor (kind ``"weights"``: the shared part
    only, personal layers stay home), trains it on its private data for ``local_epochs``, and
    forwards it to its successor. One round is one trip round the ring, so with one local epoch a
    round is one epoch over the network's data. A node that fails is skipped: its predecessor
    forwards to the next live node and the ring re-forms around it. Failures come from
    ``fit(failures=...)`` or, at each node's turn, from ``fit(liveness=...)`` (what
    :mod:`toolkit.distributed` uses to agree across processes that a peer is gone).

    Args: see :class:`~toolkit.decentralized.base.DecentralizedProtocol`; ``order`` is the ring
    (every node once, consecutive nodes and the last and first linked), by default the cycle of
    a ring topology from the initiator.

    The history's ``test_loss``/``accuracy`` are the circulating model's at the end of each round
    (with the personal layers of the node holding it).

    Example:
        >>> from toolkit import data, models
        >>> from toolkit.decentralized import topology
        >>> ds = data.load("loan", n_samples=600)
        >>> ring = RingTraining(models.tabular_mlp(8, 2), data.partition(ds, 3), topology.ring(3))
        >>> ring.order, list(ring.fit(rounds=2)[["round", "nodes"]].itertuples(index=False, name=None))
        ([0, 1, 2], [(1, 3), (2, 3)])
    """

    name = "ring"
    consults_liveness = True

    def __init__(self, *args: Any, order: Sequence[int] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.order = ring_order(self.topology, self.initiator, order)
        self.holder: int | None = None  # the node holding the circulating model between rounds

    def _round(self, failing: set[int]) -> dict[str, Any]:
        weights = self.node_weights.clone()
        order, topology, alive = list(self.order), self.topology, list(self.alive)
        holder, losses = self.holder, []
        for v in list(order):
            if self._fails(v, failing):  # the model reaches v: it does not answer; the ring re-forms around it
                topology = heal(topology, v, order=order)
                order.remove(v)
                alive.remove(v)
                continue
            if holder is None:  # the initiator's first turn: it starts from its own model
                start = weights[v]
            else:
                start = self._with_shared(weights[v], self._send(weights[holder, self.shared], holder, v, topology))
            new, loss = self._train([v], start[None])
            weights[v], holder = new[0], v
            losses.append(float(loss[0]))
        self.node_weights, self.order, self.topology, self.holder = weights, order, topology, holder
        self.failed += [v for v in self.alive if v not in alive]
        self.alive, self.initiator = alive, order[0]
        self.weights = weights[holder].clone()
        return {"loss": sum(losses) / len(losses)}

    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "order": list(self.order), "holder": self.holder}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        super()._load_extra_state(state)
        order, holder = state["order"], state["holder"]
        if type(order) is not list or sorted(order) != sorted(self.alive):
            raise ValueError(f"the checkpoint's ring order {order!r} is not the live nodes {self.alive}")
        if holder is not None and holder not in self.alive:
            raise ValueError(f"the checkpoint's model holder {holder!r} is not a live node")
        self.order, self.holder = order, holder


class ParallelRing(DecentralizedProtocol):
    """Parallel segments of a ring (the FedUp authors' "several nodes compute in parallel" step):
    each round the merger (the initiator) sends the merged model to the head of every segment, the
    segments train it at once, node after node along each segment as in :class:`RingTraining`, and
    each segment's tail sends its model back to the merger, which averages them weighted by the
    samples each segment trained on (FedAvg's weighting; McMahan et al., 2017). A message between
    nodes that are not linked is relayed along the shortest path (the relays receive it too).

    Args: see :class:`~toolkit.decentralized.base.DecentralizedProtocol`, and
        segments: an int K (the ring order cut into K arcs of near-equal length), ``"rings"`` (one
            segment per ring of a :func:`~toolkit.decentralized.topology.rings_of_rings` or
            :func:`~toolkit.decentralized.topology.semi_centralized` topology, from its bridge or
            hub round the ring), or the segments themselves (lists of node ids, every node in one,
            consecutive nodes linked).
        order: the ring for ``segments=K`` (see :class:`RingTraining`).

    The merger cannot fail (it holds the merged model); any other node can.

    Example:
        >>> from toolkit import data, models
        >>> from toolkit.decentralized import topology
        >>> ds = data.load("loan", n_samples=800)
        >>> par = ParallelRing(models.tabular_mlp(8, 2), data.partition(ds, 4), topology.ring(4), segments=2)
        >>> par.segments, par.fit(rounds=1)["nodes"].tolist()
        ([[0, 1], [2, 3]], [4])
    """

    name = "parallel_ring"

    def __init__(self, *args: Any, segments: int | str | Sequence[Sequence[int]] = 2,
                 order: Sequence[int] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.segments = self._segments(segments, order)
        self.merger = self.initiator

    def _segments(self, segments: Any, order: Sequence[int] | None) -> list[list[int]]:
        g = self.topology
        if isinstance(segments, int) and not isinstance(segments, bool):
            ring = ring_order(g, self.initiator, order)
            if not 1 <= segments <= len(ring):
                raise ValueError(f"segments must be between 1 and the {len(ring)} nodes, got {segments}")
            return [t.tolist() for t in torch.tensor(ring).tensor_split(segments)]
        if segments == "rings":
            rings: dict[int, list[int]] = {}
            for v, k in g.nodes(data="ring"):
                if k is None:
                    raise ValueError(f"segments='rings' needs a ring per node (rings_of_rings, semi_centralized); "
                                     f"node {v} has none")
                rings.setdefault(k, []).append(v)
            out = []
            for k in sorted(rings):
                members = rings[k]
                head = next((v for v in sorted(members) if g.nodes[v].get("role") != "member"), min(members))
                out.append(_ring_segment(g, members, head))
            return out
        if isinstance(segments, str) or not isinstance(segments, Sequence):
            raise ValueError(f"segments must be an int, 'rings' or a list of node lists, got {segments!r}")
        out = [[check_node(g, v, "segment entry") for v in seg] for seg in segments]
        flat = [v for seg in out for v in seg]
        if any(not seg for seg in out) or sorted(flat) != sorted(g):
            raise ValueError(f"the segments must hold every node exactly once, got {out}")
        for seg in out:
            for a, b in zip(seg, seg[1:]):
                if not g.has_edge(a, b):
                    raise ValueError(f"segment {seg} needs a link node:{a} - node:{b}, which the topology lacks")
        return out

    def _check_failures(self, failures):
        out = super()._check_failures(failures)
        if self.merger in out:
            raise ValueError(f"the merger node:{self.merger} holds the merged model and cannot fail in "
                             f"ParallelRing (RingTraining and Gossip let any node fail)")
        return out

    def _round(self, failing: set[int]) -> dict[str, Any]:
        weights, topology = self.node_weights.clone(), self.topology
        for v in sorted(failing):
            topology = heal(topology, v)
        segments = [[v for v in seg if v not in failing] for seg in self.segments]
        segments = [seg for seg in segments if seg]
        merged = self.weights[self.shared]  # (S,) at the merger
        holders: list[int] = [self.merger] * len(segments)  # who holds each segment's model
        losses = []
        for step in range(max(len(seg) for seg in segments)):
            active = [k for k, seg in enumerate(segments) if step < len(seg)]
            nodes = [segments[k][step] for k in active]
            starts = []
            for k, v in zip(active, nodes):
                source = holders[k]
                got = merged if source == v else self._send(
                    merged if step == 0 else weights[source, self.shared], source, v, topology)
                starts.append(self._with_shared(weights[v], got))
            new, loss = self._train(nodes, torch.stack(starts))
            weights[nodes] = new
            for k, v in zip(active, nodes):
                holders[k] = v
            losses += loss.tolist()
        models, samples = [], []
        for seg, tail in zip(segments, holders):
            got = weights[tail, self.shared] if tail == self.merger else self._send(
                weights[tail, self.shared], tail, self.merger, topology)
            models.append(got)
            samples.append(float(self.data.counts[seg].sum()))
        share = torch.tensor(samples, dtype=torch.float64) / sum(samples)
        merged = (torch.stack(models).double() * share[:, None]).sum(0).to(weights.dtype)
        self.weights = self._with_shared(weights[self.merger], merged)
        self.node_weights, self.topology, self.segments = weights, topology, segments
        self.failed += sorted(failing)
        self.alive = [v for v in self.alive if v not in failing]
        return {"loss": sum(losses) / len(losses)}


def _ring_segment(g: nx.Graph, members: list[int], head: int) -> list[int]:
    """The members of one ring from ``head`` round the ring: the cycle they induce, or, when the head
    is linked to every member (a hub), the head then the path the others form."""
    sub = g.subgraph(members)
    if len(members) >= 3 and nx.is_connected(sub) and all(d == 2 for _, d in sub.degree()):
        return ring_order(nx.Graph(sub), head)
    rest = g.subgraph(set(members) - {head})
    ends = sorted(v for v, d in rest.degree() if d <= 1 and g.has_edge(head, v))
    if not ends or not nx.is_connected(rest) or any(d > 2 for _, d in rest.degree()):
        raise ValueError(f"ring {sorted(members)} is neither a cycle nor a hub node:{head} beside a path: "
                         f"pass the segments explicitly")
    path = [ends[0]]
    while len(path) < len(rest):
        path.append(next(v for v in rest[path[-1]] if v not in path))
    return [head] + path
