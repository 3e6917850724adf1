"""UnSplit: model inversion and label inference by a server that knows the client's architecture only.

Erdogan, Küpçü, Çiçek, "UnSplit: data-oblivious model inversion, model stealing, and label
inference attacks against split learning" (WPES 2022; code: ege-erdogan/unsplit).

- :class:`UnSplit` (model inversion and model stealing): the server holds the cut-layer
  activations ``z`` it received and an untrained copy (a *clone*) of the client's part. It
  alternates Adam steps on a guess ``x`` of the inputs, with loss
  ``MSE(clone(x), z) + tv_weight * TV(x) + l2_weight * mean(x^2)``, and Adam steps on the clone's
  weights, with loss ``MSE(clone(x), z)``. ``x`` starts at 0.5 and stays in ``bounds``. The
  fitted clone is a stolen copy of the client's part (``result.extras["clone"]``).
- :class:`~attacks.unsplit_labels.UnSplitLabels` (label inference, U-shaped split learning whose client keeps only the
  last layer): the server sees the gradient with respect to its own output ``h`` (the tail's
  input) and knows ``h``. For each sample it tries every label on a clone of the tail and picks
  the one whose input gradient is closest to the observed gradient; between rounds the clone's
  weights are fitted so its gradients match the observed ones under the current labels.

What we found, and how this differs from the paper's code (read before relying on numbers):

- Inversion. The paper's settings (1000 outer steps of 100 + 100 Adam steps at lr 1e-3,
  ``tv_weight`` 0.1, ``l2_weight`` 1) are far too slow for a CPU and, cut short, give dim
  images. The defaults here (100 outer steps of 20 + 20 Adam steps, lr 0.05 on the inputs and
  0.01 on the clone, ``tv_weight`` 1e-3, ``l2_weight`` 0.03) were tuned on MNIST at LeNet's
  conv1 + ReLU: on 8 images from a briefly trained client, SSIM at least 0.5, PSNR at least
  15 dB, and every image closest to its own original (tests/test_unsplit.py; seconds per attack:
  benchmarks/inversion_attacks.py). The result depends on the clone's random draw (a bad one
  stalls at a much worse fit), hence ``restarts``. At a first affine layer the inputs are
  identifiable only up to one affine map (the clone absorbs scale and offset), hence
  ``stretch``; the L2 term is what keeps backgrounds dark. Quality collapses past the first
  pooling layer (on digits, SSIM falls by more than 0.2 from conv1 + ReLU to pool1, and by more
  than 0.1 again to conv2 + ReLU). Caveat on the metric: on those 8 MNIST images an all-black
  guess already scores SSIM 0.42 (PSNR 10.0 dB).
- Labels. The paper's code matches the gradient of the client's last-layer *weights*, a tensor
  the server does not receive in U-shaped split learning; for one sample its sign pattern
  gives the label away, hence "perfect accuracy". The server receives the gradient with respect
  to the tail's input, ``W^T (softmax(W h + b) - onehot(y)) / B``, which is unchanged when the
  rows of ``W``, the entries of ``b`` and the class names are permuted together: from
  gradients alone, labels are identifiable only up to a renaming of the classes. The attack
  recovers the partition (which samples share a label) and names the classes from ``known``
  labelled rows (one per class, or all but one). The paper's own start (relabeling with an
  untrained clone) merges classes (under 95 % up to renaming on the first five batches of
  digits); k-means starts plus a cross-entropy warm start and an L-BFGS gradient-matching fit
  reach 100 % there. Without ``known`` the labels are cluster indices: score them with
  :func:`relabel`.

Both attacks build their clone from the architecture only: a factory (a callable returning a
fresh module), or a module whose parameters are replaced by weightless placeholders on the
"meta" device at construction (its values are never read, and the attack keeps no reference to
it), then allocated and re-initialized with each layer's own ``reset_parameters``.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.base import (Attack, AttackResult, check_generator, non_negative, positive, positive_int, seeded,
                          select, stack, steps_for, total_variation)
from toolkit.models import trace
from toolkit.progress import progress
from toolkit.wire import Transfer

__all__ = ["UnSplit", "architecture_of"]

Architecture = Union[nn.Module, Callable[[], nn.Module]]
PARAMETRIZATIONS = ("clamp", "sigmoid")
STRETCHES = ("batch", "image", None)


# -- the clone: architecture without weights ------------------------------------------------------
def architecture_of(module: nn.Module) -> nn.Module:
    """A weightless copy of ``module``: same layers, every parameter and buffer an empty tensor on
    the "meta" device (shape and dtype only; no value is read or copied).

    Example:
        >>> skeleton = architecture_of(nn.Linear(3, 2))
        >>> skeleton.weight.device.type, tuple(skeleton.weight.shape)
        ('meta', (2, 3))
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"expected an nn.Module, got {type(module).__name__}")
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    skeleton = copy.deepcopy(module, memo)
    blank = [m for m in skeleton.modules()
             if not hasattr(m, "reset_parameters")
             and any(True for _ in (*m.parameters(recurse=False), *m.buffers(recurse=False)))]
    if blank:
        names = sorted({type(m).__name__ for m in blank})
        raise ValueError(f"cannot re-initialize layers without reset_parameters ({', '.join(names)}) from the "
                         f"architecture alone; pass a factory that builds a fresh module instead")
    return skeleton


