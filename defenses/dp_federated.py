"""Differential privacy for federated learning: DP-FedAvg on the server, and the accounting of
per-sample DP-SGD in the clients' local training.

- :class:`DPFedAvg` (McMahan, Ramage, Talwar, Zhang, "Learning differentially private recurrent
  language models", 2018), an aggregator: clip each client's update to L2 norm ``clip``, sum,
  add Gaussian noise of standard deviation ``noise_multiplier * clip`` (the caller's generator)
  and divide by the fixed number of clients per round (the paper's fixed-denominator estimator,
  with every client weighted 1). This protects each client's whole participation (client-level
  DP). Its ``report()`` gives the history columns ``epsilon_rdp``, ``epsilon_prv`` and ``delta``
  after every round, from :class:`defenses.accounting.PrivacyAccountant` (Opacus's RDP and PRV
  accountants) with sample rate = clients per round / total clients.
- Per-sample DP-SGD (Abadi et al., "Deep learning with differential privacy", 2016) of each
  client's local steps is the mechanism of ``FedConfig(dp_max_grad_norm=..., dp_noise_multiplier=...)``
  (``toolkit.federated.executors``: Opacus itself sequentially, all clients in one pass
  vectorized); :class:`LocalDPAccountant`, a monitor of the protocol, reports each client's
  epsilon (sample-level DP of that client's data), the largest in the columns
  ``client_epsilon_rdp``, ``client_epsilon_prv`` and ``client_delta``.

Sampling is approximated, as Flower and Opacus do: the engine samples a fixed-size cohort of
clients each round (not Poisson with rate q), and a client's local epoch visits its samples in
shuffled batches of ``batch_size`` (not Poisson with rate ``batch_size / n``); both accountants
are told Poisson sampling at those rates.

Example:
    >>> from toolkit import data, models
    >>> from toolkit.federated import FedConfig, FederatedAveraging
    >>> config = FedConfig(fraction=0.5)
    >>> agg = DPFedAvg.for_config(config, 10, clip=1.0, noise_multiplier=1.0,
    ...                           generator=torch.Generator().manual_seed(0), accountants=("rdp",))
    >>> fl = FederatedAveraging(models.mlp([64, 32, 10]), data.partition(data.load("digits"), 10),
    ...                         config=config, aggregator=agg)
    >>> history = fl.fit(rounds=2)
    >>> history["epsilon_rdp"].round(2).tolist(), float(history["delta"].iloc[-1])
    ([3.89, 5.38], 1e-05)
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from defenses.accounting import PrivacyAccountant
from toolkit import validate
from toolkit.federated.aggregators import Aggregator

__all__ = ["DPFedAvg", "LocalDPAccountant"]


def _spent(accountant: PrivacyAccountant, noise_multiplier: float, releases: int) -> dict[str, float]:
    """The accountant's report; epsilon is infinite after a release without noise."""
    if noise_multiplier == 0 and releases:
        return {**{f"epsilon_{a}": math.inf for a in accountant.accountants}, "delta": accountant.delta}
    with np.errstate(divide="ignore"):  # PRV takes log(1 - q), -inf at sample rate 1 (handled there)
        return accountant.report()


