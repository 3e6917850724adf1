"""One federated task under every aggregation scheme (issue 12), one tidy table.

Plain FedAvg, central / distributed / local DP (``defenses.DPAggregation``, DP-FedAvg's clipping and
Gaussian noise, Opacus accounting), SecAgg and SecAgg+ (``defenses.secure_aggregation``, Bonawitz et
al. 2017, Bell et al. 2020), CKKS and CKKS + noise (``defenses.HomomorphicAggregation``) run the same
task (``toolkit.experiments_aggregation.SuiteConfig``: MNIST, a 784-128-10 MLP of 101,770
parameters, n = 10, 100, 1,000 clients, 20 rounds) through ``aggregation_suite``: DLG's PSNR on what
the server received for one client's single-sample update (``psnr``) and the analytic attack's
(``psnr_analytic``: Phong et al.'s exact recovery from the first linear layer's gradient, which a
ReLU MLP on MNIST does not resist where DLG's L-BFGS search stalls), epsilon, rounds and simulated time to 80%
test accuracy, final accuracy, bytes per client and round up and down, client and server compute
seconds. A (scheme, n) whose round would not fit the per-cell budget is skipped with its reason.

Then Bonawitz et al.'s figure: "1.73x communication expansion for 2^10 users and 2^20-dimensional
vectors" of 16-bit values, over sending the data in the clear. Ours is extrapolated from measured
protocol rounds on 2^20 random values at n = 8, 16, 32 and put beside it, against 16-bit and
against float32 plaintext: bytes per client = the masked input, whose ring widens with n
(``ring_bits(n)`` bits per value, known exactly), plus a + b n for the rest (keys, shares; least
squares, the fit's largest relative residual printed: exact for SecAgg's n - 1 peers and for CKKS,
whose bytes do not grow with n; SecAgg+'s O(log n) neighbours do not fit a line, so its figure
overstates).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/aggregation_suite.py --threads 1 [--quick]
        [--schemes plain,secagg,...] [--clients 10 100 1000] [--rounds 20] [--budget 900] [--out suite.csv]
        [--no-expansion | --expansion-only]

``--quick``: digits, a 64-16-10 MLP, n = 4 and 8, two rounds, DLG capped at 3 steps: seconds.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path as _Path

# benchmarks/defenses.py shares the package's name: keep this folder off sys.path, so that
# ``import defenses`` finds the package when this script runs as ``python benchmarks/<name>.py``
sys.path[:] = [p for p in sys.path if _Path(p or ".").resolve() != _Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from attacks import DLG, AnalyticFC  # noqa: E402
from defenses import DPAggregation, HomomorphicAggregation  # noqa: E402
from toolkit.aggregation_probe import ClockedWire  # noqa: E402
from toolkit.experiments_aggregation import SuiteConfig, aggregation_suite, attack_leakage  # noqa: E402
from toolkit import metrics  # noqa: E402
from toolkit.federated import FedConfig, PlainSum, Uploads  # noqa: E402

BONAWITZ = {"users": 2 ** 10, "d": 2 ** 20, "bits": 16, "expansion": 1.73}  # CCS 2017, abstract and section 7


def _secure(**kw):
    from defenses.secure_aggregation import SecureAggregation  # the secure aggregation helper's module
    return SecureAggregation(**kw)


def _secure_plus(**kw):
    from defenses.secure_aggregation import SecAggPlus
    return SecAggPlus(**kw)


def schemes(args) -> dict:
    """name -> scheme(config, n) -> aggregator, for the names in ``args.schemes``."""
    dp = dict(clip=args.clip, noise_multiplier=args.noise_multiplier)
    bound = args.bound
    made = {
        "plain": lambda c, n: PlainSum(),
        "central_dp": lambda c, n: DPAggregation.for_config(c, n, inner=PlainSum(), mode="central", **dp),
        "distributed_dp": lambda c, n: DPAggregation.for_config(c, n, inner=_secure(bound=bound), mode="distributed",
                                                                **dp),
        "local_dp": lambda c, n: DPAggregation.for_config(c, n, inner=PlainSum(), mode="local", **dp),
        "secagg": lambda c, n: _secure(bound=bound),
        "secagg_plus": lambda c, n: _secure_plus(bound=bound),
        "ckks": lambda c, n: HomomorphicAggregation(),
        "ckks_noise": lambda c, n: HomomorphicAggregation(noise_std=args.he_noise),
    }
    unknown = [s for s in args.schemes if s not in made]
    if unknown:
        raise ValueError(f"unknown schemes {unknown}; choose from {sorted(made)}")
    return {s: made[s] for s in args.schemes}


def per_client_bytes(scheme, n: int, d: int, seed: int = 0) -> tuple[float, float, dict]:
    """Bytes one client sends and receives in one protocol round of ``n`` clients on ``d`` random
    values, and the aggregator's manifest after it."""
    g = torch.Generator().manual_seed(seed)
    names = tuple(f"client:{i}" for i in range(n))
    uploads = Uploads((torch.rand(n, d, generator=g) - 0.5) * 0.1, names, torch.ones(n, dtype=torch.float64),
                      torch.arange(n, dtype=torch.float64), 1, g)
    wire = ClockedWire(names, record=False)
    wire.start()
    aggregator = scheme(FedConfig(), n)
    aggregator.over_wire(wire, uploads)
    counts = wire.stop()
    return counts["client_bytes_up"] / n, counts["client_bytes_down"] / n, aggregator.manifest()


