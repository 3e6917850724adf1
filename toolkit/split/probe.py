"""Probe what a server would receive at a cut: for cut-depth sweeps in attack experiments."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from toolkit.models import cut
from toolkit.split.splitnn import SplitConfig, SplitNN
from toolkit.wire import Transfer


@dataclass
class Probe:
    client_part: nn.Module   # a copy of the model's layers before the cut
    server_part: nn.Module   # a copy of the layers after it
    observed: list[Transfer]  # what the server received: the inputs' cut-layer activations


def probe(model: nn.Sequential, at: int | str, inputs: Tensor, *, labels: Tensor | None = None) -> Probe:
    """Cut a copy of ``model`` at ``at`` and run ``inputs`` through a vanilla split deployment's
    inference: the server's transcript holds exactly their activations, in order (``phase="eval"``).

    Example:
        >>> from toolkit import models
        >>> p = probe(models.lenet(), "pool1", torch.rand(3, 1, 28, 28))
        >>> p.observed[0].tensor.shape
        torch.Size([3, 6, 14, 14])
    """
    client, server = cut(copy.deepcopy(model), at=at)
    y = labels if labels is not None else torch.zeros(len(inputs), dtype=torch.long)
    holder = type("Inputs", (), {"x_train": inputs, "y_train": y, "x_test": inputs, "y_test": y})()
    sl = SplitNN.vanilla(client, server, holder, config=SplitConfig(eval_batch_size=max(1, len(inputs))))
    sl.evaluate()
    return Probe(client, server, sl.wire.observed(by="server", kind="activations", phase="eval"))