def _instantiate(skeleton: nn.Module) -> nn.Module:
    """Allocate a skeleton on the CPU and initialize it with each layer's own reset_parameters."""
    clone = copy.deepcopy(skeleton).to_empty(device="cpu")
    for m in clone.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return clone


class _CloneMaker:
    """Builds untrained clones from a factory or from a weightless skeleton."""

    def __init__(self, architecture: Architecture, what: str):
        if isinstance(architecture, nn.Module):
            self._skeleton: nn.Module | None = architecture_of(architecture)
            self._factory: Callable[[], nn.Module] | None = None
            self.name = f"{type(architecture).__name__} (re-initialized)"
        elif callable(architecture):
            self._skeleton, self._factory = None, architecture
            self.name = getattr(architecture, "__name__", type(architecture).__name__)
        else:
            raise ValueError(f"{what} must be an nn.Module or a callable returning one, got {architecture!r}")

    def __call__(self, generator: torch.Generator | None) -> nn.Module:
        def build() -> nn.Module:
            clone = self._factory() if self._factory is not None else _instantiate(self._skeleton)
            if not isinstance(clone, nn.Module):
                raise ValueError(f"the architecture factory must return an nn.Module, got {type(clone).__name__}")
            return clone

        with seeded(generator):  # from the caller's generator, without disturbing the global stream
            clone = build()
        clone = clone.float()
        clone.train(False)  # deterministic clone (no dropout); BatchNorm uses its running statistics
        for p in clone.parameters():
            p.requires_grad_(True)
        return clone


