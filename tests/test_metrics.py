import functools

import dcor
import numpy as np
import pytest
import torch

from toolkit.metrics import (distance_correlation, distance_correlation_chunked, format_bytes,
                             u_distance_correlation_sqr, u_distance_correlation_sqr_chunked,
                             u_distance_covariance_sqr)


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


def _layouts():
    """(name, x, z) pairs that stress the matrix-product distance path: offsets, scales, duplicates."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 6, generator=g, dtype=torch.float64)
    z = torch.tanh(x[:, :2] @ torch.randn(2, 9, generator=g, dtype=torch.float64))
    z = z + 0.3 * torch.randn(300, 9, generator=g, dtype=torch.float64)
    onehot = torch.nn.functional.one_hot(torch.randint(0, 10, (300,), generator=g)).double()
    return [("plain", x, z), ("x+1000", x + 1000, z), ("x*1e3", x * 1e3, z),
            ("x*1e-3+5, z*1e4", x * 1e-3 + 5, z * 1e4), ("one-hot z+1000", x, onehot + 1000),
            ("quantised x", (2 * x).round() / 2, z)]


@pytest.mark.parametrize("grad", [False, True], ids=["evaluation", "differentiable"])
@pytest.mark.parametrize("name,x,z", _layouts(), ids=[c[0] for c in _layouts()])
def test_distance_statistics_agree_with_dcor_within_1e10_relative(name, x, z, grad):
    # The module and function docstrings claim 1e-10 relative; the matrix-product path on raw
    # data missed it by 200x on x+1000 (2e-8) and the uncorrected diagonal cost 1e-10 on plain data.
    # Without a gradient to compute the blocked sums answer; with one, the (n, n) matrices.
    z = z.clone().requires_grad_(grad)
    for ours, ref in zip([distance_correlation, u_distance_correlation_sqr, u_distance_covariance_sqr],
                         _dcor_reference(name)):
        got = ours(x, z)
        assert got.requires_grad == grad and float(got.detach()) == pytest.approx(ref, rel=1e-10)


@functools.cache
def _dcor_reference(name: str) -> tuple[float, float, float]:
    x, z = next((x.numpy(), z.numpy()) for n, x, z in _layouts() if n == name)
    return (dcor.distance_correlation(x, z), dcor.u_distance_correlation_sqr(x, z),
            dcor.u_distance_covariance_sqr(x, z))


def test_a_shift_of_the_data_leaves_distance_correlation_unchanged(xz):
    x, z = (t.double() for t in xz)
    base = float(distance_correlation(x, z))
    for shift in (1e3, 1e6):
        assert float(distance_correlation(x + shift, z - shift)) == pytest.approx(base, rel=1e-10)


def _exact_dcor(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The textbook V-statistic on pairwise differences (no matrix-product shortcut)."""
    def centred(v):
        d = torch.cdist(v, v, compute_mode="donot_use_mm_for_euclid_dist")
        return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()
    a, b = centred(x), centred(z)
    return ((a * b).mean() / ((a * a).mean() * (b * b).mean()).sqrt()).sqrt()


def test_the_gradient_equals_the_exact_paths_gradient(xz):
    x, z = (t.double() + 100 for t in xz)
    fast = z.clone().requires_grad_()
    exact = z.clone().requires_grad_()
    distance_correlation(x, fast).backward()
    _exact_dcor(x, exact).backward()
    assert torch.allclose(fast.grad, exact.grad, rtol=1e-8, atol=1e-12)


