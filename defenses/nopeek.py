"""NoPeek: train the client's layers so that its cut-layer activations say little about its raw data.

Vepakomma, Singh, Gupta, Raskar, "NoPeek: Information leakage reduction to share activations in
distributed deep learning" (2020). A data-holding party adds ``alpha * dCor(X, Z)`` to its task
loss, with ``X`` its raw batch (flattened) and ``Z`` the cut-layer activations it computed from
it: the sample distance correlation of :func:`toolkit.metrics.distance_correlation` (Euclidean,
not squared, distances; differentiable; float64). The term's gradient flows only into that
party's own layers, and the term never crosses the Wire; the task's gradient comes back across
the cut as usual. Cost: the raw batch needs no gradient, so its distance matrix is built without
autograd; the activations' one is differentiated by hand (one Gram product forward, one product
backward), so a NoPeek step at batch 64 on an MNIST conv client costs 1.1-1.25x the plain step
(benchmarks/dcor.py, part 2).

Two shapes:

* :class:`NoPeekLoss`, the loss term ``NoPeekLoss(alpha)(x, z)``, for a training loop of your own;
* :class:`NoPeek`, a :class:`toolkit.split.Hook` that adds the term for the party it is registered
  for in any split configuration (vanilla, U-shaped, multi-hop, vertical, multi-task), and logs
  the batch's dCor as a column of the fit history.

What it does not do: dCor is measured on batches, so it bounds nothing on a single sample, and an
attacker who trains an inverse network on the defended client part's outputs (query access, or
auxiliary data through it) still learns whatever those outputs keep; report NoPeek against that
attacker (see notebooks/04_nopeek.ipynb). The batch V-statistic is inflated when the dimension
exceeds the batch size; score held-out data with the chunked statistics
(:func:`toolkit.metrics.distance_correlation_chunked`, and the bias-corrected
:func:`toolkit.metrics.u_distance_correlation_sqr_chunked`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from toolkit import validate
from toolkit.metrics import distance_correlation
from toolkit.split import Hook

__all__ = ["NoPeek", "NoPeekLoss"]


class NoPeekLoss(nn.Module):
    """``alpha * dCor(x, z)``: the NoPeek term (Vepakomma et al., 2020).

    Args:
        alpha: weight of the distance correlation against the task loss, >= 0 (0: no defense).

    ``forward(x, z)`` takes the raw batch ``x`` (B, ...) and the cut-layer activations ``z``
    (B, ...) computed from it and returns a float64 scalar, differentiable in ``z`` (and ``x``).

    Example:
        >>> x = torch.randn(32, 1, 8, 8)
        >>> layer = nn.Sequential(nn.Flatten(), nn.Linear(64, 16))
        >>> term = NoPeekLoss(alpha=2.0)(x, layer(x))
        >>> term.backward()
        >>> bool(0 < term.detach() <= 2.0) and layer[1].weight.grad is not None
        True
    """

    def __init__(self, alpha: float):
        super().__init__()
        self.alpha = validate.non_negative("alpha", alpha)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        return self.alpha * distance_correlation(x, z)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class NoPeek(Hook):
    """NoPeek for a data-holding party of a :class:`toolkit.split.SplitNN` (Vepakomma et al., 2020).

    Register it for the party whose raw data should not leak: ``hooks={"client": NoPeek(0.5)}``
    (``"client:0"``, ``"client:1"``, ... in the vertical configuration). Each training step the
    party adds ``alpha * dCor(inputs, cut-layer outputs)`` to its objective, computed on its own
    batch before the wire's transforms, and the history gets a ``column`` with that batch's dCor.
    With ``alpha=0`` nothing is added (no gradient work): the column then measures the undefended
    run. One instance registered for several parties logs the mean of their values; give each its
    own instance and column to log them apart.

    Args:
        alpha: weight of the term, >= 0.
        column: name of the history column.

    Example:
        >>> from toolkit import data, models
        >>> from toolkit.split import SplitNN
        >>> ds = data.load("digits").subset(range(256))
        >>> client, server = models.cut(models.mlp([64, 32, 10]), at=2)
        >>> history = SplitNN.vanilla(client, server, ds, hooks={"client": NoPeek(1.0)}).fit(steps=2)
        >>> bool(history["dcor"].between(0, 1).all())
        True
    """

    def __init__(self, alpha: float, *, column: str = "dcor"):
        self.term = NoPeekLoss(alpha)
        if not isinstance(column, str) or not column:
            raise ValueError(f"column must be a non-empty string, got {column!r}")
        self.column = column
        self.values: dict[int, list[float]] = {}  # step -> batch dCor of each party it acted for

    @property
    def alpha(self) -> float:
        return self.term.alpha

    def loss(self, step: int, inputs: Tensor, outputs: Tensor) -> Tensor | None:
        if self.alpha == 0:
            with torch.no_grad():
                self.values.setdefault(step, []).append(float(distance_correlation(inputs, outputs)))
            return None
        dcor = distance_correlation(inputs, outputs)
        self.values.setdefault(step, []).append(float(dcor.detach()))
        return self.alpha * dcor

    def record(self, step: int) -> dict[str, float]:
        got = self.values.get(step)
        return {self.column: sum(got) / len(got)} if got else {}

    def __repr__(self) -> str:
        return f"NoPeek(alpha={self.alpha}, column={self.column!r})"
