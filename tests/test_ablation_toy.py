"""benchmarks/ablation_toy.py's pure logic: arm recipes, paired intervals, resuming."""

import json
import math
import statistics
import sys

import pytest
import yaml

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import ablation_toy  # noqa: E402


def base_recipe() -> dict:
    return yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())


def recipe_for(arm: str, tmp_path, **overrides):
    args = ablation_toy.AblationArguments(output_dir=str(tmp_path), **overrides)
    return ablation_toy.arm_recipe(base_recipe(), arm, args, "filtered.jsonl", "train.jsonl")


@pytest.mark.parametrize("arm", list(ablation_toy.ARMS))
def test_every_arm_resolves_to_valid_training_options(arm, tmp_path):
    from train_grpo import parse_args

    recipe = recipe_for(arm, tmp_path)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    script_args, config, _ = parse_args(["--config", str(path), "--output_dir", str(tmp_path / "run")])
    full = recipe_for(ablation_toy.FULL, tmp_path)
    # Equal compute: the same steps and rollouts per step in every arm.
    assert config.max_steps == full["max_steps"]
    assert config.per_device_train_batch_size == full["per_device_train_batch_size"] and config.num_generations == 8
    assert script_args.dataset_name == ("filtered.jsonl" if ablation_toy.ARMS[arm].filtered else "train.jsonl")
    assert script_args.eval_dataset_name is None  # every arm is measured afterwards, the same way
    if arm == "no_rollout_rescue":
        assert not config.rollout_rescue and config.informative_substitution
    if arm == "no_informative_substitution":
        assert config.rollout_rescue and not config.informative_substitution
    if arm == "plus_dynamic_sampling":
        assert config.dynamic_sampling and config.rollout_rescue
    if arm in ("trl_grpo", "deepscaler", "justrl"):
        assert not (config.rollout_rescue or config.informative_substitution or config.dynamic_sampling)
    if arm == "no_rising_temperature":
        assert len({stage["temperature"] for stage in config.stages}) == 1
        assert len({stage["max_completion_length"] for stage in config.stages}) == 2
    if arm == "no_growing_length":
        assert len({stage["max_completion_length"] for stage in config.stages}) == 1
        assert len({stage["temperature"] for stage in config.stages}) == 2
    if arm == "deepscaler":
        assert {stage["temperature"] for stage in config.stages} == {0.6} and len(config.stages) == 2
    if arm in ("justrl", "trl_grpo"):
        assert config.stages is None
    if arm == "trl_grpo":
        assert config.epsilon_high is None and config.weight_decay == 0.0 and config.lr_scheduler_type == "linear"


def test_arm_edits_leave_the_base_recipe_alone(tmp_path):
    base = base_recipe()
    kept = json.dumps(base, sort_keys=True)
    for arm in ablation_toy.ARMS:
        ablation_toy.arm_recipe(base, arm, ablation_toy.AblationArguments(), "f", "t")
    assert json.dumps(base, sort_keys=True) == kept


