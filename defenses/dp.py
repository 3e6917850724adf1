"""DP-SGD through Opacus for a party's local training (and the checks and budget its split form shares).

DP-SGD (Abadi et al., "Deep learning with differential privacy", 2016) clips each sample's
gradient to L2 norm ``max_grad_norm`` and adds Gaussian noise of standard deviation
``noise_multiplier * max_grad_norm`` to their sum before every step. Opacus does the work
(Yousefpour et al., "Opacus: user-friendly differential privacy library in PyTorch", 2021): we
wrap, we do not replace. :func:`make_private` checks everything first, then calls
``opacus.PrivacyEngine.make_private`` with the caller's generator as Opacus's noise generator
(and as the Poisson sampler's), and composes the run's releases in a
:class:`toolkit.accounting.PrivacyAccountant` stepped by the optimizer's step hook beside
Opacus's own accountant (they agree). :func:`defenses.dp_split.private_party` gives a
split-learning party the same per-sample clipping and noise on the gradient it receives over the
Wire, with the checks and the budget defined here.

Example:
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> g = torch.Generator().manual_seed(0)
    >>> x, y = torch.randn(256, 8, generator=g), torch.randint(0, 2, (256,), generator=g)
    >>> net = nn.Sequential(nn.Linear(8, 2))
    >>> dp = make_private(net, torch.optim.SGD(net.parameters(), lr=0.1),
    ...                   DataLoader(TensorDataset(x, y), batch_size=32), noise_multiplier=1.0,
    ...                   max_grad_norm=1.0, generator=torch.Generator().manual_seed(1))
    >>> history = dp.fit(epochs=2)
    >>> list(history.columns)
    ['epoch', 'loss', 'accuracy', 'epsilon_rdp', 'epsilon_prv', 'delta']
    >>> round(dp.epsilon(), 3) == round(dp.engine.get_epsilon(1e-5), 3)
    True
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from opacus.utils.module_utils import trainable_modules
from opacus.validators import ModuleValidator
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from toolkit import accounting
from toolkit.accounting import PrivacyAccountant
from defenses.dp_local import spent
from toolkit import validate
from toolkit.progress import progress

__all__ = ["DPSGD", "make_private"]


# -- checks: everything before anything changes ---------------------------------------------------
def check_module(module: nn.Module, who: str = "the module") -> None:
    """ValueError naming every layer Opacus cannot train with per-sample gradients (BatchNorm
    mixes the samples of a batch), and saying what to use instead."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"{who} must be an nn.Module, got {type(module).__name__}")
    bad = []
    for name, sub in trainable_modules(module):
        check = ModuleValidator.VALIDATORS.get(type(sub))
        errors = check(sub) if check is not None else []
        if errors:
            reason = str(errors[0]).split(". ")[0]
            bad.append(f"layer {name!r} ({type(sub).__name__}): {reason}")
    if bad:
        raise ValueError(f"DP-SGD cannot train {who}: {'; '.join(bad)}. opacus.validators.ModuleValidator.fix "
                         f"replaces such layers on a copy (BatchNorm with GroupNorm; LayerNorm works too)")
    if not any(p.requires_grad for p in module.parameters()):
        raise ValueError(f"DP-SGD needs {who} to have trainable parameters; it has none")


def check_noise(noise_multiplier: Any, target_epsilon: Any, epochs: Any) -> None:
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("give either noise_multiplier, or target_epsilon with epochs (not both, not neither)")
    if noise_multiplier is not None:
        validate.non_negative("noise_multiplier", noise_multiplier)
    else:
        validate.positive("target_epsilon", target_epsilon)
        validate.positive_int("epochs", epochs)


def check_report(report: Sequence[str]) -> tuple[str, ...]:
    report = (report,) if isinstance(report, str) else tuple(report)
    unknown = [a for a in report if a not in accounting.ACCOUNTANTS]
    if not report or unknown:
        raise ValueError(f"report names the accountants whose epsilon the history shows, a non-empty subset of "
                         f"{sorted(accounting.ACCOUNTANTS)}; got {report!r}")
    return report


def noise_for(noise_multiplier, target_epsilon, epochs, *, delta, sample_rate, steps_per_epoch, accountant) -> float:
    if noise_multiplier is not None:
        return float(noise_multiplier)
    return accounting.noise_multiplier(target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate,
                                       steps=epochs * steps_per_epoch, accountant=accountant)


class Budget:
    """Our accountant, stepped once per noisy optimizer step; epsilon is inf after a step without noise."""

    def __init__(self, delta: float, accountants: Sequence[str], default: str):
        self.accountant = PrivacyAccountant(delta=delta, accountants=accountants)
        self.default = default  # the accountant epsilon() uses unless told
        self.noiseless_steps = 0

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        if noise_multiplier > 0:
            self.accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
        else:
            self.noiseless_steps += 1

    def epsilon(self, delta: float | None = None, accountant: str | None = None) -> float:
        if self.noiseless_steps:
            return math.inf
        return self.accountant.epsilon(delta, accountant=accountant or self.default)

    def report(self) -> dict[str, float]:
        if not self.noiseless_steps:
            return spent(self.accountant)
        return {**{f"epsilon_{a}": math.inf for a in self.accountant.accountants}, "delta": self.accountant.delta}


