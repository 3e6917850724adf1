"""One benchmark suite for every aggregation scheme (issue 12): the same federated task under each
scheme and number of clients, one tidy row per (scheme, n).

A *scheme* is a factory ``scheme(config: FedConfig, n_clients: int) -> aggregator``: a
:class:`~toolkit.federated.WireAggregator` (secure, homomorphic, DP with secure aggregation, cohorts,
shuffling) or a plain :class:`~toolkit.federated.aggregators.Aggregator` (e.g. ``defenses.DPFedAvg``),
which here receives the updates in the clear (kind ``"update"``), as the engine's own upload sends them.
``toolkit`` never imports ``defenses`` or ``attacks``: schemes and the attack arrive as arguments.

Each row holds:

* **leakage**: a *probe round* (:func:`~toolkit.aggregation_probe.probe_round`) runs the scheme's own protocol once for the
  round's cohort, every client holding one sample and taking one SGD step (the single-sample,
  single-step update DLG-style attacks invert). What the server received from the target client
  (``client:0``, read from ``wire.observed(by="server")``) is what the attack gets: a float update as
  is, a ring vector (a masked input) decoded as the fixed-point numbers the manifest's ``frac`` and
  ring ``bits`` say, nothing for a ciphertext (``reading`` says which; then ``psnr`` is NaN). The
  ``leakage`` callable scores it (``psnr``, ``ssim``, ...; :func:`attack_leakage` wraps an attack);
  ``epsilon_rdp``, ``epsilon_prv`` and ``delta`` are the scheme's report after training, when it has one.
* **utility**: ``final_accuracy``, ``rounds_to_target`` and ``time_to_target`` (the simulated clock, NaN
  when not reached).
* **cost** per round: ``bytes_up`` / ``bytes_down`` per client (from the Wire), ``client_seconds``
  (per client: local training plus the protocol's client side) and ``server_seconds`` (the server and
  any helper party, e.g. a key holder). Compute is attributed by the Wire: the time before each send is
  charged to its sender. ``sim_seconds`` per round is per-client compute + server compute + bytes over
  the configured links + one latency per message a client sends.
* ``status``: ``"ok"``, ``"skipped"`` (not run: the estimate from a smaller n exceeded the budget) or
  ``"untrained"`` (probed, but training would exceed the budget), with the ``reason``; ``"partial"``
  when training stopped at the budget. Costs come from training rounds, else from the probe round
  (``measured``).

Example:
    >>> from toolkit.federated import PlainSum
    >>> frame = aggregation_suite({"plain": lambda config, n: PlainSum()}, SuiteConfig.smoke())
    >>> frame[["scheme", "clients", "status", "reading"]].values.tolist()
    [['plain', 3, 'ok', 'update (float32, 1,210 values)'], ['plain', 6, 'ok', 'update (float32, 1,210 values)']]
    >>> int(frame["bytes_up"].iloc[0]) == 4 * 1210  # each client sent its float32 update once
    True
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import pandas as pd
from torch import nn

from toolkit import data as datasets
from toolkit import models, validate
from toolkit.aggregation_probe import (ClockedWire, Probe, Scheme, TimedAggregation, attack_leakage, client_groups,
                                       probe_round, server_reading)
from toolkit.federated import ClientData, FedConfig, FederatedAveraging
from toolkit.progress import progress
from toolkit.seeding import seed_everything

__all__ = ["SuiteConfig", "Probe", "aggregation_suite", "probe_round", "attack_leakage", "server_reading",
           "plot_suite", "ClockedWire"]


IDENTITY = ["scheme", "clients", "cohort", "status", "reason", "reading", "protocol", "parameters"]
RESULTS = ["epsilon_rdp", "epsilon_prv", "delta", "final_accuracy", "rounds", "rounds_to_target", "time_to_target",
           "bytes_up", "bytes_down", "expansion", "client_seconds", "server_seconds", "messages", "sim_seconds",
           "measured", "seconds"]


@dataclass
class SuiteConfig:
    """The federated task every scheme runs, and the suite's budget and network model."""

    dataset: str = "mnist"               # a toolkit.data name (MNIST: 28x28 inputs)
    root: str | None = None              # its folder (toolkit.data.load's root; None: data.default_root())
    image_size: int | None = None        # resize the images (None: as stored)
    hidden: tuple[int, ...] = (128,)     # MLP hidden widths: 784-128-10 on MNIST is 101,770 parameters
    clients: tuple[int, ...] = (10, 100, 1000)  # numbers of clients n, the iid partition of the training set
    fraction: float = 1.0                # share of the n clients in each round's cohort
    rounds: int = 20                     # training rounds per (scheme, n)
    target_accuracy: float = 0.8         # rounds and simulated time until the test accuracy reaches it (plain FedAvg
                                         # on MNIST: round 2 at n = 10, about round 16 at n = 1,000)
    local_epochs: int = 1                # clients' passes over their data per round
    batch_size: int = 8                  # clients' local batch size (one step per round at n = 1,000 on MNIST)
    lr: float = 0.3                      # clients' SGD learning rate
    probe_lr: float = 0.1                # the probe round's single SGD step (the attack knows it)
    uplink_mbps: float = 10.0            # simulated client upload link, megabits per second
    downlink_mbps: float = 50.0          # simulated client download link
    latency: float = 0.05                # simulated seconds per message a client sends (one per protocol stage)
    budget_seconds: float = 900.0        # wall seconds one (scheme, n) may take (probe + training)
    seed: int = 0                        # model init, partition, sampling and every scheme's generator

    def __post_init__(self) -> None:
        self.clients = tuple(validate.positive_int("clients entries", n) for n in self.clients)
        self.hidden = tuple(validate.positive_int("hidden entries", h) for h in self.hidden)
        validate.positive_int("rounds", self.rounds)
        validate.number("target_accuracy", self.target_accuracy, low=0.0, high=1.0)
        for name in ("uplink_mbps", "downlink_mbps", "budget_seconds", "probe_lr"):
            validate.positive(name, getattr(self, name))
        validate.non_negative("latency", self.latency)
        self.fed_config()  # checks fraction, local_epochs, batch_size, lr, seed

    @classmethod
    def smoke(cls) -> SuiteConfig:
        """Digits (8x8), a 64-16-10 MLP (1,210 parameters), n = 3 and 6, two rounds: seconds."""
        return cls(dataset="digits", hidden=(16,), clients=(3, 6), rounds=2, target_accuracy=0.3, batch_size=32,
                   lr=0.3, budget_seconds=60.0)

    def fed_config(self, **changes: Any) -> FedConfig:
        """The engine's settings (no transcript: bytes are counted either way)."""
        return FedConfig(**{**dict(fraction=self.fraction, local_epochs=self.local_epochs, batch_size=self.batch_size,
                                   lr=self.lr, record=False, seed=self.seed), **changes})

    def load(self) -> datasets.Dataset:
        options = {"image_size": self.image_size} if self.image_size else {}
        return datasets.load(self.dataset, root=self.root, seed=self.seed, **options)

    def model(self, ds: datasets.Dataset) -> nn.Module:
        """A freshly seeded MLP for ``ds`` (the same initial weights for every scheme)."""
        seed_everything(self.seed)
        return models.mlp([math.prod(ds.shape), *self.hidden, ds.n_classes])


