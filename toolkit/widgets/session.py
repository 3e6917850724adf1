"""The leakage explorer's logic, apart from its widgets: one run of a setting, cached, stoppable.

A :class:`Setting` is (dataset, model, cut layer, defense, strength, attack, seed, epochs). A
:class:`ExplorerSession` runs one: it trains a small split model through the one split training
loop (:meth:`toolkit.split.SplitNN.train_steps`, built as :class:`toolkit.experiments.SplitExperiment`
builds it), scores it (test accuracy; distance correlation between test inputs and what the Wire
delivered to the server, ``SplitExperiment``'s statistic), attacks what the server received for a
few test inputs, and computes the attribution map of the client part's activation norm
(:func:`toolkit.attribution.attribute`). Training is cached per (dataset, model, cut, defense,
strength, seed, epochs) and the attack per training key and attack, so changing only the attack
re-uses the trained model (``session.trainings`` counts trainings).

``toolkit`` never imports ``attacks`` or ``defenses``: the session receives registries,
``defenses={name: factory(strength, generator)}`` (or :class:`DefenseOption`, a factory with its
strength range) and ``attacks={name: fn(target, generator) -> reconstruction}``, where ``target`` is
a :class:`Target` (what the attacker has) and the reconstruction has the shape of the attacked
inputs. ``attacks.EXPLORER_ATTACKS`` and ``defenses.EXPLORER_DEFENSES`` are ready-made ones.

Stopping: ``run(..., stop=event)`` checks the event after every training step; a stopped run
keeps what it has (the partly trained model is scored and attacked, the outcome says
``stopped``) and is not cached.
"""
from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from toolkit import data as datasets
from toolkit import metrics, models, validate
from toolkit.data.folders import idx_files_present
from toolkit.experiments import SplitExperiment
from toolkit.wire import Transfer

__all__ = ["DATASETS", "DefenseOption", "ExplorerSession", "Outcome", "Setting", "Target", "model_options",
           "cut_layers"]

# name -> loader; mnist is offered only when its files are there (toolkit.data.default_root())
DATASETS: dict[str, Callable[[], datasets.Dataset]] = {
    "digits": lambda: datasets.load("digits"),                                   # 8x8, 1,437 train
    "digits 28x28": lambda: datasets.load("digits", image_size=28),              # for LeNet
    "mnist": lambda: datasets.load("mnist").subset(range(4000)),                 # 4,000 train images
    "breast_cancer": lambda: datasets.load("breast_cancer"),                     # tabular, 30 features
}
# name -> whether its files are there (checked without loading: a dataset loads when it is chosen)
PRESENT: dict[str, Callable[[], bool]] = {
    "mnist": lambda: idx_files_present(datasets.default_root() / "mnist"),
}
IMAGE_MODELS = ("mlp", "convnet", "lenet")
TABULAR_MODELS = ("tabular_mlp",)
DEFAULT_CUTS = {"mlp": "act1", "tabular_mlp": "act1", "convnet": "pool1", "lenet": "pool1"}
# SGD settings per model; 2 epochs on digits reach about 93 % (mlp), 95 % (convnet), 82 % (lenet, 28x28)
TRAINING = {"mlp": dict(lr=0.05, momentum=0.9, batch_size=32), "tabular_mlp": dict(lr=0.05, momentum=0.9),
            "convnet": dict(lr=0.05, momentum=0.9, batch_size=16), "lenet": dict(lr=0.05, momentum=0.9, batch_size=32)}


def model_options(model: str, ds: datasets.Dataset) -> dict:
    """Keyword arguments of ``toolkit.models.build(model, ...)`` fitting dataset ``ds``."""
    if model == "mlp":
        return {"sizes": [int(torch.tensor(ds.shape).prod()), 128, ds.n_classes]}
    if model == "tabular_mlp":
        return {"n_features": ds.shape[0], "n_classes": ds.n_classes}
    if model in ("convnet", "lenet"):
        if not ds.is_image:
            raise ValueError(f"{model} takes images; {ds.name} is tabular: choose tabular_mlp")
        return {"in_channels": ds.shape[0], "image_size": ds.shape[1], "n_classes": ds.n_classes}
    raise ValueError(f"unknown model {model!r}; choose one of {sorted(DEFAULT_CUTS)}")


