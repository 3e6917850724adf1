"""What a curious server observes from one client that holds one sample: the set-up of the gradient
attacks (Zhu, Liu, Han, "Deep leakage from gradients", 2019), in which a client's update is one
SGD step on one image and the server may send the same weights again ("freezing" the model) to
collect several noisy views of it.

Example:
    >>> from toolkit import data, models
    >>> wire = observe_one_sample(models.mlp([64, 16, 10]), data.load("digits"), 0, rounds=2)
    >>> [t.kind for t in wire.observed(by="server")]
    ['update', 'update']
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from toolkit.federated.clients import ClientData
from toolkit.federated.config import FedConfig
from toolkit.federated.fedavg import FederatedAveraging
from toolkit.parties import load_flat_state
from toolkit.seeding import seed_everything
from toolkit.validate import positive_int
from toolkit.wire import Wire

__all__ = ["observe_one_sample"]


def observe_one_sample(model: nn.Module, ds: Any, index: int, *, defense: Callable | None = None,
                       lr: float = 1.0, rounds: int = 1, aggregator: Any = "mean", seed: int = 0) -> Wire:
    """Run ``rounds`` FedAvg rounds in which client 0 holds training sample ``index`` of ``ds``
    (batch size 1, one local step at ``lr``) and the server sends the same weights every time;
    return the Wire, whose transcript holds what the server received (``observed(by="server")``)
    and sent (``observed(sender="server")``).

    Args:
        defense: a wire transform on the client's side (e.g. ``defenses.GradientNoise``), or None.
        aggregator: the aggregation (a name, an Aggregator, or a WireAggregator such as secure
            aggregation, whose messages the transcript then holds instead of plain updates).
        seed: seeds the model's start and the run (same seed, same transcript).
    """
    rounds = positive_int("rounds", rounds)
    seed_everything(seed)
    fl = FederatedAveraging(model, ClientData.from_indices(ds, [torch.tensor([index])]), test=ds,
                            config=FedConfig(batch_size=1, lr=lr, eval_every=10**6, seed=seed),
                            wire=Wire([defense] if defense is not None else []), aggregator=aggregator)
    start = fl.weights.clone()
    for _ in range(rounds):
        fl.fit(1)
        fl.weights = start.clone()  # the server freezes the model
        load_flat_state(model, start)
    return fl.wire
