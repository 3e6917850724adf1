import dcor
import numpy as np
import pytest
import torch

from toolkit.metrics import distance_correlation, format_bytes, u_distance_correlation_sqr


@pytest.fixture
def xz():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g)
    z = torch.tanh(x[:, :2] @ torch.randn(2, 9, generator=g)) + 0.3 * torch.randn(300, 9, generator=g)
    return x, z


def test_distance_correlation_matches_dcor(xz):
    x, z = xz
    ref = dcor.distance_correlation(x.double().numpy(), z.double().numpy())
    assert float(distance_correlation(x, z)) == pytest.approx(ref, rel=1e-8)
    ref_u = dcor.u_distance_correlation_sqr(x.double().numpy(), z.double().numpy())
    assert float(u_distance_correlation_sqr(x, z)) == pytest.approx(ref_u, rel=1e-8)


def test_distance_correlation_is_not_the_squared_distance_statistic():
    # Nonlinear, non-monotone dependence: Euclidean dCor sees it; a squared-distance (RV-like)
    # version, as in some NoPeek ports, sees almost nothing.
    x = torch.linspace(-1, 1, 400)[:, None]
    z = x ** 2
    assert float(distance_correlation(x, z)) > 0.4
    d2x, d2z = torch.cdist(x, x) ** 2, torch.cdist(z, z) ** 2
    c = lambda d: d - d.mean(0) - d.mean(1, keepdim=True) + d.mean()
    a, b = c(d2x), c(d2z)
    assert float((a * b).mean() / ((a * a).mean() * (b * b).mean()).sqrt()) < 0.05


def test_bias_corrected_version_is_near_zero_for_independent_high_dimensional_data():
    g = torch.Generator().manual_seed(1)
    x, z = torch.randn(64, 784, generator=g), torch.randn(64, 512, generator=g)
    assert float(distance_correlation(x, z)) > 0.8  # the V-statistic is inflated when d >> n
    assert abs(float(u_distance_correlation_sqr(x, z))) < 0.05


def test_distance_correlation_is_differentiable_with_finite_gradients(xz):
    x, z = xz
    z = z.clone().requires_grad_()
    distance_correlation(x, z).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_distance_correlation_bad_input():
    with pytest.raises(ValueError, match="same samples"):
        distance_correlation(torch.zeros(5, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="at least 4"):
        u_distance_correlation_sqr(np.zeros((3, 2)), np.zeros((3, 2)))
    assert float(distance_correlation(torch.ones(5, 2), torch.randn(5, 2))) == 0.0


def test_format_bytes():
    assert format_bytes(512) == "512 B" and format_bytes(1536) == "1.5 KiB" and format_bytes(3 * 2**30) == "3.0 GiB"
