"""Every paper-figure notebook (notebooks/figures/) runs headless in smoke mode, draws its figure,
is stored without outputs, and names a preset that `make figures` regenerates."""
import os
import re
from pathlib import Path

import nbformat
import pytest

from toolkit.figures import FIGURES
from toolkit.report import execute

FOLDER = Path(__file__).resolve().parents[1] / "notebooks" / "figures"
NOTEBOOKS = sorted(FOLDER.glob("*.ipynb"))
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else None  # kernels share the cores with workers


def _figures(cell) -> int:
    return sum("image/png" in o.get("data", {}) for o in cell.get("outputs", []))


def test_every_figure_preset_has_its_notebook_and_every_notebook_its_preset():
    assert sorted(p.stem for p in NOTEBOOKS) == sorted(FIGURES)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_figure_notebook_runs_in_smoke_mode_and_draws_the_presets_figure(path):
    stored = nbformat.read(path, as_version=4)
    code = [c for c in stored.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "store notebooks with outputs stripped"
    assert "parameters" in code[0].metadata.get("tags", []) and "LEAKLAB_SMOKE" in code[0].source
    preset = FIGURES[path.stem].__name__
    assert re.search(rf"\bpreset = {preset}\.smoke\(\) if SMOKE else {preset}\(\)", code[0].source)
    text = " ".join(c.source for c in stored.cells if c.cell_type == "markdown")
    assert "Run time" in text and "differ" in text  # states its cost and where it departs from the paper
    nb = execute(path, smoke=True, timeout=300, threads=THREADS)
    ran = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in ran] == list(range(1, len(ran) + 1))
    drawing = [c for c in ran if "preset.plot(" in c.source]
    assert drawing and all(_figures(c) == 1 for c in drawing)
