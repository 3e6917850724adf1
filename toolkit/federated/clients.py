"""Many clients' data, stacked for a vectorized simulation, and the plan of one round.

Client ``i`` is the party ``client:i``; its samples never cross the wire. A round plan fixes
which clients take part and the order in which each visits its data, so the sequential and the
vectorized executors train on exactly the same batches.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from toolkit import validate


class ClientData:
    """The training data of N clients, padded to a common length: ``x`` is (N, n_max, ...),
    ``y`` is (N, n_max) class labels (or (N, n_max, ...) float targets for a regression loss) and
    ``counts`` (N,) says how many rows of each are real.

    Data is checked here, once: tensors (not NumPy arrays), no NaN/Inf in inputs or targets, class
    labels that are integers >= 0 (float labels are refused, not truncated). Errors name the
    client, the tensor and the first bad index.

    Args:
        datasets: one :class:`toolkit.data.Dataset` (or anything with ``x_train``/``y_train``)
            per client, e.g. from :func:`toolkit.data.partition`.
        regression: targets are float tensors (a regression loss such as ``FedConfig(loss="mse")``)
            rather than class labels.

    Example:
        >>> from toolkit import data
        >>> ds = data.load("digits")
        >>> bad = ds.subset(range(10)); bad.x_train[3, 0, 2, 5] = float("nan")
        >>> ClientData([ds.subset(range(10, 20)), bad])
        Traceback (most recent call last):
        ...
        ValueError: client:1 x_train holds NaN at index (3, 0, 2, 5): clean or drop that sample before training
    """

    def __init__(self, datasets: Sequence, *, regression: bool = False):
        if len(datasets) == 0:
            raise ValueError("federated learning needs at least one client, got zero")
        for i, ds in enumerate(datasets):
            _check_client(i, ds.x_train, ds.y_train, regression)
        shapes = {tuple(ds.x_train.shape[1:]) for ds in datasets}
        if len(shapes) > 1:
            raise ValueError(f"clients hold inputs of different shapes: {sorted(shapes)}")
        targets = {tuple(ds.y_train.shape[1:]) for ds in datasets}
        if len(targets) > 1:
            raise ValueError(f"clients hold targets of different shapes: {sorted(targets)}")
        self.counts = torch.tensor([len(ds.y_train) for ds in datasets])  # (N,)
        n_max = int(self.counts.max())
        (shape,), (target,) = shapes, targets
        first = datasets[0]
        self.x = torch.zeros(len(datasets), n_max, *shape, dtype=first.x_train.dtype)  # (N, n_max, ...)
        y_dtype = first.y_train.dtype if regression else torch.long
        self.y = torch.zeros(len(datasets), n_max, *target, dtype=y_dtype)  # (N, n_max[, ...])
        for i, ds in enumerate(datasets):  # once, at set-up
            self.x[i, :len(ds.y_train)] = ds.x_train
            self.y[i, :len(ds.y_train)] = ds.y_train
        self.names = tuple(f"client:{i}" for i in range(len(datasets)))
        self.regression = regression

    @classmethod
    def from_indices(cls, dataset, indices: Sequence[Tensor], *, regression: bool = False) -> ClientData:
        """Clients from one dataset and each client's training-row indices (e.g. from
        :func:`toolkit.data.iid`), without an intermediate copy per client; checked like the
        constructor (errors name the client and the index within its data)."""
        out = cls.__new__(cls)
        if len(indices) == 0:
            raise ValueError("federated learning needs at least one client, got zero")
        x_all = validate.tensor(dataset.x_train, "x_train", min_dim=1)
        y_all = validate.tensor(dataset.y_train, "y_train", min_dim=1)
        if len(x_all) != len(y_all):
            raise ValueError(f"the dataset holds {len(x_all)} inputs but {len(y_all)} labels")
        counts = torch.tensor([len(i) for i in indices])
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"client:{empty[0]} has no data")
        padded = torch.zeros(len(indices), int(counts.max()), dtype=torch.long)  # (N, n_max) row numbers
        for i, idx in enumerate(indices):
            padded[i, :len(idx)] = torch.as_tensor(idx)
        pad = torch.arange(padded.shape[1]) >= counts[:, None]  # (N, n_max) padding positions
        out.counts = counts
        out.x = x_all[padded]  # (N, n_max, ...)
        out.x[pad] = 0
        y = y_all[padded]
        y[pad] = 0
        if not _plausible(out.x, y, regression):  # the fast whole-tensor test failed: name the client
            for i, c in enumerate(counts.tolist()):
                _check_client(i, out.x[i, :c], y[i, :c], regression)
        out.y = y if regression else y.long()
        out.names = tuple(f"client:{i}" for i in range(len(indices)))
        out.regression = regression
        return out

    def __len__(self) -> int:
        return len(self.counts)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[2:])

    def __repr__(self) -> str:
        return (f"ClientData({len(self)} clients, {int(self.counts.sum())} samples, "
                f"{int(self.counts.min())}-{int(self.counts.max())} per client, input {self.shape}"
                f"{', float targets' if self.regression else ''})")


def _check_client(i: int, x: Tensor, y: Tensor, regression: bool) -> None:
    """One client's inputs and targets, with errors that name the client and the first bad index."""
    x = validate.tensor(x, f"client:{i} x_train", min_dim=1)
    y = validate.tensor(y, f"client:{i} y_train", min_dim=1)
    if len(y) == 0:
        raise ValueError(f"client:{i} has no data")
    if len(x) != len(y):
        raise ValueError(f"client:{i} holds {len(x)} inputs but {len(y)} labels")
    validate.finite(x, f"client:{i} x_train")
    if regression:
        if not y.is_floating_point():
            raise ValueError(f"client:{i} y_train must be float targets for a regression loss, got {y.dtype}")
        validate.finite(y, f"client:{i} y_train")
    else:
        validate.labels(y, f"client:{i} y_train")


