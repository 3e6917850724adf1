"""Differential privacy for federated learning: DP-FedAvg on the server (per-sample DP-SGD in the
clients' local training is ``FedConfig(dp_max_grad_norm=..., dp_noise_multiplier=...)``).

- :class:`DPFedAvg` (McMahan, Ramage, Talwar, Zhang, "Learning differentially private recurrent
  language models", 2018), an aggregator: clip each client's update to L2 norm ``clip``, sum,
  add Gaussian noise of standard deviation ``noise_multiplier * clip`` (the caller's generator)
  and divide by the fixed number of clients per round (the paper's fixed-denominator estimator,
  with every client weighted 1). This protects each client's whole participation (client-level
  DP). Its ``report()`` gives the history columns ``epsilon_rdp``, ``epsilon_prv`` and ``delta``
  after every round, from :class:`toolkit.accounting.PrivacyAccountant` (Opacus's RDP and PRV
  accountants) with sample rate = clients per round / total clients.
- Per-sample DP-SGD (Abadi et al., "Deep learning with differential privacy", 2016) of each
  client's local steps is the mechanism of ``FedConfig(dp_max_grad_norm=..., dp_noise_multiplier=...)``
  (``toolkit.federated.executors``: Opacus itself sequentially, all clients in one pass
  vectorized); ``toolkit.federated.LocalDPAccountant``, a monitor the protocol attaches by itself,
  reports each client's epsilon (sample-level DP of that client's data), the largest in the
  columns ``client_epsilon_rdp``, ``client_epsilon_prv`` and ``client_delta``.

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

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from toolkit import validate
from toolkit.accounting import PrivacyAccountant
from toolkit.federated.aggregators import Aggregator
from toolkit.federated.privacy import spent

__all__ = ["DPFedAvg", "check_client_dp"]


def check_client_dp(clip: float, noise_multiplier: float, clients_per_round: int,
                    total_clients: int) -> tuple[float, float, int, int]:
    """Client-level DP's parameters, checked: clip C > 0, noise multiplier z >= 0, m clients per
    round out of N (1 <= m <= N). Returns ``(C, z, m, N)``."""
    m = validate.positive_int("clients_per_round", clients_per_round)
    n = validate.positive_int("total_clients", total_clients)
    if m > n:
        raise ValueError(f"clients_per_round {clients_per_round} exceeds total_clients {total_clients}")
    return validate.positive("clip", clip), validate.non_negative("noise_multiplier", noise_multiplier), m, n


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
        self.clip, self.noise_multiplier, self.clients_per_round, self.total_clients = check_client_dp(
            clip, noise_multiplier, clients_per_round, total_clients)
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
        return {**spent(self.accountant, self.noise_multiplier, self.rounds), "dp_clipped": self.clipped}

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
