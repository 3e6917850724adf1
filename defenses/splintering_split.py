"""Splintering in split learning (set-up iii): the server's first layer runs on shares of the
cut-layer activations; the client reassembles its output.

Follows :mod:`defenses.splintering` (Vepakomma, Balla, Raskar, "Splintering with distributions: a
stochastic decoy scheme for private computation", 2020; our construction, see there).
:class:`SplinteredLayer` is a Wire transform for the client's ``"activations"``: where plain split
learning would send ``z`` (the cut-layer activations) and let the server apply its first layer
``W z + b``, the transform (on the client's side)

1. splits ``z`` into shares and decoys and sends them to the server (kind ``"shares"``);
2. the server applies ``W`` without its bias to every row and sends the results back
   (``"results"``); the client reassembles ``W z = sum c_i W s_i`` (``W`` is linear, the bias is
   affine: it stays on the server, in the first module of ``rest`` from :func:`first_linear`);
3. what then crosses as ``"activations"`` is ``W z``; the server adds ``b`` and runs the rest.

Backward: the server computes ``g = dL/d(W z)`` as usual and sends the client ``W^T g``
(``"gradients"``), the gradient with respect to ``z``; the transform's backward pass is exactly
that. (In this in-process simulation the split loop has already handed ``g`` to the client, and
the transform's backward pass then delivers ``W^T g`` computed from that same ``g``: the
gradient bytes are counted twice; a deployment would send only ``W^T g``.) ``W`` itself is **not
trained**: its gradient ``sum_b g_b z_b^T`` would give the server
``z`` whenever the batch is no larger than ``W``'s output (it knows ``g``), and per-share
gradients ``c_i g`` would give it the coefficients. Keep it fixed (random, or trained beforehand).

What the server learns, honest-but-curious and knowing this scheme:

* From the shares: ``z`` up to the span of its rows (see :mod:`defenses.splintering`); nothing
  from the span once ``n_shares + n_decoys`` reaches ``z``'s size.
* From what crosses next: ``W z`` itself. If ``W`` is injective (as many outputs as inputs and
  full rank) the server recovers ``z = pinv(W) W z`` exactly, and splintering hides nothing that
  plain split learning would not have shown; the defense only helps when ``W`` has fewer outputs
  than ``z`` has values, and then the server still learns ``z``'s projection onto ``W``'s row
  space. ``tests/test_splintering.py`` measures both cases.
* The gradients: ``g`` (it computed it) and nothing new.

Example:
    >>> from toolkit.wire import Wire
    >>> from defenses.splintering import Splinter
    >>> wire = Wire()
    >>> head, rest = first_linear(nn.Sequential(nn.Linear(6, 3), nn.ReLU()))
    >>> wire.transforms.append(SplinteredLayer(head, Splinter(2, 2, generator=torch.Generator().manual_seed(0)), wire))
    >>> z = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    >>> out = rest(wire.send(z, sender="client", receiver="server", kind="activations"))
    >>> torch.allclose(out, torch.relu(head[0](z)), atol=1e-5), [t.kind for t in wire.observed(by="server")]
    (True, ['shares', 'activations'])
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from defenses.splintering import Splinter
from toolkit.wire import Wire

__all__ = ["SplinteredLayer", "first_linear", "Bias"]

LINEAR = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)   # a first layer splintering can run on shares
SHAPING = (nn.Flatten, nn.Unflatten, nn.Identity)        # linear reshapes allowed before it


class Bias(nn.Module):
    """The first layer's bias, added by the server after reassembly (it is affine, not linear)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.bias = layer.bias
        self.conv = not isinstance(layer, nn.Linear)

    def forward(self, h: Tensor) -> Tensor:
        if self.bias is None:
            return h
        return h + (self.bias.reshape(-1, *([1] * (h.dim() - 2))) if self.conv else self.bias)


