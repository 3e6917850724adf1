"""Seconds and bytes per round of the decentralized protocols on the loan data, side by side with
one epoch of centralized training, and each with the sequential and the vectorized executor.

Workloads (MLP 8-64-32-2, one local epoch, batch 32, SGD lr 0.1, 8,000 training rows split IID):
  centralized: one party, all rows (one epoch);
  ring of 3 / ring of 16: sequential ring propagation (one trip round the ring is one epoch);
  parallel ring of 16 in 4 segments: four nodes train at each step;
  gossip on a random 3-regular graph of 16: every node trains at once, then averages.

Seconds per round are the median of rounds 2..R (evaluation included); "x centralized" divides by
the centralized epoch's seconds. Bytes per round are the Wire's count of model transfers.

    python benchmarks/decentralized.py [--rounds 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import pandas as pd
    import torch

    from toolkit import data, models
    from toolkit.decentralized import Gossip, ParallelRing, RingTraining, random_regular, ring, train_centralized
    from toolkit.federated import FedConfig

    torch.set_num_threads(args.threads)
    loan = data.load("loan")

    def mlp():
        torch.manual_seed(0)
        return models.tabular_mlp(8, 2)

    def rr16():
        return random_regular(16, 3, generator=torch.Generator().manual_seed(0))

    rows = []
    for executor in ("sequential", "vectorized"):
        config = FedConfig(lr=0.1, batch_size=32, executor=executor)
        start = time.perf_counter()
        central = train_centralized(mlp(), loan, epochs=args.rounds, config=config)
        rows.append({"protocol": "centralized", "executor": executor,
                     "seconds_per_round": statistics.median(central.seconds[1:]), "bytes_per_round": 0,
                     "test_loss": central.test_loss.iloc[-1], "wall": time.perf_counter() - start})
        runs = {"ring of 3": lambda c: RingTraining(mlp(), data.partition(loan, 3), ring(3), config=c),
                "ring of 16": lambda c: RingTraining(mlp(), data.partition(loan, 16), ring(16), config=c),
                "parallel ring of 16, 4 segments": lambda c: ParallelRing(mlp(), data.partition(loan, 16), ring(16),
                                                                          config=c, segments=4),
                "gossip, random 3-regular of 16": lambda c: Gossip(mlp(), data.partition(loan, 16), rr16(), config=c)}
        for name, build in runs.items():
            protocol = build(config)
            times = []
            for _ in range(args.rounds):
                t = time.perf_counter()
                history = protocol.fit(rounds=1)
                times.append(time.perf_counter() - t)
            rows.append({"protocol": name, "executor": executor, "seconds_per_round": statistics.median(times[1:]),
                         "bytes_per_round": int(protocol.history.bytes.iloc[1:].median()),
                         "test_loss": float(history.test_loss.iloc[-1]), "wall": sum(times)})
    table = pd.DataFrame(rows)
    base = table[table.protocol == "centralized"].set_index("executor").seconds_per_round
    table["x centralized"] = table.seconds_per_round / table.executor.map(base)
    pd.set_option("display.width", 160)
    print(f"loan, {args.rounds} rounds, {args.threads} thread(s), torch {torch.__version__}")
    print(table.round({"seconds_per_round": 4, "test_loss": 4, "wall": 2, "x centralized": 2}).to_string(index=False))


if __name__ == "__main__":
    main()
