"""Local training of a round's clients: a sequential reference and a vectorized executor.

Both run, for every training client, ``local_epochs`` passes of SGD (momentum, weight decay,
FedProx term) on the configured loss (``FedConfig.loss``) over its data in the order the round
plan fixed, starting from the weights that client received, and return the clients' updates
(new weights minus the weights each received) as one (M, P) tensor. The starting weights are
(P,) when every client received the same, or (M, P), one row per training client in plan order.
Parameters with ``requires_grad=False`` do not move.

The vectorized executor does all clients at once with ``torch.func`` (``functional_call`` and
``vmap`` over stacked weights, per-client batches stacked) and gives the same numbers; a model
it cannot run exactly falls back to the sequential reference with one warning that says why,
and ``executor.ran`` names the executor that actually trained.

With ``FedConfig.dp_max_grad_norm > 0`` every local step is per-sample DP-SGD (Abadi et al.,
"Deep learning with differential privacy", 2016): the sequential reference runs Opacus itself
(``GradSampleModule`` and ``DPOptimizer`` around each client's SGD); the vectorized executor
computes every client's per-sample gradient norms in the same one pass (by hand for plain MLPs,
``vmap`` over clients and over samples otherwise), clips with Opacus's factor, adds the noise
from the caller's generator and divides by the batch size, as ``DPOptimizer`` does.
"""
from __future__ import annotations

import warnings
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from toolkit import validate
from toolkit.federated.batched import BatchedMLP
from toolkit.federated.clients import ClientData, RoundPlan
from toolkit.federated.config import LOSSES, FedConfig
from toolkit.federated.dp_steps import (check_generator, clipped_grad_fn, noise_and_scale, opacus_module,
                                        opacus_optimizer)
from toolkit.parties import flat_state, load_flat_state


class Executor(Protocol):
    name: str   # what was asked for
    ran: str | None  # what trained the last call ("sequential" after a fallback); None before any

    def train(self, model: nn.Module, start: Tensor, data: ClientData, plan: RoundPlan,
              config: FedConfig, out: Tensor | None = None, *,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Returns (updates (M, P) relative to each client's start, mean training loss per client
        (M,)) and leaves ``model`` as it found it; ``start`` is (P,) or (M, P); writes the updates
        into ``out`` when given (a buffer the caller reuses between rounds); ``generator`` draws
        the per-sample DP-SGD noise (required when ``config.dp_noise_multiplier > 0``)."""


class SequentialExecutor:
    """The reference: one client after another, each with a fresh ``torch.optim.SGD``."""

    name = "sequential"

    def __init__(self) -> None:
        self.ran: str | None = None

    @classmethod
    def from_config(cls, config: FedConfig) -> SequentialExecutor:
        return cls()

    def train(self, model: nn.Module, start: Tensor, data: ClientData, plan: RoundPlan,
              config: FedConfig, out: Tensor | None = None, *,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        check_generator(config, generator)
        if config.per_sample_dp:
            with opacus_module(model) as net:  # the reference per-sample DP-SGD: Opacus itself
                return self._train(net, model, start, data, plan, config, out, generator)
        return self._train(model, model, start, data, plan, config, out, generator)

    def _train(self, net: nn.Module, model: nn.Module, start: Tensor, data: ClientData, plan: RoundPlan,
               config: FedConfig, out: Tensor | None, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """``net`` is ``model``, or Opacus's GradSampleModule around it for per-sample DP-SGD."""
        before = flat_state(model)
        m = len(plan.clients)
        _check_start(start, m, len(before))
        updates = _output(out, m, before)
        losses = torch.zeros(m, dtype=torch.float64)
        per_sample = LOSSES[config.loss].per_sample
        model.train()
        for row, (client, count) in enumerate(zip(plan.clients.tolist(), plan.counts.tolist())):
            received = start if start.dim() == 1 else start[row]
            load_flat_state(model, received)
            trainable = [p for p in model.parameters() if p.requires_grad]
            anchor = [p.detach().clone() for p in trainable] if config.mu else []
            opt = torch.optim.SGD(trainable, lr=config.lr, momentum=config.momentum,
                                  weight_decay=config.weight_decay)
            if config.per_sample_dp:
                opt = opacus_optimizer(opt, config, generator)
            total, steps = 0.0, 0
            for order in plan.orders:
                for batch in order[row, :count].split(config.batch_size):
                    opt.zero_grad(set_to_none=True)
                    loss = per_sample(net(data.x[client, batch]), data.y[client, batch]).mean()
                    total += float(loss.detach())
                    steps += 1
                    if config.mu:
                        loss = loss + config.mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(trainable, anchor))
                    loss.backward()
                    opt.step()
            updates[row] = flat_state(model) - received
            losses[row] = total / steps
        load_flat_state(model, before)
        self.ran = self.name
        return updates, losses


