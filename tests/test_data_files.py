"""Dataset files: the folder readers (MNIST / Fashion-MNIST IDX, CIFAR-10 binary and python versions), on
small files these tests write; the real MNIST test set when ../shared is there."""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from toolkit.data import (FASHION_MNIST_CLASSES, IDX_IMAGES, IDX_LABELS, DatasetNotFoundError, load, read_cifar10,
                          read_idx, read_mnist)

MNIST_NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


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


def test_mnist_missing_files_are_named(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError) as err:
        load("mnist", root=tmp_path)
    assert all(name in str(err.value) for name in MNIST_NAMES) and ".gz" in str(err.value)
    assert "download=True" in str(err.value) and isinstance(err.value, (FileNotFoundError, ValueError))
    monkeypatch.setenv("LEAKLAB_DATA", str(tmp_path / "cache"))  # no root: the default folder is searched
    with pytest.raises(DatasetNotFoundError, match=r"cache/mnist: .*t10k-images-idx3-ubyte"):
        load("mnist")
    write_mnist(tmp_path, 10, prefixes=("t10k",))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"")  # half a train pair
    with pytest.raises(ValueError, match="missing: train-labels-idx1-ubyte;"):
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


# ------------------------------------------------------------------------------------------ CIFAR-10 (python version)

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
    with pytest.raises(DatasetNotFoundError, match=r"data_batch_1.*data_batch_5.*test_batch.*missing: test_batch;"
                                                    r".*download=True"):
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
        read_cifar10(None)


# ------------------------------------------------------------------------------------------ CIFAR-10 (binary), Fashion-MNIST

def write_cifar_bin(folder: Path, n: int = 4, classes: list[str] | None = None) -> list[np.ndarray]:
    """The binary version: records of one label byte and 3072 pixels; pixel 0 of every image marks its batch."""
    folder.mkdir(parents=True, exist_ok=True)
    batches = []
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        records = np.zeros((n, 3073), dtype=np.uint8)
        records[:, 0] = [(i + b) % 10 for i in range(n)]
        records[:, 1] = b
        (folder / f"{name}.bin").write_bytes(records.tobytes())
        batches.append(records)
    if classes is not None:
        (folder / "batches.meta.txt").write_text("\n".join(classes) + "\n\n")
    return batches


def test_cifar10_binary_version_layout_and_meta(tmp_path):
    batches = write_cifar_bin(tmp_path / "cifar-10-batches-bin", classes=[f"c{i}" for i in range(10)])
    raw = bytearray((tmp_path / "cifar-10-batches-bin" / "data_batch_2.bin").read_bytes())
    raw[3 * 3073 + 1 + 1 * 1024 + 5 * 32 + 7] = 200  # image 3 of batch 2: green (c=1) pixel at row 5, column 7
    (tmp_path / "cifar-10-batches-bin" / "data_batch_2.bin").write_bytes(bytes(raw))
    write_cifar(tmp_path, n=2)  # a python version beside it: the binary version wins
    ds = load("cifar10", root=tmp_path)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    assert ds.x_train[4 + 3, 1, 5, 7] == pytest.approx(200 / 255) and ds.x_train[4 + 3, 0, 0, 0] == pytest.approx(1 / 255)
    assert ds.y_train.tolist() == np.concatenate([b[:, 0] for b in batches[:5]]).tolist()
    assert ds.classes == [f"c{i}" for i in range(10)]
    (tmp_path / "cifar-10-batches-bin" / "test_batch.bin").write_bytes(bytes(3073 * 2 - 1))
    with pytest.raises(ValueError, match=r"test_batch\.bin: not a CIFAR-10 binary batch: 6145 bytes.*3073"):
        read_cifar10(tmp_path)


def test_fashion_mnist_folder(tmp_path):
    written = write_mnist(tmp_path, 20, gz=True)
    ds = load("fashion_mnist", root=tmp_path)
    assert ds.name == "fashion_mnist" and ds.classes == FASHION_MNIST_CLASSES and "Fashion-MNIST" in ds.description
    assert torch.equal(ds.y_train, torch.from_numpy(written["train"][1]).long())
    with pytest.raises(DatasetNotFoundError, match=r"Fashion-MNIST files not found.*load\('fashion_mnist', download=True\)"):
        load("fashion_mnist", root=tmp_path / "empty")


# ------------------------------------------------------------------------------------------ downloads


def test_idx_files_present_needs_the_t10k_pair(tmp_path):
    from toolkit.data.folders import idx_files_present
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"")
    assert not idx_files_present(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"")
    assert idx_files_present(tmp_path) and not idx_files_present(tmp_path / "missing")
