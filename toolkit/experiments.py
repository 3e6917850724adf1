"""Privacy-utility sweeps: train, defend, attack, and one tidy DataFrame row per setting and seed.

:func:`sweep` is the primitive: it calls ``trial(value, seed)`` for every value of a defense
parameter (alpha, sigma, dropout rate, pruning ratio, decoy count) and every seed, times it, and
returns a tidy frame (one row per trial: the parameter, the seed, whatever the trial measured,
seconds) with a progress bar. :class:`SplitExperiment` is a split-learning trial: it builds a
model, cuts it, trains it with a defense and scores it (accuracy, distance correlation between
the test inputs and what the Wire delivered to the server, bytes, epsilon when the defense
accounts for one, and an attack's metrics when one is given); :meth:`SplitExperiment.sweep` runs
it over a parameter. ``toolkit`` never imports ``attacks`` or ``defenses``: the defense and the
attack arrive as arguments (design rule), so

>>> from defenses import NoPeek                                         # doctest: +SKIP
>>> frame = SplitExperiment.smoke().sweep(lambda a, g: NoPeek(alpha=a), [0.0, 1.0, 4.0],
...                                       parameter="alpha", seeds=[0, 1])  # doctest: +SKIP

and ``toolkit.plots.plot_tradeoff(frame, x="dcor", y="accuracy", parameter="alpha")`` draws the
curve with its spread over seeds.

A defense factory takes ``(value, generator)`` and returns what the defense is: a
:class:`~toolkit.split.Hook` (registered for ``SplitExperiment.defended``: the client for NoPeek,
the server for a label defense), a Wire transform (any other callable ``t(tensor, *, kind)``), a
list of those (several hooks act together, :class:`~toolkit.split.Hooks`), or None (no defense). An attack takes ``(splitnn, dataset, generator)`` and returns
a dict of metrics (e.g. ``{"ssim": ..., "psnr": ...}``, from ``toolkit.metrics.evaluate``).

Example:
    >>> frame = sweep(lambda v, seed: {"score": v * 2 + seed}, [1, 2], seeds=[0, 1], parameter="k")
    >>> frame[["k", "seed", "score"]].values.tolist()
    [[1, 0, 2], [1, 1, 3], [2, 0, 4], [2, 1, 5]]
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from toolkit import data as datasets
from toolkit import metrics, models, validate
from toolkit.progress import progress
from toolkit.seeding import seed_everything
from toolkit.split import Hook, Hooks, SplitConfig, SplitNN
from toolkit.wire import Wire

Trial = Callable[[Any, int], Mapping[str, Any]]
Defense = Callable[[Any, torch.Generator], Any]
AttackFn = Callable[[SplitNN, datasets.Dataset, torch.Generator], Mapping[str, float]]


def sweep(trial: Trial, values: Sequence[Any], *, seeds: Sequence[int] = (0,), parameter: str = "value",
          show_progress: bool = False, desc: str | None = None) -> pd.DataFrame:
    """Run ``trial(value, seed)`` for every value and seed; one row per trial.

    Each row holds ``parameter`` (the value), ``seed``, what the trial returned, and ``seconds``
    (the trial's wall time, unless it reports its own). Stopping with Ctrl-C returns the rows
    finished so far.
    """
    values, seeds = list(values), [validate.non_negative_int("seed", s) for s in seeds]
    if not values or not seeds:
        raise ValueError(f"a sweep needs at least one value and one seed, got {len(values)} values and "
                         f"{len(seeds)} seeds")
    if not isinstance(parameter, str) or parameter in ("seed", "seconds"):
        raise ValueError(f"parameter must be a column name other than 'seed' and 'seconds', got {parameter!r}")
    rows = []
    grid = [(v, s) for v in values for s in seeds]
    try:
        for value, seed in progress(grid, show=show_progress, total=len(grid), desc=desc or f"sweep over {parameter}"):
            start = time.perf_counter()
            result = dict(trial(value, seed))
            rows.append({parameter: value, "seed": seed, **result,
                         "seconds": result.get("seconds", time.perf_counter() - start)})
    except KeyboardInterrupt:
        pass
    return pd.DataFrame(rows)


def _split_defense(made: Any) -> tuple[list[Hook], list[Callable]]:
    parts = [] if made is None else list(made) if isinstance(made, (list, tuple)) else [made]
    hooks = [p for p in parts if isinstance(p, Hook)]
    transforms = [p for p in parts if not isinstance(p, Hook)]
    for t in transforms:
        if not callable(t):
            raise TypeError(f"a defense factory must return a Hook, a wire transform (callable t(tensor, *, kind)), "
                            f"a list of those or None; got {type(t).__name__}")
    return ([Hooks(*hooks)] if len(hooks) > 1 else hooks), transforms


@dataclass
class SplitExperiment:
    """A split-learning run to defend and attack: data, model, cut, training settings.

    Build the data with :meth:`dataset` and the parts with :meth:`parts`; :meth:`run` trains with
    one defense and scores it; :meth:`sweep` runs it over a defense parameter and seeds.
    """

    dataset: str = "digits"          # a toolkit.data name ("digits", "mnist", "loan", ...)
    root: str | None = None          # where the dataset's files are (toolkit.data.load's root)
    n_train: int | None = None       # keep the first n training samples (None: all)
    model: str = "mlp"               # a toolkit.models.MODELS name
    model_options: dict = field(default_factory=lambda: {"sizes": [64, 128, 10]})  # its keyword arguments
    cut: int | str = 3               # the client keeps the layers before this index or layer name
    labels: str = "client"           # who holds the labels: "client" or "server"
    defended: str = "client"         # the party a defense's Hook is registered for
    epochs: int = 3                  # training epochs per run
    batch_size: int = 64             # samples per step
    lr: float = 0.1                  # learning rate of both parties
    momentum: float = 0.0            # SGD momentum (ignored by other optimizers)
    optimizer: str = "sgd"           # both parties' optimizer, a toolkit.parties.OPTIMIZERS name
    n_eval: int = 1000               # test samples the distance correlation is computed on
    record_training: bool = True     # keep the training transcript (False: evaluation only, less memory)

    def __post_init__(self) -> None:
        validate.positive_int("epochs", self.epochs)
        validate.positive_int("n_eval", self.n_eval)
        if self.n_train is not None:
            validate.positive_int("n_train", self.n_train)
        if self.labels not in ("client", "server"):
            raise ValueError(f"labels must be held by 'client' or 'server', got {self.labels!r}")
        if self.model not in models.MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {sorted(models.MODELS)}")
        validate.boolean("record_training", self.record_training)
        self._config(0)  # checks batch_size, lr, momentum, optimizer

    @classmethod
    def smoke(cls) -> SplitExperiment:
        """Digits (512 training samples), a 64-32-10 MLP cut after its first layer, three epochs at
        learning rate 0.3: a trial takes about a second."""
        return cls(model_options={"sizes": [64, 32, 10]}, cut=2, epochs=3, lr=0.3, n_train=512, n_eval=200)

    @classmethod
    def mnist(cls, root: str | None = None) -> SplitExperiment:
        """MNIST-shaped images (the 10,000 MNIST test images split 8,000 / 2,000 when only those are
        present), a LeNet cut after its first convolution block: the NoPeek / He et al. setting."""
        return cls(dataset="mnist", root=root, model="lenet", model_options={"image_size": 28},
                   cut="pool1", epochs=3, lr=0.05, momentum=0.9)

    def _config(self, seed: int) -> SplitConfig:
        return SplitConfig(batch_size=self.batch_size, lr=self.lr, momentum=self.momentum, optimizer=self.optimizer,
                           seed=seed, record=self.record_training)

    def load(self) -> datasets.Dataset:
        ds = datasets.load(self.dataset, root=self.root)
        return ds.subset(range(min(self.n_train, len(ds.y_train)))) if self.n_train is not None else ds

    def parts(self, seed: int = 0) -> tuple[nn.Module, nn.Module]:
        """The client's and the server's parts of a freshly initialized model (seeded)."""
        seed_everything(seed)
        return models.cut(models.build(self.model, **self.model_options), at=self.cut)

    def build(self, defense: Any = None, *, seed: int = 0,
              data: datasets.Dataset | None = None) -> tuple[SplitNN, list[Any]]:
        """The untrained split deployment :meth:`run` trains: freshly seeded parts, ``defense`` (what a
        defense factory returns) as hooks of ``defended`` and Wire transforms; returns the SplitNN and
        the defense's parts (hooks, then transforms)."""
        ds = data if data is not None else self.load()
        hooks, transforms = _split_defense(defense)
        client, server = self.parts(seed)
        wire = Wire(transforms=transforms, record=self.record_training)
        sl = SplitNN.vanilla(client, server, ds, labels=self.labels, config=self._config(seed), wire=wire,
                             hooks={self.defended: hooks[0]} if hooks else None)
        return sl, [*hooks, *transforms]

    def run(self, defense: Any = None, *, attack: AttackFn | None = None, seed: int = 0,
            data: datasets.Dataset | None = None) -> dict[str, Any]:
        """Train with ``defense`` (what a defense factory returns) and score it.

        Returns accuracy and loss on the test set, ``dcor`` between the first ``n_eval`` test inputs
        and the activations the server received for them, ``dcor_unbiased`` (the bias-corrected
        one, ``sqrt(max(u_distance_correlation_sqr, 0))``: near 0 for independent data even in high
        dimension, where the plain V-statistic is biased upward), ``bytes`` on the wire, whatever the
        defense reports (``report()``, e.g. epsilon), the attack's metrics, and
        ``train_seconds`` / ``attack_seconds``. A run whose activations diverged has both NaN.
        """
        ds = data if data is not None else self.load()
        sl, parts = self.build(defense, seed=seed, data=ds)
        start = time.perf_counter()
        sl.fit(epochs=self.epochs)
        train_seconds = time.perf_counter() - start
        sl.wire.recording = True  # what the server receives at evaluation is always kept: it is scored
        scores = sl.evaluate()
        row: dict[str, Any] = {"accuracy": scores["accuracy"], "loss": scores["loss"], **self.dcor(sl, ds),
                               "bytes": sl.wire.total_bytes}
        for part in parts:
            report = getattr(part, "report", None)
            if callable(report):
                row.update(report())
        row["train_seconds"] = train_seconds
        if attack is not None:
            start = time.perf_counter()
            row.update(attack(sl, ds, torch.Generator().manual_seed(seed)))
            row["attack_seconds"] = time.perf_counter() - start
        row["seconds"] = train_seconds + row.get("attack_seconds", 0.0)
        return row

    def dcor(self, sl: SplitNN, ds: datasets.Dataset) -> dict[str, float]:
        """dCor(test inputs, what the server received for them at evaluation), plain and
        bias-corrected, on ``n_eval`` samples (the bias-corrected one needs at least 4)."""
        seen = sl.wire.observed(by="server", kind="activations", phase="eval")
        z: Tensor = torch.cat([t.tensor.flatten(1) for t in seen])[: self.n_eval]  # evaluation is in order
        if not bool(torch.isfinite(z).all()):
            return {"dcor": math.nan, "dcor_unbiased": math.nan}  # diverged (e.g. too strong a defense)
        x = ds.x_test[: len(z)]
        unbiased = math.sqrt(max(float(metrics.u_distance_correlation_sqr(x, z)), 0.0)) if len(z) >= 4 else math.nan
        return {"dcor": float(metrics.distance_correlation(x, z)), "dcor_unbiased": unbiased}

    def sweep(self, defense: Defense, values: Sequence[Any], *, attack: AttackFn | None = None,
              parameter: str = "value", seeds: Sequence[int] = (0,), show_progress: bool = False) -> pd.DataFrame:
        """:meth:`run` with ``defense(value, generator)`` for every value and seed (the defense's
        generator is seeded with the trial's seed); one tidy row per trial."""
        ds = self.load()

        def trial(value: Any, seed: int) -> dict[str, Any]:
            return self.run(defense(value, torch.Generator().manual_seed(seed)), attack=attack, seed=seed, data=ds)

        return sweep(trial, values, seeds=seeds, parameter=parameter, show_progress=show_progress,
                     desc=f"{self.dataset}: sweep over {parameter}")


def __getattr__(name: str) -> Any:
    """The paper-figure presets (:mod:`toolkit.figures`) are importable from here too, e.g.
    ``from toolkit.experiments import SinghCommunication``."""
    from toolkit import figures

    if name in figures.__all__:
        return getattr(figures, name)
    raise AttributeError(f"module 'toolkit.experiments' has no attribute {name!r}")