def masked_input_bytes(record: dict, n: int, d: int) -> float:
    """Bytes of one client's masked input at ``n`` clients (0 for a scheme without a ring): ``d``
    values and the weight coordinate in the ring of ``ring_bits(n, bound, frac)`` bits."""
    if record.get("ring_bits") is None:
        return 0.0
    from defenses.secagg import ring_bits
    from defenses.secagg.wireformat import packed_bytes
    return float(packed_bytes(d + 1, ring_bits(n, record["bound"], record["frac"])))


def expansion(scheme, ns: list[int], d: int) -> dict:
    """Bytes per client (up, and up + down) measured at ``d`` values for each n in ``ns``: the masked
    input's exact size at n plus a + b n for the rest (least squares), extrapolated to Bonawitz et
    al.'s 2^10 users."""
    rows = [per_client_bytes(scheme, n, d) for n in ns]
    for n, (_, _, record) in zip(ns, rows):
        if record.get("ring_bits") is not None:
            from defenses.secagg import ring_bits
            if record["ring_bits"] != ring_bits(n, record["bound"], record["frac"]):
                raise ValueError(f"the manifest's ring_bits {record['ring_bits']} at n={n} is not ring_bits(n)")
    ring = np.array([masked_input_bytes(r, n, d) for n, (_, _, r) in zip(ns, rows)])
    ring_at = masked_input_bytes(rows[-1][2], BONAWITZ["users"], d)
    x = np.array([[1.0, n] for n in ns])
    out = {}
    for what, y in (("up", np.array([u for u, _, _ in rows])), ("total", np.array([u + w for u, w, _ in rows]))):
        coef, *_ = np.linalg.lstsq(x, y - ring, rcond=None)
        residual = float(np.max(np.abs(x @ coef + ring - y) / y))
        at = float(coef @ [1.0, BONAWITZ["users"]]) + ring_at
        out[what] = {"bytes": at, "vs16": at / (d * BONAWITZ["bits"] / 8), "vs32": at / (4 * d), "residual": residual,
                     "per_peer": float(coef[1])}
    return out


