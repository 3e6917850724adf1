"""Privacy accounting: epsilon for a history of Gaussian-mechanism releases, from Opacus.

Every differentially private run in LeakLab (DP-SGD of a party's local training, DP-FedAvg,
local DP on updates or activations) reports its budget through this module, which uses
Opacus's accountants standalone rather than re-deriving them: the Renyi-DP accountant (Mironov,
"Renyi differential privacy", 2017; subsampled Gaussian as in Abadi et al., "Deep learning with
differential privacy", 2016) and the PRV accountant (Gopi, Lee, Wutschitz, "Numerical
composition of differential privacy", 2021). A release is ``(noise_multiplier, sample_rate)``:
Gaussian noise of standard deviation ``noise_multiplier * sensitivity`` on a sum over a Poisson
sample of rate ``sample_rate`` (1.0: no subsampling, e.g. every activation the server sees).

Example (the golden values of Opacus's own tests):
    >>> round(epsilon(noise_multiplier=1.5, sample_rate=0.04, steps=2250, delta=1e-5), 4)
    7.3291
    >>> round(noise_multiplier(target_epsilon=8, delta=1e-5, sample_rate=0.04, steps=2250), 3)
    1.416
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

from toolkit import validate

ACCOUNTANTS = {"rdp": RDPAccountant, "prv": PRVAccountant}


def _check_accountant(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; choose one of {sorted(ACCOUNTANTS)}")
    return accountant


def _check_release(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    validate.positive("noise_multiplier", noise_multiplier)
    validate.fraction("sample_rate", sample_rate, zero=False, one=True)
    validate.positive_int("steps", steps)


def _check_delta(delta: float) -> float:
    return validate.fraction("delta", delta, zero=False, one=False)


@lru_cache(maxsize=1024)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Opacus's RDP of one release at its default orders (a round of accounting recomputes the same
    few releases: this cache takes it from tenths of a second to microseconds)."""
    rdp = rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                   orders=RDPAccountant.DEFAULT_ALPHAS)
    rdp.setflags(write=False)
    return rdp


def _rdp_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """What ``RDPAccountant(history).get_epsilon(delta)`` returns, bit for bit: the same sum of
    Opacus's ``compute_rdp`` terms (``steps`` times the one-step RDP) and its conversion."""
    rdp = sum([_rdp_of_one_step(z, q) * steps for z, q, steps in history])
    eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
            accountant: str = "rdp") -> float:
    """Epsilon after ``steps`` releases of the subsampled Gaussian mechanism, at ``delta``."""
    _check_release(noise_multiplier, sample_rate, steps)
    history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    if _check_accountant(accountant) == "rdp":
        return _rdp_epsilon(history, _check_delta(delta))
    acc = ACCOUNTANTS[accountant]()
    acc.history = history
    return float(acc.get_epsilon(delta=_check_delta(delta)))


def noise_multiplier(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                     accountant: str = "rdp") -> float:
    """The noise multiplier that spends ``target_epsilon`` (at ``delta``) in ``steps`` releases.

    Raises ValueError when the budget cannot be reached with any noise Opacus searches (up to a
    multiplier of 1e6), naming the budget.
    """
    validate.positive("target_epsilon", target_epsilon)
    validate.fraction("sample_rate", sample_rate, zero=False, one=True)
    validate.positive_int("steps", steps)
    try:
        return float(get_noise_multiplier(target_epsilon=float(target_epsilon), target_delta=_check_delta(delta),
                                          sample_rate=float(sample_rate), steps=int(steps),
                                          accountant=_check_accountant(accountant)))
    except ValueError as err:
        raise ValueError(f"epsilon {target_epsilon} at delta {delta} cannot be reached in {steps} steps at "
                         f"sample rate {sample_rate}, even with noise multiplier 1e6 ({err})") from None


class PrivacyAccountant:
    """Composes the releases of one run and reports (epsilon, delta) after each.

    Args:
        delta: the delta the run reports epsilon at.
        accountants: which Opacus accountants to report (``"rdp"``, ``"prv"``); the first is the
            one :meth:`epsilon` returns by default.

    Example:
        >>> acc = PrivacyAccountant(delta=1e-5)
        >>> acc.step(noise_multiplier=1.0, sample_rate=0.01, steps=100)
        >>> acc.steps, round(acc.epsilon(), 2) > 0
        (100, True)
        >>> sorted(acc.report())
        ['delta', 'epsilon_prv', 'epsilon_rdp']
    """

    def __init__(self, *, delta: float = 1e-5, accountants: Iterable[str] = ("rdp", "prv")):
        self.delta = _check_delta(delta)
        self.accountants = [_check_accountant(a) for a in accountants]
        if not self.accountants:
            raise ValueError("a PrivacyAccountant needs at least one accountant ('rdp' or 'prv')")
        self.history: list[tuple[float, float, int]] = []  # (noise_multiplier, sample_rate, steps)

    @property
    def steps(self) -> int:
        return sum(s for _, _, s in self.history)

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` releases at this noise multiplier and sample rate."""
        _check_release(noise_multiplier, sample_rate, steps)
        z, q = float(noise_multiplier), float(sample_rate)
        if self.history and self.history[-1][:2] == (z, q):
            self.history[-1] = (z, q, self.history[-1][2] + int(steps))
        else:
            self.history.append((z, q, int(steps)))

    def epsilon(self, delta: float | None = None, *, accountant: str | None = None) -> float:
        """Epsilon spent so far (0.0 before any release)."""
        if not self.history:
            return 0.0
        delta = self.delta if delta is None else _check_delta(delta)
        which = _check_accountant(accountant or self.accountants[0])
        if which == "rdp":
            return _rdp_epsilon(self.history, delta)
        acc = ACCOUNTANTS[which]()
        acc.history = list(self.history)
        return float(acc.get_epsilon(delta=delta))

    def report(self) -> dict[str, float]:
        """``{"epsilon_rdp": ..., "epsilon_prv": ..., "delta": ...}``: one history row's columns."""
        out = {f"epsilon_{a}": self.epsilon(accountant=a) for a in self.accountants}
        out["delta"] = self.delta
        return out

    def __repr__(self) -> str:
        spent = ", ".join(f"{k}={v:.4g}" for k, v in self.report().items()) if self.history else "nothing spent"
        return f"PrivacyAccountant({self.steps} releases; {spent})"


def gaussian_sigma(*, epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """Noise standard deviation of the classic Gaussian mechanism for one (epsilon, delta)-DP
    release, epsilon < 1 (Dwork & Roth, "The algorithmic foundations of differential privacy",
    2014, Theorem A.1): ``sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon`` (Flower's
    ``LocalDpMod`` uses the same formula).

    >>> round(gaussian_sigma(epsilon=0.5, delta=1e-5), 3)
    9.69
    """
    validate.positive("epsilon", epsilon)
    validate.positive("sensitivity", sensitivity)
    delta = _check_delta(delta)
    if epsilon >= 1:
        raise ValueError(f"the classic Gaussian mechanism's calibration holds for epsilon < 1, got {epsilon}; "
                         f"use noise_multiplier(...) with an accountant for larger budgets")
    return float(sensitivity) * math.sqrt(2 * math.log(1.25 / delta)) / float(epsilon)
