"""Hooks on the one split training loop: a malicious server answers with its own gradients, a
client checks what it receives and may refuse to step, a label owner changes what it sends; wire
transforms apply to hooked runs as to honest ones."""
import copy

import pytest
import torch
from torch import nn

from attacks.fsha import FeatureSpaceHijacking
from toolkit import models
from toolkit.split import Hook, SplitConfig, SplitNN
from toolkit.wire import Wire

CFG = SplitConfig(lr=0.1, batch_size=64, shuffle=False)


def parts():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16)), nn.Sequential(nn.ReLU(), nn.Linear(16, 10))


class Echo(Hook):
    """A malicious server answering with a fixed multiple of what it received."""

    def __init__(self, factor=1.0):
        self.factor, self.seen = factor, []

    def respond(self, step, received, labels):
        self.seen.append((step, received[0], labels))
        return [self.factor * received[0]]


def test_a_responding_server_sends_its_own_gradient_and_the_client_backpropagates_it(digits):
    client, server = parts()
    twin, untouched = copy.deepcopy(client), copy.deepcopy(server)
    echo = Echo(0.5)
    sl = SplitNN.vanilla(client, server, digits, config=CFG, hooks={"server": echo})
    history = sl.fit(steps=1)
    # the client's step is SGD on the gradient it received, 0.5 z: d(0.25 |z|^2)/dW on its first batch
    z = twin(digits.x_train[:64])
    z.backward(0.5 * z.detach())
    assert torch.allclose(client[1].weight, twin[1].weight - 0.1 * twin[1].weight.grad, atol=1e-6)
    history = sl.fit(steps=2)
    assert history["loss"].isna().all() and list(history["step"]) == [2, 3]
    assert [s for s, _, _ in echo.seen] == [1, 2, 3] and all(y is not None for _, _, y in echo.seen)
    grads = sl.wire.observed(by="client", kind="gradients")
    assert all(torch.equal(g.tensor, 0.5 * z) for g, (_, z, _) in zip(grads, echo.seen))
    assert all(torch.equal(p, q) for p, q in zip(server.parameters(), untouched.parameters()))  # never ran
    with pytest.raises(ValueError, match="trains no task to evaluate"):
        sl.evaluate()


def test_a_client_check_that_refuses_keeps_its_weights_and_sees_what_it_received(digits):
    class Refuse(Hook):
        def __init__(self):
            self.received = []

        def check(self, step, party, received):
            self.received.append(received[0])
            return step % 2 == 0  # step only on even steps

    client, server = parts()
    refuse = Refuse()
    sl = SplitNN.vanilla(client, server, digits, config=CFG, hooks={"client": refuse})
    snapshots = []
    for step, *_ in sl.train_steps(4):
        snapshots.append(client[1].weight.detach().clone())
    start = parts()[0][1].weight
    assert torch.equal(snapshots[0], start)            # step 1 refused
    assert not torch.equal(snapshots[1], snapshots[0])  # step 2 stepped
    assert torch.equal(snapshots[2], snapshots[1])      # step 3 refused
    delivered = sl.wire.observed(by="client", kind="gradients")
    assert len(refuse.received) == 4 and all(torch.equal(a, b.tensor) for a, b in zip(refuse.received, delivered))


def test_a_label_hook_changes_what_crosses(digits):
    class Shift(Hook):
        def labels(self, step, y, *, n_classes):
            return (y + 1) % n_classes

    sl = SplitNN.vanilla(*parts(), digits, config=CFG, hooks={"client": Shift()})
    sl.fit(steps=2)
    sent = sl.wire.observed(by="server", kind="labels")
    assert torch.equal(sent[0].tensor, (digits.y_train[:64] + 1) % 10)


def test_fsha_runs_under_a_wire_transform_like_any_split_run(digits):
    """A Wire defense added once applies to the attack too: the server receives the transformed
    activations, and the client's gradient goes back through the transform."""
    x, public = digits.x_train[:128], digits.x_train[128:256]
    torch.manual_seed(0)
    client, _ = models.cut(models.convnet(width=8), at="conv2")
    twin = copy.deepcopy(client)
    wire = Wire([lambda t, *, kind: 3.0 * t if kind == "activations" else t])
    result = FeatureSpaceHijacking(batch_size=32, critic_steps=1).attack_training(
        client, x, public, steps=2, wire=wire, generator=torch.Generator().manual_seed(0))
    first = wire.observed(by="server", kind="activations")[0]
    rows = torch.randperm(128, generator=torch.Generator().manual_seed(0))[:32]
    assert torch.allclose(first.tensor, 3.0 * twin(x[rows]).detach(), atol=1e-5)
    assert len(result.history) == 2


def test_bad_hooks_are_refused(digits):
    with pytest.raises(ValueError, match="'bank', which is not a party"):
        SplitNN.vanilla(*parts(), digits, hooks={"bank": Hook()})
    with pytest.raises(TypeError, match="must be a toolkit.split.Hook"):
        SplitNN.vanilla(*parts(), digits, hooks={"server": object()})
    with pytest.raises(ValueError, match="must hold the single last stage"):
        SplitNN.u_shaped(*models.cut(models.mlp([64, 32, 16, 10]), at=(2, 4)), digits, hooks={"server": Echo()})

    class Wrong(Hook):
        def respond(self, step, received, labels):
            return [received[0][:, :3]]

    sl = SplitNN.vanilla(*parts(), digits, hooks={"server": Wrong()})
    with pytest.raises(ValueError, match=r"one gradient per tensor it received, of shapes \[\(64, 16\)\]"):
        sl.fit(steps=1)
