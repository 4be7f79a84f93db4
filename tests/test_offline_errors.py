"""Offline and path errors are fast and say what happened: a local-looking path that does not exist is
"no such ...", and a hub id without network fails at once with the HF_HUB_OFFLINE=1 / local-path hint."""

import socket
import time

import pytest

from data import HubUnavailable, UserError, load_problems, looks_local
from test_train_cli import assert_one_line_error, run_train


@pytest.fixture
def closed_port() -> int:
    """A local port nothing listens on: connecting to it is refused at once, as with no network."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def no_network(monkeypatch, tmp_path, closed_port):
    """The hub's endpoint refuses connections, offline mode is off, and the Hugging Face cache is empty."""
    from huggingface_hub import constants
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  imported before anything is timed

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    return constants.ENDPOINT


def test_what_looks_local():
    for name in ("./model", "../shared/x", "/abs/dir", "~/models/m", "data.jsonl", "set.parquet", "m.gguf", "a/b/c", "outputs/run 1"):
        assert looks_local(name), name
    for name in ("gpt2", "Qwen/Qwen3-0.6B", "HuggingFaceH4/MATH-500", "outputs/run-1"):  # `outputs/run-1` may be a hub id
        assert not looks_local(name), name


def test_missing_local_paths_say_no_such(no_network, tmp_path):
    from generation import load_tokenizer

    for name in ("./missing-model", "../missing-model", str(tmp_path / "missing"), "~/missing-model-dir", "out/runs/missing"):
        started = time.time()
        with pytest.raises(UserError, match=f"^no such model directory: {name}$"):
            load_tokenizer(name)
        assert time.time() - started < 5
    with pytest.raises(UserError, match="^no such GGUF file: missing.gguf$"):
        load_tokenizer("missing.gguf")
    for name in ("./missing", "~/missing.parquet", "data/train/missing", "missing.jsonl"):
        with pytest.raises(UserError, match=f"^no such dataset file: {name} "):
            load_problems(name)


def test_hub_id_without_network_fails_at_once_with_the_hint(no_network):
    from generation import load_model, load_tokenizer

    calls = [
        (lambda: load_tokenizer("Qwen/Qwen3-0.6B"), "Qwen/Qwen3-0.6B"),
        (lambda: load_model("Qwen/Qwen3-0.6B"), "Qwen/Qwen3-0.6B"),
        (lambda: load_problems("HuggingFaceH4/MATH-500", split="test"), "HuggingFaceH4/MATH-500"),
        (lambda: load_tokenizer("outputs/missing-run"), "outputs/missing-run"),  # a hub id's shape: both are said
    ]
    for call, name in calls:
        started = time.time()
        with pytest.raises(HubUnavailable) as raised:
            call()
        assert time.time() - started < 5  # huggingface_hub alone retries for about a minute
        message = str(raised.value)
        assert f"no local path '{name}'" in message and no_network in message
        assert "set HF_HUB_OFFLINE=1" in message and "pass a local path" in message


def test_hub_model_missing_from_the_cache_in_offline_mode(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from generation import load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(HubUnavailable, match="'Qwen/Qwen3-0.6B' is not in the Hugging Face cache and HF_HUB_OFFLINE is set"):
        load_tokenizer("Qwen/Qwen3-0.6B")
    with pytest.raises(UserError, match="^no such model directory: ./missing-model$"):
        load_tokenizer("./missing-model")


def test_cli_without_network_is_one_line_at_once(toy_world, tmp_path, closed_port):
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port}", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    data = str(toy_world / "train.jsonl")
    result = run_train("--model_name_or_path", "Qwen/Qwen3-0.6B", "--dataset_name", data, "--output_dir", str(tmp_path / "o"), env=env)
    assert_one_line_error(result, "no local path 'Qwen/Qwen3-0.6B'", "HF_HUB_OFFLINE=1")
    assert "Retrying" not in result.stderr
