"""Ring propagation on the loan data against centralized training, node failures, personal layers,
parallel segments, bad messages, checkpoints, and a curious successor's gradient inversion."""
import networkx as nx
import pytest
import torch

from attacks import IDLG
from toolkit import data, models
from toolkit.decentralized import (ParallelRing, RingTraining, epochs_to_convergence, model_difference, ring,
                                   rings_of_rings, semi_centralized, train_centralized)
from toolkit.decentralized.topology import line
from toolkit.federated import FedConfig
from toolkit.parties import flat_state
from toolkit.wire import Wire

CONFIG = FedConfig(lr=0.1, batch_size=32)


@pytest.fixture(scope="module")
def loan():
    return data.load("loan")


@pytest.fixture(scope="module")
def small():
    return data.load("loan", n_samples=2000)


def mlp():
    torch.manual_seed(0)
    return models.tabular_mlp(8, 2)


def _links_only(protocol):
    """Every model transfer went from a node to a neighbour (in the topology of its round)."""
    edges = {frozenset(e) for e in protocol.discovery.topology.edges} | {frozenset(e) for e in protocol.topology.edges}
    return all(frozenset((int(t.sender[5:]), int(t.receiver[5:]))) in edges
               for t in protocol.wire.observed(kind="weights"))


def test_a_ring_of_three_on_loan_comes_within_five_percent_of_centralized_training(loan):
    central = train_centralized(mlp(), loan, epochs=10, config=CONFIG)
    ring3 = RingTraining(mlp(), data.partition(loan, 3), ring(3), config=CONFIG)
    decentral = ring3.fit(rounds=10)
    assert list(decentral.epoch) == list(central.epoch) == list(range(1, 11))  # a round is an epoch of all data
    best_c, best_d = central.test_loss.min(), decentral.test_loss.min()
    assert best_c < 0.35 and best_d < 0.35  # both learnt: predicting the 20% base rate costs 0.50
    assert best_d <= 1.05 * best_c
    assert decentral.test_loss.iloc[-1] <= 1.05 * central.test_loss.iloc[-1]
    assert 1 <= epochs_to_convergence(decentral) <= 10 and 1 <= epochs_to_convergence(central) <= 10
    # one model crossed each link of the ring per round (the initiator started the first round itself)
    hops = [(t.step, t.sender, t.receiver) for t in ring3.wire.observed(kind="weights")]
    assert hops[:5] == [(1, "node:0", "node:1"), (1, "node:1", "node:2"), (2, "node:2", "node:0"),
                        (2, "node:0", "node:1"), (2, "node:1", "node:2")]
    assert len(hops) == 3 * 10 - 1
    assert (decentral.bytes[1:] == 3 * 4 * len(ring3.weights)).all()
    assert not ring3.wire.observed(kind="update")  # models only: no data, no gradients


def test_the_receiver_trains_from_what_the_wire_delivered(small):
    """A transform on kind 'weights' changes the computation (zeroing every delivered model sets
    each node back to zero before it trains), not just the transcript."""
    parts = data.partition(small, 3)
    zeroed = RingTraining(mlp(), parts, ring(3), config=CONFIG,
                          wire=Wire([lambda t, *, kind: t * 0 if kind == "weights" else t]))
    plain = RingTraining(mlp(), parts, ring(3), config=CONFIG)
    zeroed.fit(rounds=1)
    plain.fit(rounds=1)
    assert torch.equal(zeroed.node_weights[0], plain.node_weights[0])  # the initiator trained its own model
    assert not torch.allclose(zeroed.node_weights[1], plain.node_weights[1])


def test_a_node_killed_mid_run_is_skipped_the_ring_reforms_and_training_finishes(small):
    ring5 = RingTraining(mlp(), data.partition(small, 5), ring(5), config=CONFIG)
    history = ring5.fit(rounds=5, failures={2: 3})
    assert len(history) == 5 and history.nodes.tolist() == [5, 5, 4, 4, 4]
    assert history.failed.tolist() == [0, 0, 1, 0, 0]
    assert ring5.order == [0, 1, 3, 4] and ring5.failed == [2] and ring5.alive == [0, 1, 3, 4]
    assert 2 not in ring5.topology and ring5.topology.has_edge(1, 3)  # predecessor now links successor
    late = [t for t in ring5.wire.observed(kind="weights") if t.step >= 3]
    assert late and all("node:2" not in (t.sender, t.receiver) for t in late)
    assert ("node:1", "node:3") in {(t.sender, t.receiver) for t in late}
    assert history.test_loss.iloc[-1] < history.test_loss.iloc[0] and history.test_loss.notna().all()
    assert _links_only(ring5)
    # the initiator itself fails: the next live node takes over and the ring still closes
    again = RingTraining(mlp(), data.partition(small, 4), ring(4), config=CONFIG)
    h = again.fit(rounds=3, failures={0: 2})
    assert again.initiator == 1 and again.order == [1, 2, 3] and h.nodes.tolist() == [4, 3, 3]
    assert [(t.sender, t.receiver) for t in again.wire.observed(kind="weights") if t.step == 2][0] == ("node:3", "node:1")


