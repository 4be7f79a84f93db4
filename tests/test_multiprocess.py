"""filter_data.py and evaluate.py under `accelerate launch --num_processes 2` on CPU (gloo): the processes share
the chunks, the main process writes, and the outputs are those of one process, byte for byte.
(Training under two processes: tests/test_resume.py and tests/test_rescue.py.)"""

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import ROOT


def launch_two_processes() -> list[str]:
    """`accelerate launch` with two CPU processes, on a free port (other runs may be using the default one)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
    ]  # fmt: skip


def run_two_processes(script: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    command = [*launch_two_processes(), str(ROOT / script), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture
def one_thread():
    """In-process runs compute with one thread, as each launched process does."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def twelve_problems(toy_world, tmp_path_factory):
    path = tmp_path_factory.mktemp("two_processes") / "problems.jsonl"
    path.write_text("".join((toy_world / "test.jsonl").read_text().splitlines(keepends=True)[:12]))
    return path


@pytest.mark.slow
def test_filter_data_with_two_processes_writes_what_one_process_writes(toy_world, twelve_problems, tmp_path, one_thread, capsys):
    import filter_data

    # 12 problems in chunks of 4 (16 sequences / 4 samples): process 0 takes chunks 0 and 2, process 1 chunk 1
    common = ["--model", str(toy_world / "model"), "--dataset", str(twelve_problems), "--num_samples", "4", "--batch_size", "16", "--max_tokens", "24"]
    one = filter_data.main(filter_data.parse_args([*common, "--output", str(tmp_path / "one" / "kept.jsonl")]))
    result = run_two_processes("filter_data.py", *common, "--output", str(tmp_path / "two" / "kept.jsonl"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Kept ") == 1  # one process reports and writes
    for name in ("kept.jsonl", "kept.samples.jsonl"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    chunks = [json.loads(line)["chunk"] for line in (tmp_path / "two" / "kept.samples.jsonl").read_text().splitlines()[1:]]
    assert chunks == [0, 1, 2]
    assert 0 < one["kept"] <= 12


@pytest.mark.slow
def test_evaluate_with_two_processes_samples_and_scores_what_one_process_does(toy_world, twelve_problems, tmp_path, one_thread, capsys):
    import evaluate

    common = ["--model", str(toy_world / "model"), "--data", str(twelve_problems), "--num_samples", "2", "--batch_size", "8",
              "--temperature", "1.0", "--top_k", "0", "--max_tokens", "24", "--ngram_unit", "char"]  # fmt: skip
    one = evaluate.main(evaluate.parse_args([*common, "--output_dir", str(tmp_path / "one")]))
    result = run_two_processes("evaluate.py", *common, "--output_dir", str(tmp_path / "two"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("avg@n") == 1
    assert (tmp_path / "two" / "samples.jsonl").read_bytes() == (tmp_path / "one" / "samples.jsonl").read_bytes()
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["benchmarks"] == json.loads(json.dumps(one["benchmarks"]))
    assert two["problems_sampled_this_run"] == 12