def unsupported(model: nn.Module, data: ClientData | None = None, config: FedConfig | None = None) -> str | None:
    """Why ``model`` cannot be trained per client under ``vmap`` with the sequential reference's
    numbers, or None. With ``data`` and ``config``, BatchNorm without running statistics is
    accepted when no padding ever enters a batch (every client's sample count is a multiple of
    the batch size or the largest count)."""
    for name, module in model.named_modules():
        label = f"{name or 'the model'} ({type(module).__name__})"
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            return f"{label} keeps running statistics, per-client state that vmap cannot update in place"
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return f"{label} draws random masks that would differ from the sequential reference"
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if data is None or config is None:
                return f"{label} normalizes with batch statistics, which padded batches would change"
            counts = data.counts
            partial = ((counts % config.batch_size != 0) & (counts != counts.max())).nonzero().flatten()
            if len(partial):
                c = int(partial[0])
                return (f"{label} normalizes with batch statistics, and client:{c}'s {int(counts[c])} samples "
                        f"leave a partial batch of {int(counts[c]) % config.batch_size} that the vectorized "
                        f"pass pads to the others' batch (the padding would enter the statistics)")
    return None


class VectorizedExecutor:
    """All training clients of a round at once: ``vmap(grad(loss))`` over stacked weights.

    Clients with fewer samples than others sit out the steps they have no batch for (their
    weights and momentum do not move), so each client sees exactly the batches of the
    sequential reference. Models it cannot run exactly (BatchNorm with running statistics,
    Dropout modules, BatchNorm batch statistics over padded batches, anything ``vmap`` refuses
    such as functional dropout or ``.item()``) fall back to :class:`SequentialExecutor` with
    one warning that says why; ``ran`` then says ``"sequential"`` and ``fallback`` the reason.

    Args:
        chunk_bytes: working memory per pass (weights, gradients and a batch per client); more
            clients than fit are trained in several passes (``FedConfig.chunk_bytes``).
        hand_written_mlp: use :class:`~toolkit.federated.batched.BatchedMLP` for plain MLPs
            (all parameters trained, a loss it implements) instead of ``vmap``
            (``FedConfig.hand_written_mlp``).
    """

    name = "vectorized"

    def __init__(self, chunk_bytes: int = 64 * 2**20, *, hand_written_mlp: bool = True) -> None:
        self.chunk_bytes = validate.positive_int("chunk_bytes", chunk_bytes)
        self.hand_written_mlp = validate.boolean("hand_written_mlp", hand_written_mlp)
        self.ran: str | None = None
        self.fallback: str | None = None  # why the last call ran sequentially, or None
        self.path: str | None = None  # how the last vectorized pass got gradients: "hand-written MLP" or "vmap"
        self.passes = 0  # chunks of clients the last vectorized call trained in (1: all at once)
        self._reasons: dict[tuple, str | None] = {}  # (model, data, batch size) -> why not vectorized
        self._sequential = SequentialExecutor()
        self._grad_fns: dict[tuple, tuple[str, object]] = {}  # -> (path, gradient function)
        self._batch: Tensor | None = None  # reused gather buffer: big fresh allocations page-fault

    @classmethod
    def from_config(cls, config: FedConfig) -> VectorizedExecutor:
        return cls(config.chunk_bytes, hand_written_mlp=config.hand_written_mlp)

    def train(self, model: nn.Module, start: Tensor, data: ClientData, plan: RoundPlan,
              config: FedConfig, out: Tensor | None = None, *,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        check_generator(config, generator)
        key = (id(model), id(data), config.batch_size)
        if key not in self._reasons:
            self._reasons[key] = unsupported(model, data, config)
            if self._reasons[key] is not None:
                self._warn(self._reasons[key])  # type: ignore[arg-type]
        if self._reasons[key] is None:
            try:
                result = self._train(model, start, data, plan, config, out, generator)
                self.ran, self.fallback = self.name, None
                return result
            except (RuntimeError, NotImplementedError) as err:  # vmap cannot run this model
                reason = f"vmap cannot run it ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
                self._reasons[key] = reason
                self._warn(reason)
        result = self._sequential.train(model, start, data, plan, config, out, generator=generator)
        self.ran, self.fallback, self.path = self._sequential.name, self._reasons[key], None
        return result

    @staticmethod
    def _warn(reason: str) -> None:
        warnings.warn(f"the vectorized executor cannot train this model exactly: {reason}; "
                      f"falling back to the sequential executor", UserWarning, stacklevel=5)

    def _gather(self, rows: Tensor, idx: Tensor) -> Tensor:
        """``rows[idx]`` written into a buffer kept between steps (a step's graph is gone by the next)."""
        size = len(idx) * rows[0].numel()
        if self._batch is None or self._batch.numel() < size or self._batch.dtype != rows.dtype:
            self._batch = torch.empty(size, dtype=rows.dtype)
        out = self._batch[:size].view(len(idx), *rows.shape[1:])
        return torch.index_select(rows, 0, idx, out=out)

    def _grad_fn(self, model: nn.Module, config: FedConfig, per_client_anchor: bool, trainable: tuple[str, ...]):
        """``fn(params, fixed, x, y, mask, anchor, mu) -> (gradients, loss per client)``; sets ``path``.
        Under per-sample DP-SGD the gradients are the sums of the clipped per-sample gradients."""
        prox = config.mu > 0
        key = (id(model), prox, per_client_anchor and prox, config.loss, trainable, self.hand_written_mlp,
               config.dp_max_grad_norm)
        if key not in self._grad_fns:
            self._grad_fns[key] = (clipped_grad_fn(model, config, self.hand_written_mlp) if config.per_sample_dp
                                   else self._make_grad_fn(model, config, per_client_anchor and prox))
        self.path, fn = self._grad_fns[key]
        return fn

    def _make_grad_fn(self, model: nn.Module, config: FedConfig, per_client_anchor: bool) -> tuple[str, object]:
        if self.hand_written_mlp and BatchedMLP.supports(model, config.loss):
            mlp = BatchedMLP(model, config.loss)
            return "hand-written MLP", lambda params, fixed, x, y, mask, anchor, mu: mlp(params, x, y, mask, anchor, mu)
        prox = config.mu > 0
        per_sample = LOSSES[config.loss].per_sample

        def loss_fn(params, fixed, x, y, mask, anchor, mu):
            out = functional_call(model, {**params, **fixed}, (x,))  # (B, ...) outputs
            loss = (per_sample(out, y) * mask).sum() / mask.sum().clamp(min=1)
            total = loss
            if prox:
                total = total + mu / 2 * sum(((params[k] - anchor[k]) ** 2).sum() for k in params)
            return total, loss.detach()

        in_dims = (0, 0, 0, 0, 0, 0 if per_client_anchor else None, None)
        return "vmap", vmap(grad(loss_fn, has_aux=True), in_dims=in_dims)

    def _train(self, model: nn.Module, start: Tensor, data: ClientData, plan: RoundPlan,
               config: FedConfig, out: Tensor | None, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        layout = _layout(model)
        p = sum(shape.numel() for _, shape, _ in layout)
        m = len(plan.clients)
        _check_start(start, m, p)
        dtype = flat_state(model).dtype
        # Clients train in chunks that fit the memory budget, in place inside the output: each
        # state tensor is a view into a chunk's rows, and the rows become the updates at the end.
        updates = _output(out, m, torch.empty(p, dtype=dtype))  # (M, P)
        losses = torch.empty(m, dtype=torch.float64)
        n_train = sum(shape.numel() for _, shape, trains in layout if trains)
        per_client = (updates.element_size() * (p + n_train * (2 if config.momentum else 1))
                      + data.x.element_size() * config.batch_size * data.x[0, 0].numel())
        if config.per_sample_dp and not (self.hand_written_mlp and BatchedMLP.supports(model, config.loss)):
            per_client += updates.element_size() * config.batch_size * n_train  # vmap's per-sample gradients
        chunk = max(1, self.chunk_bytes // per_client)
        self.passes = -(-m // chunk)
        for lo in range(0, m, chunk):
            rows = slice(lo, min(lo + chunk, m))
            losses[rows] = self._train_chunk(model, layout, start if start.dim() == 1 else start[rows],
                                             updates[rows], data, plan, rows, config, generator)
        return updates, losses

    def _train_chunk(self, model: nn.Module, layout: list, start: Tensor, flat: Tensor, data: ClientData,
                     plan: RoundPlan, rows: slice, config: FedConfig, generator: torch.Generator | None) -> Tensor:
        """Local training of plan.clients[rows] from ``start`` ((P,) or (C, P)), in place in
        ``flat`` (C, P), which ends holding the updates; returns mean losses (C,)."""
        c = len(flat)
        flat.copy_(start.expand_as(flat))
        params, fixed, anchor, offset = {}, {}, {}, 0
        for name, shape, trains in layout:
            view = flat[:, offset:offset + shape.numel()].view(c, *shape)
            (params if trains else fixed)[name] = view
            if trains and config.mu:
                anchor[name] = start[..., offset:offset + shape.numel()].view(*start.shape[:-1], *shape)
            offset += shape.numel()
        buffers = {n: torch.zeros_like(v) for n, v in params.items()} if config.momentum else {}
        grad_fn = self._grad_fn(model, config, start.dim() == 2, tuple(params))
        counts = plan.counts[rows]  # (C,)
        n_max = int(counts.max())
        first_row = (plan.clients[rows] * data.x.shape[1])[:, None]  # (C, 1) each client's first row in x_rows
        x_rows = data.x.view(-1, *data.x.shape[2:])  # (N * n_max, ...)
        y_rows = data.y.view(-1, *data.y.shape[2:])  # (N * n_max[, ...])
        loss_sum = torch.zeros(c, dtype=torch.float64)
        steps = torch.zeros(c, dtype=torch.float64)
        first = True
        for order in plan.orders:
            for lo in range(0, n_max, config.batch_size):
                hi = min(lo + config.batch_size, n_max)
                pos = order[rows, lo:hi]  # (C, b) sample positions of this step
                mask = (torch.arange(lo, hi) < counts[:, None]).to(flat.dtype)  # (C, b) real samples
                active = counts > lo  # (C,) clients with a batch at this step
                idx = (first_row + pos).view(-1)
                x = self._gather(x_rows, idx).view(c, hi - lo, *data.shape)  # (C, b, ...)
                y = y_rows[idx].view(c, hi - lo, *data.y.shape[2:])  # (C, b[, ...])
                grads, loss = grad_fn(params, fixed, x, y, mask, anchor, config.mu)
                if config.per_sample_dp:
                    noise_and_scale(grads, config, generator)
                loss_sum += torch.where(active, loss.double(), 0.0)
                steps += active.double()
                _sgd(params, grads, buffers, active, first, config)
                first = False
        flat.sub_(start)  # the updates
        return loss_sum / steps.clamp(min=1)


def _layout(model: nn.Module) -> list[tuple[str, torch.Size, bool]]:
    """(name, shape, trains) of every floating parameter and buffer, in ``flat_state`` order."""
    params = [(n, t.shape, t.requires_grad) for n, t in model.named_parameters() if t.is_floating_point()]
    buffers = [(n, t.shape, False) for n, t in model.named_buffers() if t.is_floating_point()]
    return params + buffers


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


def _check_start(start: Tensor, m: int, p: int) -> None:
    if not isinstance(start, Tensor) or start.shape not in ((p,), (m, p)):
        shape = tuple(start.shape) if isinstance(start, Tensor) else type(start).__name__
        raise ValueError(f"start weights must be ({p},) for everyone or ({m}, {p}), one row per training "
                         f"client, got {shape}")


def _output(out: Tensor | None, m: int, like: Tensor) -> Tensor:
    if out is None:
        return torch.empty(m, len(like), dtype=like.dtype)
    if out.shape != (m, len(like)) or out.dtype != like.dtype:
        raise ValueError(f"out must be ({m}, {len(like)}) {like.dtype}, got {tuple(out.shape)} {out.dtype}")
    return out


EXECUTORS = {"sequential": SequentialExecutor, "vectorized": VectorizedExecutor}


def make_executor(config: FedConfig) -> SequentialExecutor | VectorizedExecutor:
    """The executor ``config.executor`` names, built with the config's options."""
    if config.executor not in EXECUTORS:
        raise ValueError(f"unknown executor {config.executor!r}; choose one of {sorted(EXECUTORS)}")
    return EXECUTORS[config.executor].from_config(config)
