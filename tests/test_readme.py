"""The README's ten-line example runs as written, learns, and gives the same numbers every run;
its links and commands point at things a fresh clone has."""
import io
import re
from contextlib import redirect_stdout
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_gives_the_two_commands_first():
    first_screen = "\n".join(README.splitlines()[:15])
    assert "make demo" in first_screen and "make test" in first_screen


def _run_ten_lines() -> dict:
    code = re.search(r"## Ten lines\n\n```python\n(.*?)```", README, re.S).group(1)
    assert len(code.strip().splitlines()) <= 10
    scope: dict = {}
    with redirect_stdout(io.StringIO()) as out:
        exec(compile(code, "README.md", "exec"), scope)
    scope["printed"] = out.getvalue()
    return scope


@pytest.fixture(scope="module")
def two_runs(one_thread):
    return _run_ten_lines(), _run_ten_lines()


def test_readme_example_runs_and_learns(two_runs):
    scope = two_runs[0]
    assert scope["sl"].evaluate()["accuracy"] > 0.9
    assert len(scope["history"]) == 5 * 45 and len(scope["seen"]) > 0
    assert "bytes_up" in scope["printed"] and "'accuracy'" in scope["printed"]


def test_readme_example_gives_the_same_numbers_every_run(two_runs):
    first, second = two_runs
    assert first["printed"] == second["printed"]  # the evaluation and the byte counts
    assert first["sl"].evaluate() == second["sl"].evaluate()
    pd.testing.assert_frame_equal(first["history"], second["history"])


def test_readme_links_point_into_the_repository():
    links = re.findall(r"\]\(([^)#]+)\)", README)
    assert "docs/design.md" in links
    assert [link for link in links if not link.startswith("http") and not (ROOT / link).exists()] == []
    assert "../shared" not in README


def test_readme_states_how_to_get_the_cpu_torch_and_how_long_make_test_takes():
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in README
    assert "TORCH_INDEX=https://download.pytorch.org/whl/cpu" in README
    assert "PORT=8899 BROWSER=no" in README
    assert re.search(r"\*\*Tests\.\*\* `make test` .*?\s+takes about \d+ minutes", README, re.S)
