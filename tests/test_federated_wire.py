"""The federated download really crosses the Wire: clients train from what it delivered to them.

A transform on kind "weights" changes training exactly as if the server had sent the transformed
weights (the executor run directly on them, then the server's own rule on the resulting updates),
under both executors, for FedAvg, FedAsync and FedBuff; a stacked download counts the same bytes
as a broadcast; and an audit matches every tensor a client trained from to one it was sent."""
import math

import pytest
import torch

from toolkit import models
from toolkit.federated import EXECUTORS, FedConfig, FederatedAveraging
from toolkit.federated.asynchronous import STALENESS, FedAsync, FedBuff, StragglerDelays
from toolkit.wire import Wire


def mlp():
    torch.manual_seed(0)
    return models.mlp([64, 128, 10])


def shift(t, *, kind):
    """Every client receives the global weights plus one."""
    return t + 1.0 if kind == "weights" else t


class RowNoise:
    """Gaussian noise on the weights, drawn per row (so per receiving client) from its own generator."""

    def __init__(self, sigma=0.05, seed=7):
        self.sigma, self.generator = sigma, torch.Generator().manual_seed(seed)

    def __call__(self, t, *, kind):
        return t + self.sigma * torch.randn(t.shape, generator=self.generator) if kind == "weights" else t


TRANSFORMS = {"shift": lambda: shift, "row_noise": RowNoise}


