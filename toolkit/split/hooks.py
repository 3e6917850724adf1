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