def test_personal_layers_never_cross_the_wire_and_stay_each_nodes_own(small):
    ring4 = RingTraining(mlp(), data.partition(small, 4), ring(4), config=CONFIG, personal=["fc3"])
    ring4.fit(rounds=3)
    shared = int(ring4.shared.sum())
    head = 32 * 2 + 2
    assert shared == len(ring4.weights) - head
    sent = ring4.wire.observed(kind="weights")
    assert sent and all(t.tensor.shape == (shared,) for t in sent)
    heads = ring4.node_weights[:, ~ring4.shared]  # (4, 66) each node's own final layer
    initial = flat_state(mlp())[~ring4.shared]
    assert all(not torch.allclose(h, initial) for h in heads)  # each trained its own
    assert all(not torch.allclose(heads[i], heads[j]) for i in range(4) for j in range(i + 1, 4))
    for t in sent:  # no transfer holds any node's head, nor a slice of it
        flat = t.tensor
        for h in heads:
            assert not any(torch.equal(flat[i:i + head], h) for i in range(0, len(flat) - head + 1, 1))
    per_node = ring4.evaluate_nodes()
    assert per_node.node.tolist() == [0, 1, 2, 3] and (per_node.test_loss < 0.5).all()
    with pytest.raises(ValueError, match=r"personal layer\(s\) \['fc9'\] are not in the model"):
        RingTraining(mlp(), data.partition(small, 3), ring(3), personal=["fc9"])
    with pytest.raises(ValueError, match="keeps every layer local"):
        RingTraining(mlp(), data.partition(small, 3), ring(3), personal=["fc1", "fc2", "fc3"])


@pytest.mark.parametrize("graph, segments, expected", [
    (ring(6), 2, [[0, 1, 2], [3, 4, 5]]),
    (rings_of_rings(3, 3), "rings", [[0, 1, 2], [3, 4, 5], [6, 7, 8]]),
    (semi_centralized(2, 4), "rings", [[0, 1, 2, 3], [4, 5, 6, 7]]),
], ids=["ring", "rings_of_rings", "semi_centralized"])
def test_parallel_segments_train_at_once_and_merge_at_the_merger(small, graph, segments, expected):
    n = graph.number_of_nodes()
    par = ParallelRing(mlp(), data.partition(small, n), graph, config=CONFIG, segments=segments)
    assert par.segments == expected
    history = par.fit(rounds=3, failures={n - 1: 2})
    assert history.nodes.tolist() == [n, n - 1, n - 1] and n - 1 not in par.topology
    assert history.test_loss.iloc[-1] < history.test_loss.iloc[0] < 0.6
    assert _links_only(par)  # relayed hop by hop along links
    # the merged model is the sample-weighted mean of what the tails' models reached the merger as
    into_merger = [t for t in par.wire.observed(by="node:0", kind="weights") if t.step == 3]
    assert len(into_merger) == sum(seg[-1] != par.merger for seg in par.segments)  # one per tail, last hop
    counts = par.data.counts.double()
    tails = torch.stack([par.node_weights[seg[-1], par.shared] for seg in par.segments])
    share = torch.tensor([float(counts[seg].sum()) for seg in par.segments], dtype=torch.float64)
    merged = (tails.double() * (share / share.sum())[:, None]).sum(0)
    assert torch.allclose(par.weights[par.shared].double(), merged, atol=1e-6)  # sample-weighted mean of tails
    with pytest.raises(ValueError, match="the merger node:0 holds the merged model and cannot fail"):
        par.fit(rounds=1, failures={0: 4})


def _two_and_one():
    g = nx.Graph([(0, 1)])
    g.add_node(2)
    return g