class DPFedAvg(Aggregator):
    """DP-FedAvg's aggregation with its privacy accounting (McMahan et al., 2018).

    ``(sum_k clip_C(u_k) + N(0, (z C)^2 I)) / m`` over the K received updates, with
    ``clip_C(u) = u * min(1, C / |u|)`` and ``m = clients_per_round`` however many arrive
    (dropouts and rejected updates included: the fixed-denominator estimator, whose sensitivity
    is ``C / m``). Sample counts the engine passes as weights are checked and ignored.

    Args:
        clip: the L2 norm C every update is clipped to (> 0).
        noise_multiplier: z >= 0, the noise standard deviation in units of C (0: clipping only,
            epsilon infinite).
        clients_per_round: m, the engine's cohort size (``FedConfig.fraction`` of the clients,
            see :meth:`for_config`); more received updates than that is an error.
        total_clients: N; the accountant's sample rate is ``m / N``.
        generator: draws the noise (required).
        delta: the delta epsilon is reported at.
        accountants: Opacus accountants to report (``"rdp"``, ``"prv"``).
    """

    name = "dp_fedavg"

    def __init__(self, *, clip: float, noise_multiplier: float, clients_per_round: int, total_clients: int,
                 generator: torch.Generator, delta: float = 1e-5, accountants: Iterable[str] = ("rdp", "prv")):
        self.clip = validate.positive("clip", clip)
        self.noise_multiplier = validate.non_negative("noise_multiplier", noise_multiplier)
        self.clients_per_round = validate.positive_int("clients_per_round", clients_per_round)
        self.total_clients = validate.positive_int("total_clients", total_clients)
        if self.clients_per_round > self.total_clients:
            raise ValueError(f"clients_per_round {clients_per_round} exceeds total_clients {total_clients}")
        if validate.generator(generator) is None:
            raise ValueError("DPFedAvg draws noise: pass generator=<a torch.Generator>")
        self.generator = generator
        self.accountant = PrivacyAccountant(delta=delta, accountants=accountants)
        self.sample_rate = self.clients_per_round / self.total_clients
        self.rounds = 0
        self.clipped = float("nan")  # share of the last round's updates that were clipped

    @classmethod
    def for_config(cls, config: Any, total_clients: int, **kwargs: Any) -> DPFedAvg:
        """The DP-FedAvg aggregator for a run of ``total_clients`` with this FedConfig (its
        cohort size ``max(1, round(fraction * N))``, as the engine samples)."""
        n = validate.positive_int("total_clients", total_clients)
        return cls(clients_per_round=max(1, round(config.fraction * n)), total_clients=n, **kwargs)

    def attach(self, protocol: Any) -> None:
        """Refuse (ValueError) a FederatedAveraging run whose clients or cohort are not this one's."""
        n = len(protocol.data)
        m = max(1, round(protocol.config.fraction * n))
        if (n, m) != (self.total_clients, self.clients_per_round):
            raise ValueError(f"DPFedAvg was built for {self.clients_per_round} of {self.total_clients} clients per "
                             f"round, but this run samples {m} of {n}: build it with DPFedAvg.for_config(config, {n}, ...)")

    def _aggregate(self, updates: Tensor, weights: Tensor | None) -> Tensor:
        k = len(updates)
        if k > self.clients_per_round:
            raise ValueError(f"DPFedAvg received {k} updates but was built for {self.clients_per_round} clients "
                             f"per round: the fixed denominator would understate the sensitivity")
        norms = torch.linalg.vector_norm(updates, dim=1).double()  # (K,)
        factor = (self.clip / norms.clamp(min=1e-12)).clamp(max=1.0)  # (K,)
        total = factor.to(updates.dtype) @ updates  # (P,) sum of the clipped updates
        if self.noise_multiplier:
            total += torch.randn(total.shape, generator=self.generator, dtype=total.dtype) * (
                self.noise_multiplier * self.clip)
            self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        self.rounds += 1
        self.clipped = float((norms > self.clip).double().mean())
        return total / self.clients_per_round

    def report(self) -> dict[str, float]:
        """This run's history columns so far: ``epsilon_rdp``, ``epsilon_prv``, ``delta``, and
        ``dp_clipped`` (the share of the last round's updates that were clipped)."""
        return {**_spent(self.accountant, self.noise_multiplier, self.rounds), "dp_clipped": self.clipped}

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "clipped": self.clipped, "generator": self.generator.get_state(),
                "history": [list(h) for h in self.accountant.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a ValueError (and nothing changed) for a malformed one."""
        try:
            rounds = validate.non_negative_int("rounds", state["rounds"])
            clipped = float(state["clipped"])
            history = [(float(z), float(q), validate.positive_int("steps", s)) for z, q, s in state["history"]]
            generator = state["generator"]
            if not isinstance(generator, Tensor) or generator.dtype != torch.uint8:
                raise ValueError("the generator state must be a uint8 tensor")
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"malformed DPFedAvg state ({type(err).__name__}: {err})") from None
        self.generator.set_state(generator)
        self.rounds, self.clipped, self.accountant.history = rounds, clipped, history

    def __repr__(self) -> str:
        return (f"DPFedAvg(clip={self.clip}, noise_multiplier={self.noise_multiplier}, "
                f"{self.clients_per_round}/{self.total_clients} clients per round, {self.accountant!r})")


class LocalDPAccountant:
    """Each client's epsilon for per-sample DP-SGD in local training (a protocol monitor).

    Pass it as ``FederatedAveraging(..., config=FedConfig(dp_max_grad_norm=C,
    dp_noise_multiplier=z), monitors=[LocalDPAccountant()])``. Every round a training client
    takes ``local_epochs * ceil(n / batch_size)`` steps at sample rate ``min(1, batch_size / n)``
    (n its sample count), each a release of the subsampled Gaussian mechanism with noise
    multiplier z; its epsilon composes those over the rounds it trained in (through
    :class:`defenses.accounting.PrivacyAccountant`). The history row gets the largest over the
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
                self._cache[(q, s)] = _spent(acc, z, s)
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
