"""SplitGuard: the split-learning client detects a training-hijacking server with fake batches.

Erdogan, Küpçü, Çiçek, "SplitGuard: detecting and mitigating training-hijacking attacks in split
learning" (WPES 2022; reference code ege-erdogan/splitguard). Now and then the client sends a
*fake* batch: its own batch with every label changed (and it does not step its optimizer on it).
An honest server trains on the labels it gets, so the gradient coming back for a fake batch
points elsewhere than those for regular batches; a hijacking server (e.g. FSHA) ignores labels
and answers fake and regular batches alike.

The client compares the gradient of its first layer (computed from what it received) over fake
batches F with that over regular batches, split at random into R1 and R2. With mean vectors,
mean norms ``|.|`` and angles ``A`` (radians):

    d_F = ||F| - (|R1| + |R2|)/2|,  d_R = ||R1| - |R2||
    x   = A(F, R1 + R2) * d_F / (d_F + d_R) - A(R1, R2) * d_R / (d_F + d_R)
    score = sigmoid(mult * x) ** exponent            (SplitGuard's score; mult 5, exponent 2)

Honest training scores near 1; a hijacker near sigmoid(0)^2 = 0.25 or below. The client flags the
server when the mean of the last ``window`` scores falls below ``threshold`` (``window=1`` flags
on a single low score); ``flagged_at`` is the first such step and the flag stays. Defaults are
set for short CPU runs: one fake batch in 5 (the reference code: 1 in 10), a 10-step warm-up
(20), threshold 0.5, window 3. Measured in ``tests/test_fsha.py`` (digits, 400 steps): FSHA is
flagged at step 28, long before its reconstruction MSE first drops below 0.05 (step 147); honest
split training scores at least 0.93 and is never flagged. The scores use every gradient since the
warm-up, so late in a long attack (once the critic settles and its gradients turn small and
noisy) they can drift up again: act on the first flag. Written by hand: no library implements it.

Example (a server whose gradients ignore the labels, then one whose fake-batch gradients differ):
    >>> noise = torch.Generator().manual_seed(0)
    >>> def run(fake_direction):
    ...     guard = SplitGuard(warmup=0, window=1, generator=torch.Generator().manual_seed(1))
    ...     for step in range(1, 41):
    ...         fake = guard.should_send_fake(step)
    ...         g = (fake_direction if fake else torch.tensor([1.0, 0.0, 0.0])) + 0.1 * torch.randn(3, generator=noise)
    ...         _ = guard.observe(step, g, fake=fake)
    ...     return guard
    >>> hijacked = run(torch.tensor([1.0, 0.0, 0.0]))
    >>> hijacked.flagged, round(hijacked.scores[-1], 1)
    (True, 0.3)
    >>> honest = run(torch.tensor([-2.0, 1.0, 0.0]))
    >>> honest.flagged, round(min(honest.scores), 1)
    (False, 1.0)
"""
from __future__ import annotations

import math
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolkit.wire import Wire

__all__ = ["SplitGuard", "guarded_split_training"]


def _number(name: str, value: Any, *, low: float, high: float = math.inf, closed: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low <= value if closed else low < value) and value <= high
    if not ok:
        raise ValueError(f"{name} must be a number in {'[' if closed else '('}{low}, {high}], got {value!r}")
    return float(value)


