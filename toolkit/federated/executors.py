"""Local training of a round's clients: a sequential reference and a vectorized executor.

Both run, for every training client, ``local_epochs`` passes of SGD (momentum, weight decay,
FedProx term) over its data in the order the round plan fixed, starting from the global
weights, and return the clients' updates (new weights minus global weights) as one (M, P)
tensor. The vectorized executor does all clients at once with ``torch.func`` (``functional_call``
and ``vmap`` over stacked weights, per-client batches stacked), and gives the same numbers.
"""
from __future__ import annotations

import warnings
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from toolkit.federated.batched import BatchedMLP
from toolkit.federated.clients import ClientData, RoundPlan
from toolkit.federated.config import FedConfig
from toolkit.parties import flat_state, load_flat_state


class Executor(Protocol):
    def train(self, model: nn.Module, weights: Tensor, data: ClientData, plan: RoundPlan,
              config: FedConfig, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns (updates (M, P), mean training loss per client (M,)); writes the updates into
        ``out`` when given (a buffer the caller reuses between rounds)."""


class SequentialExecutor:
    """The reference: one client after another, each with a fresh ``torch.optim.SGD``."""

    name = "sequential"

    def train(self, model: nn.Module, weights: Tensor, data: ClientData, plan: RoundPlan,
              config: FedConfig, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        updates = _output(out, len(plan.clients), weights)
        losses = torch.zeros(len(plan.clients), dtype=torch.float64)
        anchor: list[Tensor] = []
        model.train()
        for row, (client, count) in enumerate(zip(plan.clients.tolist(), plan.counts.tolist())):
            load_flat_state(model, weights)
            if config.mu:
                anchor = [p.detach().clone() for p in model.parameters()]
            opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                  weight_decay=config.weight_decay)
            total, steps = 0.0, 0
            for order in plan.orders:
                for batch in order[row, :count].split(config.batch_size):
                    opt.zero_grad(set_to_none=True)
                    loss = F.cross_entropy(model(data.x[client, batch]), data.y[client, batch])
                    total += float(loss.detach())
                    steps += 1
                    if config.mu:
                        loss = loss + config.mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
                    loss.backward()
                    opt.step()
            updates[row] = flat_state(model) - weights
            losses[row] = total / steps
        load_flat_state(model, weights)
        return updates, losses


def unsupported(model: nn.Module) -> str | None:
    """Why ``model`` cannot be trained per client under ``vmap`` with identical results, or None."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            return (f"{name or 'the model'} ({type(module).__name__}) keeps running statistics, "
                    f"per-client state that vmap cannot update in place")
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return (f"{name or 'the model'} ({type(module).__name__}) draws random masks that would "
                    f"differ from the sequential reference")
    return None


