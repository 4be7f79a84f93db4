"""evaluate.py: metrics on constructed samples, toy-model runs checked against their samples file,
YaRN, LoRA adapters, resuming a killed run, the temperature sweep and one-line errors."""

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from fractions import Fraction

import pytest

from conftest import ROOT
from data import UserError
from test_train_cli import assert_one_line_error

import evaluate
from generation import SampleStore
from evaluate import EvalArguments, benchmark_metrics, k_values, maj_at_k, majority_vote, pass_at_k


def run_evaluate(*args, env=None, **popen):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, str(ROOT / "evaluate.py"), *args]
    if popen:
        return subprocess.Popen(command, cwd=ROOT, env=env, **popen)
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def toy_args(toy_world, output_dir, **overrides) -> EvalArguments:
    settings = dict(
        model=str(toy_world / "model"),
        data=[str(toy_world / "test.jsonl")],
        num_samples=4,
        temperature=1.0,
        top_k=0,
        max_tokens=32,
        max_problems=16,
        ngram_unit="char",
        output_dir=str(output_dir),
    )
    return EvalArguments(**{**settings, **overrides})


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def exact_pass_at_k(n, c, k):
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_pass_at_k_hand_computed_values():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)  # 1 - C(2,2)/C(4,2)
    assert pass_at_k(8, 0, 1) == 0.0 and pass_at_k(8, 0, 8) == 0.0  # c = 0
    assert pass_at_k(8, 8, 1) == 1.0 and pass_at_k(8, 8, 8) == 1.0  # c = n
    assert pass_at_k(4, 3, 2) == 1.0  # n - c < k: every draw of 2 holds a correct one
    assert pass_at_k(4, 1, 4) == 1.0
    for n, c, k in [(32, 5, 1), (32, 5, 8), (32, 31, 16), (7, 3, 3)]:
        assert pass_at_k(n, c, k) == pytest.approx(float(exact_pass_at_k(n, c, k)), abs=1e-12)
    # stable where the binomials are astronomically large
    assert pass_at_k(2048, 3, 1024) == pytest.approx(float(exact_pass_at_k(2048, 3, 1024)), abs=1e-12)
    assert pass_at_k(2048, 1, 1) == pytest.approx(1 / 2048)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_k_values_are_powers_of_two_up_to_n():
    assert k_values(1) == [1]
    assert k_values(4) == [1, 2, 4]
    assert k_values(6) == [1, 2, 4, 6]
    assert k_values(32) == [1, 2, 4, 8, 16, 32]


def test_majority_vote():
    assert majority_vote(["3", "3", "4"], [True, True, False]) == 1.0
    assert majority_vote(["3", "4", "4"], [True, False, False]) == 0.0
    assert majority_vote(["3", "4"], [True, False]) == 0.5  # a tie is a coin flip
    assert majority_vote([None, None], [False, False]) == 0.0  # no box, no vote
    assert majority_vote([None, None, "5"], [False, False, True]) == 1.0
    # two groups of 2: [7, 5] tie (0.5) and [7, 7] (1.0)
    assert maj_at_k(["7", "5", "7", "7"], [True, False, True, True], 2) == 0.75
    # presentation does not split the vote
    keys = [evaluate.vote_key(a) for a in ["\\frac{1}{2}", "\\dfrac{1}{2}", "3"]]
    assert majority_vote(keys, [True, True, False]) == 1.0


def sample_row(correct, answer="1", completion="a b c d", length=10, truncated=False):
    return {"correct": correct, "extracted_answer": answer, "completion": completion, "length": length, "truncated": truncated}


