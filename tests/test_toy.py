"""The toy world: deterministic from its seed, cached by recipe, and partly able as a warm-started model."""

import collections
import json
import sys

import pytest

import toy
from conftest import ROOT


def test_tokenizer_round_trips_text_and_keeps_word_tokens_whole():
    tokenizer = toy.build_tokenizer()
    text = "<think>12*4=48\n12*30=360</think>\n\\boxed{408}"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[0] == "<think>" and "</think>" in tokens and "\\boxed{" in tokens
    assert tokens[1:3] == ["1", "2"]  # digits stay single characters
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"


def test_problems_are_reproducible_from_the_seed_and_answers_are_right():
    first = toy.make_problems(200, seed=3, salt="train")
    assert first == toy.make_problems(200, seed=3, salt="train")
    assert first != toy.make_problems(200, seed=4, salt="train")
    assert collections.Counter(p["level"] for p in first) == {name: 20 for name, *_ in toy.LEVELS}
    for problem in first:
        expression = problem["problem"].removeprefix("What is ").removesuffix("?")
        assert int(problem["answer"]) == eval(expression)  # left to right equals Python's order here
        assert problem["solution"].endswith("\\boxed{" + problem["answer"] + "}")


def test_a_fraction_of_demonstrations_end_sloppily_on_every_level_but_the_easiest():
    demonstrations = toy.make_demonstrations(4000, seed=0, sloppy_fraction=0.3)
    sloppy, per_level = collections.Counter(), collections.Counter(d["level"] for d in demonstrations)
    unboxed = []
    for d in demonstrations:
        if not d["solution"].endswith("\\boxed{" + d["answer"] + "}"):
            sloppy[d["level"]] += 1
        if "\\boxed{" not in d["solution"]:
            unboxed.append(d)
    easiest = toy.LEVELS[0][0]
    assert sloppy[easiest] == 0  # some problems can be solved 8 times out of 8
    assert all(0.22 < sloppy[level] / per_level[level] < 0.38 for level in per_level if level != easiest), sloppy
    assert 0 < len(unboxed) < sum(sloppy.values())  # both kinds: unboxed and miscopied
    # The worked steps stay right: the last step's result is the answer.
    for d in unboxed:
        assert d["solution"].split("</think>")[0].endswith("=" + d["answer"])
    assert toy.make_demonstrations(50, seed=0, sloppy_fraction=0.0) == toy.make_problems(50, seed=0, salt="warmstart")


def test_recipe_hash_tracks_the_recipe_but_not_the_location():
    base = toy.ToyArguments(output_dir="a")
    assert toy.recipe_hash(base) == toy.recipe_hash(toy.ToyArguments(output_dir="b", force=True))
    assert toy.recipe_hash(base) != toy.recipe_hash(toy.ToyArguments(seed=1))
    assert toy.recipe_hash(base) != toy.recipe_hash(toy.ToyArguments(sloppy_fraction=0.1))


