"""The building blocks of private aggregation (issue 12), side by side in one run.

Measured, each figure the median over ``--reps`` repetitions (after one untimed warm-up call; CKKS
has none: its first repetition includes the first use of the context), with ``--threads`` torch
threads (``torch.set_num_threads``, default 1):

* ``defenses.secagg.masks.expand``: the ChaCha20 mask stream (``bits=32``) at 1e5 and 1e6 elements
  against ``torch.randint(0, 2**32)`` of the same size (the non-cryptographic reference, not usable
  for masks), the two timed alternately: seconds, MB/s of int64 output (8 bytes per element) and
  the ratio expand / randint;
* ``defenses.secagg.shamir``: ``share`` of a 32-byte secret and ``reconstruct`` from exactly t
  shares at (t, n) = (3, 5), (51, 100), (501, 1000) (the last skipped with ``--quick``);
* ``defenses.secagg.masked_input`` of a FixedPoint-encoded (n_clients=100, bound=1, frac=16)
  vector of d = 1e5 with 9 and 99 peers: seconds, seconds per mask stream (peers + 1 streams: the
  pairwise ones and the self mask), and the ratio to peers + 1 bare ``expand`` calls of d elements
  (the cost of the ring additions and the range check on top of the streams);
* ``defenses.homomorphic``: with the default CKKSParameters, ``CKKSClient.encrypt`` of 100k
  float32 parameters (seconds per client), ``CKKSServer.aggregate`` of 10 clients, ``KeyHolder.decrypt``
  of the sum; ciphertext bytes per client over float32 bytes (the expansion); and the max abs
  error of the decrypted sum against the float64 sum of the inputs;
* ``defenses.commitments``: ``commit`` by 10 clients of 100k float32 each and the server's
  ``check_openings`` of all 10.

The load average is printed at the start and the end (2 cores shared with other processes: wall
time grows with the load).

Measured here (2 shared cores, ``--threads 1``, reps 5, load average 0.9 at start and at the end);
ChaCha20 (OpenSSL, via ``cryptography``) outruns torch's CPU ``randint`` (mt19937), and each of a
masked input's peers + 1 streams costs about 2.6 bare ``expand`` calls, the rest being the ring
additions:

    threads 1, reps 5, load average 0.9 at start

    mask stream: expand (ChaCha20) vs torch.randint (non-cryptographic reference)
    n elements                                expand s     expand MB/s       randint s    randint MB/s  expand/randint
    100,000                                    0.00058            1371         0.00075            1068           0.78x
    1,000,000                                  0.00373            2146         0.00724            1105           0.51x

    Shamir secret sharing of a 32-byte secret (reconstruct from exactly t shares)
    (t, n)                                     share s   reconstruct s  reconstruct/share
    (3, 5)                                     0.00004         0.00003           0.78x
    (51, 100)                                  0.00369         0.00483           1.31x
    (501, 1000)                                0.22068         0.27153           1.23x

    masked_input of d = 100,000 encoded values (FixedPoint n_clients=100, bound=1, frac=16)
    peers                                      seconds      per expand  vs peers+1 expands
    9                                           0.0062         0.00062           2.58x
    99                                          0.0627         0.00063           2.59x

    CKKS aggregation (default CKKSParameters): 10 clients x 100,000 float32 parameters
    keygen s                            encrypt s/client     sum of 10 s       decrypt s     ct B/client       float32 B       expansion     max abs err
    0.015                                       0.1281          0.1162          0.0318       5,877,205         400,000          14.69x        3.25e-08
    public context 363,525 B; aggregate ciphertext 5,876,466 B

    commitments: 10 clients x 100,000 float32 (SHA-256 commit, server check_openings)
    commit s (all)                       check s (all)     MB/s commit    check/commit
    0.0039                                      0.0038            1029           0.97x

    load average 0.9 at the end

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/aggregation_primitives.py --threads 1 [--reps 5] [--quick]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path as _Path

# benchmarks/defenses.py shares the package's name: keep this folder off sys.path, so that
# ``import defenses`` finds the package when this script runs as ``python benchmarks/<name>.py``
sys.path[:] = [p for p in sys.path if _Path(p or ".").resolve() != _Path(__file__).resolve().parent]

import torch  # noqa: E402

from defenses.commitments import check_openings, commit  # noqa: E402
from defenses.homomorphic import CKKSClient, CKKSServer, KeyHolder  # noqa: E402
from defenses.secagg.encoding import FixedPoint  # noqa: E402
from defenses.secagg.masks import expand, masked_input  # noqa: E402
from defenses.secagg.shamir import reconstruct, share  # noqa: E402


def median_seconds(fn, reps: int) -> float:
    """Median seconds of ``reps`` timed calls after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def paired_median_seconds(fa, fb, reps: int) -> tuple[float, float]:
    """Medians of ``fa`` and ``fb`` timed alternately (one warm-up each), so load shifts both alike."""
    fa(), fb()
    ta, tb = [], []
    for _ in range(reps):
        for fn, times in ((fa, ta), (fb, tb)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def row(*cells) -> None:
    print("  ".join(f"{c:>14}" if i else f"{c:<34}" for i, c in enumerate(cells)))


def bench_expand(sizes, reps: int) -> None:
    print("\nmask stream: expand (ChaCha20) vs torch.randint (non-cryptographic reference)")
    row("n elements", "expand s", "expand MB/s", "randint s", "randint MB/s", "expand/randint")
    seed, g = os.urandom(32), torch.Generator().manual_seed(0)
    for n in sizes:
        te, tr = paired_median_seconds(lambda: expand(seed, n, 32),
                                       lambda: torch.randint(0, 2 ** 32, (n,), generator=g), reps)
        row(f"{n:,}", f"{te:.5f}", f"{8 * n / te / 1e6:.0f}", f"{tr:.5f}", f"{8 * n / tr / 1e6:.0f}", f"{te / tr:.2f}x")


def bench_shamir(pairs, reps: int) -> None:
    print("\nShamir secret sharing of a 32-byte secret (reconstruct from exactly t shares)")
    row("(t, n)", "share s", "reconstruct s", "reconstruct/share")
    secret = os.urandom(32)
    for t, n in pairs:
        shares = share(secret, t, n)
        if reconstruct(shares[:t]) != secret:
            raise RuntimeError(f"Shamir ({t}, {n}) did not reconstruct the secret")
        ts = median_seconds(lambda: share(secret, t, n), reps)
        tr = median_seconds(lambda: reconstruct(shares[:t]), reps)
        row(f"({t}, {n})", f"{ts:.5f}", f"{tr:.5f}", f"{tr / ts:.2f}x")


def bench_masked_input(d: int, peer_counts, reps: int) -> None:
    print(f"\nmasked_input of d = {d:,} encoded values (FixedPoint n_clients=100, bound=1, frac=16)")
    fp = FixedPoint(100, 1.0, 16)
    x = fp.encode(torch.rand(d, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    seed = os.urandom(32)
    t1 = median_seconds(lambda: expand(seed, d, fp.bits), reps)
    row("peers", "seconds", "per expand", "vs peers+1 expands")
    for peers in peer_counts:
        peer_seeds = {v: os.urandom(32) for v in range(1, peers + 1)}
        tm = median_seconds(lambda: masked_input(x, 0, peer_seeds, seed, fp.bits), reps)
        row(f"{peers}", f"{tm:.4f}", f"{tm / (peers + 1):.5f}", f"{tm / ((peers + 1) * t1):.2f}x")


def bench_homomorphic(d: int, clients: int, reps: int) -> None:
    print(f"\nCKKS aggregation (default CKKSParameters): {clients} clients x {d:,} float32 parameters")
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(d, generator=g) for _ in range(clients)]
    t = time.perf_counter()
    holder = KeyHolder()
    public = holder.public_context()
    keygen = time.perf_counter() - t
    client, server = CKKSClient(public), CKKSServer(public)
    enc, add, dec = [], [], []
    for _ in range(reps):
        t = time.perf_counter()
        cts = [client.encrypt(x) for x in xs]
        enc.append((time.perf_counter() - t) / clients)
        t = time.perf_counter()
        total = server.aggregate(cts)
        add.append(time.perf_counter() - t)
        t = time.perf_counter()
        out = holder.decrypt(total)
        dec.append(time.perf_counter() - t)
    err = (out - torch.stack(xs).double().sum(0)).abs().max().item()
    plain = 4 * d
    row("keygen s", "encrypt s/client", f"sum of {clients} s", "decrypt s", "ct B/client", "float32 B",
        "expansion", "max abs err")
    row(f"{keygen:.3f}", f"{statistics.median(enc):.4f}", f"{statistics.median(add):.4f}",
        f"{statistics.median(dec):.4f}", f"{len(cts[0]):,}", f"{plain:,}", f"{len(cts[0]) / plain:.2f}x",
        f"{err:.2e}")
    print(f"public context {len(public):,} B; aggregate ciphertext {len(total):,} B")


def bench_commitments(d: int, clients: int, reps: int) -> None:
    print(f"\ncommitments: {clients} clients x {d:,} float32 (SHA-256 commit, server check_openings)")
    g = torch.Generator().manual_seed(1)
    xs = {f"client:{i}": torch.randn(d, generator=g) for i in range(clients)}
    made = {}

    def commit_all():
        made.update({cid: commit(x, cid, 0) for cid, x in xs.items()})

    tc = median_seconds(commit_all, reps)
    commitments = {cid: c for cid, (c, _) in made.items()}
    openings = {cid: (xs[cid], o) for cid, (_, o) in made.items()}
    tv = median_seconds(lambda: check_openings(commitments, openings, 0), reps)
    if set(check_openings(commitments, openings, 0)) != set(xs):
        raise RuntimeError("check_openings did not release every client's tensor")
    row("commit s (all)", "check s (all)", "MB/s commit", "check/commit")
    mb = 4 * d * clients / 1e6
    row(f"{tc:.4f}", f"{tv:.4f}", f"{mb / tc:.0f}", f"{tv / tc:.2f}x")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--reps", type=int, default=5, help="repetitions; each figure is their median")
    p.add_argument("--quick", action="store_true", help="skip Shamir (501, 1000)")
    p.add_argument("--expand-sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--d", type=int, default=100_000, help="vector length for masked_input, CKKS, commitments")
    p.add_argument("--peers", type=int, nargs="+", default=[9, 99])
    p.add_argument("--clients", type=int, default=10, help="clients for CKKS and commitments")
    args = p.parse_args(argv)
    if args.threads < 1 or args.reps < 1 or args.d < 1 or args.clients < 1:
        raise ValueError("--threads, --reps, --d and --clients must be >= 1")
    torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, reps {args.reps}, load average {os.getloadavg()[0]:.1f} at start")
    bench_expand(args.expand_sizes, args.reps)
    pairs = [(3, 5), (51, 100)] + ([] if args.quick else [(501, 1000)])
    bench_shamir(pairs, args.reps)
    bench_masked_input(args.d, args.peers, args.reps)
    bench_homomorphic(args.d, args.clients, args.reps)
    bench_commitments(args.d, args.clients, args.reps)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
