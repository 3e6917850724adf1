"""Wire transforms in split learning run inside the sender's autograd graph: split training with a
transform on the wire equals the unsplit network with the same operation inserted at the cut,
backward pass included (scaling, a dropout mask, norm clipping, a shape change, straight-through
quantization)."""
import copy

import pytest
import torch
from torch import nn

from toolkit.split import SplitConfig, SplitNN
from toolkit.wire import Wire, straight_through

from test_split import monolithic  # noqa: E402  (tests/ is on sys.path): the unsplit reference loop

CFG = SplitConfig(lr=0.05, batch_size=64, momentum=0.9, seed=3)


class Scale:
    def __init__(self, factor):
        self.factor = factor

    def __call__(self, t):
        return t * self.factor


class DropoutMask:
    """Inverted dropout with its own generator: the same masks in the split and unsplit runs."""

    def __init__(self, p, seed):
        self.p, self.generator = p, torch.Generator().manual_seed(seed)

    def __call__(self, t):
        keep = (torch.rand(t.shape, generator=self.generator) >= self.p).to(t.dtype)
        return t * keep / (1 - self.p)


class ClipRows:
    """Scale each sample's activation to L2 norm at most ``c`` (the gradient goes through the norm)."""

    def __init__(self, c):
        self.c = c

    def __call__(self, t):
        norms = t.flatten(1).norm(dim=1).clamp(min=1e-12)
        return t * (self.c / norms).clamp(max=1.0).view(-1, *([1] * (t.dim() - 1)))


class Squares:
    """A shape-changing transform: each activation and its square, side by side."""

    def __call__(self, t):
        return torch.cat([t, t * t], dim=1)


class Quantize:
    """Round to a 1/8 grid; straight-through on the way back (its documented backward)."""

    def __call__(self, t):
        return straight_through(lambda v: torch.round(v * 8) / 8)(t)


class OnActivations:
    """The wire-transform form of an operation: applied to activations, other kinds untouched."""

    def __init__(self, op):
        self.op = op

    def __call__(self, t, *, kind):
        return self.op(t) if kind == "activations" else t


class Inserted(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def forward(self, t):
        return self.op(t)


OPS = {
    "x2": lambda: Scale(2.0),
    "dropout_mask": lambda: DropoutMask(0.3, seed=11),
    "norm_clip": lambda: ClipRows(1.5),
    "shape_change": lambda: Squares(),
    "straight_through_quantize": lambda: Quantize(),
}


def parts(name, cuts=2):
    """head | middle | tail; a shape-changing transform doubles the features at each cut used."""
    torch.manual_seed(0)
    widen = 2 if name == "shape_change" else 1
    head = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh())
    middle = nn.Sequential(nn.Linear(32 * widen, 32), nn.Tanh())
    tail = nn.Sequential(nn.Linear(32 * (widen if cuts == 2 else 1), 10))
    return head, middle, tail


@pytest.mark.parametrize("op", list(OPS))
def test_vanilla_split_with_a_wire_transform_equals_the_network_with_the_operation_inserted(digits, op):
    head, middle, tail = parts(op, cuts=1)
    client, server = head, nn.Sequential(*middle, *tail)
    twin_client, twin_server = copy.deepcopy(client), copy.deepcopy(server)
    ref = monolithic(nn.Sequential(twin_client, Inserted(OPS[op]()), twin_server), digits, CFG, epochs=2)
    sl = SplitNN.vanilla(client, server, digits, config=CFG, wire=Wire([OnActivations(OPS[op]())]))
    history = sl.fit(epochs=2)
    assert history["loss"].tolist() == pytest.approx(ref, abs=1e-6)
    for p, q in zip([*client.parameters(), *server.parameters()],
                    [*twin_client.parameters(), *twin_server.parameters()]):
        assert torch.allclose(p, q, atol=1e-6, rtol=0)
    # what crossed is the transformed tensor, and the server computed with exactly that
    (first,) = sl.wire.observed(by="server", kind="activations")[:1]
    assert first.tensor.shape[1] == (64 if op == "shape_change" else 32)


@pytest.mark.parametrize("op", ["x2", "dropout_mask", "shape_change"])
def test_u_shaped_split_with_a_transform_on_both_crossings_equals_the_network(digits, op):
    head, middle, tail = parts(op)
    twins = [copy.deepcopy(m) for m in (head, middle, tail)]
    transform = OPS[op]()  # one transform object, applied at both cuts in turn, as the wire does
    ref = monolithic(nn.Sequential(twins[0], Inserted(transform), twins[1], Inserted(transform), twins[2]), digits, CFG,
                     epochs=1)
    sl = SplitNN.u_shaped(head, middle, tail, digits, config=CFG, wire=Wire([OnActivations(OPS[op]())]))
    history = sl.fit(epochs=1)
    assert history["loss"].tolist() == pytest.approx(ref, abs=1e-6)
    mine = [p for m in (head, middle, tail) for p in m.parameters()]
    theirs = [p for m in twins for p in m.parameters()]
    assert all(torch.allclose(p, q, atol=1e-6, rtol=0) for p, q in zip(mine, theirs))


def test_a_x2_transform_before_a_halved_server_leaves_the_client_gradient_unchanged(digits):
    """z -> 2z -> (W / 2) computes what z -> W does, so the client's gradient must be the same;
    treating the transform as the identity on the way back would halve it."""
    grads = {}
    for factor in (1.0, 2.0):
        torch.manual_seed(0)
        client, server = nn.Sequential(nn.Flatten(), nn.Linear(64, 16)), nn.Sequential(nn.Linear(16, 10))
        with torch.no_grad():
            server[0].weight.div_(factor)  # W/2 applied to 2z: the same logits as W applied to z
        sl = SplitNN.vanilla(client, server, digits, config=SplitConfig(batch_size=32, shuffle=False),
                             wire=Wire([OnActivations(Scale(factor))]))
        next(sl.steps())
        grads[factor] = client[1].weight.grad.clone()
    assert torch.allclose(grads[2.0], grads[1.0], rtol=1e-5, atol=1e-8)
    assert not torch.allclose(grads[2.0], grads[1.0] / 2, rtol=1e-2)


def test_a_transform_that_cuts_the_graph_is_refused(digits):
    client, server = nn.Sequential(nn.Flatten(), nn.Linear(64, 16)), nn.Sequential(nn.Linear(16, 10))
    detaching = OnActivations(lambda t: torch.round(t.detach() * 8) / 8)
    sl = SplitNN.vanilla(client, server, digits, wire=Wire([detaching]))
    with pytest.raises(ValueError, match="cut client's activations out of its autograd graph.*straight_through"):
        sl.fit(epochs=1)


def test_straight_through_forward_rounds_and_backward_is_the_identity():
    t = torch.tensor([0.26, -0.9, 1.49], requires_grad=True)
    q = straight_through(torch.round)(t)
    (q * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert q.tolist() == [0.0, -1.0, 1.0] and t.grad.tolist() == [1.0, 2.0, 3.0]
    assert not straight_through(torch.round)(torch.tensor([0.6])).requires_grad
