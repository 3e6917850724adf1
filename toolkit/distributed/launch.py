"""Start a group's processes on this machine (local runs and tests): one OS process per rank on
``addr`` (127.0.0.1 by default) and a free port, each printing its result as one ``RESULT {json}``
line, with a hard timeout after which every process still running is killed (nothing is left
behind, nothing hangs). On several machines run ``python -m toolkit.distributed <cmd>`` once per
machine instead (see ``python -m toolkit.distributed --help``).

``target`` is a command of ``python -m toolkit.distributed`` (``"ring"``) or ``"module:function"``,
called in each process as ``function(rank, world, addr, port, *args)`` and returning JSON-able data.

Example:
    >>> results = launch(3, "ring", ["--rounds", "2"])  # doctest: +SKIP
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Launch", "free_port", "launch"]

ROOT = Path(__file__).resolve().parents[2]


def free_port(addr: str = "127.0.0.1") -> int:
    """A TCP port free on ``addr`` right now (bind to port 0, read it, close)."""
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


class Launch:
    """``world`` processes running ``target`` (see the module docstring), started at once.

    Args:
        world: how many processes (ranks ``0..world-1``).
        target: a ``python -m toolkit.distributed`` command or ``"module:function"``.
        args: arguments for every rank (command-line words for a command, JSON-able values for a function).
        per_rank: rank -> extra command-line words for that rank (commands only).
        addr, port: the rendezvous (default 127.0.0.1 and a free port).
        env: extra environment variables (``OMP_NUM_THREADS=1`` is set unless given).

    Each process's stdout and stderr lines are collected as they come (``lines(rank)``); use
    :meth:`wait_for` to act at a point of the run, :meth:`kill` to kill a rank, :meth:`results`
    to wait for the end. Also a context manager that kills whatever is still running on exit.
    """

    def __init__(self, world: int, target: str, args: Sequence[Any] = (), *, per_rank: Mapping[int, Sequence[str]] | None = None,
                 addr: str = "127.0.0.1", port: int | None = None, env: Mapping[str, str] | None = None):
        if isinstance(world, bool) or not isinstance(world, int) or world < 1:
            raise ValueError(f"world must be a positive int, got {world!r}")
        if not isinstance(target, str) or not target:
            raise ValueError(f"target is a command name or 'module:function', got {target!r}")
        self.world, self.target, self.addr = world, target, addr
        self.port = free_port(addr) if port is None else port
        environ = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), environ.get("PYTHONPATH", "")) if p)
        self.procs: list[subprocess.Popen] = []
        self._out: list[list[str]] = []
        self._err: list[list[str]] = []
        self._cond = threading.Condition()
        extra = per_rank or {}
        for rank in range(world):
            if ":" in target:
                call = "import sys; from toolkit.distributed.launch import _main; _main(sys.argv[1:])"
                cmd = [sys.executable, "-c", call, target, str(rank), str(world), addr, str(self.port),
                       json.dumps(list(args))]
            else:
                cmd = [sys.executable, "-m", "toolkit.distributed", target, "--rank", str(rank), "--world", str(world),
                       "--addr", addr, "--port", str(self.port), *map(str, args), *map(str, extra.get(rank, ()))]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ,
                                    cwd=ROOT, start_new_session=True)
            self.procs.append(proc)
            self._out.append([])
            self._err.append([])
            for stream, sink in ((proc.stdout, self._out[rank]), (proc.stderr, self._err[rank])):
                threading.Thread(target=self._drain, args=(stream, sink), daemon=True).start()

    def _drain(self, stream, sink: list[str]) -> None:
        for line in stream:
            with self._cond:
                sink.append(line.rstrip("\n"))
                self._cond.notify_all()
        stream.close()

    def lines(self, rank: int, *, stderr: bool = False) -> list[str]:
        """The lines rank ``rank`` has printed so far (stdout, or stderr)."""
        with self._cond:
            return list((self._err if stderr else self._out)[rank])

    def wait_for(self, rank: int, text: str, *, count: int = 1, timeout: float = 60.0) -> str:
        """Block until rank ``rank`` has printed ``count`` stdout lines containing ``text``; returns
        the last. A TimeoutError (with its stderr) if it does not within ``timeout`` s or exits first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hits = [ln for ln in self._out[rank] if text in ln]
                if len(hits) >= count:
                    return hits[count - 1]
                left = deadline - time.monotonic()
                if left <= 0 or self.procs[rank].poll() is not None:
                    raise TimeoutError(f"rank {rank} did not print {text!r} ({count}x) within {timeout:g} s "
                                       f"(exit status {self.procs[rank].poll()}); its stderr:\n"
                                       + "\n".join(self._err[rank][-30:]))
                self._cond.wait(min(left, 0.1))

    def kill(self, rank: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (SIGKILL by default) to rank ``rank``'s process."""
        if self.procs[rank].poll() is None:
            self.procs[rank].send_signal(sig)

    def wait(self, timeout: float = 120.0) -> list[int]:
        """Wait for every process to exit (all share one ``timeout``); kills all and raises a
        TimeoutError naming those still running when it runs out. Returns the exit statuses."""
        deadline = time.monotonic() + timeout
        try:
            for rank, p in enumerate(self.procs):
                try:
                    p.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    running = [r for r, q in enumerate(self.procs) if q.poll() is None]
                    raise TimeoutError(f"rank(s) {running} still running after {timeout:g} s: killed") from None
        finally:
            self.close()
        time.sleep(0.05)  # let the readers take the last lines
        return [p.returncode for p in self.procs]

    def result(self, rank: int) -> Any:
        """The JSON of rank ``rank``'s ``RESULT`` line (None if it printed none)."""
        found = [ln for ln in self.lines(rank) if ln.startswith("RESULT ")]
        return json.loads(found[-1][len("RESULT "):]) if found else None

    def results(self, timeout: float = 120.0) -> list[Any]:
        """Every rank's result once all exit; a RuntimeError with the stderr of each rank that failed."""
        codes = self.wait(timeout)
        bad = [r for r, c in enumerate(codes) if c != 0 or self.result(r) is None]
        if bad:
            raise RuntimeError("\n".join(f"rank {r} exited with {codes[r]}; its stderr ends:\n"
                                         + "\n".join(self.lines(r, stderr=True)[-30:]) for r in bad))
        return [self.result(r) for r in range(self.world)]

    def close(self) -> None:
        """Kill every process still running (and its children) and reap it."""
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self) -> Launch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def launch(world: int, target: str, args: Sequence[Any] = (), *, timeout: float = 120.0, **kwargs: Any) -> list[Any]:
    """Run ``target`` in ``world`` local processes (see :class:`Launch`) and return each rank's result."""
    with Launch(world, target, args, **kwargs) as run:
        return run.results(timeout)


def _main(argv: Sequence[str]) -> None:
    target, rank, world, addr, port, args = argv
    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    result = fn(int(rank), int(world), addr, int(port), *json.loads(args))
    print("RESULT " + json.dumps(result), flush=True)