def test_build_is_deterministic_whatever_the_thread_count_and_cached(tmp_path):
    """Two threads sum floats in another order than one: the world must not depend on the machine's cores."""
    import torch
    from safetensors.torch import load_file

    def build(directory, threads):
        torch.set_num_threads(threads)
        args = toy.ToyArguments(output_dir=str(directory), num_train=20, num_test=10, warmup_steps=10)
        try:
            return toy.build_toy_world(args)
        finally:
            assert torch.get_num_threads() == threads  # the caller's setting is given back
            torch.set_num_threads(threads_before)

    threads_before = torch.get_num_threads()
    first, second = build(tmp_path / "one", 1), build(tmp_path / "two", 2)
    weights_one = load_file(first / "model" / "model.safetensors")
    weights_two = load_file(second / "model" / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    assert all((weights_one[k] == weights_two[k]).all() for k in weights_one)
    assert (first / "train.jsonl").read_text() == (second / "train.jsonl").read_text()
    recipe = json.loads((first / "recipe.json").read_text())
    assert recipe["model_hash"] == toy.model_hash(first / "model") == toy.model_hash(second / "model")  # the world, as reports name it
    assert len(recipe["model_hash"]) == 8 and toy.model_hash(tmp_path) is None
    (first / "model" / "model.safetensors").unlink()
    build(tmp_path / "one", 1)  # same recipe: reused as it is, not rebuilt
    assert not (first / "model" / "model.safetensors").exists()
    assert json.loads((first / "recipe.json").read_text()) == recipe


@pytest.mark.slow
def test_warm_started_model_is_partly_able(toy_world):
    """Sampled accuracy between 10% and 60% (most sloppy endings score 0), outputs shaped like a reasoning model's,
    all pass rates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data import load_problems
    from generation import sample_completions
    from rewards import verify

    tokenizer = AutoTokenizer.from_pretrained(toy_world / "model")
    model = AutoModelForCausalLM.from_pretrained(toy_world / "model")
    problems = load_problems(str(toy_world / "test.jsonl"))
    samples = sample_completions(model, tokenizer, problems["prompt"], num_samples=8, temperature=1.0, max_new_tokens=48, seed=0, progress=False)
    passes = [sum(verify(s.text, answer) for s in group) for group, answer in zip(samples, problems["answer"])]
    accuracy = sum(passes) / (8 * len(passes))
    assert 0.1 < accuracy < 0.6, accuracy
    counts = collections.Counter(passes)
    assert counts[0] and counts[8] >= 2 and len(counts) >= 8, counts  # easy (the clean add_1x1), hard and in between
    texts = [s.text for group in samples for s in group]
    assert sum(t.startswith("<think>") and "</think>" in t for t in texts) > 0.9 * len(texts)


def test_one_toy_world_per_clone_whatever_the_current_directory(tmp_path, monkeypatch):
    """The scripts' default --toy_dir is outputs/toy in the repository, from any directory (a notebook in
    notebooks/ finds the world the demo built); $POLARIS_TOY_DIR moves it."""
    import evaluate
    import filter_data
    from train_grpo import parse_args

    monkeypatch.delenv(toy.TOY_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    expected = str(ROOT / "outputs" / "toy")
    assert parse_args(["--model_name_or_path", "toy", "--output_dir", "o"])[0].toy_dir == expected
    assert evaluate.EvalArguments(model="toy").toy_dir == expected
    assert filter_data.FilterArguments(model="toy", dataset="toy").toy_dir == expected
    assert toy.ToyArguments().output_dir == expected
    monkeypatch.setenv(toy.TOY_DIR_ENV, str(tmp_path / "elsewhere"))
    assert toy.ToyArguments().output_dir == parse_args(["--output_dir", "o"])[0].toy_dir == str(tmp_path / "elsewhere")


def test_build_threads_below_one_is_one_line_and_exit_2(tmp_path):
    import subprocess

    from test_train_cli import assert_one_line_error

    result = subprocess.run([sys.executable, str(ROOT / "toy.py"), "--output_dir", str(tmp_path), "--build_threads", "0"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert_one_line_error(result, "--build_threads must be at least 1")
    assert not (tmp_path / "recipe.json").exists()


def test_toy_habits_sorts_how_answers_end():
    """benchmarks/toy_habits.py: the right result computed, then boxed, stated in words, miscopied or cut off."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from toy_habits import classify

    kinds = lambda text: {kind for kind, value in classify(text, "12").items() if value}  # noqa: E731
    assert kinds("<think>3*4=12</think>\n\\boxed{12}") == {"right", "computed_right"}
    assert kinds("<think>3*4=12</think>\nThe answer is 12.") == {"computed_right", "unboxed"}
    assert kinds("<think>3*4=12</think>\n\\boxed{13}") == {"computed_right", "miscopied"}
    assert kinds("<think>3*4=11</think>\n\\boxed{11}") == set()  # wrong arithmetic, copied faithfully
    assert kinds("<think>3*40=120\n120+") == {"truncated"}
