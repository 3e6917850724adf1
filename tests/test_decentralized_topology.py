"""Topologies, the Metropolis-Hastings mixing matrix, healing after a failure, drawing, and peer
discovery (registration, the broadcast of the topology and the initiator, bad input)."""
import matplotlib

matplotlib.use("Agg")

import networkx as nx  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from toolkit.decentralized import topology as topo  # noqa: E402
from toolkit.decentralized.discovery import DiscoveryServer  # noqa: E402
from toolkit.wire import Wire  # noqa: E402


def _rr16(seed=0):
    return topo.random_regular(16, 3, generator=torch.Generator().manual_seed(seed))


GRAPHS = {"ring8": lambda: topo.ring(8), "line5": lambda: topo.line(5), "star6": lambda: topo.star(6),
          "complete5": lambda: topo.complete(5), "rr16": _rr16, "rings_of_rings": lambda: topo.rings_of_rings(3, 4),
          "rings_of_rings_2": lambda: topo.rings_of_rings(2, 3), "semi_centralized": lambda: topo.semi_centralized(3, 4)}


@pytest.mark.parametrize("name", GRAPHS)
def test_every_builder_gives_a_connected_topology_and_a_doubly_stochastic_mixing_matrix(name):
    g = topo.check_topology(GRAPHS[name]())
    w = topo.metropolis_hastings(g)
    n = g.number_of_nodes()
    one = torch.ones(n, dtype=torch.float64)
    assert torch.allclose(w.sum(0), one) and torch.allclose(w.sum(1), one)  # doubly stochastic
    assert torch.equal(w, w.T) and bool((w >= 0).all())
    linked = torch.zeros(n, n, dtype=torch.bool)
    for a, b in g.edges:
        linked[a, b] = linked[b, a] = True
    off = ~torch.eye(n, dtype=torch.bool)
    assert torch.equal(w[off] > 0, linked[off])  # a node mixes with its neighbours only
    second = torch.linalg.eigvalsh(w).abs().sort().values[-2]
    assert second < 1 - 1e-6  # connected: repeated mixing drives every node to the average


def test_builders_have_the_shapes_they_name():
    assert sorted(d for _, d in topo.ring(8).degree()) == [2] * 8
    assert sorted(d for _, d in topo.line(5).degree()) == [1, 1, 2, 2, 2]
    assert topo.star(6).degree[0] == 5 and topo.complete(5).number_of_edges() == 10
    assert {d for _, d in _rr16().degree()} == {3}
    rr = topo.rings_of_rings(3, 4)
    assert [v for v, r in rr.nodes(data="role") if r == "bridge"] == [0, 4, 8]
    assert all(rr.has_edge(a, b) for a, b in [(0, 4), (4, 8), (8, 0)])  # bridges form the outer ring
    assert all(rr.subgraph(range(k * 4, k * 4 + 4)).number_of_edges() == 4 for k in range(3))  # inner rings
    sc = topo.semi_centralized(3, 4)
    assert [v for v, r in sc.nodes(data="role") if r == "hub"] == [0, 4, 8]
    assert all(sc.has_edge(h, v) for h in (0, 4, 8) for v in range(h + 1, h + 4))  # a hub links its whole ring
    assert sc.has_edge(0, 8) and not sc.has_edge(1, 5)
    assert nx.utils.graphs_equal(_rr16(3), _rr16(3))  # the caller's generator fixes the draw
    assert not nx.utils.graphs_equal(_rr16(3), _rr16(4))


def test_bad_topologies_and_node_ids_are_refused_by_name():
    with pytest.raises(ValueError, match=r"disconnected: its 2 components are \[0, 1, 2\] and \[3, 4\]"):
        topo.check_topology(nx.Graph([(0, 1), (1, 2), (3, 4)]))
    with pytest.raises(ValueError, match=r"node ids must be 0\.\.2, got \[0, 1, 5\] \(missing \[2\]\)"):
        topo.check_topology(nx.Graph([(0, 1), (1, 5)]))
    with pytest.raises(ValueError, match="node ids must be ints, got 'a'"):
        topo.check_topology(nx.Graph([("a", "b")]))
    with pytest.raises(ValueError, match="self-loop at node 1"):
        topo.check_topology(nx.Graph([(0, 1), (1, 1)]))
    with pytest.raises(ValueError, match="undirected networkx.Graph, got DiGraph"):
        topo.check_topology(nx.DiGraph([(0, 1)]))
    g = topo.ring(4)
    g.nodes[2]["role"] = "boss"
    with pytest.raises(ValueError, match="node 2 has role 'boss'"):
        topo.check_topology(g)
    with pytest.raises(ValueError, match=r"initiator 7 is not in the topology \(its nodes are 0\.\.3\)"):
        topo.ring_order(topo.ring(4), 7)
    with pytest.raises(ValueError, match="needs a link node:2 - node:0, which the topology lacks"):
        topo.ring_order(topo.line(3), 0, order=[0, 1, 2])
    with pytest.raises(ValueError, match="not a ring"):
        topo.ring_order(topo.line(3), 0)
    with pytest.raises(ValueError, match=r"visit every node once: repeats \[1\] and misses \[3\]"):
        topo.ring_order(topo.ring(4), 0, order=[0, 1, 1, 2])
    with pytest.raises(ValueError, match="n \\* degree even"):
        topo.random_regular(5, 3, generator=torch.Generator())
    with pytest.raises(ValueError, match="a ring needs at least 3 nodes"):
        topo.ring(2)


