"""Seconds per FedAvg round for many simulated clients: vectorized executor, sequential
reference and Flower, measured side by side in one run.

Workloads (1 local epoch, batch 32, SGD lr 0.05, every client every round):
  (a) MLP 64-128-10 on scikit-learn digits (1,437 training rows) split IID over 10, 100 and
      1,000 clients: bound by per-client overhead;
  (b) MLP 784-64-10, 1,000 clients with 60 MNIST images each (the MNIST test set from
      ../shared/data/mnist when present, else synthetic images of that shape): bound by
      arithmetic, about 18 GFLOP per round (6 x samples x multiply-adds, the usual
      forward + backward count); its floor is set by batched matrix products, whose speed
      (GFLOP/s) this script measures in the same run as the ceiling.

Each configuration runs 5 rounds in its own process (so peak memory is its own); seconds per
round are the median of rounds 2-5 (evaluation included), and the table names the executor that
actually ran (a vectorized run that fell back says "sequential").

Update compression (top-k 1% and QSGD with 16 levels) is timed beside the dense upload for
1,000 clients x 50,000 coordinates: seconds to compress and decompress a round's updates, and
bytes on the wire. Flower (flwr with Ray) runs when this
Python has it (pip install -e ".[bench]") or another one does: --flower-python /path/to/python.

--threads N sets torch's intra-op threads for the vectorized and sequential runs and for the
ceiling (default: torch's own choice, one per core). On a shared machine, pass the number of
cores actually free: when a busy core preempts one of torch's threads, every batched product
waits for it, and workload (b) was measured 10x slower with 2 threads on 1 free core than with 1.

    python benchmarks/federated_simulation.py [--flower-python PY] [--rounds 5] [--threads N]
        [--clients 10 100 1000] [--workloads a b]

A quick check on a shared machine: --threads 1 --clients 10 100 --workloads a --rounds 3.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED_MNIST = HERE.parents[1] / "shared" / "data" / "mnist"
FLOP_B = 6 * 1000 * 60 * (784 * 64 + 64 * 10)  # workload (b): 6 x samples x multiply-adds per round


def clients_for(workload: str, n_clients: int):
    import torch

    from toolkit import data

    if workload == "a":
        ds = data.load("digits")
        return ds, data.iid(ds.y_train, n_clients, seed=0), "digits"
    if SHARED_MNIST.is_dir():
        ds, source = data.load("mnist", root=SHARED_MNIST), "MNIST test set"
    else:
        g = torch.Generator().manual_seed(0)
        teacher = torch.randn(784, 10, generator=g)
        x = torch.rand(10_000, 1, 28, 28, generator=g)
        y = (x.flatten(1) @ teacher).argmax(1)
        ds = data.Dataset("synthetic-mnist", x[:8000], y[:8000], x[8000:], y[8000:], [str(i) for i in range(10)])
        source = "synthetic MNIST-shaped images"
    perm = torch.randperm(len(ds.y_train), generator=torch.Generator().manual_seed(0))
    take = torch.arange(60)
    return ds, [perm[(take + 60 * i) % len(perm)] for i in range(n_clients)], source


def run_one(workload: str, n_clients: int, executor: str, rounds: int) -> dict:
    """One configuration in this process: seconds per round, peak RSS, final accuracy."""
    import torch

    from toolkit import models
    from toolkit.federated import ClientData, FedConfig, FederatedAveraging

    ds, indices, source = clients_for(workload, n_clients)
    torch.manual_seed(0)
    model = models.mlp([64, 128, 10] if workload == "a" else [784, 64, 10])
    config = FedConfig(lr=0.05, batch_size=32, local_epochs=1, executor=executor, record=False)
    fl = FederatedAveraging(model, ClientData.from_indices(ds, indices), test=ds, config=config)
    history = fl.fit(rounds=rounds)
    seconds = history["seconds"].tolist()
    return {"seconds_per_round": statistics.median(seconds[1:5]), "round_seconds": seconds,
            "ran": history.attrs["manifest"]["executor"],
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "accuracy": float(history["accuracy"].iloc[-1]), "data": source}


def bmm_ceiling(repeats: int = 7) -> float:
    """GFLOP/s of torch.bmm at workload (b)'s largest product: (1000, 32, 784) @ (1000, 784, 64)."""
    import torch

    a, b = torch.rand(1000, 32, 784), torch.rand(1000, 784, 64)
    out = torch.empty(1000, 32, 64)
    torch.bmm(a, b, out=out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.bmm(a, b, out=out)
        times.append(time.perf_counter() - t0)
    return 2 * 1000 * 32 * 784 * 64 / statistics.median(times) / 1e9


def compression_seconds(n_clients: int = 1000, p: int = 50_000, repeats: int = 3) -> list[dict]:
    """Median seconds to compress and to decompress one round's (n_clients, p) updates, and the
    bytes that cross, for the dense upload, top-k 1% and QSGD(16)."""
    import torch

    from toolkit.federated.compression import QSGD, TopK

    u = torch.randn(n_clients, p, generator=torch.Generator().manual_seed(0))
    clients = torch.arange(n_clients)
    rows = [{"name": "dense", "compress": 0.0, "decompress": 0.0, "bytes": u.nbytes}]
    for name, comp in (("top-k 1%", TopK(0.01, error_feedback=False)), ("QSGD 16", QSGD(16))):
        enc, dec = [], []
        for r in range(repeats):
            t0 = time.perf_counter()
            packet = comp.compress(u, clients, generator=torch.Generator().manual_seed(r))
            t1 = time.perf_counter()
            comp.decompress(packet)
            dec.append(time.perf_counter() - t1)
            enc.append(t1 - t0)
        rows.append({"name": name, "compress": statistics.median(enc), "decompress": statistics.median(dec),
                     "bytes": packet.nbytes})
    return rows


def subprocess_json(cmd: list[str], cwd: Path | None = None) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--flower-python", help="a Python with flwr[simulation] installed")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000],
                        help="client counts for workload (a) (default: 10 100 1000)")
    parser.add_argument("--workloads", nargs="+", choices=["a", "b"], default=["a", "b"],
                        help="which workloads to run (default: a b)")
    parser.add_argument("--one", nargs=3, metavar=("WORKLOAD", "CLIENTS", "EXECUTOR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be a positive int, got {args.threads}")
        import torch
        torch.set_num_threads(args.threads)
    if args.rounds < 2 or any(n < 1 for n in args.clients):
        parser.error("--rounds must be at least 2 (round 1 is warm-up) and --clients positive")
    if args.one:
        workload, n, executor = args.one
        print(json.dumps(run_one(workload, int(n), executor, args.rounds)))
        return

    if args.flower_python is None and importlib.util.find_spec("flwr") is not None:
        args.flower_python = sys.executable
    threads = [] if args.threads is None else ["--threads", str(args.threads)]
    me = [sys.executable, str(Path(__file__).resolve()), "--rounds", str(args.rounds), *threads, "--one"]
    rows = []
    plan = {"a": tuple(args.clients), "b": (1000,)}
    for workload in args.workloads:
        for n in plan[workload]:
            for executor in ("vectorized", "sequential"):
                rows.append({"workload": workload, "clients": n, "engine": executor,
                             **subprocess_json(me + [workload, str(n), executor])})
            if workload == "a" and args.flower_python:
                code = f"import json, flower_fedavg as f; print(json.dumps(f.run_flower({n}, rounds=6)))"
                rows.append({"workload": "a", "clients": n, "engine": "flower",
                             **subprocess_json([args.flower_python, "-c", code], cwd=HERE)})
    ceiling = bmm_ceiling()
    compression = compression_seconds()

    import torch
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads "
          f"({'--threads' if args.threads else 'torch default'}); Flower workers use 1 thread each")
    print(f"{'workload':9s} {'clients':>7s} {'engine':11s} {'ran':11s} {'s/round':>9s} {'peak MB':>8s} "
          f"{'accuracy':>8s}")
    for r in rows:
        if "error" in r:
            print(f"{r['workload']:9s} {r['clients']:7d} {r['engine']:11s} failed: {r['error']}")
            continue
        print(f"{r['workload']:9s} {r['clients']:7d} {r['engine']:11s} {r.get('ran', r['engine']):11s} "
              f"{r['seconds_per_round']:9.4f} {r['peak_rss_bytes'] / 2**20:8.0f} {r['accuracy']:8.3f}")
    print("\nupdate compression, 1000 clients x 50,000 coordinates (median of 3):")
    print(f"  {'':9s} {'compress s':>10s} {'decompress s':>12s} {'MB up':>8s} {'smaller':>8s}")
    for c in compression:
        print(f"  {c['name']:9s} {c['compress']:10.3f} {c['decompress']:12.3f} {c['bytes'] / 2**20:8.1f} "
              f"{compression[0]['bytes'] / c['bytes']:7.1f}x")

    def sec(workload, n, engine):
        r = next((r for r in rows if (r["workload"], r["clients"], r["engine"]) == (workload, n, engine)), None)
        return r.get("seconds_per_round") if r else None

    print("\nratios (higher is faster for the vectorized executor):")
    for n in plan["a"] if "a" in args.workloads else ():
        vec, seq, flwr = sec("a", n, "vectorized"), sec("a", n, "sequential"), sec("a", n, "flower")
        line = f"  (a) {n:5d} clients: sequential / vectorized = {seq / vec:6.1f}x" if vec and seq else ""
        if vec and flwr:
            line += f", flower / vectorized = {flwr / vec:7.1f}x"
        print(line)
    vec_b, seq_b = sec("b", 1000, "vectorized"), sec("b", 1000, "sequential")
    if vec_b and seq_b:
        print(f"  (b) 1000 clients: sequential / vectorized = {seq_b / vec_b:.1f}x")
        print(f"\nworkload (b): {FLOP_B / 1e9:.1f} GFLOP per round; batched-matmul ceiling {ceiling:.0f} GFLOP/s")
        for engine, s in (("vectorized", vec_b), ("sequential", seq_b)):
            print(f"  {engine:10s} {FLOP_B / s / 1e9:6.1f} GFLOP/s = {FLOP_B / s / 1e9 / ceiling:5.1%} of the ceiling")
    targets = []
    if sec("a", 1000, "vectorized") and sec("a", 1000, "sequential"):
        targets.append(("(a) 1000 clients >= 10x sequential", sec("a", 1000, "sequential") / sec("a", 1000, "vectorized") >= 10))
    if sec("a", 1000, "flower"):
        targets.append(("(a) 1000 clients >= 100x Flower", sec("a", 1000, "flower") / sec("a", 1000, "vectorized") >= 100))
    if vec_b:
        targets.append(("(b) >= 50% of the batched-matmul ceiling", FLOP_B / vec_b / 1e9 >= 0.5 * ceiling))
    vec_rows = [r for r in rows if r["engine"] == "vectorized" and "peak_rss_bytes" in r]
    if vec_rows:
        targets.append(("vectorized peak memory < 1 GB", all(r["peak_rss_bytes"] < 2**30 for r in vec_rows)))
    print("\ntargets:")
    for name, ok in targets:
        print(f"  {'met   ' if ok else 'MISSED'} {name}")


if __name__ == "__main__":
    main()
