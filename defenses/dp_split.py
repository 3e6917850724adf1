"""DP-SGD for a split-learning party, inside the one split training loop, through Opacus.

Opacus's ``GradSampleHooks`` on the party's parts capture per-sample gradients while it
backpropagates, and its optimizer becomes Opacus's ``DPOptimizer`` (via ``Party.wrap_optimizer``):
DP-SGD (Abadi et al., "Deep learning with differential privacy", 2016) on that party's weights
only. See :func:`private_party` for what it protects and what it does not.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
import torch
from opacus.grad_sample import GradSampleHooks
from opacus.optimizers import DPOptimizer

from toolkit import accounting
from toolkit.accounting import PrivacyAccountant
from defenses.dp import Budget, check_module, check_noise, check_report, noise_for, quiet_hooks
from toolkit import validate
from toolkit.parties import Party
from toolkit.split import SplitNN

__all__ = ["DPParty", "private_party"]


class DPParty:
    """A split-learning party whose optimizer is Opacus's DPOptimizer; see :func:`private_party`."""

    def __init__(self, sl: SplitNN, party: Party, *, noise_multiplier: float, max_grad_norm: float, delta: float,
                 generator: torch.Generator | None, report: Sequence[str], accountant: str):
        self.sl, self.party = sl, party
        self.noise_multiplier, self.max_grad_norm = noise_multiplier, max_grad_norm
        self.sample_rate = sl.config.batch_size / sl.n_train
        self.generator = generator
        self._budget = Budget(delta, report, accountant)
        self._hooks: dict[int, GradSampleHooks] = {}
        party.wrap_optimizer(self._wrap)

    def _wrap(self, optimizer: torch.optim.Optimizer) -> DPOptimizer:
        for m in self.party.modules:  # per-sample gradients of every part the party holds
            if id(m) not in self._hooks:
                self._hooks[id(m)] = GradSampleHooks(m, batch_first=True, loss_reduction="mean")
        dp = DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
                         expected_batch_size=self.sl.config.batch_size, generator=self.generator)
        dp.attach_step_hook(lambda opt: self._budget.step(opt.noise_multiplier, self.sample_rate))
        return dp

    @property
    def accountant(self) -> PrivacyAccountant:
        return self._budget.accountant

    def epsilon(self, delta: float | None = None, *, accountant: str | None = None) -> float:
        """Epsilon the party's steps spent on its training samples (inf after a step without noise)."""
        return self._budget.epsilon(delta, accountant)

    def report(self) -> dict[str, float]:
        return self._budget.report()

    def fit(self, epochs: int = 1, **kwargs) -> pd.DataFrame:
        """``sl.fit`` epoch by epoch; the last row of each epoch also carries epsilon_rdp,
        epsilon_prv and delta after it (other rows NaN: the accountants take tenths of a second)."""
        validate.positive_int("epochs", epochs)
        frames = []
        for _ in range(epochs):
            with quiet_hooks():
                frame = self.sl.fit(1, **kwargs)
            for key, value in self.report().items():
                frame.loc[frame.index[-1], key] = value
                self.sl.history.loc[self.sl.history.index[-1], key] = value
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)

    def __repr__(self) -> str:
        return (f"DPParty({self.party.name!r}, noise_multiplier={self.noise_multiplier:.4g}, "
                f"max_grad_norm={self.max_grad_norm:g}, sample_rate={self.sample_rate:.4g}, "
                f"{self.accountant.steps} noisy steps)")


def private_party(sl: SplitNN, party: str = "client", *, max_grad_norm: float, noise_multiplier: float | None = None,
                  target_epsilon: float | None = None, epochs: int | None = None, delta: float = 1e-5,
                  generator: torch.Generator | None = None, accountant: str = "rdp",
                  report: Sequence[str] = ("rdp", "prv")) -> DPParty:
    """DP-SGD on one party of a built SplitNN, inside its one training loop (Abadi et al., 2016).

    Opacus's GradSampleHooks on the party's parts capture per-sample gradients while the party
    backpropagates the gradient it received over the Wire (``torch.autograd.backward(sent,
    grads)``; with its own loss too, e.g. a U-shaped client's last part); its optimizer becomes
    Opacus's DPOptimizer (``Party.wrap_optimizer``), which clips each sample's gradient over all of
    the party's parameters to ``max_grad_norm`` and adds noise before the party steps. Epsilon
    composes one release per step at sample rate ``batch_size / n_train``: the accounting Opacus
    applies to shuffled fixed-size batches (``poisson_sampling=False``), an approximation of the
    Poisson sampling it assumes (Chua et al., "How private are DP-SGD implementations?", 2024,
    show shuffling can be worse), so ``SplitConfig(shuffle=True)`` is required.

    What it protects, and what not: the party's *weights* (and so anything later released from
    them: the model, its gradients, a weight hand-off) are (epsilon, delta)-DP in each training
    sample. It does nothing for the cut-layer activations the server receives every step, which
    are computed from the raw sample and cross the Wire unprotected; put a
    :class:`defenses.dp_local.GaussianMechanism` on the wire for those.

    Args: as :func:`make_private` (``epochs``: how many passes the budget is spread over).
    Raises ValueError (nothing changed) on an unknown party, a layer Opacus cannot train
    (BatchNorm), a party without parameters, unshuffled batches or a bad budget.

    Example:
        >>> from toolkit import data, models
        >>> ds = data.load("digits").subset(torch.arange(256))
        >>> sl = SplitNN.vanilla(*models.cut(models.mlp([64, 32, 10]), at=3), ds)
        >>> client = private_party(sl, max_grad_norm=1.0, noise_multiplier=1.0, generator=torch.Generator().manual_seed(0))
        >>> history = client.fit(2)
        >>> ends = history.dropna(subset=["epsilon_rdp"])  # the last step of each epoch
        >>> ends.epoch.tolist(), ends.epsilon_rdp.round(2).tolist(), ends.delta.tolist()
        ([0, 1], [4.87, 6.25], [1e-05, 1e-05])
    """
    validate.positive("max_grad_norm", max_grad_norm)
    check_noise(noise_multiplier, target_epsilon, epochs)
    delta = validate.fraction("delta", delta, zero=False, one=False)
    generator = validate.generator(generator)
    if accountant not in accounting.ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; choose one of {sorted(accounting.ACCOUNTANTS)}")
    report = check_report(report)
    found = [p for p in sl.parties if p.name == party]
    if not found:
        raise ValueError(f"no party {party!r} in this SplitNN ({[p.name for p in sl.parties]})")
    p = found[0]
    if not p.modules:
        raise ValueError(f"{party} holds no model part to train privately")
    for m in p.modules:
        check_module(m, f"{party}'s part")
    if isinstance(p.optimizer, DPOptimizer):
        raise ValueError(f"{party} already trains with DP-SGD (its optimizer is a DPOptimizer)")
    if not sl.config.shuffle:
        raise ValueError("DP-SGD's accounting needs a random batch order: build the SplitNN with "
                         "SplitConfig(shuffle=True)")
    q = sl.config.batch_size / sl.n_train
    if q > 1:
        raise ValueError(f"batch_size {sl.config.batch_size} exceeds the {sl.n_train} training samples")
    steps_per_epoch = math.ceil(sl.n_train / sl.config.batch_size)
    z = noise_for(noise_multiplier, target_epsilon, epochs, delta=delta, sample_rate=q,
               steps_per_epoch=steps_per_epoch, accountant=accountant)
    return DPParty(sl, p, noise_multiplier=z, max_grad_norm=float(max_grad_norm), delta=delta, generator=generator,
                   report=report, accountant=accountant)