def test_heal_reforms_a_ring_around_a_failed_node_and_keeps_any_graph_connected():
    healed = topo.heal(topo.ring(6), 3)
    assert 3 not in healed and healed.has_edge(2, 4)
    assert topo.ring_order(healed, 4) == [4, 5, 0, 1, 2]  # still a ring, one node shorter
    g = _rr16()
    for v in (0, 5, 9):
        g = topo.heal(g, v)
        assert nx.is_connected(g) and v not in g
    w = topo.metropolis_hastings(g)
    assert torch.allclose(w.sum(0), torch.ones(13, dtype=torch.float64))
    with pytest.raises(ValueError, match="failed node 3 is not in the topology"):
        topo.heal(healed, 3)


def test_draw_returns_the_figure_and_axes_with_one_marker_per_node():
    import matplotlib.pyplot as plt

    fig, ax = topo.draw(topo.rings_of_rings(3, 4), failed=[5], initiator=0, title="rings of rings")
    assert ax.figure is fig and ax.get_title() == "rings of rings"
    offsets = ax.collections[-1].get_offsets()  # the nodes are drawn last
    assert len(offsets) == 12
    labels = {t.get_text() for t in ax.get_legend().get_texts()}
    assert labels == {"member", "bridge", "failed", "initiator"}
    _, given = plt.subplots()
    assert topo.draw(topo.ring(5), ax=given)[1] is given
    plt.close("all")


# -- discovery -----------------------------------------------------------------------------------
def test_discovery_broadcasts_the_topology_and_the_initiator_once_everyone_joined():
    wire = Wire()
    graph = topo.semi_centralized(2, 3)
    server = DiscoveryServer(graph, wire=wire)
    for v in (4, 1, 0, 3, 2):
        server.register(v)
        assert not server.complete and server.initiator is None
        assert wire.observed(kind="topology") == []  # nothing announced before the last one joins
    with pytest.raises(ValueError, match="node:0 has no topology yet: 1 node"):
        server.view(0)
    server.register(5)
    assert server.complete and server.initiator == 4  # the first to register
    registered = [int(t.tensor[0]) for t in wire.observed(by="discovery", kind="register")]
    assert registered == [4, 1, 0, 3, 2, 5]
    for v in range(6):
        seen, first = server.view(v)
        assert nx.utils.graphs_equal(seen, graph) and first == 4
        assert dict(seen.nodes(data="role")) == dict(graph.nodes(data="role"))
        kinds = sorted(t.kind for t in wire.observed(by=f"node:{v}"))
        assert kinds == ["initiator", "roles", "topology"]
    assert DiscoveryServer(graph, wire=Wire(), initiator=3).topology is graph


def test_discovery_refuses_a_second_registration_an_unknown_id_and_a_tampered_broadcast():
    wire = Wire()
    server = DiscoveryServer(topo.ring(3), wire=wire)
    server.register(1)
    sent = len(wire)
    with pytest.raises(ValueError, match="node:1 registered twice"):
        server.register(1)
    with pytest.raises(ValueError, match="registering node 3 is not in the topology"):
        server.register(3)
    with pytest.raises(ValueError, match="registers an int id, got '2'"):
        server.register("2")
    assert len(wire) == sent and server.registered == [1]  # a refused registration sends nothing
    with pytest.raises(ValueError, match="initiator 9 is not in the topology"):
        DiscoveryServer(topo.ring(3), wire=Wire(), initiator=9)
    with pytest.raises(ValueError, match="disconnected"):
        DiscoveryServer(nx.Graph([(0, 1), (2, 3)]), wire=Wire())

    tampered = DiscoveryServer(topo.ring(4), wire=Wire([lambda t, *, kind: t.float() if kind == "topology" else t]))
    for v in range(4):
        tampered.register(v)
    with pytest.raises(ValueError, match=r"node:0 received a topology of shape \(4, 2\) torch.float32"):
        tampered.view(0)
