"""Gradient defenses against DLG, naive and adaptive, and the task accuracy each costs.

DLG side (issue 5's setup): the sigmoid LeNet of Zhu et al. (2019) with their uniform(-0.5, 0.5)
init, one digit (upsampled to 32x32) per client, one FedAvg round of one local step (FedSGD). The
client lr is 1 by default, so the update that crosses is minus the gradient, which is what the DLG
paper perturbs (``--client-lr 0.1``: issue 5's lr; noise of variance v on that update is variance
100 v on the gradient). The defense is a Wire transform on kind ``"update"``. Two attackers:

- naive: DLG (``attacks.DLG``, its defaults) on what crossed, as if there were no defense;
- adaptive: DLG that knows the defense and its parameters. Pruning and quantization:
  ``defense=`` (matches only within the preimage: kept entries exactly, zeroed ones below the
  smallest kept magnitude, quantized ones within their bin). Noise and QSGD (randomized, unbiased):
  a server that sends the same weights ``--repeats`` times (the client's data unchanged) and averages
  that client's updates (``repeats="average"``: variance / repeats); against QSGD the bin-matching
  attacker did worse (6.1 dB median, 2 digits, where averaging 16 gives 16.8 dB).

Accuracy side: FedAvg on digits 8x8 (ConvNet, ``--clients`` IID clients, ``--rounds`` rounds of one
local epoch, batch 32, lr 0.1), the same defense on every update; test accuracy after the last
round, beside the run without defense.

Printed: defense, strength, naive PSNR and adaptive PSNR (median over ``--images`` digits, dB),
accuracy, and seconds.

Measured (defaults, 2 digits, 2 shared cores under load; medians; accuracy without defense 0.928):

    defense       strength           naive dB  adaptive dB  accuracy
    noise         variance 1e-4          23.4         35.5     0.919
    noise         variance 1e-3          14.0         25.6     0.911
    noise         variance 1e-2           5.0         15.9     0.858
    noise         variance 1e-1           4.2          5.7     0.547
    pruning       10% / 20% pruned  102.5 / 97.9  98.3 / 99.3  0.928
    pruning       50% pruned             32.2         96.3     0.931
    pruning       70% pruned             12.9         85.0     0.925
    pruning       90% pruned              4.2          7.6     0.897
    quantization  127 levels (INT8)      33.4         30.6     0.931
    quantization  7 levels (4-bit)        8.6          8.7     0.931
    quantization  QSGD 127 levels         5.1         16.8     0.931

    python benchmarks/gradient_defenses.py [--images 2] [--repeats 16] [--client-lr 1.0] [--rounds 20]
        [--only noise,pruning,quantization] [--skip-accuracy]
"""
from __future__ import annotations

import argparse
import statistics
import time

import sys  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

# benchmarks/defenses.py shares the package's name: keep this folder off sys.path, so that
# ``import defenses`` finds the package when this script runs as ``python benchmarks/<name>.py``
sys.path[:] = [p for p in sys.path if _Path(p or ".").resolve() != _Path(__file__).resolve().parent]

import torch

from attacks import DLG
from defenses.gradients import GradientNoise, GradientPruning, GradientQuantization
from toolkit import data, metrics, models, seed_everything
from toolkit.federated import FedConfig, FederatedAveraging
from toolkit.federated.probe import observe_one_sample
from toolkit.wire import Wire

POINTS = {  # family -> (strength label, defense factory(generator))
    "none": [("-", lambda g: None)],
    "noise": [(f"variance {v:g}", lambda g, v=v: GradientNoise(v, generator=g)) for v in (1e-4, 1e-3, 1e-2, 1e-1)],
    "pruning": [(f"{f:.0%} pruned", lambda g, f=f: GradientPruning(f)) for f in (0.1, 0.2, 0.5, 0.7, 0.9)],
    "quantization": [("127 levels (INT8)", lambda g: GradientQuantization(127)),
                     ("7 levels (4-bit)", lambda g: GradientQuantization(7)),
                     ("QSGD 127 levels", lambda g: GradientQuantization(127, stochastic=True, generator=g))],
}


