"""SplitNN: split learning through the Wire, in each configuration of the split-learning papers.

Constructors (:mod:`toolkit.split.configurations`) build the parties and the pipeline for each
configuration of Vepakomma et al., "Split learning for health: distributed deep learning without
sharing raw patient data" (2018): :meth:`SplitNN.vanilla`, :meth:`SplitNN.u_shaped`,
:meth:`SplitNN.vertical`, :meth:`SplitNN.multi_hop` and :meth:`SplitNN.multi_task`. Several clients
on horizontally split data are in :mod:`toolkit.split.multiclient` (relay with weight hand-off,
SplitFed). :meth:`SplitNN.steps` is the one split training loop: attacks (a malicious server) and
detectors (a checking client) act through its hooks (:mod:`toolkit.split.hooks`).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolkit import validate
from toolkit.progress import progress
from toolkit.split.config import SplitConfig
from toolkit.split.configurations import Configurations
from toolkit.split.engine import Pipeline, Task
from toolkit.split.hooks import Hook

__all__ = ["SplitConfig", "SplitNN"]


def _classifies(task: Task) -> bool:
    return task.loss is F.cross_entropy or isinstance(task.loss, nn.CrossEntropyLoss)


class SplitNN(Configurations):
    """Trains a pipeline of model parts on parties; everything between them crosses ``wire``.

    Build one with a configuration constructor (``SplitNN.vanilla(...)`` and friends), then
    ``fit(epochs)`` returns a history DataFrame (epoch, step, loss, accuracy, bytes) and
    ``evaluate()`` the test loss and accuracy. ``wire.observed(by="server")`` is what the server
    saw.

    Args:
        pipeline, tasks: the stages and the supervised objectives (see :mod:`toolkit.split.engine`).
        config: a :class:`SplitConfig`.
        hooks: party name -> :class:`~toolkit.split.hooks.Hook`, for a party that deviates from
            the protocol (a malicious server) or checks what it receives (a detector).
        generator: draws the data order (default: a generator seeded with ``config.seed``).

    Example:
        >>> from toolkit import data, models
        >>> ds = data.load("digits")
        >>> client, server = models.cut(models.mlp([64, 128, 10]), at=3)
        >>> sl = SplitNN.vanilla(client, server, ds)
        >>> history = sl.fit(epochs=1)
        >>> sorted(history.columns)[:3]
        ['accuracy', 'bytes', 'epoch']
    """

    def __init__(self, pipeline: Pipeline, tasks: Sequence[Task], *, config: SplitConfig | None = None,
                 name: str = "custom", hooks: Mapping[str, Hook] | None = None,
                 generator: torch.Generator | None = None):
        self.pipeline = pipeline
        self.wire = pipeline.wire
        self.tasks = list(tasks)
        self.config = config or SplitConfig()
        if not isinstance(self.config, SplitConfig):
            raise TypeError(f"config must be a SplitConfig, got {type(self.config).__name__}")
        self.name = name
        self.parties = pipeline.parties + [t.owner for t in self.tasks
                                           if all(t.owner is not p for p in pipeline.parties)]
        self.hooks = self._check_hooks(hooks)
        self._responder = next((h for h in self.hooks.values() if h.responds), None)  # at the last party (checked)
        if not self.tasks and self._responder is None:
            raise ValueError("a SplitNN needs at least one task (labels and a loss)")
        self._inputs = [(seg.party, seg.data_key) for seg in pipeline.stages[0]]
        for seg in pipeline.stages[0]:
            if not any(p.requires_grad for p in seg.module.parameters()) and len(pipeline.stages) > 1:
                warnings.warn(f"{seg.party.name}'s part has no trainable parameters: it sends its raw inputs "
                              f"(up to a reshape) across the wire; cut deeper", stacklevel=3)
        self.n_train = self._check_data(test=False)
        self.n_test = self._check_data(test=True)
        self._check_shapes()
        self._generator = validate.generator(generator) or torch.Generator().manual_seed(self.config.seed)
        self.epoch = 0
        self.history = pd.DataFrame()
        self.batches: dict[int, Tensor] = {}  # step -> training rows used: ground truth for scoring attacks
        self.logged: dict[int, dict[str, float]] = {}  # step -> values hooks logged (Hook.record)

    # -- validation: data enters here, once --------------------------------------------------
    def _check_hooks(self, hooks: Mapping[str, Hook] | None) -> dict[str, Hook]:
        hooks = dict(hooks or {})
        names = [p.name for p in self.parties]
        for name, hook in hooks.items():
            if name not in names:
                raise ValueError(f"a hook is registered for {name!r}, which is not a party here ({names})")
            if not isinstance(hook, Hook):
                raise TypeError(f"the hook for {name!r} must be a toolkit.split.Hook, got {type(hook).__name__}")
            if hook.responds:
                last = self.pipeline.stages[-1]
                if len(last) != 1 or last[0].party.name != name or len(self.pipeline.stages) < 2:
                    raise ValueError(f"the hook for {name!r} answers with its own gradients (respond), so "
                                     f"{name!r} must hold the single last stage of the pipeline")
        return hooks

    def _check_data(self, *, test: bool) -> int:
        suffix = "_test" if test else ""
        sizes: dict[str, int] = {}
        for party, key in self._inputs:
            if key + suffix not in party.data:
                if test:
                    return 0
                raise ValueError(f"{party.name} holds no {key!r} input to train on")
            name = f"{party.name}'s {key + suffix}"
            x = validate.finite(validate.tensor(party.data[key + suffix], name, min_dim=1), name)
            sizes[name] = len(x)
        for task in self.tasks:
            labels = task.owner.data.get(task.key + suffix)
            if labels is None:
                if test:
                    return 0
                raise ValueError(f"{task.owner.name} holds no labels {task.key!r} for task {task.name!r}")
            name = f"{task.owner.name}'s labels {task.key + suffix}"
            if _classifies(task):
                validate.labels(labels, name)
            else:
                validate.finite(validate.tensor(labels, name, min_dim=1), name)
            sizes[name] = len(labels)
        if len(set(sizes.values())) > 1:
            first = next(iter(sizes))
            odd = next(k for k, v in sizes.items() if v != sizes[first])
            raise ValueError(f"every party must hold the same samples in the same order: {first} has "
                             f"{sizes[first]} samples but {odd} has {sizes[odd]}"
                             f"{' (wrong label length?)' if 'labels' in odd + first else ''}")
        n = next(iter(sizes.values()))
        if n == 0 and not test:
            raise ValueError(f"the training set is empty: {', '.join(sizes)} hold no samples")
        return n

    def _check_shapes(self) -> None:
        shapes = [p.data[k].shape[1:] for p, k in self._inputs]
        if self._responder is not None:  # the last party does not run its part: check up to it
            self.pipeline.check(shapes, run_last=False)
            return
        outs = self.pipeline.check(shapes)
        for task in self.tasks:
            if task.head >= len(outs):
                raise ValueError(f"task {task.name!r} scores head {task.head} but there are {len(outs)} heads")
            if _classifies(task):
                n_out = outs[task.head][0] if outs[task.head] else 1
                n_classes = int(task.owner.data[task.key].max()) + 1
                if n_out < n_classes:
                    raise ValueError(f"the part scoring task {task.name!r} outputs {n_out} values per "
                                     f"sample but its labels have {n_classes} classes")

    # -- training: the one split training loop -----------------------------------------------
    def _batches(self, n: int, batch_size: int, shuffle: bool) -> list[Tensor]:
        order = torch.randperm(n, generator=self._generator) if shuffle else torch.arange(n)
        return list(order.split(batch_size))

    def steps(self) -> Iterator[tuple]:
        """Train one epoch, yielding ``(step, batch size, per-task (loss, correct), total bytes)``
        after each step (lets multi-client protocols interleave, and attacks score each step)."""
        wire, pipeline, parties, tasks, hooks = self.wire, self.pipeline, self.parties, self.tasks, self.hooks
        inputs = [p.data[k] for p, k in self._inputs]
        labels = [t.owner.data[t.key] for t in tasks]
        loss_party = [pipeline.stages[-1][t.head].party for t in tasks]
        classes = [int(y.max()) + 1 if _classifies(t) else None for t, y in zip(tasks, labels)]
        for p in parties:
            p.train()
        for idx in self._batches(self.n_train, self.config.batch_size, self.config.shuffle):
            step = wire.tick()
            self.batches[step] = idx
            for p in parties:
                p.zero_grad()
            local: list[Tensor] = []
            received, hops = pipeline.deliver([x[idx] for x in inputs], train=True,
                                              first=self._loss_terms(step, local))
            ys = []
            for task, y_all, at, n_classes in zip(tasks, labels, loss_party, classes):
                y = y_all[idx]
                if task.owner.name in hooks:
                    y = hooks[task.owner.name].labels(step, y, n_classes=n_classes)
                if task.owner is not at:
                    y = wire.send(y, sender=task.owner.name, receiver=at.name, kind="labels")
                ys.append(y)
            if self._responder is not None:  # a last party that answers with its own gradients
                grads = self._respond(step, received, ys[0] if ys else None)
                got = pipeline.backward(None, hops, received=received, gradients=grads, local=local,
                                        outgoing=self._outgoing(step, {}))
                nan = torch.tensor(math.nan)
                stats = [(nan, nan) for _ in tasks]
            else:
                outs = pipeline.head(received)
                total, stats = None, []
                for task, y in zip(tasks, ys):
                    out = outs[task.head]
                    loss = task.loss(out, y)
                    total = loss if total is None else total + loss
                    correct = (out.detach().argmax(1) == y).sum() if _classifies(task) else torch.tensor(math.nan)
                    stats.append((loss.detach(), correct))
                scored = {p.name: y for p, y in zip(loss_party, ys)}  # the labels each party scored (first task)
                got = pipeline.backward(total, hops, local=local, outgoing=self._outgoing(step, scored))
            stepping = [p for p in parties
                        if p.name not in hooks or hooks[p.name].check(step, p, got.get(p.name, []))]
            for p in stepping:
                p.step()
            logged = {k: v for h in hooks.values() for k, v in h.record(step).items()}
            if logged:
                self.logged[step] = logged
            yield step, len(idx), stats, wire.total_bytes

    def _loss_terms(self, step: int, into: list[Tensor]):
        """The callback collecting first-stage parties' loss terms (:meth:`Hook.loss`) into ``into``."""
        hooks = self.hooks
        if not any(type(h).loss is not Hook.loss for h in hooks.values()):
            return None

        def collect(segment, x: Tensor, out: Tensor) -> None:
            hook = hooks.get(segment.party.name)
            term = hook.loss(step, x, out) if hook is not None else None
            if term is not None:
                if not isinstance(term, Tensor) or term.dim() != 0:
                    raise ValueError(f"{segment.party.name}'s hook must return a scalar loss term (or None), got "
                                     f"{tuple(term.shape) if isinstance(term, Tensor) else type(term).__name__}")
                into.append(term)
        return collect

    def _outgoing(self, step: int, scored: dict[str, Tensor]):
        """What each party sends back for a tensor it received (:meth:`Hook.gradients`)."""
        hooks = {name: h for name, h in self.hooks.items() if type(h).gradients is not Hook.gradients}
        if not hooks:
            return None
        return lambda party, g: hooks[party].gradients(step, g, scored.get(party)) if party in hooks else g

    def _respond(self, step: int, received: list[Tensor], labels: Tensor | None) -> list[Tensor]:
        grads = list(self._responder.respond(step, received, labels))  # type: ignore[union-attr]
        name = self.pipeline.stages[-1][0].party.name
        if len(grads) != len(received) or any(not isinstance(g, Tensor) or g.shape != r.shape
                                              for g, r in zip(grads, received)):
            got = [tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__ for g in grads]
            raise ValueError(f"{name}'s hook must answer one gradient per tensor it received, of shapes "
                             f"{[tuple(r.shape) for r in received]}; got {got}")
        return grads

    def train_steps(self, steps: int) -> Iterator[tuple]:
        """Train ``steps`` steps, across epochs when needed; yields what :meth:`steps` yields."""
        validate.positive_int("steps", steps)
        done = 0
        while done < steps:
            for record in self.steps():
                yield record
                done += 1
                if done == steps:
                    return
            self.epoch += 1

    def train_epoch(self, *, on_step: Callable[[list[tuple]], None] | None = None) -> pd.DataFrame:
        """One pass over the training data; one history row per step. ``on_step(records)`` is called
        after each step with the epoch's records so far."""
        records = []
        for record in self.steps():
            records.append(record)
            if on_step is not None:
                on_step(records)
        frame = self._frame(records)
        self.epoch += 1
        return frame

    def _watcher(self, frames: list[pd.DataFrame], on_step: Callable[[pd.DataFrame], None] | None,
                 every: int) -> Callable[[list[tuple]], None] | None:
        """The per-step callback of :meth:`fit`: ``on_step(history so far)`` every ``every`` steps."""
        if on_step is None:
            return None
        done = [0]

        def watch(records: list[tuple]) -> None:
            done[0] += 1
            if done[0] % every == 0:
                on_step(pd.concat([*frames, self._frame(records)], ignore_index=True))

        return watch

    def _frame(self, records: list[tuple], **extra) -> pd.DataFrame:
        steps, sizes, stats, nbytes = zip(*records)
        n = torch.tensor(sizes, dtype=torch.float64)
        cols: dict[str, object] = {"epoch": self.epoch, "step": list(steps), **extra}
        losses, accs = [], []
        for k, task in enumerate(self.tasks):
            loss = torch.stack([s[k][0] for s in stats]).double()
            acc = torch.stack([s[k][1] for s in stats]).double() / n
            losses.append(loss)
            accs.append(acc)
            if len(self.tasks) > 1:
                cols[f"loss_{task.name}"] = loss.tolist()
                cols[f"accuracy_{task.name}"] = acc.tolist()
        nan = [math.nan] * len(steps)
        cols["loss"] = torch.stack(losses).sum(0).tolist() if losses else nan
        cols["accuracy"] = torch.stack(accs).mean(0).tolist() if accs else nan
        cols["bytes"] = list(nbytes)
        for key in dict.fromkeys(k for s in steps for k in self.logged.get(s, {})):
            cols[key] = [self.logged.get(s, {}).get(key, math.nan) for s in steps]
        frame = pd.DataFrame(cols)
        for key, value in self.wire.reports().items():  # e.g. a DP transform's epsilon: on the last row
            frame.loc[frame.index[-1], key] = value
        return frame

    def fit(self, epochs: int | None = 1, *, steps: int | None = None, show_progress: bool = False,
            eval_each_epoch: bool = False, on_step: Callable[[pd.DataFrame], None] | None = None,
            every: int = 1) -> pd.DataFrame:
        """Train for ``epochs`` passes (or exactly ``steps`` steps, across epochs); returns one row
        per step (and keeps it in ``self.history``).

        With ``eval_each_epoch`` the last row of each epoch also carries test_loss and
        test_accuracy. ``on_step(history)`` is called every ``every`` steps with this fit's history
        so far (e.g. a live figure, :class:`toolkit.widgets.TrainingMonitor`).
        """
        every = validate.positive_int("every", every)
        if on_step is not None and not callable(on_step):
            raise ValueError(f"on_step must be a callable taking the history so far, got {type(on_step).__name__}")
        if steps is not None:
            if eval_each_epoch:
                raise ValueError("eval_each_epoch needs whole epochs: pass epochs, not steps")
            watch, records = self._watcher([], on_step, every), []
            for record in progress(self.train_steps(steps), show=show_progress, total=steps,
                                   desc=f"{self.name} split learning"):
                records.append(record)
                if watch is not None:
                    watch(records)
            frames = [self._frame(records)]
        else:
            validate.positive_int("epochs", epochs)
            frames = []
            watch = self._watcher(frames, on_step, every)
            for _ in progress(range(epochs), show=show_progress, desc=f"{self.name} split learning"):
                frame = self.train_epoch(on_step=watch)
                if eval_each_epoch:
                    for key, value in self.evaluate().items():
                        frame.loc[frame.index[-1], f"test_{key}"] = value
                frames.append(frame)
        history = pd.concat(frames, ignore_index=True)
        self.history = pd.concat([self.history, history], ignore_index=True) if len(self.history) else history
        return history

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Test loss and accuracy (per task too, with several), computed through the Wire.

        Test-time activations cross the wire like training ones, stamped ``phase="eval"``.
        """
        if self.n_test == 0:
            raise ValueError("no test data: the parties hold no '<key>_test' tensors")
        if self._responder is not None:
            raise ValueError("the last party answers with its own gradients (a hooked, malicious party): "
                             "it trains no task to evaluate")
        wire = self.wire
        inputs = [p.data[k + "_test"] for p, k in self._inputs]
        for p in self.parties:
            p.train(False)
        sums = {t.name: [0.0, 0] for t in self.tasks}
        with wire.during("eval"):
            for idx in self._batches(self.n_test, self.config.eval_batch_size, shuffle=False):
                outs, _ = self.pipeline.forward([x[idx] for x in inputs], train=False)
                for task in self.tasks:
                    y = task.owner.data[task.key + "_test"][idx]
                    at = self.pipeline.stages[-1][task.head].party
                    if task.owner is not at:
                        y = wire.send(y, sender=task.owner.name, receiver=at.name, kind="labels")
                    out = outs[task.head]
                    sums[task.name][0] += float(task.loss(out, y)) * len(idx)
                    if _classifies(task):
                        sums[task.name][1] += int((out.argmax(1) == y).sum())
        for p in self.parties:
            p.train(True)
        result = {"loss": sum(s[0] for s in sums.values()) / self.n_test,
                  "accuracy": sum(s[1] for s in sums.values()) / (self.n_test * len(self.tasks))}
        if len(self.tasks) > 1:
            for name, (loss, correct) in sums.items():
                result[f"loss_{name}"] = loss / self.n_test
                result[f"accuracy_{name}"] = correct / self.n_test
        return result

    def __repr__(self) -> str:
        stages = " -> ".join("+".join(seg.party.name for seg in stage) for stage in self.pipeline.stages)
        hooked = f"; hooks on {', '.join(sorted(self.hooks))}" if self.hooks else ""
        return (f"SplitNN({self.name}: {stages}; labels at "
                f"{', '.join(sorted({t.owner.name for t in self.tasks})) or 'nobody'}; {self.n_train} training "
                f"samples{hooked}; config={asdict(self.config)})")