# -- DP-SGD of a party's local training ------------------------------------------------------------
class DPSGD:
    """A model, optimizer and data loader made private by Opacus, with a training helper.

    Build it with :func:`make_private`. ``module`` (Opacus's GradSampleModule), ``optimizer`` (its
    DPOptimizer) and ``data_loader`` (Poisson sampling, rate ``1 / len(loader)``) are what Opacus
    returns: use them as in any Opacus loop, or call :meth:`fit`. ``engine`` is the
    ``opacus.PrivacyEngine``; :meth:`epsilon` and :meth:`report` come from our accountant, which
    composes the same releases as ``engine.accountant``.
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader, *,
                 max_grad_norm: float, noise_multiplier: float | None = None, target_epsilon: float | None = None,
                 epochs: int | None = None, delta: float = 1e-5, poisson_sampling: bool = True,
                 generator: torch.Generator | None = None, accountant: str = "rdp",
                 report: Sequence[str] = ("rdp", "prv")):
        validate.positive("max_grad_norm", max_grad_norm)
        check_noise(noise_multiplier, target_epsilon, epochs)
        delta = validate.fraction("delta", delta, zero=False, one=False)
        validate.boolean("poisson_sampling", poisson_sampling)
        generator = validate.generator(generator)
        if accountant not in accounting.ACCOUNTANTS:
            raise ValueError(f"unknown accountant {accountant!r}; choose one of {sorted(accounting.ACCOUNTANTS)}")
        report = check_report(report)
        check_module(module)
        if not module.training:
            raise ValueError("the module is in eval mode; call module.train() before making it private")
        if not isinstance(optimizer, torch.optim.Optimizer) or isinstance(optimizer, DPOptimizer):
            raise TypeError(f"optimizer must be a plain torch.optim.Optimizer, got {type(optimizer).__name__}")
        owned = {id(p) for p in module.parameters()}
        if any(id(p) not in owned for group in optimizer.param_groups for p in group["params"]):
            raise ValueError("the optimizer steps parameters that are not the module's")
        if not isinstance(data_loader, DataLoader) or isinstance(data_loader.dataset, IterableDataset):
            raise TypeError("data_loader must be a torch DataLoader over a map-style dataset (Poisson sampling "
                            f"draws indices), got {type(data_loader).__name__}")
        if len(data_loader) == 0:
            raise ValueError("the data loader yields no batch")
        self.sample_rate = 1 / len(data_loader)  # Opacus's: one expected batch of len(dataset) / len(loader)
        self.noise_multiplier = noise_for(noise_multiplier, target_epsilon, epochs, delta=delta,
                                       sample_rate=self.sample_rate, steps_per_epoch=len(data_loader),
                                       accountant=accountant)
        self.max_grad_norm = float(max_grad_norm)
        self.delta = delta
        # -- checked: from here on Opacus changes the module (hooks) and wraps the optimizer
        with warnings.catch_warnings():  # Opacus's note that secure_mode (a CSPRNG) is off: we seed on purpose
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            self.engine = PrivacyEngine(accountant=accountant)
        if poisson_sampling:  # Opacus's own Poisson loader, drawing from the caller's generator
            data_loader = DPDataLoader.from_data_loader(data_loader, generator=generator)
        self.module, self.optimizer, self.data_loader = self.engine.make_private(
            module=module, optimizer=optimizer, data_loader=data_loader, noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm, poisson_sampling=False, noise_generator=generator)
        if poisson_sampling:
            self.module.forbid_grad_accumulation()  # what make_private does for its own Poisson loader
        self._budget = Budget(delta, report, accountant)
        opacus_hook = self.optimizer.step_hook  # Opacus's accountant; ours composes the same releases

        def hook(opt: DPOptimizer) -> None:
            opacus_hook(opt)
            self._budget.step(opt.noise_multiplier, self.sample_rate)

        self.optimizer.attach_step_hook(hook)
        self.epoch = 0
        self.history = pd.DataFrame()

    @property
    def accountant(self) -> PrivacyAccountant:
        """The releases so far (noise multiplier, sample rate, steps)."""
        return self._budget.accountant

    def epsilon(self, delta: float | None = None, *, accountant: str | None = None) -> float:
        """Epsilon spent so far at ``delta`` (the run's by default) by ``accountant`` (the engine's by
        default); inf after a step without noise."""
        return self._budget.epsilon(delta, accountant)

    def report(self) -> dict[str, float]:
        """``{"epsilon_rdp", "epsilon_prv", "delta"}`` spent so far."""
        return self._budget.report()

    def fit(self, epochs: int = 1, *, loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
            test: tuple[Tensor, Tensor] | None = None, show_progress: bool = False) -> pd.DataFrame:
        """Train ``epochs`` passes of Poisson-sampled batches; one history row per epoch: epoch,
        loss and accuracy over the epoch's batches, epsilon (RDP and PRV) and delta after it, and
        test_loss / test_accuracy on ``test = (x, y)`` when given."""
        validate.positive_int("epochs", epochs)
        if test is not None:
            test = (validate.tensor(test[0], "test inputs", min_dim=1), validate.tensor(test[1], "test labels"))
        rows = []
        for _ in progress(range(epochs), show=show_progress, desc="DP-SGD"):
            self.module.train()
            total, correct, n = 0.0, 0, 0
            for x, y in self.data_loader:
                self.optimizer.zero_grad(set_to_none=True)
                out = self.module(x)
                batch_loss = loss(out, y)
                with quiet_hooks():
                    batch_loss.backward()
                self.optimizer.step()
                if len(y):  # a Poisson batch may be empty: it still steps (noise only), but scores nothing
                    total += float(batch_loss.detach()) * len(y)
                    correct += _correct(out, y)
                    n += len(y)
            self.epoch += 1
            row = {"epoch": self.epoch, "loss": total / max(n, 1), "accuracy": correct / max(n, 1), **self.report()}
            if test is not None:
                row.update({f"test_{k}": v for k, v in self.evaluate(*test, loss=loss).items()})
            rows.append(row)
        frame = pd.DataFrame(rows)
        self.history = pd.concat([self.history, frame], ignore_index=True) if len(self.history) else frame
        return frame

    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor, *, loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
                 batch_size: int = 1024) -> dict[str, float]:
        """Loss and accuracy of the model on ``(x, y)`` (no privacy spent: no gradient)."""
        self.module.eval()
        total, correct = 0.0, 0
        for lo in range(0, len(x), batch_size):
            out = self.module(x[lo:lo + batch_size])
            total += float(loss(out, y[lo:lo + batch_size])) * len(out)
            correct += _correct(out, y[lo:lo + batch_size])
        self.module.train()
        return {"loss": total / max(len(x), 1), "accuracy": correct / max(len(x), 1)}

    def __repr__(self) -> str:
        spent = ", ".join(f"{k}={v:.4g}" for k, v in self.report().items())
        return (f"DPSGD(noise_multiplier={self.noise_multiplier:.4g}, max_grad_norm={self.max_grad_norm:g}, "
                f"sample_rate={self.sample_rate:.4g}, {self.accountant.steps} steps; {spent})")


@contextmanager
def quiet_hooks() -> Iterator[None]:
    """Silence torch's note that Opacus's full backward hook fires on a first layer whose input needs
    no gradient (the raw data): expected, every step."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