def test_bad_input_is_refused_by_name_and_changes_nothing(small):
    parts = data.partition(small, 3)
    with pytest.raises(ValueError, match=r"disconnected: its 2 components are \[0, 1\] and \[2\]"):
        RingTraining(mlp(), parts, _two_and_one())
    with pytest.raises(ValueError, match="the topology has 4 nodes but 3 datasets"):
        RingTraining(mlp(), parts, ring(4))
    with pytest.raises(ValueError, match="needs a link node:2 - node:0"):
        RingTraining(mlp(), parts, line(3), order=[0, 1, 2])
    with pytest.raises(ValueError, match="initiator 5 is not in the topology"):
        RingTraining(mlp(), parts, ring(3), initiator=5)
    with pytest.raises(ValueError, match="FedConfig.fraction=0.5 has no meaning in decentralized training"):
        RingTraining(mlp(), parts, ring(3), config=FedConfig(fraction=0.5))
    ring3 = RingTraining(mlp(), parts, ring(3), config=CONFIG)
    with pytest.raises(ValueError, match=r"failing node 7 is not in the topology \(its nodes are 0\.\.2\)"):
        ring3.fit(rounds=2, failures={7: 1})
    with pytest.raises(ValueError, match="fewer than two live nodes"):
        ring3.fit(rounds=2, failures={0: 1, 1: 2})
    with pytest.raises(ValueError, match="segment entry 9 is not in the topology"):
        ParallelRing(mlp(), parts, ring(3), segments=[[0, 1], [9]])
    with pytest.raises(ValueError, match=r"segment \[0, 2, 1\] needs a link|every node exactly once"):
        ParallelRing(mlp(), data.partition(small, 4), ring(4), segments=[[0, 2, 1], [3]])

    truncate = Wire([lambda t, *, kind: t[:-1] if kind == "weights" else t])
    bad = RingTraining(mlp(), parts, ring(3), config=CONFIG, wire=truncate)
    before = bad.node_weights.clone()
    with pytest.raises(ValueError, match=r"node:1 received from node:0 a message of shape \(2721,\) that does not "
                                         r"fit the model: its shared part is 2722"):
        bad.fit(rounds=1)
    assert torch.equal(bad.node_weights, before) and bad.round == 0 and len(bad.history) == 0  # nothing committed
    poison = Wire([lambda t, *, kind: t * float("nan") if kind == "weights" else t])
    with pytest.raises(ValueError, match="node:1 received from node:0 weights holding NaN"):
        RingTraining(mlp(), parts, ring(3), config=CONFIG, wire=poison).fit(rounds=1)


def test_a_checkpointed_ring_resumes_exactly_after_a_failure(small, tmp_path):
    parts = data.partition(small, 4)
    whole = RingTraining(mlp(), parts, ring(4), config=CONFIG)
    full = whole.fit(rounds=4, failures={2: 2})
    first = RingTraining(mlp(), parts, ring(4), config=CONFIG)
    first.fit(rounds=2, failures={2: 2})
    first.save(tmp_path / "ring.pt")
    resumed = RingTraining(mlp(), parts, ring(4), config=CONFIG)
    resumed.load(tmp_path / "ring.pt")
    assert resumed.order == [0, 1, 3] and resumed.failed == [2] and resumed.holder == 3
    rest = resumed.fit(rounds=2)
    assert torch.equal(resumed.node_weights, whole.node_weights)
    assert rest.test_loss.tolist() == full.test_loss.tolist()[2:]


def test_a_curious_successor_inverts_the_initiators_first_model_difference(small):
    """The initiator's first pass is one SGD step on one borrower's record; its successor knows the
    common initial model, so the difference it received is that record's gradient: iDLG (through
    attacks' public API) recovers the record and its label."""
    nodes = [small.subset([0]), small.subset(range(1, 400)), small.subset(range(400, 800))]
    initial = flat_state(mlp())
    ring3 = RingTraining(mlp(), nodes, ring(3), config=CONFIG)
    ring3.fit(rounds=1)
    received = ring3.wire.observed(by="node:1", kind="weights")
    assert [t.sender for t in received] == ["node:0"]
    update = model_difference(received[0], initial)
    attack = IDLG(mlp(), input_shape=(8,), client_lr=CONFIG.lr, weights="model")
    result = attack.run([update], generator=torch.Generator().manual_seed(0))
    assert torch.allclose(result.reconstruction.reshape(-1), small.x_train[0], atol=1e-4)
    assert int(result.labels[0]) == int(small.y_train[0])
    with pytest.raises(ValueError, match=r"start has shape \(3,\), the weights node:0 sent have \(2722,\)"):
        model_difference(received[0], torch.zeros(3))