COLUMNS = ["scheme", "clients", "status", "psnr", "psnr_analytic", "epsilon_rdp", "final_accuracy", "rounds_to_target",
           "time_to_target", "bytes_up", "bytes_down", "expansion", "client_seconds", "server_seconds", "sim_seconds", "seconds"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--quick", action="store_true", help="digits, n = 4 and 8, two rounds, DLG 3 steps: seconds")
    p.add_argument("--schemes", default="plain,central_dp,distributed_dp,local_dp,secagg,secagg_plus,ckks,ckks_noise")
    p.add_argument("--clients", type=int, nargs="+", default=None, help="numbers of clients (default 10 100 1000)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--budget", type=float, default=None, help="wall seconds per (scheme, n)")
    p.add_argument("--root", default=None, help="MNIST's folder (default: toolkit.data.default_root())")
    p.add_argument("--clip", type=float, default=1.0, help="DP: the clients' L2 clip C")
    p.add_argument("--noise-multiplier", type=float, default=1.0, help="DP: z, noise std in units of C")
    p.add_argument("--he-noise", type=float, default=0.01, help="CKKS + noise: each client's noise std")
    p.add_argument("--bound", type=float, default=4.0, help="secure aggregation's fixed-point bound per value")
    p.add_argument("--attack-steps", type=int, default=None, help="cap DLG's L-BFGS steps (default: none)")
    p.add_argument("--no-expansion", action="store_true", help="skip the Bonawitz et al. comparison")
    p.add_argument("--expansion-only", action="store_true", help="only the Bonawitz et al. comparison")
    p.add_argument("--out", default=None, help="write the table as CSV here")
    args = p.parse_args(argv)
    args.schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    if args.threads < 1:
        raise ValueError("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="opacus")  # PRV at sample rate 1
    config = SuiteConfig.smoke() if args.quick else SuiteConfig(root=args.root)
    changes = {k: v for k, v in (("clients", tuple(args.clients or ()) or None), ("rounds", args.rounds),
                                 ("budget_seconds", args.budget)) if v is not None}
    if args.quick:
        changes.setdefault("clients", (4, 8))
    config = SuiteConfig(**{**vars(config), **changes})
    steps = args.attack_steps if args.attack_steps is not None else (3 if args.quick else None)
    dlg = attack_leakage(lambda model, shape, lr: DLG(model, input_shape=shape, client_lr=lr), max_steps=steps)

    def leakage(probe):  # DLG's scores, and the analytic attack's on the same reading
        scores = dlg(probe)
        exact = AnalyticFC(model=probe.model, input_shape=probe.input_shape).run(probe.observed)
        return {**scores, **{f"{k}_analytic": v for k, v in metrics.evaluate(exact, probe.truth).items()}}
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} at start; {config.dataset}, "
          f"MLP {config.hidden}, clients {config.clients}, {config.rounds} rounds, target {config.target_accuracy:.0%}, "
          f"budget {config.budget_seconds:,.0f} s per (scheme, n)")
    if args.expansion_only and args.no_expansion:
        raise ValueError("--expansion-only and --no-expansion exclude each other")
    start = time.perf_counter()
    if not args.expansion_only:
        table(args, config, leakage, start)
    if not args.no_expansion:
        bonawitz(args)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


def table(args, config: SuiteConfig, leakage, start: float) -> None:
    """Run the suite and print (and write) its table."""
    frame = aggregation_suite(schemes(args), config, leakage=leakage, show_progress=not args.quick)
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_colwidth", 60):
        print(frame[[c for c in COLUMNS if c in frame]].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        reasons = frame[frame["status"] != "ok"][["scheme", "clients", "status", "reason"]]
        if len(reasons):
            print("\nnot measured in full:\n" + reasons.to_string(index=False))
        print("\nwhat the server read of client:0's update:\n"
              + frame.drop_duplicates("scheme")[["scheme", "reading"]].to_string(index=False))
    print(f"\nsuite: {time.perf_counter() - start:,.0f} s")
    if args.out:
        frame.to_csv(args.out, index=False)
        print(f"wrote {args.out}")


def bonawitz(args) -> None:
    """Print our communication expansion beside Bonawitz et al.'s."""
    made = schemes(argparse.Namespace(**{**vars(args), "schemes": [s for s in ("plain", "secagg", "secagg_plus", "ckks")
                                                                     if s in args.schemes]}))
    ns, d = ([4, 8, 16], 2 ** 12) if args.quick else ([8, 16, 32], BONAWITZ["d"])
    print(f"\ncommunication expansion at {BONAWITZ['users']:,} users, d = {d:,} values: bytes per client and "
          f"round, measured at n = {ns}: the masked input at ring_bits(n) plus a + b n")
    print(f"{'scheme':<14}{'up MB':>10}{'total MB':>10}{'vs 16-bit':>11}{'vs float32':>12}{'B/peer':>9}"
          f"{'fit resid':>11}")
    print(f"{'Bonawitz':<14}{'':>10}{'':>10}{BONAWITZ['expansion']:>10.2f}x{'':>12}{'':>9}{'':>11}"
          f"   (2^20 16-bit values, CCS 2017)")
    for name, scheme in made.items():
        e = expansion(scheme, ns, d)
        up, total = e["up"], e["total"]
        print(f"{name:<14}{up['bytes'] / 1e6:>10.2f}{total['bytes'] / 1e6:>10.2f}{total['vs16']:>10.2f}x"
              f"{total['vs32']:>11.2f}x{total['per_peer']:>9.0f}{max(up['residual'], total['residual']):>11.1e}")


if __name__ == "__main__":
    main()
