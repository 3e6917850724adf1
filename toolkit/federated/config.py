"""FedConfig: the training settings of a federated run, one comment per default."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FedConfig:
    """Settings for :class:`toolkit.federated.FederatedAveraging` and its asynchronous variants.

    FedProx is ``mu > 0`` (Li et al., "Federated optimization in heterogeneous networks", 2020);
    FedAvgM and FedAdam are ``server_optimizer="fedavgm"`` / ``"fedadam"`` (Hsu et al., 2019;
    Reddi et al., "Adaptive federated optimization", 2021).
    """

    fraction: float = 1.0            # share of clients sampled each round, in (0, 1]
    local_epochs: int = 1            # passes of each client over its data per round
    batch_size: int = 32             # samples per local step
    lr: float = 0.05                 # client SGD learning rate
    momentum: float = 0.0            # client SGD momentum (buffers start fresh every round)
    weight_decay: float = 0.0        # client SGD weight decay
    mu: float = 0.0                  # FedProx proximal weight; 0 is plain FedAvg
    server_optimizer: str = "fedavg"  # "fedavg", "fedavgm" or "fedadam"
    server_lr: float = 1.0           # step size applied to the aggregated update
    server_momentum: float = 0.9     # FedAvgM momentum
    server_betas: tuple[float, float] = (0.9, 0.99)  # FedAdam moment decays
    server_tau: float = 1e-3         # FedAdam adaptivity (epsilon)
    dropout: float = 0.0             # probability that a sampled client drops out before answering
    executor: str = "vectorized"     # "vectorized" (torch.func, all clients at once) or "sequential"
    eval_every: int = 1              # evaluate the global model every this many rounds
    eval_batch_size: int = 2048      # samples per evaluation step
    record: bool = True              # keep a transcript on the wire (bytes are counted either way)
    seed: int = 0                    # seeds sampling, dropouts, data order and randomized defenses

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must lie in (0, 1], got {self.fraction}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        for name in ("local_epochs", "batch_size", "eval_every", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("lr", "server_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("momentum", "server_momentum"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if self.mu < 0 or self.weight_decay < 0:
            raise ValueError(f"mu and weight_decay must be non-negative, got {self.mu} and {self.weight_decay}")
        if not all(0 <= b < 1 for b in self.server_betas) or len(self.server_betas) != 2:
            raise ValueError(f"server_betas must be two values in [0, 1), got {self.server_betas}")
        self.server_betas = tuple(self.server_betas)  # type: ignore[assignment]  (JSON round-trips give lists)

    @classmethod
    def smoke(cls) -> FedConfig:
        """Settings for a run of seconds (tests, CI)."""
        return cls(batch_size=64)
