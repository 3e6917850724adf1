"""Several clients: relay with weight hand-off (peer / through the server) and SplitFed v1/v2."""
import types

import pytest
import torch

from toolkit import data, models
from toolkit.audit import find_rows
from toolkit.parties import flat_state
from toolkit.split import Relay, SplitConfig, SplitFed

FAST = SplitConfig(lr=0.5, batch_size=32)


@pytest.fixture(scope="module")
def shards(digits):
    return data.partition(digits, 3, "iid", seed=0)


def parts():
    torch.manual_seed(0)
    return models.cut(models.mlp([64, 128, 64, 10]), at=3)


PROTOCOLS = {
    "relay-peer": lambda ds: Relay(*parts(), ds, handoff="peer", config=FAST),
    "relay-server": lambda ds: Relay(*parts(), ds, handoff="server", config=FAST),
    "splitfed-v1": lambda ds: SplitFed(*parts(), ds, version=1, config=FAST),
    "splitfed-v2": lambda ds: SplitFed(*parts(), ds, version=2, config=FAST),
}


@pytest.fixture(scope="module")
def trained(shards):
    runs = {}
    for name, build in PROTOCOLS.items():
        protocol = build(shards)
        history = protocol.fit(epochs=15 if name.startswith("splitfed") else 10)
        runs[name] = (protocol, history, protocol.evaluate())
    return runs


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_several_clients_learn_digits_to_95_percent(trained, name):
    assert trained[name][2]["accuracy"] >= 0.95, trained[name][2]


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_no_raw_input_crosses_and_bytes_add_up(trained, digits, name):
    protocol = trained[name][0]
    transcript = protocol.wire.observed()
    assert find_rows(transcript, digits.x_train) == [] and find_rows(transcript, digits.x_test) == []
    summary = protocol.wire.summary()
    assert summary["bytes_up"].sum() == protocol.wire.total_bytes == sum(t.nbytes for t in transcript)


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_history_has_one_row_per_step_with_its_client(trained, shards, name):
    protocol, history, _ = trained[name]
    epochs = history["epoch"].nunique()
    per_epoch = sum(-(-len(ds.y_train) // 32) for ds in shards)
    assert len(history) == epochs * per_epoch
    assert set(history["client"]) == {"client:0", "client:1", "client:2"}
    assert history["step"].is_monotonic_increasing and history["step"].is_unique


def test_relay_hands_weights_peer_to_peer_or_through_the_server(trained):
    peer = trained["relay-peer"][0].wire
    assert peer.observed(by="server", kind="weights") == []
    handoffs = peer.observed(kind="weights")
    # three clients, ten epochs: every turn but the very first starts with a hand-off
    assert len(handoffs) == 3 * 10 - 1
    assert [(t.sender, t.receiver) for t in handoffs[:3]] == [("client:0", "client:1"), ("client:1", "client:2"),
                                                              ("client:2", "client:0")]
    via = trained["relay-server"][0].wire
    assert len(via.observed(by="server", kind="weights")) == 3 * 10 - 1


def test_relay_next_client_starts_from_the_previous_clients_weights(shards):
    relay = PROTOCOLS["relay-peer"](shards)
    relay.fit(epochs=1)
    last = relay.wire.observed(kind="weights")[-1]
    assert last.receiver == "client:2"
    # client:2 received client:1's weights, then trained; client:1's part still holds what it sent
    assert torch.equal(flat_state(relay.client_parts[1]), last.tensor)


@pytest.mark.parametrize("version", [1, 2])
def test_splitfed_averages_client_parts_through_the_fedserver(shards, version):
    sfl = SplitFed(*parts(), shards, version=version, config=FAST)
    sfl.fit(epochs=1)
    flats = [flat_state(p) for p in sfl.client_parts]
    assert all(torch.equal(flats[0], f) for f in flats[1:])
    ups = sfl.wire.observed(by="fedserver", kind="weights")
    assert len(ups) == 3
    sizes = torch.tensor([len(ds.y_train) for ds in shards], dtype=torch.float64)
    expected = sum(u.tensor.double() * n for u, n in zip(ups, sizes)) / sizes.sum()
    assert torch.allclose(flats[0].double(), expected, atol=1e-6)
    assert sfl.wire.observed(by="server", kind="weights") == []
    if version == 1:
        servers = [flat_state(p) for p in sfl.server_parts]
        assert len(servers) == 3 and all(torch.equal(servers[0], s) for s in servers[1:])
    else:
        assert len(sfl.server_parts) == 1


def test_splitfed_v1_clients_train_in_parallel_and_v2_one_after_another(trained):
    v1 = trained["splitfed-v1"][1]
    first = v1[v1["epoch"] == 0]["client"].tolist()
    assert first[:3] == ["client:0", "client:1", "client:2"]  # interleaved, one step each in turn
    v2 = trained["splitfed-v2"][1]
    runs = (v2[v2["epoch"] == 0]["client"] != v2[v2["epoch"] == 0]["client"].shift()).sum()
    assert runs == 3  # each client's steps are contiguous


def test_same_seed_same_numbers(shards):
    a = PROTOCOLS["splitfed-v2"](shards).fit(epochs=2)
    b = PROTOCOLS["splitfed-v2"](shards).fit(epochs=2)
    assert a.equals(b)


def test_bad_multi_client_input(shards, digits):
    with pytest.raises(ValueError, match="at least two clients"):
        Relay(*parts(), shards[:1])
    with pytest.raises(ValueError, match="handoff must be 'peer' or 'server'"):
        Relay(*parts(), shards, handoff="broadcast")
    with pytest.raises(ValueError, match="version must be 1 or 2"):
        SplitFed(*parts(), shards, version=3)
    with pytest.raises(ValueError, match="client:1 has no training data"):
        empty = types.SimpleNamespace(x_train=digits.x_train[:0], y_train=digits.y_train[:0],
                                      x_test=digits.x_test, y_test=digits.y_test)  # Dataset itself refuses this
        SplitFed(*parts(), [shards[0], empty])
