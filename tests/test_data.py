"""Tests for toolkit.data: built-in datasets, folder parsers (MNIST IDX, CIFAR-10 pickles),
partitioners and vertical splits."""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from toolkit.data import (DATASETS, IDX_IMAGES, IDX_LABELS, LOAN_FEATURES, PARTITIONERS, Dataset, dirichlet, iid,
                          load, partition, read_cifar10, read_idx, read_mnist, shards, vertical_split)

MNIST_NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


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
    assert set(DATASETS) == {"digits", "breast_cancer", "loan", "mnist", "cifar10"}


def test_subset_keeps_test_split(digits):
    sub = digits.subset(torch.tensor([5, 0, 9]))
    assert torch.equal(sub.x_train, digits.x_train[[5, 0, 9]]) and torch.equal(sub.y_train, digits.y_train[[5, 0, 9]])
    assert sub.x_test is digits.x_test and sub.name == "digits"
    assert len(digits.subset([1, 2]).y_train) == 2 and len(digits.subset(np.arange(4)).y_train) == 4


# ------------------------------------------------------------------------------------------ MNIST (IDX files)

def write_idx(path: Path, array: np.ndarray, magic: int) -> Path:
    blob = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        blob = gzip.compress(blob)
    path.write_bytes(blob)
    return path


def write_mnist(folder: Path, n: int, prefixes=("train", "t10k"), gz: bool = False, seed: int = 0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix in prefixes:
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % 10
        ext = ".gz" if gz else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images, IDX_IMAGES)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels, IDX_LABELS)
        out[prefix] = (images, labels)
    return out


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_round_trip(tmp_path, suffix):
    images = np.random.default_rng(0).integers(0, 256, size=(3, 5, 4), dtype=np.uint8)
    path = write_idx(tmp_path / f"images{suffix}", images, IDX_IMAGES)
    back = read_idx(path, magic=IDX_IMAGES)
    assert back.dtype == np.uint8 and back.shape == (3, 5, 4) and np.array_equal(back, images)
    labels = write_idx(tmp_path / f"labels{suffix}", np.array([7, 2, 1]), IDX_LABELS)
    assert read_idx(labels).tolist() == [7, 2, 1]


def test_read_idx_rejects_corrupt_files(tmp_path):
    good = write_idx(tmp_path / "images", np.zeros((4, 3, 3), np.uint8), IDX_IMAGES)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(ValueError, match="truncated.*truncated"):
        read_idx(truncated)
    trailing = tmp_path / "trailing"
    trailing.write_bytes(good.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="trailing"):
        read_idx(trailing)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"PK\x03\x04 not an idx file")
    with pytest.raises(ValueError, match="garbage.*magic"):
        read_idx(garbage)
    bad_gz = tmp_path / "bad.gz"
    bad_gz.write_bytes(gzip.compress(good.read_bytes())[:20])
    with pytest.raises(ValueError, match="bad.gz"):
        read_idx(bad_gz)
    with pytest.raises(ValueError, match="2049.*2051"):
        read_idx(good, magic=IDX_LABELS)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_folder_with_train_and_test(tmp_path, gz):
    written = write_mnist(tmp_path, 20, gz=gz)
    ds = load("mnist", root=tmp_path)
    assert ds.x_train.shape == (20, 1, 28, 28) and ds.x_test.shape == (20, 1, 28, 28)
    assert torch.equal(ds.x_train[:, 0], torch.from_numpy(written["train"][0]).float() / 255)
    assert torch.equal(ds.y_test, torch.from_numpy(written["t10k"][1]).long())
    assert ds.x_train.dtype == torch.float32 and 0 <= ds.x_train.min() and ds.x_train.max() <= 1
    assert load("mnist", root=tmp_path, image_size=14).x_test.shape == (20, 1, 14, 14)


def test_mnist_t10k_only_is_split_80_20(tmp_path):
    write_mnist(tmp_path, 50, prefixes=("t10k",), gz=True)
    ds = load("mnist", root=tmp_path, seed=1)
    assert len(ds.y_train) == 40 and len(ds.y_test) == 10
    assert torch.bincount(ds.y_test).tolist() == [1] * 10  # stratified
    assert "t10k" in ds.description and "80/20" in ds.description
    assert torch.equal(ds.x_train, load("mnist", root=tmp_path, seed=1).x_train)
    assert not torch.equal(ds.y_train, load("mnist", root=tmp_path, seed=2).y_train)


def test_mnist_missing_files_are_named(tmp_path):
    with pytest.raises(ValueError) as err:
        load("mnist", root=tmp_path)
    assert all(name in str(err.value) for name in MNIST_NAMES) and ".gz" in str(err.value)
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte"):
        load("mnist")
    write_mnist(tmp_path, 10, prefixes=("t10k",))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"")  # half a train pair
    with pytest.raises(ValueError, match="missing: train-labels-idx1-ubyte$"):
        read_mnist(tmp_path)


