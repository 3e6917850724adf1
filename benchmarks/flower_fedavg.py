"""Flower baseline: FedAvg in Flower's simulation engine (Ray) on workload (a), timed per round.

What it measures: wall-clock seconds per FedAvg round, peak memory (summed RSS of this process and
every child process, i.e. Ray's GCS/raylet and the worker actors) and final test accuracy when
Flower's Simulation Runtime trains the digits MLP 64-128-10 over ``n_clients`` IID clients, every
client every round, with Ray limited to 2 CPUs. Round boundaries are taken in the server-side
centralized evaluate function, which the strategy calls once before round 1 and once after each
round; ``seconds_per_round`` is the median of rounds 2..5 (steady state, after Ray actor start-up).

Workload (a): Linear(64,128)-ReLU-Linear(128,10) on scikit-learn digits (8x8 flattened, /16 to
[0,1]), stratified 80/20 split with random_state=seed (1,437 train / 360 test rows), train rows
shuffled with the seed and split IID into ``n_clients`` near-equal parts, 1 local epoch, batch 32,
SGD lr 0.05 (no momentum), centralized evaluation on the 360 test rows after every round.

Install (keep it out of the project's own venv; pin torch to stay on the CPU wheel, no torchvision):

    python3 -m venv /tmp/flwr-venv
    /tmp/flwr-venv/bin/pip install torch==2.13.0 "flwr[simulation]" scikit-learn numpy psutil
    /tmp/flwr-venv/bin/python benchmarks/flower_fedavg.py 10 100 1000

This module imports without Flower; ``run_flower`` raises ImportError when flwr (or Ray) is missing.

Reading the numbers. A round here includes the centralized evaluation (a few ms). Flower's simulation
runtime polls for messages every 0.1 s, so short rounds fall on ~0.1 s steps (0.11 or 0.21 s at 10
clients). Accuracy after 6 rounds is low by design of the workload, not a Flower fault: 0.50 at 10
clients and 0.17 at 100 and 1,000 (at >= 45 clients every shard fits in one batch, so each round is
one full-batch gradient step at lr 0.05). A plain PyTorch FedAvg loop with the same shards, seeds
and initial weights gives the same accuracies.

Design notes. The ClientApp and its train function live at module level and are reached through an
importable module name, so Ray's cloudpickle ships them by reference: each actor imports this module
once and keeps its data cache (``_PARTITIONS``) across messages. A ClientApp defined in a calling
script (``__main__``) is pickled by value with every message and loses that cache. Each actor
builds the full IID partition once (deterministic in ``seed``) and indexes into it by partition id.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import logging
import os
import statistics
import sys
import threading
import time
from pathlib import Path

_FLWR_MISSING = "Flower baseline needs: pip install 'flwr[simulation]'"

IN_DIM, HIDDEN, N_CLASSES = 64, 128, 10
BATCH_SIZE, LR, LOCAL_EPOCHS = 32, 0.05, 1

# Per-process caches (driver and each Ray actor).
_DATA: dict[int, tuple] = {}  # seed -> (x_train, y_train, x_test, y_test) as torch tensors
_PARTITIONS: dict[tuple[int, int], list] = {}  # (seed, n_clients) -> [(x, y), ...]
_CLIENT_APP = None


# ----------------------------------------------------------------------------- data and model
def _load(seed: int):
    """Digits, /16 to [0,1], stratified 80/20 split with random_state=seed (cached per process)."""
    if seed not in _DATA:
        import torch
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = (digits.data / 16.0).astype("float32")
        y = digits.target.astype("int64")
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
        _DATA[seed] = (torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te), torch.from_numpy(y_te))
    return _DATA[seed]


def _partition(seed: int, n_clients: int, pid: int):
    """Client ``pid``'s IID shard: train rows permuted with ``seed`` and split into n near-equal parts."""
    key = (seed, n_clients)
    if key not in _PARTITIONS:
        import torch

        x_tr, y_tr, _, _ = _load(seed)
        perm = torch.randperm(len(y_tr), generator=torch.Generator().manual_seed(seed))
        _PARTITIONS[key] = [(x_tr[idx], y_tr[idx]) for idx in torch.tensor_split(perm, n_clients)]
    return _PARTITIONS[key][pid]


def make_model():
    from torch import nn

    return nn.Sequential(nn.Linear(IN_DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, N_CLASSES))


# ----------------------------------------------------------------------------- client side
def _train(msg, context):
    """ClientApp train handler: load global weights, one local epoch of SGD, reply with weights."""
    import torch
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    torch.set_num_threads(1)
    cfg = msg.content["config"]
    seed, rnd = int(cfg["seed"]), int(cfg["server-round"])
    pid = int(context.node_config["partition-id"])
    n = int(context.node_config["num-partitions"])
    x, y = _partition(seed, n, pid)

    model = make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(seed * 1_000_003 + rnd * 10_007 + pid)
    loss_sum = 0.0
    for _ in range(LOCAL_EPOCHS):
        for idx in torch.randperm(len(y), generator=g).split(BATCH_SIZE):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            loss_sum += float(loss) * len(idx)
    content = RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "metrics": MetricRecord({"train_loss": loss_sum / max(len(y), 1), "num-examples": len(y)}),
    })
    return Message(content=content, reply_to=msg)


def get_client_app():
    """This module's ClientApp (built once per process; its handler is a module-level function)."""
    global _CLIENT_APP
    if _CLIENT_APP is None:
        from flwr.clientapp import ClientApp

        app = ClientApp()
        app.train()(_train)
        _CLIENT_APP = app
    return _CLIENT_APP