def victim() -> torch.nn.Module:
    return models.init_uniform_(models.lenet(image_size=32, variant="dlg"), generator=torch.Generator().manual_seed(1))


def observe(model, ds, i: int, defense, lr: float, rounds: int = 1) -> list:
    """What the server received from client 0 (holding image ``i``) and sent it, over ``rounds``
    rounds in which the server sends the same weights every time (a malicious server's freeze)."""
    wire = observe_one_sample(model, ds, i, defense=defense, lr=lr, rounds=rounds)
    return wire.observed(by="server", kind="update") + wire.observed(sender="server", kind="weights")


def dlg_point(family: str, make, ds, images: list[int], lr: float, repeats: int) -> tuple[float, float, float]:
    """(median naive PSNR, median adaptive PSNR or nan, seconds) over ``images``."""
    naive, adaptive, t0 = [], [], time.perf_counter()
    for i in images:
        model = victim()
        defense = make(torch.Generator().manual_seed(100 + i))
        once = observe(model, ds, i, defense, lr)
        truth = ds.x_train[[i]]
        run = DLG(model, input_shape=(1, 32, 32), client_lr=lr).run(once, generator=torch.Generator().manual_seed(i))
        naive.append(float(metrics.psnr(run.reconstruction, truth)))
        averages = family == "noise" or getattr(defense, "stochastic", False)  # randomized: average repeats
        if family in ("pruning", "quantization") and not averages:
            attack = DLG(model, input_shape=(1, 32, 32), client_lr=lr, defense=defense)
            adaptive.append(float(metrics.psnr(attack.run(once, generator=torch.Generator().manual_seed(i))
                                               .reconstruction, truth)))
        elif averages:
            defense = make(torch.Generator().manual_seed(100 + i))
            many = observe(model, ds, i, defense, lr, rounds=repeats)
            attack = DLG(model, input_shape=(1, 32, 32), client_lr=lr, repeats="average")
            adaptive.append(float(metrics.psnr(attack.run(many, generator=torch.Generator().manual_seed(i))
                                               .reconstruction, truth)))
    med = statistics.median(adaptive) if adaptive else float("nan")
    return statistics.median(naive), med, time.perf_counter() - t0


def accuracy(make, clients: int, rounds: int) -> float:
    """Test accuracy of FedAvg on digits 8x8 with the defense on every update."""
    ds = data.load("digits")
    seed_everything(0)
    model = models.convnet(image_size=8)
    defense = make(torch.Generator().manual_seed(7))
    fl = FederatedAveraging(model, data.partition(ds, clients, "iid", seed=0),
                            config=FedConfig(batch_size=32, lr=0.1, eval_every=rounds),
                            wire=Wire(transforms=[defense] if defense is not None else [], record=False))
    return float(fl.fit(rounds)["accuracy"].dropna().iloc[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2, help="digits attacked per point (median reported)")
    parser.add_argument("--repeats", type=int, default=16, help="observations the noise attacker averages")
    parser.add_argument("--client-lr", type=float, default=1.0)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--only", default="noise,pruning,quantization")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ds = data.load("digits", image_size=32)
    images = list(range(args.images))
    print(f"DLG on {args.images} digits (32x32, sigmoid LeNet, FedSGD client lr {args.client_lr:g}); "
          f"noise attacker averages {args.repeats} observations; accuracy: FedAvg digits 8x8, "
          f"{args.clients} clients, {args.rounds} rounds")
    print(f"{'defense':13s} {'strength':18s} {'naive dB':>9s} {'adaptive dB':>12s} {'accuracy':>9s} {'seconds':>8s}")
    for family in ["none"] + args.only.split(","):
        for label, make in POINTS[family]:
            naive, adaptive, seconds = dlg_point(family, make, ds, images, args.client_lr, args.repeats)
            acc = float("nan") if args.skip_accuracy else accuracy(make, args.clients, args.rounds)
            print(f"{family:13s} {label:18s} {naive:9.1f} {adaptive:12.1f} {acc:9.3f} {seconds:8.1f}", flush=True)


if __name__ == "__main__":
    main()
