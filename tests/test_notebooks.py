"""Every notebook runs headless in smoke mode, every code cell in order, and draws its figures;
make demo's report writer produces HTML and PNGs."""
import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient.exceptions import CellExecutionError

from toolkit.report import execute, main, write_report

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
DRAWS = re.compile(r"\bplots\.plot_\w+\(|\bplt\.|\bsns\.|\.plot\(")  # a cell that makes a figure
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else None  # kernels share the cores with workers


def _figures(cell) -> int:
    return sum("image/png" in o.get("data", {}) for o in cell.get("outputs", []))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_every_cell_and_draws_its_figures_in_smoke_mode(path, tmp_path, monkeypatch):
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if shared.is_dir():  # the project's real MNIST test set, as data.default_root() (the kernel inherits it)
        monkeypatch.setenv("LEAKLAB_DATA", str(shared))
    nb = execute(path, smoke=True, timeout=300, threads=THREADS)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and [c.execution_count for c in code] == list(range(1, len(code) + 1))
    drawing = [i for i, c in enumerate(code) if DRAWS.search(c.source)]
    assert drawing, "a notebook shows what leaks: at least one cell draws a figure"
    assert [i for i in drawing if _figures(code[i]) == 0] == []  # each of them displayed its figure
    written = write_report(nb, path.stem, tmp_path)
    assert written[0].read_text().count("<html") == 1
    pngs = written[1:]
    assert len(pngs) == sum(_figures(c) for c in code) >= len(drawing)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_a_failing_cell_fails_the_run_and_a_figure_is_counted(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
                                  "%matplotlib inline\nplt.plot([0, 1])"),
        nbformat.v4.new_code_cell("print('before')"),
        nbformat.v4.new_code_cell("raise RuntimeError('cell three broke')"),
        nbformat.v4.new_code_cell("print('never')"),
    ])
    good, bad = tmp_path / "good.ipynb", tmp_path / "bad.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=nb.cells[:2]), good)
    nbformat.write(nb, bad)
    ran = execute(good, threads=1)
    assert [c.execution_count for c in ran.cells] == [1, 2] and _figures(ran.cells[0]) == 1
    with pytest.raises(CellExecutionError, match="cell three broke"):
        execute(bad, threads=1)


def test_quickstart_is_there_and_the_report_cli_names_its_output(tmp_path, capsys):
    quickstart = Path(__file__).resolve().parents[1] / "notebooks" / "00_quickstart.ipynb"
    assert quickstart in NOTEBOOKS
    with pytest.raises(ValueError, match="no notebook at"):
        main([str(tmp_path / "missing.ipynb"), "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="threads must be a positive int"):
        execute(quickstart, threads=0)


def test_headless_runs_save_no_frozen_progress_bars(tmp_path):
    path = tmp_path / "bar.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "from toolkit.progress import progress\nfor _ in progress(range(3), show=True, desc='training'):\n"
        "    pass\nprint('done')")]), path)
    outputs = execute(path, threads=1).cells[0].outputs
    text = " ".join(str(o.get("text", "")) + str(o.get("data", {})) for o in outputs)
    assert "done" in text and "training" not in text and "%|" not in text