class VectorizedExecutor:
    """All training clients of a round at once: ``vmap(grad(loss))`` over stacked weights.

    Clients with fewer samples than others sit out the steps they have no batch for (their
    weights and momentum do not move), so each client sees exactly the batches of the
    sequential reference. Models it cannot vectorize (BatchNorm in train mode, Dropout) fall
    back to :class:`SequentialExecutor` with a warning that says why.
    """

    name = "vectorized"

    def __init__(self, chunk_bytes: int = 64 * 2**20, *, hand_written_mlp: bool = True) -> None:
        """``chunk_bytes``: working memory per pass (weights, gradients and a batch per client);
        more clients than fit are trained in several passes. ``hand_written_mlp``: use
        :class:`~toolkit.federated.batched.BatchedMLP` for plain MLPs instead of ``vmap``."""
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self.chunk_bytes = chunk_bytes
        self.hand_written_mlp = hand_written_mlp
        self._fallback: SequentialExecutor | None = None
        self._grad_fns: dict[tuple[int, bool], object] = {}
        self._batch: Tensor | None = None  # reused gather buffer: big fresh allocations page-fault

    def _gather(self, rows: Tensor, idx: Tensor) -> Tensor:
        """``rows[idx]`` written into a buffer kept between steps (a step's graph is gone by the next)."""
        size = len(idx) * rows[0].numel()
        if self._batch is None or self._batch.numel() < size or self._batch.dtype != rows.dtype:
            self._batch = torch.empty(size, dtype=rows.dtype)
        out = self._batch[:size].view(len(idx), *rows.shape[1:])
        return torch.index_select(rows, 0, idx, out=out)

    def train(self, model: nn.Module, weights: Tensor, data: ClientData, plan: RoundPlan,
              config: FedConfig, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        reason = unsupported(model)
        if reason is not None:
            if self._fallback is None:
                warnings.warn(f"the vectorized executor cannot vectorize this model: {reason}; "
                              f"falling back to the sequential executor", stacklevel=3)
                self._fallback = SequentialExecutor()
            return self._fallback.train(model, weights, data, plan, config, out)
        return self._train(model, weights, data, plan, config, out)

    def _grad_fn(self, model: nn.Module, prox: bool):
        key = (id(model), prox)
        if key not in self._grad_fns and self.hand_written_mlp and BatchedMLP.supports(model):
            self._grad_fns[key] = BatchedMLP(model)
        if key not in self._grad_fns:
            def loss_fn(params, x, y, mask, anchor, mu):
                out = functional_call(model, params, (x,))  # (B, classes)
                per_sample = F.cross_entropy(out, y, reduction="none")  # (B,)
                loss = (per_sample * mask).sum() / mask.sum().clamp(min=1)
                total = loss
                if prox:
                    total = total + mu / 2 * sum(((params[k] - anchor[k]) ** 2).sum() for k in params)
                return total, loss.detach()
            in_dims = (0, 0, 0, 0, None, None)
            self._grad_fns[key] = vmap(grad(loss_fn, has_aux=True), in_dims=in_dims)
        return self._grad_fns[key]

    def _train(self, model: nn.Module, weights: Tensor, data: ClientData, plan: RoundPlan,
               config: FedConfig, out: Tensor | None) -> tuple[Tensor, Tensor]:
        m = len(plan.clients)
        load_flat_state(model, weights)
        model.train()
        start = {n: p.detach() for n, p in model.named_parameters()}
        n_params = sum(p.numel() for p in start.values())
        # Clients train in chunks that fit the memory budget, in place inside the output: each
        # parameter is a view into a chunk's rows, and the rows become the updates at the end.
        updates = _output(out, m, weights)  # (M, P)
        updates[:, n_params:] = 0  # floating buffers: a vectorizable model never changes them
        losses = torch.empty(m, dtype=torch.float64)
        per_client = 4 * (n_params * (3 if config.momentum else 2) + config.batch_size * data.x[0, 0].numel())
        chunk = max(1, self.chunk_bytes // per_client)
        for lo in range(0, m, chunk):
            rows = slice(lo, min(lo + chunk, m))
            losses[rows] = self._train_chunk(model, start, weights[:n_params], updates[rows, :n_params], data,
                                             plan, rows, config)
        return updates, losses

    def _train_chunk(self, model: nn.Module, start: dict[str, Tensor], weights: Tensor, flat: Tensor,
                     data: ClientData, plan: RoundPlan, rows: slice, config: FedConfig) -> Tensor:
        """Local training of plan.clients[rows], in place in ``flat`` (C, P); returns mean losses (C,)."""
        m = len(flat)
        flat.copy_(weights.expand_as(flat))
        params, offset = {}, 0
        for name, p in start.items():
            params[name] = flat[:, offset:offset + p.numel()].view(m, *p.shape)
            offset += p.numel()
        buffers = {n: torch.zeros_like(p) for n, p in params.items()} if config.momentum else {}
        grad_fn = self._grad_fn(model, prox=config.mu > 0)
        counts = plan.counts[rows]  # (C,)
        n_max = int(counts.max())
        first_row = (plan.clients[rows] * data.x.shape[1])[:, None]  # (C, 1) each client's first row in x_rows
        x_rows = data.x.view(-1, *data.x.shape[2:])  # (N * n_max, ...)
        y_rows = data.y.view(-1)
        loss_sum = torch.zeros(m, dtype=torch.float64)
        steps = torch.zeros(m, dtype=torch.float64)
        first = True
        for order in plan.orders:
            for lo in range(0, n_max, config.batch_size):
                hi = min(lo + config.batch_size, n_max)
                pos = order[rows, lo:hi]  # (C, b) sample positions of this step
                mask = (torch.arange(lo, hi) < counts[:, None]).to(data.x.dtype)  # (C, b) real samples
                active = counts > lo  # (C,) clients with a batch at this step
                idx = (first_row + pos).view(-1)
                x = self._gather(x_rows, idx).view(m, hi - lo, *data.shape)  # (C, b, ...)
                y = y_rows[idx].view(m, hi - lo)  # (C, b)
                grads, loss = grad_fn(params, x, y, mask, start, config.mu)
                loss_sum += torch.where(active, loss.double(), 0.0)
                steps += active.double()
                _sgd(params, grads, buffers, active, first, config)
                first = False
        flat.sub_(weights)  # the updates
        return loss_sum / steps.clamp(min=1)


def _sgd(params: dict[str, Tensor], grads: dict[str, Tensor], buffers: dict[str, Tensor], active: Tensor,
         first: bool, config: FedConfig) -> None:
    """torch.optim.SGD's step (weight decay, then momentum whose buffer starts as the first
    gradient), in place, for the active clients only; one fused pass where possible.

    Every training client has a batch at the first step, so "first" is the same for all."""
    everyone = bool(active.all())
    for name, p in params.items():
        g = grads[name]
        if config.weight_decay:
            g = g.add(p, alpha=config.weight_decay)
        mask = None if everyone else active.view((-1,) + (1,) * (p.dim() - 1))
        if config.momentum:
            buf = buffers[name]
            if first:
                buf.copy_(g)
            elif mask is None:
                buf.mul_(config.momentum).add_(g)
            else:
                buf.copy_(torch.where(mask, buf * config.momentum + g, buf))
            g = buf
        if mask is None:
            p.sub_(g, alpha=config.lr)
        else:
            p.addcmul_(g, mask.to(p.dtype), value=-config.lr)


def _output(out: Tensor | None, m: int, weights: Tensor) -> Tensor:
    if out is None:
        return torch.empty(m, len(weights), dtype=weights.dtype)
    if out.shape != (m, len(weights)) or out.dtype != weights.dtype:
        raise ValueError(f"out must be ({m}, {len(weights)}) {weights.dtype}, got {tuple(out.shape)} {out.dtype}")
    return out


EXECUTORS = {"sequential": SequentialExecutor, "vectorized": VectorizedExecutor}
