"""What a curious peer can compute from what it received: its predecessor's model difference."""
from __future__ import annotations

from torch import Tensor

from toolkit.messages import Transfer

__all__ = ["model_difference"]


def model_difference(received: Transfer, start: Tensor) -> Transfer:
    """The update a curious successor attributes to its predecessor: the weights it received minus
    ``start``, the weights it knows the predecessor started from, as a transcript entry of kind
    ``"update"`` (same step, sender and receiver), which the gradient attacks read like a federated
    client's update. The successor knows ``start`` when it is public: on the initiator's first hop
    every peer built the same initial model, and in a ring of two it is what the successor sent.

    Args:
        received: a ``"weights"`` transfer from ``wire.observed(by=successor, kind="weights")``.
        start: (S,) the shared weights the predecessor started from.

    Example:
        >>> import torch
        >>> t = Transfer(1, "node:0", "node:1", "weights", torch.tensor([1.5, 2.0]))
        >>> model_difference(t, torch.tensor([1.0, 2.0])).tensor.tolist()
        [0.5, 0.0]
    """
    if not isinstance(received, Transfer) or received.kind != "weights":
        raise ValueError(f"model_difference reads a 'weights' transfer, got {received!r}")
    if not isinstance(start, Tensor) or start.shape != received.tensor.shape:
        shape = tuple(start.shape) if isinstance(start, Tensor) else type(start).__name__
        raise ValueError(f"start has shape {shape}, the weights {received.sender} sent have "
                         f"{tuple(received.tensor.shape)}")
    return Transfer(received.step, received.sender, received.receiver, "update",
                    received.tensor - start.to(received.tensor.dtype), received.phase)
