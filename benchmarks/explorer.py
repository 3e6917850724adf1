"""How long the leakage explorer takes to answer a click, on digits (target: under 15 s per click on a
2-core machine).

A click is ``LeakageExplorer.run()``, what the Run button does: train the split model 2 epochs
(unless cached), attack what the server received for 8 test images (unless cached), compute the
attribution map, draw both figures as PNGs and the scores. Timed in one process, side by side:

* ``first click``: the process's first run (includes the one-off imports: captum, torchmetrics,
  matplotlib's first figure);
* ``cold``: a setting not run before (training + attack + figures), for each listed setting;
* ``attack only``: the same training with the other attack (training from the cache);
* ``cached``: the same setting again (training and attack from the cache, figures redrawn).

Each is the median of ``--reps`` repetitions (cold ones on fresh sessions, so nothing is cached),
wall and CPU seconds, for each ``--threads`` value side by side (the explorer runs on 1 thread by
default: its small models gain nothing from more, and lose a lot when other processes share the
cores).

    PYTHONPATH=. python benchmarks/explorer.py [--threads 1] [--reps 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the packages, before benchmarks/defenses.py

SETTINGS = [  # (label, Setting keyword arguments)
    ("mlp cut act1, no defense, white-box", dict(model="mlp", cut="act1")),
    ("convnet cut pool1, no defense, white-box", dict(model="convnet", cut="pool1")),
    ("convnet cut pool1, NoPeek 3, white-box", dict(model="convnet", cut="pool1", defense="NoPeek", strength=3.0)),
    ("convnet cut pool1, noise 0.5, inverse network", dict(model="convnet", cut="pool1", defense="Gaussian noise",
                                                          strength=0.5, attack="inverse network")),
]


def click(explorer, **setting) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one click."""
    start, cpu = time.perf_counter(), time.process_time()
    outcome = explorer.run(**setting)
    seconds = (time.perf_counter() - start, time.process_time() - cpu)
    if outcome is None or outcome.stopped:
        raise RuntimeError(f"the click did not finish: {explorer.status.value}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch intra-op threads during a click, one column each (the explorer's default: 1)")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    from attacks import EXPLORER_ATTACKS
    from defenses import EXPLORER_DEFENSES
    from toolkit import data
    from toolkit.widgets import LeakageExplorer

    def explorer(threads: int) -> LeakageExplorer:
        return LeakageExplorer(defenses=EXPLORER_DEFENSES, attacks=EXPLORER_ATTACKS,
                               datasets={"digits": lambda: data.load("digits")}, epochs=2, threads=threads)

    load = os.getloadavg()[0]
    start, cpu = time.perf_counter(), time.process_time()
    first = explorer(args.threads[0])
    build = (time.perf_counter() - start, time.process_time() - cpu)
    rows = {"build the dashboard (load digits)": {args.threads[0]: [build]},
            "first click (imports included)": {args.threads[0]: [click(first)]}}
    for label, setting in SETTINGS:
        swap = "inverse network" if setting.get("attack") != "inverse network" else "white-box inversion"
        names = [f"cold: {label}", f"attack only ({swap}): {label}", f"cached: {label}"]
        for name in names:
            rows[name] = {t: [] for t in args.threads}
        for _ in range(args.reps):
            for threads in args.threads:  # interleaved, so a change in the machine's load hits every column
                e = explorer(threads)
                for name, s in zip(names, [setting, {**setting, "attack": swap}, setting]):
                    rows[name][threads].append(click(e, **s))
                assert e.session.trainings == 1, "the attack-only and cached clicks re-used the training"

    print(f"leakage explorer on digits, 2 epochs, {os.cpu_count()} cores, load average {load:.1f} at the start and "
          f"{os.getloadavg()[0]:.1f} at the end (other processes share the cores: wall time grows with the load)")
    width = max(map(len, rows))
    head = " | ".join(f"{t} thread{'s' if t > 1 else ''}: wall (min-max), CPU" for t in args.threads)
    print(f"  {'seconds, median of ' + str(args.reps):<{width}}  {head}")
    for label, by_threads in rows.items():
        cells = []
        for t in args.threads:
            times = by_threads.get(t)
            if not times:
                cells.append(" " * 27)
                continue
            wall, cpu = [x[0] for x in times], [x[1] for x in times]
            spread = f"({min(wall):5.2f}-{max(wall):5.2f})" if len(times) > 1 else " " * 13
            cells.append(f"{statistics.median(wall):6.2f} {spread} {statistics.median(cpu):5.2f}")
        ratio = ""
        if len(args.threads) > 1 and all(by_threads.get(t) for t in args.threads):
            walls = [statistics.median(x[0] for x in by_threads[t]) for t in args.threads]
            ratio = f"  wall ratio {args.threads[-1]}/{args.threads[0]} threads: {walls[-1] / walls[0]:.2f}x"
        print(f"  {label:<{width}}  {' | '.join(cells)}{ratio}")
    default = [x[0] for name, by in rows.items() if name.startswith(("cold", "attack", "cached"))
               for x in by[args.threads[0]]]
    worst = max(default)
    print(f"slowest click at {args.threads[0]} thread(s): {worst:.2f} s wall; target < 15 s per click: "
          f"{'met' if worst < 15 else 'NOT met'}")


if __name__ == "__main__":
    main()
