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


class ClientData:
    """The training data of N clients, padded to a common length: ``x`` is (N, n_max, ...),
    ``y`` is (N, n_max) and ``counts`` (N,) says how many rows of each are real.

    Args:
        datasets: one :class:`toolkit.data.Dataset` (or anything with ``x_train``/``y_train``)
            per client, e.g. from :func:`toolkit.data.partition`.
    """

    def __init__(self, datasets: Sequence):
        if len(datasets) == 0:
            raise ValueError("federated learning needs at least one client, got zero")
        shapes = {tuple(ds.x_train.shape[1:]) for ds in datasets}
        if len(shapes) > 1:
            raise ValueError(f"clients hold inputs of different shapes: {sorted(shapes)}")
        for i, ds in enumerate(datasets):
            if len(ds.y_train) == 0:
                raise ValueError(f"client:{i} has no data")
            if len(ds.x_train) != len(ds.y_train):
                raise ValueError(f"client:{i} holds {len(ds.x_train)} inputs but {len(ds.y_train)} labels")
        self.counts = torch.tensor([len(ds.y_train) for ds in datasets])  # (N,)
        n_max = int(self.counts.max())
        (shape,) = shapes
        first = datasets[0].x_train
        self.x = torch.zeros(len(datasets), n_max, *shape, dtype=first.dtype)  # (N, n_max, ...)
        self.y = torch.zeros(len(datasets), n_max, dtype=torch.long)  # (N, n_max)
        for i, ds in enumerate(datasets):  # once, at set-up
            self.x[i, :len(ds.y_train)] = ds.x_train
            self.y[i, :len(ds.y_train)] = ds.y_train
        self.names = tuple(f"client:{i}" for i in range(len(datasets)))

    @classmethod
    def from_indices(cls, dataset, indices: Sequence[Tensor]) -> ClientData:
        """Clients from one dataset and each client's training-row indices (e.g. from
        :func:`toolkit.data.iid`), without an intermediate copy per client."""
        out = cls.__new__(cls)
        if len(indices) == 0:
            raise ValueError("federated learning needs at least one client, got zero")
        counts = torch.tensor([len(i) for i in indices])
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"client:{empty[0]} has no data")
        padded = torch.zeros(len(indices), int(counts.max()), dtype=torch.long)  # (N, n_max) row numbers
        for i, idx in enumerate(indices):
            padded[i, :len(idx)] = torch.as_tensor(idx)
        pad = torch.arange(padded.shape[1]) >= counts[:, None]  # (N, n_max) padding positions
        out.counts = counts
        out.x = dataset.x_train[padded]  # (N, n_max, ...)
        out.x[pad] = 0
        out.y = dataset.y_train[padded].masked_fill_(pad, 0)
        out.names = tuple(f"client:{i}" for i in range(len(indices)))
        return out

    def __len__(self) -> int:
        return len(self.counts)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[2:])

    def __repr__(self) -> str:
        return (f"ClientData({len(self)} clients, {int(self.counts.sum())} samples, "
                f"{int(self.counts.min())}-{int(self.counts.max())} per client, input {self.shape})")


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
