"""DP-SGD for a split-learning party, inside the one split training loop, through Opacus.

Opacus's ``GradSampleHooks`` on the party's parts capture per-sample gradients while it
backpropagates, and its optimizer becomes Opacus's ``DPOptimizer`` (via ``Party.wrap_optimizer``):
DP-SGD (Abadi et al., "Deep learning with differential privacy", 2016) on that party's weights
only. See :func:`private_party` for what it protects and what it does not, and
:func:`private_clients` for every client of a relay or SplitFed protocol.
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
from toolkit.split import Relay, SplitFed, SplitNN

__all__ = ["DPClients", "DPParty", "private_clients", "private_party"]


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
        return _fit_reporting(self.sl, epochs, self.report, kwargs)

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
    if _is_multi_client(sl):
        raise ValueError(f"{type(sl).__name__} trains several clients, each on its own data: make them private with "
                         f"private_clients(protocol, ...), which gives every client DP-SGD on its own samples. "
                         f"{_SERVER_WHY}")
    delta, generator, report = _arguments(max_grad_norm, noise_multiplier, target_epsilon, epochs, delta,
                                          generator, accountant, report)
    p, z = _checked(sl, party, noise_multiplier, target_epsilon, epochs, delta, accountant)
    return DPParty(sl, p, noise_multiplier=z, max_grad_norm=float(max_grad_norm), delta=delta, generator=generator,
                   report=report, accountant=accountant)


def private_clients(protocol: Relay | SplitFed, *, max_grad_norm: float, noise_multiplier: float | None = None,
                    target_epsilon: float | None = None, epochs: int | None = None, delta: float = 1e-5,
                    generator: torch.Generator | None = None, accountant: str = "rdp",
                    report: Sequence[str] = ("rdp", "prv")) -> DPClients:
    """DP-SGD for every client of a :class:`~toolkit.split.Relay` or :class:`~toolkit.split.SplitFed`
    protocol, each on its own data (Abadi et al., 2016), as :func:`private_party` does for one party.

    Client ``k`` trains its copy of the client part in its own lane; Opacus's hooks go on that copy
    and its optimizer becomes a DPOptimizer at sample rate ``batch_size / n_k`` (its own training
    samples), with its own accountant (with ``target_epsilon`` each client gets the noise that
    reaches it on its own data). What a client's weights then carry of its samples is
    (epsilon_k, delta)-DP, and so is everything computed from them: the relay's hand-off to the next
    client (directly or through the server), SplitFed's averaging of the client parts by the
    fed-server; the next client's training from them is post-processing. As in :func:`private_party`
    the cut-layer activations the server receives are not protected.

    The server cannot be made private here: it steps on every client's batches, each drawn from a
    different dataset at its own sample rate (in SplitFed v1 as one copy per client, averaged every
    epoch), which one DP-SGD accountant at one sample rate does not bound; :func:`private_party`
    on such a protocol says so.

    Returns a :class:`DPClients`: its ``fit`` trains the protocol epoch by epoch and puts on each
    epoch's last history row the largest epsilon of any client (every client's samples are within
    it) and delta; ``parties`` holds each client's :class:`DPParty`. ValueError (nothing changed on
    any client) if one client cannot be made private.
    """
    if not _is_multi_client(protocol):
        raise ValueError(f"private_clients makes the clients of a Relay or SplitFed protocol private, got "
                         f"{type(protocol).__name__}; use private_party for a SplitNN")
    delta, generator, report = _arguments(max_grad_norm, noise_multiplier, target_epsilon, epochs, delta,
                                          generator, accountant, report)
    checked = [(lane, *_checked(lane, client.name, noise_multiplier, target_epsilon, epochs, delta, accountant))
               for lane, client in zip(protocol.lanes, protocol.clients)]  # every client checked before any changes
    parties = [DPParty(lane, p, noise_multiplier=z, max_grad_norm=float(max_grad_norm), delta=delta,
                       generator=generator, report=report, accountant=accountant) for lane, p, z in checked]
    return DPClients(protocol, parties)


class DPClients:
    """Every client of a multi-client split protocol trains with DP-SGD; see :func:`private_clients`."""

    def __init__(self, protocol: Relay | SplitFed, parties: list[DPParty]):
        self.protocol, self.parties = protocol, parties

    def epsilon(self, delta: float | None = None, *, accountant: str | None = None) -> float:
        """The largest epsilon any client's steps spent on its own samples."""
        return max(p.epsilon(delta, accountant=accountant) for p in self.parties)

    def report(self) -> dict[str, float]:
        """``{"epsilon_rdp", "epsilon_prv", "delta"}``: each the largest over the clients."""
        reports = [p.report() for p in self.parties]
        return {key: max(r[key] for r in reports) for key in reports[0]}

    def fit(self, epochs: int = 1, **kwargs) -> pd.DataFrame:
        """``protocol.fit`` epoch by epoch; each epoch's last row also carries :meth:`report`."""
        return _fit_reporting(self.protocol, epochs, self.report, kwargs)

    def __repr__(self) -> str:
        return f"DPClients({type(self.protocol).__name__}, {self.parties!r})"


_SERVER_WHY = ("The server cannot be made private in a multi-client protocol: it steps on every client's "
               "batches, each drawn from a different dataset at its own sample rate (and in SplitFed v1 as one "
               "copy per client, averaged every epoch), which one DP-SGD accountant at one sample rate does not "
               "bound.")


def _is_multi_client(protocol) -> bool:
    return isinstance(protocol, (Relay, SplitFed))


def _arguments(max_grad_norm, noise_multiplier, target_epsilon, epochs, delta, generator, accountant,
               report) -> tuple[float, torch.Generator | None, tuple[str, ...]]:
    """The budget arguments, checked: (delta, generator, report)."""
    validate.positive("max_grad_norm", max_grad_norm)
    check_noise(noise_multiplier, target_epsilon, epochs)
    delta = validate.fraction("delta", delta, zero=False, one=False)
    generator = validate.generator(generator)
    if accountant not in accounting.ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; choose one of {sorted(accounting.ACCOUNTANTS)}")
    return delta, generator, check_report(report)


def _checked(sl: SplitNN, party: str, noise_multiplier, target_epsilon, epochs, delta: float,
             accountant: str) -> tuple[Party, float]:
    """The party of ``sl`` to make private and its noise multiplier; ValueError (nothing changed)
    when it cannot be."""
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
        raise ValueError(f"batch_size {sl.config.batch_size} exceeds the {sl.n_train} training samples of {party}")
    steps_per_epoch = math.ceil(sl.n_train / sl.config.batch_size)
    z = noise_for(noise_multiplier, target_epsilon, epochs, delta=delta, sample_rate=q,
                  steps_per_epoch=steps_per_epoch, accountant=accountant)
    return p, z


def _fit_reporting(protocol, epochs: int, report, kwargs: dict) -> pd.DataFrame:
    """``protocol.fit`` epoch by epoch, ``report()`` (epsilon, delta) on each epoch's last row, in
    the returned frame and in ``protocol.history``."""
    validate.positive_int("epochs", epochs)
    frames = []
    for _ in range(epochs):
        with quiet_hooks():
            frame = protocol.fit(1, **kwargs)
        for key, value in report().items():
            frame.loc[frame.index[-1], key] = value
            protocol.history.loc[protocol.history.index[-1], key] = value
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)
