"""Figure 6: client-side compute and bandwidth per client, split learning against federated
learning, for 100 and 500 clients (Vepakomma, Gupta, Swedish, Raskar, "Split learning for health:
distributed deep learning without sharing raw patient data", arXiv 1812.00564, 2018, table of
per-client resources).

Compute: FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode`` for one training step of
VGG-16 on CIFAR-10-shaped inputs, per sample, times the p/K samples a client holds: federated
learning runs the whole model forward and backward; the split client runs its layers forward and
backward from the gradient the server returns (its first layer needs no input gradient).
Bandwidth: ResNet-50 on CIFAR-100-shaped inputs; bytes read off the Wire of one real split step
(activations up, gradients down, per sample) and of one real FedAvg round (the model down, the
update up), per client for one epoch, plus the client part's hand-off (Singh et al.'s eta*N) for
split learning. The inputs are random: FLOPs and bytes do not depend on pixel values.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from toolkit import data as datasets
from toolkit import models, validate
from toolkit.federated import FedConfig, FederatedAveraging
from toolkit.figures.architectures import ARCHITECTURES
from toolkit.figures.base import Figure, bytes_label, plain_log_ticks
from toolkit.parties import flat_state
from toolkit.progress import progress
from toolkit.seeding import seed_everything
from toolkit.split import SplitConfig, SplitNN

# The paper's table as the splitlearning.github.io slide (splitTable.png) shows it, cited to this
# paper by OpenMined/PySyft's split_neural_network Tutorial 1 (../shared/literature/split-learning.md).
# Compute in TFLOPs (VGG on CIFAR-10), bandwidth in GB (ResNet-50 on CIFAR-100), per client.
PUBLISHED = {
    ("compute", "large-batch SGD"): {100: 29.4e12, 500: 5.89e12},
    ("compute", "federated"): {100: 29.4e12, 500: 5.89e12},
    ("compute", "split"): {100: 0.1548e12, 500: 0.03e12},
    ("bandwidth", "large-batch SGD"): {100: 13e9, 500: 14e9},
    ("bandwidth", "federated"): {100: 3e9, 500: 2.4e9},
    ("bandwidth", "split"): {100: 6e9, 500: 1.2e9},
}
UNITS = {"compute": "FLOPs", "bandwidth": "bytes"}


def training_flops(model: torch.nn.Module, x: torch.Tensor, n_classes: int) -> int:
    """FLOPs of one forward and backward pass of ``model`` on ``x`` with a cross-entropy loss
    (what a federated client computes per batch), counted by FlopCounterMode."""
    y = torch.zeros(len(x), dtype=torch.long).remainder(n_classes)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return int(counter.get_total_flops())


def client_flops(client: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of a split client's step: its layers forward, then backward from the gradient at the
    cut (here ones: FLOPs do not depend on its values), counted by FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        z = client(x)
        z.backward(torch.ones_like(z))
    return int(counter.get_total_flops())


@dataclass
class SplitHealth(Figure):
    """Per-client compute and bandwidth for one epoch at 100 and 500 clients, beside the paper's."""

    name = "06_split_health"
    title = "Split learning for health: client compute and bandwidth, split against federated, 100 and 500 clients"
    source = ("Vepakomma, Gupta, Swedish, Raskar, \"Split learning for health: distributed deep learning without "
              "sharing raw patient data\", arXiv 1812.00564 (2018), table of per-client resources, as shown on "
              "splitlearning.github.io (splitTable.png)")
    anchors = ("Compute per client, VGG on CIFAR-10: split 0.1548 TFLOPs against 29.4 for federated and large-batch "
               "SGD (100 clients); 0.03 against 5.89 (500 clients)",
               "Bandwidth per client, ResNet-50 on CIFAR-100: split 6 GB, federated 3 GB, large-batch SGD 13 GB "
               "(100 clients); 1.2, 2.4 and 14 GB (500 clients)")

    clients: tuple[int, ...] = (100, 500)   # numbers of clients K, as in the paper's table
    dataset_size: int = 50_000              # p: the CIFAR-10 / CIFAR-100 training set, split evenly
    epochs: int = 1                          # epochs the per-client numbers are for (the paper does not say)
    image_size: int = 32                     # CIFAR images are 3x32x32
    width: float = 1.0                       # channel-width multiplier (1.0: the published VGG-16 and ResNet-50)
    compute_cut: str = "relu1_1"             # VGG-16: the split client keeps the layers up to this one (one conv)
    bandwidth_cut: str = "stem"              # ResNet-50: the split client keeps the stem (3x3 conv, BN, ReLU)
    batch: int = 4                           # samples FLOPs and bytes are measured on (scaled per sample)
    seed: int = 0                            # model initialization and the random inputs

    def __post_init__(self) -> None:
        self.clients = tuple(validate.positive_int("clients entries", k) for k in self.clients)
        for name in ("dataset_size", "epochs", "image_size", "batch"):
            validate.positive_int(name, getattr(self, name))
        validate.positive("width", self.width)
        if self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32 (VGG-16 pools five times), got {self.image_size}")
        if not self.clients or max(self.clients) > self.dataset_size:
            raise ValueError(f"clients must be non-empty and at most dataset_size ({self.dataset_size}), "
                             f"got {self.clients}")
        for arch, cut in (("vgg16", self.compute_cut), ("resnet50", self.bandwidth_cut)):
            names = models.layer_names(ARCHITECTURES[arch](width=0.05))
            if cut not in names[:-1]:
                raise ValueError(f"{arch} has no cut point {cut!r}; choose one of {names[:-1]}")

    @classmethod
    def smoke(cls) -> SplitHealth:
        """The same networks at 1/16 of their channel widths, two samples: seconds."""
        return cls(width=1 / 16, batch=2)

    def _inputs(self, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        return torch.rand(n, 3, self.image_size, self.image_size, generator=g)

    def compute(self) -> dict[str, float]:
        """FLOPs per sample of one training step: the whole VGG-16 (federated) and the split client."""
        seed_everything(self.seed)
        model = ARCHITECTURES["vgg16"](n_classes=10, width=self.width)
        x = self._inputs(self.batch)
        client, _ = models.cut(ARCHITECTURES["vgg16"](n_classes=10, width=self.width), at=self.compute_cut)
        return {"federated": training_flops(model, x, 10) / self.batch, "split": client_flops(client, x) / self.batch}

    def bandwidth(self) -> dict[str, float]:
        """Bytes from the Wire: per sample of split learning (activations + gradients, and labels),
        the client part's size (one hand-off), and per client of one FedAvg round."""
        seed_everything(self.seed)
        client, server = models.cut(ARCHITECTURES["resnet50"](n_classes=100, width=self.width), at=self.bandwidth_cut)
        x, g = self._inputs(2 * self.batch), torch.Generator().manual_seed(self.seed)
        y = torch.randint(0, 100, (2 * self.batch,), generator=g)
        ds = datasets.Dataset("cifar100-shaped", x, y, x[:2], y[:2], classes=[str(c) for c in range(100)])
        sl = SplitNN.vanilla(client, server, ds.subset(range(self.batch)),
                             config=SplitConfig(batch_size=self.batch, record=False, seed=self.seed))
        sl.fit(steps=1)
        kinds = sl.wire.ledger().groupby("kind")["bytes"].sum()
        seed_everything(self.seed)
        model = ARCHITECTURES["resnet50"](n_classes=100, width=self.width)
        parts = [ds.subset(range(k * self.batch, (k + 1) * self.batch)) for k in range(2)]
        fl = FederatedAveraging(model, parts, config=FedConfig(batch_size=self.batch, record=False, executor="sequential",
                                                               seed=self.seed))
        fl.fit(rounds=1)
        return {"split_per_sample": float(kinds["activations"] + kinds["gradients"]) / self.batch,
                "labels_per_sample": float(kinds.get("labels", 0)) / self.batch,
                "handoff": float(flat_state(client).numel() * 4),
                "federated": float(fl.wire.total_bytes) / len(parts),
                "parameters": float(flat_state(model).numel())}

    def run(self, *, show_progress: bool = False) -> pd.DataFrame:
        """One row per (quantity, K, method, source): ``value`` per client (FLOPs or bytes), for
        ``epochs`` epochs when measured, for the paper's whole training when published."""
        done = {step: getattr(self, step)() for step in progress(["compute", "bandwidth"], show=show_progress,
                                                                  desc="Vepakomma et al.: FLOPs and bytes")}
        flops, wire = done["compute"], done["bandwidth"]
        rows = []
        for k in self.clients:
            samples = self.dataset_size / k * self.epochs
            measured = {("compute", "federated"): flops["federated"] * samples,
                        ("compute", "split"): flops["split"] * samples,
                        ("bandwidth", "federated"): wire["federated"] * self.epochs,
                        ("bandwidth", "split"): (wire["split_per_sample"] * samples + wire["handoff"] * self.epochs)}
            for (quantity, method), value in measured.items():
                rows.append({"quantity": quantity, "clients": k, "method": method, "source": "measured",
                             "value": value, "unit": UNITS[quantity]})
            for (quantity, method), by_k in PUBLISHED.items():
                if k in by_k:
                    rows.append({"quantity": quantity, "clients": k, "method": method, "source": "published",
                                 "value": by_k[k], "unit": UNITS[quantity]})
        frame = pd.DataFrame(rows)
        frame.attrs.update({f"flops_per_sample_{m}": v for m, v in flops.items()})
        frame.attrs.update(wire)
        return frame

    @staticmethod
    def ratios(frame: pd.DataFrame) -> pd.DataFrame:
        """Split over federated, per (quantity, K, source): the comparison epochs do not change."""
        wide = frame.pivot_table(index=["quantity", "clients", "source"], columns="method", values="value")
        return (wide["split"] / wide["federated"]).rename("split_over_federated").reset_index()

    def plot(self, frame: pd.DataFrame):
        """Three panels: compute and bandwidth per client (bars: ours for one epoch, the paper's
        hatched), and split / federated for both (ours against the paper's)."""
        import matplotlib.pyplot as plt
        import numpy as np

        fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
        colors = {"split": "tab:blue", "federated": "tab:orange", "large-batch SGD": "tab:gray"}
        for ax, quantity in zip(axes[:2], ("compute", "bandwidth")):
            part = frame[frame.quantity == quantity]
            scale, unit = (1e12, "TFLOPs") if quantity == "compute" else bytes_label(part.value)
            bars = [(m, s) for s in ("measured", "published") for m in colors if len(part[(part.method == m) &
                                                                                        (part.source == s)])]
            width = 0.8 / len(bars)
            for i, (method, source) in enumerate(bars):
                rows = part[(part.method == method) & (part.source == source)].set_index("clients").reindex(self.clients)
                xs = np.arange(len(self.clients)) + (i - (len(bars) - 1) / 2) * width
                ax.bar(xs, rows.value / scale, width, color=colors[method], alpha=0.9 if source == "measured" else 0.45,
                       hatch=None if source == "measured" else "//", edgecolor="black", lw=0.5,
                       label=f"{method}, {'ours (' + str(self.epochs) + ' epoch)' if source == 'measured' else 'paper'}")
                for x, v in zip(xs, rows.value / scale):
                    ax.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=7, rotation=90,
                                xytext=(0, 2), textcoords="offset points")
            ax.set(xticks=range(len(self.clients)), xticklabels=[f"{k} clients" for k in self.clients], yscale="log",
                   ylabel=f"per client, {unit}", ylim=(None, part.value.max() / scale * 8),
                   title=("compute: VGG-16, CIFAR-10" if quantity == "compute" else "bandwidth: ResNet-50, CIFAR-100"))
            plain_log_ticks(ax)
            ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)
        ratio = self.ratios(frame)
        ax = axes[2]
        for quantity, marker in (("compute", "o"), ("bandwidth", "s")):
            for source, ls in (("measured", "-"), ("published", "--")):
                r = ratio[(ratio.quantity == quantity) & (ratio.source == source)].sort_values("clients")
                ax.plot(r.clients, r.split_over_federated, marker=marker, ls=ls,
                        color="tab:green" if quantity == "compute" else "tab:purple",
                        mfc="none" if source == "published" else None,
                        label=f"{quantity}, {'ours' if source == 'measured' else 'paper'}")
                for k, v in zip(r.clients, r.split_over_federated):
                    ax.annotate(f"{v:.3g}", (k, v), fontsize=7, xytext=(5, 3 if source == "published" else -9),
                                textcoords="offset points")
        ax.axhline(1.0, color="0.4", lw=0.8, ls=":")
        ax.set(xscale="log", yscale="log", xticks=list(self.clients), xlabel="clients K",
               ylabel="split / federated, per client", title="ratio (does not depend on epochs)")
        plain_log_ticks(ax)
        ax.set_xticks(list(self.clients), [str(k) for k in self.clients])
        ax.legend(fontsize=8)
        fig.suptitle(f"Per-client cost of split learning against federated learning, p = {self.dataset_size:,} samples "
                     f"(width x{self.width:g}); hatched: Vepakomma et al. 2018", fontsize=10)
        fig.tight_layout()
        return fig, axes
