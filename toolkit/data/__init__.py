"""Datasets, downloads, partitioners and vertical splits for split and federated learning experiments.

Example:
    >>> from toolkit.data import load, partition, vertical_split
    >>> ds = load("digits", seed=0)
    >>> clients = partition(ds, 5, "dirichlet", alpha=0.5, seed=0)
    >>> left, right = vertical_split(ds, 2)
"""
from .datasets import DATASETS, FASHION_MNIST_CLASSES, LOAN_FEATURES, Dataset, load
from .download import DOWNLOADS, ChecksumError, DownloadError, Remote, default_root, fetch
from .folders import (CIFAR10_CLASSES, IDX_IMAGES, IDX_LABELS, DatasetNotFoundError, read_cifar10, read_idx,
                      read_mnist)
from .partition import PARTITIONERS, dirichlet, iid, partition, shards, vertical_split

__all__ = [
    "DATASETS", "FASHION_MNIST_CLASSES", "LOAN_FEATURES", "Dataset", "load",
    "DOWNLOADS", "ChecksumError", "DownloadError", "Remote", "default_root", "fetch",
    "CIFAR10_CLASSES", "IDX_IMAGES", "IDX_LABELS", "DatasetNotFoundError", "read_cifar10", "read_idx", "read_mnist",
    "PARTITIONERS", "dirichlet", "iid", "partition", "shards", "vertical_split",
]
