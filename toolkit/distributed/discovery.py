"""Peer discovery over the rendezvous store (the FedUp design of issue 13, with real processes).

Rank 0 hosts the ``TCPStore`` of :func:`~toolkit.distributed.join` and acts as the discovery
server. Every process registers the node id it hosts (a first-come claim through
``compare_set``: a second process claiming the same id is refused) with the shape of its
training data (sample count, per-sample input and target shapes, dtypes: no values). Once all
have registered, rank 0 checks the graph and announces it, the node -> rank map, every node's
data shape and the initiator as one JSON document in the store; every process rebuilds the
topology from what was announced. Only plain strings cross the store: nothing is unpickled.

Any failure (a disconnected topology, a node id not in the graph, a node registered twice, a
peer that never registers) is published under one error key, so every process raises the same
clear error instead of waiting for an announcement that will not come.

The protocol's own :class:`~toolkit.decentralized.DiscoveryServer` messages (kinds
``register``/``topology``/``roles``/``initiator``) then cross the process transport as in a
simulation, with party ``"discovery"`` on rank 0, so transcripts match the in-process run.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import networkx as nx
import torch

from toolkit.decentralized.discovery import node_name
from toolkit.decentralized.topology import ROLES, check_node, check_topology

__all__ = ["DTYPES", "ERROR_KEY", "Roster", "data_info", "discover", "publish_error", "shadow_dataset"]

ERROR_KEY = "discovery/error"
ANNOUNCE_KEY = "discovery/announce"
DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64,
                                                     torch.int64, torch.int32, torch.uint8)}


@dataclass
class Roster:
    """What the discovery announced: the topology, the initiator, which rank hosts which node and
    the shape of each node's training data (``data_info``); ``node`` is this process's own."""

    node: int
    topology: nx.Graph
    initiator: int
    ranks: dict[int, int]
    info: dict[int, dict[str, Any]] = field(default_factory=dict)

    def hosts(self) -> dict[str, int]:
        """Party name -> rank for :class:`~toolkit.distributed.ProcessTransport` (``"discovery"``: rank 0)."""
        return {"discovery": 0, **{node_name(v): r for v, r in sorted(self.ranks.items())}}


def data_info(dataset: Any) -> dict[str, Any]:
    """The registration of a node's data: sample count, per-sample shapes and dtypes, no values."""
    x, y = getattr(dataset, "x_train", None), getattr(dataset, "y_train", None)
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or len(x) != len(y) or len(x) == 0:
        raise ValueError("a node's dataset needs x_train and y_train tensors of the same non-zero length")
    for t in (x, y):
        if str(t.dtype).removeprefix("torch.") not in DTYPES:
            raise ValueError(f"a node's data dtype {t.dtype} is not one discovery carries ({sorted(DTYPES)})")
    return {"samples": len(x), "x": list(x.shape[1:]), "x_dtype": str(x.dtype).removeprefix("torch."),
            "y": list(y.shape[1:]), "y_dtype": str(y.dtype).removeprefix("torch.")}


def shadow_dataset(info: dict[str, Any]) -> SimpleNamespace:
    """A placeholder for another node's data: zeros of the registered shapes and dtypes."""
    n = info["samples"]
    return SimpleNamespace(x_train=torch.zeros(n, *info["x"], dtype=DTYPES[info["x_dtype"]]),
                           y_train=torch.zeros(n, *info["y"], dtype=DTYPES[info["y_dtype"]]))


def publish_error(group: Any, message: str) -> str:
    """Record ``message`` as the run's discovery error (the first one recorded wins); returns the one
    that stands."""
    try:
        return group.agree(ERROR_KEY, message)
    except Exception:  # noqa: BLE001  (the store may be gone; the caller raises its own error anyway)
        return message


def _fail(group: Any, error: Exception) -> Exception:
    publish_error(group, f"{type(error).__name__}: {error}")
    return error