def _bounds(value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"bounds must be None or a pair (low, high), got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"bounds must be finite with low < high, got {value!r}")
    return lo, hi


# -- model inversion --------------------------------------------------------------------------------
class UnSplit(Attack):
    """Data-oblivious model inversion (and model stealing) from cut-layer activations.

    Erdogan, Küpçü, Çiçek, "UnSplit: data-oblivious model inversion, model stealing, and label
    inference attacks against split learning" (WPES 2022), Algorithm 1. All observed samples are
    optimized together as one batch; they should come from one state of the client's weights
    (one training step, or an evaluation pass), since one clone explains them all.

    Args:
        client_part: the client's ARCHITECTURE: a factory returning a fresh, untrained module, or a
            module whose weights are discarded unread (see :func:`architecture_of`).
        input_shape: per-sample input shape, e.g. ``(1, 28, 28)``.
        steps: outer iterations (``max_steps`` in :meth:`run` caps them).
        input_steps: Adam steps on the inputs per outer iteration.
        model_steps: Adam steps on the clone's weights per outer iteration.
        input_lr, model_lr: Adam (amsgrad) learning rates of the two phases.
        tv_weight: weight of the total-variation prior (mean squared neighbour difference, as in
            the paper's code); images only.
        l2_weight: weight of ``mean(x^2)``, which pulls backgrounds to ``low`` (dark).
        parametrization: keep ``x`` in ``bounds`` by clamping after each step (``"clamp"``) or
            by ``x = low + (high - low) * sigmoid(u)`` (``"sigmoid"``).
        bounds: the input range, ``(0, 1)`` for images; ``None`` for unbounded (tabular) inputs.
        restarts: independent clones, each run ``screen_steps`` outer steps; the one whose output
            fits the observations best is continued (a bad draw of the clone stalls early, and
            the fit tells: not in the paper, which runs one clone).
        screen_steps: outer steps per restart before choosing.
        stretch: map the result affinely onto ``bounds`` (``"batch"``: one map for all samples,
            as the scale and offset the clone absorbs are shared; ``"image"``: per sample, as the
            paper's code does for CIFAR-10; ``None``: as optimized).
        sender: read only activations from this party (default: every activations transfer).

    Example:
        >>> from toolkit import models
        >>> factory = lambda: models.cut(models.convnet(), at="act1")[0]
        >>> victim = factory()
        >>> x = torch.rand(4, 1, 8, 8)
        >>> from toolkit.wire import Wire
        >>> wire = Wire()
        >>> _ = wire.send(victim(x).detach(), sender="client", receiver="server", kind="activations")
        >>> attack = UnSplit(factory, input_shape=(1, 8, 8))
        >>> result = attack.run(wire.observed(by="server"), max_steps=2, generator=torch.Generator().manual_seed(0))
        >>> result
        AttackResult(unsplit: reconstruction (4, 1, 8, 8), 2 steps, final objective ...)
    """

    threat_model = "honest-but-curious server: knows the client part's architecture, not its weights"
    needs = "activations"

    def __init__(self, client_part: Architecture, *, input_shape: Sequence[int], steps: int = 100,
                 input_steps: int = 20, model_steps: int = 20, input_lr: float = 0.05, model_lr: float = 0.01,
                 tv_weight: float = 1e-3, l2_weight: float = 0.03, parametrization: str = "clamp",
                 bounds: tuple[float, float] | None = (0.0, 1.0), restarts: int = 4, screen_steps: int = 10,
                 stretch: str | None = "batch", sender: str | None = None):
        self._make_clone = _CloneMaker(client_part, "client_part")
        self.architecture = self._make_clone.name
        try:
            shape = tuple(int(s) for s in input_shape)
        except (TypeError, ValueError):
            raise ValueError(f"input_shape must be a sequence of positive ints, got {input_shape!r}") from None
        if not shape or any(s < 1 for s in shape):
            raise ValueError(f"input_shape must be a sequence of positive ints, got {input_shape!r}")
        self.input_shape = shape
        self.steps = positive_int("steps", steps)
        self.input_steps = positive_int("input_steps", input_steps)
        self.model_steps = positive_int("model_steps", model_steps)
        self.input_lr = positive("input_lr", input_lr)
        self.model_lr = positive("model_lr", model_lr)
        self.tv_weight = non_negative("tv_weight", tv_weight)
        self.l2_weight = non_negative("l2_weight", l2_weight)
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"parametrization must be one of {PARAMETRIZATIONS}, got {parametrization!r}")
        self.parametrization = parametrization
        self.bounds = _bounds(bounds)
        if self.bounds is None and parametrization == "sigmoid":
            raise ValueError("parametrization='sigmoid' needs finite bounds")
        if self.tv_weight > 0 and len(shape) != 3:
            raise ValueError(f"the total-variation prior needs image inputs (C, H, W), got input_shape {shape}; "
                             f"set tv_weight=0 for tabular inputs")
        self.restarts = positive_int("restarts", restarts)
        self.screen_steps = positive_int("screen_steps", screen_steps)
        if stretch not in STRETCHES:
            raise ValueError(f"stretch must be one of {STRETCHES}, got {stretch!r}")
        self.stretch = stretch
        self.sender = sender

    def _activations(self, observed: Sequence[Transfer]) -> Tensor:
        transfers = select(observed, "activations", "UnSplit")
        if self.sender is not None:
            transfers = [t for t in transfers if t.sender == self.sender]
            if not transfers:
                raise ValueError(f"UnSplit found no activations sent by {self.sender!r} in the transcript")
        return stack(transfers, "UnSplit")  # (N, ...) cut-layer activations, in transcript order

    def _check_clone(self, clone: nn.Module, z: Tensor) -> None:
        try:
            out = trace(clone, torch.zeros(1, *self.input_shape), where="the clone")
        except ValueError as err:
            raise ValueError(f"the clone cannot take inputs of input_shape {self.input_shape}: {err}") from None
        if tuple(out.shape[1:]) != tuple(z.shape[1:]):
            raise ValueError(f"the clone maps inputs of shape {self.input_shape} to {tuple(out.shape[1:])} per "
                             f"sample, but the observed activations have shape {tuple(z.shape[1:])}: wrong "
                             f"architecture or input_shape (an image attack on tabular activations?)")

    def run(self, observed: Sequence[Transfer], *, show_progress: bool = False,
            generator: torch.Generator | None = None, max_steps: int | None = None) -> AttackResult:
        """Reconstruct the inputs behind every observed activation (one batch).

        Runs ``restarts`` clones for ``screen_steps`` outer steps each, keeps the one whose output
        fits the observations best and continues it to ``steps`` outer steps in all. The clones
        are initialized from ``generator`` (torch's global RNG when None); nothing else is random.

        Returns:
            ``reconstruction`` (N, *input_shape) in transcript order (stretched as ``stretch``
            says); ``history``: the cut-layer MSE between the clone's output and the
            observations after each outer step of the kept clone; the reconstruction returned is
            the one with the lowest such MSE (also on KeyboardInterrupt). ``extras``: ``clone``
            (the fitted clone: model stealing), ``raw`` (before stretching), ``fits`` (the MSE of
            every restart after screening), ``interrupted``.
        """
        check_generator(generator)
        steps = steps_for(self.steps, max_steps)
        z = self._activations(observed)
        trials: list[_Trial] = []
        kept: _Trial | None = None
        interrupted = False
        try:
            for _ in range(self.restarts):
                clone = self._make_clone(generator)
                self._check_clone(clone, z)
                trials.append(_Trial(self, clone, z))
                for _ in range(min(self.screen_steps, steps)):
                    trials[-1].step()
            kept = min(trials, key=lambda t: t.fit)
            for _ in progress(range(steps - len(kept.history)), show=show_progress, desc="UnSplit"):
                kept.step()
        except KeyboardInterrupt:
            interrupted = True
            if not trials:
                raise
            kept = min(trials, key=lambda t: t.best_fit)
        raw = kept.best
        return AttackResult("unsplit", reconstruction=self._stretch(raw), history=kept.history,
                            config=self.config(),
                            extras={"clone": kept.clone.requires_grad_(False), "raw": raw,
                                    "fits": [t.fit for t in trials], "interrupted": interrupted})

    def _stretch(self, x: Tensor) -> Tensor:
        if self.stretch is None or self.bounds is None:
            return x
        lo, hi = self.bounds
        dims = tuple(range(x.dim())) if self.stretch == "batch" else tuple(range(1, x.dim()))
        x_min, x_max = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
        return lo + (hi - lo) * (x - x_min) / (x_max - x_min).clamp_min(1e-12)