# -- the suite -------------------------------------------------------------------------------------
def aggregation_suite(schemes: Mapping[str, Scheme], config: SuiteConfig | None = None, *,
                      leakage: Callable[[Probe], Mapping[str, float]] | None = None,
                      show_progress: bool = False, **overrides: Any) -> pd.DataFrame:
    """Run every scheme at every number of clients; one row per (scheme, n) (see the module docstring).

    Args:
        schemes: name -> ``scheme(config, n_clients) -> aggregator``, called afresh for each run.
        config: the task (default ``SuiteConfig()``); ``overrides`` replace its fields
            (``clients=``, ``rounds=``, ``target_accuracy=``, ``seed=``, ...).
        leakage: scores a :class:`Probe` (e.g. :func:`attack_leakage` of DLG); None: no attack.

    Returns:
        The tidy frame; ``attrs["histories"]`` and ``attrs["manifests"]`` hold each run's history and
        the scheme's manifest under ``"<scheme>@<n>"``.
    """
    config = replace(config or SuiteConfig(), **overrides)
    if not isinstance(schemes, Mapping) or not schemes or not all(callable(s) for s in schemes.values()):
        raise ValueError("schemes must be a non-empty mapping name -> scheme(config, n_clients) -> aggregator")
    ds = config.load()
    rows, histories, manifests = [], {}, {}
    grid = [(name, n) for name in schemes for n in config.clients]
    measured: dict[str, list[tuple[int, float]]] = {name: [] for name in schemes}
    for name, n in progress(grid, show=show_progress, total=len(grid), desc="aggregation suite"):
        row, history, manifest = _cell(name, schemes[name], n, config, ds, leakage, measured[name])
        rows.append(row)
        if history is not None:
            histories[f"{name}@{n}"], manifests[f"{name}@{n}"] = history, manifest
    frame = pd.DataFrame(rows)
    leaks = [c for c in frame.columns if c not in IDENTITY + RESULTS]
    frame = frame.reindex(columns=IDENTITY + leaks + RESULTS)  # every column, NaN where not measured
    frame.attrs.update(histories=histories, manifests=manifests, config=asdict(config))
    return frame


