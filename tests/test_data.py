"""Data loading for both schemas, prompt building and prompt-length filtering."""

import json

import pytest

import toy
from data import DEFAULT_PROMPT_SUFFIX, UserError, build_messages, filter_long_prompts, load_problems, prompt_id


def test_verl_parquet_schema_is_normalised(shared_dir):
    dataset = load_problems(str(shared_dir / "benchmarks" / "aime24.parquet"))
    assert len(dataset) == 30
    row = dataset[0]
    assert row["answer"] == "204"
    # The suffix already in the verl prompt is not doubled: the prompt is rebuilt from the bare problem.
    assert not row["problem"].endswith("\\boxed{}.")
    assert row["prompt"] == build_messages(row["problem"])
    assert row["prompt"][-1]["content"].count("Let's think step by step") == 1
    assert row["prompt_id"] == prompt_id(row["problem"])


def test_verl_list_golds_survive(shared_dir):
    dataset = load_problems(str(shared_dir / "benchmarks" / "minerva.parquet"))
    assert len(dataset) == 272
    assert isinstance(dataset[0]["answer"], list) and dataset[0]["answer"][0].strip() == "9.6"


def test_problem_answer_schema(shared_dir):
    raw = json.loads((shared_dir / "train" / "math_train.json").read_text())
    dataset = load_problems(str(shared_dir / "train" / "math_train.json"))
    assert len(dataset) == sum(row["answer"] is not None for row in raw) > 7000  # rows without a gold are dropped
    assert {"problem", "answer", "prompt", "prompt_id", "type"} <= set(dataset.column_names)
    assert dataset[0]["prompt"][-1]["content"].endswith(DEFAULT_PROMPT_SUFFIX)
    assert len(set(dataset["prompt_id"])) > 7000  # ids are stable hashes of the problem text


def test_jsonl_csv_and_renamed_columns(tmp_path):
    rows = [{"question": "What is 1 + 1?", "solution": "2"}, {"question": "What is 2 + 2?", "solution": "4"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "p.csv").write_text("question,solution\nWhat is 1 + 1?,2\nWhat is 2 + 2?,4\n")
    for name in ("p.jsonl", "p.csv"):
        dataset = load_problems(str(tmp_path / name), problem_column="question", answer_column="solution")
        assert dataset["problem"] == ["What is 1 + 1?", "What is 2 + 2?"]
        assert [str(a) for a in dataset["answer"]] == ["2", "4"]


def test_system_prompt_and_suffix():
    messages = build_messages("  Find x. ", prompt_suffix=" Box it.", system_prompt="Be brief.")
    assert messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Find x. Box it."}]


def test_missing_columns_and_missing_file(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(UserError, match="expected 'problem' and 'answer'"):
        load_problems(str(tmp_path / "bad.jsonl"))
    with pytest.raises(UserError, match="no such dataset file"):
        load_problems(str(tmp_path / "nothing.parquet"))


def test_long_prompts_are_dropped_and_counted(tmp_path):
    tokenizer = toy.build_tokenizer()
    rows = [{"problem": "What is 1 + 1?", "answer": "2"}, {"problem": "What is " + "1 + " * 100 + "1?", "answer": "101"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = load_problems(str(tmp_path / "p.jsonl"))
    short_length = len(tokenizer.apply_chat_template(dataset[0]["prompt"], tokenize=True, add_generation_prompt=True)["input_ids"])
    kept, dropped = filter_long_prompts(dataset, tokenizer, short_length)
    assert dropped == 1 and kept["answer"] == ["2"]
    kept, dropped = filter_long_prompts(dataset, tokenizer, short_length - 1)
    assert dropped == 2 and len(kept) == 0
    kept, dropped = filter_long_prompts(dataset, tokenizer, None)
    assert dropped == 0 and len(kept) == 2
