"""pyproject.toml and environment.yml name the same packages; the install pins the CPU torch."""
import re
from pathlib import Path

import pytest
import yaml

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
CONDA_TO_PYPI = {"pytorch": "torch"}
CONDA_ONLY = {"python", "pip", "cpuonly"}
PIP_ONLY = {"tenseal"}  # not on conda-forge: environment.yml's `pip: -e .` installs it


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ ;\[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_lists_the_same_packages_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pypi = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["notebooks"]
            + project["optional-dependencies"]["test"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = {CONDA_TO_PYPI.get(_name(d), _name(d)) for d in env["dependencies"] if isinstance(d, str)}
    assert conda - CONDA_ONLY == pypi - PIP_ONLY
    pip_section = next(d for d in env["dependencies"] if isinstance(d, dict))["pip"]
    assert pip_section == ["-e ."]  # pyproject's dependencies, PIP_ONLY among them
    assert any(d.startswith("python=3.11") for d in env["dependencies"] if isinstance(d, str))


def test_install_pins_cpu_torch_and_never_torchvision():
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text().split()
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()
    everything = (ROOT / "pyproject.toml").read_text() + (ROOT / "environment.yml").read_text()
    assert "torchvision" not in everything


def test_packages_install_under_their_top_level_names():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["name"] == "leaklab"
    assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["toolkit*", "attacks*", "defenses*"]
    import attacks
    import defenses
    import toolkit
    assert toolkit.__version__ == project["project"]["version"]
    assert attacks.__doc__ and defenses.__doc__


# -- every imported package is declared --------------------------------------------------------
import ast  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

FIRST_PARTY = {"toolkit", "attacks", "defenses", "__future__"}


def _imports(source: str) -> list[tuple[str, bool]]:
    """(top-level module, imported inside a function) for every absolute import in ``source``."""
    found = []

    def visit(node, lazy):
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name.split(".")[0], lazy) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module.split(".")[0], lazy))
            visit(child, inner)

    visit(ast.parse(source), False)
    return found


def _sources():
    """(path, source, extras its imports may come from besides the core dependencies)."""
    for folder in ("toolkit", "attacks", "defenses"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield path, path.read_text(), "library"
    for folder, extras in (("tests", ("notebooks", "test")), ("benchmarks", ("bench", "test"))):
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield path, path.read_text(), extras
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        yield path, "\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("%", "!"))), ("notebooks",)


def _declared(group: list[str]) -> set[str]:
    return {_name(r) for r in group}


def test_every_imported_third_party_package_is_declared_in_the_right_place():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core, extras = _declared(project["dependencies"]), project["optional-dependencies"]
    dists = importlib.metadata.packages_distributions()
    stdlib = set(sys.stdlib_module_names)
    missing = []
    for path, source, where in _sources():
        local = {p.stem for p in path.parent.glob("*.py")}  # sibling modules (helpers, conftest)
        for module, lazy in _imports(source):
            if module in stdlib or module in FIRST_PARTY or module in local:
                continue
            names = {_name(d) for d in dists.get(module, [module])}  # not installed: its own name
            if where == "library":  # module level: a dependency; inside a function: an extra may do
                allowed = core | (set().union(*map(_declared, extras.values())) if lazy else set())
            else:
                allowed = core.union(*(_declared(extras[e]) for e in where))
            if not names & allowed:
                missing.append(f"{path.relative_to(ROOT)} imports {module} ({', '.join(sorted(names))})")
    assert missing == []


def test_the_import_scan_sees_lazy_and_module_level_imports():
    code = "import numpy as np\nfrom scipy import stats\ndef f():\n    import nbformat\n    from .x import y\n"
    assert _imports(code) == [("numpy", False), ("scipy", False), ("nbformat", True)]


# -- the Makefile -----------------------------------------------------------------------------
def _dry_run(*args: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    skip = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "TORCH_INDEX", "JOBS", "PORT", "BROWSER"}  # e.g. under make test
    env = {k: v for k, v in os.environ.items() if k not in skip}
    return subprocess.run(["make", "--no-print-directory", "-n", "-B", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True).stdout


def _line(out: str, command: str) -> str:
    (line,) = [line for line in out.splitlines() if command in line]
    return line


def test_the_default_install_takes_torch_through_the_constraints_and_no_other_index():
    out = _dry_run(".venv/.installed")
    assert "--index-url" not in out
    assert '-m pip install --quiet -c constraints.txt -e ".[notebooks,test]"' in out


def test_torch_index_installs_the_pinned_torch_from_that_index_first():
    out = _dry_run(".venv/.installed", "TORCH_INDEX=https://download.pytorch.org/whl/cpu")
    lines = [line for line in out.splitlines() if "pip install" in line]
    assert lines[0].endswith('pip install --quiet "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu')
    assert "-c constraints.txt" in lines[1]


def test_make_test_runs_one_worker_per_core_on_one_thread_each_and_serially_on_one_core():
    parallel = _line(_dry_run("test", "JOBS=2"), "-m pytest")
    assert "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1" in parallel and "-m pytest -n 2 --dist loadgroup" in parallel
    serial = _line(_dry_run("test", "JOBS=1"), "-m pytest")
    assert "-m pytest" in serial and " -n " not in serial and "OMP_NUM_THREADS" not in serial


def test_make_lab_takes_a_port_a_no_browser_option_and_runs_as_root():
    out = _line(_dry_run("lab", "PORT=8899", "BROWSER=no"), "jupyter lab")
    assert "jupyter lab --port=8899 --no-browser" in out
    assert ("--allow-root" in out) == (os.geteuid() == 0)
    assert "--port=8888" in _line(_dry_run("lab"), "jupyter lab") and "--no-browser" not in _line(_dry_run("lab"), "jupyter lab")


def test_the_license_pyproject_names_is_in_the_repository():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "MIT"}
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n") and "Copyright (c) 2026 the LeakLab developers" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS"' in text