class _Trial:
    """One clone and one input guess, advanced one outer step (input phase, then model phase) at a time."""

    def __init__(self, attack: UnSplit, clone: nn.Module, z: Tensor):
        self.attack, self.clone, self.z = attack, clone, z
        shape = attack.input_shape
        self.lo, self.hi = attack.bounds if attack.bounds is not None else (0.0, 1.0)
        self.sigmoid = attack.parametrization == "sigmoid"
        start = torch.full((len(z), *shape), (self.lo + self.hi) / 2)  # the paper starts from 0.5
        self.u = (torch.zeros_like(start) if self.sigmoid else start).requires_grad_()
        self.tv_norm = (len(z) * math.prod(shape[:-2]) * (shape[-2] - 1) * (shape[-1] - 1)) if len(shape) == 3 else 1
        self.opt_x = torch.optim.Adam([self.u], lr=attack.input_lr, amsgrad=True)
        self.opt_m = torch.optim.Adam(clone.parameters(), lr=attack.model_lr, amsgrad=True)
        self.history: list[float] = []
        self.fit = self.best_fit = math.inf
        self.best = self.inputs().detach().clone()

    def inputs(self) -> Tensor:
        return self.lo + (self.hi - self.lo) * torch.sigmoid(self.u) if self.sigmoid else self.u

    def step(self) -> None:
        a, clone, z = self.attack, self.clone, self.z
        clone.requires_grad_(False)
        for _ in range(a.input_steps):
            self.opt_x.zero_grad(set_to_none=True)
            x = self.inputs()
            loss = F.mse_loss(clone(x), z)
            if a.tv_weight:
                loss = loss + a.tv_weight * total_variation(x) / self.tv_norm
            if a.l2_weight:
                loss = loss + a.l2_weight * (x - self.lo).pow(2).mean()
            loss.backward()
            self.opt_x.step()
            if not self.sigmoid and a.bounds is not None:
                with torch.no_grad():
                    self.u.clamp_(self.lo, self.hi)
        clone.requires_grad_(True)
        x = self.inputs().detach()
        for _ in range(a.model_steps):
            self.opt_m.zero_grad(set_to_none=True)
            F.mse_loss(clone(x), z).backward()
            self.opt_m.step()
        with torch.no_grad():
            self.fit = float(F.mse_loss(clone(x), z))
        self.history.append(self.fit)
        if self.fit < self.best_fit:
            self.best, self.best_fit = x.clone(), self.fit