def test_mnist_corrupt_file_is_named(tmp_path):
    write_mnist(tmp_path, 10, prefixes=("t10k",))
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.*truncated"):
        load("mnist", root=tmp_path)


def test_real_mnist_test_set(shared_data):
    labels = read_idx(shared_data / "mnist" / "t10k-labels-idx1-ubyte.gz", magic=IDX_LABELS)
    assert labels.shape == (10_000,) and labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    ds = load("mnist", root=shared_data / "mnist")
    assert ds.x_train.shape == (8000, 1, 28, 28) and ds.x_test.shape == (2000, 1, 28, 28)
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0 and ds.n_classes == 10
    assert torch.bincount(torch.cat([ds.y_train, ds.y_test])).tolist() == np.bincount(labels).tolist()


# ------------------------------------------------------------------------------------------ CIFAR-10 (pickles)

def write_cifar(folder: Path, n: int = 10, protocol: int = 2, meta: list[bytes] | None = None) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = []
    for b, name in enumerate(names):
        data = np.zeros((n, 3072), dtype=np.uint8)
        data[:, 0] = b  # marks the batch
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": [(i + b) % 10 for i in range(n)]},
                        f, protocol=protocol)
        batches.append(data)
    if meta is not None:
        with open(folder / "batches.meta", "wb") as f:
            pickle.dump({b"label_names": meta, b"num_vis": 3072}, f, protocol=protocol)
    return batches


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_round_trip_and_pixel_layout(tmp_path, protocol):
    write_cifar(tmp_path, protocol=protocol)
    # image 3 of data_batch_2: green (c=1) pixel at row 5, column 7 = 200; layout R plane, G plane, B plane
    with open(tmp_path / "data_batch_2", "rb") as f:
        batch = pickle.load(f)
    batch[b"data"][3, 1 * 1024 + 5 * 32 + 7] = 200
    with open(tmp_path / "data_batch_2", "wb") as f:
        pickle.dump(batch, f, protocol=protocol)
    ds = load("cifar10", root=tmp_path)
    assert ds.x_train.shape == (50, 3, 32, 32) and ds.x_test.shape == (10, 3, 32, 32)
    assert ds.x_train.dtype == torch.float32 and ds.x_train.max() <= 1.0
    image = ds.x_train[10 + 3]  # batches are concatenated in order
    assert image[1, 5, 7] == pytest.approx(200 / 255)
    assert image[0, 0, 0] == pytest.approx(1 / 255)  # the batch marker sits at (c=0, h=0, w=0)
    assert image.sum() == pytest.approx(201 / 255)
    assert ds.y_train[:3].tolist() == [0, 1, 2] and ds.y_train[10:13].tolist() == [1, 2, 3]
    assert ds.x_test[:, 0, 0, 0].mul(255).round().unique().tolist() == [5.0]
    assert ds.classes[0] == "airplane" and ds.n_classes == 10


def test_cifar10_meta_names_and_subfolder(tmp_path):
    names = [f"class{i}".encode() for i in range(10)]
    write_cifar(tmp_path / "cifar-10-batches-py", n=4, protocol=5, meta=names)
    out = read_cifar10(tmp_path)
    assert out["classes"] == [f"class{i}" for i in range(10)]
    assert out["train"][0].shape == (20, 3, 32, 32) and out["train"][0].dtype == np.uint8


def test_cifar10_missing_and_bad_files(tmp_path):
    write_cifar(tmp_path, n=2)
    os.remove(tmp_path / "test_batch")
    with pytest.raises(ValueError, match=r"data_batch_1.*data_batch_5.*test_batch.*missing: test_batch$"):
        load("cifar10", root=tmp_path)
    (tmp_path / "test_batch").write_bytes(b"\x80\x04 garbage")
    with pytest.raises(ValueError, match="test_batch"):
        load("cifar10", root=tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:  # a pickle that would call os.getcwd: refused
        pickle.dump({b"data": os.getcwd, b"labels": []}, f)
    with pytest.raises(ValueError, match="refusing.*getcwd"):
        load("cifar10", root=tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"test_batch.*3072"):
        load("cifar10", root=tmp_path)
    with pytest.raises(ValueError, match="data_batch_1"):
        load("cifar10")


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
])
def test_partitioner_bad_inputs(call, bad):
    with pytest.raises(ValueError, match=bad):
        call(torch.arange(100) % 10)


def test_partition_unknown_scheme(digits):
    with pytest.raises(ValueError, match="'pathological'"):
        partition(digits, 3, "pathological")


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
