"""requirements.txt, constraints.txt, .ci/run and the README's install lines agree with each other and with
the versions installed here (the tested ones)."""

import importlib.metadata
import re

from packaging.requirements import Requirement
from packaging.version import Version

from conftest import ROOT


def read_requirements(name: str) -> dict[str, Requirement]:
    lines = [line.split("#")[0].strip() for line in (ROOT / name).read_text().splitlines()]
    requirements = [Requirement(line) for line in lines if line]
    return {re.sub(r"[-_.]+", "-", r.name).lower(): r for r in requirements}


def test_exact_pins_only_where_needed_and_constraints_satisfy_the_requirements():
    requirements, constraints = read_requirements("requirements.txt"), read_requirements("constraints.txt")
    assert str(requirements["trl"].specifier) == "==1.16.0" and str(requirements["transformers"].specifier) == "==5.17.0"
    assert not any(spec.operator == "==" for spec in requirements["torch"].specifier)  # a notebook keeps its torch
    assert set(constraints) == set(requirements)
    for name, constraint in constraints.items():
        (pin,) = constraint.specifier
        assert pin.operator == "==", name
        assert requirements[name].specifier.contains(pin.version, prereleases=True), (name, pin.version)


def test_installed_versions_are_the_constrained_ones():
    for name, constraint in read_requirements("constraints.txt").items():
        (pin,) = constraint.specifier
        installed = Version(importlib.metadata.version(name))
        assert installed.public == Version(pin.version).public, (name, str(installed), pin.version)  # 2.13.0+cpu is 2.13.0


def test_ci_and_readme_install_the_tested_versions():
    assert "pip install -q -r requirements.txt -c constraints.txt" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "pip install -r requirements.txt -c constraints.txt && python train_grpo.py" in readme
    assert "pip install -r requirements.txt -c constraints.txt && python -m pytest tests" in readme
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in readme
    assert "%pip install -r requirements.txt\n" in readme
