"""Seconds for differentially private federated rounds, measured side by side in one run.

(a) Per-sample DP-SGD in local training (Abadi et al., 2016; ``FedConfig(dp_max_grad_norm=1,
    dp_noise_multiplier=1)``), 1,000 clients, MLP 64-128-10 on scikit-learn digits, 1 local
    epoch, batch 32, SGD lr 0.05, every client every round: the vectorized executor (all clients
    in one pass, hand-written per-sample norms) against the sequential reference, which runs
    Opacus itself (GradSampleModule + DPOptimizer per client). Two data layouts: digits' 1,437
    training rows split IID (1-2 samples per client, bound by per-client overhead) and 64 rows
    per client drawn from them (2 local steps each). Both runs report the same epsilon
    (``defenses.LocalDPAccountant``, RDP and PRV), printed for each.
(b) DP-FedAvg (McMahan et al., 2018; ``defenses.DPFedAvg``, clip 1, noise 1) against plain FedAvg
    (mean), same clients and vectorized executor: round seconds, and what the aggregation and
    the accounting (RDP + PRV, every round) take of them.

Seconds are medians over ``--rounds`` timed rounds after one warm-up round; "local" is the
executor's training alone, "round" the whole FedAvg round (evaluation and the accountants' epsilon
included: Opacus's RDP accountant takes about 0.3 s per distinct (noise, sample rate) below rate 1).

    python benchmarks/dp_federated.py [--threads 1] [--rounds 3] [--clients 1000]
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

from defenses import DPFedAvg
from toolkit.federated import LocalDPAccountant
from toolkit import data, models
from toolkit.federated import ClientData, FedConfig, FederatedAveraging, make_aggregator


class Timed:
    """Wraps a callable and keeps the seconds of every call."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, []

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds.append(time.perf_counter() - start)

    def __getattr__(self, name):  # the wrapped aggregator's report() / state_dict()
        return getattr(self.fn, name)


def clients_for(ds, n_clients: int, per_client: int) -> ClientData:
    if per_client == 0:
        return ClientData.from_indices(ds, data.iid(ds.y_train, n_clients, seed=0))
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(len(ds.y_train), (per_client,), generator=g) for _ in range(n_clients)]
    return ClientData.from_indices(ds, rows)


def run(ds, clients, config: FedConfig, rounds: int, *, aggregator="mean", monitors=()):
    """(protocol, history of the timed rounds, local-training seconds per timed round, aggregator timer)."""
    torch.manual_seed(0)
    timed_agg = Timed(make_aggregator(aggregator) if isinstance(aggregator, str) else aggregator)
    fl = FederatedAveraging(models.mlp([64, 128, 10]), clients, test=ds, config=config,
                            aggregator=timed_agg, monitors=list(monitors))
    fl.executor.train = Timed(fl.executor.train)
    fl.fit(rounds=1)  # warm-up
    history = fl.fit(rounds=rounds)
    return fl, history, fl.executor.train.seconds[1:], timed_agg


def median(values) -> float:
    return statistics.median(values)


def local_dp(ds, n_clients: int, per_client: int, rounds: int) -> None:
    clients = clients_for(ds, n_clients, per_client)
    layout = "digits split IID" if per_client == 0 else f"{per_client} rows per client"
    print(f"\n(a) per-sample DP-SGD, {clients!r} ({layout})")
    print(f"{'executor':<12} {'ran':<21} {'local s':>8} {'round s':>8} {'accuracy':>8} "
          f"{'client eps RDP':>14} {'client eps PRV':>14}")
    seconds = {}
    for executor in ("vectorized", "sequential"):
        config = FedConfig(executor=executor, batch_size=32, dp_max_grad_norm=1.0, dp_noise_multiplier=1.0,
                           chunk_bytes=2**28)  # 1,000 clients in one vectorized pass
        accountant = LocalDPAccountant()
        fl, history, local, _ = run(ds, clients, config, rounds, monitors=[accountant])
        # the round's seconds include the accountant's PRV epsilon; take it out to compare executors
        seconds[executor] = median(local)
        last = history.iloc[-1]
        ran = fl.executor.ran + (f" ({fl.executor.passes} pass)" if fl.executor.ran == "vectorized" else "")
        print(f"{executor:<12} {ran:<21} {median(local):>8.3f} {median(history['seconds']):>8.3f} "
              f"{last['accuracy']:>8.3f} {last['client_epsilon_rdp']:>14.4f} {last['client_epsilon_prv']:>14.4f}")
    plain = FedConfig(batch_size=32, chunk_bytes=2**28)
    fl, history, local, _ = run(ds, clients, plain, rounds)
    print(f"{'vectorized, no DP':<34} {median(local):>8.3f} {median(history['seconds']):>8.3f} "
          f"{history['accuracy'].iloc[-1]:>8.3f}")
    print(f"sequential Opacus / vectorized, local training: {seconds['sequential'] / seconds['vectorized']:.1f}x; "
          f"vectorized DP / vectorized plain: {seconds['vectorized'] / median(local):.2f}x")


def dp_fedavg(ds, n_clients: int, rounds: int) -> None:
    clients = clients_for(ds, n_clients, 0)
    print(f"\n(b) DP-FedAvg vs FedAvg, {clients!r}, vectorized executor, every client every round")
    print(f"{'aggregator':<10} {'round s':>8} {'local s':>8} {'aggregate s':>11} {'accuracy':>8} "
          f"{'epsilon RDP':>11} {'epsilon PRV':>11}")
    config = FedConfig(batch_size=32, chunk_bytes=2**28)
    rows = {}
    fl, history, local, timed = run(ds, clients, config, rounds)
    rows["mean"] = median(history["seconds"])
    print(f"{'mean':<10} {rows['mean']:>8.3f} {median(local):>8.3f} {median(timed.seconds[1:]):>11.4f} "
          f"{history['accuracy'].iloc[-1]:>8.3f}")
    agg = DPFedAvg.for_config(config, n_clients, clip=1.0, noise_multiplier=1.0, generator=torch.Generator().manual_seed(0))
    fl, history, local, timed = run(ds, clients, config, rounds, aggregator=agg)
    rows["dp"] = median(history["seconds"])
    last = history.iloc[-1]
    print(f"{'DPFedAvg':<10} {rows['dp']:>8.3f} {median(local):>8.3f} {median(timed.seconds[1:]):>11.4f} "
          f"{last['accuracy']:>8.3f} {last['epsilon_rdp']:>11.4f} {last['epsilon_prv']:>11.4f}")
    start = time.perf_counter()
    agg.report()
    print(f"DP-FedAvg / FedAvg round: {rows['dp'] / rows['mean']:.2f}x; of it the accounting (RDP + PRV "
          f"report after {agg.rounds} rounds) takes {time.perf_counter() - start:.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up")
    parser.add_argument("--clients", type=int, default=1000)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); medians of {args.rounds} rounds")
    ds = data.load("digits")
    for per_client in (0, 64):
        local_dp(ds, args.clients, per_client, args.rounds)
    dp_fedavg(ds, args.clients, args.rounds)


if __name__ == "__main__":
    main()