def test_benchmark_metrics_hand_computed():
    problems = [
        [sample_row(True, "3", length=10) for _ in range(4)],  # c = n
        [sample_row(False, None, length=20, truncated=True), sample_row(False, "2"), sample_row(False, "2"), sample_row(False, None)],  # c = 0
        [sample_row(True, "7"), sample_row(False, "5"), sample_row(False, "5"), sample_row(True, "7")],  # c = 2
    ]
    metrics = benchmark_metrics(problems)
    assert metrics["num_problems"] == 3 and metrics["num_samples"] == 4
    assert metrics["avg_at_k"] == pytest.approx(6 / 12)
    # per-problem means 1, 0, 0.5: sample standard deviation 0.5, over sqrt(3) problems
    assert metrics["avg_at_k_stderr"] == pytest.approx(0.5 / math.sqrt(3))
    assert metrics["pass_at_k"] == pytest.approx({"1": 0.5, "2": (1 + 0 + 5 / 6) / 3, "4": 2 / 3})
    # maj@4: 1, 0 (only "2" votes), 0.5 (7 and 5 tie); maj@2: 1, 0, 0.5 (both pairs tie)
    assert metrics["maj_at_k"] == pytest.approx({"1": 0.5, "2": 0.5, "4": 0.5})
    assert metrics["solved_by_none"] == 1 and metrics["solved_by_all"] == 1
    assert metrics["truncation_rate"] == pytest.approx(1 / 12)
    assert metrics["no_box_rate"] == pytest.approx(2 / 12)
    assert metrics["mean_length"] == pytest.approx((40 + 20 + 10 * 7) / 12)
    assert metrics["distinct_4"] == pytest.approx(0.25)  # four copies of one 4-gram per problem


def test_one_problem_and_one_sample():
    metrics = benchmark_metrics([[sample_row(True)]])
    assert metrics["avg_at_k"] == 1.0 and metrics["avg_at_k_stderr"] == 0.0
    assert metrics["pass_at_k"] == {"1": 1.0} and metrics["maj_at_k"] == {"1": 1.0}


# ----------------------------------------------------------------------------------------------
# Toy-model runs
# ----------------------------------------------------------------------------------------------


def recompute(rows_by_problem):
    """The summary's numbers, recomputed from sample rows with the textbook formulas."""
    n = len(rows_by_problem[0])
    counts = [sum(r["correct"] for r in rows) for rows in rows_by_problem]
    means = [c / n for c in counts]
    samples = [r for rows in rows_by_problem for r in rows]
    return {
        "num_problems": len(rows_by_problem),
        "num_samples": n,
        "avg_at_k": sum(counts) / len(samples),
        "avg_at_k_stderr": statistics.stdev(means) / math.sqrt(len(means)) if len(means) > 1 else 0.0,
        "pass_at_k": {str(k): sum(float(exact_pass_at_k(n, c, k)) for c in counts) / len(counts) for k in k_values(n)},
        "solved_by_none": counts.count(0),
        "solved_by_all": counts.count(n),
        "truncation_rate": sum(r["truncated"] for r in samples) / len(samples),
        "no_box_rate": sum(r["extracted_answer"] is None for r in samples) / len(samples),
        "mean_length": sum(r["length"] for r in samples) / len(samples),
    }


def group_by_problem(rows):
    groups = {}
    for row in rows:
        groups.setdefault((row["benchmark"], row["problem_id"]), []).append(row)
    return {key: sorted(group, key=lambda r: r["sample_index"]) for key, group in groups.items()}


