"""The hook points defenses use: a party's own loss term on its cut-layer outputs (NoPeek's shape)
and the gradient a party sends back given its labels (label defenses), in every configuration;
both equal the unsplit computation with the same term or gradient change; hook values are logged."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from toolkit import data
from toolkit.split import Hook, SplitConfig, SplitNN

CFG = SplitConfig(lr=0.1, batch_size=32, shuffle=False)


@pytest.fixture(scope="module")
def small():
    return data.load("digits").subset(range(128))


def parts(*sizes):
    torch.manual_seed(0)
    return [nn.Sequential(nn.Flatten(1), nn.Linear(a, b), nn.Tanh()) for a, b in zip(sizes[:-1], sizes[1:])]


class Term(Hook):
    """Adds alpha * mean(z^2) on the party's cut-layer outputs; logs it."""

    def __init__(self, alpha):
        self.alpha, self.seen = alpha, {}

    def loss(self, step, inputs, outputs):
        self.seen[step] = (inputs, outputs.detach())
        return self.alpha * outputs.square().mean()

    def record(self, step):
        return {"term": float(self.seen[step][1].square().mean())}


def _reference_step(client, server, x, y, alpha):
    z = client(x)
    loss = F.cross_entropy(server(z), y) + alpha * z.square().mean()
    loss.backward()
    with torch.no_grad():
        for p in [*client.parameters(), *server.parameters()]:
            p -= 0.1 * p.grad


def test_a_loss_term_trains_like_the_unsplit_objective_with_the_term(small):
    client, server = parts(64, 16, 10)
    ref_c, ref_s = copy.deepcopy(client), copy.deepcopy(server)
    hook = Term(alpha=3.0)
    sl = SplitNN.vanilla(client, server, small, config=CFG, hooks={"client": hook})
    history = sl.fit(steps=2)
    for k in range(2):
        rows = slice(32 * k, 32 * (k + 1))
        _reference_step(ref_c, ref_s, small.x_train[rows], small.y_train[rows], alpha=3.0)
        for p in [*ref_c.parameters(), *ref_s.parameters()]:
            p.grad = None
    for a, b in zip([*client.parameters(), *server.parameters()], [*ref_c.parameters(), *ref_s.parameters()]):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.equal(hook.seen[1][0], small.x_train[:32])  # the party's own raw inputs
    assert history["term"].tolist() == pytest.approx([float(hook.seen[s][1].square().mean()) for s in (1, 2)])
    assert not any(t.kind == "loss" for t in sl.wire.observed())  # the term never crosses


def test_without_the_term_the_same_run_differs(small):
    client, server = parts(64, 16, 10)
    a = copy.deepcopy(client)
    SplitNN.vanilla(client, server, small, config=CFG, hooks={"client": Term(alpha=3.0)}).fit(steps=1)
    SplitNN.vanilla(a, copy.deepcopy(parts(64, 16, 10)[1]), small, config=CFG).fit(steps=1)
    assert not torch.allclose(client[1].weight, a[1].weight, atol=1e-4)


def test_loss_terms_in_u_shaped_and_vertical_runs(small):
    head, middle, tail = parts(64, 16, 12, 10)
    hook = Term(alpha=1.0)
    sl = SplitNN.u_shaped(head, middle, tail, small, config=CFG, hooks={"client": hook})
    before = head[1].weight.detach().clone()
    sl.fit(steps=1)
    # the head's gradient is the task's (through server and tail) plus the term's
    ref = parts(64, 16, 12, 10)
    z = ref[0](small.x_train[:32])
    (F.cross_entropy(ref[2](ref[1](z)), small.y_train[:32]) + z.square().mean()).backward()
    assert torch.allclose(head[1].weight, before - 0.1 * ref[0][1].weight.grad, atol=1e-6)

    views = data.vertical_split(small, 2)
    c0, c1 = (nn.Sequential(nn.Flatten(1), nn.Linear(v.x_train[0].numel(), 8)) for v in views)
    terms = {"client:0": Term(alpha=2.0), "client:1": Term(alpha=0.0)}
    sl = SplitNN.vertical([c0, c1], nn.Linear(16, 10), views, config=CFG, hooks=terms)
    sl.fit(steps=1)
    assert set(terms["client:0"].seen) == {1} and set(terms["client:1"].seen) == {1}


