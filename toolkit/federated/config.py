"""FedConfig: the training settings of a federated run, one comment per default; LOSSES: the
local-training and evaluation losses it can name."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from toolkit import validate


@dataclass(frozen=True)
class Loss:
    """A per-sample loss and what its targets are.

    ``per_sample(outputs (B, ...), targets (B, ...)) -> (B,)``; a batch's loss is its mean.
    ``classification``: targets are class indices (integer labels, accuracy is reported);
    otherwise they are float tensors with as many values per sample as the model outputs.
    """

    per_sample: Callable[[Tensor, Tensor], Tensor]
    classification: bool


def _cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y, reduction="none")


def _mse(out: Tensor, y: Tensor) -> Tensor:
    """Mean squared error per sample, over all of its output values."""
    return (out.reshape(len(out), -1) - y.reshape(len(y), -1)).pow(2).mean(1)


LOSSES: dict[str, Loss] = {
    "cross_entropy": Loss(_cross_entropy, classification=True),
    "mse": Loss(_mse, classification=False),
}


@dataclass
class FedConfig:
    """Settings for :class:`toolkit.federated.FederatedAveraging` and its asynchronous variants.

    FedProx is ``mu > 0`` (Li et al., "Federated optimization in heterogeneous networks", 2020);
    FedAvgM and FedAdam are ``server_optimizer="fedavgm"`` / ``"fedadam"`` (Hsu et al., 2019;
    Reddi et al., "Adaptive federated optimization", 2021).

    Example:
        >>> FedConfig(loss="mse", chunk_bytes=2**20).loss
        'mse'
        >>> FedConfig(batch_size=2.5)
        Traceback (most recent call last):
        ...
        ValueError: batch_size must be a positive int, got 2.5
    """

    fraction: float = 1.0            # share of clients sampled each round, in (0, 1]
    local_epochs: int = 1            # passes of each client over its data per round
    batch_size: int = 32             # samples per local step
    lr: float = 0.05                 # client SGD learning rate
    momentum: float = 0.0            # client SGD momentum in [0, 1) (buffers start fresh every round)
    weight_decay: float = 0.0        # client SGD weight decay
    mu: float = 0.0                  # FedProx proximal weight; 0 is plain FedAvg
    loss: str = "cross_entropy"      # local training and evaluation loss, a name in LOSSES ("mse": float targets)
    server_optimizer: str = "fedavg"  # "fedavg", "fedavgm" or "fedadam"
    server_lr: float = 1.0           # step size applied to the aggregated update
    server_momentum: float = 0.9     # FedAvgM momentum, in [0, 1)
    server_betas: tuple[float, float] = (0.9, 0.99)  # FedAdam moment decays, each in [0, 1)
    server_tau: float = 1e-3         # FedAdam adaptivity (epsilon)
    dropout: float = 0.0             # probability that a sampled client drops out before answering, in [0, 1)
    executor: str = "vectorized"     # "vectorized" (torch.func, all clients at once) or "sequential"
    chunk_bytes: int = 64 * 2**20    # vectorized executor: working memory per pass; more clients train in more passes
    hand_written_mlp: bool = True    # vectorized executor: hand-written batched gradients for plain MLPs (else vmap)
    eval_every: int = 1              # evaluate the global model every this many rounds
    eval_batch_size: int = 2048      # samples per evaluation step
    record: bool = True              # keep a transcript on the wire (bytes are counted either way)
    seed: int = 0                    # seeds sampling, dropouts, data order and randomized defenses
    dp_max_grad_norm: float = 0.0    # per-sample DP-SGD in local training: clip each sample's gradient to this L2 norm (0: off)
    dp_noise_multiplier: float = 0.0  # per-sample DP-SGD: noise std on each step's clipped sum, in units of dp_max_grad_norm

    def __post_init__(self) -> None:
        validate.number("fraction", self.fraction, low=0.0, high=1.0, low_open=True)
        validate.fraction("dropout", self.dropout)
        for name in ("local_epochs", "batch_size", "eval_every", "eval_batch_size", "chunk_bytes"):
            validate.positive_int(name, getattr(self, name))
        for name in ("lr", "server_lr", "server_tau"):
            validate.positive(name, getattr(self, name))
        for name in ("momentum", "server_momentum"):
            validate.fraction(name, getattr(self, name))
        for name in ("mu", "weight_decay", "dp_max_grad_norm", "dp_noise_multiplier"):
            validate.non_negative(name, getattr(self, name))
        if self.dp_noise_multiplier and not self.dp_max_grad_norm:
            raise ValueError(f"dp_noise_multiplier {self.dp_noise_multiplier} needs dp_max_grad_norm > 0 "
                             f"(the noise is calibrated to the per-sample clipping norm)")
        if self.dp_max_grad_norm and self.mu:
            raise ValueError(f"per-sample DP-SGD (dp_max_grad_norm={self.dp_max_grad_norm}) does not combine with "
                             f"the FedProx term (mu={self.mu}): set one of them to 0")
        if not isinstance(self.server_betas, (tuple, list)) or len(self.server_betas) != 2:
            raise ValueError(f"server_betas must be two values in [0, 1), got {self.server_betas!r}")
        for i, beta in enumerate(self.server_betas):
            validate.fraction(f"server_betas[{i}]", beta)
        self.server_betas = tuple(self.server_betas)  # type: ignore[assignment]  (JSON round-trips give lists)
        validate.non_negative_int("seed", self.seed)
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {sorted(LOSSES)}")
        for name in ("hand_written_mlp", "record"):
            validate.boolean(name, getattr(self, name))

    @property
    def per_sample_dp(self) -> bool:
        """Whether local training runs per-sample DP-SGD (``dp_max_grad_norm > 0``)."""
        return self.dp_max_grad_norm > 0

    @classmethod
    def smoke(cls) -> FedConfig:
        """Settings for a run of seconds (tests, CI)."""
        return cls(batch_size=64)