def _wait(group: Any, key: str, timeout: float, waiting_for: str) -> str:
    """The value of ``key`` once set; raises the published discovery error if one comes first, and
    a TimeoutError naming ``waiting_for`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        if group.wait_key(ERROR_KEY, 0):
            kind, _, message = group.get(ERROR_KEY).partition(": ")
            raise (TimeoutError if kind == "TimeoutError" else ValueError)(f"discovery failed: {message}")
        if group.wait_key(key, 0.02):
            return group.get(key)
        if time.monotonic() > deadline:
            raise _fail(group, TimeoutError(f"rank {group.rank} waited {timeout:g} s for {waiting_for}"))


def discover(group: Any, node: int, dataset: Any, *, topology: nx.Graph | None = None, initiator: int | None = None,
             timeout: float | None = None) -> Roster:
    """Register ``node`` (hosted by this process, holding ``dataset``) and return the announced :class:`Roster`.

    Args:
        group: this process's :class:`~toolkit.distributed.Group` (rank 0 is the discovery server).
        node: the node id this process hosts.
        dataset: its training data (only :func:`data_info` of it is registered).
        topology: the graph to announce; read on rank 0 only (required there).
        initiator: the node that starts (rank 0 only; default the lowest node id).
        timeout: seconds rank 0 waits for every registration (default the group's); the others
            wait ``2 * timeout + 1`` s for the announcement.
    """
    timeout = group.timeout if timeout is None else timeout
    rank = group.rank
    if isinstance(node, bool) or not isinstance(node, int) or node < 0:
        raise _fail(group, ValueError(f"rank {rank} registers node id {node!r}: a node id is an int >= 0"))
    info = data_info(dataset)
    claim = group.agree(f"discovery/node/{node}", str(rank))
    if claim != str(rank):
        raise _fail(group, ValueError(f"{node_name(node)} registered twice: rank {claim} and rank {rank} both claim "
                                      f"it (each peer registers once)"))
    group.set(f"discovery/peer/{rank}", json.dumps({"node": node, **info}))
    if rank == 0:
        _announce(group, topology, initiator, timeout)
    # longer than the server's own wait for registrations, so its error naming who is missing comes first
    text = _wait(group, ANNOUNCE_KEY, 2 * timeout + 1, "the discovery server's announcement (rank 0)")
    return _roster(group, node, text)


def _announce(group: Any, topology: Any, initiator: Any, timeout: float) -> None:
    """Rank 0: check the graph, collect every registration, announce (or publish the error)."""
    if topology is None:
        raise _fail(group, ValueError("the discovery server (rank 0) needs the topology to announce"))
    try:
        topology = check_topology(topology)
    except ValueError as e:
        raise _fail(group, ValueError(str(e))) from None
    peers, deadline = {}, time.monotonic() + timeout
    while len(peers) < group.world_size:
        for r in range(group.world_size):
            if r not in peers and group.wait_key(f"discovery/peer/{r}", 0):
                peers[r] = json.loads(group.get(f"discovery/peer/{r}"))
        if group.wait_key(ERROR_KEY, 0):
            return  # another rank failed; every rank reads the error while waiting for the announcement
        if len(peers) < group.world_size:
            if time.monotonic() > deadline:
                missing = sorted(set(range(group.world_size)) - set(peers))
                raise _fail(group, TimeoutError(f"rank(s) {missing} joined the group but did not register a node "
                                                f"with the discovery server within {timeout:g} s"))
            time.sleep(0.02)
    ranks = {p["node"]: r for r, p in sorted(peers.items())}
    try:
        for r, p in sorted(peers.items()):
            if p["node"] not in topology:
                raise ValueError(f"node:{p['node']} (registered by rank {r}) is not in the topology: its nodes are "
                                 f"{sorted(topology)}")
        missing = sorted(set(topology) - set(ranks))
        if missing:
            raise ValueError(f"node(s) {missing} of the topology have no process: {group.world_size} processes "
                             f"registered nodes {sorted(ranks)}; run one process per node")
        shapes = {(tuple(p["x"]), p["x_dtype"], tuple(p["y"]), p["y_dtype"]) for p in peers.values()}
        if len(shapes) > 1:
            raise ValueError(f"the nodes registered data of different shapes: "
                             f"{ {p['node']: (p['x'], p['x_dtype'], p['y'], p['y_dtype']) for p in peers.values()} }")
        first = min(ranks) if initiator is None else check_node(topology, initiator, "initiator")
    except ValueError as e:
        raise _fail(group, ValueError(str(e))) from None
    roles = [[v, topology.nodes[v].get("ring", -1), ROLES.index(topology.nodes[v].get("role", "member"))]
             for v in sorted(topology)]
    group.set(ANNOUNCE_KEY, json.dumps({
        "edges": sorted(sorted(e) for e in topology.edges), "roles": roles, "initiator": first,
        "ranks": [[v, r] for v, r in sorted(ranks.items())],
        "info": [[p["node"], {k: p[k] for k in ("samples", "x", "x_dtype", "y", "y_dtype")}] for p in peers.values()]}))


def _roster(group: Any, node: int, text: str) -> Roster:
    """Rebuild the announcement, refusing anything malformed with a ValueError."""
    try:
        doc = json.loads(text)
        graph = nx.Graph()
        for v, ring, role in doc["roles"]:
            graph.add_node(int(v), role=ROLES[role], **({"ring": int(ring)} if ring >= 0 else {}))
        graph.add_edges_from((int(a), int(b)) for a, b in doc["edges"])
        ranks = {int(v): int(r) for v, r in doc["ranks"]}
        info = {int(v): _check_info(i) for v, i in doc["info"]}
        initiator = int(doc["initiator"])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ValueError(f"rank {group.rank} received a malformed discovery announcement: {e}") from None
    graph = check_topology(graph)
    check_node(graph, initiator, "the announced initiator")
    if sorted(ranks) != sorted(graph) or sorted(info) != sorted(graph) or ranks.get(node) != group.rank:
        raise ValueError(f"rank {group.rank}: the announcement does not map every node to a rank and data shape "
                         f"(or not node:{node} to this rank): ranks {ranks}")
    return Roster(node=node, topology=graph, initiator=initiator, ranks=ranks, info=info)


def _check_info(info: dict[str, Any]) -> dict[str, Any]:
    n = info["samples"]
    ok = (type(n) is int and n > 0 and info["x_dtype"] in DTYPES and info["y_dtype"] in DTYPES
          and all(type(d) is int and d >= 0 for d in info["x"] + info["y"]))
    if not ok:
        raise ValueError(f"bad data shape {info!r}")
    return info
