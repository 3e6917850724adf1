"""Tests for toolkit.data: built-in datasets, the checks a Dataset makes when built, partitioners and
vertical splits. The file readers and the downloader are tested in test_download.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from toolkit.data import (DATASETS, LOAN_FEATURES, PARTITIONERS, Dataset, dirichlet, iid, load, partition, shards,
                          vertical_split)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load("digits")


@pytest.fixture(scope="module")
def cancer() -> Dataset:
    return load("breast_cancer")


# ------------------------------------------------------------------------------------------ built-in datasets

def test_digits_shapes_ranges_and_repr(digits):
    assert digits.x_train.shape == (1437, 1, 8, 8) and digits.x_test.shape == (360, 1, 8, 8)
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    assert digits.x_train.min() == 0.0 and digits.x_train.max() == 1.0
    assert digits.shape == (1, 8, 8) and digits.n_classes == 10 and digits.is_image
    assert digits.classes == [str(d) for d in range(10)] and digits.feature_names is None
    assert repr(digits) == "Dataset('digits', train (1437, 1, 8, 8), test (360, 1, 8, 8), 10 classes)"
    # stratified: every class holds 20% (+-1) of its samples in the test split
    total = torch.bincount(torch.cat([digits.y_train, digits.y_test]))
    assert (torch.bincount(digits.y_test) - 0.2 * total).abs().max() <= 1


def test_digits_image_size_32(digits):
    big = load("digits", image_size=32)
    assert big.x_train.shape == (1437, 1, 32, 32) and big.x_test.shape == (360, 1, 32, 32)
    assert big.x_train.min() >= 0.0 and big.x_train.max() <= 1.0
    assert torch.equal(big.y_train, digits.y_train)  # same split, only resized
    assert abs(big.x_train.mean().item() - digits.x_train.mean().item()) < 0.02


@pytest.mark.parametrize("name, options", [("digits", {}), ("breast_cancer", {}), ("loan", {"n_samples": 500})])
def test_split_is_deterministic_in_seed(name, options):
    a, b, c = load(name, seed=3, **options), load(name, seed=3, **options), load(name, seed=4, **options)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert a.x_train.shape == c.x_train.shape and not torch.equal(a.x_train, c.x_train)


def test_breast_cancer(cancer):
    sk = load_breast_cancer()
    assert cancer.x_train.shape == (455, 30) and cancer.x_test.shape == (114, 30)
    assert cancer.x_train.dtype == torch.float32 and not cancer.is_image
    assert cancer.classes == ["malignant", "benign"] and cancer.feature_names == list(sk.feature_names)
    assert cancer.x_train.mean(0).abs().max() < 1e-4  # standardized with train statistics ...
    assert (cancer.x_train.std(0, unbiased=False) - 1).abs().max() < 1e-4
    assert cancer.x_test.mean(0).abs().max() > 1e-3  # ... so the test split is not exactly centered


@pytest.mark.parametrize("rate", [0.2, 0.01])
def test_loan_positive_rate(rate):
    ds = load("loan", positive_rate=rate)
    y = torch.cat([ds.y_train, ds.y_test]).float()
    assert ds.x_train.shape == (8000, 8) and ds.x_test.shape == (2000, 8)
    assert abs(y.mean().item() - rate) <= 0.005
    assert ds.classes == ["repaid", "default"] and ds.feature_names == LOAN_FEATURES
    assert ds.x_train.mean(0).abs().max() < 1e-4


def test_loan_seed_changes_the_data():
    a, b, c = load("loan", seed=7), load("loan", seed=7), load("loan", seed=8)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.x_train, c.x_train)


def test_loan_is_learnable():
    ds = load("loan", seed=0)
    clf = LogisticRegression(max_iter=1000).fit(ds.x_train.numpy(), ds.y_train.numpy())
    auc = roc_auc_score(ds.y_test.numpy(), clf.predict_proba(ds.x_test.numpy())[:, 1])
    assert auc >= 0.8
    assert clf.score(ds.x_test.numpy(), ds.y_test.numpy()) > 1 - ds.y_test.float().mean().item()  # beats majority


@pytest.mark.parametrize("options, bad", [({"positive_rate": 0.0}, "0.0"), ({"positive_rate": 1.5}, "1.5"),
                                          ({"n_samples": 0}, "0"), ({"n_samples": 100, "positive_rate": 0.01}, "100")])
def test_loan_bad_options(options, bad):
    with pytest.raises(ValueError, match=bad):
        load("loan", **options)


def test_load_bad_inputs():
    with pytest.raises(ValueError, match=r"'imagenet'.*digits.*breast_cancer.*loan.*mnist.*cifar10"):
        load("imagenet")
    with pytest.raises(TypeError, match=r"'imagesize'.*image_size"):
        load("digits", imagesize=32)
    with pytest.raises(TypeError, match="'n_samples'"):
        load("breast_cancer", n_samples=10)
    with pytest.raises(ValueError, match="-1"):
        load("digits", seed=-1)
    with pytest.raises(ValueError, match="0"):
        load("digits", image_size=0)
    assert set(DATASETS) == {"digits", "breast_cancer", "loan", "mnist", "fashion_mnist", "cifar10"}


def test_subset_keeps_test_split(digits):
    sub = digits.subset(torch.tensor([5, 0, 9]))
    assert torch.equal(sub.x_train, digits.x_train[[5, 0, 9]]) and torch.equal(sub.y_train, digits.y_train[[5, 0, 9]])
    assert sub.x_test is digits.x_test and sub.name == "digits"
    assert len(digits.subset([1, 2]).y_train) == 2 and len(digits.subset(np.arange(4)).y_train) == 4


# ------------------------------------------------------------------------------------------ checks when built

def toy(**changes) -> Dataset:
    """A 6-sample, 2-class image dataset with the given fields replaced (before it is checked)."""
    fields = dict(name="toy", x_train=torch.rand(6, 1, 3, 3), y_train=torch.tensor([0, 1, 0, 1, 0, 1]),
                  x_test=torch.rand(2, 1, 3, 3), y_test=torch.tensor([0, 1]), classes=["a", "b"])
    return Dataset(**{**fields, **changes})


def with_value(x: torch.Tensor, where: tuple, value: float) -> torch.Tensor:
    x = x.clone()
    x[where] = value
    return x


@pytest.mark.parametrize("field, value, match", [
    ("x_train", with_value(torch.rand(6, 1, 3, 3), (3, 0, 1, 2), float("nan")),
     r"toy\.x_train holds NaN at index \(3, 0, 1, 2\)"),
    ("x_test", with_value(torch.rand(2, 1, 3, 3), (1, 0, 0, 0), float("inf")), r"toy\.x_test holds Inf at index \(1, 0, 0, 0\)"),
    ("x_train", with_value(torch.rand(6, 4), (5, 3), -float("inf")), r"toy\.x_train holds Inf at index \(5, 3\)"),
])
def test_nan_and_inf_inputs_are_named_with_the_first_bad_index(field, value, match):
    changes = {field: value} if value.dim() == 4 else {"x_train": value, "x_test": torch.rand(2, 4)}
    with pytest.raises(ValueError, match=match):
        toy(**changes)


@pytest.mark.parametrize("labels, match", [
    (torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]), r"toy\.y_train must be integer class indices.*float32"),
    (torch.tensor([0, 1, -1, 1, 0, 1]), r"toy\.y_train holds a negative label -1 at index 2"),
    (torch.tensor([0, 1, 0, 2, 0, 1]), r"toy\.y_train holds label 2 at index 3, but there are only 2 classes"),
    (torch.tensor([0, 1, 0]), r"toy\.y_train holds 3 labels for 6 samples"),
])
def test_bad_labels_are_named(labels, match):
    with pytest.raises(ValueError, match=match):
        toy(y_train=labels)


def test_numpy_arrays_are_refused_with_a_type_error():
    with pytest.raises(TypeError, match=r"toy\.x_train must be a torch\.Tensor, got numpy\.ndarray.*torch\.as_tensor"):
        toy(x_train=np.random.rand(6, 1, 3, 3).astype(np.float32))
    with pytest.raises(TypeError, match=r"toy\.y_test must be a torch\.Tensor, got numpy\.ndarray"):
        toy(y_test=np.array([0, 1]))


def test_integer_inputs_and_mismatched_sample_shapes_are_refused():
    with pytest.raises(ValueError, match=r"toy\.x_train must hold floats, got torch\.uint8"):
        toy(x_train=torch.zeros(6, 1, 3, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"x_test samples have shape \(1, 4, 4\) but x_train samples \(1, 3, 3\)"):
        toy(x_test=torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match="classes"):
        toy(classes=[])


def test_an_empty_training_split_is_refused(digits):
    with pytest.raises(ValueError, match=r"toy: the training split is empty \(x_train has shape \(0, 1, 3, 3\)\)"):
        toy(x_train=torch.rand(0, 1, 3, 3), y_train=torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="digits: the training split is empty"):
        digits.subset([])
    with pytest.raises(ValueError, match=r"partition: part\(s\) \[.*\] of 40 received no training samples"):
        partition(digits, 40, "dirichlet", alpha=0.001, min_size=0)


def test_subset_refuses_fractional_indices(digits):
    with pytest.raises(ValueError, match="integer row numbers or a boolean mask, got torch.float64"):
        digits.subset(np.array([0.7, 1.2]))
    assert len(digits.subset(torch.arange(1437) < 10).y_train) == 10  # a boolean mask still works


# ------------------------------------------------------------------------------------------ partitioners

def assert_partition(parts, n):
    joined = torch.cat(parts)
    assert all(p.dtype == torch.int64 for p in parts)
    assert len(joined) == n and torch.equal(joined.sort().values, torch.arange(n))  # disjoint and covering


def mean_label_entropy(parts, labels, n_classes=10):
    ent = []
    for p in parts:
        freq = torch.bincount(labels[p], minlength=n_classes).double() / len(p)
        ent.append(-(freq[freq > 0] * freq[freq > 0].log()).sum().item())
    return float(np.mean(ent))


def test_iid(digits):
    parts = iid(digits.y_train, 7, seed=1)
    assert_partition(parts, 1437)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert all(torch.equal(a, b) for a, b in zip(parts, iid(digits.y_train, 7, seed=1)))
    assert not torch.equal(parts[0], iid(digits.y_train, 7, seed=2)[0])
    assert [len(p) for p in iid(torch.zeros(10), 3)] == [4, 3, 3]


def test_dirichlet_skew_and_determinism(digits):
    y = digits.y_train
    skewed, flat = dirichlet(y, 10, alpha=0.1, seed=0), dirichlet(y, 10, alpha=100.0, seed=0)
    assert_partition(skewed, len(y))
    assert_partition(flat, len(y))
    assert mean_label_entropy(skewed, y) < mean_label_entropy(flat, y) - 0.5
    assert mean_label_entropy(flat, y) > 0.95 * np.log(10)
    assert all(torch.equal(a, b) for a, b in zip(skewed, dirichlet(y, 10, alpha=0.1, seed=0)))
    assert any(not torch.equal(a, b) for a, b in zip(skewed, dirichlet(y, 10, alpha=0.1, seed=1)))
    assert min(map(len, dirichlet(y, 10, alpha=0.5, seed=0, min_size=50))) >= 50


def test_dirichlet_gives_up_with_an_explanation(digits):
    with pytest.raises(ValueError, match=r"min_size=20.*alpha=0\.001"):
        dirichlet(digits.y_train, 40, alpha=0.001, min_size=20)
    with pytest.raises(ValueError, match="min_size=100"):
        dirichlet(torch.zeros(50), 2, alpha=1.0, min_size=100)


def test_shards():
    y = torch.arange(10).repeat_interleave(30)  # 300 samples, 10 balanced classes
    parts = shards(y, 10, shards_per_party=2, seed=0)
    assert_partition(parts, 300)
    assert all(len(p) == 30 and len(y[p].unique()) <= 2 for p in parts)
    assert all(len(y[p].unique()) == 1 for p in shards(y, 10, shards_per_party=1, seed=3))
    assert all(torch.equal(a, b) for a, b in zip(parts, shards(y, 10, seed=0)))
    assert any(not torch.equal(a, b) for a, b in zip(parts, shards(y, 10, seed=1)))


def test_partition_returns_datasets(digits):
    clients = partition(digits, 4, "dirichlet", alpha=0.5, seed=0)
    assert len(clients) == 4 and sum(len(c.y_train) for c in clients) == 1437
    assert all(c.x_test is digits.x_test and c.name == "digits" for c in clients)
    assert [len(c.y_train) for c in partition(digits, 3)] == [479, 479, 479]
    assert set(PARTITIONERS) == {"iid", "dirichlet", "shards"}


@pytest.mark.parametrize("call, bad", [
    (lambda y: iid(y, 0), "0"),
    (lambda y: iid(y, 101), "101"),
    (lambda y: dirichlet(y, 5, alpha=0), "alpha.*0"),
    (lambda y: dirichlet(y, 5, alpha=-2.5), "-2.5"),
    (lambda y: shards(y, 5, shards_per_party=0), "shards_per_party.*0"),
    (lambda y: shards(y, 60, shards_per_party=2), "120"),
    (lambda y: iid(y, 2.5), "n_parties must be a positive int, got 2.5"),
    (lambda y: iid(y, 3, seed=-1), "seed must be a non-negative int, got -1"),
    (lambda y: dirichlet(y, 5, alpha=float("nan")), "alpha must be a positive number, got nan"),
    (lambda y: dirichlet(y, 5, alpha=1.0, max_attempts=0), "max_attempts must be a positive int, got 0"),
    (lambda y: dirichlet(y, 5, alpha=1.0, min_size=-1), "min_size must be a non-negative int, got -1"),
])
def test_partitioner_bad_inputs(call, bad):
    with pytest.raises(ValueError, match=bad):
        call(torch.arange(100) % 10)


def test_partition_unknown_scheme_and_numpy_scalars(digits):
    with pytest.raises(ValueError, match="'pathological'"):
        partition(digits, 3, "pathological")
    with pytest.raises(TypeError, match="needs a toolkit.data.Dataset, got Tensor"):
        partition(digits.x_train, 3)
    parts = partition(digits, np.int64(3), "dirichlet", alpha=np.float32(0.5), min_size=np.int64(1))
    assert len(parts) == 3  # NumPy scalars are accepted as the numbers they hold


# ------------------------------------------------------------------------------------------ vertical splits

def test_vertical_halves_and_tiles_reassemble(digits):
    left, right = vertical_split(digits, 2)
    assert (left.name, right.name) == ("digits[left]", "digits[right]") and left.shape == (1, 8, 4)
    assert torch.equal(torch.cat([left.x_train, right.x_train], dim=3), digits.x_train)
    assert torch.equal(torch.cat([left.x_test, right.x_test], dim=3), digits.x_test)
    assert torch.equal(left.y_train, digits.y_train) and torch.equal(right.y_test, digits.y_test)
    tl, tr, bl, br = vertical_split(digits, 4, mode="tiles")
    assert br.name == "digits[bottom-right]" and tl.shape == (1, 4, 4)
    top, bottom = torch.cat([tl.x_train, tr.x_train], 3), torch.cat([bl.x_train, br.x_train], 3)
    assert torch.equal(torch.cat([top, bottom], 2), digits.x_train)


def test_vertical_odd_width():
    x = torch.rand(6, 3, 5, 7)
    ds = Dataset("odd", x, torch.arange(6) % 2, x[:2], torch.tensor([0, 1]), ["a", "b"])
    left, right = vertical_split(ds, 2)
    assert left.shape == (3, 5, 3) and right.shape == (3, 5, 4)
    tiles = vertical_split(ds, 4, mode="tiles")
    assert [t.shape[1:] for t in tiles] == [(2, 3), (2, 4), (3, 3), (3, 4)]


def test_vertical_tabular(cancer):
    a, b = vertical_split(cancer, 2)
    assert (a.name, b.name) == ("breast_cancer[cols 0-14]", "breast_cancer[cols 15-29]")
    assert torch.equal(torch.cat([a.x_test, b.x_test], 1), cancer.x_test)
    assert a.feature_names == cancer.feature_names[:15] and torch.equal(b.y_train, cancer.y_train)
    loan = load("loan", n_samples=500)
    assert [p.shape for p in vertical_split(loan, 3)] == [(3,), (3,), (2,)]
    bank, shop = vertical_split(loan, [["income", "credit_score", "late_payments"], ["age", 4]])
    assert bank.feature_names == ["income", "credit_score", "late_payments"]
    assert shop.feature_names == ["age", "employment_years"]
    assert torch.equal(bank.x_train, loan.x_train[:, [1, 3, 7]]) and torch.equal(shop.x_test, loan.x_test[:, [0, 4]])


@pytest.mark.parametrize("parts, mode, bad", [
    (3, "halves", "parts=3"), (2, "tiles", "parts=2"), (4, "halves", "parts=4"), (2, "strips", "'strips'")])
def test_vertical_bad_image_inputs(digits, parts, mode, bad):
    with pytest.raises(ValueError, match=bad):
        vertical_split(digits, parts, mode=mode)


@pytest.mark.parametrize("parts, bad", [
    ([["mean radius"], ["mean radius", "mean area"]], "'mean radius'.*overlap"),
    ([["mean radius"], [0]], "0.*overlap"),
    ([["mean radiuss"]], "'mean radiuss'"),
    ([[30]], "30"), (0, "0"), (31, "31"), ([[]], r"\[\]")])
def test_vertical_bad_tabular_inputs(cancer, parts, bad):
    with pytest.raises(ValueError, match=bad):
        vertical_split(cancer, parts)


def test_vertical_tiles_on_tabular(cancer):
    with pytest.raises(ValueError, match="'tiles'"):
        vertical_split(cancer, 4, mode="tiles")
