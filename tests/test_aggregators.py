"""Robust aggregators: reference values, agreement with numpy, Krum's choice, bad input."""
import numpy as np
import pytest
import torch

from attacks.poisoning import ScaledUpdate, SignFlip
from toolkit.federated.aggregators import (AGGREGATORS, Aggregator, Krum, Mean, Median, MultiKrum, TrimmedMean,
                                           check_updates, make_aggregator)


def _random(k, p, seed=0, dtype=torch.float64):
    return torch.randn(k, p, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _attacked(seed=0, p=200, attack=None):
    """7 honest updates (a common vector + small noise), then 3 malicious rows made from honest ones."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(p, generator=g)
    honest = common + 0.01 * torch.randn(7, p, generator=g)
    bad = (attack or SignFlip())(honest[:3])
    return torch.cat([honest, bad]), honest


# -- reference values --------------------------------------------------------------------------
def test_trimmed_mean_reference_value_with_a_sign_flipped_row():
    rows = torch.tensor([[1., 2., 3.], [4., 5., 6.], [7., 8., 9.]])
    flipped = SignFlip()(rows.mean(0, keepdim=True))
    updates = torch.cat([rows, flipped])
    assert flipped.tolist() == [[-4., -5., -6.]]
    assert TrimmedMean(f=1)(updates).tolist() == [2.5, 3.5, 4.5]
    assert torch.equal(Mean()(updates), torch.tensor([2.0, 2.5, 3.0]))


@pytest.mark.parametrize("k", [1, 2, 5, 8, 31, 64])
def test_median_matches_numpy_for_odd_and_even_k(k):
    x = _random(k, 300, seed=k)
    out = Median()(x)
    assert out.dtype == torch.float64 and out.shape == (300,)
    np.testing.assert_allclose(out.numpy(), np.median(x.numpy(), axis=0), rtol=0, atol=1e-15)


def test_median_of_even_k_is_the_mean_of_the_two_middle_values_not_the_lower():
    x = torch.tensor([[1.0], [2.0], [10.0], [4.0]])
    assert Median()(x).item() == 3.0
    assert torch.median(x, dim=0).values.item() == 2.0  # what torch would have said


def test_median_float32_and_float16_keep_dtype():
    x = _random(10, 50, seed=3, dtype=torch.float32)
    out = Median()(x)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), np.median(x.numpy().astype(np.float64), axis=0), rtol=1e-6)
    half = Median()(x.half())
    assert half.dtype == torch.float16
    np.testing.assert_allclose(half.float().numpy(), np.median(x.half().float().numpy(), axis=0), rtol=1e-3)


def test_weighted_mean_matches_numpy_average():
    x = _random(12, 100, seed=1)
    w = torch.rand(12, generator=torch.Generator().manual_seed(2)) * 50
    out = Mean()(x, w)
    np.testing.assert_allclose(out.numpy(), np.average(x.numpy(), axis=0, weights=w.numpy()), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(Mean()(x).numpy(), x.numpy().mean(0), rtol=1e-13, atol=1e-15)


def test_mean_accumulates_in_float64_and_returns_the_input_dtype():
    x = torch.full((1000, 3), 0.1, dtype=torch.float32)
    x[0] = 1e4  # float32 running sums would lose the 0.1s
    out = Mean()(x, torch.ones(1000, dtype=torch.int64))
    assert out.dtype == torch.float32
    expected = (1e4 + 999 * np.float64(np.float32(0.1))) / 1000
    assert torch.allclose(out, torch.full((3,), expected, dtype=torch.float32), rtol=1e-7, atol=0)


def test_zero_weights_drop_clients_from_the_mean():
    x = torch.tensor([[1.0, 1.0], [3.0, 5.0], [100.0, -100.0]])
    assert Mean()(x, torch.tensor([1.0, 1.0, 0.0])).tolist() == [2.0, 3.0]


@pytest.mark.parametrize("k,f", [(3, 0), (3, 1), (10, 2), (11, 5), (40, 7)])
def test_trimmed_mean_matches_a_numpy_sort_and_slice_reference(k, f):
    x = _random(k, 250, seed=10 * k + f)
    expected = np.sort(x.numpy(), axis=0)[f:k - f].mean(0)
    np.testing.assert_allclose(TrimmedMean(f)(x).numpy(), expected, rtol=1e-13, atol=1e-15)


def test_trimmed_mean_with_f_zero_is_the_mean():
    x = _random(6, 40, seed=4)
    torch.testing.assert_close(TrimmedMean(f=0)(x), Mean()(x), rtol=1e-14, atol=1e-15)


def test_outputs_are_new_tensors_and_inputs_are_untouched():
    x = _random(9, 20, seed=5)
    before = x.clone()
    for agg in (Mean(), Median(), TrimmedMean(2), Krum(2), MultiKrum(2, m=1)):
        out = agg(x)
        out += 1.0
        assert torch.equal(x, before), agg


# -- Krum ----------------------------------------------------------------------------------------
def test_krum_tiny_hand_computed_example():
    # scalars 0, 1, 2.5, 4, 20 with f = 1: each score sums the K - f - 2 = 2 smallest squared distances
    u = torch.tensor([[0.], [1.], [2.5], [4.], [20.]])
    expected = torch.tensor([1 + 6.25, 1 + 2.25, 2.25 + 2.25, 2.25 + 9, 256 + 306.25], dtype=torch.float64)
    torch.testing.assert_close(Krum(f=1).scores(u), expected, rtol=1e-12, atol=1e-12)
    assert Krum(f=1).select(u).tolist() == [1]
    assert Krum(f=1)(u).tolist() == [1.0]
    assert MultiKrum(f=1, m=3).select(u).tolist() == [1, 2, 0]
    assert MultiKrum(f=1, m=3)(u).item() == pytest.approx(3.5 / 3, rel=1e-7)
    assert MultiKrum(f=1).select(u).tolist() == [1, 2, 0, 3]  # default m = K - f
    assert MultiKrum(f=1, m=5)(u).item() == pytest.approx(27.5 / 5)  # m = K: the plain mean


def test_krum_scores_match_brute_force_distances():
    x = _random(13, 30, seed=6)
    f = 3
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)  # exact (K, K, P) differences
    d.fill_diagonal_(float("inf"))
    expected = d.sort(dim=1).values[:, :13 - f - 2].sum(1)
    torch.testing.assert_close(Krum(f).scores(x), expected, rtol=1e-12, atol=0)
    assert Krum(f).select(x).item() == int(expected.argmin())


def test_krum_distances_stay_precise_next_to_huge_outliers():
    # honest updates far from the origin and Byzantine ones 1e12 times larger: the plain
    # |a|^2 + |b|^2 - 2ab trick on uncentred data would bury the honest distances in rounding
    g = torch.Generator().manual_seed(7)
    honest = 1e4 + 1e-3 * torch.randn(8, 20, generator=g, dtype=torch.float64)
    x = torch.cat([honest, 1e12 * torch.randn(3, 20, generator=g, dtype=torch.float64)])
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    d.fill_diagonal_(float("inf"))
    expected = d.sort(dim=1).values[:, :11 - 3 - 2].sum(1)
    scores = Krum(f=3).scores(x)
    torch.testing.assert_close(scores[:8], expected[:8], rtol=1e-8, atol=0)
    assert Krum(f=3).select(x).item() == int(expected.argmin())


def test_krum_ties_go_to_the_lowest_index_and_duplicates_score_zero():
    # K = 7, f = 1: 4 neighbours; the five copies of (5, 5) have 4 zero distances each
    x = torch.tensor([[0.0, 0.0]] + [[5.0, 5.0]] * 5 + [[1.0, 9.0]])
    scores = Krum(f=1).scores(x)
    assert scores[1:6].tolist() == [0.0] * 5 and bool((scores[[0, 6]] > 0).all())
    assert Krum(f=1).select(x).tolist() == [1]
    assert MultiKrum(f=1, m=5).select(x).tolist() == [1, 2, 3, 4, 5]
    assert MultiKrum(f=1, m=5)(x).tolist() == [5.0, 5.0]


@pytest.mark.parametrize("attack", [SignFlip(), ScaledUpdate(50.0)], ids=repr)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_krum_and_multikrum_pick_the_honest_cluster(attack, seed):
    updates, honest = _attacked(seed, attack=attack)
    honest_mean = honest.mean(0)
    assert Krum(f=3).select(updates).item() < 7
    chosen = MultiKrum(f=3).select(updates)
    assert len(chosen) == 7 and sorted(chosen.tolist()) == list(range(7))
    assert sorted(MultiKrum(f=3, m=4).select(updates).tolist())[-1] < 7

    scale = honest_mean.norm()
    assert (MultiKrum(f=3)(updates) - honest_mean).norm() < 1e-6 * scale  # exactly the honest rows
    assert (Krum(f=3)(updates) - honest_mean).norm() < 0.05 * scale
    assert (Median()(updates) - honest_mean).norm() < 0.05 * scale
    assert (TrimmedMean(f=3)(updates) - honest_mean).norm() < 0.05 * scale
    assert (Mean()(updates) - honest_mean).norm() > 0.5 * scale  # the mean is dragged away


def test_multikrum_ignores_weights_and_krum_returns_a_copy_of_a_row():
    updates, _ = _attacked(3)
    w = torch.arange(1.0, 11.0)
    assert torch.equal(MultiKrum(f=3)(updates, w), MultiKrum(f=3)(updates))
    out = Krum(f=3)(updates)
    assert any(torch.equal(out, row) for row in updates[:7])
    assert out.data_ptr() not in {updates.data_ptr() + i * updates.stride(0) * updates.element_size()
                                  for i in range(len(updates))}


# -- scale (vectorization sanity: these would take minutes with a Python loop over K or P) --------
def test_thousand_clients_fifty_thousand_parameters():
    x = torch.randn(1000, 50_000, generator=torch.Generator().manual_seed(8))
    w = torch.rand(1000, generator=torch.Generator().manual_seed(9))
    for agg in (Mean(), Median(), TrimmedMean(100), Krum(100), MultiKrum(100)):
        out = agg(x, w)
        assert out.shape == (50_000,) and out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    assert Median()(x[:999]).shape == (50_000,)


# -- registry and repr ----------------------------------------------------------------------------
def test_registry_make_aggregator_and_repr():
    assert set(AGGREGATORS) == {"mean", "median", "trimmed_mean", "krum", "multi_krum"}
    for name, cls in AGGREGATORS.items():
        agg = make_aggregator(name)  # every one has usable defaults
        assert type(agg) is cls and isinstance(agg, Aggregator)
        assert agg(_random(7, 5)).shape == (5,)
    assert repr(make_aggregator("trimmed_mean", f=2)) == "TrimmedMean(f=2)"
    assert repr(make_aggregator("krum", f=3)) == "Krum(f=3)"
    assert repr(MultiKrum(f=1, m=4)) == "MultiKrum(f=1, m=4)"
    assert repr(Mean()) == "Mean()" and repr(Median()) == "Median()"


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"'bulyan'.*krum.*mean.*median.*multi_krum.*trimmed_mean"):
        make_aggregator("bulyan")


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("k,f", [(2, 1), (4, 2), (0, 0)])
def test_trimmed_mean_needs_more_than_2f_updates(k, f):
    if k == 0:
        with pytest.raises(ValueError, match=r"\(0, 4\)"):
            TrimmedMean(f)(torch.zeros(0, 4))
        return
    with pytest.raises(ValueError, match=rf"f={f}.*K={k}"):
        TrimmedMean(f)(torch.zeros(k, 4))


@pytest.mark.parametrize("k,f", [(4, 1), (8, 3), (2, 0)])
def test_krum_needs_2f_plus_3_updates(k, f):
    for agg in (Krum(f), MultiKrum(f)):
        with pytest.raises(ValueError, match=rf"f={f}.*{2 * f + 3}.*K={k}"):
            agg(torch.zeros(k, 4))
    Krum(f)(torch.zeros(2 * f + 3, 4))  # the minimum is fine


@pytest.mark.parametrize("cls", [TrimmedMean, Krum, MultiKrum])
@pytest.mark.parametrize("f", [-1, 1.5, True, "2"])
def test_bad_f(cls, f):
    with pytest.raises(ValueError, match=rf"f must be .*{f!r}"):
        cls(f)


@pytest.mark.parametrize("m", [0, -3, 2.0])
def test_bad_m(m):
    with pytest.raises(ValueError, match=rf"m must be .*{m!r}"):
        MultiKrum(f=1, m=m)


def test_m_larger_than_k():
    with pytest.raises(ValueError, match=r"m=8.*K=7"):
        MultiKrum(f=1, m=8)(torch.zeros(7, 3))


@pytest.mark.parametrize("agg", [Mean(), Median(), TrimmedMean(1), Krum(1), MultiKrum(1)], ids=repr)
def test_nan_and_inf_rows_are_named(agg):
    x = _random(7, 6)
    x[2, 3] = float("nan")
    x[5, 0] = float("-inf")
    with pytest.raises(ValueError, match=r"NaN/Inf in row\(s\) \[2, 5\]"):
        agg(x)


@pytest.mark.parametrize("agg", [Mean(), Median(), TrimmedMean(0), Krum(0)], ids=repr)
def test_updates_must_be_2d_floating(agg):
    with pytest.raises(ValueError, match=r"2-D.*\(5,\)"):
        agg(torch.zeros(5))
    with pytest.raises(ValueError, match=r"2-D.*\(2, 3, 4\)"):
        agg(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"floating.*torch.int64"):
        agg(torch.zeros(3, 4, dtype=torch.int64))


@pytest.mark.parametrize("agg", [Mean(), Median(), Krum(0)], ids=repr)
def test_bad_weights(agg):
    x = _random(3, 4)
    with pytest.raises(ValueError, match=r"shape.*\(3,\).*\(2,\)"):
        agg(x, torch.ones(2))
    with pytest.raises(ValueError, match=r"shape.*\(3, 1\)"):
        agg(x, torch.ones(3, 1))
    with pytest.raises(ValueError, match=r"non-negative.*-0.5 at index 1"):
        agg(x, torch.tensor([1.0, -0.5, 2.0]))
    with pytest.raises(ValueError, match=r"positive sum.*0.0"):
        agg(x, torch.zeros(3))
    with pytest.raises(ValueError, match=r"finite.*nan at index 2"):
        agg(x, torch.tensor([1.0, 1.0, float("nan")]))


def test_check_updates_returns_float64_weights():
    x, w = check_updates(torch.zeros(2, 3), [1, 3])
    assert w.dtype == torch.float64 and w.tolist() == [1.0, 3.0]
    assert check_updates(np.zeros((2, 3)))[1] is None


def test_huge_but_finite_rows_are_accepted():
    x = torch.full((3, 4), 3e38)  # float32 row sums overflow to inf; the values are finite
    assert check_updates(x)[0] is x
    assert Mean()(x).tolist() == [pytest.approx(3e38, rel=1e-6)] * 4
    big = torch.full((3, 4), 1e308, dtype=torch.float64)  # float64 row sums overflow too
    assert Median()(big).tolist() == [1e308] * 4
    assert Median()(torch.cat([big, big])).tolist() == [1e308] * 4  # even K: no overflow averaging
