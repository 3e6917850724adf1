"""pyproject.toml and environment.yml name the same packages; the install pins the CPU torch."""
import re
from pathlib import Path

import pytest
import yaml

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
CONDA_TO_PYPI = {"pytorch": "torch"}
CONDA_ONLY = {"python", "pip", "cpuonly"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ ;\[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_lists_the_same_packages_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pypi = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["notebooks"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = {CONDA_TO_PYPI.get(_name(d), _name(d)) for d in env["dependencies"] if isinstance(d, str)}
    assert conda - CONDA_ONLY == pypi
    pip_section = next(d for d in env["dependencies"] if isinstance(d, dict))["pip"]
    assert pip_section == ["-e ."]
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