def test_stage_steps_scale_with_max_steps(tmp_path):
    base = base_recipe()
    recipe = recipe_for(ablation_toy.FULL, tmp_path, max_steps=base["max_steps"] // 2, prompts_per_step=4)
    assert recipe["max_steps"] == base["max_steps"] // 2
    assert recipe["stages"][1]["step"] == round(base["stages"][1]["step"] / 2)
    assert recipe["stages"][0]["step"] == 0
    assert recipe["per_device_train_batch_size"] == 4 * 8


def test_paired_interval_matches_a_t_interval():
    differences = [0.01, 0.03, 0.05]
    interval = ablation_toy.paired_interval(differences)
    stderr = statistics.stdev(differences) / math.sqrt(3)
    assert interval["mean"] == pytest.approx(0.03) and interval["stderr"] == pytest.approx(stderr)
    assert interval["low"] == pytest.approx(0.03 - 4.303 * stderr) and interval["high"] == pytest.approx(0.03 + 4.303 * stderr)
    single = ablation_toy.paired_interval([0.02])
    assert single["mean"] == 0.02 and single["low"] is None
    assert ablation_toy.t_quantile_975(1) == pytest.approx(12.706) and ablation_toy.t_quantile_975(200) == pytest.approx(1.972, abs=0.003)


def test_measurement_error_is_of_per_problem_paired_differences():
    full = {"a": 0.5, "b": 0.25, "c": 1.0, "d": 0.0}
    arm = {"a": 0.75, "b": 0.25, "c": 0.75, "d": 0.25}
    differences = [0.25, 0.0, -0.25, 0.25]
    assert ablation_toy.measurement_stderr(arm, full) == pytest.approx(statistics.stdev(differences) / 2)
    assert ablation_toy.measurement_stderr(full, full) == 0.0


def fake_run(accuracy: float, per_problem: dict) -> dict:
    return {"accuracy": accuracy, "per_problem": per_problem, "generated_tokens": 1000, "informative_fraction_trained": 0.8,
            "informative_fraction_generated": 0.6, "truncated_fraction": 0.01, "train_cpu_seconds": 10.0, "train_seconds": 12.0,
            "training_reward": 0.5, "batch_repair": {"groups": 10, "groups_rescued": 1, "groups_substituted": 2}}  # fmt: skip


def test_compare_arms_pairs_by_seed_and_skips_unpaired_seeds():
    runs = {
        "0": {"polaris": fake_run(0.50, {"p": 0.5, "q": 0.5}), "justrl": fake_run(0.45, {"p": 0.45, "q": 0.45})},
        "1": {"polaris": fake_run(0.60, {"p": 0.6, "q": 0.6}), "justrl": fake_run(0.58, {"p": 0.58, "q": 0.58})},
        "2": {"justrl": fake_run(0.99, {"p": 0.99, "q": 0.99})},  # its full-recipe run is missing: not paired
    }
    table = ablation_toy.compare_arms(runs, ["polaris", "justrl"])
    assert table["justrl"]["seeds"] == ["0", "1"]
    assert table["justrl"]["difference"]["mean"] == pytest.approx(-0.035)
    assert table["justrl"]["accuracy"] == pytest.approx(0.515)
    assert table["polaris"]["difference"] is None
    markdown = ablation_toy.format_table(table, before=0.4)
    assert "| justrl | 0.515 | -0.035 [" in markdown and "0.400" in markdown
    assert "Evaluation standard error of a paired difference: 0.0000" in markdown


def test_resume_skips_finished_runs_with_the_same_settings(tmp_path):
    args = ablation_toy.AblationArguments(output_dir=str(tmp_path), seeds=[0, 1], arms=["polaris", "justrl"])
    settings = ablation_toy.settings_hash(args, [])
    runs = {"0": {"polaris": fake_run(0.5, {"p": 0.5}), "justrl": fake_run(0.4, {"p": 0.4})}, "1": {"polaris": fake_run(0.6, {"p": 0.6})}}
    path = tmp_path / ablation_toy.RESULTS_FILE
    ablation_toy.write_results(path, settings, args, [], runs, ["polaris", "justrl"], 0.3, {"counts": []})
    kept = ablation_toy.load_finished_runs(path, settings)
    assert ablation_toy.pending_runs(kept, [0, 1], ["polaris", "justrl"]) == [(1, "justrl")]
    assert (tmp_path / "ablation_toy.md").is_file() and (tmp_path / "ablation_toy.png").is_file()
    # Other settings (here more steps) make every run pending again.
    other = ablation_toy.settings_hash(ablation_toy.AblationArguments(output_dir=str(tmp_path), max_steps=7), [])
    assert other != settings and ablation_toy.load_finished_runs(path, other) == {}
    # Neither the seeds asked for nor the output directory change the settings.
    assert ablation_toy.settings_hash(ablation_toy.AblationArguments(seeds=[5], output_dir="elsewhere"), []) == settings


def test_bad_arm_is_one_line_exit_2(tmp_path):
    import subprocess

    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ablation_toy.py"), "--arms", "nonsense", "--output_dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown arm(s) nonsense" in result.stderr
