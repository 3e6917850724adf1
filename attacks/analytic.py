"""Analytic (closed-form) attacks on federated updates: batch label counts from the last layer's
gradient, and exact input recovery from a fully connected layer, one sample per bin of a
malicious imprint block.

Both read a transcript of the updates the server received (kind ``"update"``, or flat
``"gradients"``) with :func:`attacks.gradient_matching.read_updates`, at the weights the server sent
(``weights="sent"``, from the transcript) or at its model's current weights (``weights="model"``),
and assume the update is one SGD step of a batch-mean cross-entropy loss (FedAvg with one local
step: the client's batch size at least its sample count, one local epoch).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from attacks.base import Attack, AttackResult, check_generator, non_negative_int, positive, positive_int, seeded
from attacks.gradient_matching import WEIGHTS_THREAT, Params, check_model, last_layer, read_updates, weights_source
from toolkit.wire import Transfer


# -- label counts ---------------------------------------------------------------------------------
def _largest_remainder(real: Tensor, total: int) -> Tensor:
    """Non-negative integers summing to ``total``, closest to ``real`` (K,) by largest remainder."""
    r = real.double().clamp(min=0)
    r = r * (total / r.sum()) if float(r.sum()) > 0 else torch.full_like(r, total / len(r))
    counts = r.floor().long()
    missing = total - int(counts.sum())
    if missing > 0:
        counts[(r - r.floor()).argsort(descending=True)[:missing]] += 1
    return counts


def label_counts(gradient: Params, model: nn.Module, weights: Params, *, batch_size: int,
                 input_shape: tuple, generator: torch.Generator | None = None, queries: int = 256,
                 rounds: int = 10) -> Tensor:
    """How many samples of each class were in the batch that produced ``gradient`` (K,) int64.

    For a batch-mean cross-entropy and a last Linear layer with bias, ``dL/db_c = mean_n(p_nc -
    y_nc)``, so ``count_c = B (pbar_c - db_c)`` (the "LLG" family: Wainakh et al., "User-level label
    leakage from gradients in federated learning", 2022). The mean softmax ``pbar`` is estimated by
    running the model at ``weights`` on ``queries`` uniform [0, 1] dummy inputs, then made
    self-consistent with the counts: the rows of the last weight gradient of the classes counted
    absent are ``dW_c = sum_n p_nc h_n / B``, so ``sum_c dW_c / sum_c db_c`` estimates the batch's
    mean penultimate activation ``h``; the dummies' activations are shifted to that mean, ``pbar``
    recomputed, and a local search (up to ``rounds`` moves of one sample between two classes) keeps
    the counts that the estimate they induce reproduces best. The shift removes the bias of dummy
    inputs unlike the data, which matters for large weights (uniform(-0.5, 0.5) on a LeNet).

    Without a bias, the row sums of the weight gradient stand in for ``db`` (Geng et al., "Towards
    general deep leakage in federated learning", 2021): ``B sum_j dW_cj = sum_n p_nc s_n -
    sum_{y_n=c} s_n`` with ``s_n`` the row sum of sample n's penultimate activation, so ``count_c =
    B (mean(p_c s) - sum_j dW_cj) / mean(s)``, both means over the dummies. Counts are rounded to
    integers summing to ``batch_size`` (largest remainder). The dummies are drawn from
    ``generator`` (torch's global RNG when None).
    """
    batch_size = positive_int("batch_size", batch_size)
    queries = positive_int("queries", queries)
    rounds = non_negative_int("rounds", rounds)
    check_generator(generator)
    w_name, b_name = last_layer(weights)
    n_classes = len(weights[w_name])
    if batch_size > n_classes:
        warnings.warn(f"batch size {batch_size} exceeds the {n_classes} classes: label counts stay exact "
                      f"in principle, but per-sample labels cannot be told apart", UserWarning, stacklevel=2)
    layer = model.get_submodule(w_name.rpartition(".")[0])
    seen: list[Tensor] = []
    hook = layer.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().flatten(1)))
    try:
        dummy = torch.rand(queries, *input_shape, generator=generator)  # (Q, ...) uniform dummy inputs
        with torch.no_grad():
            functional_call(model, weights, (dummy,))
    finally:
        hook.remove()
    h = seen[-1].double()                       # (Q, H) penultimate activations of the dummies
    w = weights[w_name].double()                # (K, H)
    b = weights[b_name].double() if b_name else torch.zeros(n_classes, dtype=torch.float64)
    dw = gradient[w_name].double()              # (K, H)
    p = torch.softmax(h @ w.T + b, dim=-1)      # (Q, K)
    if b_name is None:
        s = h.sum(1)                            # (Q,) row sums
        real = batch_size * ((p * s[:, None]).mean(0) - dw.sum(1)) / s.mean()
        return _largest_remainder(real, batch_size)
    db = gradient[b_name].double()              # (K,)
    logits = h @ w.T + b                        # (Q, K)
    h_mean = h.mean(0)                          # (H,)

    def estimate(counts: Tensor) -> Tensor:     # (K,) real-valued counts, dummies shifted to the batch
        absent = counts == 0
        mass = db[absent].sum()
        shift = torch.zeros(n_classes, dtype=torch.float64)
        if bool(absent.any()) and float(mass) > 0:
            shift = (dw[absent].sum(0) / mass - h_mean) @ w.T  # (K,) the batch's mean activation, in logits
        return batch_size * (torch.softmax(logits + shift, dim=-1).mean(0) - db)

    def neighbours(counts: Tensor) -> list[Tensor]:  # one sample moved between two classes
        out = [counts]
        for i in range(n_classes):
            for j in (counts > 0).nonzero().flatten().tolist():
                if i != j:
                    c = counts.clone()
                    c[i] += 1
                    c[j] -= 1
                    out.append(c)
        return out

    counts = _largest_remainder(batch_size * (p.mean(0) - db), batch_size)
    for _ in range(rounds):  # local search for the self-consistent counts
        candidates = neighbours(counts)
        errors = torch.stack([(estimate(c) - c).abs().max() for c in candidates])
        best = candidates[int(errors.argmin())]
        if torch.equal(best, counts):
            break
        counts = best
    return counts


class LabelCounts(Attack):
    """Batch label counts from each client's update (see :func:`label_counts`); the labels come
    back sorted by class within each update.

    Args:
        model: the global model (the server's own architecture).
        input_shape: one input's shape, e.g. ``(1, 32, 32)``, for the dummy queries.
        batch_size: the clients' batch size (one local step: all of a client's samples).
        client_lr: the clients' learning rate, to turn a weight delta into a gradient.
        queries: dummy inputs for estimating the mean softmax output.
        weights: ``"sent"`` (the weights the server sent each client, from the transcript's
            ``"weights"`` transfers) or ``"model"`` (the model's current weights).

    Example:
        >>> attack = LabelCounts(model=models.mlp([64, 10]), input_shape=(1, 8, 8), batch_size=4,
        ...                      client_lr=0.1)  # doctest: +SKIP
        >>> attack.run(wire.observed(by="server") + wire.observed(kind="weights")).labels  # doctest: +SKIP
    """

    needs = "update"

    def __init__(self, *, model: nn.Module, input_shape: Sequence[int], batch_size: int,
                 client_lr: float | None = None, queries: int = 256, weights: str = "sent"):
        check_model(model, "LabelCounts")
        self.model = model
        self.input_shape = tuple(positive_int("input_shape entries", s) for s in input_shape)
        self.batch_size = positive_int("batch_size", batch_size)
        self.client_lr = None if client_lr is None else positive("client_lr", client_lr)
        self.queries = positive_int("queries", queries)
        self.weights = weights_source(weights)
        self.threat_model = (f"honest-but-curious server: knows the model, {WEIGHTS_THREAT[self.weights]}, and "
                             f"the clients' batch size and learning rate; reads only the clients' updates")
        w_name, _ = last_layer(dict(model.named_parameters()))
        with torch.no_grad():
            try:
                out = model(torch.zeros(1, *self.input_shape))
            except (RuntimeError, ValueError) as err:
                raise ValueError(f"LabelCounts: the model does not take inputs of shape {self.input_shape}: "
                                 f"{err}") from None
        if tuple(out.shape) != (1, len(dict(model.named_parameters())[w_name])):
            raise ValueError(f"LabelCounts: the model's output {tuple(out.shape[1:])} per sample is not its last "
                             f"Linear layer's {len(dict(model.named_parameters())[w_name])} class scores")

    def run(self, observed: Sequence[Transfer], *, show_progress: bool = False,
            generator: torch.Generator | None = None, max_steps: int | None = None) -> AttackResult:
        """The label counts of every update (``extras["counts"]``, (U, K)) and the labels they give;
        the dummy queries are drawn from ``generator`` (torch's global RNG when None)."""
        check_generator(generator)
        updates = read_updates(observed, self.model, lr=self.client_lr, attack="LabelCounts", weights=self.weights)
        if self.client_lr is None and any(u.delta is not None for u in updates):
            raise ValueError("LabelCounts: the transcript holds weight deltas (kind 'update'); counts need their "
                             "scale, so pass the clients' learning rate client_lr")
        counts = torch.stack([label_counts(u.gradient, self.model, u.weights, batch_size=self.batch_size,
                                           input_shape=self.input_shape, generator=generator,
                                           queries=self.queries) for u in updates])  # (U, K)
        classes = torch.arange(counts.shape[1])
        labels = torch.cat([classes.repeat_interleave(c) for c in counts])  # (U * B,)
        return AttackResult("label_counts", labels=labels, config=self.config(),
                            extras={"counts": counts, "senders": [u.sender for u in updates]})


# -- exact inputs from a fully connected layer -------------------------------------------------------
def imprint_block(input_shape: Sequence[int], n_bins: int, *, mean: float, std: float,
                  generator: torch.Generator | None = None) -> nn.Sequential:
    """The malicious block of "Robbing the Fed" (Fowl, Geiping, Czaja, Goldblum, Goldstein, 2022)
    that a server prepends to its model: Flatten -> Linear(d, k) measuring mean brightness with
    biases at the Gaussian(mean, std) quantiles (neuron i fires when brightness > c_i) -> ReLU ->
    Linear(k, d) with equal columns (every bin neuron gets the same backward signal) -> Unflatten.
    The columns' common direction is drawn from ``generator`` (torch's global RNG when None).
    """
    input_shape = tuple(positive_int("input_shape entries", s) for s in input_shape)
    n_bins = positive_int("n_bins", n_bins)
    std = positive("std", std)
    d = math.prod(input_shape)
    levels = torch.arange(1, n_bins + 1, dtype=torch.float64) / (n_bins + 1)
    cuts = mean + std * math.sqrt(2) * torch.erfinv(2 * levels - 1)  # (k,) Gaussian quantiles, ascending
    with seeded(generator):  # every parameter below is overwritten; only the column is random
        imprint, spread = nn.Linear(d, n_bins), nn.Linear(n_bins, d)
        column = torch.randn(d, 1)  # (d, 1): unit scale keeps the imprint gradients well above the float32
        # rounding of a FedAvg weight delta
    with torch.no_grad():
        imprint.weight.fill_(1.0 / d)
        imprint.bias.copy_(-cuts)
        spread.weight.copy_(column.expand(d, n_bins))
        spread.bias.zero_()
    return nn.Sequential(nn.Flatten(), imprint, nn.ReLU(), spread, nn.Unflatten(1, input_shape))


class AnalyticFC(Attack):
    """Exact inputs from the gradient of a fully connected layer with bias (Phong et al., "Privacy-
    preserving deep learning via additively homomorphic encryption", 2018; Geiping et al.,
    "Inverting gradients", 2020, sec. 3): ``dL/dW = delta x^T`` and ``dL/db = delta``, so for a
    batch of one ``x = sum_i db_i dW_i / sum_i db_i^2``.

    With ``bins`` (default: detected, a layer whose weights all equal ``1/d``, as
    :func:`imprint_block` builds), the layer's neurons are brightness bins (Fowl et al., "Robbing the
    Fed", 2022): sorted by threshold, ``x = (dW_i - dW_{i+1}) / (db_i - db_{i+1})`` recovers the
    sample alone in bin i; one reconstruction per non-empty bin (``|db_i - db_{i+1}|`` above
    ``tol`` times the largest such difference), exact when the bin holds one sample.

    Args:
        model: the global model. layer: the name of the nn.Linear to read (default the first).
        input_shape: reshape the recovered inputs to it (the layer's input size must match).
        weights: ``"sent"`` (the weights the server sent, from the transcript's ``"weights"``
            transfers; they place the bins) or ``"model"`` (the model's current weights).
    """

    needs = "update"

    def __init__(self, *, model: nn.Module, layer: str | None = None, input_shape: Sequence[int] | None = None,
                 bins: bool | None = None, tol: float = 1e-4, weights: str = "sent"):
        check_model(model, "AnalyticFC")
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if layer is None:
            if not linears:
                raise ValueError("AnalyticFC needs an nn.Linear layer; the model has none")
            layer = linears[0]
        modules = dict(model.named_modules())
        if layer not in modules or not isinstance(modules[layer], nn.Linear) or modules[layer].bias is None:
            raise ValueError(f"layer {layer!r} is not an nn.Linear with bias in the model; Linear layers: {linears}")
        self.model, self.layer = model, layer
        self.input_shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        if self.input_shape is not None and math.prod(self.input_shape) != modules[layer].in_features:
            raise ValueError(f"input_shape {self.input_shape} does not fit layer {layer!r}, which takes "
                             f"{modules[layer].in_features} features")
        if bins not in (None, True, False):
            raise ValueError(f"bins must be True, False or None (detect), got {bins!r}")
        self.bins = bins
        self.tol = positive("tol", tol)
        self.weights = weights_source(weights)
        self.threat_model = (f"server that chose the model (honest for one sample, malicious with imprint bins) "
                             f"and knows {WEIGHTS_THREAT[self.weights]}; reads only the clients' updates")

    def run(self, observed: Sequence[Transfer], *, show_progress: bool = False,
            generator: torch.Generator | None = None, max_steps: int | None = None) -> AttackResult:
        """Closed form: no random draw, ``generator`` is not used."""
        check_generator(generator)
        updates = read_updates(observed, self.model, lr=None, attack="AnalyticFC",  # the scale cancels
                               weights=self.weights)
        rows, found, owner = [], [], []
        for k, u in enumerate(updates):
            dw = u.gradient[f"{self.layer}.weight"].double()  # (k, d)
            db = u.gradient[f"{self.layer}.bias"].double()    # (k,)
            w, b = u.weights[f"{self.layer}.weight"], u.weights[f"{self.layer}.bias"]
            bins = self.bins if self.bins is not None else bool(torch.allclose(w, torch.full_like(w, 1 / w.shape[1])))
            if not bins:
                x = (db @ dw / (db @ db).clamp(min=1e-300))[None]  # (1, d)
            else:
                order = (-b).argsort()  # ascending thresholds c_i = -b_i
                dw, db = dw[order], db[order]
                ddw = dw - torch.cat([dw[1:], torch.zeros_like(dw[:1])])  # (k, d) one bin each
                ddb = db - torch.cat([db[1:], torch.zeros_like(db[:1])])  # (k,)
                keep = ddb.abs() > self.tol * ddb.abs().max().clamp(min=1e-300)
                x = ddw[keep] / ddb[keep, None]  # (bins filled, d)
            rows.append(x.float())
            found.append(len(x))
            owner += [k] * len(x)
        rec = torch.cat(rows)
        if self.input_shape is not None:
            rec = rec.reshape(len(rec), *self.input_shape)
        return AttackResult("analytic_fc", reconstruction=rec, config=self.config(),
                            extras={"found": found, "update": torch.tensor(owner),
                                    "senders": [u.sender for u in updates]})
