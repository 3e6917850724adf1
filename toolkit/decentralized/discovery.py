"""Peer discovery in simulation: nodes register their ids with a discovery server, which, once all
have joined, broadcasts the topology and names the initiator (the FedUp design of issue 13).

Every message crosses the Wire as a tensor: a registration is the node's id (int64, kind
``"register"``), the topology its edge list (E, 2) int64 (kind ``"topology"``) and each node's ring
and role (N, 3) int64 rows ``(id, ring or -1, role code)`` (kind ``"roles"``), the initiator one int64
id (kind ``"initiator"``). A node rebuilds the graph from what the Wire delivered to it
(:meth:`DiscoveryServer.view`), so a transform on the wire changes what the node believes.
"""
from __future__ import annotations

from typing import Any

import networkx as nx
import torch
from torch import Tensor

from toolkit.decentralized.topology import ROLES, check_node, check_topology
from toolkit.wire import Wire

__all__ = ["DiscoveryServer", "node_name"]


def node_name(node: int) -> str:
    """The party name of a node on the Wire: ``"node:<id>"``."""
    return f"node:{node}"


class DiscoveryServer:
    """The rendezvous of a decentralized run (party ``"discovery"``).

    Args:
        topology: the graph the server will announce (checked: connected, ids ``0..N-1``).
        wire: the Wire registrations and announcements cross.
        initiator: the node that starts training; default the first node to register.

    Example:
        >>> from toolkit.decentralized.topology import ring
        >>> server = DiscoveryServer(ring(3), wire=Wire())
        >>> for v in (2, 0, 1):
        ...     server.register(v)
        >>> server.complete, server.initiator, sorted(server.view(0)[0].edges)
        (True, 2, [(0, 1), (0, 2), (1, 2)])
        >>> server.register(0)
        Traceback (most recent call last):
        ...
        ValueError: node:0 registered twice: each peer registers once
    """

    name = "discovery"

    def __init__(self, topology: nx.Graph, *, wire: Wire, initiator: int | None = None):
        self.topology = check_topology(topology)
        if not isinstance(wire, Wire):
            raise TypeError(f"wire must be a toolkit.wire.Wire, got {type(wire).__name__}")
        self.wire = wire
        self._initiator = None if initiator is None else check_node(self.topology, initiator, "initiator")
        self.registered: list[int] = []  # ids in the order they joined
        self._views: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # node -> (edges, roles, initiator) as delivered

    @property
    def complete(self) -> bool:
        """Whether every node of the topology has registered (and the topology was announced)."""
        return len(self.registered) == self.topology.number_of_nodes()

    @property
    def initiator(self) -> int | None:
        """The node named to start, once everyone has joined (None before)."""
        return (self._initiator if self._initiator is not None else self.registered[0]) if self.complete else None

    def register(self, node: Any) -> None:
        """Node ``node`` sends its id to the server; the last one to join triggers the broadcast.
        A node not in the topology, or one registering twice, is refused with a ValueError (and
        nothing crosses the wire)."""
        if isinstance(node, bool) or not isinstance(node, int):
            raise ValueError(f"a node registers an int id, got {node!r}")
        check_node(self.topology, node, "registering node")
        if node in self.registered:
            raise ValueError(f"{node_name(node)} registered twice: each peer registers once")
        delivered = self.wire.send(torch.tensor([node], dtype=torch.int64), sender=node_name(node),
                                   receiver=self.name, kind="register")
        if delivered.shape != (1,) or int(delivered[0]) != node:
            raise ValueError(f"the discovery server received {delivered.tolist()} from {node_name(node)}, "
                             f"not its id {node}")
        self.registered.append(node)
        if self.complete:
            self._announce()

    def _announce(self) -> None:
        """Broadcast the edge list, the nodes' rings and roles, and the initiator to every registered node."""
        receivers = tuple(node_name(v) for v in self.registered)
        edges = torch.tensor(sorted(tuple(sorted(e)) for e in self.topology.edges), dtype=torch.int64)  # (E, 2)
        roles = torch.tensor([(v, self.topology.nodes[v].get("ring", -1),
                               ROLES.index(self.topology.nodes[v].get("role", "member")))
                              for v in sorted(self.topology)], dtype=torch.int64)  # (N, 3) id, ring, role
        got = [self.wire.broadcast(t, sender=self.name, receivers=receivers, kind=kind)
               for t, kind in ((edges, "topology"), (roles, "roles"),
                               (torch.tensor([self.initiator], dtype=torch.int64), "initiator"))]
        for v in self.registered:
            self._views[v] = tuple(got)

    def view(self, node: int) -> tuple[nx.Graph, int]:
        """What ``node`` learnt from the broadcast: (the topology rebuilt from the delivered edge
        list, the initiator). A delivered message that is not an (E, 2) edge list of the
        registered ids, or an initiator that is not one of them, is refused with a ValueError."""
        check_node(self.topology, node)
        if node not in self._views:
            raise ValueError(f"{node_name(node)} has no topology yet: "
                             f"{self.topology.number_of_nodes() - len(self.registered)} node(s) have not registered")
        edges, roles, first = self._views[node]
        ids = set(self.registered)
        if (edges.dim() != 2 or edges.shape[1] != 2 or edges.dtype != torch.int64
                or not set(edges.flatten().tolist()) <= ids):
            raise ValueError(f"{node_name(node)} received a topology of shape {tuple(edges.shape)} {edges.dtype} "
                             f"that is not an (E, 2) int64 edge list of the registered ids")
        if (roles.shape != (len(ids), 3) or roles.dtype != torch.int64 or set(roles[:, 0].tolist()) != ids
                or not set(roles[:, 2].tolist()) <= set(range(len(ROLES)))):
            raise ValueError(f"{node_name(node)} received roles of shape {tuple(roles.shape)} {roles.dtype} that are "
                             f"not one (id, ring, role code) row per registered node")
        if first.shape != (1,) or int(first[0]) not in ids:
            raise ValueError(f"{node_name(node)} received an initiator {first.tolist()} that did not register")
        graph = nx.Graph()
        graph.add_nodes_from(sorted(ids))
        graph.add_edges_from(map(tuple, edges.tolist()))
        for v, ring, role in roles.tolist():
            graph.nodes[v]["role"] = ROLES[role]
            if ring >= 0:
                graph.nodes[v]["ring"] = ring
        return check_topology(graph), int(first[0])

    def __repr__(self) -> str:
        return (f"DiscoveryServer({len(self.registered)}/{self.topology.number_of_nodes()} registered"
                f"{f', initiator node:{self.initiator}' if self.complete else ''})")
