"""Cost of splintering per decoy count (bytes on the Wire, seconds), beside the plain computation,
and the span attack's error on what the server saw, measured side by side in one run.

(i)   inner products of 64 digits (D = 64) with 1,000 records: bytes up/down, seconds (median
      over repetitions), span-attack MSE/PSNR/cosine against the truth (defenses.splintering.decoy_sweep);
(ii)  the inverse of 32 matrices 48x48 outsourced with masking, against inverting them directly;
(iii) one epoch of split learning on digits (MLP 64-32-16-10 cut after its first hidden layer)
      with the server's first layer on shares, against plain split learning: seconds, bytes, accuracy.

    PYTHONPATH=. python benchmarks/splintering.py [--reps 5]
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

import pandas as pd
import torch

from defenses.splintering import GaussianPrior, Splinter, decoy_sweep, outsource
from defenses.splintering_split import SplinteredLayer, first_linear
from toolkit import data, models
from toolkit.split import SplitConfig, SplitNN
from toolkit.wire import Wire

DECOYS = [0, 2, 8, 30, 62, 126]


def inner_products_table(ds, reps: int) -> pd.DataFrame:
    prior = GaussianPrior(ds.x_train.flatten(1))
    secrets, records = ds.x_test.flatten(1)[:64], ds.x_train.flatten(1)[:1000]
    runs = [decoy_sweep(secrets, records, prior, DECOYS, generator=torch.Generator().manual_seed(r))
            for r in range(reps)]
    table = runs[0].copy()
    table["seconds"] = [statistics.median(r.seconds[i] for r in runs) for i in range(len(table))]
    table["x_seconds"] = table.seconds / table.seconds[0]
    table["x_bytes"] = (table.bytes_up + table.bytes_down) / (table.bytes_up[0] + table.bytes_down[0])
    return table


def inverse_table(reps: int) -> pd.DataFrame:
    g = torch.Generator().manual_seed(0)
    m = torch.randn(32, 48, 48, generator=g, dtype=torch.float64) + 4 * torch.eye(48, dtype=torch.float64)
    rows = []
    for d in [None, 0, 2, 8]:
        times, err, wire = [], 0.0, Wire()
        for _ in range(reps):
            wire = Wire()
            start = time.perf_counter()
            if d is None:
                inv = torch.linalg.inv(wire.send(m, sender="client", receiver="server", kind="activations"))
                inv = wire.send(inv, sender="server", receiver="client", kind="results")
            else:
                inv = outsource(m, "inverse", splinter=Splinter(2, d, generator=g), wire=wire)
            times.append(time.perf_counter() - start)
            err = max(err, float((inv - torch.linalg.inv(m)).abs().max()))
        rows.append({"defense": "plain" if d is None else "masked", "n_decoys": d, "bytes": wire.total_bytes,
                     "seconds": statistics.median(times), "max_abs_error": err})
    table = pd.DataFrame(rows).astype({"n_decoys": "Int64"})
    table["x_seconds"] = table.seconds / table.seconds[0]
    return table


def split_table(ds, reps: int) -> pd.DataFrame:
    rows = []
    for d in [None, 0, 2, 8, 30]:
        times, acc, nbytes = [], 0.0, 0
        for r in range(reps):
            torch.manual_seed(r)
            client, server = models.cut(models.mlp([64, 32, 16, 10]), at=3)
            wire = Wire()
            if d is not None:
                head, server = first_linear(server)
                wire.transforms.append(SplinteredLayer(head, Splinter(2, d, generator=torch.Generator().manual_seed(r)), wire))
            sl = SplitNN.vanilla(client, server, ds, wire=wire, config=SplitConfig(lr=0.05, optimizer="adam", seed=r))
            start = time.perf_counter()
            sl.fit(epochs=1)
            times.append(time.perf_counter() - start)
            acc += sl.evaluate()["accuracy"] / reps
            nbytes = wire.total_bytes
        rows.append({"defense": "plain" if d is None else "splintered first layer", "n_decoys": d,
                     "bytes_per_epoch": nbytes, "seconds_per_epoch": statistics.median(times),
                     "test_accuracy_1_epoch": acc})
    table = pd.DataFrame(rows).astype({"n_decoys": "Int64"})
    table["x_seconds"] = table.seconds_per_epoch / table.seconds_per_epoch[0]
    table["x_bytes"] = table.bytes_per_epoch / table.bytes_per_epoch[0]
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 20)
    ds = data.load("digits")
    print("(i) inner products, 64 queries x 1,000 records, D = 64, 2 shares\n", inner_products_table(ds, args.reps))
    print("\n(ii) inverse of 32 matrices 48x48, float64\n", inverse_table(args.reps))
    print("\n(iii) split learning on digits, one epoch, 2 shares\n", split_table(ds, args.reps))


if __name__ == "__main__":
    main()
