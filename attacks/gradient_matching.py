"""The gradient-matching core shared by DLG, iDLG and Inverting Gradients, on both sides of LeakLab.

An honest-but-curious party holds a model (it chose the weights) and observed a gradient that
some private batch produced: a client's federated update (kind ``"update"``: weights after local
SGD minus the weights the server sent), or a split-learning cut-layer gradient (kind
``"gradients"``: the loss's gradient with respect to the activations that crossed). It optimizes
dummy inputs (and soft labels) until the gradients they produce match the observed ones.

Restarts, and independent problems, are rows of one batched optimization: ``torch.func.vmap``
over a leading row dimension, one backward pass for all rows (no Python loop of restarts).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from attacks.base import describe, read, select
from toolkit.progress import progress
from toolkit.wire import Transfer

Params = dict[str, Tensor]


# -- reading what the server received ----------------------------------------------------------
@dataclass
class Update:
    """One client's update as the attacker reads it.

    ``gradient`` is gradient-like for every parameter: the gradient itself, or ``-delta / lr`` for
    a weight delta (exactly the gradient after one SGD step; the sum of the local gradients after
    several). ``delta`` is the raw weight delta (None for a gradient), ``weights`` the parameters
    the client started from.
    """

    step: int
    sender: str
    gradient: Params
    weights: Params
    delta: Params | None


def check_model(model: nn.Module, attack: str) -> None:
    """Refuse models whose gradients depend on statistics the attacker does not have."""
    bn = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if bn:
        raise ValueError(f"{attack}: BatchNorm layers {bn} are in train mode, so the client's gradients depend on "
                         f"its batch statistics, which the attacker does not have; attack a model without "
                         f"BatchNorm, or call model.eval() if the clients trained with running statistics")


def _unflatten(flat: Tensor, model: nn.Module, what: str) -> Params:
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    n_params = sum(p.numel() for p in params)
    n_state = n_params + sum(b.numel() for b in model.buffers() if b.is_floating_point())
    flat = flat.detach().reshape(-1).float()
    if flat.numel() not in (n_params, n_state):
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        raise ValueError(f"mismatched parameter shapes: {what} holds {flat.numel()} values but the model has "
                         f"{n_params} parameters ({n_state} with buffers): {shapes}")
    out, offset = {}, 0
    for name, p in zip(names, params):
        out[name] = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    return out


WEIGHTS = ("sent", "model")


def weights_source(weights: str) -> str:
    """``weights`` if it is one of :data:`WEIGHTS` (where a server attack reads the weights the
    client started from); a ValueError otherwise."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be 'sent' (the 'weights' transfers the server sent, read from the "
                         f"transcript) or 'model' (the model's current weights), got {weights!r}")
    return weights


WEIGHTS_THREAT = {
    "sent": "the weights it sent, read from the transcript's 'weights' transfers",
    "model": "its model's current weights (weights='model': the update was computed at them)",
}


def read_updates(observed: Sequence[Transfer], model: nn.Module, *, lr: float | None,
                 attack: str, weights: str = "sent") -> list[Update]:
    """The clients' updates in ``observed`` (kind ``"update"``, or flat ``"gradients"``), each with
    the weights that client started from.

    ``weights="sent"``: the ``"weights"`` transfer the update's receiver (the server) sent that client
    in that step, from ``observed`` (e.g. ``wire.observed(sender="server", kind="weights")``); a
    ValueError names the updates without one. ``weights="model"``: the model's current parameters
    (the server's own copy, right when the update was computed at them). Every tensor read is
    checked: floating point, finite, one value per parameter of ``model``.
    """
    weights = weights_source(weights)
    observed = list(observed)
    chosen = [t for t in observed if t.kind in ("update", "gradients")]
    if not chosen:
        select(observed, "update", attack)  # raises, naming what the transcript holds
    sent = {(t.step, t.sender, t.receiver): t for t in observed if t.kind == "weights"}
    if weights == "sent":
        missing = [f"{t.sender} at step {t.step}" for t in chosen if (t.step, t.receiver, t.sender) not in sent]
        if missing:
            raise ValueError(f"{attack}: no 'weights' transfer to {', '.join(missing[:3])}"
                             f"{' ...' if len(missing) > 3 else ''} in the transcript: add what the server sent "
                             f"(wire.observed(sender='server', kind='weights')), or attack at the model's current "
                             f"weights with weights='model' if the update was computed at them")
    current = {n: p.detach().float() for n, p in model.named_parameters()}
    out = []
    for t in chosen:
        values = _unflatten(read(t, attack), model, f"{describe(t)}")
        if weights == "sent":
            w = sent[(t.step, t.receiver, t.sender)]
            start = _unflatten(read(w, attack), model, describe(w))
        else:
            start = current
        if t.kind == "update":
            scale = -1.0 / lr if lr is not None else -1.0
            out.append(Update(t.step, t.sender, {k: v * scale for k, v in values.items()}, start, values))
        else:
            out.append(Update(t.step, t.sender, values, start, None))
    return out


