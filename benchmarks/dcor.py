"""Our distance correlation against the ``dcor`` library, side by side in one run; and the cost of
NoPeek's term in a split training step.

Part 1, at n = 1,000, 4,000 and 10,000 (X n x 64, Z n x 128, dependent, float64): the value, the
median seconds and the peak resident memory of

* ``ours``: :func:`toolkit.metrics.distance_correlation` as evaluation calls it (no input requires
  a gradient), which is the blocked one-pass form, i.e. ``distance_correlation_chunked`` with its
  default chunk (the same code; O(n * chunk) memory);
* ``ours (n,n)``: the same call with ``z.requires_grad_()``, forward only: the differentiable form
  that builds both (n, n) matrices (what NoPeek trains on); ``ours (n,n)+bwd`` adds ``backward()``;
* ``torch plain``: the textbook float64 torch version (``torch.cdist``, double centring, no
  exactness fixes), the 0.61 s on record at n = 4,000;
* ``dcor scipy``: ``dcor.distance_correlation`` on its intended path, scipy's ``cdist``. As
  installed (with array-api-compat) dcor's ``_can_be_numpy_double`` says no to NumPy arrays, so
  its default call broadcasts an (n, n, d) array instead; here that check is patched to accept
  float64 NumPy arrays, which sends dcor to ``scipy.spatial.distance.cdist``;
* ``dcor default``: the call as installed (16 GB at n = 4,000), only with ``--with-default-dcor``,
  under an address-space limit (``--memory-limit-gb``); out of memory is reported, not fatal.

Each (method, n) runs in a fresh subprocess with one thread (``OMP_NUM_THREADS=1`` and
``torch.set_num_threads(1)``; peak RSS is its own, reported as the peak minus the RSS before the
call), the methods interleaved per n. The speed-up column is a method's seconds over ``ours``.
Then ``distance_correlation_chunked`` at n = 20,000 (target: under 2 GB peak).

Part 2: one vanilla split training step at batch 64 on MNIST-shaped inputs (conv-relu-pool client
part, MLP server part, Adam) with NoPeek(alpha=1) against the plain step, in alternating blocks;
the ratio is the median over adjacent (plain, NoPeek) block pairs of their ratio (robust to other
processes' load, which shifts both blocks of a pair alike); target at most 1.3x.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/dcor.py [--sizes 1000 4000 10000] [--reps 3]
        [--with-default-dcor] [--default-dcor-max-n 4000] [--memory-limit-gb 18] [--big 20000]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# this file is named dcor.py: keep its own folder off the path, so ``import dcor`` finds the library
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

METHODS = ["ours", "ours (n,n)", "ours (n,n)+bwd", "torch plain", "dcor scipy", "dcor default"]


def sample(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """X (n, 64) and Z (n, 128), Z a noisy nonlinear function of X (dCor about 0.7)."""
    g = np.random.default_rng(seed)
    x = g.standard_normal((n, 64))
    z = np.tanh(x @ g.standard_normal((64, 128)) / 8) + 0.5 * g.standard_normal((n, 128))
    return x, z


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _plain_torch(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    def centred(v):
        d = torch.cdist(v, v)
        return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()
    a, b = centred(x), centred(z)
    return ((a * b).mean() / ((a * a).mean() * (b * b).mean()).sqrt()).sqrt()


def _call(method: str):
    from toolkit import metrics

    if method == "ours":
        return lambda x, z: float(metrics.distance_correlation(torch.from_numpy(x), torch.from_numpy(z)))
    if method == "ours chunked":
        return lambda x, z: float(metrics.distance_correlation_chunked(torch.from_numpy(x), torch.from_numpy(z)))
    if method.startswith("ours (n,n)"):
        def full(x, z):
            v = metrics.distance_correlation(torch.from_numpy(x), torch.from_numpy(z).requires_grad_())
            if method.endswith("+bwd"):
                v.backward()
            return float(v.detach())
        return full
    if method == "torch plain":
        return lambda x, z: float(_plain_torch(torch.from_numpy(x), torch.from_numpy(z)))
    import dcor
    import dcor.distances

    if method == "dcor scipy":
        dcor.distances._can_be_numpy_double = lambda a: isinstance(a, np.ndarray) and a.dtype == np.float64
    return lambda x, z: float(dcor.distance_correlation(x, z))


def worker(method: str, n: int, reps: int, limit_gb: float | None) -> None:
    """Runs in its own process: prints one JSON line (value, median seconds, peak memory)."""
    torch.set_num_threads(1)
    fn = _call(method)
    x, z = sample(n)
    before = _rss_mb()
    if limit_gb is not None:
        limit = int(limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    times, value = [], None
    try:
        for _ in range(reps):
            t = time.perf_counter()
            value = fn(x, z)
            times.append(time.perf_counter() - t)
    except MemoryError as err:
        print(json.dumps({"method": method, "n": n, "error": f"out of memory ({str(err)[:60]})"}))
        return
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"method": method, "n": n, "value": value, "seconds": statistics.median(times),
                      "peak_mb": peak - before}))


def run_worker(method: str, n: int, reps: int, limit_gb: float | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, str(n), "--reps", str(reps)]
    if limit_gb is not None:
        cmd += ["--memory-limit-gb", str(limit_gb)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                                                                     "PATH": "/usr/bin:/bin"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"method": method, "n": n, "error": f"exit {done.returncode}: {done.stderr.strip()[-120:]}"}
    return json.loads(lines[-1])


def part1(sizes, reps, with_default, limit_gb, big, default_max_n):
    print(f"Part 1: distance correlation, X n x 64, Z n x 128, float64, one thread per process; median of "
          f"{reps} (1 at n >= 10,000); peak = resident memory above the process before the call")
    print(f"{'n':>6}  {'method':<15} {'value':>20} {'rel. to dcor scipy':>19} {'seconds':>9} "
          f"{'peak MB':>8}  {'ours is faster by':>17}")
    for n in sizes:
        methods = [m for m in METHODS if m != "dcor default" or (with_default and n <= default_max_n)]
        r = 1 if n >= 10_000 else reps
        got = {m: run_worker(m, n, r, limit_gb if m == "dcor default" else None) for m in methods}
        ref = got["dcor scipy"].get("value")
        ours = got["ours"].get("seconds")
        for m in methods:
            row = got[m]
            if "error" in row:
                print(f"{n:>6}  {m:<15} {row['error']}")
                continue
            rel = abs(row["value"] - ref) / abs(ref) if ref else float("nan")
            speed = f"{row['seconds'] / ours:.1f}x" if ours and m != "ours" else ""
            print(f"{n:>6}  {m:<15} {row['value']:>20.15f} {rel:>19.1e} {row['seconds']:>9.3f} "
                  f"{row['peak_mb']:>8.0f}  {speed:>17}")
    if big:
        row = run_worker("ours chunked", big, 1, None)
        print(f"{big:>6}  ours chunked    " + (row.get("error") or
              f"{row['value']:.15f}  {row['seconds']:.2f} s  peak {row['peak_mb']:.0f} MB "
              f"(target under 2,048 MB)"))


def part2(blocks: int = 10, steps: int = 30) -> None:
    from torch import nn

    from defenses import NoPeek
    from toolkit import data
    from toolkit.split import SplitConfig, SplitNN

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    n = 64 * steps
    x, y = torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    ds = data.Dataset("mnist-shaped", x, y, x[:64], y[:64], classes=[str(k) for k in range(10)])

    def run(hooks):
        torch.manual_seed(0)
        client = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))  # (B, 16, 14, 14)
        server = nn.Sequential(nn.Flatten(), nn.Linear(16 * 14 * 14, 128), nn.ReLU(), nn.Linear(128, 10))
        config = SplitConfig(optimizer="adam", lr=1e-3, batch_size=64, record=False, shuffle=False)
        sl = SplitNN.vanilla(client, server, ds, config=config, hooks=hooks)
        t = time.perf_counter()
        sl.fit(steps=steps)
        return (time.perf_counter() - t) / steps

    variants = {"plain": lambda: run(None), "NoPeek(1.0)": lambda: run({"client": NoPeek(1.0)})}
    times: dict[str, list[float]] = {k: [] for k in variants}
    run(None)  # warm-up
    for b in range(blocks):
        for k in (list(variants) if b % 2 == 0 else list(variants)[::-1]):
            times[k].append(variants[k]())
    print(f"\nPart 2: vanilla split step, batch 64, MNIST-shaped, conv-relu-pool | MLP, Adam; {blocks} "
          f"alternating blocks of {steps} steps; ratio: median over block pairs")
    for k, v in times.items():
        ratio = statistics.median(a / p for a, p in zip(v, times["plain"]))
        best = min(v) / min(times["plain"])
        print(f"  {k:<12} {1e3 * statistics.median(v):7.2f} ms/step (median block)  {ratio:.2f}x plain"
              f" ({best:.2f}x fastest block to fastest block)"
              + ("  (target <= 1.3x)" if k != "plain" else "")
              + f"  blocks {' '.join(f'{1e3 * t:.1f}' for t in v)}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 10000])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--with-default-dcor", action="store_true", help="also time dcor's default call (GBs)")
    p.add_argument("--memory-limit-gb", type=float, default=18.0)
    p.add_argument("--default-dcor-max-n", type=int, default=4000,
                   help="largest n for dcor's default call (1,000: ~1 GB; 4,000: ~16 GB)")
    p.add_argument("--big", type=int, default=20000, help="n for the chunked form alone (0: skip)")
    p.add_argument("--skip-step", action="store_true", help="skip part 2 (the NoPeek training step)")
    p.add_argument("--worker", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.reps, args.memory_limit_gb
               if args.worker[0] == "dcor default" else None)
        return
    part1(args.sizes, args.reps, args.with_default_dcor, args.memory_limit_gb, args.big, args.default_dcor_max_n)
    if not args.skip_step:
        part2()


if __name__ == "__main__":
    main()
