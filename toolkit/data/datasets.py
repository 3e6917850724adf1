"""Datasets as tensors: the ``Dataset`` container, the ``DATASETS`` registry and ``load``.

Built in: ``digits`` and ``breast_cancer`` (bundled with scikit-learn), ``loan`` (synthetic, generated
from the seed). From files: ``mnist``, ``fashion_mnist`` (IDX files) and ``cifar10`` (binary or python
version), read from ``root`` or, without one, from ``default_root() / name`` (``$LEAKLAB_DATA`` if set,
else ``~/.cache/leaklab``); ``download=True`` fetches the official files there first, SHA-256 checked.
Every split is deterministic given ``seed``. ``Dataset`` checks its tensors once, when it is built.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor

from toolkit import validate

from .download import DOWNLOADS, default_root, fetch
from .folders import DatasetNotFoundError, read_cifar10, read_mnist


@dataclass(repr=False)
class Dataset:
    """A train/test pair of tensors with class names, for classification.

    Images are ``(N, C, H, W)`` float32 in [0, 1]; tabular data is ``(N, F)`` float32 standardized with
    the training split's mean and std. Labels are ``(N,)`` int64 class indices.

    Checked once, when built: inputs are float tensors (a NumPy array is refused with a TypeError;
    convert it with ``torch.as_tensor``) free of NaN/Inf, with the same per-sample shape in both
    splits; labels are integer tensors in ``[0, len(classes))``, one per input; the training split
    is not empty. Each error names the dataset, the tensor and, for values, the first bad index.

    Example:
        >>> ds = load("digits")
        >>> ds.shape, ds.n_classes, ds.is_image
        ((1, 8, 8), 10, True)
    """

    name: str
    x_train: Tensor  # (N, C, H, W) or (N, F)
    y_train: Tensor  # (N,)
    x_test: Tensor   # (M, C, H, W) or (M, F)
    y_test: Tensor   # (M,)
    classes: list[str]
    feature_names: list[str] | None = None  # tabular only
    description: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.classes, str) or not isinstance(self.classes, Sequence) or not self.classes:
            raise ValueError(f"{self.name}: classes must be a non-empty list of class names, got {self.classes!r}")
        for split in ("train", "test"):
            x = validate.tensor(getattr(self, f"x_{split}"), f"{self.name}.x_{split}", min_dim=2)
            if not x.is_floating_point():
                raise ValueError(f"{self.name}.x_{split} must hold floats, got {x.dtype}: convert with .float() "
                                 "(and scale images to [0, 1])")
            if not bool(torch.isfinite(x.sum())):  # one cheap pass; a NaN or Inf anywhere makes the sum non-finite
                validate.finite(x, f"{self.name}.x_{split}")  # names the first bad index (passes on mere overflow)
            validate.labels(getattr(self, f"y_{split}"), f"{self.name}.y_{split}", n_classes=len(self.classes),
                            length=len(x))
        if len(self.x_train) == 0:
            raise ValueError(f"{self.name}: the training split is empty (x_train has shape {tuple(self.x_train.shape)}); "
                             "a dataset, subset or partition needs at least one training sample")
        if self.x_test.shape[1:] != self.x_train.shape[1:]:
            raise ValueError(f"{self.name}: x_test samples have shape {tuple(self.x_test.shape[1:])} but x_train "
                             f"samples {tuple(self.x_train.shape[1:])}")

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one input, e.g. ``(1, 28, 28)`` or ``(30,)``."""
        return tuple(self.x_train.shape[1:])

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def is_image(self) -> bool:
        return self.x_train.dim() == 4

    def subset(self, train_idx: Tensor | Sequence[int] | np.ndarray) -> Dataset:
        """The same dataset with only the training rows ``train_idx`` (the test split is unchanged).

        Example:
            >>> load("digits").subset(torch.arange(100)).x_train.shape
            torch.Size([100, 1, 8, 8])
        """
        idx = torch.as_tensor(np.asarray(train_idx) if not isinstance(train_idx, Tensor) else train_idx)
        if idx.numel() and idx.dtype != torch.bool and (idx.is_floating_point() or idx.is_complex()):
            raise ValueError(f"{self.name}: subset needs integer row numbers or a boolean mask, got {idx.dtype} "
                             "(fractional indices would be truncated)")
        idx = idx if idx.dtype == torch.bool else idx.long()
        return replace(self, x_train=self.x_train[idx], y_train=self.y_train[idx])

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train {tuple(self.x_train.shape)}, "
                f"test {tuple(self.x_test.shape)}, {self.n_classes} classes)")


# ---------------------------------------------------------------------------------------------- helpers