def cut_layers(model: nn.Sequential) -> list[str]:
    """Layer names a cut can follow: the client keeps at least one trainable layer, the server one layer."""
    names = models.layer_names(model)
    first = next(i for i, (_, m) in enumerate(model.named_children()) if any(True for _ in m.parameters()))
    return names[first:-1]


@dataclass(frozen=True)
class Setting:
    """One point of the explorer: what to train, how to defend it, how to attack it."""

    dataset: str = "digits"      # a DATASETS name
    model: str = "mlp"           # a toolkit.models.MODELS name fitting the dataset
    cut: str = "act1"            # the client keeps the layers up to this one
    defense: str = "none"        # a name in the session's defenses
    strength: float = 0.0        # the defense's parameter (sigma, dropout rate, NoPeek alpha)
    attack: str = "white-box inversion"  # a name in the session's attacks
    seed: int = 0                # model init, data order, the defense's and the attack's draws
    epochs: int = 2              # training epochs

    @property
    def training_key(self) -> tuple:
        return (self.dataset, self.model, self.cut, self.defense, float(self.strength), self.seed, self.epochs)

    @property
    def attack_key(self) -> tuple:
        return (*self.training_key, self.attack)


@dataclass(frozen=True)
class DefenseOption:
    """A defense factory ``make(strength, generator)`` with its strength's range and name."""

    make: Callable[[float, torch.Generator], Any]
    low: float = 0.0             # smallest strength
    high: float = 1.0            # largest strength
    default: float = 0.0         # the slider's starting value
    parameter: str = "strength"  # what the strength is, e.g. "sigma", "rate", "alpha"

    def __call__(self, strength: float, generator: torch.Generator) -> Any:
        return self.make(strength, generator)


@dataclass
class Target:
    """What the attacker has: the trained client part (white-box attacks read its weights; black-box
    ones only query it), what the server received for the attacked inputs, and same-distribution
    auxiliary inputs (the training set), with the per-sample input shape."""

    client: nn.Module
    observed: list[Transfer]     # the eval-time activations of the attacked test inputs
    input_shape: tuple[int, ...]
    aux: Tensor                  # (N, ...) auxiliary inputs from the client's distribution
    is_image: bool


@dataclass
class Outcome:
    """A finished (or stopped) run: scores, the attacked inputs and their reconstruction, attributions."""

    setting: Setting
    accuracy: float
    dcor: float
    originals: Tensor            # (n, ...) attacked test inputs
    reconstruction: Tensor       # (n, ...) the attack's reconstruction of them
    attribution: Tensor          # (n, ...) integrated gradients of the activation norm
    scores: dict[str, float]     # mse, and psnr / ssim for images
    steps: int                   # training steps done
    total_steps: int             # training steps asked for
    stopped: bool = False
    feature_names: list[str] | None = None
    cached: dict[str, bool] = field(default_factory=dict)  # {"training": ..., "attack": ...} re-used


@dataclass
class _Trained:
    client: nn.Module
    accuracy: float
    dcor: float
    target: Target
    attribution: Tensor
    steps: int
    total_steps: int
    stopped: bool


