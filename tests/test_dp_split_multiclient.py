"""DP-SGD for the clients of the multi-client split protocols (Relay, SplitFed v1/v2): each client
trains privately on its own data inside the protocol, the history reports epsilon, and the server,
which no single accountant covers, is refused with the reason."""
import math

import pytest
import torch
from torch import nn

from defenses.dp_split import DPClients, private_clients, private_party
from toolkit import data, models
from toolkit.accounting import epsilon as accounted
from toolkit.parties import flat_state
from toolkit.split import Relay, SplitConfig, SplitFed, SplitNN

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = SplitConfig(lr=0.5, batch_size=32)
PROTOCOLS = {
    "relay-peer": lambda parts, ds, config: Relay(*parts, ds, handoff="peer", config=config),
    "relay-server": lambda parts, ds, config: Relay(*parts, ds, handoff="server", config=config),
    "splitfed-v1": lambda parts, ds, config: SplitFed(*parts, ds, version=1, config=config),
    "splitfed-v2": lambda parts, ds, config: SplitFed(*parts, ds, version=2, config=config),
}


@pytest.fixture(scope="module")
def shards(digits):
    """Three clients of 448 digits each: 14 full batches of 32 (Opacus divides a step's clipped sum
    by the expected batch size, so a short last batch would differ from the plain mean on purpose)."""
    return [shard.subset(range(448)) for shard in data.partition(digits, 3, "iid", seed=0)]


def parts(seed=0):
    torch.manual_seed(seed)
    return models.cut(models.mlp([64, 64, 10]), at=3)


def client_weights(protocol):
    return [flat_state(p) for p in protocol.client_parts]


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_noise_off_and_no_clipping_trains_exactly_as_the_plain_protocol(shards, name):
    """With noise 0 and a bound no per-sample gradient reaches, DP-SGD's step is the plain mean
    gradient step: the private protocol's weights equal the plain one's (1e-5), so the DP optimizer
    really is what every client steps with, in the protocol's own schedule."""
    plain = PROTOCOLS[name](parts(), shards, CONFIG)
    plain.fit(2)
    private = PROTOCOLS[name](parts(), shards, CONFIG)
    clients = private_clients(private, max_grad_norm=1e6, noise_multiplier=0.0)
    clients.fit(2)
    for got, want in zip(client_weights(private), client_weights(plain)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert all(p.accountant.steps == 0 and p.epsilon() == math.inf for p in clients.parties)  # noiseless


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_clients_train_privately_and_every_epoch_reports_the_largest_client_epsilon(shards, name):
    protocol = PROTOCOLS[name](parts(), shards, CONFIG)
    start = client_weights(protocol)
    clients = private_clients(protocol, max_grad_norm=1.0, noise_multiplier=1.0,
                              generator=torch.Generator().manual_seed(0))
    history = clients.fit(3)
    assert protocol.evaluate()["accuracy"] > 0.5  # it learns (chance: 0.1)
    assert all(not torch.equal(a, b) for a, b in zip(client_weights(protocol), start))
    expected = []
    for lane, party in zip(protocol.lanes, clients.parties):  # each client: its own steps, its own sample rate
        steps = 3 * math.ceil(lane.n_train / 32)
        assert party.accountant.steps == steps
        expected.append(accounted(noise_multiplier=1.0, sample_rate=32 / lane.n_train, steps=steps, delta=1e-5))
        assert party.epsilon() == pytest.approx(expected[-1])
    ends = history.dropna(subset=["epsilon_rdp"])
    assert len(ends) == 3 and ends["epsilon_rdp"].is_monotonic_increasing and (ends["delta"] == 1e-5).all()
    assert ends["epsilon_rdp"].iloc[-1] == pytest.approx(max(expected)) == clients.epsilon()
    assert (ends["epsilon_prv"] <= ends["epsilon_rdp"] + 1e-9).all()
    assert protocol.history["epsilon_rdp"].dropna().tolist() == ends["epsilon_rdp"].tolist()


def test_clipping_changes_the_step_and_a_budget_is_met_by_every_client(shards):
    plain = Relay(*parts(), shards, config=CONFIG)
    plain.fit(1)
    clipped = Relay(*parts(), shards, config=CONFIG)
    private_clients(clipped, max_grad_norm=0.01, noise_multiplier=0.0).fit(1)
    assert (client_weights(clipped)[-1] - client_weights(plain)[-1]).abs().max() > 1e-3
    budget = SplitFed(*parts(), shards, version=1, config=CONFIG)
    clients = private_clients(budget, max_grad_norm=1.0, target_epsilon=4.0, epochs=2, report=["rdp"],
                              generator=torch.Generator().manual_seed(1))
    clients.fit(2)
    assert all(p.epsilon() == pytest.approx(4.0, abs=0.05) and p.epsilon() <= 4.0 for p in clients.parties)


def test_same_seed_same_numbers(shards):
    runs = []
    for _ in range(2):
        protocol = SplitFed(*parts(), shards, version=2, config=CONFIG)
        private_clients(protocol, max_grad_norm=1.0, noise_multiplier=1.0,
                        generator=torch.Generator().manual_seed(3)).fit(1)
        runs.append(client_weights(protocol))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_the_server_or_a_single_party_of_a_multi_client_protocol_is_refused_with_the_reason(shards):
    protocol = Relay(*parts(), shards, config=CONFIG)
    for party in ("server", "client:0"):
        with pytest.raises(ValueError, match="private_clients") as err:
            private_party(protocol, party, max_grad_norm=1.0, noise_multiplier=1.0)
        assert "one DP-SGD accountant at one sample rate" in str(err.value)
    client, server = models.cut(models.mlp([64, 64, 10]), at=3)
    with pytest.raises(ValueError, match="private_party"):
        private_clients(SplitNN.vanilla(client, server, shards[0]), max_grad_norm=1.0, noise_multiplier=1.0)


def test_a_client_that_cannot_be_private_changes_no_client(shards):
    """BatchNorm in the client part: refused (named), and no client got Opacus hooks or a DP optimizer."""
    client = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16))
    protocol = SplitFed(client, nn.Linear(16, 10), shards, version=1, config=CONFIG)
    before = [(p.optimizer, [len(m._forward_hooks) for m in part.modules()])
              for p, part in zip(protocol.clients, protocol.client_parts)]
    with pytest.raises(ValueError, match="BatchNorm1d"):
        private_clients(protocol, max_grad_norm=1.0, noise_multiplier=1.0)
    assert [(p.optimizer, [len(m._forward_hooks) for m in part.modules()])
            for p, part in zip(protocol.clients, protocol.client_parts)] == before
    with pytest.raises(ValueError, match="noise_multiplier"):
        private_clients(Relay(*parts(), shards, config=CONFIG), max_grad_norm=1.0, noise_multiplier=-1.0)
    assert isinstance(private_clients(Relay(*parts(), shards, config=CONFIG), max_grad_norm=1.0,
                                      noise_multiplier=1.0), DPClients)
