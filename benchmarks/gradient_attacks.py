"""Gradient inversion of federated updates: quality, seconds, and batched vs looped restarts.

The victim is the sigmoid LeNet of Zhu et al. (2019) with their uniform(-0.5, 0.5) initialization.
One FedAvg round (FedSGD: one local step, client lr 0.1) runs with one client per image; the
server attacks each client's update. Images: digits upsampled to 32x32, and the MNIST test set
from ../shared/data/mnist when present. Printed per attack: images at PSNR >= 40 dB, median and
worst PSNR, label accuracy, median seconds per image. For comparison, breaching's DLG on the first
10 MNIST test images with this LeNet recovered 7 of 10 (3 diverged), labels 2 of 10, and its
Inverting Gradients at 2,000 iterations a median 14.9 dB.

Then the restarts of Inverting Gradients (Adam phase) run as one batched optimization and as a
Python loop of single restarts, alternating, median of the repeats: the speed-up.

    python benchmarks/gradient_attacks.py [--images 10] [--attacks idlg,dlg,inverting_gradients] [--datasets digits,mnist]
        [--dtype float32|float64]   (the search's precision for every attack; default: each attack's own)
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from attacks import ATTACKS, InvertingGradients
from attacks.gradient_inversion import idlg_label
from attacks.gradient_matching import read_updates
from toolkit import data, metrics, models, seed_everything
from toolkit.federated import ClientData, FedConfig, FederatedAveraging

SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


def victim(size: int) -> torch.nn.Module:
    return models.init_uniform_(models.lenet(image_size=size, variant="dlg"), generator=torch.Generator().manual_seed(1))


def fedsgd_round(model, ds, idx: torch.Tensor) -> list:
    """One FedAvg round in which client i holds image idx[i]: what the server received and sent."""
    seed_everything(0)
    fl = FederatedAveraging(model, ClientData.from_indices(ds, [i.view(1) for i in idx]), test=ds,
                            config=FedConfig(batch_size=1, lr=0.1, record=True))
    fl.fit(1)
    return fl.wire.observed(by="server", kind="update") + fl.wire.observed(sender="server", kind="weights")


def quality(name: str, ds, size: int, attacks: list[str], n: int, dtype: torch.dtype | None = None) -> None:
    model = victim(size)
    idx = torch.randperm(len(ds.y_train), generator=torch.Generator().manual_seed(0))
    labels_idx = idx[:200]
    observed = fedsgd_round(model, ds, labels_idx)
    updates = read_updates(observed, model, lr=0.1, attack="benchmark")
    acc = sum(idlg_label(u.gradient) == int(y) for u, y in zip(updates, ds.y_train[labels_idx])) / len(updates)
    print(f"\n{name}: iDLG label accuracy over {len(updates)} single samples {acc:.3f}")
    print(f"{'attack':22s} {'>=40 dB':>9s} {'median dB':>10s} {'worst dB':>9s} {'labels':>7s} {'median s':>9s}")
    weights = [t for t in observed if t.kind == "weights"]
    shape = tuple(ds.shape)
    for attack in attacks:
        psnrs, correct, seconds = [], 0, []
        for i in range(n):
            sent = [t for t in weights if t.receiver == f"client:{i}"]
            t0 = time.perf_counter()
            result = ATTACKS[attack](model, input_shape=shape, client_lr=0.1, **({"dtype": dtype} if dtype else {})).run(
                [u for u in observed if u.kind == "update" and u.sender == f"client:{i}"] + sent,
                generator=torch.Generator().manual_seed(i))
            seconds.append(time.perf_counter() - t0)
            psnrs.append(float(metrics.psnr(result.reconstruction, ds.x_train[idx[i]][None])))
            correct += int(result.labels[0]) == int(ds.y_train[idx[i]])
        ok = sum(p >= 40 for p in psnrs)
        print(f"{attack:22s} {ok:4d}/{n:<4d} {statistics.median(psnrs):10.1f} {min(psnrs):9.1f} "
              f"{correct:3d}/{n:<3d} {statistics.median(seconds):9.2f}", flush=True)


def restarts_speedup(ds, restarts: int, steps: int, repeats: int) -> None:
    model = victim(32)
    observed = fedsgd_round(model, ds, torch.tensor([0]))

    def batched() -> None:
        InvertingGradients(model, input_shape=(1, 32, 32), client_lr=0.1, restarts=restarts, adam_steps=steps,
                           lbfgs_steps=0).run(observed, generator=torch.Generator().manual_seed(0))

    def looped() -> None:
        for r in range(restarts):
            InvertingGradients(model, input_shape=(1, 32, 32), client_lr=0.1, restarts=1, adam_steps=steps,
                               lbfgs_steps=0).run(observed, generator=torch.Generator().manual_seed(r))

    times = {"batched": [], "looped": []}
    for _ in range(repeats):  # alternate, so drift hits both
        for label, fn in (("batched", batched), ("looped", looped)):
            t0 = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t0)
    b, lo = statistics.median(times["batched"]), statistics.median(times["looped"])
    print(f"\nInverting Gradients, {restarts} restarts x {steps} Adam steps: batched {b:.2f} s, "
          f"looped {lo:.2f} s, speed-up {lo / b:.2f}x (median of {repeats})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=10, help="images per dataset and attack")
    parser.add_argument("--attacks", default="idlg,dlg,inverting_gradients")
    parser.add_argument("--datasets", default="digits,mnist")
    parser.add_argument("--restarts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models run fastest on one)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default=None,
                        help="the search's precision for every attack (default: each attack's own)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    torch.set_num_threads(args.threads)
    attacks = args.attacks.split(",") if args.attacks else []
    digits = data.load("digits", image_size=32)
    for name in args.datasets.split(","):
        if name == "digits" and attacks:
            quality("digits upsampled to 32x32", digits, 32, attacks, args.images, dtype)
        elif name == "mnist" and attacks:
            if SHARED_MNIST.is_dir():
                quality("MNIST (test set)", data.load("mnist", root=SHARED_MNIST), 28, attacks, args.images, dtype)
            else:
                print("\nMNIST: ../shared/data/mnist is absent, skipped")
    if args.restarts > 1:
        restarts_speedup(digits, args.restarts, args.steps, args.repeats)


if __name__ == "__main__":
    main()
