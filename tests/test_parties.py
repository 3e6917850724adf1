import pytest
import torch
from torch import nn

from toolkit.parties import Party, flat_state, load_flat_state, make_optimizer


def test_party_optimizer_covers_every_part_it_holds():
    p = Party("server", optimizer=make_optimizer("sgd", lr=1.0))
    a, b = p.hold(nn.Linear(2, 2)), p.hold(nn.Linear(2, 1))
    (b(a(torch.ones(1, 2)))).sum().backward()
    before = [t.clone() for t in p.parameters()]
    p.step()
    assert all(not torch.equal(x, y) for x, y in zip(before, p.parameters()))
    p.zero_grad()
    assert all(t.grad is None for t in p.parameters())
    assert "2 model parts (9 parameters)" in repr(p)


def test_party_without_parameters_has_no_optimizer_and_steps_quietly():
    p = Party("fedserver", data={"x": torch.zeros(3, 2)})
    p.zero_grad()
    p.step()
    assert p.optimizer is None and "x (3, 2)" in repr(p)


def test_flat_state_round_trip_includes_buffers():
    src, dst = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)), nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    src[1].running_mean.fill_(0.5)
    load_flat_state(dst, flat_state(src))
    for a, b in zip(src.state_dict().values(), dst.state_dict().values()):
        if a.is_floating_point():
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="do not fit"):
        load_flat_state(dst, torch.zeros(3))


def test_bad_party_inputs():
    with pytest.raises(ValueError, match="name"):
        Party("")
    with pytest.raises(TypeError, match="nn.Module"):
        Party("a").hold(torch.zeros(2))
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("lbfgsb")
