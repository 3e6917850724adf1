"""What every attack shares: the Attack base class, the AttackResult, and transcript helpers.

An attack reads only a transcript of what its party received (``wire.observed(by=...)``) plus
the knowledge its threat model grants, passed in explicitly and stated in its ``threat_model``
and ``repr``. Scoring is separate: ``toolkit.metrics.evaluate(result, truth)``.

Randomness: every random draw of an attack (initial guesses, auxiliary noise, shuffling, and the
initialization of the modules it builds: decoders, shadows, clones) comes from the ``generator``
passed to ``run``; with ``generator=None`` it comes from torch's global RNG (seed it with
``toolkit.seed_everything``), never from a hidden constant seed.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from toolkit.validate import finite
from toolkit.validate import generator as check_generator
from toolkit.validate import non_negative, non_negative_int, positive, positive_int  # noqa: F401  (re-exported)
from toolkit.wire import Transfer


@dataclass(repr=False)
class AttackResult:
    """What an attack recovered, with its per-step history and the settings that produced it."""

    attack: str
    reconstruction: Tensor | None = None  # (N, ...) recovered inputs, in transcript order
    labels: Tensor | None = None          # (N,) inferred labels
    scores: Tensor | None = None          # (N,) per-sample leakage scores (e.g. label attacks)
    history: list[float] = field(default_factory=list)  # objective per step
    config: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)  # attack-specific (per-batch AUC, ...)

    def __repr__(self) -> str:
        parts = [f"{name} {tuple(t.shape)}" for name, t in
                 (("reconstruction", self.reconstruction), ("labels", self.labels), ("scores", self.scores))
                 if t is not None]
        if self.history:
            parts.append(f"{len(self.history)} step{'s' if len(self.history) != 1 else ''}, final objective {self.history[-1]:.4g}")
        return f"AttackResult({self.attack}: {', '.join(parts) or 'empty'})"

    def plot(self, ax=None, *, n: int = 16):
        """Reconstructed images (first ``n``) when there are any, a histogram of the scores when
        there are scores, else the objective per step."""
        from toolkit import plots

        rec = self.reconstruction
        if rec is not None and rec.dim() in (3, 4):
            return plots.plot_images(rec[:n].clamp(0, 1), ax=ax, title=f"{self.attack} reconstructions")
        fig, ax = plots._axes(ax)
        if self.scores is not None:
            ax.hist(self.scores.detach().double().numpy(), bins=50)
            ax.set_xlabel("score")
            ax.set_ylabel("samples")
            ax.set_title(self.attack)
            return fig, ax
        ax.plot(self.history)
        ax.set_xlabel("step")
        ax.set_ylabel("objective")
        ax.set_yscale("log")
        ax.set_title(self.attack)
        return fig, ax


class Attack(ABC):
    """Base class. Subclasses take keyword-only hyperparameters (validated, ValueError naming the
    bad value) and implement :meth:`run`."""

    threat_model: ClassVar[str] = "honest-but-curious server"
    needs: ClassVar[str] = "activations"  # the transcript kind the attack reads

    @abstractmethod
    def run(self, observed: Sequence[Transfer], *, show_progress: bool = False,
            generator: torch.Generator | None = None, max_steps: int | None = None) -> AttackResult:
        """Attack what a party received; ``max_steps`` caps every loop (smoke runs); every random
        draw comes from ``generator`` (torch's global RNG when None)."""

    def config(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items()
                if not k.startswith("_") and k != "threat_model" and not isinstance(v, torch.nn.Module)}

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({settings}) [threat model: {self.threat_model}]"


# -- helpers ------------------------------------------------------------------------------------
def select(observed: Sequence[Transfer], kind: str, attack: str) -> list[Transfer]:
    """The transfers of ``kind``; a ValueError that says what the transcript holds when none are."""
    observed = list(observed)
    chosen = [t for t in observed if t.kind == kind]
    if not chosen:
        kinds = sorted({t.kind for t in observed})
        raise ValueError(f"{attack} needs transfers of kind {kind!r}; the transcript holds "
                         f"{'kinds ' + str(kinds) if kinds else 'nothing'}")
    return chosen


def describe(t: Transfer) -> str:
    """``"the activations client -> server at step 3"``: names a transfer in error messages."""
    return f"the {t.kind} {t.sender} -> {t.receiver} at step {t.step}{'' if t.phase == 'train' else f' ({t.phase})'}"


def read(t: Transfer, attack: str) -> Tensor:
    """The transfer's tensor, detached, if it is a plain floating-point tensor of finite values;
    a ValueError naming the transfer (and the first bad index) otherwise. The one check of what
    an attack reads from a transcript."""
    x = t.tensor
    if not isinstance(x, Tensor):
        raise ValueError(f"{attack} reads plain tensors; {describe(t)} is a {type(x).__name__}: "
                         f"decode compressed packets first")
    if not x.is_floating_point():
        raise ValueError(f"{attack}: {describe(t)} holds {x.dtype} values; it reads floating-point tensors")
    return finite(x.detach(), f"{attack}: {describe(t)}", hint="a transcript with non-finite values cannot be attacked")


def stack(transfers: Sequence[Transfer], attack: str = "this attack") -> Tensor:
    """Concatenate the transfers' batches along dim 0: (sum of batch sizes, ...), float32; each
    checked by :func:`read`."""
    tensors = [read(t, attack) for t in transfers]
    shapes = {tuple(x.shape[1:]) for x in tensors}
    if len(shapes) > 1:
        raise ValueError(f"{attack}: the selected transfers have different shapes per sample: {sorted(shapes)}")
    return torch.cat([x.float() for x in tensors])


def expect_shape(got: Sequence[int], expected: Sequence[int], what: str, fits: str) -> None:
    """A ValueError ``"{what} has shape {got} per sample, but {fits} {expected}: ..."`` unless equal."""
    got, expected = tuple(got), tuple(expected)
    if got != expected:
        raise ValueError(f"{what} has shape {got} per sample, but {fits} {expected}: is the transcript "
                         f"from another model, cut or input_shape?")


@contextmanager
def seeded(generator: torch.Generator | None) -> Iterator[None]:
    """Build modules inside this block to initialize them from ``generator`` (torch's global RNG
    draws are redirected to a stream seeded from one draw of it, and the global stream is left as
    it was); with ``generator=None`` the block uses the global RNG itself."""
    check_generator(generator)
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def steps_for(steps: int, max_steps: int | None) -> int:
    """The loop length: ``steps``, capped by ``max_steps`` when given (positive)."""
    if max_steps is None:
        return steps
    return min(steps, positive_int("max_steps", max_steps))


def total_variation(x: Tensor, beta: float = 2.0) -> Tensor:
    """Total variation of images (N, C, H, W): sum of (dx^2 + dy^2)^(beta/2) per image, summed
    (He, Zhang, Lee, 2019; beta = 2 gives the squared-difference prior)."""
    dx = x[..., :-1, 1:] - x[..., :-1, :-1]
    dy = x[..., 1:, :-1] - x[..., :-1, :-1]
    return ((dx * dx + dy * dy + 1e-12) ** (beta / 2)).sum()
