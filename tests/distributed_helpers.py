"""Starting ranks as subprocesses for the toolkit.distributed tests (127.0.0.1, a free port, hard timeouts).

A test names a scenario function ``fn(rank, world, port, *args) -> JSON-able``; every rank runs
``python tests/distributed_helpers.py module:fn rank world port args-json`` and prints its result
as one ``RESULT {json}`` line. ``run_ranks`` returns the results per rank, or raises with every
rank's stderr when one fails or overruns (all are killed: nothing is left running).
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

from toolkit.distributed.launch import free_port

ROOT = Path(__file__).resolve().parents[1]


def start(target: str, rank: int, world: int, port: int, args=(), *, env: dict | None = None) -> subprocess.Popen:
    environ = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1",
               **(env or {})}
    cmd = [sys.executable, str(Path(__file__).resolve()), target, str(rank), str(world), str(port),
           json.dumps(list(args))]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ, cwd=ROOT)


def collect(procs: list[subprocess.Popen], timeout: float = 90.0) -> list:
    """Each process's RESULT (in order); kills them all and raises on a failure or a timeout."""
    outputs, failed = [], None
    try:
        for i, p in enumerate(procs):
            try:
                out, err = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                failed = f"process {i} did not finish within {timeout} s"
                break
            outputs.append((p.returncode, out, err))
            if p.returncode != 0:
                failed = f"process {i} exited with {p.returncode}:\n{err[-4000:]}"
                break
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    if failed:
        raise AssertionError(failed)
    results = []
    for _, out, err in outputs:
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        if not lines:
            raise AssertionError(f"a process printed no RESULT; stderr:\n{err[-4000:]}")
        results.append(json.loads(lines[-1][len("RESULT "):]))
    return results


def run_ranks(target: str, world: int, args=(), *, timeout: float = 90.0) -> list:
    port = free_port()
    return collect([start(target, r, world, port, args) for r in range(world)], timeout=timeout)


def sequence(rank: int, world: int, port: int, plan: list) -> list:
    """Run several scenarios one after the other in this process, each ``[target, port, args]`` on its
    own group and port (one process start for many tests); a failing one gives ``{"failed": traceback}``."""
    import traceback
    out = []
    for target, own_port, args in plan:
        module, fn = target.split(":")
        try:
            out.append(getattr(importlib.import_module(module), fn)(rank, world, own_port, *args))
        except Exception:  # noqa: BLE001  (reported to the test, which fails on it)
            out.append({"failed": traceback.format_exc()[-3000:]})
    return out


def run_sequence(scenarios: list[tuple[str, list]], world: int, *, timeout: float = 240.0) -> list[list]:
    """``[(target, args), ...]`` run in order by the same ``world`` processes; results[i][rank]."""
    plan = [[target, free_port(), list(args)] for target, args in scenarios]
    per_rank = run_ranks(f"{Path(__file__).stem}:sequence", world, [plan], timeout=timeout)
    return [[per_rank[r][i] for r in range(world)] for i in range(len(plan))]


def run_pair(module: str, keys: list[tuple[str, object]]) -> dict:
    """Scenarios ``module:scenario_<name>(rank, world, port, arg)`` for each ``(name, arg)`` in ``keys``,
    run by one pair of processes; results keyed like ``keys``."""
    return dict(zip(keys, run_sequence([(f"{module}:scenario_{name}", [arg]) for name, arg in keys], 2)))


def ran(results: dict, key) -> list:
    """The per-rank results of one scenario; fails the test with the traceback if a rank raised."""
    import pytest
    for result in results[key]:
        if isinstance(result, dict) and "failed" in result:
            pytest.fail(f"scenario {key} failed in a process:\n{result['failed']}")
    return results[key]


def join_for_test(rank: int, world: int, port: int, encrypt=None, timeout: float = 30.0):
    """``toolkit.distributed.join`` on 127.0.0.1; joins wait long enough for slow starts under load."""
    from toolkit.distributed import join
    return join(rank, world, port=port, timeout=timeout, encrypt=encrypt)


if __name__ == "__main__":
    target, rank, world, port, args = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    module, fn = target.split(":")
    result = getattr(importlib.import_module(module), fn)(rank, world, port, *json.loads(args))
    print("RESULT " + json.dumps(result), flush=True)
