"""Per-sample DP-SGD in clients' local training (Abadi et al., "Deep learning with differential
privacy", 2016), for the executors: Opacus itself for the sequential reference, and the clipped
per-sample gradient sums, noise and scaling of ``DPOptimizer`` for all clients at once.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from toolkit import validate
from toolkit.federated.batched import BatchedMLP
from toolkit.federated.config import LOSSES, FedConfig


def clipped_grad_fn(model: nn.Module, config: FedConfig, hand_written_mlp: bool) -> tuple[str, object]:
    """``(path, fn)``: ``fn(params, fixed, x, y, mask, anchor, mu) -> (sums of every client's clipped
    per-sample gradients, loss per client)``, by hand for plain MLPs, else ``vmap`` over clients and samples."""
    clip = config.dp_max_grad_norm
    if hand_written_mlp and BatchedMLP.supports(model, config.loss):
        mlp = BatchedMLP(model, config.loss)
        return "hand-written MLP", lambda params, fixed, x, y, mask, anchor, mu: mlp.clipped_sum(
            params, x, y, mask, clip)
    per_sample = LOSSES[config.loss].per_sample

    def sample_loss(params, fixed, x, y):  # one sample's loss
        loss = per_sample(functional_call(model, {**params, **fixed}, (x.unsqueeze(0),)), y.unsqueeze(0))[0]
        return loss, loss.detach()

    # per client, per sample: gradients (C, b, *shape) and losses (C, b)
    per_sample_grads = vmap(vmap(grad(sample_loss, has_aux=True), in_dims=(None, None, 0, 0)))

    def fn(params, fixed, x, y, mask, anchor, mu):
        grads, losses = per_sample_grads(params, fixed, x, y)
        norms = torch.stack([g.flatten(2).norm(dim=2) for g in grads.values()], dim=2).norm(dim=2)  # (C, b)
        factor = (clip / (norms + 1e-6)).clamp(max=1.0) * mask  # Opacus's clip factor; padding drops out
        summed = {k: torch.einsum("cb,cb...->c...", factor, g) for k, g in grads.items()}
        return summed, (losses * mask).sum(1) / mask.sum(1).clamp(min=1)

    return "vmap", fn


@contextmanager
def opacus_module(model: nn.Module) -> Iterator[nn.Module]:
    """Opacus's ``GradSampleModule`` around ``model`` for the block; its hooks and ``grad_sample``
    attributes are taken off after it."""
    from opacus import GradSampleModule

    net = GradSampleModule(model, loss_reduction="mean")
    try:
        with warnings.catch_warnings():  # Opacus's hooks fire on the first layer, whose inputs need no grad
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            yield net
    finally:
        net._close()


def opacus_optimizer(opt: torch.optim.Optimizer, config: FedConfig, generator: torch.Generator | None):
    """Opacus's ``DPOptimizer`` around a client's SGD, with the config's clip and noise."""
    from opacus.optimizers import DPOptimizer

    return DPOptimizer(opt, noise_multiplier=config.dp_noise_multiplier, max_grad_norm=config.dp_max_grad_norm,
                       expected_batch_size=config.batch_size, generator=generator)


def noise_and_scale(grads: dict[str, Tensor], config: FedConfig, generator: torch.Generator | None) -> None:
    """DPOptimizer's last two moves, in place on every client's clipped sum: add Gaussian noise
    of standard deviation ``dp_noise_multiplier * dp_max_grad_norm``, divide by the batch size."""
    std = config.dp_noise_multiplier * config.dp_max_grad_norm
    for g in grads.values():
        if std:
            g.add_(torch.randn(g.shape, generator=generator, dtype=g.dtype), alpha=std)
        g.div_(config.batch_size)


def check_generator(config: FedConfig, generator: torch.Generator | None) -> None:
    validate.generator(generator)
    if config.dp_noise_multiplier and generator is None:
        raise ValueError(f"per-sample DP-SGD with dp_noise_multiplier {config.dp_noise_multiplier} draws noise: "
                         f"pass generator=<a torch.Generator>")
