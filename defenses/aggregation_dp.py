"""Differential privacy with any wire aggregation: central, distributed and local Gaussian noise.

:class:`DPAggregation` wraps a :class:`~toolkit.federated.wire_aggregation.WireAggregator` (the
inner aggregation: :class:`~toolkit.federated.wire_aggregation.PlainSum`, secure aggregation,
:class:`~defenses.homomorphic_aggregation.HomomorphicAggregation`) with DP-FedAvg's mechanism
(McMahan, Ramage, Talwar, Zhang, "Learning differentially private recurrent language models",
2018): every client clips its update to L2 norm ``C`` on its own side, the inner aggregation
sums (its weighted mean with every client weighted 1, times the number it included), Gaussian
noise of standard deviation ``z C`` protects the sum, and the release divides by the fixed number
of clients per round ``m`` (the fixed-denominator estimator, sensitivity ``C / m``), as
:class:`defenses.dp_federated.DPFedAvg`. Where the noise is added is the mode:

- ``"central"``: the server adds ``N(0, (zC)^2)`` to the sum it obtained. The server must be
  trusted: it sees the inner aggregation's output (with plain aggregation, every clipped update).
  Accounted as DPFedAvg is: the subsampled Gaussian with multiplier ``z``, sample rate ``m / N``.
- ``"distributed"``: each client adds ``N(0, (zC)^2 / m)`` to its clipped update before the inner
  aggregation (so secure aggregation masks the noised input), and the sum of ``m`` clients
  carries the calibrated ``N(0, (zC)^2)`` (Kairouz, Liu, Steinke, "The distributed discrete
  Gaussian mechanism for federated learning with secure aggregation", 2021, in its continuous
  form). With dropouts only the ``k`` included clients' noise is in the sum: the realized
  multiplier is ``z sqrt(k / m)``, and each round is accounted with that realized multiplier (no
  over-provisioning; to guarantee ``z`` with up to ``d`` dropouts, pass ``z sqrt(m / (m - d))``).
  The guarantee against the server needs an inner aggregation that hides single updates: with
  plain aggregation the server sees each update with noise ``zC / sqrt(m)`` only.
- ``"local"``: each client adds the full ``N(0, (zC)^2)`` to its clipped update, which is private
  on its own, against the server too. Accounted per client without subsampling amplification
  (sample rate 1: the server sees who took part) over the rounds that client's update was
  included; the history reports the largest such epsilon over the clients.

Epsilon comes from :class:`toolkit.accounting.PrivacyAccountant` (Opacus's RDP and PRV
accountants), in the history every round: ``epsilon_rdp``, ``epsilon_prv``, ``delta``, and
``dp_mode``, ``dp_clipped`` (the share of the round's updates that were clipped),
``dp_noise_multiplier`` (the multiplier accounted that round). For central and distributed DP,
epsilon bounds what the released aggregate (hence the model) reveals about a client to anyone who
does not know which clients were sampled; a server that sees the participants gets the sample
rate 1 figure (local mode's accounting). Every noise draw comes from ``uploads.generator`` (the
protocol's generator): the same seed gives the same numbers. With ``noise_multiplier=0`` the
release is the clipped mean over ``m`` and epsilon is infinite.

Example (the same epsilon as DPFedAvg's example, for the same ``z``, ``q`` and rounds):
    >>> from toolkit import data, models
    >>> from toolkit.federated import FedConfig, FederatedAveraging, PlainSum
    >>> config = FedConfig(fraction=0.5)
    >>> agg = DPAggregation.for_config(config, 10, inner=PlainSum(), mode="central", clip=1.0,
    ...                                noise_multiplier=1.0, accountants=("rdp",))
    >>> fl = FederatedAveraging(models.mlp([64, 32, 10]), data.partition(data.load("digits"), 10),
    ...                         config=config, aggregator=agg)
    >>> history = fl.fit(rounds=2)
    >>> history["epsilon_rdp"].round(2).tolist(), history["dp_mode"].iloc[-1]
    ([3.89, 5.38], 'central')
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from defenses.dp_federated import check_client_dp
from toolkit import validate
from toolkit.accounting import PrivacyAccountant
from toolkit.federated.privacy import spent
from toolkit.federated.wire_aggregation import Aggregate, Uploads, WireAggregator
from toolkit.wire import Wire

__all__ = ["DPAggregation", "MODES"]

MODES = ("central", "distributed", "local")


class DPAggregation(WireAggregator):
    """Clip on the clients, aggregate with ``inner``, noise centrally, distributedly or locally (see the module).

    Args:
        inner: the wire aggregation that sums the clients' (clipped, perhaps noised) updates.
        mode: ``"central"``, ``"distributed"`` or ``"local"``.
        clip: the L2 norm C every client clips its update to (> 0).
        noise_multiplier: z >= 0, the noise standard deviation in units of C (0: clipping only).
        clients_per_round: m, the engine's cohort size (see :meth:`for_config`): the fixed
            denominator; more uploads than that in a round is an error.
        total_clients: N; the sample rate of central and distributed accounting is ``m / N``.
        delta: the delta epsilon is reported at.
        accountants: Opacus accountants to report (``"rdp"``, ``"prv"``).
    """

    name = "dp"

    def __init__(self, inner: WireAggregator, *, mode: str, clip: float, noise_multiplier: float,
                 clients_per_round: int, total_clients: int, delta: float = 1e-5,
                 accountants: Iterable[str] = ("rdp", "prv")):
        if not isinstance(inner, WireAggregator):
            raise ValueError(f"inner must be a WireAggregator (PlainSum, secure or homomorphic aggregation), "
                             f"got {type(inner).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
        self.inner, self.mode = inner, mode
        self.clip, self.noise_multiplier, self.clients_per_round, self.total_clients = check_client_dp(
            clip, noise_multiplier, clients_per_round, total_clients)
        self.accountant = PrivacyAccountant(delta=delta, accountants=accountants)
        self.sample_rate = self.clients_per_round / self.total_clients
        self.rounds = 0  # releases so far
        self.clipped = math.nan  # share of the last round's updates that were clipped
        self.accounted = math.nan  # the noise multiplier the last release was accounted with
        self.participation: dict[str, int] = {}  # local mode: releases each client's update was in

    @classmethod
    def for_config(cls, config: Any, total_clients: int, *, inner: WireAggregator, **kwargs: Any) -> DPAggregation:
        """The DP aggregation for a run of ``total_clients`` with this FedConfig (its cohort size
        ``max(1, round(fraction * N))``, as the engine samples)."""
        n = validate.positive_int("total_clients", total_clients)
        return cls(inner, clients_per_round=max(1, round(config.fraction * n)), total_clients=n, **kwargs)

    def attach(self, protocol: Any) -> None:
        """Refuse (ValueError) a run whose clients or cohort are not this one's; show the inner the run."""
        n = len(protocol.data)
        m = max(1, round(protocol.config.fraction * n))
        if (n, m) != (self.total_clients, self.clients_per_round):
            raise ValueError(f"DPAggregation was built for {self.clients_per_round} of {self.total_clients} clients "
                             f"per round, but this run samples {m} of {n}: build it with "
                             f"DPAggregation.for_config(config, {n}, inner=...)")
        if callable(getattr(self.inner, "attach", None)):
            self.inner.attach(protocol)

    # -- the mechanism -------------------------------------------------------------------------
    def client_std(self) -> float:
        """The standard deviation of the noise each client adds per coordinate (0 in central mode)."""
        sigma = self.noise_multiplier * self.clip
        return {"central": 0.0, "distributed": sigma / math.sqrt(self.clients_per_round), "local": sigma}[self.mode]

    def over_wire(self, wire: Wire, uploads: Uploads) -> Aggregate:
        k, m = len(uploads.names), self.clients_per_round
        if k > m:
            raise ValueError(f"DPAggregation received {k} uploads but was built for {m} clients per round: "
                             f"the fixed denominator would understate the sensitivity")
        u = uploads.updates  # (K, P) on the clients' side
        norms = torch.linalg.vector_norm(u.double(), dim=1)  # (K,)
        factor = (self.clip / norms.clamp(min=1e-12)).clamp(max=1.0)  # (K,)
        sent = (u.double() * factor[:, None]).to(u.dtype)  # (K, P) each client's clipped update
        if (std := self.client_std()) > 0:  # the clients' own noise, before the inner aggregation
            sent = sent + std * torch.randn(sent.shape, generator=uploads.generator, dtype=u.dtype)
        ones = torch.ones(k, dtype=torch.float64)  # every client weighted 1 (DP-FedAvg)
        result = self.inner.over_wire(wire, Uploads(sent, uploads.names, ones, uploads.times, uploads.round,
                                                     uploads.generator))
        included = tuple(result.included)
        report = {**result.report, "dp_mode": self.mode, "dp_included": len(included)}
        if not included:  # nothing released, nothing spent
            return Aggregate(torch.zeros_like(u[0]), (), result.bytes_up, result.bytes_down, report)
        total = result.update.double() * len(included)  # (P,) the sum of the included clients' inputs
        if self.mode == "central" and self.noise_multiplier:
            noise = torch.randn(total.shape, generator=uploads.generator, dtype=u.dtype)
            total = total + noise.double() * (self.noise_multiplier * self.clip)
        self._account(included)
        self.clipped = float((norms > self.clip).double().mean())
        report["dp_noise_multiplier"] = self.accounted
        return Aggregate((total / m).to(u.dtype), included, result.bytes_up, result.bytes_down, report)

    def _account(self, included: tuple[str, ...]) -> None:
        """Record this round's release with the accountant."""
        z, self.rounds = self.noise_multiplier, self.rounds + 1
        if self.mode == "local":
            before = max(self.participation.values(), default=0)
            for name in included:
                self.participation[name] = self.participation.get(name, 0) + 1
            after = max(self.participation.values())
            if z and after > before:  # the most often included client's budget: sample rate 1
                self.accountant.step(noise_multiplier=z, sample_rate=1.0, steps=after - before)
            self.accounted = z
            return
        if self.mode == "distributed":
            z = z * math.sqrt(len(included) / self.clients_per_round)  # only the included clients' noise
        if z:
            self.accountant.step(noise_multiplier=z, sample_rate=self.sample_rate)
        self.accounted = z

    # -- the record ----------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """History columns so far: the inner's, ``epsilon_rdp``, ``epsilon_prv``, ``delta``,
        ``dp_mode``, ``dp_clipped``, ``dp_noise_multiplier``."""
        return {**self.inner.report(), **spent(self.accountant, self.noise_multiplier, self.rounds),
                "dp_mode": self.mode, "dp_clipped": self.clipped, "dp_noise_multiplier": self.accounted}

    def manifest(self) -> dict[str, Any]:
        """The inner aggregation's manifest, plus the DP parameters under ``"dp"``."""
        return {**self.inner.manifest(), "dp": {
            "mechanism": "gaussian", "mode": self.mode, "clip": self.clip, "noise_multiplier": self.noise_multiplier,
            "client_noise_std": self.client_std(), "delta": self.accountant.delta,
            "accountants": list(self.accountant.accountants), "sample_rate": self.sample_rate,
            "accounted_sample_rate": 1.0 if self.mode == "local" else self.sample_rate,
            "clients_per_round": self.clients_per_round, "total_clients": self.total_clients,
            "dropouts": "accounted with the realized multiplier" if self.mode == "distributed" else None}}

    def state_dict(self) -> dict[str, Any]:
        inner = self.inner.state_dict() if callable(getattr(self.inner, "state_dict", None)) else None
        return {"rounds": self.rounds, "clipped": self.clipped, "accounted": self.accounted,
                "history": [list(h) for h in self.accountant.history],
                "participation": dict(self.participation), "inner": inner}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a ValueError (and nothing changed) for a malformed one."""
        try:
            rounds = validate.non_negative_int("rounds", state["rounds"])
            clipped, accounted = float(state["clipped"]), float(state["accounted"])
            history = [(validate.positive("noise_multiplier", z), validate.fraction("sample_rate", q, zero=False, one=True),
                        validate.positive_int("steps", s)) for z, q, s in state["history"]]
            participation = {str(n): validate.positive_int(f"participation of {n!r}", c)
                             for n, c in dict(state["participation"]).items()}
            inner = state["inner"]
            has_state = callable(getattr(self.inner, "state_dict", None))
            if (inner is None) == has_state:
                raise ValueError(f"the inner aggregation's state is {'missing' if has_state else 'unexpected'}")
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"malformed DPAggregation state ({type(err).__name__}: {err})") from None
        if has_state:
            self.inner.load_state_dict(inner)
        self.rounds, self.clipped, self.accounted = rounds, clipped, accounted
        self.accountant.history, self.participation = history, participation

    def __repr__(self) -> str:
        return (f"DPAggregation({self.inner!r}, mode={self.mode!r}, clip={self.clip}, "
                f"noise_multiplier={self.noise_multiplier}, {self.clients_per_round}/{self.total_clients} clients "
                f"per round, {self.accountant!r})")
