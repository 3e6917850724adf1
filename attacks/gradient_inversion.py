"""Gradient inversion by gradient matching: DLG, iDLG and Inverting Gradients.

The honest-but-curious server knows the model, the weights it sent and the training settings it
chose; it reads a client's update from the Wire and optimizes dummy inputs until their gradients
match it. On the split side, a party that knows the other's part (``known_part=``, stated in the
threat model) matches the cut-layer gradient it received. The three attacks are one engine
(:mod:`attacks.gradient_matching`) with the settings of their papers; restarts run as rows of one
batched optimization; how the labels are obtained is :mod:`attacks.gradient_labels` (``idlg_label``
and ``LABEL_STRATEGIES`` are importable from here too).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from attacks.base import (Attack, AttackResult, check_generator, describe, expect_shape, non_negative,
                          non_negative_int, positive, positive_int, read, select, steps_for)
from attacks.adaptive import (INTERVAL_DISTANCES, Interval, average_repeats, check_adaptive, preimage_bounds,
                              update_interval)
from attacks.gradient_labels import LABEL_STRATEGIES, check_strategy, idlg_label, known_labels  # noqa: F401
from attacks.gradient_matching import (DISTANCES, WEIGHTS_THREAT, check_model, input_gradient, optimize,
                                       parameter_gradients, read_updates, tv_l1, weights_source)
from toolkit.validate import labels as check_labels
from toolkit.wire import Transfer

class GradientInversion(Attack):
    """Recover a private batch from a gradient it produced, by gradient matching.

    Two settings, each with the knowledge its threat model states (``threat_model``, ``repr``):

    * federated (``wrt="parameters"``): the honest-but-curious server attacks a client's update
      with ``model``, its own global model (the architecture), at the weights it sent that client
      (``weights="sent"``: the ``"weights"`` transfers in the transcript) or at the model's current
      weights (``weights="model"``);
    * split learning (``wrt="input"``): the party that received a cut-layer gradient (the client in
      vanilla split learning) matches it with ``known_part``, the part that computed it (the
      server's part) *weights included*, which that party does not have unless the threat model
      grants it: passing ``known_part`` is that grant. The activations it sent itself are the
      known inputs when the transcript has them; the labels are what it recovers.

    Args:
        model: the server's global model (``wrt="parameters"``).
        input_shape: shape of one input, e.g. ``(1, 32, 32)`` (for ``wrt="input"``: of one
            cut-layer activation).
        batch_size: samples behind each update (the server set it; federated only).
        labels: ``"joint"`` (soft labels optimized with the input, DLG), ``"idlg"`` (from the sign
            of the last layer's gradient; batch of one), ``"counts"`` (batch label recovery,
            :func:`attacks.analytic.label_counts`), ``"auto"`` (idlg for one sample, else counts
            after one local step and joint after several; joint on the split side),
            or a tensor of known labels (B,).
        distance: ``"l2"`` or ``"cosine"`` gradient distance.
        tv: weight of the total-variation prior (0 for none).
        box: keep pixels in [0, 1] during the first-order phase (and clip the result).
        adam_steps, step_size, signed: first phase, Adam with step decay (Geiping et al., 2020).
        lbfgs_steps: second phase, outer steps of L-BFGS with a strong-Wolfe line search.
        restarts: random initializations per update, optimized together; the best is kept.
        init: ``"randn"`` or ``"rand"`` dummy inputs.
        client_lr: the clients' SGD learning rate, to read a weight delta as a gradient (and to
            simulate several local steps).
        local_steps, local_batch_size: the clients' local SGD steps per update (FedAvg), simulated
            in consecutive batches of ``local_batch_size`` (default: the whole batch).
        wrt: ``"parameters"`` (federated updates) or ``"input"`` (a split-learning cut-layer
            gradient, kind ``"gradients"``); default: ``"input"`` when ``known_part`` is given.
        known_part: ``wrt="input"``: the model part that computed the cut-layer gradients, weights
            included (read when ``run`` is called).
        weights: ``wrt="parameters"``: ``"sent"`` (default) or ``"model"``, see above.
        polish_steps: after the search, L-BFGS outer steps on the cosine distance with the label
            fixed to the one found (0: none). The L2 objective is badly conditioned on some images,
            where DLG's search stalls short of the solution with the objective at the float32
            rounding floor of the weight delta; the polish finishes them.
        dtype: the precision of the search (float64 by default: in float32 the L2 objective
            stalls at its rounding floor on some images).
        defense: the defense on the wire, with its parameters, known to the attacker (an adaptive
            attack): any object with ``preimage(observed_row) -> (low, high)``, the interval of true
            values behind each entry that crossed (``defenses.gradients.GradientPruning``,
            ``GradientQuantization``). The attack then matches within those intervals: exactly on
            the entries pruning kept, within the bound on those it zeroed, within each bin.
        repeats: ``"average"``: the server sent a client the same weights several times (its data
            unchanged), so that client's updates from identical weights are one update seen under
            fresh noise; they are averaged into one problem (against ``GradientNoise``: n updates
            divide the noise variance by n). ``"separate"`` (default): every update is attacked.
    """

    name = "gradient_inversion"
    needs = "update"

    def __init__(self, model: nn.Module | None = None, *, input_shape: Sequence[int], batch_size: int = 1,
                 labels: str | Tensor = "auto", distance: str = "cosine", tv: float = 0.0, box: bool = False,
                 adam_steps: int = 0, step_size: float = 0.1, signed: bool = True, lbfgs_steps: int = 40,
                 restarts: int = 1, init: str = "randn", client_lr: float | None = None,
                 local_steps: int = 1, local_batch_size: int | None = None, wrt: str | None = None,
                 known_part: nn.Module | None = None, weights: str = "sent",
                 polish_steps: int = 0, dtype: torch.dtype = torch.float64, defense=None,
                 repeats: str = "separate"):
        self.wrt, part = self._setting(model, known_part, wrt)
        self.defense, self.repeats = check_adaptive(defense, repeats, self.wrt)
        self._model = part
        self.weights = "known_part" if self.wrt == "input" else weights_source(weights)
        if self.wrt == "input" and weights != "sent":
            raise ValueError("weights= says where a federated attack reads the weights; with wrt='input' they "
                             "are known_part's")
        self.threat_model = self._threat()
        self.input_shape = tuple(positive_int("input_shape entries", int(s)) for s in input_shape)
        self.batch_size = positive_int("batch_size", batch_size)
        check_strategy(labels, batch_size=self.batch_size, wrt=self.wrt)
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance {distance!r}; choose one of {sorted(DISTANCES)}")
        self.distance = distance
        self.tv = non_negative("tv", tv)
        self.box = bool(box)
        self.adam_steps = non_negative_int("adam_steps", adam_steps)
        self.step_size = positive("step_size", step_size)
        self.signed = bool(signed)
        self.lbfgs_steps = non_negative_int("lbfgs_steps", lbfgs_steps)
        self.polish_steps = non_negative_int("polish_steps", polish_steps)
        if self.adam_steps + self.lbfgs_steps < 1:
            raise ValueError("adam_steps and lbfgs_steps are both 0: the attack would not optimize at all")
        self.restarts = positive_int("restarts", restarts)
        if init not in ("randn", "rand"):
            raise ValueError(f"init must be 'randn' or 'rand', got {init!r}")
        self.init = init
        self.client_lr = None if client_lr is None else positive("client_lr", client_lr)
        self.local_steps = positive_int("local_steps", local_steps)
        self.local_batch_size = None if local_batch_size is None else positive_int("local_batch_size", local_batch_size)
        if self.local_steps > 1 and self.client_lr is None:
            raise ValueError("simulating several local steps needs the clients' learning rate: pass client_lr")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
        self.dtype = dtype
        check_model(part, type(self).__name__)
        with torch.no_grad():
            was = part.training
            part.eval()
            try:
                out = part(torch.zeros(1, *self.input_shape))
            except (RuntimeError, ValueError) as err:
                raise ValueError(f"the model does not take inputs of shape {self.input_shape}: {err}") from None
            finally:
                part.train(was)
        self.n_classes = int(out.shape[-1])
        if isinstance(labels, Tensor):
            labels = check_labels(labels, "known labels", n_classes=self.n_classes,
                                  length=self.batch_size if self.wrt == "parameters" else None)
        self.labels = labels

    @staticmethod
    def _setting(model, known_part, wrt) -> tuple[str, nn.Module]:
        """(wrt, the module the attacker computes with), from what the caller granted."""
        if wrt not in (None, "parameters", "input"):
            raise ValueError(f"wrt must be 'parameters' or 'input', got {wrt!r}")
        wrt = wrt or ("input" if known_part is not None else "parameters")
        if wrt == "input":
            if model is not None or known_part is None:
                raise ValueError("wrt='input' matches a cut-layer gradient with the weights of the part that "
                                 "computed it, which the party receiving the gradient does not have: pass that "
                                 "part as known_part= (the threat model then says the attacker knows it, weights "
                                 "included), not as model")
            part = known_part
        else:
            if known_part is not None:
                raise ValueError("known_part is the split side's (wrt='input'); a federated attack takes the "
                                 "server's global model as model")
            part = model
        if not isinstance(part, nn.Module):
            raise ValueError(f"{'known_part' if wrt == 'input' else 'model'} must be an nn.Module, "
                             f"got {type(part).__name__}")
        return wrt, part

    def _threat(self) -> str:
        if self.wrt == "input":
            base = ("the party that received the cut-layer gradients (the client in vanilla split learning), "
                    "knowing the part that computed them, weights included (known_part); reads the gradients "
                    "and the activations it sent")
        else:
            base = (f"honest-but-curious server: knows the model, {WEIGHTS_THREAT[self.weights]} and the training "
                    f"settings (batch size, client lr, local steps); reads only the client's update")
        if self.defense is not None:
            base += f"; knows the defense {self.defense!r} and its parameters, and matches within its preimage"
        if self.repeats == "average":
            base += ("; sends a client the same weights several times and averages that client's updates from "
                     "identical weights")
        return base

    # -- the run ---------------------------------------------------------------------------
    def run(self, observed: Sequence[Transfer], *, show_progress: bool = False,
            generator: torch.Generator | None = None, max_steps: int | None = None) -> AttackResult:
        """Attack every update in ``observed`` (what the server received, plus the weights it
        sent; on the split side the gradients the party received and the activations it sent);
        returns reconstructions (N, *input_shape) and labels (N,) in transcript order, and the
        best objective per step (the search's, then the polish's) as ``history``, update after
        update (``extras["steps"]`` says how many entries each update has). Every random draw
        (dummy inputs and labels, label-count queries) comes from ``generator``."""
        check_generator(generator)
        adam = steps_for(self.adam_steps, max_steps) if self.adam_steps else 0
        lbfgs = steps_for(self.lbfgs_steps, max_steps) if self.lbfgs_steps else 0
        polish = steps_for(self.polish_steps, max_steps) if self.polish_steps else 0
        problems = self._problems(observed, generator)
        recs, labels, history, objective, steps = [], [], [], [], []
        for target, weights, known_input, label in problems:
            x, y, hist, obj = self._solve(target, weights, known_input, label, adam, lbfgs, polish, generator,
                                          show_progress)
            recs.append(x)
            labels.append(y)
            history.extend(hist)
            steps.append(len(hist))
            objective.append(obj)
        return AttackResult(self.name, reconstruction=torch.cat(recs), labels=torch.cat(labels), history=history,
                            config={**self.config(), "attack": type(self).__name__},
                            extras={"objective": torch.tensor(objective), "updates": len(problems),
                                    "steps": steps})  # history entries per update, in order

    def _problems(self, observed: Sequence[Transfer], generator: torch.Generator | None) -> list[tuple]:
        """(target gradients, weights, known input or None, labels or None) per update, every
        tensor checked against the model (shapes, dtypes, finite values)."""
        name = type(self).__name__
        if self.wrt == "input":
            return self._cut_layer_problems(observed, name)
        updates = read_updates(observed, self._model, lr=self.client_lr, attack=name, weights=self.weights)
        if self.distance == "l2" and self.client_lr is None and any(u.delta is not None for u in updates):
            raise ValueError(f"{name}: the l2 distance compares gradients at their scale, so reading a weight delta "
                             f"needs the clients' learning rate: pass client_lr, or use distance='cosine'")
        if self.repeats == "average":
            updates = average_repeats(updates)
        out = []
        for u in updates:
            target = tuple((u.delta if self.local_steps > 1 else u.gradient).values())
            if self.defense is not None:
                target = update_interval(self.defense, u, name, self.client_lr, self.local_steps)
            labels = known_labels(self.labels, u, self._model, batch_size=self.batch_size, local_steps=self.local_steps,
                                  input_shape=self.input_shape, generator=generator)
            out.append((target, u.weights, None, labels))
        return out

    def _cut_layer_problems(self, observed: Sequence[Transfer], name: str) -> list[tuple]:
        observed = list(observed)
        grads = select(observed, "gradients", name)
        acts = {(t.step, t.phase, t.sender): t for t in observed if t.kind == "activations"}
        weights = {n: p.detach().float() for n, p in self._model.named_parameters()}
        out = []
        for t in grads:
            g = read(t, name)
            expect_shape(g.shape[1:], self.input_shape, f"{name}: {describe(t)}",
                         "known_part takes input_shape")
            a = acts.get((t.step, t.phase, t.receiver))
            z = None if a is None else read(a, name)
            if z is not None and z.shape != g.shape:
                raise ValueError(f"{name}: {describe(a)} has shape {tuple(z.shape)}, but {describe(t)} has "
                                 f"{tuple(g.shape)}: the gradients must come back for exactly the activations sent")
            if isinstance(self.labels, Tensor) and len(self.labels) != len(g):
                raise ValueError(f"{name}: {len(self.labels)} known labels for {describe(t)} of {len(g)} samples")
            target = (g.float(),)
            if self.defense is not None:
                low, high = preimage_bounds(self.defense, g.float().reshape(len(g), -1), name)
                target = Interval((low.view_as(g),), (high.view_as(g),))
            out.append((target, weights, None if z is None else z.float(),
                        self.labels if isinstance(self.labels, Tensor) else None))
        return out

    def _solve(self, target, weights, known_input, label, adam: int, lbfgs: int, polish: int,
               generator: torch.Generator, show_progress: bool):
        model, dist, tv, wrt, dtype = self._model, DISTANCES[self.distance], self.tv, self.wrt, self.dtype
        steps, lr, bs = self.local_steps, self.client_lr, self.local_batch_size
        if isinstance(target, Interval):  # a known defense: match within its preimage
            target, dist, cosine = target.to(dtype), INTERVAL_DISTANCES[self.distance], INTERVAL_DISTANCES["cosine"]
        else:
            target, cosine = tuple(t.to(dtype) for t in target), DISTANCES["cosine"]
        weights = {k: v.to(dtype) for k, v in weights.items()}
        buffers = {k: b.detach().to(dtype) for k, b in model.named_buffers() if b.is_floating_point()}
        known_input = None if known_input is None else known_input.to(dtype)
        rows = target.low if isinstance(target, Interval) else target
        n = len(rows[0]) if wrt == "input" else self.batch_size
        r = self.restarts
        shape = (r, n, *self.input_shape)
        x0 = torch.randn(shape, generator=generator) if self.init == "randn" else torch.rand(shape, generator=generator)
        variables = [] if known_input is not None else [x0.to(dtype)]
        if label is None:
            variables.append(torch.randn(r, n, self.n_classes, generator=generator).to(dtype))
        if not variables:
            raise ValueError(f"{type(self).__name__}: the inputs and the labels are both known; nothing to recover")

        def gradients(x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
            if wrt == "input":
                return input_gradient(model, weights, x, y, buffers=buffers)
            return parameter_gradients(model, weights, x, y, local_steps=steps, lr=lr, batch_size=bs, buffers=buffers)

        def objective(*row: Tensor, fixed: Tensor | None = None, distance=dist) -> Tensor:
            x = known_input if known_input is not None else row[0]
            y = fixed if fixed is not None else label if label is not None else torch.softmax(row[-1], dim=-1)
            value = distance(gradients(x, y), target)
            return value + tv * tv_l1(x) if tv and known_input is None else value

        desc = type(self).__name__
        result = optimize(objective, variables, adam_steps=adam, lr=self.step_size, signed=self.signed,
                          box=self.box and known_input is None, lbfgs_steps=lbfgs, show_progress=show_progress,
                          desc=desc)
        best = int(result.objective.argmin())
        x = known_input if known_input is not None else result.variables[0][best]
        y = label if label is not None else result.variables[-1][best].argmax(-1)
        history, value = result.history, float(result.objective[best])
        if polish and known_input is None:
            polished = optimize(lambda xr: objective(xr, fixed=y, distance=cosine), [x[None]],
                                lbfgs_steps=polish, show_progress=show_progress, desc=f"{desc} (cosine polish)")
            x, value, history = polished.variables[0][0], float(polished.objective[0]), history + polished.history
        return x.detach().float(), y.detach(), history, value

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(batch_size={self.batch_size}, labels={self.labels if isinstance(self.labels, str) else 'known'}, "
                f"distance={self.distance}, tv={self.tv}, adam_steps={self.adam_steps}, lbfgs_steps={self.lbfgs_steps}, "
                f"polish_steps={self.polish_steps}, "
                f"{f'defense={self.defense!r}, ' if self.defense is not None else ''}"
                f"{'repeats=average, ' if self.repeats == 'average' else ''}"
                f"restarts={self.restarts}, local_steps={self.local_steps}, wrt={self.wrt}, weights={self.weights}) "
                f"[threat model: {self.threat_model}]")


class DLG(GradientInversion):
    """Deep Leakage from Gradients (Zhu, Liu, Han, "Deep leakage from gradients", NeurIPS 2019):
    dummy input and soft label optimized jointly with L-BFGS to match the gradient in L2.

    The defaults are the robust ones: a strong-Wolfe line search (a plain L-BFGS step blows up
    on some images), float64, the best iterate kept, early stop when no restart improves, and a
    cosine polish with the label found (``polish_steps=0`` gives the paper's L2 search alone).

    Example:
        >>> from toolkit import models
        >>> DLG(models.lenet(image_size=32, variant="dlg"), input_shape=(1, 32, 32), client_lr=0.1)  # doctest: +ELLIPSIS
        DLG(batch_size=1, labels=joint, distance=l2, ...
    """

    name = "dlg"

    def __init__(self, model: nn.Module | None = None, *, input_shape: Sequence[int], labels: str | Tensor = "joint",
                 distance: str = "l2", lbfgs_steps: int = 40, polish_steps: int = 20, init: str = "randn",
                 **kwargs):
        super().__init__(model, input_shape=input_shape, labels=labels, distance=distance,
                         lbfgs_steps=lbfgs_steps, polish_steps=polish_steps, init=init, **kwargs)


class IDLG(DLG):
    """Improved DLG (Zhao, Mopuri, Bilen, "iDLG: Improved deep leakage from gradients", 2020): the
    label of a single sample read from the sign of the last layer's gradient, then DLG on the
    input alone."""

    name = "idlg"

    def __init__(self, model: nn.Module | None = None, *, input_shape: Sequence[int], **kwargs):
        kwargs.setdefault("labels", "idlg")
        super().__init__(model, input_shape=input_shape, **kwargs)


class InvertingGradients(GradientInversion):
    """Inverting Gradients (Geiping, Bauermeister, Droege, Moeller, "Inverting gradients: how easy
    is it to break privacy in federated learning?", NeurIPS 2020): cosine gradient distance, a
    total-variation prior, Adam on hard-signed gradients with step decay, pixels boxed to
    [0, 1], several restarts keeping the best; several local steps (FedAvg) are simulated.

    ``lbfgs_steps`` finishes the Adam phase with L-BFGS on the same objective (0 gives the paper's
    schedule alone): on the small sigmoid LeNet, single digits after 100 Adam steps (2 restarts)
    are below 20 dB, and 40 L-BFGS steps take them above 40 dB (tests/test_gradient_inversion.py).
    The cosine distance is computed without cancellation, which is what lets the search run in
    float32 (the default here); ``benchmarks/gradient_attacks.py --dtype float64`` compares.
    """

    name = "inverting_gradients"

    def __init__(self, model: nn.Module | None = None, *, input_shape: Sequence[int], distance: str = "cosine",
                 tv: float = 1e-4, box: bool = True, adam_steps: int = 200, lbfgs_steps: int = 40,
                 restarts: int = 4, init: str = "rand", dtype: torch.dtype = torch.float32, **kwargs):
        super().__init__(model, input_shape=input_shape, distance=distance, tv=tv, box=box,
                         adam_steps=adam_steps, lbfgs_steps=lbfgs_steps, restarts=restarts, init=init,
                         dtype=dtype, **kwargs)