def _estimate(measured: list[tuple[int, float]], n: int) -> tuple[float, float]:
    """(seconds a round at n is expected to take, the exponent used): the last measured round scaled as
    n^k, k fitted on the last two sizes and clamped to [1, 2] (2, i.e. O(n^2), from one size)."""
    if not measured:
        return 0.0, 0.0
    (n1, s1) = measured[-1]
    k = 2.0
    if len(measured) > 1 and measured[-2][0] != n1 and measured[-2][1] > 0 and s1 > 0:
        (n0, s0) = measured[-2]
        k = min(2.0, max(1.0, math.log(s1 / s0) / math.log(n1 / n0)))
    return s1 * (n / n1) ** k, k


def _cell(name: str, scheme: Scheme, n: int, config: SuiteConfig, ds: datasets.Dataset,
          leakage: Callable[[Probe], Mapping[str, float]] | None,
          measured: list[tuple[int, float]]) -> tuple[dict[str, Any], pd.DataFrame | None, dict | None]:
    m = max(1, round(config.fraction * n))
    row: dict[str, Any] = {"scheme": name, "clients": n, "cohort": m}
    estimate, k = _estimate(measured, n)
    if estimate > config.budget_seconds:
        n1, s1 = measured[-1]
        return {**row, "status": "skipped", "reason": (
            f"one round at n={n} estimated at {estimate:,.0f} s ({s1:.2f} s at n={n1} scaled as n^{k:.2f}), over the "
            f"budget of {config.budget_seconds:,.0f} s")}, None, None
    start = time.perf_counter()
    probe = probe_round(scheme, config, n, name=name, data=ds)
    measured.append((n, probe.seconds))
    row.update(status="ok", reason="", reading=probe.reading, protocol=probe.manifest.get("protocol"),
               parameters=int(sum(p.numel() for p in probe.model.parameters())))
    if leakage is not None and probe.observed:
        t = time.perf_counter()
        row.update({k: float(v) for k, v in leakage(probe).items()})
        row["attack_seconds"] = time.perf_counter() - t
    elif leakage is not None:
        row["psnr"] = math.nan
    history, measured_on = probe.history, "probe round"
    expected = probe.seconds * config.rounds
    spent = time.perf_counter() - start
    if spent + expected > config.budget_seconds:
        row.update(status="untrained", reason=(
            f"the probe round took {probe.seconds:.1f} s: {config.rounds} rounds would take about {expected:,.0f} s, "
            f"over the budget of {config.budget_seconds:,.0f} s"))
    else:
        history, stopped = _train(scheme, n, config, ds, start)
        measured_on = "training"
        if stopped:
            row.update(status="partial", reason=f"stopped after {len(history)} of {config.rounds} rounds at the budget "
                                                 f"of {config.budget_seconds:,.0f} s")
    row["measured"] = measured_on
    row.update(_costs(history, config, row["parameters"]))
    if measured_on == "training":
        row.update(_utility(history, config))
    last = history.iloc[-1]
    row.update({c: float(last[c]) for c in ("epsilon_rdp", "epsilon_prv", "delta") if c in history.columns})
    row["seconds"] = time.perf_counter() - start
    return row, history, probe.manifest


