"""Running a notebook twice in one kernel leaks neither memory (< 5% RSS growth on the second run)
nor threads nor processes: every code cell is executed twice through one nbclient kernel client,
and the kernel measures itself after each run (psutil RSS, threading.active_count, the OS
thread count, child processes). Before measuring, the kernel collects garbage and (glibc) hands
freed heap pages back to the OS with ``malloc_trim``: RSS then counts live memory, not what the
allocator keeps cached after run 1's objects were freed (~1.5% of RSS on the quickstart). The
checker is tested on notebooks that do leak."""
from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from toolkit.report import environment, kernel_environment

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
RSS_GROWTH = 0.05  # the acceptance bound: the second run may grow RSS by less than 5%

MEASURE = """\
def _leaklab_measure():
    import ctypes, gc, json, sys, threading, warnings
    import psutil
    gc.collect()
    libc = ctypes.CDLL(None)
    if hasattr(libc, "malloc_trim"):  # glibc: hand freed heap pages back, so RSS counts live memory
        libc.malloc_trim(0)
    me = psutil.Process()
    storages = {}
    if "torch" in sys.modules:  # live torch tensors, each storage once: what a leak of tensors keeps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # isinstance on some torch module proxies warns
            for o in gc.get_objects():
                if isinstance(o, sys.modules["torch"].Tensor):
                    storages[o.untyped_storage().data_ptr()] = o.untyped_storage().nbytes()
    return {"rss": me.memory_info().rss, "threads": threading.active_count(), "os_threads": me.num_threads(),
            "children": len(me.children(recursive=True)), "tensor_bytes": sum(storages.values())}
print("MEASURE " + __import__("json").dumps(_leaklab_measure()))
"""


def _measurement(cell) -> dict[str, int]:
    text = "".join(o.get("text", "") for o in cell.outputs if o.get("name") == "stdout")
    line = next(ln for ln in text.splitlines() if ln.startswith("MEASURE "))
    return json.loads(line[len("MEASURE "):])


def run_twice(path: Path, *, smoke: bool = True, after: str | None = None, timeout: int = 600) -> list[dict[str, int]]:
    """Execute every code cell of ``path`` twice in one kernel (cwd: its folder); the kernel's
    RSS (bytes), thread counts and child processes after each run. ``after`` runs last, in the
    same kernel (clean-up)."""
    nb = nbformat.read(path, as_version=4)
    probe, cleanup = nbformat.v4.new_code_cell(MEASURE), nbformat.v4.new_code_cell(after or "")
    nb.cells += [probe, cleanup]  # nbclient addresses cells by their index in the notebook
    code = [(i, c) for i, c in enumerate(nb.cells[:-2]) if c.cell_type == "code"]
    with environment(**kernel_environment(smoke=smoke, threads=1)):  # as toolkit.report.execute runs it
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent.resolve())}})
        out = []
        with client.setup_kernel():
            for _ in range(2):
                for i, cell in code:
                    client.execute_cell(cell, i)
                client.execute_cell(probe, len(nb.cells) - 2)
                out.append(_measurement(probe))
            if after is not None:
                client.execute_cell(cleanup, len(nb.cells) - 1)
        return out


def leaks(first: dict[str, int], second: dict[str, int], *, rss_growth: float = RSS_GROWTH) -> list[str]:
    """What the second run leaked, in words (empty: nothing): RSS growth of ``rss_growth`` or more,
    live torch tensors grown by as much (and 1 MiB), or more Python threads, OS threads or child
    processes after it than after the first run."""
    found = []
    grew = (second["rss"] - first["rss"]) / first["rss"]
    if grew >= rss_growth:
        found.append(f"RSS grew {grew:.1%} on the second run ({first['rss'] / 2**20:.0f} -> "
                     f"{second['rss'] / 2**20:.0f} MiB; the bound is {rss_growth:.0%})")
    if second["tensor_bytes"] > first["tensor_bytes"] * (1 + rss_growth) + (1 << 20):
        found.append(f"live torch tensors: {first['tensor_bytes'] / 2**20:.1f} MiB after the first run, "
                     f"{second['tensor_bytes'] / 2**20:.1f} MiB after the second (something keeps run 1's)")
    for key, what in (("threads", "Python threads"), ("os_threads", "OS threads"), ("children", "child processes")):
        if second[key] > first[key]:
            found.append(f"{what}: {first[key]} after the first run, {second[key]} after the second")
    return found


def _notebook(tmp_path: Path, *sources: str) -> Path:
    path = tmp_path / "leaky.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources]), path)
    return path


# -- the checker catches leaks ------------------------------------------------------------------
def test_the_checker_catches_a_cell_that_keeps_100_mb_per_run(tmp_path):
    path = _notebook(tmp_path, "import torch  # a kernel as heavy as the notebooks' (RSS base)",
                     "KEPT = globals().setdefault('KEPT', [])\nKEPT.append(bytearray(b'\\x01') * (100 << 20))")
    first, second = run_twice(path)
    found = leaks(first, second)
    assert len(found) == 1 and found[0].startswith("RSS grew"), (first, second, found)
    assert second["rss"] - first["rss"] > 90 << 20  # the 100 MB were measured, not guessed
    assert leaks(first, first) == []  # the same measurement twice: nothing


def test_the_checker_names_torch_tensors_kept_from_run_one(tmp_path):
    path = _notebook(tmp_path, "import torch\nTENSORS = globals().setdefault('TENSORS', [])\n"
                               "TENSORS.append(torch.ones(4 << 20))  # 16 MiB, about 3% of the kernel's RSS")
    first, second = run_twice(path)
    found = leaks(first, second)
    assert second["tensor_bytes"] - first["tensor_bytes"] == 16 << 20
    assert [f for f in found if f.startswith("live torch tensors: ")] != [], (first, second, found)


def test_the_checker_catches_threads_and_processes_left_running(tmp_path):
    path = _notebook(tmp_path, "import subprocess, threading, time\n"
                               "STOP = globals().setdefault('STOP', threading.Event())\n"
                               "PROCS = globals().setdefault('PROCS', [])\n"
                               "threading.Thread(target=STOP.wait, daemon=True).start()\n"
                               "PROCS.append(subprocess.Popen(['sleep', '600']))")
    first, second = run_twice(path, after="STOP.set()\nfor p in PROCS:\n    p.kill()\n    p.wait()")
    found = leaks(first, second)
    assert [f.split(":")[0] for f in found] == ["Python threads", "OS threads", "child processes"], found


# -- the notebooks ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["00_quickstart", "01_leakage_explorer"])
def test_running_a_notebook_twice_in_one_kernel_leaks_nothing(name, shared_data_env):
    path = NOTEBOOKS / f"{name}.ipynb"
    if not path.is_file():
        pytest.skip(f"notebooks/{name}.ipynb does not exist yet (helper EXPLORER's branch 'explorer')")
    first, second = run_twice(path, smoke=True)
    found = leaks(first, second)
    assert not found, "; ".join(found)


@pytest.fixture
def shared_data_env(monkeypatch):
    """The project's real MNIST test set as data.default_root() when present (as test_notebooks)."""
    shared = ROOT.parent / "shared" / "data"
    if shared.is_dir():
        monkeypatch.setenv("LEAKLAB_DATA", str(shared))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