def test_toy_run_on_aime24_and_the_toy_test_set_matches_its_samples_file(toy_world, shared_dir, tmp_path, capsys):
    from rewards import verify
    from temperature_sweep import distinct_ngram_ratio

    args = toy_args(
        toy_world, tmp_path, data=[str(toy_world / "test.jsonl"), str(shared_dir / "benchmarks" / "aime24.parquet")], max_problems=12, max_tokens=24
    )
    summary = evaluate.main(args)
    out = capsys.readouterr().out
    assert "avg@n" in out and "aime24" in out

    written = json.loads((tmp_path / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    settings = written["settings"]
    assert settings["temperature"] == 1.0 and settings["top_p"] == 1.0 and settings["top_k"] == 0 and settings["max_tokens"] == 24
    assert settings["num_samples"] == {"test": 4, "aime24": 4}
    assert settings["rope"]["rope_parameters"]["rope_theta"] == 10000.0 and settings["rope"]["yarn_factor"] is None
    assert settings["versions"]["transformers"] and settings["versions"]["torch"]

    rows = read_rows(tmp_path / "samples.jsonl")
    assert len(rows) == 2 * 12 * 4
    assert set(rows[0]) >= {"benchmark", "problem_id", "sample_index", "completion", "extracted_answer", "correct", "length", "truncated"}
    groups = group_by_problem(rows)
    for name in ("test", "aime24"):
        problems = [group for (benchmark, _), group in groups.items() if benchmark == name]
        assert len(problems) == 12 and all([r["sample_index"] for r in g] == [0, 1, 2, 3] for g in problems)
        reported = written["benchmarks"][name]
        expected = recompute(problems)
        for key, value in expected.items():
            assert reported[key] == pytest.approx(value), (name, key)
        assert reported["distinct_4"] == pytest.approx(sum(distinct_ngram_ratio([r["completion"] for r in g], 4, "char") for g in problems) / 12)
        assert reported["maj_at_k"]["1"] == pytest.approx(reported["avg_at_k"])
    assert 0.0 < written["benchmarks"]["test"]["avg_at_k"] < 1.0  # the toy model solves some toy problems
    for row in rows[:8]:  # the stored verdict is the verifier's
        assert row["correct"] == bool(verify(row["completion"], row["gold"]))

    # Everything is sampled: a second run samples nothing and reports the same numbers.
    again = evaluate.main(args)
    assert again["problems_sampled_this_run"] == 0
    assert again["benchmarks"] == summary["benchmarks"]


def test_yarn_changes_the_config_and_generation_runs_past_the_original_context(toy_world, tmp_path, capsys):
    import torch

    from data import build_messages
    from data import prompt_token_ids
    from generation import load_model, load_tokenizer

    args = EvalArguments(model=str(toy_world / "model"), yarn_factor=2.0)
    config, rope = evaluate.load_config(args.model, args)
    assert config.rope_parameters == {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 512}
    assert config.max_position_embeddings == 1024
    assert rope["original_max_position_embeddings"] == 512 and rope["max_position_embeddings"] == 1024
    model = load_model(args.model, config=config)
    assert model.config.rope_parameters["rope_type"] == "yarn" and model.model.rotary_emb.rope_type == "yarn"
    plain_args = EvalArguments(model=args.model)
    plain = load_model(args.model, config=evaluate.load_config(args.model, plain_args)[0])
    ids = torch.randint(10, 90, (1, 600))
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, plain(ids).logits, atol=1e-3)  # the scaling is in force
    _, explicit = evaluate.load_config(args.model, EvalArguments(model=args.model, yarn_factor=1.5, original_max_position_embeddings=400))
    assert explicit["max_position_embeddings"] == 600 and explicit["rope_parameters"]["original_max_position_embeddings"] == 400
    with pytest.raises(UserError, match="above 1"):
        evaluate.load_config(args.model, EvalArguments(model=args.model, yarn_factor=0.5))

    # A whole run whose prompts alone fill the original 512 positions, with answers on top.
    padding = " " * 500  # inside the problem: load_problems strips the ends
    problems = [{"problem": f"Read this.{padding}What is {a} + {b}?", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6)]]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in problems))
    summary = evaluate.main(toy_args(toy_world, tmp_path / "out", data=[str(data)], num_samples=2, max_tokens=40, yarn_factor=2.0))
    assert "warning: prompts" not in capsys.readouterr().out  # 1024 positions hold prompt + answer
    assert summary["settings"]["rope"]["rope_parameters"]["rope_type"] == "yarn"
    assert summary["settings"]["yarn_factor"] == 2.0 and summary["settings"]["original_max_position_embeddings"] == 512
    tokenizer = load_tokenizer(args.model)
    prompt_length = len(prompt_token_ids(tokenizer, build_messages(problems[0]["problem"])))
    assert prompt_length > 512
    rows = read_rows(tmp_path / "out" / "samples.jsonl")
    assert len(rows) == 6 and all(r["length"] >= 1 for r in rows)


