"""train_grpo.py from the command line: the demo recipe and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from data import UserError


def run_train(*args, cwd=ROOT, timeout=600, show_warnings=False, env=None):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONWARNINGS"} | (env or {})
    if not show_warnings:
        env["PYTHONWARNINGS"] = "ignore"
    return subprocess.run(
        [sys.executable, str(ROOT / "train_grpo.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def run_train_here(*args):
    """`python train_grpo.py ARGS` that stops on bad input, run in this process: the same `run_cli(cli)` as the
    script's last line, without a new interpreter's 8-10 s of importing torch, TRL and vLLM.
    tests/test_offline_errors.py keeps a real process for the one-line error."""
    import contextlib
    import io

    from data import run_cli
    from train_grpo import cli

    stdout, stderr, argv, cwd = io.StringIO(), io.StringIO(), sys.argv, os.getcwd()
    sys.argv, returncode = ["train_grpo.py", *args], 0
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            run_cli(cli)
    except SystemExit as exit:
        returncode = exit.code if isinstance(exit.code, int) else 1
    finally:
        sys.argv = argv
        os.chdir(cwd)
    return subprocess.CompletedProcess(["train_grpo.py", *args], returncode, stdout.getvalue(), stderr.getvalue())


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0]


def test_no_arguments_means_the_demo_recipe():
    from train_grpo import parse_args

    script_args, training_args, model_args = parse_args([])
    assert model_args.model_name_or_path == "toy" and script_args.dataset_name == "toy"
    assert training_args.output_dir == "outputs/demo"
    # POLARIS settings
    assert training_args.beta == 0.0 and training_args.epsilon_high == 0.28 and training_args.loss_type == "dapo"
    assert training_args.num_generations == 8
    assert training_args.use_cpu and not training_args.bf16  # no GPU here: chosen automatically


def test_seed_alone_means_the_demo_recipe_with_that_seed():
    from train_grpo import parse_args

    for args in (["--seed", "3"], ["--seed=3"]):
        script_args, training_args, model_args = parse_args(args)
        assert model_args.model_name_or_path == "toy" and training_args.seed == 3
        assert training_args.output_dir == "outputs/demo"
    _, training_args, model_args = parse_args(["--seed", "3", "--output_dir", "x"])  # more than a seed: no recipe
    assert model_args.model_name_or_path is None


def test_polaris_defaults_without_a_recipe():
    from train_grpo import parse_args

    _, training_args, _ = parse_args(["--output_dir", "x"])
    assert training_args.learning_rate == 1e-6 and training_args.lr_scheduler_type == "constant"
    assert training_args.weight_decay == 0.01 and training_args.max_grad_norm == 1.0
    assert training_args.top_p == 1.0 and training_args.top_k == 0 and training_args.beta == 0.0


def test_missing_dataset_file(toy_world, tmp_path):
    result = run_train_here("--model_name_or_path", str(toy_world / "model"), "--dataset_name", str(tmp_path / "none.jsonl"), "--output_dir", str(tmp_path / "o"))
    assert_one_line_error(result, "no such dataset file")


def test_missing_columns(toy_world, tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"question": "1+1?", "gold": "2"}) + "\n")
    result = run_train_here("--model_name_or_path", str(toy_world / "model"), "--dataset_name", str(tmp_path / "d.jsonl"), "--output_dir", str(tmp_path / "o"))
    assert_one_line_error(result, "--problem_column")


def test_held_out_set_has_its_own_columns(toy_world, tmp_path):
    """--problem_column / --answer_column rename the training set's columns only: the demo's held-out set (toy
    test.jsonl, `problem`/`answer`) keeps its own, and --eval_problem_column / --eval_answer_column rename those."""
    from generation import load_tokenizer, resolve_toy
    from train_grpo import load_eval_problems, load_training_data, parse_args

    rows = [{"question": f"What is {a} + {a}?", "solution": str(2 * a)} for a in range(5)]
    (tmp_path / "mydata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    script_args, _, _ = parse_args([
        "--config", str(ROOT / "recipes" / "demo.yaml"), "--toy_dir", str(toy_world), "--dataset_name", str(tmp_path / "mydata.jsonl"),
        "--problem_column", "question", "--answer_column", "solution", "--eval_max_problems", "3",
    ])  # fmt: skip
    script_args.eval_dataset_name = resolve_toy(script_args.eval_dataset_name, script_args.toy_dir, "test")
    assert script_args.eval_dataset_name == str(toy_world / "test.jsonl")
    train = load_training_data(script_args, load_tokenizer(str(toy_world / "model")))
    assert train["problem"] == [row["question"] for row in rows] and train["answer"] == [row["solution"] for row in rows]
    held_out = load_eval_problems(script_args)
    test_rows = [json.loads(line) for line in (toy_world / "test.jsonl").read_text().splitlines()[:3]]
    assert held_out["problem"] == [row["problem"] for row in test_rows]

    script_args.eval_dataset_name = str(tmp_path / "mydata.jsonl")
    with pytest.raises(UserError, match="expected 'problem' and 'answer'.*set --eval_problem_column / --eval_answer_column"):
        load_eval_problems(script_args)
    script_args.eval_problem_column, script_args.eval_answer_column = "question", "solution"
    assert load_eval_problems(script_args)["answer"] == ["0", "2", "4"]


def test_empty_dataset_after_prompt_filter(toy_world, tmp_path):
    result = run_train_here(
        "--model_name_or_path", str(toy_world / "model"), "--dataset_name", str(toy_world / "train.jsonl"),
        "--max_prompt_length", "5", "--output_dir", str(tmp_path / "o"),
    )
    assert_one_line_error(result, "--max_prompt_length")


def test_recipe_that_does_not_parse(tmp_path):
    (tmp_path / "bad.yaml").write_text("learning_rate: [1e-6\nmax_steps: 3\n")
    assert_one_line_error(run_train_here("--config", str(tmp_path / "bad.yaml")), "YAML")
    assert_one_line_error(run_train_here("--config", str(tmp_path / "missing.yaml")), "no such recipe file")


def test_bf16_without_support(tmp_path):
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        pytest.skip("this machine supports bf16")
    result = run_train_here("--model_name_or_path", "toy", "--dataset_name", "toy", "--bf16", "true", "--output_dir", str(tmp_path / "o"))
    assert_one_line_error(result, "bf16")


def test_unknown_reward_function(toy_world, tmp_path):
    result = run_train_here(
        "--model_name_or_path", str(toy_world / "model"), "--dataset_name", str(toy_world / "train.jsonl"),
        "--reward_funcs", "no_such_reward", "--output_dir", str(tmp_path / "o"),
    )
    assert_one_line_error(result, "no_such_reward")


@pytest.mark.slow
def test_demo_end_to_end(toy_world, tmp_path):
    """The demo recipe trains the toy model and held-out accuracy improves for real (half its steps and held-out
    problems, to keep the suite short: the full demo's gains are in the README)."""
    output_dir = tmp_path / "demo"
    result = run_train(
        "--config", str(ROOT / "recipes" / "demo.yaml"), "--output_dir", str(output_dir), "--toy_dir", str(toy_world),
        "--max_steps", "40", "--eval_max_problems", "100",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["steps"] > 0 and summary["seconds"] > 0
    assert summary["accuracy_after"] > summary["accuracy_before"]
    assert "python train_grpo.py --config recipes/" in result.stdout
    import toy

    # The report names the world beside its before/after: the same recipe builds other worlds on other machines.
    assert summary["model_hash"] == toy.model_hash(toy_world / "model")
    assert any(line.startswith("held-out accuracy") and line.endswith(f"model {summary['model_hash']}") for line in result.stdout.splitlines())
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert any("reward" in row for row in state["log_history"])
    assert (output_dir / "model.safetensors").exists() and (output_dir / "learning_curve.png").exists()
    assert any(p.name.startswith("checkpoint-") for p in output_dir.iterdir())


def test_rerun_into_a_directory_holding_a_run_stops(toy_world, tmp_path):
    output_dir = tmp_path / "o"
    (output_dir / "checkpoint-20").mkdir(parents=True)
    result = run_train_here("--model_name_or_path", str(toy_world / "model"), "--dataset_name", str(toy_world / "train.jsonl"), "--output_dir", str(output_dir))
    assert_one_line_error(result, "already holds a run", "checkpoint-20", "--resume_from_checkpoint true", "--overwrite_output_dir true")
    assert (output_dir / "checkpoint-20").is_dir()  # nothing was touched


def test_demo_recipe_reruns_over_its_output_dir():
    from train_grpo import parse_args

    script_args, _, _ = parse_args([])
    assert script_args.overwrite_output_dir  # the README's demo command works a second time


def test_model_card_names_the_base_model():
    """TRL's own card for a local model says "[None](https://huggingface.co/None)"; ours names it."""
    from trl.trainer.utils import generate_model_card

    from polaris_trainer import name_base_model_in_card

    card = str(generate_model_card(base_model=None, model_name="demo", hub_model_id=None, dataset_name=None, tags=[],
                                   wandb_url=None, trackio_url=None, trainer_name="GRPO"))
    assert "[None](https://huggingface.co/None)" in card
    toy_card = name_base_model_in_card(card, "toy", "outputs/toy/model")
    assert "None" not in toy_card.split("fine-tuned version of", 1)[1].split("\n", 1)[0]
    assert "fine-tuned version of the offline toy model built by toy.py (`outputs/toy/model`)" in toy_card
    assert "fine-tuned version of the local model `./my-sft`" in name_base_model_in_card(card, "./my-sft")
    hub_card = name_base_model_in_card(card, "Qwen/Qwen3-4B")
    assert "fine-tuned version of [Qwen/Qwen3-4B](https://huggingface.co/Qwen/Qwen3-4B)" in hub_card
    assert "\nbase_model: Qwen/Qwen3-4B\n" in hub_card.split("\n---", 1)[0]


@pytest.mark.slow
def test_overwrite_clears_the_previous_run_and_the_card_names_the_toy_model(toy_world, tmp_path):
    """Also: the console is quiet (no warnings of our making, the toy world reported once, one line per log)."""
    output_dir = tmp_path / "o"
    (output_dir / "checkpoint-99").mkdir(parents=True)
    (output_dir / "trainer_state.json").write_text("{}")
    result = run_train(
        "--model_name_or_path", "toy", "--dataset_name", "toy", "--toy_dir", str(toy_world), "--output_dir", str(output_dir),
        "--overwrite_output_dir", "true", "--max_steps", "1", "--per_device_train_batch_size", "16", "--max_completion_length", "8",
        "--save_strategy", "steps", "--save_steps", "1", "--report_to", "none", "--logging_steps", "1",
        "--eval_dataset_name", "toy", "--eval_max_problems", "2", "--eval_num_samples", "1", show_warnings=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Warning" not in result.stderr and "Failed to load" not in result.stderr, result.stderr[-3000:]
    assert result.stdout.count("Toy world found") == 1
    step_lines = [line for line in result.stdout.splitlines() if line.startswith("step 1/1  reward ")]
    assert len(step_lines) == 1 and " informative " in step_lines[0] and " length " in step_lines[0] and "s/step" in step_lines[0]
    assert "{'loss'" not in result.stdout + result.stderr and "'completions/mean_length'" not in result.stdout + result.stderr
    logged = [row for row in json.loads((output_dir / "trainer_state.json").read_text())["log_history"] if "loss" in row]
    assert len(logged) == 1 and len(logged[0]) > 20 and "completions/mean_length" in logged[0]  # the full dict is kept
    assert not (output_dir / "checkpoint-99").exists() and (output_dir / "checkpoint-1").is_dir()
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 1
    card = (output_dir / "README.md").read_text()
    assert "[None]" not in card and "fine-tuned version of the offline toy model built by toy.py" in card


def test_unknown_option_suggests_the_close_one(tmp_path):
    assert_one_line_error(run_train_here("--max_stepz", "3"), "unknown option --max_stepz: did you mean --max_steps?")


def test_unknown_recipe_key_and_no_prefix_matching(tmp_path):
    from data import UserError
    from train_grpo import parse_args

    (tmp_path / "r.yaml").write_text("model_name_or_path: toy\nlearning_rat: 1.0e-5\n")
    with pytest.raises(UserError, match=r"unknown key 'learning_rat' in recipe .*r\.yaml: did you mean learning_rate\?"):
        parse_args(["--config", str(tmp_path / "r.yaml")])
    with pytest.raises(UserError, match="unknown option --max_step: did you mean --max_steps?"):  # a prefix is not taken
        parse_args(["--max_step", "3"])
    with pytest.raises(UserError, match=r"unknown option --zzzz \(see --help\)"):
        parse_args(["--zzzz=1"])
    _, training_args, _ = parse_args(["--max_steps=3", "--no_rollout_rescue", "--output_dir", str(tmp_path / "o")])
    assert training_args.max_steps == 3 and not training_args.rollout_rescue


def test_no_deprecation_warnings_from_our_defaults_and_recipes():
    import warnings

    from train_grpo import parse_args

    for recipe in [["--output_dir", "x"]] + [["--config", str(path)] for path in sorted((ROOT / "recipes").glob("*.yaml"))]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, training_args, _ = parse_args(recipe)
        assert not [w for w in caught if issubclass(w.category, FutureWarning)], (recipe, [str(w.message) for w in caught])
        # On by default, under both names (transformers 5.17's Trainer reads `gradient_checkpointing`); the demo's
        # toy model turns it off (its activations are tiny).
        checkpointing = not (recipe == [] or recipe[-1].endswith("demo.yaml"))
        assert training_args.activation_checkpointing == training_args.gradient_checkpointing == checkpointing, recipe
    with warnings.catch_warnings(record=True):
        _, training_args, _ = parse_args(["--gradient_checkpointing", "false", "--output_dir", "x"])  # the old name still works
    assert training_args.activation_checkpointing is False


def test_bitsandbytes_import_note_is_silenced_but_not_its_errors():
    import logging

    import train_grpo  # noqa: F401  data.py sets the level before trl imports bitsandbytes

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert not logger.isEnabledFor(logging.WARNING) and logger.isEnabledFor(logging.ERROR)
    code = "import evaluate, transformers.trainer, bitsandbytes"  # train_grpo.py: see the end-to-end test
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_step_line():
    from report import format_step_line

    logs = {"loss": 0.1, "reward": 0.2, "frac_reward_zero_std": 0.5, "trained/reward": 0.25, "trained/frac_reward_zero_std": 0.25,
            "schedule/stage": 2, "completions/mean_length": 20.73}
    assert format_step_line(logs, 5, 40, 4.94) == "step 5/40  reward 0.250  informative 0.75  stage 2  length 20.7  4.9 s/step"
    assert format_step_line({"loss": 0.1, "reward": 0.5}, 1, 2, None) == "step 1/2  reward 0.500"
    assert format_step_line({"eval_loss": 1.0}, 1, 2, None) is None  # left to transformers' own printing


def test_short_help_is_readable_and_does_not_import_torch():
    """`--help` shows the script's and POLARIS's options first, grouped, without the seconds of importing torch/TRL."""
    code = (
        "import runpy, sys\n"
        "sys.argv = ['train_grpo.py', '--help']\n"
        "try:\n    runpy.run_path('train_grpo.py', run_name='__main__')\n"
        "except SystemExit as exit:\n    assert exit.code == 0, exit.code\n"
        "print('IMPORTED', 'torch' in sys.modules or 'trl' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.rstrip().endswith("IMPORTED False")
    assert len(text.splitlines()) < 200
    sections = ["this script:", "data, rewards and the before/after measurement:", "POLARIS:", "training (TRL / transformers):"]
    positions = [text.index(section) for section in sections]
    assert positions == sorted(positions)
    for option in ["--stages", "--rollout_rescue", "--eval_dataset_name", "--overwrite_output_dir", "--max_steps", "--use_peft"]:
        assert option in text
    assert "--help-all" in text


def test_help_all_is_trls_full_list():
    result = run_train_here("--help-all")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(result.stdout.splitlines()) > 1000
    assert "--stages" in result.stdout and "--gradient_accumulation_steps" in result.stdout and "--lora_r" in result.stdout
