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
flagged at step 28, long before its reconstruction MSE first drops below 0.05 (step 157); honest
split training is never flagged: 79 of its 80 scores are above 0.98, one early score (step 28, the
third) is 0.18, which the window of 3 absorbs. The tests assert a flag before step 50 and before
the MSE crossing, and for honest training no flag with 95 % of the scores above 0.9. The scores use every gradient since the
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
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolkit import validate
from toolkit.parties import Party
from toolkit.split import Hook, Pipeline, Segment, SplitConfig, SplitNN, Task
from toolkit.wire import Wire

__all__ = ["SplitGuard", "guarded_split_training"]


def _angle(a: Tensor, b: Tensor) -> float:
    cos = F.cosine_similarity(a, b, dim=0, eps=1e-30).clamp(-1, 1)
    return float(torch.arccos(cos))


class SplitGuard(Hook):
    """Client-side detector of training hijacking (Erdogan, Küpçü, Çiçek, WPES 2022).

    A :class:`toolkit.split.Hook` for the client that owns the labels: register it with
    ``SplitNN.vanilla(..., hooks={"client": guard})`` and the one split training loop sends its
    fake batches and lets it check every gradient the client receives.

    Args:
        fake_every: one batch in ``fake_every`` is fake, on average (chosen at random with
            ``generator``, so the server cannot predict which).
        threshold: flag when the mean of the last ``window`` scores is below it (scores in [0, 1]).
        warmup: steps ignored at the start (the first gradients are large and erratic; the paper
            starts after 20 batches).
        window: scores averaged for the decision.
        mult, exponent: the score's squashing function sigmoid(mult * x) ** exponent.
        generator: draws the fake steps, the fake labels and the R1/R2 split.

    As a hook: :meth:`labels` decides each step whether the batch is fake and sends fake labels
    then; :meth:`check` observes the gradient of the client's first layer and refuses the
    optimizer step on fake batches. By hand (another protocol): each step ask
    ``should_send_fake(step)``; on a fake step send ``fake_labels(y, n)`` instead of ``y`` and do
    not step the optimizer; after backpropagating the received gradient, call
    ``observe(step, first_layer.weight.grad, fake)``. Read ``flagged``, ``flagged_at``, ``scores``
    (one per fake batch once both R1 and R2 hold gradients), ``score_steps`` and ``fake_steps``.
    """

    def __init__(self, *, fake_every: int = 5, threshold: float = 0.5, warmup: int = 10, window: int = 3,
                 mult: float = 5.0, exponent: float = 2.0, generator: torch.Generator | None = None):
        self.fake_every = validate.positive_int("fake_every", fake_every)
        if self.fake_every < 2:
            raise ValueError(f"fake_every must be an int >= 2 (1 would make every batch fake), got {fake_every!r}")
        self.threshold = validate.number("threshold", threshold, low=0.0, high=1.0, low_open=True)
        self.warmup = validate.non_negative_int("warmup", warmup)
        self.window = validate.positive_int("window", window)
        self.mult = validate.positive("mult", mult)
        self.exponent = validate.positive("exponent", exponent)
        self.generator = validate.generator(generator)
        self.fake_steps: list[int] = []
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
            if self._decided[step]:
                self.fake_steps.append(step)
        return self._decided[step]

    def fake_labels(self, y: Tensor, n_classes: int) -> Tensor:
        """Every label shifted by one random non-zero offset modulo ``n_classes``: all of them wrong."""
        if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
            raise ValueError(f"n_classes must be an int >= 2 to fake labels, got {n_classes!r}")
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

    # -- as a hook on the split training loop ---------------------------------------------
    def labels(self, step: int, y: Tensor, *, n_classes: int | None) -> Tensor:
        """The labels the client sends: fake ones on the steps it picks for a fake batch."""
        if n_classes is None:
            raise ValueError("SplitGuard fakes class labels: it needs a classification task (cross-entropy)")
        return self.fake_labels(y, n_classes) if self.should_send_fake(step) else y

    def check(self, step: int, party: Party, received: Sequence[Tensor]) -> bool:
        """Observe the gradient of the client's first layer; no optimizer step on a fake batch."""
        first = next((p for p in party.parameters() if p.grad is not None), None)
        if first is None:
            raise ValueError(f"SplitGuard found no gradient on {party.name}'s parameters at step {step}: "
                             f"is it registered for the party that trains on the server's gradients?")
        fake = self.should_send_fake(step)
        self.observe(step, first.grad, fake=fake)
        return not fake

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

    A convenience over the one split training loop: ``SplitNN`` with Adam(``lr``) on both parties
    and ``hooks={"client": guard}``; everything between them crosses ``wire``. The server trains
    on fake batches too (it cannot tell them apart); the client does not step on them. Returns one
    row per step: step, loss (on the labels sent), fake, score (NaN when none).
    """
    validate.positive_int("steps", steps)
    validate.positive_int("batch_size", batch_size)
    validate.positive("lr", lr)
    wire = wire if wire is not None else Wire()
    adam = SplitConfig(optimizer="adam", lr=lr).make_optimizer()
    client = Party("client", optimizer=adam, data={"x": x, "y": y})
    server = Party("server", optimizer=adam)
    pipeline = Pipeline([[Segment(client, client_part)], [Segment(server, server_part)]], wire)
    sl = SplitNN(pipeline, [Task("label", owner=client)], config=SplitConfig(batch_size=batch_size),
                 hooks={"client": guard} if guard is not None else None, generator=generator, name="guarded")
    history = sl.fit(steps=steps)
    fake = set(guard.fake_steps) if guard is not None else set()
    scores = dict(zip(guard.score_steps, guard.scores)) if guard is not None else {}
    return pd.DataFrame({"step": history["step"], "loss": history["loss"],
                         "fake": [s in fake for s in history["step"]],
                         "score": [scores.get(s, math.nan) for s in history["step"]]})