def _count(name: str, value: Any, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _angle(a: Tensor, b: Tensor) -> float:
    cos = F.cosine_similarity(a, b, dim=0, eps=1e-30).clamp(-1, 1)
    return float(torch.arccos(cos))


class SplitGuard:
    """Client-side detector of training hijacking (Erdogan, Küpçü, Çiçek, WPES 2022).

    Args:
        fake_every: one batch in ``fake_every`` is fake, on average (chosen at random with
            ``generator``, so the server cannot predict which).
        threshold: flag when the mean of the last ``window`` scores is below it (scores in [0, 1]).
        warmup: steps ignored at the start (the first gradients are large and erratic; the paper
            starts after 20 batches).
        window: scores averaged for the decision.
        mult, exponent: the score's squashing function sigmoid(mult * x) ** exponent.
        generator: draws the fake steps, the fake labels and the R1/R2 split.

    Use: each step ask ``should_send_fake(step)``; on a fake step send ``fake_labels(y, n)``
    instead of ``y`` and do not step the optimizer; after backpropagating the received gradient,
    call ``observe(step, first_layer.weight.grad, fake)``. Read ``flagged``, ``flagged_at``,
    ``scores`` (one per fake batch once both R1 and R2 hold gradients) and ``score_steps``.
    """

    def __init__(self, *, fake_every: int = 5, threshold: float = 0.5, warmup: int = 10, window: int = 3,
                 mult: float = 5.0, exponent: float = 2.0, generator: torch.Generator | None = None):
        self.fake_every = _count("fake_every", fake_every, low=2)
        self.threshold = _number("threshold", threshold, low=0.0, high=1.0, closed=False)
        self.warmup = _count("warmup", warmup, low=0)
        self.window = _count("window", window, low=1)
        self.mult = _number("mult", mult, low=0.0, closed=False)
        self.exponent = _number("exponent", exponent, low=0.0, closed=False)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator
        self.scores: list[float] = []
        self.score_steps: list[int] = []
        self.flagged = False
        self.flagged_at: int | None = None
        self._decided: dict[int, bool] = {}
        # running sums per group: vector sum, sum of norms, count (means without keeping every gradient)
        self._groups: dict[str, list[Any]] = {g: [None, 0.0, 0] for g in ("fake", "r1", "r2")}

    def _uniform(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def should_send_fake(self, step: int) -> bool:
        """Whether the client sends a fake batch at ``step`` (the same answer when asked again)."""
        if step not in self._decided:
            self._decided = {step: step > self.warmup and self._uniform() < 1.0 / self.fake_every}
        return self._decided[step]

    def fake_labels(self, y: Tensor, n_classes: int) -> Tensor:
        """Every label shifted by one random non-zero offset modulo ``n_classes``: all of them wrong."""
        n_classes = _count("n_classes", n_classes, low=2)
        shift = int(torch.randint(1, n_classes, (), generator=self.generator))
        return (y + shift) % n_classes

    def observe(self, step: int, gradient: Tensor, fake: bool) -> float | None:
        """Record the gradient of the client's first layer at ``step``; returns the new score after
        a fake batch (None otherwise, or while R1 or R2 is still empty)."""
        if gradient is None:
            raise ValueError("observe needs the gradient the client computed (got None: backpropagate first)")
        if step <= self.warmup and not fake:
            return None
        g = gradient.detach().flatten().double()
        group = "fake" if fake else ("r1" if self._uniform() < 0.5 else "r2")
        acc = self._groups[group]
        acc[0] = g.clone() if acc[0] is None else acc[0] + g
        acc[1] += float(g.norm())
        acc[2] += 1
        if not fake:
            return None
        score = self.score()
        if score is None:
            return None
        self.scores.append(score)
        self.score_steps.append(step)
        recent = self.scores[-self.window:]
        if not self.flagged and len(recent) == self.window and sum(recent) / self.window < self.threshold:
            self.flagged, self.flagged_at = True, step
        return score

    def score(self) -> float | None:
        """SplitGuard's score from every fake and regular gradient so far (None until each group has one)."""
        (f, nf, cf), (r1, n1, c1), (r2, n2, c2) = (self._groups[g] for g in ("fake", "r1", "r2"))
        if not (cf and c1 and c2):
            return None
        f_mag, r1_mag, r2_mag = nf / cf, n1 / c1, n2 / c2
        d_f, d_r = abs(f_mag - (r1_mag + r2_mag) / 2), abs(r1_mag - r2_mag)
        total = d_f + d_r
        if total == 0:
            return 1.0 / (1.0 + math.exp(0.0)) ** self.exponent
        x = _angle(f / cf, r1 / c1 + r2 / c2) * d_f / total - _angle(r1 / c1, r2 / c2) * d_r / total
        return (1.0 / (1.0 + math.exp(-self.mult * x))) ** self.exponent

    def __repr__(self) -> str:
        state = f"flagged at step {self.flagged_at}" if self.flagged else "not flagged"
        return (f"SplitGuard(fake_every={self.fake_every}, threshold={self.threshold}, warmup={self.warmup}, "
                f"window={self.window}; {len(self.scores)} scores, {state})")


def guarded_split_training(client_part: nn.Module, server_part: nn.Module, x: Tensor, y: Tensor, *,
                           guard: SplitGuard | None, steps: int, batch_size: int = 64, lr: float = 1e-3,
                           wire: Wire | None = None, generator: torch.Generator | None = None) -> pd.DataFrame:
    """Honest vanilla split training (client sends activations and labels; the server trains on
    cross-entropy and returns the cut-layer gradient) with ``guard`` acting for the client.

    Both parties use Adam(``lr``); everything between them crosses ``wire``. The server trains on
    fake batches too (it cannot tell them apart); the client does not step on them. The guard sees
    only what the client has: its batches, the labels it sends and the gradients it computes from
    what it receives. Returns one row per step: step, loss (on the labels sent), fake, score (NaN
    when none).
    """
    _count("steps", steps, low=1)
    _count("batch_size", batch_size, low=1)
    wire = wire if wire is not None else Wire()
    client_opt = torch.optim.Adam(client_part.parameters(), lr=lr)
    server_opt = torch.optim.Adam(server_part.parameters(), lr=lr)
    first = next(p for p in client_part.parameters() if p.requires_grad)
    n_classes = int(y.max()) + 1
    rows, order = [], torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        step = wire.tick()
        if len(order) < batch_size:
            order = torch.randperm(len(x), generator=generator)
        idx, order = order[:batch_size], order[batch_size:]
        fake = guard is not None and guard.should_send_fake(step)
        labels = guard.fake_labels(y[idx], n_classes) if fake else y[idx]
        z = client_part(x[idx])                                                   # client
        z_s = wire.send(z, sender="client", receiver="server", kind="activations").requires_grad_()
        y_s = wire.send(labels, sender="client", receiver="server", kind="labels")
        loss = F.cross_entropy(server_part(z_s), y_s)                             # honest server
        server_opt.zero_grad(set_to_none=True)
        loss.backward()
        server_opt.step()
        g = wire.send(z_s.grad, sender="server", receiver="client", kind="gradients")
        client_opt.zero_grad(set_to_none=True)                                    # client
        z.backward(g)
        score = guard.observe(step, first.grad, fake=fake) if guard is not None else None
        if not fake:
            client_opt.step()
        rows.append({"step": step, "loss": float(loss.detach()), "fake": fake,
                     "score": math.nan if score is None else score})
    return pd.DataFrame(rows)
