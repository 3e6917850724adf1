"""Hooks: where an attack or a detector changes one party's behaviour in the split training loop.

The one split training loop (:meth:`toolkit.split.SplitNN.steps`) calls a party's hook at these
points; every default is the honest protocol, so a hook overrides only what its party does
differently. Register hooks by party name: ``SplitNN.vanilla(..., hooks={"server": h})``.
Everything still crosses the Wire, so a Wire defense applies to hooked runs too.

* :meth:`Hook.labels`: the labels a label owner sends (a detector's fake batches, SplitGuard).
* :meth:`Hook.respond`: a last-stage party that returns its own gradients for the activations it
  received instead of training the task (a malicious server, FSHA). Overriding it makes the
  party malicious: its model part and the task loss are not run.
* :meth:`Hook.loss`: a term a data-holding party adds to its own objective, from its private
  inputs and the cut-layer outputs it computed from them (NoPeek's ``alpha * dCor(x, z)``).
* :meth:`Hook.gradients`: the cut-layer gradient a party sends back, given the labels it scored
  (label defenses such as max-norm and Marvell perturb it; the result still crosses the Wire).
* :meth:`Hook.check`: a party's look at what it received, once it has backpropagated it (its
  parameters' ``.grad`` are set); returning False skips its optimizer step.
* :meth:`Hook.record`: values logged in the history row of a step (a defense's dCor, epsilon).
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from toolkit.parties import Party


class Hook:
    """One party's deviation from (or check on) the split protocol; subclass and override.

    Example (a client that refuses to step when the gradient it receives is huge):
        >>> import torch
        >>> class NormGuard(Hook):
        ...     def check(self, step, party, received):
        ...         return all(float(g.norm()) < 1e3 for g in received)
        >>> NormGuard().check(1, None, [torch.ones(2, 3)])
        True
    """

    def labels(self, step: int, y: Tensor, *, n_classes: int | None) -> Tensor:
        """The labels this party sends at ``step`` (it owns them; ``n_classes`` is the number of
        classes of its labels, None for a task that is not classification); default: the true ones."""
        return y

    def respond(self, step: int, received: Sequence[Tensor], labels: Tensor | None) -> Sequence[Tensor]:
        """The gradients this last-stage party sends back for what it ``received`` (one tensor per
        last-stage input, same shapes), given the labels it received (None if none were sent)."""
        raise NotImplementedError  # only called when a subclass overrides it (see responds)

    def loss(self, step: int, inputs: Tensor, outputs: Tensor) -> Tensor | None:
        """An extra scalar this party adds to its objective at ``step``, from a first-stage segment's
        private ``inputs`` (B, ...) and the ``outputs`` (B, ...) it computed from them (before the
        wire's transforms, inside its autograd graph); default None (nothing added)."""
        return None

    def gradients(self, step: int, gradient: Tensor, labels: Tensor | None) -> Tensor:
        """The gradient this party sends back for a tensor it received (same shape), given the
        labels of the task it scores (None if it scores none); default: the true gradient."""
        return gradient

    def record(self, step: int) -> dict[str, float]:
        """Values to log as columns of ``step``'s history row; default none."""
        return {}

    def check(self, step: int, party: Party, received: Sequence[Tensor]) -> bool:
        """Called after ``party`` backpropagated the gradients it ``received`` at ``step``;
        return False to skip its optimizer step."""
        return True

    @property
    def responds(self) -> bool:
        """Whether this hook replaces its party's task training (it overrides :meth:`respond`)."""
        return type(self).respond is not Hook.respond


class Hooks(Hook):
    """Several hooks acting for one party, e.g. NoPeek's loss term and SplitGuard's checks on the
    same client: ``hooks={"client": Hooks(NoPeek(3.0), guard)}``.

    In order: each ``labels`` and ``gradients`` hook sees the previous one's output; the ``loss``
    terms add up; every ``check`` runs and the party steps only if all agree; ``record`` merges
    (a column two hooks both log is an error). At most one may ``respond``.

    Example:
        >>> import torch
        >>> class Twice(Hook):
        ...     def gradients(self, step, gradient, labels):
        ...         return 2 * gradient
        >>> Hooks(Twice(), Twice()).gradients(1, torch.ones(2), None)
        tensor([4., 4.])
    """

    def __init__(self, *hooks: Hook):
        if not hooks or not all(isinstance(h, Hook) for h in hooks):
            raise TypeError(f"Hooks takes one or more toolkit.split.Hook, got {[type(h).__name__ for h in hooks]}")
        responders = [h for h in hooks if h.responds]
        if len(responders) > 1:
            raise ValueError(f"at most one hook of a party may answer with its own gradients (respond); "
                             f"got {[type(h).__name__ for h in responders]}")
        self.hooks = list(hooks)
        self._responder = responders[0] if responders else None

    def labels(self, step: int, y: Tensor, *, n_classes: int | None) -> Tensor:
        for h in self.hooks:
            y = h.labels(step, y, n_classes=n_classes)
        return y

    @property
    def responds(self) -> bool:
        return self._responder is not None

    def respond(self, step: int, received: Sequence[Tensor], labels: Tensor | None) -> Sequence[Tensor]:
        if self._responder is None:
            raise NotImplementedError  # SplitNN only calls it when responds is True
        return self._responder.respond(step, received, labels)

    def loss(self, step: int, inputs: Tensor, outputs: Tensor) -> Tensor | None:
        terms = [t for t in (h.loss(step, inputs, outputs) for h in self.hooks) if t is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def gradients(self, step: int, gradient: Tensor, labels: Tensor | None) -> Tensor:
        for h in self.hooks:
            gradient = h.gradients(step, gradient, labels)
        return gradient

    def check(self, step: int, party: Party, received: Sequence[Tensor]) -> bool:
        verdicts = [h.check(step, party, received) for h in self.hooks]  # every check sees every step
        return all(verdicts)

    def record(self, step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for h in self.hooks:
            logged = h.record(step)
            clash = set(out) & set(logged)
            if clash:
                raise ValueError(f"two hooks of one party log the same history column(s) {sorted(clash)}")
            out.update(logged)
        return out

    def __repr__(self) -> str:
        return f"Hooks({', '.join(type(h).__name__ for h in self.hooks)})"
