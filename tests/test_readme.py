"""The README's ten-line example runs as written and learns."""
import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_gives_the_two_commands_first():
    first_screen = "\n".join(README.splitlines()[:15])
    assert "make demo" in first_screen and "make test" in first_screen


def test_readme_example_runs_and_learns(capsys):
    code = re.search(r"## Ten lines\n\n```python\n(.*?)```", README, re.S).group(1)
    assert len(code.strip().splitlines()) <= 10
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["sl"].evaluate()["accuracy"] > 0.9
    assert len(scope["history"]) == 5 * 45 and len(scope["seen"]) > 0
    assert "bytes_up" in capsys.readouterr().out