def _train(scheme: Scheme, n: int, config: SuiteConfig, ds: datasets.Dataset, start: float) -> tuple[pd.DataFrame, bool]:
    """Train ``config.rounds`` rounds (stopping early, True, when the next round would pass the budget)."""
    clients = ClientData.from_indices(ds, client_groups(ds, n, config.seed))
    fed = config.fed_config()
    wire = ClockedWire(clients.names, record=False)
    fl = FederatedAveraging(config.model(ds), clients, test=ds, config=fed, wire=wire, aggregator=TimedAggregation(scheme(fed, n)))
    last = 0.0
    while fl.round < config.rounds:
        if time.perf_counter() - start + last > config.budget_seconds:
            return fl.history, True
        t = time.perf_counter()
        fl.fit(rounds=1)
        last = time.perf_counter() - t
    return fl.history, False


def _round_seconds(history: pd.DataFrame, config: SuiteConfig) -> pd.Series:
    """The simulated duration of each round: per-client compute, server compute, the bytes over the
    client's links and one latency per message a client sends (the download included)."""
    per = history["clients"].clip(lower=1)
    return (history["client_seconds"] / per + history["server_seconds"]
            + history["client_bytes_up"] / per * 8 / (config.uplink_mbps * 1e6)
            + history["client_bytes_down"] / per * 8 / (config.downlink_mbps * 1e6)
            + config.latency * (history["client_messages"] + 1))


def _costs(history: pd.DataFrame, config: SuiteConfig, parameters: int) -> dict[str, float]:
    per = history["clients"].clip(lower=1)
    up = float((history["client_bytes_up"] / per).mean())
    return {"bytes_up": up, "bytes_down": float((history["client_bytes_down"] / per).mean()),
            "expansion": up / (4 * parameters),  # over one float32 update
            "client_seconds": float((history["client_seconds"] / per).mean()),
            "server_seconds": float(history["server_seconds"].mean()),
            "messages": float(history["client_messages"].mean()),
            "sim_seconds": float(_round_seconds(history, config).mean())}


def _utility(history: pd.DataFrame, config: SuiteConfig) -> dict[str, float]:
    accuracy = history["accuracy"]
    reached = (accuracy >= config.target_accuracy).to_numpy().nonzero()[0]
    clock = _round_seconds(history, config).cumsum()
    first = int(reached[0]) if len(reached) else None
    return {"final_accuracy": float(accuracy.iloc[-1]), "rounds": len(history),
            "rounds_to_target": math.nan if first is None else first + 1,
            "time_to_target": math.nan if first is None else float(clock.iloc[first])}


def _label_lifts(spots: dict) -> list[tuple[tuple[float, float], float, list[str]]]:
    """(point, upward offset in points, names) per label: a label that would sit on an earlier one
    (within a tenth of the log x range and 3% of the y range) moves up one line at a time; one
    naming the same schemes as a label within 8% of the y range is dropped."""
    points = [(v[0], list(dict.fromkeys(v[1:]))) for v in spots.values()]  # each scheme named once
    lx = [math.log10(max(p[0], 1e-300)) for p, _ in points]
    ys = [p[1] for p, _ in points]
    wx, wy = max(max(lx) - min(lx), 1e-9), max(max(ys) - min(ys), 1e-9)
    placed: list[tuple[float, float, float, list[str]]] = []  # label x, label y, its point's y, names
    out = []
    for (at, names), x in sorted(zip(points, lx), key=lambda item: (item[0][0][1], item[1])):
        fx, fy = (x - min(lx)) / wx, (at[1] - min(ys)) / wy
        if any(n == names and abs(fx - px) < 0.1 and abs(fy - py) < 0.08 for px, _, py, n in placed):
            continue  # the same schemes are already named there
        lift = 0.0
        while any(abs(fx - px) < 0.1 and abs(fy + lift / 250 - ly) < 0.03 for px, ly, _, _ in placed):
            lift += 8.0  # one x-small line; the axes are about 250 points high
        placed.append((fx, fy + lift / 250, fy, names))
        out.append((at, lift, names))
    return out


