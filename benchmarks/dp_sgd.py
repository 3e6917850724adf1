"""One DP-SGD epoch through our wrapper (defenses.dp.make_private) against Opacus called directly,
and the plain (non-private) epoch, on the same model and data, side by side in one run.

Workload: the digits MLP 64-128-10, 1,437 training rows, batch 64 (Poisson sampling at rate 1/23),
noise multiplier 1.0, clipping norm 1.0, SGD lr 0.1. Variants, each from the same initial weights:

* plain: a plain PyTorch epoch over the DataLoader (no per-sample gradients, no noise);
* Opacus directly: ``PrivacyEngine().make_private(...)`` and the same loop;
* our wrapper, same loop: ``make_private(...)`` and the same loop over its module / optimizer /
  loader (the difference is our accountant's step hook);
* our wrapper, fit(): ``DPSGD.fit(1)``, which also reports epsilon (RDP and PRV) after the epoch
  and scores loss and accuracy; the cost of one epsilon from each accountant is printed at the end;
* our wrapper, fit(), RDP only: ``make_private(..., report=("rdp",))``.

The variants alternate in rotating order; each figure is a median over repetitions. After the
same number of epochs the wrapper's epsilon and Opacus's ``get_epsilon`` are printed side by side.

    python benchmarks/dp_sgd.py --threads 1 [--reps 9]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import sys  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

# benchmarks/defenses.py shares the package's name: keep this folder off sys.path, so that
# ``import defenses`` finds the package when this script runs as ``python benchmarks/<name>.py``
sys.path[:] = [p for p in sys.path if _Path(p or ".").resolve() != _Path(__file__).resolve().parent]

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from defenses.dp import make_private
from toolkit import data, models

warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook is firing")
NOISE, CLIP, LR, BATCH = 1.0, 1.0, 0.1, 64


def loop(module, optimizer, loader):
    def epoch():
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(module(x), y).backward()
            optimizer.step()
    return epoch


def variants(ds):
    torch.manual_seed(0)
    net = models.mlp([64, 128, 10])
    dataset = TensorDataset(ds.x_train, ds.y_train)

    plain = copy.deepcopy(net)
    plain_loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(0))

    direct = copy.deepcopy(net)
    engine = PrivacyEngine(accountant="rdp")
    d_module, d_opt, d_loader = engine.make_private(
        module=direct, optimizer=torch.optim.SGD(direct.parameters(), lr=LR),
        data_loader=DataLoader(dataset, batch_size=BATCH, generator=torch.Generator().manual_seed(1)),
        noise_multiplier=NOISE, max_grad_norm=CLIP, noise_generator=torch.Generator().manual_seed(1))

    wrapped = []
    for report in (("rdp", "prv"), ("rdp", "prv"), ("rdp",)):
        m = copy.deepcopy(net)
        wrapped.append(make_private(m, torch.optim.SGD(m.parameters(), lr=LR), DataLoader(dataset, batch_size=BATCH),
                                    noise_multiplier=NOISE, max_grad_norm=CLIP, report=report,
                                    generator=torch.Generator().manual_seed(1)))
    runs = {
        "plain": loop(plain, torch.optim.SGD(plain.parameters(), lr=LR), plain_loader),
        "Opacus directly": loop(d_module, d_opt, d_loader),
        "our wrapper, same loop": loop(wrapped[0].module, wrapped[0].optimizer, wrapped[0].data_loader),
        "our wrapper, fit()": lambda: wrapped[1].fit(1),
        "our wrapper, fit(), RDP only": lambda: wrapped[2].fit(1),
    }
    return runs, engine, wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be a positive int, got {args.threads}")
        torch.set_num_threads(args.threads)
    ds = data.load("digits")
    runs, engine, wrapped = variants(ds)
    names = list(runs)
    for fn in runs.values():  # warm-up: one epoch each
        fn()
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(args.reps):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for name in order:
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
    epochs = args.reps + 1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; digits MLP 64-128-10, "
          f"{len(ds.y_train)} rows, batch {BATCH}, noise {NOISE}, clip {CLIP}; medians of {args.reps} alternating epochs")
    ref = statistics.median(times["plain"])
    direct = statistics.median(times["Opacus directly"])
    print(f"\n{'variant':30s} {'s/epoch':>9s} {'/ plain':>8s} {'/ Opacus':>9s}")
    for name in names:
        med = statistics.median(times[name])
        print(f"{name:30s} {med:9.4f} {med / ref:8.2f} {med / direct:9.3f}")
    print(f"\nepsilon after {epochs} epochs ({wrapped[0].accountant.steps} steps), delta 1e-5:")
    print(f"  {'Opacus directly':28s} engine {engine.get_epsilon(1e-5):.6f}")
    for label, dp in zip(names[2:], wrapped):
        print(f"  {label:28s} ours {dp.epsilon():.6f} | its engine {dp.engine.get_epsilon(1e-5):.6f} "
              f"| PRV {dp.epsilon(accountant='prv'):.6f}")
    for accountant in ("rdp", "prv"):  # what fit() adds per epoch: one epsilon per accountant it reports
        cost = []
        for _ in range(3):
            t0 = time.perf_counter()
            wrapped[1].epsilon(accountant=accountant)
            cost.append(time.perf_counter() - t0)
        print(f"  one {accountant.upper()} epsilon at {wrapped[1].accountant.steps} steps: {statistics.median(cost):.3f} s")


if __name__ == "__main__":
    main()
