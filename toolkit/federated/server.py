"""Server optimizers: how the aggregated client update moves the global weights.

Reddi et al., "Adaptive federated optimization" (2021) frame FedAvg as server SGD on the
"pseudo-gradient" (minus the averaged update); FedAvgM adds server momentum (Hsu, Qi, Brown,
"Measuring the effects of non-identical data distribution", 2019) and FedAdam uses Adam.
"""
from __future__ import annotations

import torch
from torch import Tensor

from toolkit.federated.config import FedConfig


class ServerOptimizer:
    """FedAvg: ``w <- w + server_lr * update``."""

    name = "fedavg"

    def __init__(self, config: FedConfig):
        self.config = config

    def step(self, weights: Tensor, update: Tensor) -> Tensor:
        return weights + self.config.server_lr * update

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        _check_state(self, state, ())


class FedAvgM(ServerOptimizer):
    """Server momentum: ``v <- beta v + update;  w <- w + server_lr v``."""

    name = "fedavgm"

    def __init__(self, config: FedConfig):
        super().__init__(config)
        self.velocity: Tensor | None = None

    def step(self, weights: Tensor, update: Tensor) -> Tensor:
        v = update if self.velocity is None else self.config.server_momentum * self.velocity + update
        self.velocity = v
        return weights + self.config.server_lr * v

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.velocity is None else {"velocity": self.velocity.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.velocity = _check_state(self, state, ("velocity",)).get("velocity")


class FedAdam(ServerOptimizer):
    """Server Adam on the update: ``m, v`` moments, ``w <- w + server_lr m / (sqrt(v) + tau)``
    (no bias correction, as in Reddi et al., 2021)."""

    name = "fedadam"

    def __init__(self, config: FedConfig):
        super().__init__(config)
        self.m: Tensor | None = None
        self.v: Tensor | None = None

    def step(self, weights: Tensor, update: Tensor) -> Tensor:
        b1, b2 = self.config.server_betas
        if self.m is None or self.v is None:
            self.m = torch.zeros_like(update)
            self.v = torch.zeros_like(update)
        self.m = b1 * self.m + (1 - b1) * update
        self.v = b2 * self.v + (1 - b2) * update * update
        return weights + self.config.server_lr * self.m / (self.v.sqrt() + self.config.server_tau)

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.m is None else {"m": self.m.clone(), "v": self.v.clone()}  # type: ignore[union-attr]

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        state = _check_state(self, state, ("m", "v"))
        self.m, self.v = state.get("m"), state.get("v")


def _check_state(optimizer: ServerOptimizer, state: dict, keys: tuple[str, ...]) -> dict[str, Tensor]:
    """``state`` if it is what ``optimizer.state_dict()`` gives: ``{}`` before the first step, else
    exactly ``keys``, floating tensors of one shape (copied); a ValueError otherwise."""
    ok = type(state) is dict and (not state or set(state) == set(keys))
    ok = ok and all(isinstance(t, Tensor) and t.is_floating_point() for t in state.values())
    ok = ok and len({tuple(t.shape) for t in state.values()}) <= 1
    if not ok:
        got = {k: tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__ for k, v in state.items()} \
            if type(state) is dict else type(state).__name__
        raise ValueError(f"the {optimizer.name} server optimizer's state must be {{}} or floating tensors of one "
                         f"shape under the keys {list(keys)}, got {got}")
    return {k: t.detach().clone() for k, t in state.items()}


SERVER_OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    "fedavg": ServerOptimizer,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
}


def make_server_optimizer(config: FedConfig) -> ServerOptimizer:
    if config.server_optimizer not in SERVER_OPTIMIZERS:
        raise ValueError(f"unknown server optimizer {config.server_optimizer!r}; "
                         f"choose one of {sorted(SERVER_OPTIMIZERS)}")
    return SERVER_OPTIMIZERS[config.server_optimizer](config)
