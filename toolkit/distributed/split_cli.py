"""Command line for split learning across processes: one process per terminal or machine.

    python -m toolkit.distributed split --rank R --world N --addr A --port P [options]

Rank 0 is the server and hosts the rendezvous store (the address the others dial); vanilla and
U-shaped need ``--world 2`` (the client on rank 1), the relay ``--world K+1`` (client:k on rank
k+1, each keeping its own IID shard of the dataset). Only the client processes load data; the
server builds placeholders from the shapes the clients publish (:mod:`toolkit.distributed.split`).
The printout and ``--out`` hold what this process knows for real.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import torch
from torch import nn

from toolkit import models
from toolkit.data import Dataset, load, partition
from toolkit.distributed.split import CONFIGURATIONS, LOSS_PARTY, Outcome, data_parties, default_hosts, run
from toolkit.split import SplitConfig


def make_parts(configuration: str, shape: Sequence[int], n_classes: int, *, seed: int = 0,
               hidden: Sequence[int] = (64, 32)) -> tuple[nn.Module, ...]:
    """An MLP ``prod(shape) -> hidden -> n_classes`` built from ``seed`` (the global RNG is left as
    it was), cut after the first hidden layer; U-shaped also cuts before the output layer."""
    n_in = 1
    for d in shape:
        n_in *= int(d)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = models.mlp([n_in, *hidden, n_classes])
    return models.cut(net, at=(3, 5) if configuration == "u-shaped" else 3)


def client_data(configuration: str, party: str, ds: Dataset, *, n_clients: int, seed: int) -> Dataset:
    """The data ``party`` holds: the whole dataset (vanilla, U-shaped) or its IID shard (relay)."""
    if configuration != "relay":
        return ds
    return partition(ds, n_clients, "iid", seed=seed)[int(party.split(":")[1])]


def noise(sigma: float, seed: int):
    """Gaussian activation noise with its own generator (defenses.GaussianNoise)."""
    from defenses import GaussianNoise
    return GaussianNoise(sigma, generator=torch.Generator().manual_seed(seed))


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--hidden takes two positive sizes like 64,32, got {text!r}")
    return sizes


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--rank", type=int, required=True, help="this process's rank (0: the server, hosts the store)")
    parser.add_argument("--world", type=int, required=True, help="number of processes")
    parser.add_argument("--addr", default="127.0.0.1", help="rank 0's address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="rank 0's store port (open it in the firewall)")
    parser.add_argument("--config", choices=CONFIGURATIONS, default="vanilla", help="split configuration")
    parser.add_argument("--dataset", default="digits", help="dataset name for toolkit.data.load (clients only)")
    parser.add_argument("--root", default=None, help="dataset folder (clients only)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0, help="the same in every process")
    parser.add_argument("--hidden", type=_sizes, default=(64, 32), help="hidden layer sizes, e.g. 64,32")
    parser.add_argument("--handoff", choices=("peer", "server"), default="peer", help="relay weight hand-off")
    parser.add_argument("--noise", type=float, default=0.0, help="Gaussian activation noise sigma (0: none)")
    parser.add_argument("--noise-seed", type=int, default=0, help="seed of the noise generator")
    parser.add_argument("--encrypt", choices=("aes-gcm", "chacha20-poly1305"), default=None,
                        help="authenticated encryption of every message (gloo itself has no TLS)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for any peer")
    parser.add_argument("--evaluate", action="store_true", help="test loss and accuracy at the end")
    parser.add_argument("--out", default=None, help="save this process's outcome (torch.save of tensors and "
                                                    "plain values; read with torch.load(weights_only=True))")
    return parser


def run_from_args(args: argparse.Namespace) -> Outcome:
    """Join the group, run this rank's side, print a summary (and save it with ``--out``)."""
    from toolkit.distributed.group import join

    hosts = default_hosts(args.config, args.world)
    if not 0 <= args.rank < args.world:
        raise ValueError(f"--rank must be in [0, {args.world}), got {args.rank}")
    n_clients = args.world - 1 if args.config == "relay" else 1
    mine = [p for p in data_parties(args.config, n_clients) if hosts[p] == args.rank]
    datasets = {}
    if mine:
        ds = load(args.dataset, root=args.root, seed=args.seed)
        datasets = {p: client_data(args.config, p, ds, n_clients=n_clients, seed=args.seed) for p in mine}
    config = SplitConfig(batch_size=args.batch_size, lr=args.lr, momentum=args.momentum, seed=args.seed)
    transforms = [noise(args.noise, args.noise_seed)] if args.noise > 0 else []
    with join(args.rank, args.world, addr=args.addr, port=args.port, timeout=args.timeout,
              encrypt=args.encrypt) as group:
        start = time.perf_counter()  # from the moment every rank has joined
        outcome = run(args.config, group, hosts, datasets,
                      lambda shape, n: make_parts(args.config, shape, n, seed=args.seed, hidden=args.hidden),
                      config=config, transforms=transforms, epochs=args.epochs, handoff=args.handoff,
                      evaluate=args.evaluate)
    _print(args, outcome, time.perf_counter() - start)
    if args.out:
        torch.save(as_plain(outcome), args.out)
    return outcome


def as_plain(outcome: Outcome) -> dict:
    """``outcome`` as tensors, strings and numbers only (loadable with ``weights_only=True``)."""
    return {"rank": outcome.rank, "hosted": list(outcome.hosted),
            "history": {c: outcome.history[c].tolist() for c in outcome.history.columns},
            "weights": dict(outcome.weights), "total_bytes": int(outcome.total_bytes),
            "ledger": [[str(r.sender), str(r.receiver), str(r.kind), int(r.transfers), int(r.bytes)]
                       for r in outcome.ledger.itertuples()],
            "transcript": [[t.step, t.sender, t.receiver, t.kind, t.phase, t.tensor] for t in outcome.transcript],
            "held": outcome.held, "evaluation": dict(outcome.evaluation)}


def _print(args: argparse.Namespace, outcome: Outcome, seconds: float) -> None:
    history = outcome.history
    line = {"rank": outcome.rank, "hosts": outcome.hosted, "steps": len(history),
            "bytes": outcome.total_bytes, "seconds": round(seconds, 2)}
    if LOSS_PARTY[args.config] in outcome.hosted:
        line["last_loss"] = round(float(history["loss"].iloc[-1]), 4)
        line.update({f"test_{k}": round(v, 4) for k, v in outcome.evaluation.items()})
    print(json.dumps(line), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["split"]:
        argv = argv[1:]
    parser = add_arguments(argparse.ArgumentParser(prog="python -m toolkit.distributed split",
                                                   description="split learning across processes"))
    run_from_args(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
