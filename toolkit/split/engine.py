"""The split-learning engine: model segments on parties, joined only through the Wire.

A pipeline is a list of stages; each stage is a list of segments (a model part on a party).
Between two stages the shape of the hand-over is one of

* 1 -> 1: a chain (vanilla, U-shaped, multi-hop),
* n -> 1: several clients' cut-layer outputs merged at one party (vertical / multi-modal),
* 1 -> n: one shared output fanned out to several heads (multi-task); sent once per party.

Whenever consecutive segments sit on different parties the tensor crosses the Wire: the
sender applies the wire's transforms inside its own autograd graph, the receiver gets a fresh
leaf (``detach().requires_grad_()``) of what was delivered, trains on it, and sends the
gradient with respect to it back through the Wire; the sender continues backpropagation from
its transformed tensor with the gradient it received (Gupta & Raskar, "Distributed learning of
deep neural network over multiple agents", 2018). Without transforms this is the same
computation as training the unsplit network; with them, the same as the unsplit network with
the transforms inserted at the cut, backward pass included.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolkit.models import trace
from toolkit.parties import Party
from toolkit.wire import Wire


@dataclass(eq=False)
class Segment:
    """A model part held by a party."""

    party: Party
    module: nn.Module
    data_key: str = "x"   # first-stage segments read party.data[data_key] (and data_key + "_test")

    def __post_init__(self) -> None:
        self.party.hold(self.module)


@dataclass(eq=False)
class Task:
    """A supervised objective scored on the output of one last-stage segment.

    ``owner`` holds the labels as ``owner.data[key]`` (train) and ``owner.data[key + "_test"]``;
    when the segment computing the loss sits on another party, labels cross the Wire.
    """

    name: str
    owner: Party
    head: int = 0              # index of the last-stage segment this task scores
    key: str = "y"
    loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy  # (outputs, labels) -> mean loss


def concat(tensors: Sequence[Tensor]) -> Tensor:
    """Merge cut-layer outputs by flattening each and concatenating features."""
    return torch.cat([t.flatten(1) for t in tensors], dim=1)


def add(tensors: Sequence[Tensor]) -> Tensor:
    """Merge cut-layer outputs of equal shape by summing them."""
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise ValueError(f"merge='sum' needs equal cut-layer shapes, got {sorted(shapes)}")
    return torch.stack(list(tensors)).sum(0)


MERGES: dict[str, Callable[[Sequence[Tensor]], Tensor]] = {"concat": concat, "sum": add}


def _apply(transforms: Sequence[Callable], t: Tensor) -> Tensor:
    for transform in transforms:
        t = transform(t, kind="activations")
    return t


class Crossing(NamedTuple):
    sent: Tensor     # sender's tensor after the wire's transforms, inside the sender's autograd graph
    leaf: Tensor     # receiver's copy of what was delivered, a leaf whose .grad goes back over the wire
    sender: str
    receiver: str


class Pipeline:
    """Stages of segments joined through a Wire; see the module docstring."""

    def __init__(self, stages: Sequence[Sequence[Segment]], wire: Wire, *,
                 merge: str | Callable[[Sequence[Tensor]], Tensor] = "concat"):
        self.stages = [list(s) for s in stages]
        if len(self.stages) < 1 or any(len(s) < 1 for s in self.stages):
            raise ValueError("a pipeline needs at least one stage, each with at least one segment")
        for i, (a, b) in enumerate(zip(self.stages[:-1], self.stages[1:])):
            if len(a) > 1 and len(b) > 1:
                raise ValueError(f"stages {i} and {i + 1} have {len(a)} and {len(b)} segments; "
                                 f"only 1->1, n->1 (merge) and 1->n (fan-out) hand-overs are supported")
        if isinstance(merge, str):
            if merge not in MERGES:
                raise ValueError(f"unknown merge {merge!r}; choose one of {sorted(MERGES)}")
            merge = MERGES[merge]
        self.merge = merge
        self.wire = wire

    @property
    def parties(self) -> list[Party]:
        seen: dict[int, Party] = {}
        for stage in self.stages:
            for seg in stage:
                seen.setdefault(id(seg.party), seg.party)
        return list(seen.values())

    def check(self, input_shapes: Sequence[Sequence[int]], *, run_last: bool = True) -> list[tuple[int, ...]]:
        """Run a dummy batch (no wire) to check that the segments chain; returns the output shapes
        of the last stage (with ``run_last=False``: the shapes its segments receive).

        Raises ValueError naming the party, the layer and the shapes when they do not.
        """
        h = [torch.zeros(2, *(int(d) for d in s)) for s in input_shapes]
        transforms = copy.deepcopy(self.wire.transforms)  # copies: the dummy batch leaves their state alone
        last = len(self.stages) - 1
        for i, stage in enumerate(self.stages):
            if i == last and not run_last:
                return [tuple(x.shape[1:]) for x in h]
            outs = [trace(seg.module, x, where=f"{seg.party.name}'s part (stage {i})")
                    for seg, x in zip(stage, h)]
            if i == last:
                return [tuple(o.shape[1:]) for o in outs]
            nxt = self.stages[i + 1]
            crossing = [seg.party is not nxt[0].party or len(nxt) > 1 for seg in stage]
            with torch.no_grad():
                outs = [_apply(transforms, o) if crosses else o for o, crosses in zip(outs, crossing)]
            h = ([outs[0]] if len(outs) == 1 else [self.merge(outs)]) if len(nxt) == 1 else outs * len(nxt)
        raise AssertionError("unreachable")

    def forward(self, inputs: Sequence[Tensor], *, train: bool) -> tuple[list[Tensor], list[list[Crossing]]]:
        """Run every stage; returns the last stage's outputs and the crossings made per hand-over.

        ``inputs`` holds one tensor per first-stage segment, each its own party's private input.
        """
        received, hops = self.deliver(inputs, train=train)
        return self.head(received), hops

    def head(self, received: Sequence[Tensor]) -> list[Tensor]:
        """The last stage's outputs from what its segments received (see :meth:`deliver`)."""
        return [seg.module(x) for seg, x in zip(self.stages[-1], received)]

    def deliver(self, inputs: Sequence[Tensor], *, train: bool,
                first: Callable[[Segment, Tensor, Tensor], None] | None = None
                ) -> tuple[list[Tensor], list[list[Crossing]]]:
        """Run every stage but the last; returns what each last-stage segment receives (after a
        merge at the receiver) and the crossings made per hand-over. ``first(segment, inputs,
        outputs)`` is called for each first-stage segment (a party's look at its own cut-layer
        outputs, e.g. a loss term on them)."""
        hops: list[list[Crossing]] = []
        h = list(inputs)
        last = len(self.stages) - 1
        for i, stage in enumerate(self.stages[:last]):
            outs = [seg.module(x) for seg, x in zip(stage, h)]
            if i == 0 and first is not None:
                for seg, x, o in zip(stage, h, outs):
                    first(seg, x, o)
            nxt = self.stages[i + 1]
            crossings: list[Crossing] = []
            if len(nxt) == 1:  # 1 -> 1, or n -> 1 with a merge at the receiver
                dst = nxt[0].party.name
                got = [self._cross(o, seg.party.name, dst, train, crossings) for o, seg in zip(outs, stage)]
                h = got if len(got) == 1 else [self.merge(got)]
            else:  # 1 -> n: send once per receiving party
                src = stage[0].party.name
                by_party: dict[str, Tensor] = {}
                h = []
                for seg in nxt:
                    dst = seg.party.name
                    if dst not in by_party:
                        by_party[dst] = self._cross(outs[0], src, dst, train, crossings)
                    h.append(by_party[dst])
            hops.append(crossings)
        return h, hops

    def _cross(self, t: Tensor, src: str, dst: str, train: bool, crossings: list[Crossing]) -> Tensor:
        if src == dst:
            return t
        sent, got = self.wire.transmit(t, sender=src, receiver=dst, kind="activations")
        if train and t.requires_grad and not (isinstance(sent, Tensor) and sent.requires_grad):
            raise ValueError(f"a wire transform cut {src}'s activations out of its autograd graph, so {src} "
                             f"could not train on the gradient it gets back; a transform with no useful "
                             f"gradient must say what it does backward (e.g. toolkit.wire.straight_through)")
        if train:
            got.requires_grad_()  # the transport delivers a tensor without autograd history
            crossings.append(Crossing(sent, got, src, dst))
        return got

    def backward(self, loss: Tensor | None, hops: list[list[Crossing]], *,
                 received: Sequence[Tensor] = (), gradients: Sequence[Tensor] = (),
                 local: Sequence[Tensor] = (),
                 outgoing: Callable[[str, Tensor], Tensor] | None = None) -> dict[str, list[Tensor]]:
        """Backpropagate ``loss`` at its party (or, for a last stage that computes its own
        gradients, ``gradients`` with respect to what it ``received``), then hand gradients back
        across each crossing. Returns the gradients each party received over the wire.

        ``local`` holds scalar loss terms of first-stage parties on their own outputs (they
        backpropagate with the gradients those parties receive); ``outgoing(party, gradient)``
        is what ``party`` sends back instead of the gradient it computed (same shape).
        """
        local = [term for term in local if term.requires_grad]  # a frozen party's term trains nothing
        if not hops and local:  # one stage: the local terms join the loss
            loss = sum(local, loss) if loss is not None else sum(local[1:], local[0])
            local = []
        if loss is not None:
            loss.backward()
        elif received:
            torch.autograd.backward(list(received), list(gradients))
        wire = self.wire
        got_by: dict[str, list[Tensor]] = {}
        for i in reversed(range(len(hops))):
            sent, grads = [], []
            for t, leaf, src, dst in hops[i]:
                if leaf.grad is None or not t.requires_grad:
                    continue  # the receiver did not use it, or the sender has nothing to train
                answer = leaf.grad if outgoing is None else outgoing(dst, leaf.grad)
                if not isinstance(answer, Tensor) or answer.shape != leaf.grad.shape:
                    got = tuple(answer.shape) if isinstance(answer, Tensor) else type(answer).__name__
                    raise ValueError(f"{dst} must send back a gradient of shape {tuple(leaf.grad.shape)} "
                                     f"for the tensor it received from {src}, got {got}")
                g = wire.send(answer.detach(), sender=dst, receiver=src, kind="gradients")
                got_by.setdefault(src, []).append(g)
                grads.append(g)
                sent.append(t)
            if i == 0 and local:
                sent += local
                grads += [torch.ones_like(term) for term in local]
            if sent:
                torch.autograd.backward(sent, grads)
        return got_by