@contextmanager
def _threads(n: int | None):
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ExplorerSession:
    """Runs settings with caches (see the module docstring).

    Args:
        defenses: name -> factory ``(strength, generator)`` or :class:`DefenseOption`.
        attacks: name -> ``fn(target, generator) -> reconstruction``.
        datasets: name -> loader (default :data:`DATASETS`; mnist only where its files are).
        n_attack: test inputs attacked and shown.
        n_eval: test inputs the distance correlation is computed on.
        cache_size: trained models (and as many attack results) kept, least recently used dropped.
        threads: torch intra-op threads during a run, restored after it; None leaves torch's setting.
            One by default: on 2 cores two threads save 10-40 % on the conv nets when the machine is
            idle but make the MLP clicks 30x slower, and every cold click 6-12x slower when other
            processes share the cores (benchmarks/explorer.py).
    """

    def __init__(self, *, defenses: Mapping[str, Any], attacks: Mapping[str, Callable], datasets: Mapping | None = None,
                 n_attack: int = 8, n_eval: int = 500, cache_size: int = 16, threads: int | None = 1):
        if not defenses or not attacks:
            raise ValueError("the explorer needs at least one defense (e.g. 'none') and one attack")
        self.defenses = {k: v if isinstance(v, DefenseOption) else DefenseOption(v) for k, v in defenses.items()}
        for name, fn in [*self.defenses.items(), *attacks.items()]:
            if not callable(fn):
                raise ValueError(f"{name!r} must be a callable factory, got {type(fn).__name__}")
        self.attacks = dict(attacks)
        self.loaders = dict(DATASETS if datasets is None else datasets)
        self.n_attack = validate.positive_int("n_attack", n_attack)
        self.n_eval = validate.positive_int("n_eval", n_eval)
        self.cache_size = validate.positive_int("cache_size", cache_size)
        self.threads = None if threads is None else validate.positive_int("threads", threads)
        self._data: dict[str, datasets.Dataset] = {}
        self._trained: OrderedDict[tuple, _Trained] = OrderedDict()
        self._attacked: OrderedDict[tuple, tuple[Tensor, dict]] = OrderedDict()
        self._lock = threading.Lock()
        self.trainings = 0       # models trained (cache misses), for tests and the status line
        self.attack_runs = 0

    # -- choices ----------------------------------------------------------------------------
    def dataset(self, name: str) -> datasets.Dataset:
        if name not in self.loaders:
            raise ValueError(f"unknown dataset {name!r}; choose one of {list(self.loaders)}")
        if name not in self._data:
            self._data[name] = self.loaders[name]()
        return self._data[name]

    def available_datasets(self) -> list[str]:
        """Dataset names offered here: mnist only when its files are in ``toolkit.data.default_root()``
        (checked without loading it; every dataset loads when first chosen)."""
        return [name for name in self.loaders if name not in PRESENT or PRESENT[name]()]

    def models_for(self, dataset: str) -> list[str]:
        ds = self.dataset(dataset)
        if not ds.is_image:
            return list(TABULAR_MODELS)
        return [m for m in IMAGE_MODELS if m != "lenet" or ds.shape[-1] >= 16]

    def build(self, dataset: str, model: str) -> nn.Sequential:
        ds = self.dataset(dataset)
        if model not in models.MODELS:
            raise ValueError(f"unknown model {model!r}; choose one of {sorted(models.MODELS)}")
        return models.build(model, **model_options(model, ds))

    def cuts_for(self, dataset: str, model: str) -> list[str]:
        return cut_layers(self.build(dataset, model))

    def check(self, s: Setting) -> Setting:
        """``s`` if every choice exists and fits the others; a ValueError in words otherwise."""
        if not isinstance(s, Setting):
            raise ValueError(f"a run takes a Setting, got {type(s).__name__}")
        self.dataset(s.dataset)
        if s.model not in self.models_for(s.dataset):
            raise ValueError(f"model {s.model!r} does not fit dataset {s.dataset!r}; choose one of "
                             f"{self.models_for(s.dataset)}")
        cuts = self.cuts_for(s.dataset, s.model)
        if s.cut not in cuts:
            raise ValueError(f"cut layer {s.cut!r} does not exist in {s.model} (on {s.dataset}); "
                             f"its layers you can cut after are {cuts}")
        if s.defense not in self.defenses:
            raise ValueError(f"unknown defense {s.defense!r}; choose one of {list(self.defenses)}")
        option = self.defenses[s.defense]
        validate.number(f"{s.defense} {option.parameter}", s.strength, low=option.low, high=option.high)
        if s.attack not in self.attacks:
            raise ValueError(f"unknown attack {s.attack!r}; choose one of {list(self.attacks)}")
        validate.non_negative_int("seed", s.seed)
        validate.positive_int("epochs", s.epochs)
        return s

    # -- running ----------------------------------------------------------------------------
    def run(self, setting: Setting, *, stop: threading.Event | None = None,
            on_progress: Callable[[int, int, str], None] | None = None) -> Outcome:
        """Train (or re-use), attack (or re-use) and score ``setting``.

        ``on_progress(done, total, what)`` is called after every training step and after the
        attack (total = training steps + 1); ``stop`` is checked after every training step.
        """
        s = self.check(setting)
        report = on_progress or (lambda done, total, what: None)
        with self._lock, _threads(self.threads):  # one run at a time: caches, seeds and threads are shared
            trained, reused = self._train(s, stop, report)
            key = s.attack_key
            if key in self._attacked and not trained.stopped:
                self._attacked.move_to_end(key)
                rec, scores = self._attacked[key]
                attack_reused = True
            else:
                rec, scores = self._attack(s, trained)
                attack_reused = False
                if not trained.stopped:
                    self._remember(self._attacked, key, (rec, scores))
            report(trained.total_steps + 1, trained.total_steps + 1, "done")
        ds = self.dataset(s.dataset)
        return Outcome(s, trained.accuracy, trained.dcor, ds.x_test[: self.n_attack], rec, trained.attribution, scores,
                       trained.steps, trained.total_steps, trained.stopped, ds.feature_names,
                       {"training": reused, "attack": attack_reused})

    def _remember(self, cache: OrderedDict, key: tuple, value: Any) -> None:
        cache[key] = value
        while len(cache) > self.cache_size:
            cache.popitem(last=False)

    def experiment(self, s: Setting) -> SplitExperiment:
        """The :class:`SplitExperiment` describing ``s``'s training (model, cut, epochs, optimizer)."""
        ds = self.dataset(s.dataset)
        return SplitExperiment(dataset=ds.name, model=s.model, model_options=model_options(s.model, ds), cut=s.cut,
                               epochs=s.epochs, n_eval=self.n_eval, record_training=False,  # only eval is read
                               **TRAINING[s.model])

    def _train(self, s: Setting, stop: threading.Event | None, report) -> tuple[_Trained, bool]:
        key = s.training_key
        if key in self._trained:
            self._trained.move_to_end(key)
            hit = self._trained[key]
            report(hit.total_steps, hit.total_steps + 1, "training (cached)")
            return hit, True
        ds, exp = self.dataset(s.dataset), self.experiment(s)
        made = self.defenses[s.defense](float(s.strength), torch.Generator().manual_seed(s.seed))
        sl, _ = exp.build(made, seed=s.seed, data=ds)
        client = sl.parties[0].modules[0]  # the client's part: the first stage's only module
        total = s.epochs * -(-sl.n_train // sl.config.batch_size)
        self.trainings += 1
        done = 0
        for _ in sl.train_steps(total):  # the one split training loop, one step at a time
            done += 1
            report(done, total + 1, "training")
            if stop is not None and stop.is_set():
                break
        sl.wire.recording = True  # the eval activations cross the wire: dCor and the attack read them
        accuracy = sl.evaluate()["accuracy"]
        dcor = exp.dcor(sl, ds)["dcor"]
        first = sl.wire.observed(by="server", kind="activations", phase="eval")[0]  # evaluation runs in order
        observed = [dataclasses.replace(first, tensor=first.tensor[: self.n_attack])]
        client.eval()
        target = Target(client, observed, ds.shape, ds.x_train, ds.is_image)
        from toolkit.attribution import attribute

        attribution = attribute(client, ds.x_test[: self.n_attack], target=None, method="integrated_gradients")
        trained = _Trained(client, accuracy, dcor, target, attribution, done, total, done < total)
        if not trained.stopped:
            self._remember(self._trained, key, trained)
        return trained, False

    def _attack(self, s: Setting, trained: _Trained) -> tuple[Tensor, dict[str, float]]:
        self.attack_runs += 1
        truth = self.dataset(s.dataset).x_test[: self.n_attack]
        rec = self.attacks[s.attack](trained.target, torch.Generator().manual_seed(s.seed))
        rec = torch.as_tensor(rec).detach().float()
        if rec.numel() != truth.numel():
            raise ValueError(f"attack {s.attack!r} returned {tuple(rec.shape)} for inputs {tuple(truth.shape)}")
        rec = rec.reshape(truth.shape)
        scores = {"mse": float(((rec - truth) ** 2).mean())}
        if trained.target.is_image:
            scores.update(psnr=float(metrics.psnr(rec, truth).mean()), ssim=float(metrics.ssim(rec, truth).mean()))
        return rec, scores
