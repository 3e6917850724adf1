"""Topologies for decentralized training, as networkx graphs whose nodes are the peers' ids.

Builders: :func:`ring`, :func:`line`, :func:`star`, :func:`complete`, :func:`random_regular`, and
the hybrids the FedUp design names as next steps: :func:`rings_of_rings` (rings joined through
bridge nodes) and :func:`semi_centralized` (a hub per ring). Every builder returns a graph that
:func:`check_topology` accepts: integer ids ``0..N-1``, at least two nodes, connected, no self-loop.
The hybrids mark each node's ring (node attribute ``"ring"``) and its role (``"role"``: ``"bridge"``,
``"hub"`` or ``"member"``), which :func:`draw` colours and ``ParallelRing`` reads.

:func:`metropolis_hastings` gives the doubly stochastic mixing matrix gossip averages with;
:func:`heal` removes a failed node and links its former neighbours, which is how a ring re-forms.

Example:
    >>> g = rings_of_rings(3, 4)
    >>> g.number_of_nodes(), sorted(n for n, r in g.nodes(data="role") if r == "bridge")
    (12, [0, 4, 8])
    >>> check_topology(nx.Graph([(0, 1), (2, 3)]))
    Traceback (most recent call last):
    ...
    ValueError: the topology is disconnected: its 2 components are [0, 1] and [2, 3] (every node must reach every other)
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import networkx as nx
import torch
from torch import Tensor

from toolkit import validate

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["ROLES", "TOPOLOGIES", "check_topology", "check_node", "complete", "draw", "heal", "line",
           "metropolis_hastings", "random_regular", "ring", "ring_order", "rings_of_rings", "semi_centralized",
           "star"]

ROLES = ("member", "bridge", "hub")  # a node's "role" attribute (its code in discovery's "roles" broadcast)


def _size(n: Any, low: int, what: str) -> int:
    n = validate.positive_int("n", n)
    if n < low:
        raise ValueError(f"a {what} needs at least {low} nodes, got n={n}")
    return n


def ring(n: int) -> nx.Graph:
    """``n >= 3`` nodes in a cycle: node ``i`` links ``i - 1`` and ``i + 1`` (mod n)."""
    return nx.cycle_graph(_size(n, 3, "ring"))


def line(n: int) -> nx.Graph:
    """``n >= 2`` nodes in a path ``0 - 1 - ... - n-1``."""
    return nx.path_graph(_size(n, 2, "line"))


def star(n: int) -> nx.Graph:
    """Node 0 (role ``"hub"``) linked to each of the other ``n - 1`` nodes."""
    g = nx.star_graph(_size(n, 2, "star") - 1)
    nx.set_node_attributes(g, {v: "hub" if v == 0 else "member" for v in g}, "role")
    return g


def complete(n: int) -> nx.Graph:
    """Every pair of ``n >= 2`` nodes linked (fully connected)."""
    return nx.complete_graph(_size(n, 2, "complete graph"))


def random_regular(n: int, degree: int, *, generator: torch.Generator) -> nx.Graph:
    """A random ``degree``-regular graph on ``n`` nodes (``n * degree`` even, ``degree < n``), drawn
    with networkx from a seed drawn from ``generator``, and redrawn until connected.

    Example:
        >>> g = random_regular(16, 3, generator=torch.Generator().manual_seed(0))
        >>> sorted({d for _, d in g.degree()}), nx.is_connected(g)
        ([3], True)
    """
    n = _size(n, 2, "random regular graph")
    degree = validate.positive_int("degree", degree)
    if degree >= n or (n * degree) % 2:
        raise ValueError(f"a {degree}-regular graph on {n} nodes needs degree < n and n * degree even")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"random_regular draws from the caller's torch.Generator, got {generator!r}")
    for _ in range(100):
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        g = nx.random_regular_graph(degree, n, seed=seed)
        if nx.is_connected(g):
            return g
    raise ValueError(f"no connected {degree}-regular graph on {n} nodes in 100 draws: use a larger degree")


def _rings(n_rings: int, ring_size: int) -> tuple[nx.Graph, list[int]]:
    n_rings = validate.positive_int("n_rings", n_rings)
    if n_rings < 2:
        raise ValueError(f"a hybrid topology needs at least 2 rings, got n_rings={n_rings}")
    ring_size = validate.positive_int("ring_size", ring_size)
    if ring_size < 3:
        raise ValueError(f"each ring needs at least 3 nodes, got ring_size={ring_size}")
    g = nx.Graph()
    firsts = []
    for k in range(n_rings):
        nodes = list(range(k * ring_size, (k + 1) * ring_size))
        nx.add_cycle(g, nodes)
        firsts.append(nodes[0])
        for v in nodes:
            g.nodes[v]["ring"] = k
            g.nodes[v]["role"] = "member"
    return g, firsts


def rings_of_rings(n_rings: int, ring_size: int) -> nx.Graph:
    """``n_rings`` rings of ``ring_size`` nodes; the first node of each ring is its bridge node
    (role ``"bridge"``), and the bridges form an outer ring (a line for two rings)."""
    g, bridges = _rings(n_rings, ring_size)
    if len(bridges) == 2:
        g.add_edge(*bridges)
    else:
        nx.add_cycle(g, bridges)
    for b in bridges:
        g.nodes[b]["role"] = "bridge"
    return g


def semi_centralized(n_rings: int, ring_size: int) -> nx.Graph:
    """``n_rings`` rings of ``ring_size`` nodes; the first node of each ring is its hub (role
    ``"hub"``), linked to every node of its ring, and the hubs are linked to each other."""
    g, hubs = _rings(n_rings, ring_size)
    for k, h in enumerate(hubs):
        g.nodes[h]["role"] = "hub"
        g.add_edges_from((h, v) for v in range(h + 2, h + ring_size - 1))  # its ring's neighbours are linked already
    g.add_edges_from((a, b) for i, a in enumerate(hubs) for b in hubs[i + 1:])
    return g


TOPOLOGIES = {"ring": ring, "line": line, "star": star, "complete": complete, "random_regular": random_regular,
              "rings_of_rings": rings_of_rings, "semi_centralized": semi_centralized}


# -- checks --------------------------------------------------------------------------------------
def check_topology(graph: Any) -> nx.Graph:
    """``graph`` if it is a usable topology: an undirected networkx Graph of at least two nodes with
    integer ids ``0..N-1``, no self-loop, and connected, roles in :data:`ROLES` and rings non-negative
    ints where set; a ValueError naming the problem otherwise."""
    if not isinstance(graph, nx.Graph) or graph.is_directed() or graph.is_multigraph():
        raise ValueError(f"a topology is an undirected networkx.Graph, got {type(graph).__name__}")
    nodes = list(graph.nodes)
    bad = [v for v in nodes if isinstance(v, bool) or not isinstance(v, int)]
    if bad:
        raise ValueError(f"node ids must be ints, got {bad[0]!r}")
    if len(nodes) < 2:
        raise ValueError(f"a topology needs at least two nodes, got {len(nodes)}")
    if sorted(nodes) != list(range(len(nodes))):
        missing = sorted(set(range(len(nodes))) - set(nodes))
        raise ValueError(f"node ids must be 0..{len(nodes) - 1}, got {sorted(nodes)} (missing {missing})")
    for v, attrs in graph.nodes(data=True):
        if attrs.get("role", "member") not in ROLES:
            raise ValueError(f"node {v} has role {attrs['role']!r}; a role is one of {list(ROLES)}")
        ring_id = attrs.get("ring", 0)
        if isinstance(ring_id, bool) or not isinstance(ring_id, int) or ring_id < 0:
            raise ValueError(f"node {v} has ring {ring_id!r}; a ring is a non-negative int")
    loops = list(nx.selfloop_edges(graph))
    if loops:
        raise ValueError(f"the topology has a self-loop at node {loops[0][0]}")
    if not nx.is_connected(graph):
        parts = sorted(sorted(c) for c in nx.connected_components(graph))
        shown = " and ".join(str(p) for p in parts[:3]) + (" ..." if len(parts) > 3 else "")
        raise ValueError(f"the topology is disconnected: its {len(parts)} components are {shown} "
                         f"(every node must reach every other)")
    return graph


def check_node(graph: nx.Graph, node: Any, what: str = "node") -> int:
    """``node`` if it is a node id of ``graph``; a ValueError naming it otherwise."""
    if isinstance(node, bool) or not isinstance(node, int) or node not in graph:
        raise ValueError(f"{what} {node!r} is not in the topology (its nodes are 0..{graph.number_of_nodes() - 1})"
                         if sorted(graph) == list(range(graph.number_of_nodes()))
                         else f"{what} {node!r} is not in the topology (its nodes are {sorted(graph)})")
    return node


def ring_order(graph: nx.Graph, start: int, order: Sequence[int] | None = None) -> list[int]:
    """The ring a token travels: ``order`` (every node once, each consecutive pair and the last
    and first linked in ``graph``) rotated to begin at ``start``; without ``order``, the cycle of a
    ring graph from ``start`` towards the neighbour whose id comes next round the ring.

    Example:
        >>> ring_order(ring(5), 2)
        [2, 3, 4, 0, 1]
    """
    check_node(graph, start, "initiator")
    if order is None:
        if any(d != 2 for _, d in graph.degree()):
            raise ValueError("the topology is not a ring (a node has other than two links): pass the ring "
                             "order= explicitly, each consecutive pair linked")
        order, prev, here = [start], None, start
        span = max(graph) + 1
        nxt = min(graph[start], key=lambda v: (v - start) % span)  # the next id round the ring
        while nxt != start:
            order.append(nxt)
            prev, here = here, nxt
            nxt = next(v for v in graph[here] if v != prev)
        return order
    order = [check_node(graph, v, "ring order entry") for v in order]
    if sorted(order) != sorted(graph):
        dup = sorted({v for v in order if order.count(v) > 1})
        missing = sorted(set(graph) - set(order))
        raise ValueError(f"the ring order must visit every node once: {f'repeats {dup}' if dup else ''}"
                         f"{' and ' if dup and missing else ''}{f'misses {missing}' if missing else ''}")
    for a, b in zip(order, order[1:] + order[:1]):
        if not graph.has_edge(a, b):
            raise ValueError(f"the ring order needs a link node:{a} - node:{b}, which the topology lacks")
    i = order.index(start)
    return order[i:] + order[:i]


def heal(graph: nx.Graph, node: int, *, order: Iterable[int] | None = None) -> nx.Graph:
    """A copy of ``graph`` without the failed ``node``, its former neighbours linked in a chain (in
    ``order`` if given, else by id): the graph stays connected, and in a ring the failed node's
    predecessor and successor become neighbours (the ring re-forms around it).

    Example:
        >>> sorted(heal(ring(4), 2).edges)
        [(0, 1), (0, 3), (1, 3)]
    """
    check_node(graph, node, "failed node")
    rank = {v: i for i, v in enumerate(order)} if order is not None else {}
    around = sorted(graph[node], key=lambda v: (rank.get(v, len(rank)), v))
    healed = graph.copy()
    healed.remove_node(node)
    healed.add_edges_from(zip(around, around[1:]))
    return healed


def metropolis_hastings(graph: nx.Graph, nodes: Sequence[int] | None = None) -> Tensor:
    """The Metropolis-Hastings mixing matrix (N, N), float64, rows and columns in ``nodes`` order
    (default: sorted ids): ``W[i, j] = 1 / (1 + max(deg i, deg j))`` for each link, ``W[i, i]`` the
    rest of row ``i``; symmetric with rows summing to one, so doubly stochastic (Xiao and Boyd,
    "Fast linear iterations for distributed averaging", 2004). Written out here because networkx
    has no function for these weights.

    Example:
        >>> w = metropolis_hastings(ring(4))
        >>> (3 * w[0]).round().tolist(), bool(torch.allclose(w.sum(0), torch.ones(4, dtype=torch.float64)))
        ([1.0, 1.0, 0.0, 1.0], True)
    """
    nodes = sorted(graph) if nodes is None else list(nodes)
    index = {v: i for i, v in enumerate(nodes)}
    w = torch.zeros(len(nodes), len(nodes), dtype=torch.float64)
    for a, b in graph.edges:
        if a in index and b in index:
            w[index[a], index[b]] = w[index[b], index[a]] = 1.0 / (1 + max(graph.degree[a], graph.degree[b]))
    w += torch.diag(1.0 - w.sum(1))
    return w


# -- drawing -------------------------------------------------------------------------------------
ROLE_COLOURS = {"member": "#4c72b0", "bridge": "#dd8452", "hub": "#c44e52", "failed": "#bbbbbb"}


def draw(graph: nx.Graph, *, ax: Axes | None = None, failed: Iterable[int] = (), initiator: int | None = None,
         title: str | None = None, seed: int = 0) -> tuple[Figure, Axes]:
    """Draw a topology with networkx and matplotlib: nodes coloured by role (member, bridge, hub),
    ``failed`` nodes grey with dashed links, the ``initiator`` ringed in black. Rings and lines are
    laid out on a circle, other graphs with a spring layout seeded by ``seed``.

    Returns:
        ``(fig, ax)``.
    """
    from toolkit.plots import _axes

    fig, ax = _axes(ax, figsize=(4.5, 4.5))
    failed = set(failed)
    if all(d <= 2 for _, d in graph.degree()):
        pos = nx.circular_layout(sorted(graph))
    else:
        pos = nx.kamada_kawai_layout(graph) if graph.number_of_nodes() <= 40 else nx.spring_layout(graph, seed=seed)
    roles = ["failed" if v in failed else graph.nodes[v].get("role", "member") for v in graph]
    dead = [e for e in graph.edges if failed & set(e)]
    live = [e for e in graph.edges if not failed & set(e)]
    nx.draw_networkx_edges(graph, pos, edgelist=live, ax=ax, edge_color="#555555", width=1.2)
    nx.draw_networkx_edges(graph, pos, edgelist=dead, ax=ax, edge_color="#bbbbbb", style="dashed", width=1.0)
    edge = ["black" if v == initiator else "white" for v in graph]
    nx.draw_networkx_nodes(graph, pos, ax=ax, node_color=[ROLE_COLOURS[r] for r in roles], edgecolors=edge,
                           linewidths=2.0, node_size=380)
    nx.draw_networkx_labels(graph, pos, ax=ax, font_size=9, font_color="white")
    from matplotlib.lines import Line2D

    shown = [r for r in ROLE_COLOURS if r in roles]
    handles = [Line2D([], [], marker="o", ls="", color=ROLE_COLOURS[r], label=r) for r in shown]
    if initiator is not None:
        handles.append(Line2D([], [], marker="o", ls="", mfc="white", mec="black", mew=2, label="initiator"))
    if len(handles) > 1:  # below the graph, where it covers no node
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(handles),
                  fontsize="small", frameon=False, handletextpad=0.2, columnspacing=0.8)
    ax.set_axis_off()
    ax.set_title(title or f"{graph.number_of_nodes()} nodes, {graph.number_of_edges()} links")
    return fig, ax
