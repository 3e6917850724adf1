"""Figure 5: split learning against federated learning communication (Singh, Vepakomma, Gupta,
Raskar, "Detailed comparison of communication efficiency of split learning and federated
learning", arXiv 1909.09145, 2019), measured from the Wire beside the paper's formulas.

The paper's symbols: K clients, p samples in all, q values per sample at the cut layer, N model
parameters, eta the fraction of them the client holds. Per epoch, split learning with client
weight sharing moves ``2(p/K)q + eta*N`` values per client (activations up, gradients down, one
hand-off of the client part) and ``2pq + eta*N*K`` in all; federated learning (one local epoch per
round) ``2N`` per client (the model down, the update up) and ``2NK`` in all. We run both: split
learning as :class:`~toolkit.split.Relay` (round-robin with peer hand-off, Gupta & Raskar 2018) and
FedAvg as :class:`~toolkit.federated.FederatedAveraging`, on synthetic MNIST-shaped data (bytes do
not depend on the values), and read the bytes off the Wire: float32, 4 bytes a value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from toolkit import data as datasets
from toolkit import models, validate
from toolkit.federated import FedConfig, FederatedAveraging
from toolkit.figures.base import Figure, bytes_label, crossover, plain_log_ticks
from toolkit.parties import flat_state
from toolkit.progress import progress
from toolkit.seeding import seed_everything
from toolkit.split import Relay, SplitConfig

BYTES_PER_VALUE = 4  # float32 on the wire


def split_values(p: float, clients: float, q: float, n: float, eta: float) -> tuple[float, float]:
    """Singh et al. (2019), Table 1, split learning with client weight sharing: values per client
    ``2(p/K)q + eta*N`` and in total ``2pq + eta*N*K``, per epoch.

    Example:
        >>> split_values(1000, 10, 32, 5000, 0.5)
        (8900.0, 89000.0)
    """
    per_client = 2 * (p / clients) * q + eta * n
    return float(per_client), float(per_client * clients)


def federated_values(clients: float, n: float) -> tuple[float, float]:
    """Singh et al. (2019), Table 1, federated learning: ``2N`` values per client, ``2NK`` in total."""
    return float(2 * n), float(2 * n * clients)


def crossover_dataset_size(clients: float, q: float, n: float, eta: float) -> float:
    """The dataset size p below which split learning moves fewer values than federated learning
    at K clients: ``2(p/K)q + eta*N = 2N``, so ``p = (2 - eta) N K / (2q)``."""
    return float((2 - eta) * n * clients / (2 * q))


def crossover_clients(p: float, q: float, n: float, eta: float) -> float:
    """The number of clients K above which split learning moves fewer values than federated
    learning for p samples in all: ``K = 2pq / ((2 - eta) N)``."""
    return float(2 * p * q / ((2 - eta) * n))


def synthetic(n_train: int, features: int, classes: int, *, generator: torch.Generator) -> datasets.Dataset:
    """Gaussian inputs with uniform labels (a stand-in of the right shape: bytes ignore values)."""
    x = torch.randn(n_train + 16, features, generator=generator)
    y = torch.randint(0, classes, (n_train + 16,), generator=generator)
    return datasets.Dataset("synthetic", x[:n_train], y[:n_train], x[n_train:], y[n_train:],
                            classes=[str(c) for c in range(classes)])


@dataclass
class SinghCommunication(Figure):
    """Bytes per client and in total as K and p grow, measured and by formula, with the crossover."""

    name = "05_singh_communication"
    title = "Split learning against federated learning communication, as clients and data grow"
    source = ("Singh, Vepakomma, Gupta, Raskar, \"Detailed comparison of communication efficiency of split "
              "learning and federated learning\", arXiv 1909.09145 (2019), Table 1 (as reviews quote it: "
              "../shared/literature/federated.md, section 7; the PDF text was not retrieved)")
    anchors = ("Split learning with client weight sharing: 2(p/K)q + eta*N values per client, 2pq + eta*N*K in total",
               "Federated learning: 2N values per client, 2KN in total",
               "Split learning is cheaper iff p/K < (2 - eta)N/(2q): more clients or bigger models favour split "
               "learning, more data per client favours federated learning (abstract)")

    clients: tuple[int, ...] = (2, 5, 10, 20, 50, 100)   # K swept with the dataset size fixed
    dataset_size: int = 10_000                            # p in the sweep over K
    dataset_sizes: tuple[int, ...] = (1_000, 2_000, 5_000, 10_000, 20_000, 50_000)  # p swept with K fixed
    fixed_clients: int = 10                               # K in the sweeps over p and over the model size
    server_widths: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)  # the last hidden width, swept with
                                                          # p = dataset_size and K = fixed_clients: the server's
                                                          # layers grow (N from 218k to 1.29M), the cut stays
    features: int = 784                                   # input values per sample (MNIST-shaped, 28x28)
    hidden: tuple[int, ...] = (256, 256)                  # MLP hidden widths: N = 269,322 on 784 inputs
    classes: int = 10                                     # output classes
    cut: int = 2                                          # the client keeps the layers before this index
                                                          # (flatten, fc1): q = hidden[0], eta = 0.75
    batch_size: int = 64                                  # samples per step, both protocols
    lr: float = 0.05                                      # SGD learning rate, both protocols
    seed: int = 0                                         # data, model initialization and data order

    def __post_init__(self) -> None:
        self.clients = tuple(validate.positive_int("clients entries", k) for k in self.clients)
        self.dataset_sizes = tuple(validate.positive_int("dataset_sizes entries", p) for p in self.dataset_sizes)
        self.hidden = tuple(validate.positive_int("hidden entries", h) for h in self.hidden)
        self.server_widths = tuple(validate.positive_int("server_widths entries", h) for h in self.server_widths)
        for name in ("dataset_size", "fixed_clients", "features", "classes", "cut", "batch_size"):
            validate.positive_int(name, getattr(self, name))
        validate.positive("lr", self.lr)
        for what, ks, ps in (("clients", self.clients, [self.dataset_size]),
                             ("dataset_sizes", [self.fixed_clients], self.dataset_sizes),
                             ("server_widths", [self.fixed_clients], [self.dataset_size] * len(self.server_widths))):
            if len(ks) * len(ps) < 2:
                raise ValueError(f"{what} needs at least two values to draw a curve")
            if min(ks) < 2:
                raise ValueError(f"split learning's relay needs at least 2 clients, got {min(ks)} in the {what} sweep")
            if min(ps) < 2 * max(ks):
                raise ValueError(f"the {what} sweep gives a client fewer than 2 samples ({min(ps)} samples, "
                                 f"{max(ks)} clients)")
        if not 1 <= self.cut <= len(self.hidden) * 2 - 1:
            raise ValueError(f"cut must leave the last hidden layer (whose width server_widths sweeps) to the server: "
                             f"1 to {len(self.hidden) * 2 - 1}, got {self.cut}")

    @classmethod
    def smoke(cls) -> SinghCommunication:
        """64 inputs, a 64-32-32-10 MLP, K in 2-16, p in 100-800, server widths 8-512: a few seconds."""
        return cls(clients=(2, 4, 8, 16), dataset_size=600, dataset_sizes=(100, 200, 400, 800), fixed_clients=4,
                   server_widths=(8, 32, 128, 512), features=64, hidden=(32, 32), batch_size=32)

    def parts(self, width: int | None = None) -> tuple[torch.nn.Module, torch.nn.Module]:
        """The client's and the server's parts of the (seeded) MLP; ``width`` replaces the last
        hidden width (None: ``hidden`` as it is)."""
        hidden = self.hidden if width is None else (*self.hidden[:-1], width)
        seed_everything(self.seed)
        return models.cut(models.mlp([self.features, *hidden, self.classes]), at=self.cut)

    def shape(self, width: int | None = None) -> dict[str, float]:
        """The paper's model symbols for our model: N, q and eta (and N_client = eta N)."""
        client, server = self.parts(width)
        n_client, n = flat_state(client).numel(), flat_state(client).numel() + flat_state(server).numel()
        q = int(client(torch.zeros(1, self.features)).numel())
        return {"N": n, "q": q, "eta": n_client / n, "N_client": n_client}

    def _data(self, p: int, k: int) -> list[datasets.Dataset]:
        ds = synthetic(p, self.features, self.classes, generator=torch.Generator().manual_seed(self.seed))
        return datasets.partition(ds, k, seed=self.seed)

    def measure_split(self, p: int, k: int, width: int | None = None) -> dict[str, float]:
        """Bytes of one steady-state epoch of the relay (its second: the first has K-1 hand-offs,
        every later one K), by kind; ``bytes`` counts what the formula does (no labels)."""
        client, server = self.parts(width)
        config = SplitConfig(batch_size=self.batch_size, lr=self.lr, seed=self.seed, record=False)
        relay = Relay(client, server, self._data(p, k), config=config)
        relay.fit(1)
        before = relay.wire.ledger().groupby("kind")["bytes"].sum()
        relay.fit(1)
        kinds = (relay.wire.ledger().groupby("kind")["bytes"].sum() - before).to_dict()
        row = {f"bytes_{kind}": float(kinds.get(kind, 0)) for kind in ("activations", "gradients", "weights", "labels")}
        row["bytes"] = row["bytes_activations"] + row["bytes_gradients"] + row["bytes_weights"]
        return row

    def measure_federated(self, p: int, k: int, width: int | None = None) -> dict[str, float]:
        """Bytes of one FedAvg round (every client, one local epoch), by kind."""
        client, server = self.parts(width)
        config = FedConfig(batch_size=self.batch_size, lr=self.lr, seed=self.seed, record=False)
        fl = FederatedAveraging(torch.nn.Sequential(*client, *server), self._data(p, k), config=config)
        fl.fit(rounds=1)
        kinds = fl.wire.ledger().groupby("kind")["bytes"].sum().to_dict()
        return {"bytes_weights": float(kinds.get("weights", 0)), "bytes_update": float(kinds.get("update", 0)),
                "bytes": float(fl.wire.total_bytes)}

    def grids(self) -> dict[str, list[tuple[int, int, int]]]:
        """The measured points of each sweep, as (p, K, last hidden width)."""
        width = self.hidden[-1]
        return {"clients": [(self.dataset_size, k, width) for k in self.clients],
                "dataset_size": [(p, self.fixed_clients, width) for p in self.dataset_sizes],
                "parameters": [(self.dataset_size, self.fixed_clients, h) for h in self.server_widths]}

    @staticmethod
    def _row(sweep: str, p: float, k: float, shape: dict[str, float], method: str, source: str, per: float,
             total: float, **extra: float) -> dict:
        return {"sweep": sweep, "clients": k, "dataset_size": p, "parameters": shape["N"], "eta": shape["eta"],
                "method": method, "source": source, "bytes": total, "bytes_per_client": per, **extra}

    def _formula_rows(self, sweep: str, points: list[tuple[float, float, dict[str, float]]]) -> list[dict]:
        rows = []
        for p, k, shape in points:
            for method, (per, total) in (("split", split_values(p, k, shape["q"], shape["N"], shape["eta"])),
                                         ("federated", federated_values(k, shape["N"]))):
                rows.append(self._row(sweep, p, k, shape, method, "formula", per * BYTES_PER_VALUE, total * BYTES_PER_VALUE))
        return rows

    def run(self, *, show_progress: bool = False) -> pd.DataFrame:
        """One row per (sweep, point, method, source): ``bytes`` in total and ``bytes_per_client``
        (total / K, as the paper counts), with the point's K, p, N (``parameters``) and eta;
        measured rows add their bytes by kind. The formula is evaluated at the measured points and on
        a dense grid between them. ``frame.attrs`` holds N, q and eta of the base model and the
        crossovers (formula and measured)."""
        grids = self.grids()
        jobs = [(sweep, *point, method) for sweep, grid in grids.items() for point in grid
                for method in ("split", "federated")]
        rows, shapes = [], {h: self.shape(h) for h in {*self.server_widths, self.hidden[-1]}}
        for sweep, p, k, h, method in progress(jobs, show=show_progress, desc="Singh et al.: relay and FedAvg"):
            got = (self.measure_split if method == "split" else self.measure_federated)(p, k, h)
            total = got.pop("bytes")
            rows.append(self._row(sweep, p, k, shapes[h], method, "measured", total / k, total, **got))
        base = shapes[self.hidden[-1]]
        for sweep, grid in grids.items():
            if sweep == "parameters":  # N grows with the server's layers: the client part (eta N) and q stay
                ns = [shapes[h]["N"] for _, _, h in grid]
                dense = sorted({*np.geomspace(min(ns), max(ns), 60).tolist(), *ns})
                points = [(grid[0][0], grid[0][1], {**base, "N": n, "eta": base["N_client"] / n}) for n in dense]
            else:
                axis = 1 if sweep == "clients" else 0
                xs = [g[axis] for g in grid]
                dense = sorted({*np.geomspace(min(xs), max(xs), 60).tolist(), *xs})
                points = [(grid[0][0], x, base) if axis else (x, grid[0][1], base) for x in dense]
            rows += self._formula_rows(sweep, points)
        frame = pd.DataFrame(rows)
        frame.attrs.update(base)
        frame.attrs["crossover"] = self.crossovers(frame)
        return frame

    def crossovers(self, frame: pd.DataFrame) -> dict[str, float]:
        """Where split and federated cross in each sweep: the formula's closed form and the
        interpolation of the measured curves (NaN when they do not cross in the sweep's range).
        Over the model size, split's per-client bytes 2(p/K)q + N_client stay put while federated's
        2N grow: they cross at N = (p/K)q + N_client/2."""
        shape = {k: frame.attrs.get(k) for k in ("N", "q", "eta", "N_client")}
        if any(v is None for v in shape.values()):
            shape = self.shape()
        q, n, eta = shape["q"], shape["N"], shape["eta"]
        out = {"clients_formula": crossover_clients(self.dataset_size, q, n, eta),
               "dataset_size_formula": crossover_dataset_size(self.fixed_clients, q, n, eta),
               "parameters_formula": float(self.dataset_size / self.fixed_clients * q + shape["N_client"] / 2)}
        for sweep in ("clients", "dataset_size", "parameters"):
            m = frame[(frame.sweep == sweep) & (frame.source == "measured")]
            split = m[m.method == "split"].sort_values(sweep)
            fed = m[m.method == "federated"].sort_values(sweep)
            out[f"{sweep}_measured"] = (crossover(split[sweep], split.bytes_per_client, fed.bytes_per_client)
                                        if len(split) >= 2 and len(split) == len(fed) else math.nan)
        return out

    def plot(self, frame: pd.DataFrame):
        """3 x 2 log-log panels: rows the sweeps (over K, p and N), columns per client and total;
        the formulas as lines, the Wire's counts as markers, the crossover as a dotted line."""
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(3, 2, figsize=(11, 11.5))
        cross = frame.attrs.get("crossover") or self.crossovers(frame)
        colors = {"split": "tab:blue", "federated": "tab:orange"}
        xlabels = {"clients": f"clients K (p = {self.dataset_size:,} samples in all)",
                   "dataset_size": f"dataset size p, samples in all (K = {self.fixed_clients} clients)",
                   "parameters": f"model parameters N (the server's layers grow; K = {self.fixed_clients}, "
                                 f"p = {self.dataset_size:,})"}
        for r, sweep in enumerate(("clients", "dataset_size", "parameters")):
            part = frame[frame.sweep == sweep]
            for c, column in enumerate(("bytes_per_client", "bytes")):
                ax = axes[r, c]
                scale, unit = bytes_label(part[column])
                for method, color in colors.items():
                    f = part[(part.method == method) & (part.source == "formula")].sort_values(sweep)
                    m = part[(part.method == method) & (part.source == "measured")].sort_values(sweep)
                    ax.plot(f[sweep], f[column] / scale, color=color, label=f"{method}: paper's formula")
                    ax.plot(m[sweep], m[column] / scale, "o" if method == "split" else "s", color=color,
                            mfc="none", ms=8, label=f"{method}: measured on the Wire")
                x = cross.get(f"{sweep}_formula", math.nan)
                if math.isfinite(x):
                    ax.axvline(x, color="0.3", ls=":", lw=1.2)
                    ax.annotate(f"crossover {x:,.1f}\n(measured points: {cross.get(f'{sweep}_measured', math.nan):,.1f})",
                                (x, 0.97), xycoords=("data", "axes fraction"), ha="left", va="top", fontsize=8,
                                xytext=(4, 0), textcoords="offset points")
                    y = math.exp(np.interp(math.log(x), np.log(f[sweep]), np.log(f[column] / scale)))
                    ax.plot([x], [y], "kx", ms=9, mew=2, label="crossover (formula)")
                ax.set(xscale="log", yscale="log", xlabel=xlabels[sweep],
                       ylabel=f"{'per client' if c == 0 else 'total'}, {unit} per epoch")
                ax.grid(True, which="major", alpha=0.3)
                plain_log_ticks(ax)
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
        attrs = frame.attrs
        fig.suptitle(f"Split learning (relay, weight sharing) against FedAvg: bytes per epoch, float32\nbase "
                     f"MLP N = {attrs.get('N', 0):,} parameters, cut q = {attrs.get('q', 0):,} values, "
                     f"eta = {attrs.get('eta', 0):.3f}; lines: Singh et al. 2019 Table 1", fontsize=10)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        return fig, axes
