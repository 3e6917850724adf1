"""NoPeek on MNIST-shaped data over seeds: accuracy, dCor and bias-corrected dCor at the cut.

Issue 10's acceptance asks dCor(X, Z) at the cut to fall from >= 0.9 without defense to <= 0.3
with NoPeek, within 2 accuracy points (published anchor: 0.95 -> 0.19). Setting of
notebooks/04_nopeek.ipynb: the MNIST test set from ../shared/data/mnist split 8,000 / 2,000 (digits
upsampled to 28x28 when absent), a client of conv-relu-pool twice ((32, 7, 7) at the cut), a server
MLP (1568-128-10), Adam 1e-3, batch 64, 10 epochs, through :class:`toolkit.experiments.
SplitExperiment` (seed s: initialization and data order). Each row reports ``dcor`` (V-statistic)
and ``dcor_unbiased`` (sqrt of the bias-corrected squared dCor, clipped at 0) between the 2,000
test images and what the server received for them.

``--wide N`` adds the one variation measured here: the NoPeek term computed on N samples per
step instead of the task's 64 (the step's batch plus N - 64 more of the client's own training
images drawn with the trial's generator, all through the client part, gradient included). The
batch V-statistic at n = 64 in 784 x 1568 dimensions is strongly biased upward, so the per-batch
term is a noisy, inflated target; a larger n is closer to the statistic scored on test data.

Measured (one thread each, several runs side by side on the 2-core machine; CPU seconds per run:
plain 27-32, wide 105-114): accuracy (points below the same seed's alpha 0), dcor / dcor_unbiased

    seed   alpha 0               plain alpha 9                 wide 256, alpha 7             wide 256, alpha 9
    0      0.9780  0.941/0.940   0.9585 (1.95) 0.288/0.264     0.9545 (2.35) 0.313/0.290     0.9525 (2.55) 0.288/0.264
    1      0.9800  0.938/0.937   0.9555 (2.45) 0.392/0.379     0.9655 (1.45) 0.322/0.297     0.9570 (2.30) 0.307/0.282
    2      0.9810  0.942/0.940   0.9575 (2.35) 0.395/0.382     0.9625 (1.85) 0.348/0.330     0.9585 (2.25) 0.343/0.323

(wide 256, alpha 6: 0.9570 (2.10) 0.314/0.292, 0.9665 (1.35) 0.330/0.306, 0.9570 (2.40) 0.354/0.335.)
Only seed 0 at plain alpha 9 meets dCor <= 0.3 within 2 points, and just (1.95). The wide term
brings seeds 1 and 2 from 0.39-0.40 to 0.31-0.35 at a smaller accuracy cost (alpha 7: 1.88
points on average, against 2.25 for plain alpha 9), at 3.5x the CPU, but no seed reaches 0.3 with it
within 2 points.

    python benchmarks/nopeek.py --threads 1 [--seeds 0,1,2] [--alphas 0,9] [--wide 256 --wide-alphas 6,9]
        [--smoke] [--csv out.csv]

(``--smoke``: 600 training images, 1 epoch.)
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# benchmarks/defenses.py would shadow the defenses package: keep this folder off the path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from defenses import NoPeek  # noqa: E402
from toolkit import data, metrics  # noqa: E402
from toolkit.experiments import SplitExperiment  # noqa: E402
from toolkit.seeding import seed_everything  # noqa: E402
from toolkit.split import Hook  # noqa: E402

SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


@dataclass
class NotebookSetting(SplitExperiment):
    """SplitExperiment with notebook 04's client and server parts."""

    def parts(self, seed: int = 0) -> tuple[nn.Module, nn.Module]:
        seed_everything(seed)
        client = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                               nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))  # (B, 32, 7, 7)
        server = nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))
        self.built = (client, server)  # the latest run's parts (WideNoPeek computes through the client)
        return client, server


class WideNoPeek(Hook):
    """alpha * dCor on ``size`` samples per step: the step's batch and ``size - B`` more of the
    party's own training inputs (drawn with ``generator``) through the client part that
    ``setting`` built for the run."""

    def __init__(self, alpha: float, size: int, setting: NotebookSetting, inputs: Tensor,
                 generator: torch.Generator):
        self.alpha, self.size, self.setting, self.inputs, self.generator = alpha, size, setting, inputs, generator

    def loss(self, step: int, inputs: Tensor, outputs: Tensor) -> Tensor | None:
        extra = torch.randint(len(self.inputs), (max(self.size - len(inputs), 0),), generator=self.generator)
        x = torch.cat([inputs, self.inputs[extra]])
        z = torch.cat([outputs, self.setting.built[0](self.inputs[extra])])
        return self.alpha * metrics.distance_correlation(x, z)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--alphas", default="0,9", help="plain NoPeek alphas")
    p.add_argument("--wide", type=int, default=0, help="samples of the wide NoPeek term (0: not run)")
    p.add_argument("--wide-alphas", default="9", help="alphas of the wide NoPeek term")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="600 / 200 images, 1 epoch")
    p.add_argument("--csv", default=None, help="also write the table here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    exp = NotebookSetting(dataset="mnist" if SHARED_MNIST.is_dir() else "digits",
                          root=str(SHARED_MNIST) if SHARED_MNIST.is_dir() else None,
                          model_options={} if SHARED_MNIST.is_dir() else {"image_size": 28},
                          epochs=1 if args.smoke else args.epochs, optimizer="adam", lr=1e-3, batch_size=64,
                          n_eval=2000, record_training=False)
    ds = exp.load() if SHARED_MNIST.is_dir() else data.load("digits", image_size=28)
    if args.smoke:
        ds = ds.subset(range(600))
    print(f"{'MNIST 8,000 / 2,000' if SHARED_MNIST.is_dir() else 'digits at 28x28'}; {len(ds.y_train)} train, "
          f"{len(ds.y_test)} test; {exp.epochs} epochs Adam 1e-3 batch 64; torch threads {torch.get_num_threads()}",
          flush=True)
    trials = [("plain", float(a)) for a in args.alphas.split(",") if a]
    if args.wide:
        trials += [(f"wide {args.wide}", float(a)) for a in args.wide_alphas.split(",")]
    rows = []
    for term, alpha in trials:
        for seed in seeds:
            start = time.process_time()
            if term == "plain":
                row = exp.run(NoPeek(alpha), seed=seed, data=ds)
            else:
                hook = WideNoPeek(alpha, args.wide, exp, ds.x_train, torch.Generator().manual_seed(seed))
                row = exp.run(hook, seed=seed, data=ds)
            row = {"term": term, "alpha": alpha, "seed": seed, **{k: row[k] for k in (
                "accuracy", "dcor", "dcor_unbiased", "train_seconds")}, "cpu_seconds": time.process_time() - start}
            rows.append(row)
            print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    frame = pd.DataFrame(rows)
    base = frame[(frame.term == "plain") & (frame.alpha == 0)].set_index("seed")["accuracy"]  # (none: NaN)
    frame["points_below_alpha0"] = [100 * (base.get(s, float("nan")) - a) for s, a in zip(frame.seed, frame.accuracy)]
    print(frame.round(4).to_string(index=False))
    print(frame.groupby(["term", "alpha"])[["accuracy", "dcor", "dcor_unbiased", "points_below_alpha0"]]
          .agg(["mean", "std"]).round(4).to_string())
    if args.csv:
        frame.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
