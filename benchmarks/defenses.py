"""The defenses' cost, side by side: DP-SGD through our wrapper against Opacus called directly
(benchmarks/dp_sgd.py), and vectorized per-sample DP for 1,000 federated clients against the
sequential Opacus loop, plus DP-FedAvg against FedAvg (benchmarks/dp_federated.py); each prints
seconds, ratios and the epsilon both sides spent. ``--all`` adds the privacy-utility measurements
of the other defenses (NoPeek over seeds, splintering, activation, label and gradient defenses;
several minutes each).

    python benchmarks/defenses.py --threads 1 [--all]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TIMINGS = ["dp_sgd.py", "dp_federated.py"]
MEASUREMENTS = ["nopeek.py", "splintering.py", "activation_defenses.py", "label_defenses.py", "gradient_defenses.py"]
# Run each script from the repository root without its own folder on sys.path: this file's name
# would otherwise shadow the defenses package for every script here that imports it.
RUN = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads for every script")
    parser.add_argument("--all", action="store_true", help="also run the privacy-utility measurements")
    args = parser.parse_args()
    scripts = TIMINGS + (MEASUREMENTS if args.all else [])
    failed = []
    for script in scripts:
        if not (HERE / script).exists():
            continue
        print(f"\n=== benchmarks/{script} ===", flush=True)
        extra = ["--threads", str(args.threads)] if args.threads else []
        if subprocess.run([sys.executable, "-c", RUN, str(HERE / script), *extra], cwd=HERE.parent).returncode:
            failed.append(script)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
