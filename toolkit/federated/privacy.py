"""The privacy budget of per-sample DP-SGD in federated clients' local training.

``FedConfig(dp_max_grad_norm=C, dp_noise_multiplier=z)`` makes every client's local step clip each
sample's gradient to C and add Gaussian noise of standard deviation zC (Abadi et al., "Deep
learning with differential privacy", 2016; ``toolkit.federated.executors``). A run with it always
reports each client's budget: :class:`FederatedAveraging` attaches a :class:`LocalDPAccountant`
when none is given, and the history carries ``client_epsilon_rdp``, ``client_epsilon_prv`` and
``client_delta`` every round (from :mod:`toolkit.accounting`, Opacus's accountants).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from toolkit.accounting import PrivacyAccountant

__all__ = ["LocalDPAccountant", "spent"]


def spent(accountant: PrivacyAccountant, noise_multiplier: float, releases: int) -> dict[str, float]:
    """The accountant's report; epsilon is infinite after a release without noise."""
    if noise_multiplier == 0 and releases:
        return {**{f"epsilon_{a}": math.inf for a in accountant.accountants}, "delta": accountant.delta}
    with np.errstate(divide="ignore"):  # PRV takes log(1 - q), -inf at sample rate 1 (handled there)
        return accountant.report()


class LocalDPAccountant:
    """Each client's epsilon for per-sample DP-SGD in local training (a protocol monitor).

    Pass it as ``FederatedAveraging(..., config=FedConfig(dp_max_grad_norm=C,
    dp_noise_multiplier=z), monitors=[LocalDPAccountant()])``. Every round a training client
    takes ``local_epochs * ceil(n / batch_size)`` steps at sample rate ``min(1, batch_size / n)``
    (n its sample count), each a release of the subsampled Gaussian mechanism with noise
    multiplier z; its epsilon composes those over the rounds it trained in (through
    :class:`toolkit.accounting.PrivacyAccountant`). The history row gets the largest over the
    clients (``client_epsilon_rdp``, ``client_epsilon_prv``, ``client_delta``);
    :meth:`clients` gives every client's.

    Args:
        delta: the delta epsilon is reported at.
        accountants: Opacus accountants to report (``"rdp"``, ``"prv"``).
    """

    def __init__(self, *, delta: float = 1e-5, accountants: Iterable[str] = ("rdp", "prv")):
        PrivacyAccountant(delta=delta, accountants=accountants)  # checks both
        self.delta, self.accountants = float(delta), tuple(accountants)
        self.participations: Tensor | None = None  # (N,) rounds each client trained in
        self._setting: tuple | None = None  # (z, batch size, local epochs, counts)
        self._cache: dict[tuple[float, int], dict[str, float]] = {}  # (sample rate, steps) -> report

    def attach(self, protocol: Any) -> None:
        """Follow this run (FederatedAveraging calls it once); a ValueError if its local training is
        not private or this accountant already follows another run."""
        config = protocol.config
        if not config.per_sample_dp:
            raise ValueError("LocalDPAccountant accounts per-sample DP-SGD, but this run's FedConfig has "
                             "dp_max_grad_norm 0 (local training is not private)")
        if self._setting is not None:
            raise ValueError("this LocalDPAccountant already follows a run: build a new one for each run")
        counts = protocol.data.counts
        self._setting = (config.dp_noise_multiplier, config.batch_size, config.local_epochs, tuple(counts.tolist()))
        self.participations = torch.zeros(len(counts), dtype=torch.long)

    def __call__(self, protocol: Any, plan: Any) -> dict[str, float]:
        if self.participations is None:
            self.attach(protocol)
        self.participations[plan.clients] += 1  # type: ignore[index]
        table = self.clients()
        out = {f"client_epsilon_{a}": float(table[f"epsilon_{a}"].max()) for a in self.accountants}
        out["client_delta"] = self.delta
        return out

    def clients(self) -> pd.DataFrame:
        """One row per client: samples, sample_rate, steps so far, and its epsilon per accountant."""
        if self._setting is None or self.participations is None:
            raise ValueError("no round has been accounted yet")
        z, batch, epochs, counts = self._setting
        n = torch.tensor(counts)
        rate = (batch / n.double()).clamp(max=1.0)
        steps = self.participations * epochs * ((n + batch - 1) // batch)
        rows = []
        for q, s in zip(rate.tolist(), steps.tolist()):
            if (q, s) not in self._cache:
                acc = PrivacyAccountant(delta=self.delta, accountants=self.accountants)
                if s:
                    acc.step(noise_multiplier=z or 1.0, sample_rate=q, steps=s)  # z = 0: inf below
                self._cache[(q, s)] = spent(acc, z, s)
            rows.append(self._cache[(q, s)])
        table = pd.DataFrame(rows)
        table.insert(0, "steps", steps.numpy())
        table.insert(0, "sample_rate", rate.numpy())
        table.insert(0, "samples", n.numpy())
        table.insert(0, "client", np.arange(len(n)))
        return table

    def state_dict(self) -> dict[str, Any]:
        return {"participations": None if self.participations is None else self.participations.clone(),
                "setting": None if self._setting is None else [self._setting[0], self._setting[1],
                                                                self._setting[2], list(self._setting[3])]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a ValueError (and nothing changed) for a malformed one."""
        try:
            p, s = state["participations"], state["setting"]
            if (p is None) != (s is None):
                raise ValueError("participations and setting must both be set or both be None")
            if p is not None:
                if not isinstance(p, Tensor) or p.dtype != torch.long or p.shape != (len(s[3]),) or bool((p < 0).any()):
                    raise ValueError("participations must be one non-negative count per client")
                s = (float(s[0]), int(s[1]), int(s[2]), tuple(int(c) for c in s[3]))
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise ValueError(f"malformed LocalDPAccountant state ({type(err).__name__}: {err})") from None
        self.participations = None if p is None else p.clone()
        self._setting = s
        self._cache = {}

    def __repr__(self) -> str:
        trained = 0 if self.participations is None else int((self.participations > 0).sum())
        return f"LocalDPAccountant(delta={self.delta}, {trained} clients trained so far)"
