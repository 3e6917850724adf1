"""Overhead of split learning through the Wire versus the same network trained monolithically.

One epoch of vanilla SplitNN (recording off, and on) against one epoch of the same network in a
plain PyTorch loop, measured side by side in one run: the variants alternate (in rotating order)
and each figure is a median over repetitions. Both loops log loss and accuracy per step the same
way (detached tensors, converted once per epoch), so the ratio isolates the split: two parties'
optimizers, the hand-off at the cut, and the Wire's counting and recording. A bare hand-off
(detach at the cut, two optimizers, no Wire) is measured beside them for calibration.

Workloads: LeNet-5 (cut after pool2) with batch 64 on MNIST-shaped images (the MNIST test set
from ../shared/data/mnist when present, else digits upsampled to 28x28), and the digits MLP
64-128-10 (cut after its hidden layer).

    python benchmarks/split_overhead.py [--reps 11]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from toolkit import data, models
from toolkit.split import SplitConfig, SplitNN

SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


def monolithic_epoch(net: nn.Module, ds, config: SplitConfig):
    """A plain PyTorch epoch with the same optimizer, data order and per-step logging."""
    opt = config.make_optimizer()(net.parameters())
    g = torch.Generator().manual_seed(config.seed)
    x_all, y_all = ds.x_train, ds.y_train

    def epoch():
        stats = []
        for idx in torch.randperm(len(y_all), generator=g).split(config.batch_size):
            x, y = x_all[idx], y_all[idx]
            opt.zero_grad(set_to_none=True)
            out = net(x)
            loss = nn.functional.cross_entropy(out, y)
            loss.backward()
            opt.step()
            stats.append((loss.detach(), (out.detach().argmax(1) == y).sum()))
        return torch.stack([s[0] for s in stats]).tolist(), torch.stack([s[1] for s in stats]).tolist()

    return epoch


def handoff_epoch(net: nn.Module, at, ds, config: SplitConfig):
    """The bare hand-off, no Wire: detach at the cut, two optimizers, two backward calls."""
    client, server = models.cut(net, at=at)
    opt_c, opt_s = config.make_optimizer()(client.parameters()), config.make_optimizer()(server.parameters())
    g = torch.Generator().manual_seed(config.seed)
    x_all, y_all = ds.x_train, ds.y_train

    def epoch():
        stats = []
        for idx in torch.randperm(len(y_all), generator=g).split(config.batch_size):
            x, y = x_all[idx], y_all[idx]
            opt_c.zero_grad(set_to_none=True)
            opt_s.zero_grad(set_to_none=True)
            z = client(x)
            z_server = z.detach().requires_grad_()
            out = server(z_server)
            loss = nn.functional.cross_entropy(out, y)
            loss.backward()
            z.backward(z_server.grad)
            opt_s.step()
            opt_c.step()
            stats.append((loss.detach(), (out.detach().argmax(1) == y).sum()))
        return torch.stack([s[0] for s in stats]).tolist(), torch.stack([s[1] for s in stats]).tolist()

    return epoch


def split_epoch(net: nn.Module, at, ds, config: SplitConfig):
    sl = SplitNN.vanilla(*models.cut(net, at=at), ds, config=config)
    return sl.train_epoch


def measure(workload: str, make_net, at, ds, reps: int) -> list[dict]:
    base = SplitConfig(lr=0.01, batch_size=64)
    torch.manual_seed(0)
    net = make_net()
    variants = {
        "monolithic": monolithic_epoch(copy.deepcopy(net), ds, base),
        "bare hand-off, no Wire": handoff_epoch(copy.deepcopy(net), at, ds, base),
        "split, recording off": split_epoch(copy.deepcopy(net), at, ds, SplitConfig(lr=0.01, batch_size=64, record=False)),
        "split, recording on": split_epoch(copy.deepcopy(net), at, ds, base),
    }
    names = list(variants)
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for name in order:
            t0 = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t0)
    steps = -(-len(ds.y_train) // base.batch_size)
    ref = statistics.median(times["monolithic"])
    rows = []
    for name in names:
        med = statistics.median(times[name])
        rows.append({"workload": workload, "variant": name, "epoch_s": med, "ratio": med / ref,
                     "overhead_us_per_step": (med - ref) / steps * 1e6, "steps": steps})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    if SHARED_MNIST.is_dir():
        mnist = data.load("mnist", root=SHARED_MNIST)
        source = f"MNIST test set ({len(mnist.y_train)} training images after its 80/20 split)"
    else:
        mnist = data.load("digits", image_size=28)
        source = f"digits upsampled to 28x28 ({len(mnist.y_train)} images; ../shared absent)"
    digits = data.load("digits")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {args.reps} alternating runs")
    print(f"LeNet data: {source}")
    rows = measure("LeNet-5, batch 64", models.lenet, "pool2", mnist, args.reps)
    rows += measure("digits MLP 64-128-10, batch 64", lambda: models.mlp([64, 128, 10]), "act1", digits, args.reps * 3)
    print(f"\n{'workload':34s} {'variant':22s} {'s/epoch':>9s} {'ratio':>7s} {'us/step over':>13s}")
    for r in rows:
        print(f"{r['workload']:34s} {r['variant']:22s} {r['epoch_s']:9.4f} {r['ratio']:7.3f} "
              f"{r['overhead_us_per_step']:13.1f}")
    lenet_off = next(r for r in rows if r["workload"].startswith("LeNet") and r["variant"] == "split, recording off")
    verdict = "meets" if lenet_off["ratio"] <= 1.05 else "MISSES"
    print(f"\nLeNet batch 64, recording off: ratio {lenet_off['ratio']:.3f} ({verdict} the 1.05 target)")


if __name__ == "__main__":
    main()
