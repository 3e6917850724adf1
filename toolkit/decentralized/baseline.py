"""The centralized baseline decentralized training is compared against, and epochs to convergence."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import pandas as pd
from torch import nn

from toolkit.federated.config import FedConfig
from toolkit.federated.fedavg import FederatedAveraging
from toolkit.validate import non_negative, positive_int

__all__ = ["epochs_to_convergence", "train_centralized"]


def train_centralized(model: nn.Module, dataset: Any, *, epochs: int, config: FedConfig | None = None,
                      test: Any = None, show_progress: bool = False) -> pd.DataFrame:
    """Ordinary centralized training, with the same local-training code as the peers: one party
    holds all of ``dataset``'s training split and runs ``epochs`` passes of SGD over it (FedAvg with
    one client, one local epoch per round and the full update applied is exactly that), evaluated on
    ``test`` (default the dataset's own test split) after every epoch.

    Args:
        model: trained in place.
        dataset: a :class:`toolkit.data.Dataset` (all the nodes' data together).
        epochs: passes over the data.
        config: local-training settings (batch_size, lr, momentum, loss, seed ...); its
            ``local_epochs`` is replaced by 1 (a row is an epoch).

    Returns:
        One row per epoch: ``epoch``, ``loss`` (mean training loss), ``test_loss``, ``accuracy``.

    Example:
        >>> from toolkit import data, models
        >>> h = train_centralized(models.tabular_mlp(8, 2), data.load("loan", n_samples=500), epochs=2)
        >>> list(h.columns[:4])
        ['epoch', 'loss', 'test_loss', 'accuracy']
    """
    epochs = positive_int("epochs", epochs)
    config = replace(config or FedConfig(), local_epochs=1, fraction=1.0, dropout=0.0, server_optimizer="fedavg",
                     server_lr=1.0)
    history = FederatedAveraging(model, [dataset], test=test, config=config).fit(rounds=epochs,
                                                                                show_progress=show_progress)
    keep = [c for c in ("round", "loss", "test_loss", "accuracy", "seconds") if c in history.columns]
    out = history[keep].rename(columns={"round": "epoch"})
    out.attrs = history.attrs
    return out


def epochs_to_convergence(history: pd.DataFrame, *, column: str = "test_loss", within: float = 0.01,
                          x: str = "epoch") -> float:
    """The first ``x`` at which ``column`` comes within ``within`` (relative) of its best (lowest)
    value in the run: how many epochs a run needed to (nearly) converge.

    Example:
        >>> epochs_to_convergence(pd.DataFrame({"epoch": [1, 2, 3, 4], "test_loss": [0.9, 0.504, 0.5, 0.502]}))
        2
    """
    for col in (column, x):
        if col not in history.columns:
            raise ValueError(f"history has no column {col!r}; it has {list(history.columns)}")
    within = non_negative("within", within)
    values = history[column].astype(float)
    if values.isna().all():
        raise ValueError(f"history's {column!r} holds no value (was it evaluated?)")
    best = float(values.min())
    hit = values <= best + abs(best) * within
    return history.loc[hit.idxmax(), x].item()
