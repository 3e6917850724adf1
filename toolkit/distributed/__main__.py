"""Command line: one process per terminal or machine (``ring`` or ``split``; README's "Running
across processes and machines"), e.g. a ring of three on one machine::

    python -m toolkit.distributed ring --rank 0 --world 3 --addr 127.0.0.1 --port 29500
    python -m toolkit.distributed ring --rank 1 --world 3 --addr 127.0.0.1 --port 29500
    python -m toolkit.distributed ring --rank 2 --world 3 --addr 127.0.0.1 --port 29500

(on several machines ``--addr`` is rank 0's address, reachable from the others, ``--port`` open
on it, and the machines able to reach one another on further TCP ports, which gloo opens per
pair of processes; ``GLOO_SOCKET_IFNAME`` picks the network interface). Each process prints progress lines (``EVENT ...``) and, at the end, one
``RESULT {json}`` line (also written to ``--out``). Exit status: 0 done, 1 an error (the message
names its cause), 17 told to fail (``--fail-at-round``).

As a demonstration every process builds the same dataset split (``--dataset``, ``--seed``) and keeps
only its node's share: the others' data are zero placeholders of the registered shapes, and the
others' weights are zeroed. Library users give each process its own data (:func:`toolkit.distributed.run_ring`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from toolkit.distributed.group import CIPHERS


def _ring_parser(sub) -> None:
    p = sub.add_parser("ring", help="RingTraining (issue 13's FedUp design): this process hosts one node",
                       description="Ring training across processes; see toolkit.distributed.ring.")
    p.add_argument("--rank", type=int, required=True, help="this process's rank (0 hosts the store and discovery)")
    p.add_argument("--world", type=int, required=True, help="how many processes (one node each)")
    p.add_argument("--addr", default="127.0.0.1", help="rank 0's address (default 127.0.0.1)")
    p.add_argument("--port", type=int, required=True, help="rank 0's store port")
    p.add_argument("--encrypt", choices=[c for c in CIPHERS if c], default=None,
                   help="authenticated encryption of every message (X25519 per-pair keys)")
    p.add_argument("--node", type=int, default=None, help="the node id this process hosts (default: its rank)")
    p.add_argument("--topology", default="ring", help="rank 0: the graph to announce: ring, line, star, complete "
                   "(on --world nodes), or an edge list such as '0-1,1-2,2-0'")
    p.add_argument("--initiator", type=int, default=None, help="rank 0: the node that starts (default the lowest id)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dataset", default="loan", help="a tabular dataset of toolkit.data (loan, breast_cancer)")
    p.add_argument("--n-samples", type=int, default=600, help="loan's size (all nodes together, train and test)")
    p.add_argument("--seed", type=int, default=0, help="the same in every process: data split, model, batches")
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds any message or rendezvous may take")
    p.add_argument("--liveness-timeout", type=float, default=5.0,
                   help="seconds a peer has to answer at its turn before the ring re-forms without it")
    p.add_argument("--fail-at-round", type=int, default=None,
                   help="demonstration: exit (status 17, as if killed) at this node's turn in this round")
    p.add_argument("--fail-in-turn", action="store_true",
                   help="with --fail-at-round: exit just after answering alive (the run then stops with an error)")
    p.add_argument("--out", default=None, help="also write the result JSON to this file")


def _topology(spec: str, n: int):
    import networkx as nx

    from toolkit.decentralized import topology

    if "-" in spec:
        try:
            return nx.Graph([tuple(int(v) for v in edge.split("-")) for edge in spec.split(",")])
        except ValueError:
            raise ValueError(f"--topology {spec!r}: an edge list is 'a-b,b-c,...' of int node ids") from None
    if spec not in ("ring", "line", "star", "complete"):
        raise ValueError(f"--topology {spec!r}: use ring, line, star, complete or an edge list 'a-b,b-c'")
    return topology.TOPOLOGIES[spec](n)


def ring_main(args: argparse.Namespace) -> dict:
    """Run one node of the ring; returns (and prints) its result."""
    from toolkit.distributed import join
    from toolkit.distributed.ring import demo_setup, leave, run_ring
    from toolkit.federated import FedConfig

    node = args.rank if args.node is None else args.node
    started = time.monotonic()

    def event(text: str) -> None:
        print(f"EVENT {time.monotonic() - started:8.3f} s {text}", flush=True)

    graph = _topology(args.topology, args.world) if args.rank == 0 else None
    n = graph.number_of_nodes() if graph is not None else args.world
    model, parts = demo_setup(args.dataset, n, n_samples=args.n_samples, seed=args.seed)
    dataset = parts[node] if 0 <= node < len(parts) else parts[0]  # a bad id: discovery names it to every process
    config = FedConfig(local_epochs=args.local_epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    group = join(args.rank, args.world, addr=args.addr, port=args.port, timeout=args.timeout, encrypt=args.encrypt)
    event(f"joined rank={args.rank} node={node} world={args.world} encrypt={args.encrypt}")
    run = None
    try:
        run = run_ring(group, node, dataset, model, rounds=args.rounds, topology=graph, initiator=args.initiator,
                       config=config, liveness_timeout=args.liveness_timeout, fail_at=args.fail_at_round,
                       fail_in_turn=args.fail_in_turn, on_event=event)
        for _, row in run.ring.history.iterrows():
            event(f"round {int(row['round'])} nodes={int(row['nodes'])} failed={int(row['failed'])}")
        result = {"rank": args.rank, **run.summary()}
    finally:
        leave(group, run)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f)
    print("RESULT " + json.dumps(result), flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toolkit.distributed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _ring_parser(sub)
    from toolkit.distributed import split_cli

    split_cli.add_arguments(sub.add_parser("split", help="split learning (vanilla, U-shaped, relay): one party per "
                                           "process", description="Split learning across processes; see "
                                           "toolkit.distributed.split."))
    args = parser.parse_args(argv)
    if args.command == "ring" and args.fail_in_turn and args.fail_at_round is None:
        parser.error("--fail-in-turn needs --fail-at-round (the round whose turn the node dies in)")
    try:
        {"ring": ring_main, "split": split_cli.run_from_args}[args.command](args)
    except Exception as e:  # noqa: BLE001  (one clear line naming the cause, then the status)
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