def test_lora_adapter_is_loaded_on_its_base(toy_world, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from generation import adapter_base, load_model, load_tokenizer

    base_path = str(toy_world / "model")
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_path), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path / "adapter")  # no tokenizer there: it comes from the base
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == base_path

    args = EvalArguments(model=str(tmp_path / "adapter"))
    assert adapter_base(args.model) == base_path
    config, _ = evaluate.load_config(args.model, args)
    merged = load_model(args.model, config=config)
    base = AutoModelForCausalLM.from_pretrained(base_path)
    ids = torch.randint(10, 90, (1, 20))
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, peft_model.eval()(ids).logits, atol=1e-4)
        assert not torch.allclose(merged(ids).logits, base(ids).logits, atol=1e-4)
    assert load_tokenizer(args.model).eos_token == "<|im_end|>"


@pytest.mark.slow
def test_a_killed_run_resumes_where_it_stopped(toy_world, tmp_path, capsys):
    common = [
        "--model", str(toy_world / "model"), "--data", str(toy_world / "test.jsonl"), "--num_samples", "4", "--temperature", "1.0",
        "--top_k", "0", "--max_tokens", "32", "--max_problems", "24", "--batch_size", "8", "--ngram_unit", "char",
    ]  # fmt: skip
    killed_dir = tmp_path / "killed"
    samples = killed_dir / "samples.jsonl"
    process = run_evaluate(*common, "--output_dir", str(killed_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None and not (samples.exists() and len(samples.read_text().splitlines()) >= 8):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    finished = sum(len(rows) == 4 for rows in evaluate.read_samples(SampleStore(samples)).values())
    assert 1 <= finished < 24

    summary = evaluate.main(evaluate.parse_args([*common, "--output_dir", str(killed_dir)]))
    assert f"{finished}/24 problems already sampled" in capsys.readouterr().out
    assert summary["problems_sampled_this_run"] == 24 - finished
    rows = read_rows(samples)
    assert len(rows) == 24 * 4 and len({(r["problem_id"], r["sample_index"]) for r in rows}) == 24 * 4

    # The resumed run drew exactly the samples an uninterrupted run draws.
    fresh_dir = tmp_path / "fresh"
    fresh = evaluate.main(evaluate.parse_args([*common, "--output_dir", str(fresh_dir)]))
    key = lambda r: (r["problem_id"], r["sample_index"], r["completion"], r["correct"])  # noqa: E731
    assert sorted(map(key, rows)) == sorted(map(key, read_rows(fresh_dir / "samples.jsonl")))
    assert fresh["benchmarks"] == summary["benchmarks"]


def test_a_half_written_line_is_dropped(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"a": 1}\n{"b": 2}\n{"settings_ha')
    store = SampleStore(path)
    assert store.records() == [{"a": 1}, {"b": 2}]
    assert path.read_text() == '{"a": 1}\n{"b": 2}\n'
    store.append([{"c": 3}])  # appending goes on after the last whole record
    assert store.records() == [{"a": 1}, {"b": 2}, {"c": 3}]


def test_temperature_sweep_writes_the_report_from_its_samples(toy_world, tmp_path, capsys):
    from temperature_sweep import distinct_ngram_ratio

    summary = evaluate.main(toy_args(toy_world, tmp_path, max_problems=8, sweep_temperature="0.8:1.2:0.4"))
    report = json.loads((tmp_path / "temperature_sweep.json").read_text())
    assert (tmp_path / "temperature_sweep.png").stat().st_size > 0
    assert [row["temperature"] for row in report["temperatures"]] == [0.8, 1.2]
    assert report["recommended_temperature"] in (0.8, 1.2)
    assert "recommended temperature" in capsys.readouterr().out
    rows = read_rows(tmp_path / "samples.jsonl")
    for row in report["temperatures"]:
        at_t = [r for r in rows if r["temperature"] == row["temperature"]]
        problems = list(group_by_problem(at_t).values())
        assert len(problems) == 8 and all(len(g) == 4 for g in problems)
        assert row["accuracy"] == pytest.approx(sum(r["correct"] for r in at_t) / len(at_t))
        assert row["diversity"] == pytest.approx(sum(distinct_ngram_ratio([r["completion"] for r in g], 4, "char") for g in problems) / 8)
    assert summary["sweep"]["recommended_temperature"] == report["recommended_temperature"]


# ----------------------------------------------------------------------------------------------
# Arguments and errors
# ----------------------------------------------------------------------------------------------


def test_arguments_and_benchmark_resolution(tmp_path):
    args = evaluate.parse_args(["--model", "m", "--benchmarks", "aime24,minerva", "--data", "x/aime25.parquet", "y/mine.jsonl", "y/mine.jsonl"])
    assert args.data == ["x/aime25.parquet", "y/mine.jsonl", "y/mine.jsonl"]
    assert (args.temperature, args.top_p, args.top_k, args.max_tokens) == (1.4, 1.0, 20, 90000)  # POLARIS 4B
    specs = evaluate.benchmark_specs(args)
    assert [(name, source, k) for name, source, _, k in specs] == [
        ("aime24", "HuggingFaceH4/aime_2024", 32),
        ("minerva", "math-ai/minervamath", 4),
        ("aime25", "x/aime25.parquet", 32),  # a file named like a benchmark gets its number of samples
        ("mine", "y/mine.jsonl", 4),
        ("mine-2", "y/mine.jsonl", 4),
    ]
    default = evaluate.benchmark_specs(evaluate.parse_args(["--model", "m"]))
    assert [name for name, *_ in default] == ["aime24", "aime25", "amc23", "minerva", "olympiad"]


def test_unknown_benchmark_is_one_line():
    result = run_evaluate("--model", "m", "--benchmarks", "aime24,gsm9k")
    assert_one_line_error(result, "unknown benchmark 'gsm9k'", "--data path/to/gsm9k.parquet")


def test_hub_benchmark_while_offline_is_one_line(tmp_path):
    result = run_evaluate(
        "--model", "m", "--benchmarks", "aime24", "--output_dir", str(tmp_path),
        env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )  # fmt: skip
    assert_one_line_error(result, "HuggingFaceH4/aime_2024", "offline", "--data path/to/aime24.parquet")


def test_vllm_backend_without_vllm_and_bad_settings_are_user_errors(toy_world, tmp_path):
    try:
        import vllm  # noqa: F401

        has_vllm = True
    except ImportError:
        has_vllm = False
    if not has_vllm:
        with pytest.raises(UserError, match="pip install vllm"):
            evaluate.main(toy_args(toy_world, tmp_path, backend="vllm", max_problems=1))
    with pytest.raises(UserError, match="--yarn_factor"):
        evaluate.main(toy_args(toy_world, tmp_path, original_max_position_embeddings=256))
    with pytest.raises(UserError, match="--num_samples"):
        evaluate.main(toy_args(toy_world, tmp_path, num_samples=0))
    with pytest.raises(UserError, match="--sweep_temperature"):
        evaluate.main(toy_args(toy_world, tmp_path, target_diversity=0.5))
    with pytest.raises(UserError, match="no such model directory"):
        evaluate.main(toy_args(toy_world, tmp_path, model=str(tmp_path / "missing-model")))
