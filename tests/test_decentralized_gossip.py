"""Gossip (D-PSGD) on a ring of 8 and a random 3-regular graph of 16: the mixing matrix is doubly
stochastic, the consensus distance shrinks, the nodes converge; failures, personal layers, bad messages."""
import pytest
import torch

from toolkit import data, models
from toolkit.decentralized import Gossip, consensus_distance, random_regular, ring
from toolkit.federated import FedConfig
from toolkit.wire import Wire

CONFIG = FedConfig(lr=0.3, batch_size=32)


@pytest.fixture(scope="module")
def loan():
    return data.load("loan")


def mlp():
    torch.manual_seed(0)
    return models.tabular_mlp(8, 2)


def rr16():
    return random_regular(16, 3, generator=torch.Generator().manual_seed(0))


def _doubly_stochastic(w):
    one = torch.ones(len(w), dtype=w.dtype)
    return (torch.allclose(w.sum(0), one) and torch.allclose(w.sum(1), one) and bool((w >= 0).all())
            and torch.equal(w, w.T))


@pytest.mark.parametrize("graph", [ring(8), rr16()], ids=["ring8", "random_3_regular_16"])
def test_gossip_converges_and_its_consensus_distance_shrinks(loan, graph):
    n = graph.number_of_nodes()
    gossip = Gossip(mlp(), data.partition(loan, n), graph, config=CONFIG, independent_init=True)
    assert _doubly_stochastic(gossip.mixing_matrix())
    start = gossip.initial_consensus
    history = gossip.fit(rounds=12)
    consensus = history.consensus.tolist()
    assert all(b < a for a, b in zip(consensus, consensus[1:]))  # shrinks every round
    assert start > 5 and consensus[-1] < 0.1 * start
    assert history.test_loss.iloc[-1] < 0.33 < history.test_loss.iloc[0]  # converged: the base rate costs 0.50
    assert gossip._evaluate_weights(gossip.weights)["test_loss"] < 0.33  # the network average too
    # every node sent its model to each neighbour once per round, one stacked send
    per_round = [t for t in gossip.wire.observed(kind="weights") if t.step == 1]
    assert sorted((t.sender, t.receiver) for t in per_round) == sorted(
        [(f"node:{a}", f"node:{b}") for a, b in graph.edges] + [(f"node:{b}", f"node:{a}") for a, b in graph.edges])
    assert (history.bytes == 2 * graph.number_of_edges() * 4 * len(gossip.weights)).all()


def test_the_averaging_step_is_the_mixing_matrix_applied_to_what_was_received(loan):
    """With lr tiny the training step barely moves the models: a round is then one application of
    W to the nodes' weights, which keeps their average and shrinks their spread by at most the
    second-largest eigenvalue of W (squared, for the squared distance)."""
    graph = ring(8)
    gossip = Gossip(mlp(), data.partition(loan, 8), graph, config=FedConfig(lr=1e-12, batch_size=512),
                    independent_init=True)
    before = gossip.node_weights.clone()
    w = gossip.mixing_matrix().float()
    gossip.fit(rounds=1)
    assert torch.allclose(gossip.node_weights, w @ before, atol=1e-5)
    assert torch.allclose(gossip.node_weights.mean(0), before.mean(0), atol=1e-5)
    lam = float(torch.linalg.eigvalsh(w.double()).abs().sort().values[-2])
    assert consensus_distance(gossip.node_weights) <= lam ** 2 * consensus_distance(before) * (1 + 1e-4)


def test_gossip_survives_failures_and_keeps_personal_layers_out_of_the_average(loan):
    graph = rr16()
    gossip = Gossip(mlp(), data.partition(loan, 16), graph, config=CONFIG, personal=["fc3"])
    assert gossip.initial_consensus == 0.0  # one common model to start from
    history = gossip.fit(rounds=4, failures={5: 2, 11: 3})
    assert history.nodes.tolist() == [16, 15, 14, 14] and gossip.failed == [5, 11]
    assert 5 not in gossip.topology and 11 not in gossip.topology
    assert _doubly_stochastic(gossip.mixing_matrix()) and len(gossip.mixing_matrix()) == 14
    late = [t for t in gossip.wire.observed(kind="weights") if t.step >= 3]
    assert all({"node:5", "node:11"}.isdisjoint((t.sender, t.receiver)) for t in late)
    assert all(t.tensor.shape == (int(gossip.shared.sum()),) for t in gossip.wire.observed(kind="weights"))
    heads = gossip.node_weights[gossip.alive][:, ~gossip.shared]
    assert len({tuple(h.tolist()) for h in heads}) == 14  # each node's last layer is its own
    assert history.test_loss.iloc[-1] < history.test_loss.iloc[0]


def test_a_stacked_message_that_does_not_fit_is_refused_naming_the_link(loan):
    wire = Wire([lambda t, *, kind: t[:, :10] if kind == "weights" else t])
    gossip = Gossip(mlp(), data.partition(loan, 4), ring(4), config=CONFIG, wire=wire)
    before = gossip.node_weights.clone()
    with pytest.raises(ValueError, match=r"the messages node:0 -> node:1 \.\.\. \(8\) a message of shape \(8, 10\)"):
        gossip.fit(rounds=1)
    assert torch.equal(gossip.node_weights, before) and gossip.round == 0
    with pytest.raises(ValueError, match="independent_init must be True or False"):
        Gossip(mlp(), data.partition(loan, 4), ring(4), independent_init=1)
