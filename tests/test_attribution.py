"""Attributions of cut-layer quantities to inputs (captum): exact on linear parts, complete for
integrated gradients, and bad requests refused."""
import pytest
import torch
from torch import nn

from toolkit import models
from toolkit.attribution import attribute, scalar_of


def _linear():
    torch.manual_seed(0)
    return nn.Linear(5, 3)


def test_a_channel_of_a_linear_part_is_explained_exactly():
    part, x = _linear(), torch.randn(4, 5)
    w = part.weight[1].detach()
    ig = attribute(part, x, target=1, method="integrated_gradients", steps=8)
    assert torch.allclose(ig, x * w, atol=1e-5)  # IG of a linear function from a zero baseline: x * w
    sal = attribute(part, x, target=1, method="saliency")
    assert torch.allclose(sal, w.abs().expand_as(x), atol=1e-6)


def test_integrated_gradients_of_the_activation_norm_add_up_to_the_norm():
    client, _ = models.cut(models.lenet(), at="pool1")
    x = torch.rand(3, 1, 28, 28)
    baseline = torch.full((1, 28, 28), 0.1)
    ig = attribute(client, x, baseline=baseline, steps=64)
    f = scalar_of(client, None)
    with torch.no_grad():
        gap = f(x) - f(baseline.expand_as(x))
    assert ig.shape == x.shape
    assert torch.allclose(ig.flatten(1).sum(1), gap, rtol=0.02)  # completeness, up to integration error


def test_parameters_gradients_are_left_as_they_were():
    part, x = _linear(), torch.randn(4, 5)
    part(x).sum().backward()
    before = [p.grad.clone() for p in part.parameters()]
    attribute(part, x)
    assert all(torch.equal(p.grad, b) for p, b in zip(part.parameters(), before))


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "occlusion"}, "unknown attribution method 'occlusion'"),
    ({"target": 3}, "target channel 3 does not exist"),
    ({"target": -1}, "target must be a non-negative int"),
    ({"steps": 0}, "steps must be a positive int"),
    ({"baseline": torch.zeros(2, 5)}, "baseline must have the shape of x"),
])
def test_bad_requests_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        attribute(_linear(), torch.randn(4, 5), **kwargs)


def test_inputs_must_be_finite_floats():
    with pytest.raises(ValueError, match="must hold floats"):
        attribute(_linear(), torch.ones(4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        attribute(_linear(), torch.tensor([[float("nan")] * 5]))