class Recorder:
    """Wraps an executor and keeps each call's (plan, start weights), so a test can redo the training."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def train(self, model, start, data, plan, config, out=None):
        self.calls.append((plan, start.clone()))
        return self.inner.train(model, start, data, plan, config, out)


def sent(fl, w, transform, clients):
    """The transformed weights each of ``clients`` was sent first: ``w + 1``, or its noisy row as
    the transcript holds it."""
    if transform == "shift":
        return w + 1.0
    first = {}
    for t in fl.wire.observed(kind="weights"):
        first.setdefault(t.receiver, t.tensor)
    return torch.stack([first[fl.data.names[c]] for c in clients.tolist()])


def redo(fl, start, plan):
    """The configured executor (a fresh one, on a fresh model) run directly on ``start``."""
    return EXECUTORS[fl.config.executor]().train(mlp(), start, fl.data, plan, fl.config)[0]


def all_at_once(n):
    """Every client takes exactly one time unit: arrivals come in dispatch order."""
    return StragglerDelays(n, sigma=0.0, slow_fraction=0.0)


@pytest.mark.parametrize("executor", ["vectorized", "sequential"])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_fedavg_trains_from_the_transformed_weights(iid10, executor, transform):
    fl = FederatedAveraging(mlp(), iid10, config=FedConfig(executor=executor, fraction=0.6, dropout=0.3, seed=3),
                            wire=Wire([TRANSFORMS[transform]()]))
    fl.executor = recorder = Recorder(fl.executor)
    w0 = fl.weights.clone()
    fl.fit(rounds=1)
    ((plan, _),) = recorder.calls
    assert len(plan.dropped) > 0  # dropped clients were sent weights too: the rows must still line up
    updates = redo(fl, sent(fl, w0, transform, plan.clients), plan)
    assert torch.equal(fl.weights, w0 + fl.aggregator(updates, fl.data.counts[plan.clients].double()))


@pytest.mark.parametrize("executor", ["vectorized", "sequential"])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_fedasync_trains_from_the_transformed_weights_and_mixes_into_the_servers_copy(iid10, executor, transform):
    fl = FedAsync(mlp(), iid10, config=FedConfig(executor=executor, seed=1), wire=Wire([TRANSFORMS[transform]()]),
                  delays=all_at_once(10), concurrency=4)
    fl.executor = recorder = Recorder(fl.executor)
    w0 = fl.weights.clone()
    fl.fit(rounds=2)  # two arrivals, both dispatched from version 0 (staleness 0, then 1)
    plan = recorder.calls[0][0]
    assert [t.sender for t in fl.wire.observed(by="server", kind="update")] == \
        [fl.data.names[c] for c in plan.clients[:2].tolist()]
    updates = redo(fl, sent(fl, w0, transform, plan.clients), plan)
    expected = w0
    for staleness in (0, 1):
        mix = fl.alpha * STALENESS[fl.staleness](staleness, fl.a, fl.b)
        expected = (1 - mix) * expected + mix * (w0 + updates[staleness])  # start: the server's version-0 copy
    assert torch.equal(fl.weights, expected)


@pytest.mark.parametrize("executor", ["vectorized", "sequential"])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_fedbuff_trains_from_the_transformed_weights(iid10, executor, transform):
    fl = FedBuff(mlp(), iid10, config=FedConfig(executor=executor, seed=2), wire=Wire([TRANSFORMS[transform]()]),
                 delays=all_at_once(10), concurrency=4, buffer_size=4)
    fl.executor = recorder = Recorder(fl.executor)
    w0 = fl.weights.clone()
    fl.fit(rounds=1)  # the buffer fills with the first dispatch's four updates
    plan = recorder.calls[0][0]
    updates = redo(fl, sent(fl, w0, transform, plan.clients), plan)
    counts = fl.data.counts[plan.clients].double()
    assert torch.equal(fl.weights, w0 + fl.aggregator(updates / math.sqrt(1 + 0), counts))


@pytest.mark.parametrize("protocol", ["fedavg", "fedbuff"])
def test_a_stacked_download_counts_the_same_bytes_as_a_broadcast_and_copies_nothing_it_need_not(iid10, protocol):
    config = FedConfig(fraction=0.5, dropout=0.3, seed=3)
    build = {"fedavg": lambda wire: FederatedAveraging(mlp(), iid10, config=config, wire=wire),
             "fedbuff": lambda wire: FedBuff(mlp(), iid10, config=config, wire=wire, buffer_size=3)}[protocol]
    plain, stacked = build(Wire()), build(Wire([lambda t, *, kind: t]))  # the second sends one row per client
    for fl in (plain, stacked):
        fl.executor = Recorder(fl.executor)
        fl.fit(rounds=3)
    assert plain.history["bytes_down"].tolist() == stacked.history["bytes_down"].tolist()
    assert plain.history["bytes_down"].sum() > 0 and plain.wire.ledger().equals(stacked.wire.ledger())
    assert plain.wire.summary().equals(stacked.wire.summary())
    broadcast = [(t.receiver, t.tensor) for t in plain.wire.observed(kind="weights")]
    rows = [(t.receiver, t.tensor) for t in stacked.wire.observed(kind="weights")]
    assert len(broadcast) == len(rows) > 0
    assert all(r == s and torch.equal(w, v) for (r, w), (s, v) in zip(broadcast, rows))  # the same transcript
    assert torch.equal(plain.weights, stacked.weights)
    # every client got the same weights: the executors were handed one (P,) row, never an (M, P) copy
    assert all(start.dim() == 1 for fl in (plain, stacked) for _, start in fl.executor.calls)


BUILD = {
    "fedavg": lambda clients, wire: FederatedAveraging(mlp(), clients, config=FedConfig(fraction=0.6, dropout=0.3),
                                                       wire=wire),
    "fedasync": lambda clients, wire: FedAsync(mlp(), clients, config=FedConfig(fraction=0.4, dropout=0.2), wire=wire),
    "fedbuff": lambda clients, wire: FedBuff(mlp(), clients, config=FedConfig(fraction=0.5), wire=wire, buffer_size=3),
}


@pytest.mark.parametrize("protocol", list(BUILD))
def test_every_tensor_a_client_trained_from_is_one_the_wire_delivered_to_it(iid10, protocol):
    fl = BUILD[protocol](iid10, Wire([RowNoise()]))  # every delivery differs, so a match is unambiguous
    fl.executor = recorder = Recorder(fl.executor)
    history = fl.fit(rounds=4)
    inbox: dict[str, list] = {}
    for t in fl.wire.observed(kind="weights"):
        assert t.sender == "server"
        inbox.setdefault(t.receiver, []).append(t.tensor)
    deliveries = sum(len(v) for v in inbox.values())
    assert deliveries * len(fl.weights) * 4 == history["bytes_down"].sum()
    trained = 0
    for plan, start in recorder.calls:
        for row, client in enumerate(plan.clients.tolist()):
            used = start if start.dim() == 1 else start[row]
            mine = inbox.get(fl.data.names[client], [])
            match = [i for i, w in enumerate(mine) if torch.equal(w, used)]
            assert match, f"client:{client} trained from weights the wire did not deliver to it"
            mine.pop(match[0])  # one delivery feeds one training
            trained += 1
    assert 0 < trained <= deliveries
    if protocol == "fedavg":  # dropped clients received and did not train
        assert deliveries == history["sampled"].sum() and trained == history["clients"].sum() < deliveries
