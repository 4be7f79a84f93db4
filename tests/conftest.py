"""Shared fixtures: the data in ../shared and one toy world built once per test session."""

import os
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared (or $POLARIS_SHARED). Absent: skip, except in CI or when the variable is set."""
    configured = os.environ.get("POLARIS_SHARED")
    path = Path(configured) if configured else ROOT.parent / "shared"
    if not path.is_absolute():
        path = (ROOT / path).resolve()
    if not (path / "benchmarks").is_dir():
        if configured or os.environ.get("CI"):
            pytest.fail(f"shared data not found at {path} (POLARIS_SHARED={configured!r}, CI={os.environ.get('CI')!r})")
        pytest.skip(f"shared data not found at {path}: these tests need the project's ../shared folder")
    return path


@pytest.fixture(scope="session")
def toy_world() -> Path:
    """The default toy world (model, tokenizer, train/test data), built once and cached on disk."""
    import toy

    return toy.build_toy_world(toy.ToyArguments(output_dir=str(ROOT / "outputs" / "toy")))
