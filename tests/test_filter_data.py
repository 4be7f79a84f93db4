"""filter_data.py: difficulty columns, table and chart; fewer zero-variance groups; SIGKILL + resume;
the stage refresh from a per-prompt ledger; one-line errors for bad input."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import types

import pytest

from conftest import ROOT
from test_train_cli import assert_one_line_error


EASY_LEVELS = {"add_1x1", "sub_1x1", "mul_1x1", "add_2x1"}


def run_filter(*args, env=None, timeout=600):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "filter_data.py"), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


def filter_in_process(*args) -> tuple[dict, str]:
    import filter_data

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        summary = filter_data.main(filter_data.parse_args(list(args)))
    return summary, stdout.getvalue()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def mixed_problems(toy_world, tmp_path_factory):
    """40 toy problems, easy and hard: a set where the model solves some problems every time."""
    rows = read_jsonl(toy_world / "train.jsonl")
    easy = [r for r in rows if r["level"] in EASY_LEVELS][:24]
    hard = [r for r in rows if r["level"] not in EASY_LEVELS][:16]
    return write_jsonl(tmp_path_factory.mktemp("mixed") / "problems.jsonl", easy + hard)


@pytest.fixture(scope="module")
def filtered(toy_world, mixed_problems, tmp_path_factory):
    output = tmp_path_factory.mktemp("filtered") / "filtered.parquet"
    summary, stdout = filter_in_process(
        "--model", str(toy_world / "model"), "--dataset", str(mixed_problems), "--output", str(output),
        "--num_samples", "8", "--temperature", "1.0", "--max_tokens", "48",
    )
    return output, summary, stdout


# ----------------------------------------------------------------------------------------------
# The difficulty pre-filter on the toy world
# ----------------------------------------------------------------------------------------------


def test_columns_table_and_chart(filtered, mixed_problems):
    from datasets import load_dataset

    from data import load_problems

    output, summary, stdout = filtered
    rows = load_dataset("parquet", data_files=str(output), split="train").to_list()
    assert {"problem", "answer", "prompt_id", "pass_rate", "difficulty", "correct"} <= set(rows[0])
    for row in rows:
        k = sum(row["correct"])
        assert len(row["correct"]) == 8 and set(row["correct"]) <= {0, 1}
        assert row["pass_rate"] == k / 8 and row["difficulty"] == f"{k}/8"
        assert k < 8  # the default rule drops exactly the problems solved 8 times out of 8
    counts = {r["difficulty"]: r for r in summary["counts"]}
    assert sum(r["problems"] for r in counts.values()) == len(read_jsonl(mixed_problems)) == summary["problems"]
    assert counts["8/8"]["problems"] > 0 and counts["8/8"]["kept"] == 0
    assert all(r["kept"] == r["problems"] for d, r in counts.items() if d != "8/8")
    assert len(rows) == summary["kept"] == summary["problems"] - counts["8/8"]["problems"]
    # the table: one line per k/n with the count before and after
    for difficulty, r in counts.items():
        assert any(line.split()[:2] == [difficulty, str(r["problems"])] and line.split()[-1] == str(r["kept"]) for line in stdout.splitlines())
    chart = output.with_name("filtered.difficulty.png")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 5000
    # the output is a training set as it is: data.load_problems (used by train_grpo.py) reads it back
    assert len(load_problems(str(output))) == len(rows)


def test_another_rule_reuses_the_samples(filtered, mixed_problems, toy_world, monkeypatch):
    import generation

    output, summary, _ = filtered
    monkeypatch.setattr(generation, "load_model", lambda *a, **k: pytest.fail("finished samples were drawn again"))
    narrow = output.with_name("narrow.parquet")
    samples = output.with_name("filtered.samples.jsonl")
    narrow.with_name("narrow.samples.jsonl").write_bytes(samples.read_bytes())
    summary2, stdout = filter_in_process(
        "--model", str(toy_world / "model"), "--dataset", str(mixed_problems), "--output", str(narrow),
        "--max_tokens", "48", "--drop_unsolved", "--max_pass_rate", "0.5",
    )
    assert "40 already done" in stdout
    expected = sum(r["problems"] for r in summary["counts"] if 0 < int(r["difficulty"].split("/")[0]) <= 4)
    assert summary2["kept"] == expected


def test_fewer_always_solved_groups_after_filtering(filtered, mixed_problems, toy_world):
    """The groups a GRPO step would see at the start of training (same model, 8 samples, training
    temperature and length, a new seed): fewer are solved by every sample in the filtered set, the
    zero-advantage groups the filter is there to remove (unsolved problems are kept, as in POLARIS)."""
    from datasets import load_dataset

    from data import load_problems
    from generation import load_model, load_tokenizer, sample_completions
    from rewards import accuracy_reward

    output, _, _ = filtered
    kept_ids = set(load_dataset("parquet", data_files=str(output), split="train")["prompt_id"])
    problems = load_problems(str(mixed_problems))
    model, tokenizer = load_model(str(toy_world / "model")), load_tokenizer(str(toy_world / "model"))
    groups = sample_completions(model, tokenizer, problems["prompt"], num_samples=8, temperature=1.0, max_new_tokens=48, seed=1234, progress=False)
    all_correct = {}
    for pid, answer, group in zip(problems["prompt_id"], problems["answer"], groups):
        rewards = accuracy_reward([s.text for s in group], answer=[answer] * len(group))
        all_correct[pid] = all(reward == 1.0 for reward in rewards)
    share_unfiltered = sum(all_correct.values()) / len(all_correct)
    share_filtered = sum(all_correct[pid] for pid in kept_ids) / len(kept_ids)
    print(f"always-solved groups: unfiltered {share_unfiltered:.3f}, filtered {share_filtered:.3f}")
    assert share_unfiltered > 0 and share_filtered < share_unfiltered


@pytest.mark.slow
def test_sigkill_midway_then_resume_gives_the_same_output(toy_world, tmp_path):
    problems = write_jsonl(tmp_path / "problems.jsonl", read_jsonl(toy_world / "train.jsonl")[:16])
    common = ["--model", str(toy_world / "model"), "--dataset", str(problems), "--batch_size", "16", "--max_tokens", "48"]

    uninterrupted = run_filter(*common, "--output", str(tmp_path / "a.jsonl"))
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    samples = tmp_path / "b.samples.jsonl"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen([sys.executable, str(ROOT / "filter_data.py"), *common, "--output", str(tmp_path / "b.jsonl")], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if samples.exists() and samples.read_text().count("\n") >= 3:  # settings + two of the eight chunks
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "b.jsonl").exists()

    resumed = run_filter(*common, "--output", str(tmp_path / "b.jsonl"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    already = int(resumed.stdout.split(" already done")[0].split()[-1])
    assert 0 < already < 16
    assert (tmp_path / "b.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()
    assert samples.read_bytes() == (tmp_path / "a.samples.jsonl").read_bytes()


# ----------------------------------------------------------------------------------------------
# Pieces without a model
# ----------------------------------------------------------------------------------------------


def test_keep_rule():
    from filter_data import FilterArguments, keep_problem

    default = FilterArguments(num_samples=8)
    assert [keep_problem(k, 8, default) for k in range(9)] == [True] * 8 + [False]
    unsolved = FilterArguments(drop_unsolved=True)
    assert [keep_problem(k, 8, unsolved) for k in range(9)] == [False] + [True] * 7 + [False]
    band = FilterArguments(min_pass_rate=0.25, max_pass_rate=0.5)
    assert [k for k in range(9) if keep_problem(k, 8, band)] == [2, 3, 4]
    assert all(keep_problem(k, 8, FilterArguments(max_pass_rate=1.0)) for k in range(9))


def test_a_record_cut_by_a_kill_is_dropped_and_redone(tmp_path):
    from filter_data import read_samples_file
    from generation import SampleStore

    settings = {"seed": 0}
    path = tmp_path / "out.samples.jsonl"
    good = json.dumps({"version": 1, "settings": settings}) + "\n" + json.dumps({"chunk": 0, "indices": [1], "correct": [[1]]}) + "\n"
    path.write_text(good + '{"chunk": 1, "indices": [0], "corr')
    records = read_samples_file(SampleStore(path), settings)
    assert [r["chunk"] for r in records] == [0]
    assert path.read_text() == good  # appending goes on after the last whole record


def test_samples_from_other_settings_are_refused(tmp_path):
    from data import UserError
    from filter_data import read_samples_file
    from generation import SampleStore

    path = tmp_path / "out.samples.jsonl"
    path.write_text(json.dumps({"version": 1, "settings": {"temperature": 1.0, "seed": 0}}) + "\n")
    with pytest.raises(UserError, match="temperature: 1.0 then, 0.6 now"):
        read_samples_file(SampleStore(path), {"temperature": 0.6, "seed": 0})


def test_out_of_memory_halves_the_batch_and_a_resumed_run_keeps_it(toy_world, tmp_path, monkeypatch):
    """A chunk that runs out of GPU memory is redone with half the batch; the size is written with the
    chunk, so a resumed run samples its chunks with the batches an uninterrupted run used."""
    import torch

    import generation

    calls = []

    def fake_sample_completions(model, tokenizer, prompts, num_samples, batch_size, **kwargs):
        calls.append(batch_size)
        if batch_size > 4:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return [[generation.Sample(text="\\boxed{0}", num_tokens=3, truncated=False)] * num_samples for _ in prompts]

    monkeypatch.setattr(generation, "load_model", lambda *a, **k: object())
    monkeypatch.setattr(generation, "sample_completions", fake_sample_completions)
    problems = write_jsonl(tmp_path / "p.jsonl", [{"problem": f"What is {a} - {a}?", "answer": "0"} for a in range(6)])
    args = ["--model", str(toy_world / "model"), "--dataset", str(problems), "--output", str(tmp_path / "o.jsonl"), "--num_samples", "4", "--batch_size", "8"]
    filter_in_process(*args)
    assert calls == [8, 4, 4, 4]  # three chunks of two problems; the first one twice
    samples = tmp_path / "o.samples.jsonl"
    lines = samples.read_text().splitlines()
    assert [json.loads(line)["batch_size"] for line in lines[1:]] == [4, 4, 4]

    samples.write_text("\n".join(lines[:2]) + "\n")  # as if killed after the first chunk
    calls.clear()
    filter_in_process(*args)
    assert calls == [4, 4]
    assert samples.read_text().splitlines() == lines


def test_vllm_backend_seeds_every_problem(toy_world, tmp_path, monkeypatch):
    """The vllm path with a stand-in `vllm` module: one seeded request per problem, n samples each."""
    import importlib.machinery

    calls = {}

    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    class LLM:
        def __init__(self, **kwargs):
            calls["llm"] = kwargs

        def generate(self, requests, params, use_tqdm=True):
            calls.setdefault("params", []).extend(params)
            output = types.SimpleNamespace(text="<think>3+4=7</think>\n\\boxed{7}", token_ids=[1, 2, 3], finish_reason="stop")
            return [types.SimpleNamespace(outputs=[output] * p.n) for p in params]

    fake = types.ModuleType("vllm")
    fake.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    fake.LLM, fake.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", fake)
    problems = write_jsonl(tmp_path / "p.jsonl", [{"problem": "What is 3 + 4?", "answer": "7"}, {"problem": "What is 2 * 4?", "answer": "8"}])
    summary, _ = filter_in_process(
        "--backend", "vllm", "--model", str(toy_world / "model"), "--dataset", str(problems), "--output", str(tmp_path / "o.jsonl"),
        "--num_samples", "4", "--max_tokens", "32", "--seed", "10",
    )
    from generation import problem_seed

    assert sorted(p.seed for p in calls["params"]) == sorted(problem_seed(10, str(i), 1.0) for i in (0, 1))  # one per problem
    assert all(p.n == 4 and p.max_tokens == 32 and p.top_k == -1 for p in calls["params"])
    assert calls["llm"]["seed"] == 10 and calls["llm"]["max_model_len"] > 32
    assert [row["difficulty"] for row in read_jsonl(tmp_path / "o.jsonl")] == ["0/4"]  # 4/4 dropped
    assert summary["kept"] == 1


# ----------------------------------------------------------------------------------------------
# Stage refresh
# ----------------------------------------------------------------------------------------------


def write_ledger(path, group_rewards: dict, version: int = 2):
    """A ledger as training writes it (batch_repair.PromptLedger, version 2), or as earlier runs did (1)."""
    from batch_repair import PromptLedger

    path.parent.mkdir(parents=True, exist_ok=True)
    if version == 1:
        prompts = {
            pid: {"seen": len(rewards), "group_rewards": rewards, "kept_completion": None, "kept_step": None}
            for pid, rewards in group_rewards.items()
        }
        path.write_text(json.dumps({"version": 1, "prompts": prompts}))
        return
    ledger = PromptLedger()
    for pid, rewards in group_rewards.items():
        for reward in rewards:
            ledger.record(pid, float("nan") if reward is None else reward, "\\boxed{1}" if reward == 1.0 else None, step=0)
    ledger.save(path)


def test_refresh_drops_exactly_the_prompts_above_the_threshold(tmp_path):
    from data import load_problems, prompt_id

    problems = [f"What is {a} + {a}?" for a in range(7)]
    dataset = write_jsonl(tmp_path / "train.jsonl", [{"problem": p, "answer": str(2 * a)} for a, p in enumerate(problems)])
    # group means are multiples of 1/8 (8 rollouts), so the pooled means below are exact
    rewards = {
        problems[0]: [1.0, 0.875, 0.875],  # 0.917: dropped
        problems[1]: [0.875, 0.875],  # 0.875: kept
        problems[2]: [1.0],  # 1.0: dropped
        problems[3]: [0.5, 1.0, 1.0, 1.0],  # 0.875: kept, though its last groups were perfect
        problems[4]: [1.0, 1.0, 0.75, 1.0],  # 0.9375: dropped
        problems[5]: [None],  # in the ledger but never rewarded (null: no reward computed): kept
        "a problem of another data set": [1.0],
    }  # problems[6] never seen: kept
    write_ledger(tmp_path / "run" / "prompt_ledger.json", {prompt_id(p): r for p, r in rewards.items()})

    summary, stdout = filter_in_process("--from_training_log", str(tmp_path / "run"), "--dataset", str(dataset), "--output", str(tmp_path / "next.json"))
    kept = load_problems(str(tmp_path / "next.json"))
    assert kept["problem"] == [problems[i] for i in (1, 3, 5, 6)]
    assert kept["train_mean_reward"] == [0.875, 0.875, None, None]
    assert summary == {"problems": 7, "dropped": 3, "kept": 4, "never_seen": 2, "output": str(tmp_path / "next.json")}
    assert "Dropped 3 of 7 prompts whose mean reward during training was above 0.9" in stdout

    summary, _ = filter_in_process(
        "--from_training_log", str(tmp_path / "run"), "--dataset", str(dataset), "--output", str(tmp_path / "strict.jsonl"), "--max_mean_reward", "0.8"
    )
    assert summary["dropped"] == 5


def test_refresh_reads_the_newest_complete_checkpoint(tmp_path, capsys):
    from batch_repair import PromptLedger
    from checkpoints import COMPLETE_MARKER
    from data import UserError, prompt_id
    from filter_data import find_ledger

    def checkpoint(step: int, rewards: list, version: int = 2, complete: bool = True):
        write_ledger(tmp_path / "run" / f"checkpoint-{step}" / "prompt_ledger.json", {prompt_id("x"): rewards}, version=version)
        if complete:
            (tmp_path / "run" / f"checkpoint-{step}" / COMPLETE_MARKER).write_text("{}")
        return tmp_path / "run" / f"checkpoint-{step}" / "prompt_ledger.json"

    # both versions read the same (version 1: earlier runs, plain-text completions)
    assert PromptLedger.load(checkpoint(5, [1.0], version=1)).group_rewards() == {prompt_id("x"): [1.0]}
    checkpoint(20, [0.5])
    newest = checkpoint(100, [0.0])
    cut_short = checkpoint(200, [1.0], complete=False)  # killed while being written: its files may be partial
    assert find_ledger(str(tmp_path / "run")) == newest
    assert f"skipping {cut_short.parent}: incomplete" in capsys.readouterr().err
    assert PromptLedger.load(tmp_path / "run" / "checkpoint-20" / "prompt_ledger.json").group_rewards() == {prompt_id("x"): [0.5]}
    with pytest.raises(UserError, match="no prompt_ledger.json"):
        find_ledger(str(tmp_path / "elsewhere"))


def test_from_training_log_ignores_an_incomplete_checkpoint(tmp_path):
    """The stage refresh reads the newest complete checkpoint's ledger: a newer one cut short (no completeness
    marker) would drop prompts from rewards the run never finished saving."""
    from checkpoints import COMPLETE_MARKER
    from data import prompt_id

    dataset = tmp_path / "problems.jsonl"
    dataset.write_text("".join(json.dumps({"problem": p, "answer": "1"}) + "\n" for p in ("x", "y")))
    write_ledger(tmp_path / "run" / "checkpoint-10" / "prompt_ledger.json", {prompt_id("x"): [0.5]})
    (tmp_path / "run" / "checkpoint-10" / COMPLETE_MARKER).write_text("{}")
    write_ledger(tmp_path / "run" / "checkpoint-20" / "prompt_ledger.json", {prompt_id("x"): [1.0, 1.0]})  # no marker
    summary, _ = filter_in_process("--from_training_log", str(tmp_path / "run"), "--dataset", str(dataset), "--output", str(tmp_path / "next.jsonl"))
    assert summary["dropped"] == 0 and summary["kept"] == 2


# ----------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2
# ----------------------------------------------------------------------------------------------


def test_unknown_columns(toy_world, tmp_path):
    result = run_filter("--model", str(toy_world / "model"), "--dataset", str(toy_world / "test.jsonl"), "--problem_column", "question", "--output", str(tmp_path / "o.parquet"))
    assert_one_line_error(result, "--problem_column")


def test_model_that_cannot_be_loaded_offline(toy_world, tmp_path):
    result = run_filter(
        "--model", "no-such-org/no-such-model", "--dataset", str(toy_world / "test.jsonl"), "--output", str(tmp_path / "o.parquet"),
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert_one_line_error(result, "model 'no-such-org/no-such-model' is not in the Hugging Face cache and HF_HUB_OFFLINE is set")


def test_empty_dataset(toy_world, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    result = run_filter("--model", str(toy_world / "model"), "--dataset", str(tmp_path / "empty.jsonl"), "--output", str(tmp_path / "o.parquet"))
    assert_one_line_error(result, "empty")


def test_other_bad_input(toy_world, tmp_path):
    import importlib.util

    from data import UserError

    model, dataset = str(toy_world / "model"), str(toy_world / "test.jsonl")
    cases = [
        (["--model", model, "--dataset", dataset, "--output", str(tmp_path / "o.csv")], "extension"),
        (["--model", model, "--dataset", dataset, "--output", str(tmp_path / "o.jsonl"), "--max_pass_rate", "1.5"], "--max_pass_rate"),
        (["--model", str(tmp_path / "no" / "model"), "--dataset", dataset, "--output", str(tmp_path / "o.jsonl")], "no such model directory"),
        (["--from_training_log", str(tmp_path), "--dataset", dataset, "--output", str(tmp_path / "o.jsonl")], "prompt_ledger.json"),
    ]
    if importlib.util.find_spec("vllm") is None:
        cases.append((["--backend", "vllm", "--model", model, "--dataset", dataset, "--output", str(tmp_path / "o.jsonl")], "pip install vllm"))
    for args, fragment in cases:
        with pytest.raises(UserError, match=fragment.replace(".", r"\.")):
            filter_in_process(*args)