def _split(y: np.ndarray, seed: int, test_size: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test row indices for labels ``y``."""
    idx = np.arange(len(y))
    train, test = train_test_split(idx, test_size=test_size, stratify=y, random_state=seed)
    return np.sort(train), np.sort(test)


def _images(x: np.ndarray, scale: float, image_size: int | None) -> Tensor:
    """``(N, C, H, W)`` array of pixel values -> float32 tensor in [0, 1], optionally resized."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32) / scale)
    if image_size is None:
        return t
    validate.positive_int("image_size", image_size)
    t = F.interpolate(t, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return t.clamp_(0.0, 1.0)


def _image_dataset(name: str, x: np.ndarray, y: np.ndarray, scale: float, image_size: int | None,
                   seed: int, classes: list[str], description: str,
                   test: tuple[np.ndarray, np.ndarray] | None = None) -> Dataset:
    """Build an image Dataset; without an explicit ``test`` pair, split ``(x, y)`` 80/20 stratified."""
    if test is None:
        tr, te = _split(y, seed)
        (x, y), test = (x[tr], y[tr]), (x[te], y[te])
    return Dataset(name, _images(x, scale, image_size), torch.as_tensor(y, dtype=torch.long),
                   _images(test[0], scale, image_size), torch.as_tensor(test[1], dtype=torch.long),
                   classes, description=description)


def _tabular_dataset(name: str, x: np.ndarray, y: np.ndarray, seed: int, classes: list[str],
                     feature_names: list[str], description: str) -> Dataset:
    """Split 80/20 stratified and standardize both splits with the training mean and std."""
    tr, te = _split(y, seed)
    mean, std = x[tr].mean(axis=0), x[tr].std(axis=0)
    std[std == 0] = 1.0
    z = ((x - mean) / std).astype(np.float32)
    return Dataset(name, torch.from_numpy(z[tr]), torch.as_tensor(y[tr], dtype=torch.long),
                   torch.from_numpy(z[te]), torch.as_tensor(y[te], dtype=torch.long),
                   classes, feature_names=list(feature_names), description=description)


# ---------------------------------------------------------------------------------------------- builders

def _digits(*, root: Path | None, seed: int, image_size: int | None = None) -> Dataset:
    raw = load_digits()
    x = raw.images.reshape(-1, 1, 8, 8)  # (1797, 1, 8, 8), values 0..16
    size = f", resized to {image_size}x{image_size}" if image_size else ""
    return _image_dataset("digits", x, raw.target, 16.0, image_size, seed, [str(d) for d in range(10)],
                          f"scikit-learn 8x8 handwritten digits{size}; stratified 80/20 split (seed {seed})")


def _breast_cancer(*, root: Path | None, seed: int) -> Dataset:
    raw = load_breast_cancer()
    return _tabular_dataset("breast_cancer", raw.data, raw.target, seed, list(raw.target_names),
                            list(raw.feature_names),
                            f"Wisconsin diagnostic breast cancer (569 x 30); stratified 80/20 split (seed {seed}), "
                            "standardized with train statistics")


LOAN_FEATURES = ["age", "income", "loan_amount", "credit_score", "employment_years",
                 "debt_to_income", "n_credit_lines", "late_payments"]


def _loan(*, root: Path | None, seed: int, n_samples: int = 10_000, positive_rate: float = 0.2) -> Dataset:
    n_samples = validate.positive_int("n_samples", n_samples)
    positive_rate = validate.fraction("positive_rate", positive_rate, zero=False)
    if min(positive_rate, 1 - positive_rate) * n_samples < 10:
        raise ValueError(f"n_samples={n_samples} with positive_rate={positive_rate} leaves fewer than "
                         "10 samples in one class; use more samples")
    rng = np.random.default_rng(seed)
    n = n_samples
    age = np.clip(rng.normal(41, 12, n), 18, 80).round()
    employment_years = np.minimum(rng.gamma(2.0, 3.5, n), age - 18).round(1)
    income = np.clip(rng.lognormal(np.log(48_000) + 0.012 * (age - 41), 0.5), 8_000, 600_000).round(-2)
    loan_amount = np.clip(income * rng.lognormal(np.log(0.3), 0.5, n), 1_000, 500_000).round(-2)
    credit_score = np.clip(rng.normal(680, 55, n) + 2.5 * employment_years, 300, 850).round()
    debt_to_income = np.clip(rng.beta(2.2, 5.0, n) + 0.1 * loan_amount / income, 0, 1.5).round(3)
    n_credit_lines = rng.poisson(2.5 + employment_years / 4)
    late_payments = rng.poisson(np.minimum(np.exp(0.2 - (credit_score - 680) / 60), 6.0))
    x = np.stack([age, income, loan_amount, credit_score, employment_years,
                  debt_to_income, n_credit_lines, late_payments], axis=1).astype(np.float64)

    def z(v: np.ndarray) -> np.ndarray:
        return (v - v.mean()) / v.std()

    logits = (-1.4 * z(credit_score) + 1.2 * z(debt_to_income) + 0.8 * z(late_payments)
              - 0.6 * z(np.log(income)) + 0.5 * z(np.log(loan_amount / income))
              - 0.4 * z(employment_years) - 0.2 * z(age) + 0.15 * z(n_credit_lines)
              + rng.normal(0, 0.5, n))  # noise the features cannot explain
    u = rng.random(n)  # y = u < sigmoid(logit + b): the realized positive rate rises with b
    lo, hi = -30.0, 30.0
    for _ in range(100):  # bisection on the intercept for the realized positive rate
        b = (lo + hi) / 2
        rate = np.mean(u < 1 / (1 + np.exp(-(logits + b))))
        lo, hi = (b, hi) if rate < positive_rate else (lo, b)
    y = (u < 1 / (1 + np.exp(-(logits + hi)))).astype(np.int64)
    return _tabular_dataset(
        "loan", x, y, seed, ["repaid", "default"], LOAN_FEATURES,
        f"synthetic loan defaults (seed {seed}, {n} borrowers, {y.mean():.1%} default) from a logistic "
        "model of the features plus noise; stratified 80/20 split, standardized with train statistics")


MNIST_CLASSES = [str(d) for d in range(10)]
# Fashion-MNIST's labels 0-9, as listed in the README of github.com/zalandoresearch/fashion-mnist.
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]


def _idx_dataset(name: str, title: str, classes: list[str], root: Path | None, seed: int,
                 image_size: int | None) -> Dataset:
    files = read_mnist(root, dataset=name)
    x_test, y_test = files["test"]
    if files["train"] is None:
        return _image_dataset(name, x_test[:, None], y_test, 255.0, image_size, seed, classes,
                              f"{title} from {root}: only the t10k files were found, so this is a stratified "
                              f"80/20 split (seed {seed}) of the 10,000-image test set")
    x_train, y_train = files["train"]
    return _image_dataset(name, x_train[:, None], y_train, 255.0, image_size, seed, classes,
                          f"{title} from {root}: official train/test split", test=(x_test[:, None], y_test))


def _mnist(*, root: Path | None, seed: int, image_size: int | None = None) -> Dataset:
    return _idx_dataset("mnist", "MNIST", MNIST_CLASSES, root, seed, image_size)


def _fashion_mnist(*, root: Path | None, seed: int, image_size: int | None = None) -> Dataset:
    return _idx_dataset("fashion_mnist", "Fashion-MNIST", FASHION_MNIST_CLASSES, root, seed, image_size)


def _cifar10(*, root: Path | None, seed: int, image_size: int | None = None) -> Dataset:
    files = read_cifar10(root)
    return _image_dataset("cifar10", *files["train"], 255.0, image_size, seed, files["classes"],
                          f"CIFAR-10 from {root}: official train/test split", test=files["test"])


DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": _digits,
    "breast_cancer": _breast_cancer,
    "loan": _loan,
    "mnist": _mnist,
    "fashion_mnist": _fashion_mnist,
    "cifar10": _cifar10,
}


