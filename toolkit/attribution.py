"""Which input pixels or features a part of the smashed data carries: attributions with captum.

:func:`attribute` explains one scalar per sample computed from a client part's cut-layer output,
with respect to that sample's input:

* ``target=None``: the L2 norm of the whole activation vector (what the server receives, in all);
* ``target=c``: channel ``c``, summed over its spatial positions (feature ``c`` for flat outputs).

Methods come from captum (Kokhlikyan et al., "Captum: A unified and generic model
interpretability library for PyTorch", 2020): ``"integrated_gradients"`` (Sundararajan, Taly, Yan,
"Axiomatic attribution for deep networks", 2017; baseline all zeros unless given) and
``"saliency"`` (Simonyan, Vedaldi, Zisserman, "Deep inside convolutional networks", 2014: the
absolute input gradient). Nothing here is written by hand but the scalar each method explains.

The part is evaluated as it is (train or eval mode left unchanged) and its parameters' ``.grad``
are left untouched: captum differentiates with ``torch.autograd.grad``.

Example:
    >>> import torch
    >>> from toolkit import models
    >>> client, _ = models.cut(models.lenet(), at="pool1")
    >>> a = attribute(client, torch.rand(2, 1, 28, 28), target=3, method="saliency")
    >>> a.shape
    torch.Size([2, 1, 28, 28])
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from toolkit import validate

__all__ = ["attribute", "scalar_of", "METHODS"]


def _integrated_gradients(forward: Callable[[Tensor], Tensor], x: Tensor, baseline: Tensor, steps: int) -> Tensor:
    from captum.attr import IntegratedGradients

    return IntegratedGradients(forward).attribute(x, baselines=baseline, n_steps=steps)


def _saliency(forward: Callable[[Tensor], Tensor], x: Tensor, baseline: Tensor, steps: int) -> Tensor:
    from captum.attr import Saliency

    return Saliency(forward).attribute(x, abs=True)


METHODS: dict[str, Callable[[Callable[[Tensor], Tensor], Tensor, Tensor, int], Tensor]] = {
    "integrated_gradients": _integrated_gradients,
    "saliency": _saliency,
}


def scalar_of(part: nn.Module, target: int | None) -> Callable[[Tensor], Tensor]:
    """The function ``x -> (B,)`` that :func:`attribute` explains: the norm of ``part(x)`` per sample
    (``target=None``) or its channel ``target`` summed over positions."""
    def forward(x: Tensor) -> Tensor:
        z = part(x)  # (B, C, ...) cut-layer activations
        if target is None:
            return z.flatten(1).norm(dim=1)
        if z.dim() < 2 or not 0 <= target < z.shape[1]:
            raise ValueError(f"target channel {target} does not exist: the cut-layer output has shape "
                             f"{tuple(z.shape)} ({z.shape[1] if z.dim() > 1 else 0} channels)")
        return z[:, target].reshape(len(z), -1).sum(dim=1)

    return forward


def attribute(part: nn.Module, x: Tensor, *, target: int | None = None, method: str = "integrated_gradients",
              steps: int = 32, baseline: Tensor | None = None) -> Tensor:
    """Attribution of a cut-layer quantity of ``part`` to each entry of ``x``, shape of ``x``.

    Args:
        part: the client's model part (its output is what crosses the cut).
        x: a batch of inputs (B, ...), float.
        target: None for the activation vector's L2 norm, or a channel (feature) index.
        method: ``"integrated_gradients"`` or ``"saliency"`` (see :data:`METHODS`).
        steps: integration steps of integrated gradients.
        baseline: integrated gradients' reference input, shape of ``x`` or of one sample (default 0).

    Returns:
        A tensor shaped like ``x``: integrated gradients sum (per sample) to ``f(x) - f(baseline)``
        up to the integration error; saliency is ``|df/dx|``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {sorted(METHODS)}")
    x = validate.finite(validate.tensor(x, "x", min_dim=2), "x", hint="attributions need finite inputs")
    if not x.is_floating_point():
        raise ValueError(f"x must hold floats (inputs to the client part), got dtype {x.dtype}")
    if target is not None:
        target = validate.non_negative_int("target", target)
    steps = validate.positive_int("steps", steps)
    if baseline is None:
        baseline = torch.zeros_like(x)
    else:
        baseline = validate.tensor(baseline, "baseline")
        if baseline.shape not in (x.shape, x.shape[1:]):
            raise ValueError(f"baseline must have the shape of x {tuple(x.shape)} or of one sample "
                             f"{tuple(x.shape[1:])}, got {tuple(baseline.shape)}")
        baseline = baseline.to(x.dtype).expand_as(x).contiguous()
    forward = scalar_of(part, target)
    with torch.no_grad():
        forward(x[:1])  # a bad target fails here, with its message, before captum runs
    grads = [p.grad for p in part.parameters()]
    try:
        out = METHODS[method](forward, x.detach().clone().requires_grad_(True), baseline, steps)
    finally:
        for p, g in zip(part.parameters(), grads):
            p.grad = g
    return out.detach()
