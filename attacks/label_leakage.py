"""Label leakage from cut-layer gradients in two-party split learning.

Li et al., "Label leakage and protection in two-party split learning" (ICLR 2022): one party (the
client) holds the features and the bottom model, the other (the server) holds the labels and the
top model. For every training batch the client receives the gradient of the loss with respect to
its cut-layer output. In a binary task with a rare positive class, once the model predicts the
majority class with some confidence:

- the gradients of positives are much larger than those of negatives (the loss gradient at the
  logits is ``p - y``: about 1 for a missed positive, about 0 for a well-classified negative), so
  the per-sample gradient norm ranks positives first (:class:`NormAttack`);
- positives' gradients point one way and negatives' the opposite way (the logit gradient changes
  sign with the label), so the cosine with any positive's gradient separates the classes
  (:class:`DirectionAttack`).

Both attacks read only what the client received, ``wire.observed(by="client", kind="gradients")``,
and return per-sample scores (higher = more likely positive) in transcript order, with
``extras["batch_steps"]`` and ``extras["batch_sizes"]`` so the caller can align them with its
ground truth (``SplitNN.batches[step]``). Scoring follows the paper: ROC AUC within each batch
(:func:`per_batch_auc`), summarized by its mean and by the 95th percentile of ``|AUC - 0.5|`` over
batches (:func:`leak_auc_summary`), the statistic of the authors' trade-off plots.

Example:
    >>> from toolkit.wire import Transfer
    >>> g = torch.tensor([[3.0, 0.0], [-0.1, 0.0], [-0.2, 0.1]])  # (B, d) the client's gradients
    >>> seen = [Transfer(1, "server", "client", "gradients", g)]
    >>> result = NormAttack().run(seen)
    >>> result.scores
    tensor([3.0000, 0.1000, 0.2236])
    >>> per_batch_auc(result, {1: torch.tensor([1, 0, 0])})
    [1.0]
    >>> DirectionAttack().run(seen).scores  # cosine with the largest gradient (the first row)
    tensor([ 1.0000, -1.0000, -0.8944])
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from attacks.base import Attack, AttackResult, check_generator, select, stack, steps_for
from toolkit.metrics import auc
from toolkit.progress import progress
from toolkit.wire import Transfer

__all__ = ["NormAttack", "DirectionAttack", "per_batch_auc", "leak_auc_summary"]

_THREAT = ("passive party (the client) in two-party split learning: reads the cut-layer gradients it "
           "receives, knows nothing of the labels")


def _gradient_batches(observed: Sequence[Transfer], attack: str,
                      max_steps: int | None) -> tuple[list[Transfer], list[Tensor]]:
    """The gradient transfers (the first ``max_steps`` when given) and their (B, d) flattened tensors."""
    transfers = select(observed, "gradients", attack)
    transfers = transfers[:steps_for(len(transfers), max_steps)]
    for t in transfers:
        if isinstance(t.tensor, Tensor) and (t.tensor.dim() < 1 or len(t.tensor) == 0):
            raise ValueError(f"{attack} needs per-sample gradients (B, ...) with B >= 1; the transfer at "
                             f"step {t.step} holds shape {tuple(t.tensor.shape)}")
    flat = stack([_flattened(t) for t in transfers], attack)  # (N, d): every batch, in transcript order
    sizes = [len(t.tensor) for t in transfers]
    return transfers, list(flat.split(sizes))


def _flattened(t: Transfer) -> Transfer:
    if not isinstance(t.tensor, Tensor):
        return t  # a Packet: stack() says to decode it first
    return replace(t, tensor=t.tensor.reshape(len(t.tensor), -1))  # (B, d)


def _batch_extras(transfers: Sequence[Transfer]) -> dict:
    return {"batch_steps": [t.step for t in transfers], "batch_sizes": [len(t.tensor) for t in transfers]}


class NormAttack(Attack):
    """Norm attack: score each sample by the L2 norm of the cut-layer gradient it received.

    Li et al., "Label leakage and protection in two-party split learning" (ICLR 2022), section 3.
    Assumes a binary task whose positive class is the rare one; the score ranks positives first once
    the model has learnt to predict the majority class (a few steps into training: at
    initialization, when every prediction is near 0.5, the norms do not separate the classes).

    Returns an ``AttackResult`` whose ``scores`` (N,) are the per-sample norms of every batch,
    concatenated in transcript order; ``extras["batch_steps"]`` and ``extras["batch_sizes"]`` say
    which batch each block of scores came from. Score it with :func:`per_batch_auc` or, pooled over
    all samples, with ``toolkit.metrics.evaluate(result, labels=...)``.

    Example:
        >>> from toolkit.wire import Transfer
        >>> g = torch.tensor([[[0.0, 2.0]], [[0.1, 0.0]]])  # (B, 1, 2): any shape per sample
        >>> NormAttack().run([Transfer(3, "server", "client", "gradients", g)]).scores
        tensor([2.0000, 0.1000])
    """

    threat_model: ClassVar[str] = _THREAT
    needs: ClassVar[str] = "gradients"

    def run(self, observed: Sequence[Transfer], *, show_progress: bool = False,
            generator: torch.Generator | None = None, max_steps: int | None = None) -> AttackResult:
        """Score what the client received; ``max_steps`` reads only the first batches.

        Deterministic: ``generator`` is not used.

        Raises:
            ValueError: the transcript holds no gradients (the message names the kinds it holds), or
                its gradients are not plain, finite, floating-point per-sample tensors of one shape.
        """
        check_generator(generator)
        transfers, grads = _gradient_batches(observed, type(self).__name__, max_steps)
        scores = [g.norm(dim=1) for g in progress(grads, show=show_progress, desc="norm attack")]  # (B,)
        return AttackResult("norm", scores=torch.cat(scores), config=self.config(),
                            extras=_batch_extras(transfers))


HINTS = ("max_norm", "known")


class DirectionAttack(Attack):
    """Direction (cosine) attack: score each sample by the cosine similarity between its cut-layer
    gradient and the gradient of a reference sample believed to be positive.

    Li et al., "Label leakage and protection in two-party split learning" (ICLR 2022), section 3:
    with a binary cross-entropy loss the gradient at the logits is ``(p - y)`` times a direction
    that varies little between samples, so positives' gradients point one way and negatives' the
    opposite way; the cosine with any positive's gradient is near +1 for positives and near -1 for
    negatives.

    Args:
        hint: where the reference comes from.

            - ``"max_norm"`` (default, unsupervised, needs no label): in each batch, the sample with
              the largest gradient norm. This assumes (1) a binary task whose positive class is the
              rare one, (2) training is past its first few steps, so positives have the larger
              gradients (the norm attack's premise), and (3) the batch holds at least one positive.
              In a batch without positives the reference is a negative and the scores of that batch
              are meaningless (its AUC is undefined anyway); the reference itself scores 1.
            - ``"known"``: the attacker knows the label of some positive samples (Li et al.'s
              "hint"), passed to :meth:`run` as ``known_positive``: ``{step: row within that
              batch}``, or one ``(step, row)`` pair. A batch with its own entry uses its own known
              positive; any other batch uses the known positive from the nearest step (the earlier
              one on ties). The known samples' labels are not leakage: :func:`per_batch_auc` leaves
              them out (``extras["known_rows"]``).

    Example:
        >>> from toolkit.wire import Transfer
        >>> seen = [Transfer(1, "server", "client", "gradients", torch.tensor([[1.0, 1.0], [-1.0, 0.0]])),
        ...         Transfer(2, "server", "client", "gradients", torch.tensor([[-2.0, -2.0], [0.5, 0.5]]))]
        >>> DirectionAttack(hint="known").run(seen, known_positive=(1, 0)).scores
        tensor([ 1.0000, -0.7071, -1.0000,  1.0000])
    """

    threat_model: ClassVar[str] = (_THREAT + "; with hint='known' it also knows the label of a few "
                                   "positive samples")
    needs: ClassVar[str] = "gradients"

    def __init__(self, *, hint: str = "max_norm"):
        if hint not in HINTS:
            raise ValueError(f"hint must be one of {HINTS}, got {hint!r}")
        self.hint = hint

    def run(self, observed: Sequence[Transfer], *,
            known_positive: Mapping[int, int] | tuple[int, int] | None = None, show_progress: bool = False, generator: torch.Generator | None = None,
            max_steps: int | None = None) -> AttackResult:
        """Score what the client received; ``max_steps`` reads only the first batches.

        Args:
            known_positive: with ``hint="known"``, the positives the attacker knows:
                ``{step: row index within that batch}`` or one ``(step, row)`` pair.

        Raises:
            ValueError: no gradients in the transcript (the message names the kinds it holds);
                ``known_positive`` missing with ``hint="known"``, given with ``hint="max_norm"``,
                or naming a step that is not in the transcript or a row outside its batch.
        """
        name = type(self).__name__
        check_generator(generator)
        known = self._check_hint(known_positive)
        transfers, grads = _gradient_batches(observed, name, None)
        if known is not None:  # checked against the whole transcript, before any cap
            known = _check_known(known, transfers, name)
            known_grads = {t.step: g[known[t.step]] for t, g in zip(transfers, grads) if t.step in known}  # (d,)
        n = steps_for(len(transfers), max_steps)
        transfers, grads = transfers[:n], grads[:n]
        extras = _batch_extras(transfers)
        if known is not None:
            steps = sorted(known)
            ref_steps = [min(steps, key=lambda s: (abs(s - t.step), s)) for t in transfers]  # nearest known
            references = [known_grads[s] for s in ref_steps]
            extras["reference_steps"] = ref_steps  # per batch, the step of the known positive used
            extras["known_rows"] = {s: r for s, r in known.items() if s in set(extras["batch_steps"])}
        else:
            rows = [int(g.norm(dim=1).argmax()) for g in grads]
            references = [g[r] for g, r in zip(grads, rows)]
            extras["reference_rows"] = rows  # per batch, the row taken as the positive reference
        scores = [F.cosine_similarity(g, ref[None], dim=1)  # (B,)
                  for g, ref in progress(zip(grads, references), show=show_progress, total=len(grads),
                                         desc="direction attack")]
        return AttackResult("direction", scores=torch.cat(scores), config=self.config(), extras=extras)

    def _check_hint(self, known_positive) -> dict[int, int] | None:
        if self.hint == "max_norm":
            if known_positive is not None:
                raise ValueError("known_positive is only read with hint='known'; "
                                 "build DirectionAttack(hint='known') to use it")
            return None
        if known_positive is None:
            raise ValueError("hint='known' needs known_positive={step: row} (or one (step, row) pair)")
        if isinstance(known_positive, tuple):
            if len(known_positive) != 2:
                raise ValueError(f"known_positive as a pair must be (step, row), got {known_positive!r}")
            known_positive = {known_positive[0]: known_positive[1]}
        if not isinstance(known_positive, Mapping) or not known_positive:
            raise ValueError(f"known_positive must be a non-empty {{step: row}} dict or a (step, row) pair, "
                             f"got {known_positive!r}")
        return dict(known_positive)


def _check_known(known: dict[int, int], transfers: Sequence[Transfer], attack: str) -> dict[int, int]:
    sizes: dict[int, int] = {}
    for t in transfers:
        sizes[t.step] = min(sizes.get(t.step, len(t.tensor)), len(t.tensor))
    for step, row in known.items():
        if step not in sizes:
            raise ValueError(f"{attack}: known_positive names step {step!r}, which is not among the "
                             f"transcript's gradient steps ({min(sizes)}..{max(sizes)})")
        if isinstance(row, bool) or not isinstance(row, (int, np.integer)) or not 0 <= row < sizes[step]:
            raise ValueError(f"{attack}: known_positive row {row!r} is out of range for the batch of "
                             f"{sizes[step]} samples at step {step}")
    return {int(s): int(r) for s, r in known.items()}


# -- scoring ------------------------------------------------------------------------------------
def per_batch_auc(result: AttackResult, labels_by_step: Mapping[int, Tensor]) -> list[float]:
    """ROC AUC of the result's scores against the true labels, within each batch (Li et al., 2022).

    Args:
        result: from :class:`NormAttack` or :class:`DirectionAttack` (``scores`` and
            ``extras["batch_steps"]``, ``extras["batch_sizes"]``).
        labels_by_step: the caller's ground truth, ``{step: (B,) binary labels of that batch}``, e.g.
            ``{s: ds.y_train[idx] for s, idx in sl.batches.items()}``.

    Returns:
        One AUC per batch, in transcript order (``extras["batch_steps"]``); NaN for a batch with one
        class only. Samples whose label the attacker was given (``extras["known_rows"]``) are left out.

    Example:
        >>> r = AttackResult("norm", scores=torch.tensor([0.9, 0.1, 0.5, 0.2]),
        ...                  extras={"batch_steps": [1, 2], "batch_sizes": [2, 2]})
        >>> per_batch_auc(r, {1: torch.tensor([1, 0]), 2: torch.tensor([0, 0])})
        [1.0, nan]
    """
    extras = getattr(result, "extras", {}) or {}
    if result.scores is None or "batch_steps" not in extras or "batch_sizes" not in extras:
        raise ValueError("per_batch_auc needs a label-leakage result (scores, extras['batch_steps'] and "
                         "extras['batch_sizes'])")
    steps, sizes = extras["batch_steps"], extras["batch_sizes"]
    if sum(sizes) != len(result.scores):
        raise ValueError(f"the result holds {len(result.scores)} scores but its batches add up to {sum(sizes)}")
    known = extras.get("known_rows", {})
    aucs = []
    for step, scores in zip(steps, result.scores.split(list(sizes))):
        if step not in labels_by_step:
            raise ValueError(f"labels_by_step has no labels for step {step}")
        labels = torch.as_tensor(labels_by_step[step]).flatten()
        if len(labels) != len(scores):
            raise ValueError(f"step {step}: {len(labels)} labels for a batch of {len(scores)} scores")
        if step in known:
            keep = torch.arange(len(labels)) != known[step]
            scores, labels = scores[keep], labels[keep]
        aucs.append(auc(scores, labels))
    return aucs


def leak_auc_summary(aucs: Sequence[float]) -> dict[str, float]:
    """Summary of per-batch leak AUCs over the batches that hold both classes (NaNs skipped).

    Returns:
        ``mean_auc``, ``min_auc``, ``p95_abs_dev`` (the 95th percentile of ``|AUC - 0.5|`` over
        batches, the leakage statistic of Li et al.'s trade-off plots: 0 = no leak, 0.5 = every
        batch fully leaked, or fully inverted), ``n_batches`` (scored) and ``n_single_class``
        (skipped). NaN statistics when no batch holds both classes.

    Example:
        >>> summary = leak_auc_summary([1.0, 0.9, float("nan")])
        >>> {k: round(v, 3) for k, v in summary.items()}
        {'mean_auc': 0.95, 'min_auc': 0.9, 'p95_abs_dev': 0.495, 'n_batches': 2, 'n_single_class': 1}
    """
    a = np.asarray(list(aucs), dtype=np.float64)
    ok = a[~np.isnan(a)]
    nan = float("nan")
    if len(ok) == 0:
        return {"mean_auc": nan, "min_auc": nan, "p95_abs_dev": nan, "n_batches": 0, "n_single_class": len(a)}
    return {"mean_auc": float(ok.mean()), "min_auc": float(ok.min()),
            "p95_abs_dev": float(np.percentile(np.abs(ok - 0.5), 95)),
            "n_batches": int(len(ok)), "n_single_class": int(len(a) - len(ok))}
