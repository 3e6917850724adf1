"""UnSplit's label inference: a server that knows only the architecture of the client's last
layer infers the labels that never leave the client (U-shaped split learning).

Erdogan, Küpçü, Çiçek, "UnSplit: data-oblivious model inversion, model stealing, and label
inference attacks against split learning" (WPES 2022). See :mod:`attacks.unsplit` for what we
found about the paper's "perfect accuracy": from the gradients the server receives, labels are
identifiable only up to a renaming of the classes; :func:`relabel` scores such labels, and
``known`` labelled rows name the classes.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.base import Attack, AttackResult, check_generator, positive, positive_int, select, stack, steps_for
from attacks.unsplit import Architecture, _CloneMaker
from toolkit.models import trace
from toolkit.progress import progress
from toolkit.wire import Transfer

__all__ = ["UnSplitLabels", "relabel"]

def _input_gradients(clone: nn.Module, h: Tensor, labels: Tensor, *, create_graph: bool = False) -> Tensor:
    """Per-sample gradients of the cross-entropy with respect to the tail's input, (N, *h.shape[1:]).

    The loss is summed, so each row is one sample's gradient (the tail treats samples independently).
    """
    h = h.detach().requires_grad_()
    loss = F.cross_entropy(clone(h), labels, reduction="sum")
    (grad,) = torch.autograd.grad(loss, h, create_graph=create_graph)
    return grad


def relabel(pred: Tensor, truth: Tensor) -> Tensor:
    """``pred`` with its class names permuted to agree best with ``truth`` (Hungarian on the confusion
    matrix): scores a partition, i.e. labels known only up to a relabeling of the classes.

    Example:
        >>> relabel(torch.tensor([2, 2, 0, 1]), torch.tensor([0, 0, 1, 2]))
        tensor([0, 0, 1, 2])
    """
    from scipy.optimize import linear_sum_assignment

    pred, truth = torch.as_tensor(pred).long().flatten(), torch.as_tensor(truth).long().flatten()
    if len(pred) != len(truth):
        raise ValueError(f"{len(pred)} predicted labels for {len(truth)} true ones")
    k = int(max(pred.max(), truth.max())) + 1
    confusion = torch.zeros(k, k, dtype=torch.long)
    confusion.index_put_((pred, truth), torch.ones_like(pred), accumulate=True)
    rows, cols = linear_sum_assignment(-confusion.numpy())
    mapping = torch.arange(k)
    mapping[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return mapping[pred]


INITS = ("gradients", "joint", "features", "clone")


def _kmeans(x: Tensor, k: int, generator: torch.Generator | None, *, n_init: int = 5, iters: int = 50) -> Tensor:
    """Lloyd's k-means with k-means++ seeding, best of ``n_init`` by inertia; returns (N,) cluster ids.

    Hand-written (a few lines) to draw every random choice from ``generator``.
    """
    best, best_inertia = None, math.inf
    k = min(k, len(x))
    for _ in range(n_init):
        centres = x[torch.randint(len(x), (1,), generator=generator)]
        for _ in range(k - 1):
            d2 = torch.cdist(x, centres).min(1).values.pow(2)
            pick = torch.multinomial(d2 / d2.sum(), 1, generator=generator) if d2.sum() > 0 \
                else torch.randint(len(x), (1,), generator=generator)
            centres = torch.cat([centres, x[pick]])
        for _ in range(iters):
            assign = torch.cdist(x, centres).argmin(1)
            moved = torch.stack([x[assign == j].mean(0) if (assign == j).any() else centres[j] for j in range(k)])
            if torch.equal(moved, centres):
                break
            centres = moved
        inertia = float(torch.cdist(x, centres).min(1).values.pow(2).sum())
        if inertia < best_inertia:
            best, best_inertia = torch.cdist(x, centres).argmin(1), inertia
    return best


def _unit_rows(x: Tensor) -> Tensor:
    x = x.flatten(1)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


class UnSplitLabels(Attack):
    """Label inference by gradient matching when the client keeps only the last layer (U-shaped).

    Erdogan, Küpçü, Çiçek, "UnSplit: ..." (WPES 2022), label inference: for each sample, try every
    label on a clone of the tail and keep the one whose gradient is closest to the observed one.
    The server observes ``g_i = W^T (softmax(W h_i + b) - onehot(y_i)) / B`` (the gradient of the
    mean cross-entropy with respect to its own output ``h_i``, the tail's input) and knows
    ``h_i``; the tail's weights are unknown, so they are fitted too. Per start:

    1. initial labels: k-means (K = the tail's outputs) on the unit-normalized gradients
       (``"gradients"``: early in training each class's gradients point along ``-W_y``), on the
       centred, unit-normalized outputs ``h`` (``"features"``: late in training ``h`` clusters by
       class), on both (``"joint"``), or the untrained clone's guesses (``"clone"``: the paper);
    2. a clone of the tail trained by cross-entropy on ``(h, labels)`` (what the client did),
       then rounds of: fit the clone's weights so its input gradients match the observed ones
       (L-BFGS, float64), and relabel each sample by the closest candidate gradient, until no
       label changes;
    3. the start whose clone fits the observed gradients best (relative squared error) wins:
       the true labels make the fit exact up to the drift of the tail's weights across the
       observed steps, and wrong ones do not.

    Labels come out up to a permutation of the classes (see the module docstring); ``known``
    names them.

    Args:
        tail: the tail's ARCHITECTURE (a factory, or a module whose weights are never read).
        known: labels the attacker knows, ``{row: label}`` with rows in transcript order of the
            gradients; they stay fixed and name the classes (one per class names all).
        init: one start or a sequence of starts, from ``INITS``.
        rounds: maximum fit/relabel rounds per start.
        fit_steps: L-BFGS iterations per fit.
        ce_steps, ce_lr: Adam steps and learning rate of the cross-entropy warm start.
        restarts: k-means draws per start (each a separate candidate).
        party: the attacker (receiver of the gradients, sender of the activations).
        reduction: the client's loss is the batch ``"mean"`` (default) or ``"sum"`` of
            per-sample cross-entropies (observed gradients are rescaled by the batch size for "mean").

    Example:
        >>> from toolkit.wire import Wire
        >>> _ = torch.manual_seed(0)
        >>> tail, wire = nn.Linear(16, 4), Wire()
        >>> h, y = torch.randn(32, 16), torch.arange(32) % 4
        >>> hl = wire.send(h, sender="server", receiver="client", kind="activations").requires_grad_()
        >>> F.cross_entropy(tail(hl), y).backward()
        >>> _ = wire.send(hl.grad, sender="client", receiver="server", kind="gradients")
        >>> attack = UnSplitLabels(lambda: nn.Linear(16, 4), known={0: 0, 1: 1, 2: 2, 3: 3})
        >>> result = attack.run(wire.observed(), generator=torch.Generator().manual_seed(0))
        >>> bool((result.labels == y).all())
        True
    """

    threat_model = ("honest-but-curious server in U-shaped split learning whose client keeps only the last "
                    "layer: knows the tail's architecture (not its weights), the gradients it received and "
                    "the activations it sent itself (its own outputs); class names only through `known`")
    needs = "gradients"

    def __init__(self, tail: Architecture, *, known: Mapping[int, int] | None = None,
                 init: str | Sequence[str] = ("gradients", "joint", "features"), rounds: int = 5,
                 fit_steps: int = 500, ce_steps: int = 100, ce_lr: float = 0.01, restarts: int = 1,
                 party: str = "server", reduction: str = "mean"):
        self._make_clone = _CloneMaker(tail, "tail")
        self.architecture = self._make_clone.name
        known = dict(known or {})
        for row, label in known.items():
            for name, v in (("row", row), ("label", label)):
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise ValueError(f"known maps rows to labels (non-negative ints), got {name} {v!r}")
        self.known = known
        starts = (init,) if isinstance(init, str) else tuple(init)
        if not starts or any(s not in INITS for s in starts):
            raise ValueError(f"init must be one of {INITS} or a non-empty sequence of them, got {init!r}")
        self.init = starts
        self.rounds = positive_int("rounds", rounds)
        self.fit_steps = positive_int("fit_steps", fit_steps)
        self.ce_steps = positive_int("ce_steps", ce_steps)
        self.ce_lr = positive("ce_lr", ce_lr)
        self.restarts = positive_int("restarts", restarts)
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction
        self.party = party

    # -- inputs --------------------------------------------------------------------------------
    def _pairs(self, observed: Sequence[Transfer]) -> tuple[Tensor, Tensor]:
        """(h, G): the attacker's own outputs and the per-sample gradients it got back for them."""
        observed = list(observed)
        grads = [t for t in select(observed, "gradients", "UnSplitLabels") if t.receiver == self.party]
        if not grads:
            raise ValueError(f"UnSplitLabels found no gradients received by {self.party!r}")
        sent: dict[tuple, list[Transfer]] = {}
        for t in observed:
            if t.kind == "activations" and t.sender == self.party:
                sent.setdefault((t.step, t.phase, t.receiver), []).append(t)
        acts = []
        for g in grads:
            queue = sent.get((g.step, g.phase, g.sender))
            if not queue:
                raise ValueError(f"UnSplitLabels needs the activations {self.party!r} sent to {g.sender!r} at step "
                                 f"{g.step} (its own outputs, e.g. wire.observed(by={g.sender!r}, "
                                 f"kind='activations', sender={self.party!r})) beside the gradients it received")
            acts.append(queue.pop(0))
        h, g = stack(acts, "UnSplitLabels"), stack(grads, "UnSplitLabels")
        if h.shape != g.shape:
            raise ValueError(f"the gradients {tuple(g.shape)} do not match the activations {tuple(h.shape)}")
        if self.reduction == "mean":
            g = g * torch.cat([torch.full((len(t.tensor),), float(len(t.tensor))) for t in grads]).view(
                -1, *[1] * (g.dim() - 1))
        return h.double(), g.double()  # (N, d) tail inputs, (N, d) per-sample gradients

    # -- the pieces ----------------------------------------------------------------------------
    def _distances(self, clone: nn.Module, h: Tensor, g: Tensor, k: int) -> Tensor:
        """(N, K) squared distance between the observed gradient and the clone's for each label."""
        return torch.stack([(_input_gradients(clone, h, torch.full((len(h),), c)) - g).flatten(1).pow(2).sum(1)
                            for c in range(k)], 1)

    def _fit(self, clone: nn.Module, h: Tensor, g: Tensor, labels: Tensor) -> float:
        """Fit the clone so its input gradients under ``labels`` match ``g``; returns the relative error."""
        scale = g.flatten(1).pow(2).sum(1).mean().clamp_min(1e-300)
        opt = torch.optim.LBFGS(clone.parameters(), lr=1, max_iter=self.fit_steps, history_size=50,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-12, tolerance_change=1e-15)

        def closure() -> Tensor:
            opt.zero_grad()
            loss = (_input_gradients(clone, h, labels, create_graph=True) - g).flatten(1).pow(2).sum(1).mean() / scale
            loss.backward()
            return loss

        opt.step(closure)
        return float((_input_gradients(clone, h, labels) - g).flatten(1).pow(2).sum(1).mean() / scale)

    def _name(self, labels: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Rename cluster ids so the known rows carry their known labels; (labels, named classes)."""
        named = torch.zeros(k, dtype=torch.bool)
        if not self.known:
            return labels, named
        from scipy.optimize import linear_sum_assignment

        rows = torch.tensor(list(self.known))
        votes = torch.zeros(k, k)
        votes.index_put_((labels[rows], torch.tensor(list(self.known.values()))), torch.ones(len(rows)),
                         accumulate=True)
        ids, names = linear_sum_assignment(-votes.numpy())
        mapping = torch.arange(k)
        mapping[torch.as_tensor(ids)] = torch.as_tensor(names)
        named[torch.tensor(sorted(set(self.known.values())))] = True
        if int(named.sum()) == k - 1:  # the last class is the one left over
            named[:] = True
        out = mapping[labels]
        out[rows] = torch.tensor(list(self.known.values()))
        return out, named

    def _start(self, how: str, clone: nn.Module, h: Tensor, g: Tensor, k: int,
               generator: torch.Generator | None) -> Tensor:
        if how == "clone":
            return self._distances(clone, h, g, k).argmin(1)
        hc = h.flatten(1) - h.flatten(1).mean(0)
        features = {"gradients": _unit_rows(g), "features": _unit_rows(hc),
                    "joint": torch.cat([_unit_rows(g), _unit_rows(hc)], 1)}[how]
        return _kmeans(features.float(), k, generator)

    def run(self, observed: Sequence[Transfer], *, show_progress: bool = False,
            generator: torch.Generator | None = None, max_steps: int | None = None) -> AttackResult:
        """Infer the label of every sample whose gradient the attacker received.

        Args:
            observed: the gradients the attacker received AND the activations it sent (its own
                outputs), e.g. ``wire.observed(by="server", kind="gradients") +
                wire.observed(by="client", kind="activations", sender="server")``.
            max_steps: caps the fit/relabel rounds of each start.
            generator: the k-means draws and the clones' initialization (torch's global RNG when None).

        Returns:
            ``labels`` (N,) in transcript order of the gradients; ``history``: the relative fit
            error of the kept start after each round; ``extras``: ``clone`` (the fitted tail),
            ``fits`` (start -> final relative fit error), ``start`` (the one kept), ``named``
            (K,) which classes ``known`` names (others are cluster indices).
        """
        check_generator(generator)
        rounds = steps_for(self.rounds, max_steps)
        h, g = self._pairs(observed)
        n = len(h)
        bad = [r for r in self.known if r >= n]
        if bad:
            raise ValueError(f"known names rows {bad} but only {n} gradients were observed")
        runs: dict[str, tuple[float, Tensor, nn.Module, list[float], Tensor]] = {}
        interrupted = False
        try:
            starts = [(how, i) for how in self.init for i in range(self.restarts if how != "clone" else 1)]
            for how, i in progress(starts, show=show_progress, desc="UnSplit labels"):
                clone = self._make_clone(generator).double()
                try:
                    out = trace(clone, h[:2], where="the tail clone")
                except ValueError as err:
                    raise ValueError(f"the tail clone cannot take the observed activations: {err}") from None
                if out.dim() != 2:
                    raise ValueError(f"the tail clone must output (N, classes) scores, got {tuple(out.shape)}")
                k = out.shape[1]
                if any(v >= k for v in self.known.values()):
                    raise ValueError(f"known labels must be below the tail's {k} outputs, got {self.known}")
                labels, named = self._name(self._start(how, clone, h, g, k, generator), k)
                fixed = torch.tensor(list(self.known), dtype=torch.long)
                opt = torch.optim.Adam(clone.parameters(), lr=self.ce_lr)
                for _ in range(self.ce_steps):  # warm start: train the clone as the client trained the tail
                    opt.zero_grad()
                    F.cross_entropy(clone(h), labels).backward()
                    opt.step()
                history: list[float] = []
                for _ in range(rounds):
                    history.append(self._fit(clone, h, g, labels))
                    new = self._distances(clone, h, g, k).argmin(1)
                    new[fixed] = labels[fixed]
                    changed = not torch.equal(new, labels)
                    labels = new
                    if not changed:
                        break
                key = how if i == 0 else f"{how}:{i}"
                runs[key] = (history[-1], labels, clone.requires_grad_(False), history, named)
        except KeyboardInterrupt:
            interrupted = True
            if not runs:
                raise
        start = min(runs, key=lambda s: runs[s][0])
        fit, labels, clone, history, named = runs[start]
        return AttackResult("unsplit-labels", labels=labels, history=history, config=self.config(),
                            extras={"clone": clone, "fits": {s: r[0] for s, r in runs.items()}, "start": start,
                                    "named": named, "interrupted": interrupted})
