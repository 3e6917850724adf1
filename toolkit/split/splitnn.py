"""SplitNN: split learning through the Wire, in each configuration of the split-learning papers.

Constructors build the parties and the pipeline for each configuration of Vepakomma et al.,
"Split learning for health: distributed deep learning without sharing raw patient data" (2018):
:meth:`SplitNN.vanilla`, :meth:`SplitNN.u_shaped`, :meth:`SplitNN.vertical`,
:meth:`SplitNN.multi_hop` and :meth:`SplitNN.multi_task`. Several clients on horizontally split
data are in :mod:`toolkit.split.multiclient` (relay with weight hand-off, SplitFed).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolkit.parties import OPTIMIZERS, Party, make_optimizer
from toolkit.progress import progress
from toolkit.split.engine import Pipeline, Segment, Task
from toolkit.wire import Wire


@dataclass
class SplitConfig:
    """Training settings shared by every party of a split-learning run."""

    batch_size: int = 64        # samples per training step
    lr: float = 0.1             # learning rate of every party's optimizer
    optimizer: str = "sgd"      # name in toolkit.parties.OPTIMIZERS
    momentum: float = 0.0       # SGD momentum (ignored by other optimizers)
    shuffle: bool = True        # reshuffle the training order every epoch
    seed: int = 0               # seeds the data order
    record: bool = True         # keep a transcript of every transfer (bytes are counted either way)
    eval_batch_size: int = 1024  # samples per evaluation step

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError(f"batch sizes must be positive, got {self.batch_size} and {self.eval_batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {sorted(OPTIMIZERS)}")

    def make_optimizer(self):
        extra = {"momentum": self.momentum} if self.optimizer == "sgd" else {}
        return make_optimizer(self.optimizer, lr=self.lr, **extra)

    @classmethod
    def smoke(cls) -> SplitConfig:
        """Settings for a run of a few seconds (tests, CI)."""
        return cls(batch_size=128)


class SplitNN:
    """Trains a pipeline of model parts on parties; everything between them crosses ``wire``.

    Build one with a configuration constructor (``SplitNN.vanilla(...)`` and friends), then
    ``fit(epochs)`` returns a history DataFrame (epoch, step, loss, accuracy, bytes) and
    ``evaluate()`` the test loss and accuracy. ``wire.observed(by="server")`` is what the server
    saw.

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
                 name: str = "custom"):
        self.pipeline = pipeline
        self.wire = pipeline.wire
        self.tasks = list(tasks)
        self.config = config or SplitConfig()
        self.name = name
        if not self.tasks:
            raise ValueError("a SplitNN needs at least one task (labels and a loss)")
        self.parties = pipeline.parties + [t.owner for t in self.tasks
                                           if all(t.owner is not p for p in pipeline.parties)]
        self._inputs = [(seg.party, seg.data_key) for seg in pipeline.stages[0]]
        for seg in pipeline.stages[0]:
            if not any(p.requires_grad for p in seg.module.parameters()) and len(pipeline.stages) > 1:
                warnings.warn(f"{seg.party.name}'s part has no trainable parameters: it sends its raw inputs "
                              f"(up to a reshape) across the wire; cut deeper", stacklevel=3)
        self.n_train = self._check_data(test=False)
        self.n_test = self._check_data(test=True)
        self._check_shapes()
        self._generator = torch.Generator().manual_seed(self.config.seed)
        self.epoch = 0
        self.history = pd.DataFrame()
        self.batches: dict[int, Tensor] = {}  # step -> training rows used: ground truth for scoring attacks

    # -- validation --------------------------------------------------------------------
    def _check_data(self, *, test: bool) -> int:
        suffix = "_test" if test else ""
        sizes: dict[str, int] = {}
        for party, key in self._inputs:
            if key + suffix not in party.data:
                if test:
                    return 0
                raise ValueError(f"{party.name} holds no {key!r} input to train on")
            sizes[f"{party.name}'s {key + suffix}"] = len(party.data[key + suffix])
        for task in self.tasks:
            labels = task.owner.data.get(task.key + suffix)
            if labels is None:
                if test:
                    return 0
                raise ValueError(f"{task.owner.name} holds no labels {task.key!r} for task {task.name!r}")
            sizes[f"{task.owner.name}'s labels {task.key + suffix}"] = len(labels)
        if len(set(sizes.values())) > 1:
            first = next(iter(sizes))
            odd = next(k for k, v in sizes.items() if v != sizes[first])
            raise ValueError(f"every party must hold the same samples in the same order: {first} has "
                             f"{sizes[first]} samples but {odd} has {sizes[odd]}"
                             f"{' (wrong label length?)' if 'labels' in odd + first else ''}")
        return next(iter(sizes.values()))

    def _check_shapes(self) -> None:
        shapes = [p.data[k].shape[1:] for p, k in self._inputs]
        outs = self.pipeline.check(shapes)
        for task in self.tasks:
            if task.head >= len(outs):
                raise ValueError(f"task {task.name!r} scores head {task.head} but there are {len(outs)} heads")
            if task.loss is F.cross_entropy or isinstance(task.loss, nn.CrossEntropyLoss):
                n_out = outs[task.head][0] if outs[task.head] else 1
                n_classes = int(task.owner.data[task.key].max()) + 1
                if n_out < n_classes:
                    raise ValueError(f"the part scoring task {task.name!r} outputs {n_out} values per "
                                     f"sample but its labels have {n_classes} classes")

    # -- training ----------------------------------------------------------------------
    def _batches(self, n: int, batch_size: int, shuffle: bool) -> list[Tensor]:
        order = torch.randperm(n, generator=self._generator) if shuffle else torch.arange(n)
        return list(order.split(batch_size))

    def steps(self) -> Iterator[tuple]:
        """Train one epoch, yielding after each step (lets multi-client protocols interleave)."""
        wire, pipeline, parties, tasks = self.wire, self.pipeline, self.parties, self.tasks
        inputs = [p.data[k] for p, k in self._inputs]
        labels = [t.owner.data[t.key] for t in tasks]
        loss_party = [pipeline.stages[-1][t.head].party for t in tasks]
        optimizers = [p.optimizer for p in parties if p.optimizer is not None]
        for p in parties:
            p.train()
        for idx in self._batches(self.n_train, self.config.batch_size, self.config.shuffle):
            step = wire.tick()
            self.batches[step] = idx
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            outs, hops = pipeline.forward([x[idx] for x in inputs], train=True)
            total, stats = None, []
            for task, y_all, at in zip(tasks, labels, loss_party):
                y = y_all[idx]
                if task.owner is not at:
                    y = wire.send(y, sender=task.owner.name, receiver=at.name, kind="labels")
                out = outs[task.head]
                loss = task.loss(out, y)
                total = loss if total is None else total + loss
                stats.append((loss.detach(), (out.detach().argmax(1) == y).sum()))
            pipeline.backward(total, hops)
            for opt in optimizers:
                opt.step()
            yield step, len(idx), stats, wire.total_bytes

    def train_epoch(self) -> pd.DataFrame:
        """One pass over the training data; one history row per step."""
        frame = self._frame(list(self.steps()))
        self.epoch += 1
        return frame

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
        cols["loss"] = torch.stack(losses).sum(0).tolist()
        cols["accuracy"] = torch.stack(accs).mean(0).tolist()
        cols["bytes"] = list(nbytes)
        return pd.DataFrame(cols)

    def fit(self, epochs: int = 1, *, show_progress: bool = False, eval_each_epoch: bool = False) -> pd.DataFrame:
        """Train for ``epochs`` passes; returns one row per step (and keeps it in ``self.history``).

        With ``eval_each_epoch`` the last row of each epoch also carries test_loss and
        test_accuracy.
        """
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {epochs!r}")
        frames = []
        for _ in progress(range(epochs), show=show_progress, desc=f"{self.name} split learning"):
            frame = self.train_epoch()
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
        return (f"SplitNN({self.name}: {stages}; labels at "
                f"{', '.join(sorted({t.owner.name for t in self.tasks}))}; {self.n_train} training samples; "
                f"config={asdict(self.config)})")

    # -- configurations ----------------------------------------------------------------
    @classmethod
    def vanilla(cls, client_part: nn.Module, server_part: nn.Module, data, *, labels: str = "client",
                config: SplitConfig | None = None, wire: Wire | None = None) -> SplitNN:
        """Client holds the inputs and the bottom layers; the server holds the top and the loss.

        The client sends its cut-layer activations (and its labels, with ``labels="client"``);
        the server sends back the gradient at the cut (Gupta & Raskar, 2018). With
        ``labels="server"`` the server owns the labels: two-party split learning where one party
        has the features and the other the labels (the setting of label-leakage attacks).
        """
        if labels not in ("client", "server"):
            raise ValueError(f"labels must be held by 'client' or 'server', got {labels!r}")
        config, wire = _defaults(config, wire)
        client = Party("client", optimizer=config.make_optimizer(), data=_holdings(data, labels=labels == "client"))
        server = Party("server", optimizer=config.make_optimizer())
        if labels == "server":
            server.data.update(y=data.y_train, y_test=data.y_test)
        pipe = Pipeline([[Segment(client, client_part)], [Segment(server, server_part)]], wire)
        owner = client if labels == "client" else server
        return cls(pipe, [Task("label", owner=owner)], config=config, name="vanilla")

    @classmethod
    def u_shaped(cls, head: nn.Module, middle: nn.Module, tail: nn.Module, data, *,
                 config: SplitConfig | None = None, wire: Wire | None = None) -> SplitNN:
        """The client keeps the first and the last layers: labels never leave it (Vepakomma et al., 2018)."""
        config, wire = _defaults(config, wire)
        client = Party("client", optimizer=config.make_optimizer(), data=_holdings(data, labels=True))
        server = Party("server", optimizer=config.make_optimizer())
        pipe = Pipeline([[Segment(client, head)], [Segment(server, middle)], [Segment(client, tail)]], wire)
        return cls(pipe, [Task("label", owner=client)], config=config, name="u-shaped")

    @classmethod
    def multi_hop(cls, parts: Sequence[nn.Module], data, *, names: Sequence[str] | None = None,
                  config: SplitConfig | None = None, wire: Wire | None = None) -> SplitNN:
        """A chain of three or more segments on distinct parties; the last one computes the loss.

        Default party names: ``client``, ``hop:1``, ..., ``server`` (extended vanilla configuration).
        """
        if len(parts) < 3:
            raise ValueError(f"multi-hop needs at least three segments, got {len(parts)}")
        names = list(names) if names is not None else ["client", *[f"hop:{i}" for i in range(1, len(parts) - 1)], "server"]
        if len(names) != len(parts) or len(set(names)) != len(names):
            raise ValueError(f"multi-hop needs one distinct party name per segment, got {names}")
        config, wire = _defaults(config, wire)
        parties = [Party(n, optimizer=config.make_optimizer()) for n in names]
        parties[0].data.update(_holdings(data, labels=True))
        pipe = Pipeline([[Segment(p, m)] for p, m in zip(parties, parts)], wire)
        return cls(pipe, [Task("label", owner=parties[0])], config=config, name="multi-hop")

    @classmethod
    def vertical(cls, client_parts: Sequence[nn.Module], server_part: nn.Module, views: Sequence, *,
                 merge: str = "concat", label_holder: str = "server", config: SplitConfig | None = None,
                 wire: Wire | None = None) -> SplitNN:
        """Several clients hold different features of the same samples (vertical / multi-modal).

        Each client ``client:k`` encodes its own view; the server merges the cut-layer outputs
        (``"concat"`` or ``"sum"``) and holds the labels (or ``label_holder="client:k"``, who then
        sends them). Views come from :func:`toolkit.data.vertical_split`.
        """
        if len(client_parts) != len(views) or len(views) < 2:
            raise ValueError(f"vertical split learning needs one client part per view (at least two), "
                             f"got {len(client_parts)} parts and {len(views)} views")
        for k, view in enumerate(views[1:], start=1):
            for split in ("train", "test"):
                a, b = getattr(views[0], f"y_{split}"), getattr(view, f"y_{split}")
                if len(a) != len(b):
                    raise ValueError(f"client:{k} holds {len(b)} {split} samples but client:0 holds {len(a)}: "
                                     f"vertical clients must hold the same samples in the same order")
                if not torch.equal(a, b):
                    raise ValueError(f"client:{k}'s {split} samples are not aligned with client:0's "
                                     f"(their labels differ): align the views by sample id first")
        config, wire = _defaults(config, wire)
        clients = [Party(f"client:{k}", optimizer=config.make_optimizer(), data=_holdings(v, labels=False))
                   for k, v in enumerate(views)]
        server = Party("server", optimizer=config.make_optimizer())
        holder = {p.name: p for p in [server, *clients]}.get(label_holder)
        if holder is None:
            raise ValueError(f"label_holder must be 'server' or a client name, got {label_holder!r}")
        holder.data.update({"y": views[0].y_train, "y_test": views[0].y_test})
        pipe = Pipeline([[Segment(c, m) for c, m in zip(clients, client_parts)], [Segment(server, server_part)]],
                        wire, merge=merge)
        return cls(pipe, [Task("label", owner=holder)], config=config, name="vertical")

    @classmethod
    def multi_task(cls, shared: nn.Module, heads: Mapping[str, nn.Module], data, *,
                   targets: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
                   head_parties: Mapping[str, str] | None = None, config: SplitConfig | None = None,
                   wire: Wire | None = None) -> SplitNN:
        """A shared client part feeding several heads, each with its own labels and loss.

        Args:
            heads: task name -> head module.
            targets: task name -> function mapping the dataset labels to that task's labels
                (default: the labels themselves), e.g. ``{"parity": lambda y: y % 2}``.
            head_parties: task name -> party holding that head (default ``server:<task>``; heads
                on one party receive the activations once).
        """
        if len(heads) < 2:
            raise ValueError(f"multi-task split learning needs at least two heads, got {list(heads)}")
        targets = dict(targets or {})
        unknown = set(targets) - set(heads)
        if unknown:
            raise ValueError(f"targets given for tasks without a head: {sorted(unknown)}")
        config, wire = _defaults(config, wire)
        client = Party("client", optimizer=config.make_optimizer(), data=_holdings(data, labels=False))
        servers: dict[str, Party] = {}
        segments, tasks = [], []
        for k, (task, head) in enumerate(heads.items()):
            where = (head_parties or {}).get(task, f"server:{task}")
            party = servers.setdefault(where, Party(where, optimizer=config.make_optimizer()))
            segments.append(Segment(party, head))
            fn = targets.get(task, lambda y: y)
            client.data[f"y_{task}"] = fn(data.y_train)
            client.data[f"y_{task}_test"] = fn(data.y_test)
            tasks.append(Task(task, owner=client, head=k, key=f"y_{task}"))
        pipe = Pipeline([[Segment(client, shared)], segments], wire)
        return cls(pipe, tasks, config=config, name="multi-task")


def _defaults(config: SplitConfig | None, wire: Wire | None) -> tuple[SplitConfig, Wire]:
    config = config or SplitConfig()
    return config, wire if wire is not None else Wire(record=config.record)


def _holdings(data, *, labels: bool) -> dict[str, Tensor]:
    """The tensors a data-holding client keeps: inputs, and labels when it owns them."""
    held = {"x": data.x_train, "x_test": data.x_test}
    if labels:
        held.update(y=data.y_train, y_test=data.y_test)
    return held
