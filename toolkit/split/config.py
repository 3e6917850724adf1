"""SplitConfig: the training settings shared by every party of a split-learning run."""
from __future__ import annotations

from dataclasses import dataclass

from toolkit import validate
from toolkit.parties import OPTIMIZERS, OptimizerFactory, make_optimizer


@dataclass
class SplitConfig:
    """Training settings shared by every party of a split-learning run (checked on creation)."""

    batch_size: int = 64        # samples per training step
    lr: float = 0.1             # learning rate of every party's optimizer
    optimizer: str = "sgd"      # name in toolkit.parties.OPTIMIZERS
    momentum: float = 0.0       # SGD momentum, in [0, 1) (ignored by other optimizers)
    shuffle: bool = True        # reshuffle the training order every epoch
    seed: int = 0               # seeds the data order (unless SplitNN gets a generator)
    record: bool = True         # keep a transcript of every transfer (bytes are counted either way)
    eval_batch_size: int = 1024  # samples per evaluation step

    def __post_init__(self) -> None:
        validate.positive_int("batch_size", self.batch_size)
        validate.positive_int("eval_batch_size", self.eval_batch_size)
        validate.positive("lr", self.lr)
        validate.fraction("momentum", self.momentum)
        validate.non_negative_int("seed", self.seed)
        for name in ("shuffle", "record"):
            validate.boolean(name, getattr(self, name))
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {sorted(OPTIMIZERS)}")

    def make_optimizer(self) -> OptimizerFactory:
        extra = {"momentum": self.momentum} if self.optimizer == "sgd" else {}
        return make_optimizer(self.optimizer, lr=self.lr, **extra)

    @classmethod
    def smoke(cls) -> SplitConfig:
        """Settings for a run of a few seconds (tests, CI)."""
        return cls(batch_size=128)
