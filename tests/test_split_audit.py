"""Audit: in split learning, FSHA and SplitGuard runs, every tensor a party computes with is one the
Wire delivered to it, and every delivered tensor is used: nothing moves between parties outside it.

A recording transport keeps every tensor it delivers (copies, as a network would). Forward
pre-hooks on every receiving model part (and on a hooked malicious server) record what each party
computed with; the two must be the same tensors, object for object. A transport that delivers zero
gradients then shows the senders train only from what they received: their weights do not move.
"""
import pytest
import torch
from torch import nn

from attacks.fsha import FeatureSpaceHijacking
from defenses.splitguard import SplitGuard, guarded_split_training
from toolkit import data, models
from toolkit.split import SplitConfig, SplitNN
from toolkit.wire import Wire

CFG = SplitConfig(lr=0.1, batch_size=128)


class Recording:
    """Delivers a copy of each tensor (optionally scaled per kind) and remembers it."""

    def __init__(self, scale=None):
        self.scale = scale or {}
        self.delivered = []  # (receiver, kind, tensor)

    def deliver(self, tensor, *, sender, receiver, kind):
        out = tensor.detach().clone() * self.scale.get(kind, 1)
        self.delivered.append((receiver, kind, out))
        return out


def watch(modules_by_party):
    """Forward pre-hooks recording (party, input tensor) for each receiving module."""
    used = []
    for party, module in modules_by_party:
        module.register_forward_pre_hook(lambda m, args, party=party: used.append((party, args[0])))
    return used


def ids(pairs, party):
    return {id(t) for p, t in pairs if p == party}


def mlp4():
    torch.manual_seed(0)
    return models.mlp([64, 128, 64, 10])


def build(name, ds, wire):
    if name == "vanilla":
        return SplitNN.vanilla(*models.cut(mlp4(), at=3), ds, config=CFG, wire=wire)
    if name == "u_shaped":
        return SplitNN.u_shaped(*models.cut(mlp4(), at=(2, 5)), ds, config=CFG, wire=wire)
    if name == "multi_hop":
        return SplitNN.multi_hop(models.cut(mlp4(), at=(2, 4, 5)), ds, config=CFG, wire=wire)
    if name == "multi_task":
        heads = {"digit": nn.Linear(32, 10), "parity": nn.Linear(32, 2)}
        return SplitNN.multi_task(models.mlp([64, 32]), heads, ds, targets={"parity": lambda y: y % 2},
                                  head_parties={"digit": "server", "parity": "server"}, config=CFG, wire=wire)
    views = data.vertical_split(ds, 2)
    return SplitNN.vertical([models.mlp([32, 16]) for _ in views], nn.Linear(32, 10), views, config=CFG, wire=wire)


@pytest.mark.parametrize("name", ["vanilla", "u_shaped", "multi_hop", "multi_task", "vertical"])
def test_every_party_computes_with_exactly_what_the_wire_delivered(digits, name):
    transport = Recording()
    sl = build(name, digits, Wire(transport=transport))
    receiving = [(seg.party.name, seg.module) for stage in sl.pipeline.stages[1:] for seg in stage]
    used = watch(receiving)
    merged = []
    if name == "vertical":  # the server merges what it received before its part runs
        merge = sl.pipeline.merge
        sl.pipeline.merge = lambda ts: merged.extend(("server", t) for t in ts) or merge(ts)
    sl.fit(epochs=1)
    sl.evaluate()
    got = [(r, t) for r, k, t in transport.delivered if k == "activations"]
    for party in {p for p, _ in receiving}:
        seen = ids(merged if name == "vertical" and party == "server" else used, party)
        assert seen and seen == ids(got, party), party  # used <=> delivered, tensor for tensor
    labels = [(r, t) for r, k, t in transport.delivered if k == "labels"]
    assert all(r == "server" for r, _ in labels) and (name != "u_shaped" or not labels)


@pytest.mark.parametrize("name", ["vanilla", "u_shaped", "multi_hop"])
def test_senders_train_only_from_the_gradients_the_wire_delivered(digits, name):
    sl = build(name, digits, Wire(transport=Recording(scale={"gradients": 0.0})))
    first = sl.pipeline.stages[0][0].module
    last = sl.pipeline.stages[-1][0].module
    before = [p.detach().clone() for p in first.parameters()], [p.detach().clone() for p in last.parameters()]
    sl.fit(epochs=1)
    assert all(torch.equal(a, p) for a, p in zip(before[0], first.parameters()))  # zero gradients delivered
    if name != "u_shaped":  # the loss party trains on its own loss
        assert any(not torch.equal(a, p) for a, p in zip(before[1], last.parameters()))


def fsha_setup(digits):
    x, y = digits.x_train[:256], digits.y_train[:256]
    torch.manual_seed(0)
    client, server = models.cut(models.convnet(width=8), at="conv2")
    return x, y, digits.x_train[256:512], client, server


def test_fsha_runs_on_the_wire_and_the_server_attacks_exactly_what_it_received(digits):
    x, y, public, client, _ = fsha_setup(digits)
    transport = Recording()
    fsha = FeatureSpaceHijacking(batch_size=32, critic_steps=1)
    received = []
    step = fsha._server_step
    fsha._server_step = lambda z, x_pub, g: received.append(z) or step(z, x_pub, g)
    guard = SplitGuard(warmup=0, generator=torch.Generator().manual_seed(1))
    fsha.attack_training(client, x, public, steps=12, wire=Wire(transport=transport), private_y=y,
                         detector=guard, generator=torch.Generator().manual_seed(0))
    got = [t for r, k, t in transport.delivered if r == "server" and k == "activations"]
    assert len(received) == len(got) == 12 and all(a is b for a, b in zip(received, got))
    to_client = [t for r, k, t in transport.delivered if r == "client"]
    assert len(to_client) == 12 and {k for r, k, _ in transport.delivered if r == "client"} == {"gradients"}
    assert guard.fake_steps  # the detector acted through the same loop


def test_fsha_and_splitguard_clients_train_only_from_delivered_gradients(digits):
    x, y, public, client, server = fsha_setup(digits)
    before = [p.detach().clone() for p in client.parameters()]
    FeatureSpaceHijacking(batch_size=32, critic_steps=1).attack_training(
        client, x, public, steps=5, wire=Wire(transport=Recording(scale={"gradients": 0.0})),
        generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, p) for a, p in zip(before, client.parameters()))
    guarded_split_training(client, server, x, y, guard=SplitGuard(), steps=5, batch_size=32,
                           wire=Wire(transport=Recording(scale={"gradients": 0.0})),
                           generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, p) for a, p in zip(before, client.parameters()))