def first_linear(server_part: nn.Module) -> tuple[nn.Sequential, nn.Sequential]:
    """``(head, rest)``: the server part's leading reshapes and first linear/conv layer, and the rest
    starting with that layer's :class:`Bias`. ``rest(head(z))`` is ``server_part(z)``.

    ValueError when the part does not start (after reshapes) with nn.Linear or nn.Conv1d/2d/3d.
    """
    if not isinstance(server_part, nn.Module):
        raise ValueError(f"server_part must be an nn.Module, got {type(server_part).__name__}")
    layers = list(server_part) if isinstance(server_part, nn.Sequential) else [server_part]
    i = 0
    while i < len(layers) and isinstance(layers[i], SHAPING):
        i += 1
    if i == len(layers) or not isinstance(layers[i], LINEAR):
        what = type(layers[i]).__name__ if i < len(layers) else "nothing"
        raise ValueError(f"splintering on an operation that is not linear: the server's part starts with "
                         f"{what}; splintering runs a first nn.Linear or nn.Conv layer on shares")
    return nn.Sequential(*layers[:i + 1]), nn.Sequential(Bias(layers[i]), *layers[i + 1:])


def _without_bias(head: nn.Sequential, x: Tensor) -> Tensor:
    *shaping, layer = list(head)
    for m in shaping:
        x = m(x)
    w = layer.weight.detach()
    return F.linear(x, w) if isinstance(layer, nn.Linear) else layer._conv_forward(x, w, None)


class _Protocol(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, transform: SplinteredLayer) -> Tensor:
        ctx.transform, ctx.shape = transform, z.shape
        return transform._forward(z.detach())

    @staticmethod
    def backward(ctx, g: Tensor):
        return ctx.transform._backward(g, ctx.shape), None


class SplinteredLayer:
    """Wire transform: the server's first layer ``head`` runs on shares and decoys of the client's
    activations (module docstring). Append it to ``wire.transforms`` of the same ``wire``.

    Args:
        head: the server's leading reshapes and first layer (from :func:`first_linear`); its weight
            is used on the server's side only and is not trained.
        splinter: shares, decoys and the generator they draw from.
        wire: the wire shares and results cross (the one the transform is on).
        client, server: party names on the wire.
        kind: the kind it handles (others pass through untouched).
    """

    def __init__(self, head: nn.Module, splinter: Splinter, wire: Wire, *, client: str = "client",
                 server: str = "server", kind: str = "activations"):
        if not isinstance(splinter, Splinter) or not isinstance(wire, Wire):
            raise ValueError(f"SplinteredLayer needs a Splinter and a Wire, got {type(splinter).__name__} and "
                             f"{type(wire).__name__}")
        head = head if isinstance(head, nn.Sequential) else nn.Sequential(head)
        first_linear(head)                                          # its ValueError if not linear
        if not isinstance(list(head)[-1], LINEAR):
            raise ValueError("head must end with its linear layer (use first_linear(server_part)[0])")
        self.head, self.splinter, self.wire = head, splinter, wire
        self.client, self.server, self.kind = client, server, kind

    def __deepcopy__(self, memo):  # a copy (e.g. a pipeline's dry run) draws from a copy of the generator
        out = copy.copy(self)
        memo[id(self)] = out
        out.wire = copy.deepcopy(self.wire, memo)
        g = self.splinter.generator
        out.splinter = copy.copy(self.splinter)
        if g is not None:
            out.splinter.generator = torch.Generator().set_state(g.get_state())
        return out

    def __call__(self, t: Tensor, *, kind: str) -> Tensor:
        if kind != self.kind or not isinstance(t, Tensor):
            return t
        return _Protocol.apply(t, self)

    def _forward(self, z: Tensor) -> Tensor:
        rows, secret = self.splinter.split(z)                                    # (B * m, ...) on the client
        got = self.wire.send(rows, sender=self.client, receiver=self.server, kind="shares")
        with torch.no_grad():
            results = _without_bias(self.head, got)                              # W s_i on the server
        back = self.wire.send(results, sender=self.server, receiver=self.client, kind="results")
        return Splinter.reassemble(back, secret)                                 # (B, ...) W z

    def _backward(self, g: Tensor, shape: torch.Size) -> Tensor:
        with torch.enable_grad():                                                # W^T g on the server
            x0 = torch.zeros(shape, dtype=g.dtype, requires_grad=True)
            (grad,) = torch.autograd.grad(_without_bias(self.head, x0), x0, g)
        return self.wire.send(grad, sender=self.server, receiver=self.client, kind="gradients")

    def __repr__(self) -> str:
        return f"SplinteredLayer({list(self.head)[-1]}, {self.splinter!r})"