def _importable_self():
    """This module under a name Ray workers can import (never ``__main__``), so they cache data."""
    name = __name__
    if name != "__main__" and importlib.machinery.PathFinder.find_spec(name.partition(".")[0]) is not None:
        return sys.modules[name]  # e.g. ``benchmarks.flower_fedavg`` or ``flower_fedavg`` via sys.path
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)  # the Ray backend hands the driver's sys.path to its workers
    return importlib.import_module(Path(__file__).stem)


# ----------------------------------------------------------------------------- memory sampler
class _PeakRSS:
    """Background thread summing RSS of this process and all descendants every ``interval`` s."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self._psutil = psutil
        self._proc = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> int:
        total = 0
        try:
            procs = [self._proc] + self._proc.children(recursive=True)
        except self._psutil.Error:
            procs = [self._proc]
        for p in procs:
            try:
                total += p.memory_info().rss
            except self._psutil.Error:
                pass
        self.peak = max(self.peak, total)
        return total

    def _loop(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._th.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._th.join()
        return False


# ----------------------------------------------------------------------------- driver
def run_flower(n_clients: int, *, rounds: int = 6, seed: int = 0, client_num_cpus: float = 1.0) -> dict:
    """FedAvg in Flower's simulation engine (Ray, limited to 2 CPUs) on workload (a):
    MLP 64-128-10 (Linear(64,128), ReLU, Linear(128,10); inputs flattened 8x8 digits scaled to [0,1])
    on scikit-learn digits, stratified 80/20 train/test split with random_state=seed (1,437 train rows),
    train rows split IID over n_clients clients, 1 local epoch, batch 32, SGD lr 0.05 (no momentum),
    every client every round (fraction_fit=1.0, min clients = n_clients), centralized evaluation of the
    global model on the 360 test rows after each round.

    ``client_num_cpus`` is each ClientApp's Ray CPU share: 1.0 gives 2 concurrent actors on the
    2 CPUs Ray is given (one per core, torch limited to 1 thread in each).

    Returns {"seconds_per_round": median of the wall-clock durations of rounds 2..5 (steady state, after
    actor start-up), "round_seconds": [all per-round durations], "peak_rss_bytes": peak summed RSS of this
    process and all its child processes (Ray workers) sampled by a background thread with psutil every
    ~0.2 s, "accuracy": final test accuracy, "flwr_version": ...}."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # CPU only; silences a FutureWarning
    try:
        import flwr
        from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
        from flwr.serverapp import Grid, ServerApp
        from flwr.serverapp.strategy import FedAvg
        from flwr.simulation import run_simulation
    except ImportError as ex:
        raise ImportError(_FLWR_MISSING) from ex
    if importlib.util.find_spec("ray") is None:
        raise ImportError(_FLWR_MISSING)
    import random

    import torch

    if rounds < 2:
        raise ValueError("rounds must be >= 2")
    client_app = _importable_self().get_client_app()

    _, _, x_te, y_te = _load(seed)
    stamps: list[float] = []
    accs: list[float] = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = make_model()
        model.load_state_dict(arrays.to_torch_state_dict())
        with torch.no_grad():
            acc = (model(x_te).argmax(1) == y_te).float().mean().item()
        accs.append(acc)
        stamps.append(time.perf_counter())  # round r ends here (r=0: before round 1)
        return MetricRecord({"accuracy": acc})

    class _CheckedFedAvg(FedAvg):
        """FedAvg that fails loudly when a client's reply is missing or an error (Flower only logs it)."""

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            bad = [m for m in replies if m.has_error()]
            if bad or len(replies) != n_clients:
                reason = bad[0].error.reason if bad else "missing replies"
                raise RuntimeError(f"round {server_round}: {len(replies) - len(bad)}/{n_clients} clients "
                                   f"answered; first error: {reason}")
            return super().aggregate_train(server_round, replies)

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        random.seed(seed)  # node sampling order
        torch.manual_seed(seed)
        strategy = _CheckedFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n_clients,
                                  min_evaluate_nodes=0, min_available_nodes=n_clients)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(make_model().state_dict()), num_rounds=rounds,
                       train_config=ConfigRecord({"seed": seed}), evaluate_fn=evaluate)

    backend_config = {
        "init_args": {"num_cpus": 2, "num_gpus": 0, "include_dashboard": False,
                      "logging_level": logging.ERROR, "log_to_driver": False},
        "client_resources": {"num_cpus": float(client_num_cpus), "num_gpus": 0.0},
    }
    flwr_logger = logging.getLogger("flwr")
    old_level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)
    try:
        with _PeakRSS(0.2) as mem:
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n_clients,
                           backend_config=backend_config)
            mem.sample()
    finally:
        flwr_logger.setLevel(old_level)
    if len(stamps) != rounds + 1:
        raise RuntimeError(f"simulation ended after {max(len(stamps) - 1, 0)} of {rounds} rounds")
    round_seconds = [b - a for a, b in zip(stamps, stamps[1:])]
    steady = round_seconds[1:5]
    return {
        "seconds_per_round": statistics.median(steady),
        "round_seconds": round_seconds,
        "peak_rss_bytes": mem.peak,
        "accuracy": accs[-1],
        "flwr_version": flwr.__version__,
    }


def main(argv: list[str]) -> None:
    counts = [int(a) for a in argv] or [10, 100, 1000]
    mod = _importable_self()  # never run the clients from __main__ (see module docstring)
    for n in counts:
        r = mod.run_flower(n)
        print(f"flower {r['flwr_version']} clients={n}: {r['seconds_per_round']:.3f} s/round "
              f"(rounds {', '.join(f'{s:.2f}' for s in r['round_seconds'])}), "
              f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB, accuracy {r['accuracy']:.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