def _plausible(x: Tensor, y: Tensor, regression: bool) -> bool:
    """True when every input is finite and the targets fit the task (one vectorized pass)."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        return False
    if regression:
        return y.is_floating_point() and bool(torch.isfinite(y).all())
    return y.dim() == 2 and not y.is_floating_point() and y.dtype != torch.bool and bool((y >= 0).all())


@dataclass
class RoundPlan:
    """Who trains this round and in which order each client visits its samples."""

    clients: Tensor         # (M,) indices of the clients that train (sampled and not dropped)
    dropped: Tensor         # (D,) indices of sampled clients that dropped out
    orders: list[Tensor]    # per local epoch: (M, n_max) sample positions, the first counts[c] real
    counts: Tensor          # (M,) samples per training client

    @property
    def sampled(self) -> int:
        return len(self.clients) + len(self.dropped)

    @property
    def sampled_clients(self) -> Tensor:
        """(S,) every sampled client, training or dropped, sorted: the receivers of the weights."""
        if not len(self.dropped):
            return self.clients
        return torch.cat([self.clients, self.dropped]).sort().values


def sample_clients(n_clients: int, fraction: float, generator: torch.Generator) -> Tensor:
    """``max(1, round(fraction * N))`` distinct clients, sorted, drawn with ``generator``."""
    m = max(1, round(fraction * n_clients))
    return torch.randperm(n_clients, generator=generator)[:m].sort().values


def plan_round(data: ClientData, *, fraction: float, dropout: float, epochs: int,
               generator: torch.Generator, clients: Tensor | None = None) -> RoundPlan:
    """Sample clients (unless ``clients`` is given), drop each with probability ``dropout``, and
    draw each survivor's data order for every local epoch, all vectorized over clients."""
    sampled = sample_clients(len(data), fraction, generator) if clients is None else clients
    drop = torch.rand(len(sampled), generator=generator) < dropout
    train = sampled[~drop]
    counts = data.counts[train]
    n_max = data.x.shape[1]
    orders = []
    for _ in range(epochs):
        keys = torch.rand(len(train), n_max, generator=generator)
        keys[torch.arange(n_max) >= counts[:, None]] = 2.0  # padding sorts last
        orders.append(keys.argsort(dim=1))
    return RoundPlan(train, sampled[drop], orders, counts)