def load(name: str, *, root: str | Path | None = None, seed: int = 0, download: bool = False,
         show_progress: bool = False, **options) -> Dataset:
    """Load a dataset by name.

    Args:
        name: one of ``DATASETS``: digits, breast_cancer, loan, mnist, fashion_mnist, cifar10.
        root: folder holding the files of mnist, fashion_mnist or cifar10; default
            ``default_root() / name``, i.e. ``$LEAKLAB_DATA/<name>`` if that variable is set, else
            ``~/.cache/leaklab/<name>``. Ignored by the built-in datasets.
        seed: seeds the train/test split (and the data itself for ``loan``).
        download: if the folder holds no loadable copy, download the official files into it first
            (SHA-256 checked; files already there are not downloaded again). Without it, missing
            files raise ``DatasetNotFoundError`` (a ``FileNotFoundError``) naming them.
        show_progress: a progress bar per downloaded file.
        **options: per dataset: ``image_size`` (digits, mnist, fashion_mnist, cifar10), ``n_samples``
            and ``positive_rate`` (loan).

    Returns:
        A ``Dataset``.

    Example:
        >>> load("digits", image_size=32).x_train.shape
        torch.Size([1437, 1, 32, 32])
        >>> mnist = load("mnist", download=True)  # doctest: +SKIP
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    seed = validate.non_negative_int("seed", seed)
    if not isinstance(download, bool) or not isinstance(show_progress, bool):
        raise TypeError(f"download and show_progress must be True or False, got {download!r} and {show_progress!r}")
    builder = DATASETS[name]
    accepted = [p for p in inspect.signature(builder).parameters if p not in ("root", "seed")]
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise TypeError(f"load({name!r}) got unknown option(s) {', '.join(map(repr, unknown))}; "
                        f"{name} accepts: {', '.join(accepted) or 'no options'}")
    folder = Path(root) if root is not None else default_root() / name if name in DOWNLOADS else None
    if download and name in DOWNLOADS:
        try:
            return builder(root=folder, seed=seed, **options)
        except DatasetNotFoundError:
            fetch(name, folder, show_progress=show_progress)
    return builder(root=folder, seed=seed, **options)