def _near_duplicates(seed: int, n: int = 60, d: int = 5, dtype=torch.float64):
    """Rows in clusters of 3 a 1e-6 apart (close pairs, recomputed from differences), offset by 50."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n // 3, d, generator=g, dtype=dtype).repeat_interleave(3, 0)
    return centres + 1e-6 * torch.randn(n, d, generator=g, dtype=dtype) + 50


def test_the_gradient_of_close_pairs_equals_the_exact_paths_gradient():
    # Close pairs take value and gradient from differences (the backward's second part): the
    # matrix-product expansion alone is off by ~1e-16 * 50^2 / 1e-6 there, i.e. ~1e-6.
    z = _near_duplicates(6)
    x = z[:, :2] ** 2 + 0.1 * _near_duplicates(7, d=2)
    fast, exact = z.clone().requires_grad_(), z.clone().requires_grad_()
    distance_correlation(x, fast).backward()
    _exact_dcor(x, exact).backward()
    assert torch.allclose(fast.grad, exact.grad, rtol=1e-8, atol=1e-10 * exact.grad.abs().max())
    near = z[:12].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda v: u_distance_covariance_sqr(x[:12], v), (near,), eps=1e-9,
                                    atol=1e-5, fast_mode=True)


def test_float32_inputs_get_float32_gradients_equal_to_the_float64_ones(xz):
    x, z = xz
    z32, z64 = z.clone().requires_grad_(), z.double().requires_grad_()
    distance_correlation(x, z32).backward()
    distance_correlation(x, z64).backward()
    assert z32.grad.dtype == torch.float32
    assert torch.allclose(z32.grad.double(), z64.grad, rtol=1e-5, atol=1e-7 * z64.grad.abs().max())


def test_a_collapsed_layer_has_zero_statistics_and_zero_gradient():
    z = torch.ones(20, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(20, 3, dtype=torch.float64)
    assert float(distance_correlation(x, z).detach()) == 0.0
    cov = u_distance_covariance_sqr(x, z)
    cov.backward()
    assert float(cov.detach()) == 0.0 and z.grad is not None and float(z.grad.abs().max()) == 0.0


def test_distance_statistics_pass_gradcheck_on_the_matrix_product_path():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)  # n > 25: torch.cdist takes the mm path
    z = (x[:, :2] ** 2 + 0.5 * torch.randn(30, 2, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: distance_correlation(x, v), (z,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda v: u_distance_covariance_sqr(x, v), (z,), fast_mode=True)


def test_u_distance_covariance_is_the_numerator_of_the_bias_corrected_correlation(xz):
    x, z = xz
    ratio = u_distance_covariance_sqr(x, z) / (u_distance_covariance_sqr(x, x) * u_distance_covariance_sqr(z, z)).sqrt()
    assert float(ratio) == pytest.approx(float(u_distance_correlation_sqr(x, z)), rel=1e-12)


@pytest.mark.parametrize("fn", [distance_correlation, u_distance_correlation_sqr, u_distance_covariance_sqr])
def test_nan_or_inf_input_is_refused_naming_the_index(fn):
    x, z = torch.randn(10, 3), torch.randn(10, 2)
    x[4, 1] = float("nan")
    with pytest.raises(ValueError, match=r"x holds NaN at index \(4, 1\)"):
        fn(x, z)
    z[7, 0] = float("inf")
    with pytest.raises(ValueError, match=r"z holds Inf at index \(7, 0\)"):
        fn(np.zeros((10, 3)), z.numpy())


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


# -- chunked forms --------------------------------------------------------------------------
@pytest.mark.parametrize("name,x,z", _layouts(), ids=[c[0] for c in _layouts()])
@pytest.mark.parametrize("chunk", [1, 7, 64, 300, 1000, None])
def test_chunked_statistics_equal_the_exact_ones_within_1e10_relative(name, x, z, chunk):
    # chunk 7 does not divide 300; 1 is one row at a time; 1000 and None are one block
    v = distance_correlation_chunked(x, z, chunk=chunk)
    u = u_distance_correlation_sqr_chunked(x, z, chunk=chunk)
    full = z.clone().requires_grad_()  # the (n, n) differentiable form
    assert float(v) == pytest.approx(float(distance_correlation(x, full).detach()), rel=1e-10)
    assert float(u) == pytest.approx(float(u_distance_correlation_sqr(x, full).detach()), rel=1e-10)
    assert v.dtype == u.dtype == torch.float64 and not v.requires_grad


def test_chunked_statistics_match_dcor_on_a_test_set_sized_sample():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1500, 20, generator=g, dtype=torch.float64)
    z = torch.relu(x @ torch.randn(20, 30, generator=g, dtype=torch.float64)) + torch.randn(1500, 30, generator=g,
                                                                                              dtype=torch.float64)
    xn, zn = x.numpy(), z.numpy()
    assert float(distance_correlation_chunked(x, z, chunk=256)) == pytest.approx(
        dcor.distance_correlation(xn, zn), rel=1e-10)
    assert float(u_distance_correlation_sqr_chunked(x, z, chunk=256)) == pytest.approx(
        dcor.u_distance_correlation_sqr(xn, zn), rel=1e-10)


def test_chunked_statistics_flatten_images_and_take_numpy():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(200, 1, 8, 8, generator=g)
    z = torch.nn.functional.avg_pool2d(x, 2) + 0.1 * torch.rand(200, 1, 4, 4, generator=g)
    ref = float(distance_correlation(x, z))
    assert float(distance_correlation_chunked(x.numpy(), z, chunk=33)) == pytest.approx(ref, rel=1e-10)
    assert ref > 0.8


def test_chunked_statistics_bad_input():
    x, z = torch.randn(10, 3), torch.randn(10, 2)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk must be a positive int"):
            distance_correlation_chunked(x, z, chunk=bad)
    with pytest.raises(ValueError, match="same samples"):
        distance_correlation_chunked(x, z[:9])
    with pytest.raises(ValueError, match="at least 4"):
        u_distance_correlation_sqr_chunked(x[:3], z[:3])
    x[2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"x holds NaN at index \(2, 2\)"):
        distance_correlation_chunked(x, z)
    assert float(distance_correlation_chunked(torch.ones(6, 2), torch.randn(6, 2))) == 0.0


def test_a_few_large_rows_do_not_send_every_small_pair_to_the_slow_path():
    """Heavy-tailed cut-layer outputs (a few large rows, the rest small; NoPeek produces them): the
    close-pair recomputation is judged by each pair's own norms, so almost no pair needs it, and
    the value still agrees with dcor."""
    from toolkit.dependence import _block_distances, _centre, _close

    g = torch.Generator().manual_seed(0)
    z = torch.randn(400, 64, generator=g, dtype=torch.float64) * 0.05
    z[:3] *= 2000.0  # three rows of norm ~800, the rest ~0.4
    x = z @ torch.randn(64, 32, generator=g, dtype=torch.float64) + 0.1 * torch.randn(400, 32, generator=g, dtype=torch.float64)
    xc, sq, radius = _centre(z)
    d = _block_distances(xc, sq, 0, len(xc), radius)
    assert int(_close(d, sq).sum()) < 0.001 * 400 * 399  # the largest-norm rule flagged nearly all
    assert int((d <= 1e-2 * radius).sum()) > 0.5 * 400 * 399
    assert float(distance_correlation(x, z)) == pytest.approx(dcor.distance_correlation(x.numpy(), z.numpy()), rel=1e-10)
    zz = z.clone().requires_grad_()
    distance_correlation(x, zz).backward()
    assert torch.isfinite(zz.grad).all()
