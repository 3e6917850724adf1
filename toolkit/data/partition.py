"""Split a dataset among parties: by samples (horizontal, for federated learning) or by features
(vertical, for split learning). Every partitioner is deterministic given ``seed``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

from toolkit import validate

from .datasets import Dataset


def _labels(labels: Tensor | np.ndarray | Sequence[int]) -> np.ndarray:
    y = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    return y


def _check_parties(n_parties: int, n: int, seed: int) -> int:
    validate.non_negative_int("seed", seed)
    n_parties = validate.positive_int("n_parties", n_parties)
    if n_parties > n:
        raise ValueError(f"n_parties must lie between 1 and the number of samples ({n}), got {n_parties}")
    return n_parties


def _out(groups: list[np.ndarray]) -> list[Tensor]:
    return [torch.from_numpy(np.sort(g).astype(np.int64)) for g in groups]


def iid(labels: Tensor, n_parties: int, *, seed: int = 0) -> list[Tensor]:
    """Shuffle the samples and deal them out: party sizes differ by at most one.

    Args:
        labels: ``(N,)`` class labels (only their number matters here).
        n_parties: how many parties.
        seed: seeds the shuffle.

    Returns:
        ``n_parties`` sorted int64 index tensors, disjoint and together covering ``range(N)``.

    Example:
        >>> [len(i) for i in iid(torch.zeros(10), 3)]
        [4, 3, 3]
    """
    y = _labels(labels)
    n_parties = _check_parties(n_parties, len(y), seed)
    perm = np.random.default_rng(seed).permutation(len(y))
    return _out(np.array_split(perm, n_parties))


def dirichlet(labels: Tensor, n_parties: int, *, alpha: float, seed: int = 0, min_size: int = 1,
              max_attempts: int = 1000) -> list[Tensor]:
    """Label-skewed split: each class is divided among parties in proportions drawn from Dirichlet(alpha).

    Small ``alpha`` (0.1) gives each party few classes; large ``alpha`` (100) approaches IID
    (Hsu et al. 2019). Draws are repeated until every party holds at least ``min_size`` samples.

    Args:
        labels: ``(N,)`` class labels.
        n_parties: how many parties.
        alpha: Dirichlet concentration, > 0.
        seed: seeds the NumPy Generator.
        min_size: smallest acceptable party.
        max_attempts: draws before giving up with a ``ValueError``.

    Returns:
        ``n_parties`` sorted int64 index tensors, disjoint and covering ``range(N)``.

    Example:
        >>> parts = dirichlet(load("digits").y_train, 5, alpha=0.5)  # doctest: +SKIP
    """
    y = _labels(labels)
    n_parties = _check_parties(n_parties, len(y), seed)
    alpha = validate.positive("alpha", alpha)
    min_size = validate.non_negative_int("min_size", min_size)
    max_attempts = validate.positive_int("max_attempts", max_attempts)
    if n_parties * min_size > len(y):
        raise ValueError(f"{n_parties} parties x min_size={min_size} needs {n_parties * min_size} samples, "
                         f"only {len(y)} available")
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    for _ in range(max_attempts):
        groups: list[list[np.ndarray]] = [[] for _ in range(n_parties)]
        for idx in by_class:
            idx = rng.permutation(idx)
            cuts = (np.cumsum(rng.dirichlet(np.full(n_parties, float(alpha)))) * len(idx)).astype(int)[:-1]
            for party, chunk in enumerate(np.split(idx, cuts)):
                groups[party].append(chunk)
        parts = [np.concatenate(g) for g in groups]
        if min(len(p) for p in parts) >= min_size:
            return _out(parts)
    raise ValueError(f"dirichlet: no draw in {max_attempts} attempts gave every one of {n_parties} parties "
                     f"at least min_size={min_size} samples with alpha={alpha}; raise alpha, lower n_parties "
                     "or lower min_size")


def shards(labels: Tensor, n_parties: int, *, shards_per_party: int = 2, seed: int = 0) -> list[Tensor]:
    """Pathological non-IID split (McMahan et al. 2017): sort by label, cut into
    ``n_parties * shards_per_party`` equal shards and deal each party ``shards_per_party`` at random.

    A party sees at most ``shards_per_party`` classes when class sizes are multiples of the shard
    size; otherwise a shard straddling a class boundary adds one more class.

    Args:
        labels: ``(N,)`` class labels.
        n_parties: how many parties.
        shards_per_party: shards dealt to each party.
        seed: seeds the order within each class and the deal.

    Returns:
        ``n_parties`` sorted int64 index tensors, disjoint and covering ``range(N)``.

    Example:
        >>> parts = shards(torch.arange(10).repeat_interleave(20), 10)  # each party: 2 classes
    """
    y = _labels(labels)
    n_parties = _check_parties(n_parties, len(y), seed)
    shards_per_party = validate.positive_int("shards_per_party", shards_per_party)
    n_shards = n_parties * shards_per_party
    if n_shards > len(y):
        raise ValueError(f"{n_parties} parties x shards_per_party={shards_per_party} = {n_shards} shards, "
                         f"more than the {len(y)} samples")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    order = perm[np.argsort(y[perm], kind="stable")]  # sorted by label, random within a label
    pieces = np.array_split(order, n_shards)
    deal = rng.permutation(n_shards).reshape(n_parties, shards_per_party)
    return _out([np.concatenate([pieces[s] for s in row]) for row in deal])


PARTITIONERS: dict[str, Callable[..., list[Tensor]]] = {"iid": iid, "dirichlet": dirichlet, "shards": shards}


def partition(ds: Dataset, n_parties: int, scheme: str = "iid", *, seed: int = 0, **kwargs) -> list[Dataset]:
    """Split ``ds``'s training set among parties; each party keeps the whole test split.

    Args:
        ds: the dataset.
        n_parties: how many parties.
        scheme: a key of ``PARTITIONERS``: iid, dirichlet (needs ``alpha``), shards.
        seed: seeds the partitioner.
        **kwargs: passed to the partitioner (``alpha``, ``min_size``, ``shards_per_party``).

    Returns:
        One ``Dataset`` per party (``ds.subset`` of its training rows).

    Example:
        >>> parties = partition(load("digits"), 4, "dirichlet", alpha=0.3)  # doctest: +SKIP
    """
    if not isinstance(ds, Dataset):
        raise TypeError(f"partition needs a toolkit.data.Dataset, got {type(ds).__name__}")
    if scheme not in PARTITIONERS:
        raise ValueError(f"unknown partition scheme {scheme!r}; known: {', '.join(PARTITIONERS)}")
    parts = PARTITIONERS[scheme](ds.y_train, n_parties, seed=seed, **kwargs)
    empty = [i for i, idx in enumerate(parts) if len(idx) == 0]
    if empty:
        raise ValueError(f"partition: part(s) {empty} of {len(parts)} received no training samples "
                         f"({scheme}, {kwargs}); each party needs at least one: use min_size >= 1")
    return [ds.subset(idx) for idx in parts]


# ---------------------------------------------------------------------------------------------- vertical

_IMAGE_LAYOUTS = {("halves", 2): ["left", "right"],
                  ("tiles", 4): ["top-left", "top-right", "bottom-left", "bottom-right"]}


def _image_part(x: Tensor, where: str) -> Tensor:  # x: (N, C, H, W)
    h, w = x.shape[2] // 2, x.shape[3] // 2
    rows = slice(None) if where in ("left", "right") else slice(None, h) if where.startswith("top") else slice(h, None)
    cols = slice(None, w) if where.endswith("left") else slice(w, None)
    return x[:, :, rows, cols].contiguous()


def _column_groups(ds: Dataset, parts: int | Sequence[Sequence[str | int]]) -> list[list[int]]:
    n_features = ds.x_train.shape[1]
    if isinstance(parts, (int, np.integer)) and not isinstance(parts, bool):
        parts = validate.positive_int("parts", parts)
        if parts > n_features:
            raise ValueError(f"parts must lie between 1 and the {n_features} features, got {parts}")
        return [g.tolist() for g in np.array_split(np.arange(n_features), parts)]
    if isinstance(parts, (str, bytes)) or not isinstance(parts, Sequence) or not parts:
        raise ValueError(f"parts must be an int or a non-empty list of column groups, got {parts!r}")
    names = ds.feature_names or []
    groups, seen = [], {}
    for g, group in enumerate(parts):
        if isinstance(group, (str, int)) or not group:
            raise ValueError(f"each group must be a non-empty list of feature names or indices, got {group!r}")
        cols = []
        for item in group:
            if isinstance(item, str):
                if item not in names:
                    raise ValueError(f"unknown feature {item!r} in {ds.name}; features: {', '.join(names) or 'unnamed'}")
                col = names.index(item)
            elif isinstance(item, (int, np.integer)) and not isinstance(item, bool) and 0 <= item < n_features:
                col = int(item)
            else:
                raise ValueError(f"bad column {item!r}: use a feature name or an index in [0, {n_features})")
            if col in seen:
                raise ValueError(f"column {item!r} appears in group {seen[col]} and group {g}: groups must not overlap")
            seen[col] = g
            cols.append(col)
        groups.append(cols)
    return groups


def _cols_label(cols: list[int]) -> str:
    if len(cols) == 1:
        return f"col {cols[0]}"
    if cols == list(range(cols[0], cols[-1] + 1)):
        return f"cols {cols[0]}-{cols[-1]}"
    return "cols " + ",".join(map(str, cols))


def vertical_split(ds: Dataset, parts: int | Sequence[Sequence[str | int]], *, mode: str = "halves") -> list[Dataset]:
    """Split the features of every sample among parties (vertical / split learning).

    Each part keeps the same samples in the same order with the same labels, for train and test.

    Args:
        ds: the dataset.
        parts: images: 2 (``mode="halves"``: left | right, split along the width, left gets the floor)
            or 4 (``mode="tiles"``: 2x2 tiles, top-left, top-right, bottom-left, bottom-right).
            Tabular: an int (that many contiguous, near-equal column groups) or a list of groups,
            each a list of feature names or column indices; groups must not overlap.
        mode: ``"halves"`` or ``"tiles"``; images only (tabular data is split by columns).

    Returns:
        One ``Dataset`` per part, named e.g. ``"digits[left]"`` or ``"breast_cancer[cols 0-14]"``.

    Example:
        >>> from toolkit.data import load
        >>> left, right = vertical_split(load("digits"), 2)
        >>> left.shape, right.shape
        ((1, 8, 4), (1, 8, 4))
    """
    if not isinstance(ds, Dataset):
        raise TypeError(f"vertical_split needs a toolkit.data.Dataset, got {type(ds).__name__}")
    if mode not in ("halves", "tiles"):
        raise ValueError(f"unknown mode {mode!r}; supported: 'halves' (parts=2) and 'tiles' (parts=4)")
    if ds.is_image:
        key = (mode, int(parts) if isinstance(parts, (int, np.integer)) and not isinstance(parts, bool) else None)
        if key not in _IMAGE_LAYOUTS:
            raise ValueError(f"images support mode='halves' with parts=2 or mode='tiles' with parts=4; "
                             f"got mode={mode!r}, parts={parts!r}")
        return [replace(ds, name=f"{ds.name}[{where}]", x_train=_image_part(ds.x_train, where),
                        x_test=_image_part(ds.x_test, where)) for where in _IMAGE_LAYOUTS[key]]
    if ds.x_train.dim() != 2:
        raise ValueError(f"vertical_split needs (N, C, H, W) images or (N, F) tables, got {tuple(ds.x_train.shape)}")
    if mode != "halves":
        raise ValueError(f"mode={mode!r} applies to images; tabular data is split by columns (pass parts)")
    out = []
    for cols in _column_groups(ds, parts):
        idx = torch.tensor(cols, dtype=torch.long)
        names = [ds.feature_names[c] for c in cols] if ds.feature_names else None
        out.append(replace(ds, name=f"{ds.name}[{_cols_label(cols)}]", x_train=ds.x_train[:, idx],
                           x_test=ds.x_test[:, idx], feature_names=names))
    return out