def last_layer(params: Params) -> tuple[str, str | None]:
    """The last 2-D parameter (the last Linear's weight) and its bias (the next parameter, when 1-D
    with one entry per row)."""
    names = list(params)
    matrices = [i for i, n in enumerate(names) if params[n].dim() == 2]
    if not matrices:
        raise ValueError("label counts need a last Linear layer (a 2-D parameter); the model has none")
    i = matrices[-1]
    weight = names[i]
    nxt = names[i + 1] if i + 1 < len(names) else None
    if nxt is not None and params[nxt].dim() == 1 and len(params[nxt]) == len(params[weight]):
        return weight, nxt
    return weight, None


# -- distances and priors ---------------------------------------------------------------------
def l2_distance(g: Sequence[Tensor], target: Sequence[Tensor]) -> Tensor:
    """Sum of squared differences over every tensor (Zhu et al., 2019)."""
    return sum(((a - b) ** 2).sum() for a, b in zip(g, target))


def cosine_distance(g: Sequence[Tensor], target: Sequence[Tensor]) -> Tensor:
    """1 - cosine similarity over all tensors together (Geiping et al., 2020), computed as half the
    squared distance of the unit vectors: the same value, without float32 cancellation near 0."""
    gn = torch.sqrt(sum((a * a).sum() for a in g) + 1e-30)
    tn = torch.sqrt(sum((b * b).sum() for b in target) + 1e-30)
    return 0.5 * sum(((a / gn - b / tn) ** 2).sum() for a, b in zip(g, target))


DISTANCES: dict[str, Callable[[Sequence[Tensor], Sequence[Tensor]], Tensor]] = {
    "l2": l2_distance,
    "cosine": cosine_distance,
}


def tv_l1(x: Tensor) -> Tensor:
    """Anisotropic total variation, mean |dx| + mean |dy| (the prior of Geiping et al., 2020)."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy with integer labels (B,) or a soft label distribution (B, K), batch mean."""
    if target.dim() == 1:
        return F.cross_entropy(logits, target)
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()


# -- what the client computed, as a function the attacker can differentiate ------------------------
def parameter_gradients(model: nn.Module, weights: Params, x: Tensor, y: Tensor, *,
                        local_steps: int = 1, lr: float | None = None, batch_size: int | None = None,
                        buffers: Params | None = None) -> tuple[Tensor, ...]:
    """The client's gradient (``local_steps == 1``), or its weight delta after ``local_steps`` SGD
    steps of ``lr`` over consecutive batches of ``batch_size`` (FedAvg; Geiping et al., 2020, sec. 5),
    differentiable in ``x`` and ``y``. Returns one tensor per parameter, in ``weights`` order."""
    def loss(p: Params, xb: Tensor, yb: Tensor) -> Tensor:
        return soft_cross_entropy(functional_call(model, (p, buffers or {}), (xb,)), yb)

    if local_steps == 1:
        return tuple(grad(loss)(weights, x, y).values())
    if lr is None:
        raise ValueError("simulating several local steps needs the clients' learning rate lr")
    n = len(x)
    size = batch_size or n
    p, step = dict(weights), 0
    while step < local_steps:
        for lo in range(0, n, size):
            if step == local_steps:
                break
            g = grad(loss)(p, x[lo:lo + size], y[lo:lo + size])
            p = {k: p[k] - lr * g[k] for k in p}
            step += 1
    return tuple(p[k] - weights[k] for k in weights)


