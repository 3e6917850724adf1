"""Malicious clients: exact outputs, inputs untouched, reproducible noise, bad hyperparameters."""
import math

import pytest
import torch

from attacks.poisoning import POISONING, GaussianUpdate, ScaledUpdate, SignFlip


def _honest():
    return torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -0.25]])


def test_sign_flip_exact():
    x = _honest()
    assert SignFlip()(x).tolist() == [[-1.0, 2.0, -0.5], [-0.0, -3.0, 0.25]]
    assert SignFlip(scale=4.0)(x).tolist() == [[-4.0, 8.0, -2.0], [-0.0, -12.0, 1.0]]


def test_scaled_update_exact():
    x = _honest()
    assert ScaledUpdate()(x).tolist() == [[10.0, -20.0, 5.0], [0.0, 30.0, -2.5]]
    assert ScaledUpdate(factor=-0.5)(x).tolist() == [[-0.5, 1.0, -0.25], [-0.0, -1.5, 0.125]]


@pytest.mark.parametrize("attack", [SignFlip(2.0), ScaledUpdate(3.0), GaussianUpdate(0.5)], ids=repr)
def test_input_is_not_modified_and_shape_dtype_are_kept(attack):
    for dtype in (torch.float32, torch.float64):
        x = _honest().to(dtype)
        before = x.clone()
        out = attack(x, generator=torch.Generator().manual_seed(0))
        assert torch.equal(x, before)
        assert out.shape == x.shape and out.dtype == dtype
        assert out.data_ptr() != x.data_ptr()
        out.add_(1.0)
        assert torch.equal(x, before)


def test_gaussian_is_reproducible_with_the_same_seed_and_differs_with_another():
    attack = GaussianUpdate(sigma=2.0)
    x = torch.zeros(50, 400)
    a = attack(x, generator=torch.Generator().manual_seed(11))
    b = attack(x, generator=torch.Generator().manual_seed(11))
    c = attack(x, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(a, 2.0 * torch.randn(50, 400, generator=torch.Generator().manual_seed(11)))
    assert abs(a.std().item() - 2.0) < 0.05 and abs(a.mean().item()) < 0.05


def test_gaussian_ignores_the_honest_update():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    honest = torch.arange(20.0).reshape(4, 5)
    assert torch.equal(GaussianUpdate()(torch.zeros(4, 5), generator=g1), GaussianUpdate()(honest, generator=g2))


def test_gaussian_uses_the_global_rng_without_a_generator():
    torch.manual_seed(5)
    a = GaussianUpdate()(torch.zeros(3, 3))
    torch.manual_seed(5)
    assert torch.equal(a, GaussianUpdate()(torch.zeros(3, 3)))


def test_registry_and_repr():
    assert POISONING == {"sign_flip": SignFlip, "scaled": ScaledUpdate, "gaussian": GaussianUpdate}
    assert repr(SignFlip(2)) == "SignFlip(scale=2.0)"
    assert repr(ScaledUpdate(50)) == "ScaledUpdate(factor=50.0)"
    assert repr(GaussianUpdate(0.1)) == "GaussianUpdate(sigma=0.1)"
    for cls in POISONING.values():
        assert cls.__doc__ and "Threat model" in cls.__doc__


@pytest.mark.parametrize("cls,name,value", [
    (SignFlip, "scale", 0.0), (SignFlip, "scale", -1.0), (SignFlip, "scale", math.inf), (SignFlip, "scale", "2"),
    (ScaledUpdate, "factor", 0), (ScaledUpdate, "factor", math.nan), (ScaledUpdate, "factor", True),
    (GaussianUpdate, "sigma", 0.0), (GaussianUpdate, "sigma", -0.1), (GaussianUpdate, "sigma", math.inf),
])
def test_bad_hyperparameters(cls, name, value):
    with pytest.raises(ValueError, match=rf"{name} must be .*{value!r}"):
        cls(value)


@pytest.mark.parametrize("attack", [SignFlip(), ScaledUpdate(), GaussianUpdate()], ids=repr)
def test_integer_updates_are_rejected(attack):
    with pytest.raises(ValueError, match="floating.*torch.int64"):
        attack(torch.zeros(2, 3, dtype=torch.int64))