def plot_suite(frame: pd.DataFrame, *, x: str = "bytes_up", y: str = "psnr", colour: str = "final_accuracy",
               ax: Any = None) -> tuple[Any, Any]:
    """Leakage against bandwidth against accuracy: one point per measured (scheme, n), ``x`` on a log
    scale, ``colour`` as its colour (grey: not trained), one marker per n, each labelled with its
    scheme (the schemes of points on nearly the same spot share one label). Rows whose ``y`` is NaN
    (the server read no update: a ciphertext) sit on a dashed line below the lowest measured value.
    Returns (fig, ax)."""
    from toolkit.plots._base import LABELS, _axes

    for col in (x, y, "scheme", "clients"):
        if col not in frame.columns:
            raise ValueError(f"the suite's frame has no column {col!r}; it has {list(frame.columns)}")
    shown = frame[frame[x].notna()] if x in frame else frame.iloc[:0]
    if not len(shown):
        raise ValueError(f"no row of the suite's frame has a value of {x!r}")
    fig, ax = _axes(ax, (7, 4.5))
    ys = shown[y].astype(float)
    floor = (ys.min() - 3.0) if ys.notna().any() else 0.0
    markers = dict(zip(sorted(shown["clients"].unique()), "osD^vP*X"))
    c = shown[colour].astype(float) if colour in shown else pd.Series(math.nan, index=shown.index)
    points = None
    for n, mark in markers.items():
        sel = shown["clients"] == n
        trained = sel & c.notna()
        points = ax.scatter(shown.loc[trained, x], ys[trained].fillna(floor), c=c[trained], cmap="viridis", vmin=0,
                            vmax=1, marker=mark, s=60, edgecolors="k", label=f"n = {n:,}") if trained.any() else points
        if (sel & c.isna()).any():
            ax.scatter(shown.loc[sel & c.isna(), x], ys[sel & c.isna()].fillna(floor), facecolors="none",
                       edgecolors="grey", marker=mark, s=60, label=f"n = {n:,} (not trained)")
    spots: dict[tuple[float, float], list[str]] = {}  # schemes drawn on (nearly) the same spot share one label
    for _, r in shown.iterrows():
        at = (float(r[x]), float(r[y]) if r[y] == r[y] else floor)
        key = (round(math.log10(max(at[0], 1e-300)), 1), round(at[1], 0))
        spots.setdefault(key, [at]).append(str(r["scheme"]))
    logs = [math.log10(max(float(v), 1e-300)) for v in shown[x]]
    middle = (min(logs) + max(logs)) / 2 if logs else 0.0
    for at, lift, names in _label_lifts(spots):
        right = math.log10(max(at[0], 1e-300)) > middle  # labels of the right-hand points go to their left
        ax.annotate(", ".join(names), at, textcoords="offset points", xytext=(-5 if right else 5, 3 + lift),
                    ha="right" if right else "left", fontsize="x-small")
    if ys.isna().any():
        ax.axhline(floor, color="grey", linestyle="--", linewidth=0.8)
        ax.annotate("server reads no update", (0.01, floor), xycoords=("axes fraction", "data"), xytext=(0, -10),
                    textcoords="offset points", fontsize="x-small", color="grey")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # 1, 2, 5 per decade, no crowded minors
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e6:g} MB" if v >= 1e6 else
                                               f"{v / 1e3:g} kB" if v >= 1e3 else f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel({"bytes_up": "bytes each client uploads per round", "bytes_down": "bytes each client downloads "
                   "per round"}.get(x, LABELS.get(x, x)))
    ax.set_ylabel(LABELS.get(y, y) + (" on one client's update" if y == "psnr" else ""))
    if points is not None:
        fig.colorbar(points, ax=ax, label=LABELS.get(colour, colour).replace("accuracy", "accuracy after training"))
    ax.legend(fontsize="x-small", loc="best")
    ax.set_title("leakage, bandwidth and accuracy per scheme", fontsize="medium")
    return fig, ax