def input_gradient(model: nn.Module, weights: Params, z: Tensor, y: Tensor, *,
                   buffers: Params | None = None) -> tuple[Tensor, ...]:
    """Split learning: the gradient of the loss with respect to the tensor the model part takes
    (the cut-layer activations), of the batch-mean loss as SplitNN sends it back."""
    def loss(zb: Tensor, yb: Tensor) -> Tensor:
        return soft_cross_entropy(functional_call(model, (weights, buffers or {}), (zb,)), yb)

    return (grad(loss)(z, y),)


# -- the batched optimization ---------------------------------------------------------------------
@dataclass
class Optimized:
    """Best variables per row (row order as given) and the objective per step (best row)."""

    variables: list[Tensor]
    objective: Tensor   # (R,) best objective per row
    history: list[float]
    steps: int


def optimize(objective: Callable[..., Tensor], variables: list[Tensor], *, adam_steps: int = 0,
             lr: float = 0.1, signed: bool = True, box: bool = False, lbfgs_steps: int = 0,
             show_progress: bool = False, desc: str = "gradient matching") -> Optimized:
    """Minimize ``objective(*row_variables) -> scalar`` for every row of ``variables``
    at once (vmap over dim 0): first ``adam_steps`` of Adam (hard-signed gradients and step decay
    at 3/8, 5/8, 7/8 as Geiping et al., 2020; pixels clamped to [0, 1] when ``box``), then
    ``lbfgs_steps`` outer steps of L-BFGS with a strong-Wolfe line search (20 iterations each).

    Rows are independent problems (restarts, images): Adam treats them exactly as separate runs;
    L-BFGS minimizes their sum, whose minimum is every row's. The best iterate of every row is
    kept; a non-finite objective stops the phase and restores it. KeyboardInterrupt returns the
    best so far.
    """
    batched = vmap(objective)
    variables = [v.detach().clone().requires_grad_(True) for v in variables]
    best_obj = torch.full((len(variables[0]),), math.inf, dtype=variables[0].dtype)
    best = [v.detach().clone() for v in variables]
    history: list[float] = []

    def evaluate() -> Tensor:
        values = batched(*variables)
        with torch.no_grad():
            better = values.detach() < best_obj
            if bool(better.any()):
                best_obj[better] = values.detach()[better]
                for b, v in zip(best, variables):
                    b[better] = v.detach()[better]
        return values

    steps = 0
    try:
        if adam_steps:
            opt = torch.optim.Adam(variables, lr=lr)
            milestones = sorted({max(1, int(adam_steps * f)) for f in (3 / 8, 5 / 8, 7 / 8)})
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
            for _ in progress(range(adam_steps), show=show_progress, desc=f"{desc} (Adam)"):
                opt.zero_grad(set_to_none=True)
                values = evaluate()
                if not bool(torch.isfinite(values).all()):
                    break
                values.sum().backward()
                if signed:
                    for v in variables:
                        v.grad.sign_()
                opt.step()
                sched.step()
                if box:
                    with torch.no_grad():
                        variables[0].clamp_(0, 1)
                history.append(float(best_obj.min()))
                steps += 1
        if lbfgs_steps:
            with torch.no_grad():  # continue from the best iterate of the first phase
                for b, v in zip(best, variables):
                    if bool(torch.isfinite(best_obj).all()):
                        v.copy_(b)
            opt = torch.optim.LBFGS(variables, lr=1.0, max_iter=20, history_size=100,
                                    line_search_fn="strong_wolfe", tolerance_grad=1e-12, tolerance_change=1e-16)

            def closure() -> Tensor:
                opt.zero_grad(set_to_none=True)
                total = evaluate().sum()
                if torch.isfinite(total):
                    total.backward()
                else:  # stop the line search: a zero gradient ends the step
                    for v in variables:
                        v.grad = torch.zeros_like(v)
                return total.detach() if torch.isfinite(total) else torch.tensor(math.inf)

            for _ in progress(range(lbfgs_steps), show=show_progress, desc=f"{desc} (L-BFGS)"):
                before = float(best_obj.sum())
                total = opt.step(closure)
                history.append(float(best_obj.min()))
                steps += 1
                if not math.isfinite(float(total)) or float(best_obj.sum()) >= before:
                    break  # diverged, or no row improved: converged
    except KeyboardInterrupt:
        pass
    if box:
        best[0].clamp_(0, 1)
    return Optimized(best, best_obj, history, steps)
