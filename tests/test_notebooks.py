"""Every notebook runs headless in smoke mode, and make demo's report writer produces HTML and PNGs."""
from pathlib import Path

import pytest

from toolkit.report import execute, main, write_report

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_smoke_mode(path, tmp_path):
    nb = execute(path, smoke=True, timeout=300)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert errors == []
    written = write_report(nb, path.stem, tmp_path)
    assert written[0].read_text().count("<html") == 1
    pngs = written[1:]
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_quickstart_is_there_and_the_report_cli_names_its_output(tmp_path, capsys):
    quickstart = Path(__file__).resolve().parents[1] / "notebooks" / "00_quickstart.ipynb"
    assert quickstart in NOTEBOOKS
    with pytest.raises(ValueError, match="no notebook at"):
        main([str(tmp_path / "missing.ipynb"), "--out", str(tmp_path)])
