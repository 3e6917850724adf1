"""What an attacker who knows the defense on the wire gets from it (the adaptive gradient-matching
attacker of :mod:`attacks.gradient_inversion`).

* A defense with a ``preimage(row) -> (low, high)`` (pruning, quantization: ``defenses.gradients``)
  says where each true entry must lie given what crossed; the attacker matches within those
  intervals (:data:`INTERVAL_DISTANCES`: zero cost inside), not the values themselves.
* Against additive noise, a server that sends one client the same weights several times averages
  the updates it gets back (:func:`average_repeats`), dividing the noise variance by their number.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from attacks.gradient_matching import Params, Update, cosine_distance

REPEATS = ("separate", "average")


def check_adaptive(defense, repeats: str, wrt: str) -> tuple[object, str]:
    """(defense, repeats), checked: what an adaptive attacker knows about the defense on the wire."""
    if defense is not None and not callable(getattr(defense, "preimage", None)):
        raise ValueError(f"defense must say what crossed reveals, with a method preimage(row) -> (low, high); "
                         f"{defense!r} has none (against additive noise, use repeats='average')")
    if repeats not in REPEATS:
        raise ValueError(f"repeats must be one of {REPEATS}, got {repeats!r}")
    if repeats == "average" and (defense is not None or wrt == "input"):
        raise ValueError("repeats='average' averages a federated client's updates from identical weights; it "
                         "cannot be combined with defense= (an average is not a defended row) or wrt='input'")
    return defense, repeats


def average_repeats(updates: Sequence[Update]) -> list[Update]:
    """One update per (sender, starting weights): the mean of the updates a client sent from the same
    weights (a server that sends one client the same weights several times, with the client's data
    unchanged, sees the same update under fresh noise each time: averaging n of them divides the
    noise variance by n). Groups in order of first appearance, each stamped with its first step."""
    groups: list[list[Update]] = []
    for u in updates:
        for g in groups:
            if g[0].sender == u.sender and all(torch.equal(g[0].weights[k], u.weights[k]) for k in u.weights):
                g.append(u)
                break
        else:
            groups.append([u])

    def mean(ps: list[Params | None]) -> Params | None:
        return None if ps[0] is None else {k: torch.stack([p[k] for p in ps]).mean(0) for k in ps[0]}

    return [Update(g[0].step, g[0].sender, mean([u.gradient for u in g]), g[0].weights, mean([u.delta for u in g]))
            for g in groups]


@dataclass(frozen=True)
class Interval:
    """Per-entry bounds on the true gradient, one (low, high) pair of tensors per parameter: what an
    attacker who knows the defense can infer from what crossed (``defense.preimage``)."""

    low: tuple[Tensor, ...]
    high: tuple[Tensor, ...]

    def to(self, dtype: torch.dtype) -> Interval:
        return Interval(tuple(t.to(dtype) for t in self.low), tuple(t.to(dtype) for t in self.high))


def preimage_bounds(defense, rows: Tensor, attack: str) -> tuple[Tensor, Tensor]:
    """``defense.preimage`` applied to each row of ``rows`` (N, P) -> (low, high), each (N, P),
    checked (shapes, low <= high: the truth must be inside)."""
    lows, highs = [], []
    for row in rows:
        low, high = defense.preimage(row)
        if not (isinstance(low, Tensor) and isinstance(high, Tensor) and low.shape == row.shape == high.shape):
            raise ValueError(f"{attack}: {defense!r}.preimage must return two tensors shaped like the observed row "
                             f"{tuple(row.shape)}")
        if bool((low > high).any()):
            raise ValueError(f"{attack}: {defense!r}.preimage returned an empty interval (low > high)")
        lows.append(low)
        highs.append(high)
    return torch.stack(lows), torch.stack(highs)


def interval_update(update: Update, low: Params, high: Params, lr: float | None, local_steps: int) -> Interval:
    """The bounds on ``update``'s target (its gradient, or its delta after several local steps), from
    bounds on the raw weight delta (or gradient) that crossed."""
    if update.delta is None or local_steps > 1:  # the target is what crossed
        return Interval(tuple(low.values()), tuple(high.values()))
    scale = -1.0 / lr if lr is not None else -1.0  # gradient = -delta / lr: the bounds swap
    return Interval(tuple(v * scale for v in high.values()), tuple(v * scale for v in low.values()))


def update_interval(defense, u: Update, attack: str, lr: float | None, local_steps: int) -> Interval:
    """The bounds ``defense`` puts on ``u``'s target, from the row that crossed."""
    crossed = u.delta if u.delta is not None else u.gradient
    flat = torch.cat([v.reshape(-1) for v in crossed.values()])
    low, high = preimage_bounds(defense, flat[None], attack)
    split = [v.numel() for v in crossed.values()]
    unflat = [dict(zip(crossed, (c.view_as(v) for c, v in zip(b[0].split(split), crossed.values()))))
              for b in (low, high)]
    return interval_update(u, *unflat, lr, local_steps)


def _clamp(g: Sequence[Tensor], box: Interval) -> list[Tensor]:
    return [torch.minimum(torch.maximum(a, lo), hi) for a, lo, hi in zip(g, box.low, box.high)]


def interval_l2(g: Sequence[Tensor], box: Interval) -> Tensor:
    """Sum of squared distances of every entry to its interval (0 inside): L2 matching of the entries
    a defense left exact, and no penalty within what it blurred (a pruned entry below the smallest kept
    magnitude, a value within its quantization bin)."""
    return sum(((a - c) ** 2).sum() for a, c in zip(g, _clamp(g, box)))


def interval_cosine(g: Sequence[Tensor], box: Interval) -> Tensor:
    """Cosine distance of ``g`` to its nearest point in the intervals (the entry clamped into them)."""
    return cosine_distance(g, _clamp(g, box))


INTERVAL_DISTANCES: dict[str, Callable[[Sequence[Tensor], Interval], Tensor]] = {
    "l2": interval_l2,
    "cosine": interval_cosine,
}
