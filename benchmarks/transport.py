"""Per-message latency and throughput of the process transport against the in-process one.

Two processes on 127.0.0.1 play ping-pong: party "a" (rank 0, this process) sends a tensor to "b"
(rank 1, a subprocess started here), which sends what it got back; one message is half a round
trip. Both processes run the same ``pingpong`` code over a ``Wire(record=False)`` (SPMD, see
toolkit.distributed.transport), so the figures include the Wire's counting and the framing.

Variants, side by side for 1 KB, 1 MB and 100 MB float32 tensors:
- ``in-process``: the same Wire with the default InProcess transport (a detached alias, no copy);
- ``socket``: the floor, a raw TCP socket (TCP_NODELAY) sending the same bytes, no framing;
- ``process``: ProcessTransport over gloo, plain;
- ``aes-gcm``, ``chacha20-poly1305``: ProcessTransport with authenticated encryption.
Each variant runs once per round (``--rounds``, in a rotating order, each on a fresh group), a
round's figure is the median over timed batches of round trips after a warm-up, and the table
shows the median over rounds; ratios are against the socket floor and against in-process.

    python benchmarks/transport.py [--threads 1] [--quick] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolkit.wire import Wire  # noqa: E402

SIZES = {"1 KB": 1 << 10, "1 MB": 1 << 20, "100 MB": 100 << 20}
QUICK_SIZES = {"1 KB": 1 << 10, "1 MB": 1 << 20}
VARIANTS = ("process", "aes-gcm", "chacha20-poly1305")
HOSTS = {"a": 0, "b": 1}


def plan(nbytes: int, quick: bool) -> tuple[int, int]:
    """(batches, round trips per batch) for a message size."""
    if quick:
        return 3, 5 if nbytes <= 1 << 10 else 2
    if nbytes <= 1 << 10:
        return 7, 200
    if nbytes <= 1 << 20:
        return 7, 20
    return 3, 1


def pingpong(wire: Wire, x: torch.Tensor, trips: int) -> torch.Tensor:
    """a -> b, then b sends back what it got; identical code in both processes."""
    for _ in range(trips):
        y = wire.send(x, sender="a", receiver="b", kind="ping")
        x = wire.send(y, sender="b", receiver="a", kind="pong")
    return x


def timed(run, batches: int, trips: int) -> float:
    """Median seconds per message (half a round trip) over ``batches`` timed batches."""
    run(1)  # warm-up
    times = []
    for _ in range(batches):
        t0 = time.perf_counter()
        run(trips)
        times.append((time.perf_counter() - t0) / (2 * trips))
    return statistics.median(times)


def tensors(sizes: dict[str, int], rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(n // 4, generator=g) if rank == 0 else torch.zeros(n // 4) for k, n in sizes.items()}


def socket_floor(rank: int, port: int, sizes: dict[str, int], quick: bool) -> dict[str, float]:
    """Ping-pong of the raw bytes over one TCP connection (rank 1 listens)."""
    if rank == 1:
        server = socket.create_server(("127.0.0.1", port))
        server.settimeout(60)
        conn, _ = server.accept()
        server.close()
    else:
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=60)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the peer's socket on port {port} never opened") from None
                time.sleep(0.05)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.settimeout(60)
    out = {}
    with conn:
        for name, x in tensors(sizes, rank).items():
            buf = memoryview(x.numpy()).cast("B")

            def recv_all(view=buf):
                got = 0
                while got < len(view):
                    n = conn.recv_into(view[got:])
                    if n == 0:
                        raise ConnectionError("the peer closed the socket")
                    got += n

            def run(trips):
                for _ in range(trips):
                    if rank == 0:
                        conn.sendall(buf)
                        recv_all()
                    else:
                        recv_all()
                        conn.sendall(buf)
            out[name] = timed(run, *plan(x.nbytes, quick))
    return out


def process_transport(rank: int, port: int, encrypt: str | None, sizes: dict[str, int], quick: bool) -> dict:
    from toolkit.distributed import ProcessTransport, join
    out = {}
    with join(rank, 2, port=port, timeout=60.0, encrypt=encrypt) as group:
        wire = Wire(record=False, transport=ProcessTransport(group, HOSTS))
        for name, x in tensors(sizes, rank).items():
            state = {"x": x}

            def run(trips):
                state["x"] = pingpong(wire, state["x"], trips)
            out[name] = timed(run, *plan(x.nbytes, quick))
            if rank == 0 and not torch.equal(state["x"], x):
                raise RuntimeError(f"{encrypt or 'plain'}: the {name} tensor came back changed")
    return out


def in_process(sizes: dict[str, int], quick: bool) -> dict[str, float]:
    wire = Wire(record=False)
    return {name: timed(lambda trips, x=x: pingpong(wire, x, trips), *plan(x.nbytes, quick))
            for name, x in tensors(sizes, 0).items()}


def run_rank(rank: int, ports: list[int], quick: bool) -> dict[str, dict[str, float]]:
    """Every variant once per round, in a rotating order; each figure is the median over rounds."""
    sizes = QUICK_SIZES if quick else SIZES
    order = ("socket", *VARIANTS)
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in order}
    rounds = len(ports) // len(order)
    for r in range(rounds):
        for k in range(len(order)):
            variant = order[(r + k) % len(order)]
            port = ports[r * len(order) + k]
            if variant == "socket":
                runs[variant].append(socket_floor(rank, port, sizes, quick))
            else:
                encrypt = None if variant == "process" else variant
                runs[variant].append(process_transport(rank, port, encrypt, sizes, quick))
    return {v: {name: statistics.median(run[name] for run in runs[v]) for name in sizes} for v in order}


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def fmt_time(s: float) -> str:
    return f"{s * 1e6:9.1f} us" if s < 1e-3 else f"{s * 1e3:9.2f} ms"


def table(results: dict[str, dict[str, float]], sizes: dict[str, int]) -> str:
    lines = [f"{'size':>7} {'transport':>18} {'per message':>12} {'throughput':>12} {'x socket':>9} "
             f"{'x in-process':>12}"]
    for name, nbytes in sizes.items():
        floor, local = results["socket"][name], results["in-process"][name]
        for variant in ("in-process", "socket", *VARIANTS):
            s = results[variant][name]
            lines.append(f"{name:>7} {variant:>18} {fmt_time(s):>12} {nbytes / s / 1e6:>8.1f} MB/s "
                         f"{s / floor:>9.3g} {s / local:>12.4g}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--quick", action="store_true", help="1 KB and 1 MB, few repetitions (seconds)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of every variant (default 3; quick 1)")
    parser.add_argument("--peer", type=str, default=None, help=argparse.SUPPRESS)  # ports, for the subprocess
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    args.rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    torch.set_num_threads(args.threads)
    if args.peer is not None:
        run_rank(1, [int(p) for p in args.peer.split(",")], args.quick)
        return {}
    load_before = os.getloadavg()[0]
    ports = free_ports(args.rounds * (1 + len(VARIANTS)))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(args.threads),
           "--peer", ",".join(map(str, ports))] + (["--quick"] if args.quick else [])
    peer = subprocess.Popen(cmd, cwd=ROOT, env={"OMP_NUM_THREADS": str(args.threads), **_env()})
    try:
        results = run_rank(0, ports, args.quick)
        peer.wait(timeout=120)
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait()
    if peer.returncode != 0:
        raise RuntimeError(f"the peer process exited with {peer.returncode}")
    sizes = QUICK_SIZES if args.quick else SIZES
    results["in-process"] = in_process(sizes, args.quick)
    print(f"ping-pong between two processes on 127.0.0.1, torch threads {args.threads}, "
          f"Wire(record=False); median per message (half a round trip); "
          f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after on {os.cpu_count()} cores")
    print(table(results, sizes))
    return results


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}


if __name__ == "__main__":
    main()