class Scale(Hook):
    """A label party that sends back factor * its gradient and remembers the labels it had."""

    def __init__(self, factor):
        self.factor, self.seen = factor, []

    def gradients(self, step, gradient, labels):
        self.seen.append(labels)
        return self.factor * gradient


def test_the_gradient_a_party_sends_back_is_what_its_hook_returns_given_its_labels(small):
    client, server = parts(64, 16, 10)
    twin = copy.deepcopy(client)
    honest = copy.deepcopy(server)
    hook = Scale(0.25)
    sl = SplitNN.vanilla(client, server, small, labels="server", config=CFG, hooks={"server": hook})
    sl.fit(steps=1)
    assert torch.equal(hook.seen[0], small.y_train[:32])
    z = twin(small.x_train[:32])
    leaf = z.detach().requires_grad_()
    F.cross_entropy(honest(leaf), small.y_train[:32]).backward()
    got = sl.wire.observed(by="client", kind="gradients")[0].tensor
    assert torch.allclose(got, 0.25 * leaf.grad, atol=1e-7)
    z.backward(0.25 * leaf.grad)
    assert torch.allclose(client[1].weight, twin[1].weight - 0.1 * twin[1].weight.grad, atol=1e-6)
    assert torch.allclose(server[1].weight, honest[1].weight - 0.1 * honest[1].weight.grad, atol=1e-6)


def test_a_gradient_hook_of_the_wrong_shape_is_refused(small):
    class Bad(Hook):
        def gradients(self, step, gradient, labels):
            return gradient[:1]

    client, server = parts(64, 16, 10)
    sl = SplitNN.vanilla(client, server, small, config=CFG, hooks={"server": Bad()})
    with pytest.raises(ValueError, match="server must send back a gradient of shape"):
        sl.fit(steps=1)


def test_a_non_scalar_loss_term_is_refused(small):
    class Bad(Hook):
        def loss(self, step, inputs, outputs):
            return outputs

    client, server = parts(64, 16, 10)
    with pytest.raises(ValueError, match="scalar loss term"):
        SplitNN.vanilla(client, server, small, config=CFG, hooks={"client": Bad()}).fit(steps=1)


def test_several_hooks_act_for_one_party_in_order():
    from toolkit.split import Hooks

    small = data.load("digits").subset(range(128))
    client, server = parts(64, 16, 10)
    twin_c, twin_s = copy.deepcopy(client), copy.deepcopy(server)
    a, b = Term(1.0), Term(2.0)
    a.record = lambda step: {"a": 1.0}  # distinct columns from each
    history = SplitNN.vanilla(client, server, small, config=CFG, hooks={"client": Hooks(a, b)}).fit(steps=2)
    SplitNN.vanilla(twin_c, twin_s, small, config=CFG, hooks={"client": Term(3.0)}).fit(steps=2)
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(client.parameters(), twin_c.parameters()))
    assert history["a"].tolist() == [1.0, 1.0] and "term" in history.columns  # both hooks' columns
    assert set(a.seen) == set(b.seen) == {1, 2}

    class Refuse(Hook):
        def __init__(self, refuse):
            self.refuse, self.calls = refuse, 0

        def check(self, step, party, received):
            self.calls += 1
            return not self.refuse

    client, server = parts(64, 16, 10)
    before = client[1].weight.detach().clone()
    yes, no = Refuse(False), Refuse(True)
    SplitNN.vanilla(client, server, small, config=CFG, hooks={"client": Hooks(no, yes)}).fit(steps=1)
    assert torch.equal(client[1].weight, before) and yes.calls == no.calls == 1  # every check ran; one said no
    sl = SplitNN.vanilla(*parts(64, 16, 10), small, config=CFG, hooks={"client": Hooks(Term(1.0), Term(1.0))})
    with pytest.raises(ValueError, match="same history column"):
        sl.fit(steps=1)
    with pytest.raises(TypeError, match="one or more"):
        Hooks()


def test_at_most_one_hook_of_a_party_may_respond():
    from toolkit.split import Hooks

    class Echo(Hook):
        def respond(self, step, received, labels):
            return [r for r in received]

    assert Hooks(Echo(), Term(1.0)).responds and not Hooks(Term(1.0)).responds
    with pytest.raises(ValueError, match="at most one hook"):
        Hooks(Echo(), Echo())