def _correct(out: Tensor, y: Tensor) -> int:
    if out.dim() != 2 or y.is_floating_point():
        return 0
    return int((out.argmax(1) == y).sum())


def make_private(module: nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader, *,
                 max_grad_norm: float, noise_multiplier: float | None = None,
                 target_epsilon: float | None = None, epochs: int | None = None, delta: float = 1e-5,
                 poisson_sampling: bool = True, generator: torch.Generator | None = None,
                 accountant: str = "rdp", report: Sequence[str] = ("rdp", "prv")) -> DPSGD:
    """DP-SGD for ``module`` through ``opacus.PrivacyEngine.make_private`` (Abadi et al., 2016).

    Args:
        module, optimizer, data_loader: a plain training set-up (the optimizer over the module's
            parameters; batches ``(x, y)``). Opacus hooks the module and wraps the optimizer.
        max_grad_norm: each sample's gradient is clipped to this L2 norm.
        noise_multiplier: noise std over ``max_grad_norm`` (0: clipping only, epsilon inf); or
        target_epsilon, epochs: the noise that spends ``target_epsilon`` at ``delta`` in
            ``epochs`` passes (``toolkit.accounting.noise_multiplier``, as
            ``make_private_with_epsilon`` computes it); a ValueError when no noise reaches it.
        delta: the delta epsilon is reported at.
        poisson_sampling: batches of Opacus's Poisson sampler at rate ``1 / len(data_loader)``
            (what the accountants assume); False keeps the loader's own batches and order.
        generator: draws the noise and the Poisson batches (same seed, same numbers).
        accountant: Opacus's engine accountant, ``"rdp"`` or ``"prv"``.
        report: the epsilons the history and :meth:`DPSGD.report` show (``epsilon_rdp``,
            ``epsilon_prv``); PRV is the tighter bound but costs tenths of a second per report
            at a few hundred steps, seconds at thousands (``benchmarks/dp_sgd.py``).

    Raises ValueError (nothing changed: module, optimizer and loader are left as they were) on
    a layer Opacus cannot train (BatchNorm, named), a negative noise multiplier, a budget that
    cannot be reached, or a bad delta or norm.
    """
    return DPSGD(module, optimizer, data_loader, max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier,
                 target_epsilon=target_epsilon, epochs=epochs, delta=delta, poisson_sampling=poisson_sampling,
                 generator=generator, accountant=accountant, report=report)
