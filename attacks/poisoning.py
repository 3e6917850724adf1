"""Simple malicious (Byzantine) clients for federated learning: model poisoning by rewriting updates.

Unlike the inference attacks in this package, which read a transcript, a poisoning attack acts:
a malicious client rewrites its own update before sending it. Each attack here is a callable
applied row-wise to the stacked updates of the malicious clients,
``attack(updates (M, P), *, generator=None) -> (M, P)``, returning a new tensor (the input is
never modified in place). A federated protocol takes them as ``malicious={client: attack}``;
robust aggregators (``toolkit.federated.aggregators``) are the defence they test.

- :class:`SignFlip`: send ``-scale * update`` (push the model the wrong way).
- :class:`ScaledUpdate`: send ``factor * update`` (boosting, the mechanism of model replacement).
- :class:`GaussianUpdate`: send pure ``N(0, sigma^2)`` noise.

Example:
    >>> honest = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    >>> POISONING["sign_flip"](scale=2.0)(honest)
    tensor([[-2.,  4.],
            [-1., -0.]])
    >>> ScaledUpdate(10.0)(honest)
    tensor([[ 10., -20.],
            [  5.,   0.]])
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

__all__ = ["SignFlip", "ScaledUpdate", "GaussianUpdate", "POISONING"]


def _check_updates(updates: Any) -> Tensor:
    if not isinstance(updates, Tensor):
        updates = torch.as_tensor(updates)
    if not updates.is_floating_point():
        raise ValueError(f"updates must be a floating-point tensor, got dtype {updates.dtype}")
    return updates


def _check_real(name: str, value: Any, *, positive: bool = False, nonzero: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and positive:
        ok = value > 0
    if ok and nonzero:
        ok = value != 0
    if not ok:
        what = "a positive finite" if positive else "a non-zero finite" if nonzero else "a finite"
        raise ValueError(f"{name} must be {what} number, got {value!r}")
    return float(value)


class SignFlip:
    """Sign-flipping client: sends ``-scale * update`` instead of its honest update.

    Threat model: a client that controls its own update and nothing else (it sees neither the
    other clients' updates nor the aggregation rule). Evaluated as the "sign-flipping attack" by
    Li et al., "RSA: Byzantine-robust stochastic aggregation methods for distributed learning
    from heterogeneous datasets" (2019); see also Fang et al., "Local model poisoning attacks to
    Byzantine-robust federated learning" (2020) for stronger, aggregator-aware versions.

    Args:
        scale: positive multiplier of the flipped update (default 1.0: plain negation).

    Example:
        >>> SignFlip(scale=3.0)(torch.tensor([[1.0, -0.5]]))
        tensor([[-3.0000,  1.5000]])
    """

    def __init__(self, scale: float = 1.0):
        self.scale = _check_real("scale", scale, positive=True)

    def __call__(self, updates: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """``(M, P)`` honest updates -> ``(M, P)`` sent updates (``generator`` is unused)."""
        return _check_updates(updates).mul(-self.scale)

    def __repr__(self) -> str:
        return f"SignFlip(scale={self.scale})"


class ScaledUpdate:
    """Boosting client: sends ``factor * update``, so that its update dominates the average.

    Threat model: a client that controls its own update and nothing else, and knows (or guesses)
    how many clients are averaged. Scaling by about ``n / eta`` (``n`` clients averaged, server
    learning rate ``eta``) is the model-replacement step of Bagdasaryan et al., "How to backdoor
    federated learning" (2020), there applied to a backdoored update; here to the client's own
    update, the simplest stress test of an aggregator (a negative factor also flips the sign).

    Args:
        factor: non-zero finite multiplier (default 10.0).

    Example:
        >>> ScaledUpdate(factor=-2.0)(torch.tensor([[1.0, 0.25]]))
        tensor([[-2.0000, -0.5000]])
    """

    def __init__(self, factor: float = 10.0):
        self.factor = _check_real("factor", factor, nonzero=True)

    def __call__(self, updates: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """``(M, P)`` honest updates -> ``(M, P)`` sent updates (``generator`` is unused)."""
        return _check_updates(updates).mul(self.factor)

    def __repr__(self) -> str:
        return f"ScaledUpdate(factor={self.factor})"


class GaussianUpdate:
    """Gaussian-noise client: ignores its honest update and sends ``N(0, sigma^2)`` noise.

    Threat model: a client that controls its own update and nothing else (a faulty or malicious
    client sending garbage). The Gaussian Byzantine vectors of Blanchard et al., "Machine
    learning with adversaries: Byzantine tolerant gradient descent" (2017), also the "Gaussian
    attack" of Li et al., RSA (2019) and a baseline in Fang et al., "Local model poisoning
    attacks to Byzantine-robust federated learning" (2020).

    Args:
        sigma: positive standard deviation of every coordinate (default 1.0).

    The noise has the input's shape, dtype and device and is drawn from ``generator`` (the global
    torch RNG when None): the same generator state gives the same noise.

    Example:
        >>> attack = GaussianUpdate(sigma=0.1)
        >>> a = attack(torch.zeros(2, 3), generator=torch.Generator().manual_seed(0))
        >>> b = attack(torch.zeros(2, 3), generator=torch.Generator().manual_seed(0))
        >>> a.shape, torch.equal(a, b)
        (torch.Size([2, 3]), True)
    """

    def __init__(self, sigma: float = 1.0):
        self.sigma = _check_real("sigma", sigma, positive=True)

    def __call__(self, updates: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """``(M, P)`` honest updates (only their shape is used) -> ``(M, P)`` noise."""
        updates = _check_updates(updates)
        noise = torch.randn(updates.shape, generator=generator, dtype=updates.dtype, device=updates.device)
        return noise.mul_(self.sigma)

    def __repr__(self) -> str:
        return f"GaussianUpdate(sigma={self.sigma})"


POISONING: dict[str, type] = {"sign_flip": SignFlip, "scaled": ScaledUpdate, "gaussian": GaussianUpdate}
