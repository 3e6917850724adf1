"""Run a notebook headless and write it as HTML plus its figures (PNG): ``make demo`` calls this.

    python -m toolkit.report notebooks/00_quickstart.ipynb --out reports [--smoke]

The notebook runs in its own folder with a fresh kernel; ``--smoke`` sets ``LEAKLAB_SMOKE=1``,
which notebooks read in their first (``parameters``) cell to pick settings that run in seconds;
``--threads N`` caps the kernel's torch/OpenMP/MKL threads (parallel test workers use 1).
"""
from __future__ import annotations

import argparse
import base64
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

SMOKE_ENV = "LEAKLAB_SMOKE"


@contextmanager
def environment(**values: str):
    """Set environment variables for the block (a kernel started inside inherits them), then
    restore them as they were."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def kernel_environment(*, smoke: bool = False, threads: int | None = None) -> dict[str, str]:
    """What a headless notebook kernel gets: smoke mode or not, no widget front end
    (``LEAKLAB_STATIC=1``), no progress bars (``TQDM_DISABLE=1``), and ``threads`` torch/OpenMP/MKL
    threads when given."""
    env = {SMOKE_ENV: "1" if smoke else "0", "PYTHONWARNINGS": "ignore::DeprecationWarning",
           "TQDM_DISABLE": "1", "LEAKLAB_STATIC": "1"}
    if threads is not None:
        from toolkit.validate import positive_int

        positive_int("threads", threads)
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def execute(path: str | Path, *, smoke: bool = False, timeout: int = 600, threads: int | None = None):
    """Execute a notebook in a fresh kernel (cwd = its folder); returns the executed notebook.

    The kernel runs with :func:`kernel_environment`: no widget front end is there, so dashboards
    run statically (``toolkit.widgets.frontend``) and show PNG figures; progress bars are off (a
    headless run would save each bar's text as it was drawn, frozen at 0%). ``threads`` sets
    ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` for the kernel (a separate process; torch reads
    them at start-up); None leaves them as they are.
    Raises ``nbclient.exceptions.CellExecutionError`` naming the failing cell on error.
    """
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no notebook at {path}")
    env = kernel_environment(smoke=smoke, threads=threads)
    nb = nbformat.read(path, as_version=4)
    with environment(**env):
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent.resolve())}})
        client.execute()
    return nb


def write_report(nb, name: str, out: str | Path) -> list[Path]:
    """Write ``<out>/<name>.html`` and every PNG figure as ``<out>/<name>_figNN.png``."""
    from nbconvert import HTMLExporter

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    html, _ = HTMLExporter().from_notebook_node(nb)
    written = [out / f"{name}.html"]
    written[0].write_text(html, encoding="utf-8")
    k = 0
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            png = output.get("data", {}).get("image/png")
            if png:
                k += 1
                fig = out / f"{name}_fig{k:02d}.png"
                fig.write_bytes(base64.b64decode(png))
                written.append(fig)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a notebook headless into an HTML report with PNG figures.")
    parser.add_argument("notebook")
    parser.add_argument("--out", default="reports")
    parser.add_argument("--smoke", action="store_true", help="settings that run in seconds")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads in the kernel")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    nb = execute(args.notebook, smoke=args.smoke, timeout=args.timeout, threads=args.threads)
    written = write_report(nb, Path(args.notebook).stem, args.out)
    print(f"ran {args.notebook} in {time.perf_counter() - start:.1f} s")
    print(f"report: {written[0]}")
    print(f"figures ({len(written) - 1}): {', '.join(str(p) for p in written[1:])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
