"""schedules.py: stage schedules applied inside one training run, and the temperature-sweep logic."""

import json
import math
from types import SimpleNamespace

import pytest

from conftest import ROOT
from data import UserError
from schedules import Stage, StageScheduleCallback, apply_stage, parse_stages
from temperature_sweep import distinct_ngram_ratio, format_sweep_table, parse_sweep_range, recommend_temperature, sweep_row, write_sweep_report


# ----------------------------------------------------------------------------------------------
# Parsing and validation
# ----------------------------------------------------------------------------------------------


def test_the_three_ways_to_write_stages_agree():
    expected = [Stage(0, 1.4, 39936), Stage(300, 1.45, 48128)]
    assert parse_stages("0:1.4:39936,300:1.45:48128") == expected
    assert parse_stages(["0:1.4:39936", "300:1.45:48128"]) == expected
    yaml_list = [{"step": 0, "temperature": 1.4, "max_completion_length": 39936}, {"step": 300, "temperature": 1.45, "max_completion_length": 48128}]
    assert parse_stages(yaml_list) == expected
    assert parse_stages(expected) == expected
    assert parse_stages(None) is None and parse_stages("") is None


@pytest.mark.parametrize(
    "stages, fragment",
    [
        ("0:1.4:100,0:1.5:200", "must increase"),
        ("0:1.4:100,300:1.5:200,200:1.6:300", "must increase"),
        ("0:0:100", "above 0"),
        ("0:-1.0:100", "above 0"),
        ("0:1.0:0", "positive"),
        ("-5:1.0:10", "0 or more"),
        ("0:1.4", "STEP:TEMPERATURE:LENGTH"),
        ("0:warm:100", "not numbers"),
        ("0:1.0:99.5", "whole numbers"),
        ([{"step": 0, "temperature": 1.0}], "lacks max_completion_length"),
        ([{"step": 0, "temperature": 1.0, "max_completion_length": 8, "top_p": 1.0}], "unknown keys top_p"),
        (7, "stages must be"),
    ],
)
def test_bad_stages_are_user_errors(stages, fragment):
    with pytest.raises(UserError, match=fragment):
        parse_stages(stages)


def test_config_takes_stages_from_the_command_line_and_from_a_recipe(tmp_path):
    from train_grpo import parse_args

    _, config, _ = parse_args(["--output_dir", str(tmp_path), "--stages", "0:1.4:39936,300:1.45:48128"])
    assert config.stages == [
        {"step": 0, "temperature": 1.4, "max_completion_length": 39936},
        {"step": 300, "temperature": 1.45, "max_completion_length": 48128},
    ]
    # The first stage is what TRL builds the trainer with (and what the before/after measurement uses).
    assert config.temperature == 1.4 and config.max_completion_length == 39936
    json.loads(config.to_json_string())  # the schedule is saved with the config

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "output_dir: out\ntemperature: 0.9\nmax_completion_length: 64\n"
        "stages:\n  - {step: 10, temperature: 1.1, max_completion_length: 96}\n  - {step: 20, temperature: 1.2, max_completion_length: 128}\n"
    )
    _, config, _ = parse_args(["--config", str(recipe)])
    # A schedule that starts later keeps the configured values until then.
    assert parse_stages(config.stages) == [Stage(0, 0.9, 64), Stage(10, 1.1, 96), Stage(20, 1.2, 128)]
    _, config, _ = parse_args(["--config", str(recipe), "--stages", "0:1.0:32"])
    assert parse_stages(config.stages) == [Stage(0, 1.0, 32)]


def test_config_rejects_schedules_the_trainer_cannot_follow(tmp_path):
    from train_grpo import parse_args

    base = ["--output_dir", str(tmp_path)]
    # Completions generated every 2 steps: a stage starting at step 3 would score old completions at a new temperature.
    with pytest.raises(UserError, match="multiples of 2"):
        parse_args(base + ["--stages", "0:1.0:32,3:1.2:48", "--num_iterations", "2"])
    with pytest.raises(UserError, match="generation_kwargs sets temperature"):
        parse_args(base + ["--stages", "0:1.0:32", "--generation_kwargs", '{"temperature": 0.5}'])
    _, config, _ = parse_args(base + ["--stages", "0:1.0:32,4:1.2:48", "--num_iterations", "2"])
    assert len(config.stages) == 2


def test_bad_stages_on_the_command_line_give_one_line(tmp_path):
    from test_train_cli import assert_one_line_error, run_train_here

    result = run_train_here("--model_name_or_path", "toy", "--dataset_name", "toy", "--stages", "0:1.4:100,0:1.5:200", "--output_dir", str(tmp_path / "o"))
    assert_one_line_error(result, "must increase")


def test_demo_recipe_runs_two_stages():
    from train_grpo import parse_args

    _, config, _ = parse_args([])
    stages = parse_stages(config.stages)
    assert len(stages) == 2 and stages[0].step == 0 and 0 < stages[1].step < config.max_steps
    assert stages[1].temperature != stages[0].temperature
    assert stages[1].max_completion_length > stages[0].max_completion_length


# ----------------------------------------------------------------------------------------------
# Applying stages to the trainer
# ----------------------------------------------------------------------------------------------

OLD, NEW = Stage(0, 0.7, 6), Stage(2, 1.6, 16)  # the toy model's solutions run past 6 tokens, mostly under 16


def _make_trainer(toy_world, tmp_path, use_peft=False, trainer_class=None, max_steps=4):
    from data import load_problems
    from train_grpo import PolarisConfig, PolarisGRPOTrainer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer_class = trainer_class or PolarisGRPOTrainer
    tokenizer = AutoTokenizer.from_pretrained(toy_world / "model")
    model = AutoModelForCausalLM.from_pretrained(toy_world / "model")
    dataset = load_problems(str(toy_world / "train.jsonl")).select(range(16))
    recorded = []

    def length(completions, completion_ids, trainer_state, **kwargs):
        # A reward with spread, so the updates move the model; it also records the generated lengths per step.
        recorded.append((trainer_state.global_step, [len(ids) for ids in completion_ids]))
        return [len(ids) / 16 for ids in completion_ids]

    config = PolarisConfig(
        output_dir=str(tmp_path / "run"), max_steps=max_steps, per_device_train_batch_size=8, num_generations=4,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", seed=0,
        top_k=0, top_p=1.0, stages=f"{OLD.step}:{OLD.temperature}:{OLD.max_completion_length},"
        f"{NEW.step}:{NEW.temperature}:{NEW.max_completion_length}",
    )
    peft_config = None
    if use_peft:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")
    trainer = trainer_class(
        model=model, reward_funcs=[length], args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    return trainer, recorded


def _reference_log_probs(model, input_ids, attention_mask, logits_to_keep, temperature):
    """log_softmax(logits / T) of the next tokens, from the model's plain forward (no fused head)."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logits = logits[:, -logits_to_keep - 1 : -1].float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, -logits_to_keep:, None]).squeeze(-1)


@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "lora"])
def test_stage_boundary_switches_lengths_and_log_prob_temperature(toy_world, tmp_path, use_peft):
    """Across a boundary at step 2: generated lengths obey the new limit and pass the old one, and the
    log-probs the loss uses are log_softmax(logits / T) at the temperature of the step's stage."""
    import torch

    from train_grpo import PolarisGRPOTrainer

    comparisons = []

    class CheckedTrainer(PolarisGRPOTrainer):
        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
            result = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
            mask = attention_mask[:, -logits_to_keep:].bool()
            expected_temperature = NEW.temperature if self.state.global_step >= NEW.step else OLD.temperature
            other_temperature = OLD.temperature if expected_temperature == NEW.temperature else NEW.temperature
            computed = result[0].detach()
            gaps = {}
            for name, temperature in (("expected", expected_temperature), ("other", other_temperature)):
                reference = _reference_log_probs(model, input_ids, attention_mask, logits_to_keep, temperature)
                gaps[name] = (computed - reference)[mask].abs().max().item()
            comparisons.append((self.state.global_step, gaps))
            return result

    trainer, recorded = _make_trainer(toy_world, tmp_path, use_peft=use_peft, trainer_class=CheckedTrainer)
    trainer.train()

    # Generated lengths: every step's completions fit its stage's limit; after the boundary some pass the old one.
    assert sorted({step for step, _ in recorded}) == [0, 1, 2, 3]
    for step, lengths in recorded:
        limit = NEW.max_completion_length if step >= NEW.step else OLD.max_completion_length
        assert max(lengths) <= limit, (step, lengths)
    before = [n for step, lengths in recorded if step < NEW.step for n in lengths]
    after = [n for step, lengths in recorded if step >= NEW.step for n in lengths]
    assert max(before) == OLD.max_completion_length  # the model does not stop that early
    assert max(after) > OLD.max_completion_length

    # Log-probs: equal to the independent computation at the stage's temperature, not at the other one.
    assert sorted({step for step, _ in comparisons}) == [0, 1, 2, 3]
    for step, gaps in comparisons:
        assert gaps["expected"] < 1e-4, (step, gaps)
        assert gaps["other"] > 1e-2, (step, gaps)

    # The trainer's own attributes, the transformers generation settings and the log.
    assert trainer.temperature == NEW.temperature and trainer.max_completion_length == NEW.max_completion_length
    assert trainer.generation_config.temperature == NEW.temperature and trainer.generation_config.max_new_tokens == NEW.max_completion_length
    assert trainer.generation_kwargs["temperature"] == NEW.temperature and trainer.generation_kwargs["max_new_tokens"] == NEW.max_completion_length
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert [row["schedule/stage"] for row in rows] == [1, 1, 2, 2]  # "step" counts completed steps: 1..4
    assert [row["schedule/temperature"] for row in rows] == [OLD.temperature] * 2 + [NEW.temperature] * 2
    assert [row["schedule/max_completion_length"] for row in rows] == [OLD.max_completion_length] * 2 + [NEW.max_completion_length] * 2
    assert torch.isfinite(torch.tensor([row["loss"] for row in rows])).all()


def test_apply_stage_updates_vllm_sampling(toy_world, tmp_path):
    """With vLLM, the generation object's attributes are what its per-call SamplingParams are built from."""
    import inspect

    from trl.generation.vllm_generation import VLLMGeneration

    source = inspect.getsource(VLLMGeneration.generate)
    assert "temperature = self.temperature" in source and "max_completion_length = self.max_completion_length" in source
    trainer, _ = _make_trainer(toy_world, tmp_path, max_steps=1)
    trainer.use_vllm = True  # as if built with vLLM: only the generation object is faked
    trainer.vllm_generation = SimpleNamespace(temperature=OLD.temperature, max_completion_length=OLD.max_completion_length)
    apply_stage(trainer, Stage(7, 1.3, 40))
    assert trainer.vllm_generation.temperature == 1.3 and trainer.vllm_generation.max_completion_length == 40
    assert trainer.current_stage == Stage(7, 1.3, 40)


def test_fused_head_is_found_under_accelerate_autocast_wrapper(toy_world):
    """Mixed precision wraps the model's forward after TRL patched it; the head's temperature is still reachable."""
    import torch
    from accelerate.utils import convert_outputs_to_fp32
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from schedules import fused_head_temperature_cells

    model = AutoModelForCausalLM.from_pretrained(toy_world / "model")
    add_fused_lm_head(model, temperature=0.7)
    # What accelerate.prepare_model does for mixed precision.
    model._original_forward = model.forward
    model.forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=torch.bfloat16, enabled=False)(model.forward.__func__)).__get__(model)
    cells = fused_head_temperature_cells(model)
    assert [cell.cell_contents for cell in cells] == [0.7]
    input_ids = torch.tensor([[5, 6, 7, 8, 9]])
    labels = input_ids.clone()
    before = model(input_ids=input_ids, labels=labels, fused_lm_head=True).log_probs
    cells[0].cell_contents = 1.5
    after = model(input_ids=input_ids, labels=labels, fused_lm_head=True).log_probs
    reference = _reference_log_probs(model, input_ids, torch.ones_like(input_ids), 4, 1.5)
    assert torch.allclose(after[:, -4:], reference, atol=1e-5) and not torch.allclose(before, after)


def test_callback_applies_the_stage_of_a_resumed_step(monkeypatch):
    import schedules

    applied = []
    monkeypatch.setattr(schedules, "apply_stage", lambda trainer, stage: applied.append(stage))
    trainer = SimpleNamespace(accelerator=SimpleNamespace(is_main_process=False))
    stages = [Stage(0, 1.0, 8), Stage(10, 1.2, 16), Stage(20, 1.4, 32)]
    callback = StageScheduleCallback(trainer, stages)
    callback.on_train_begin(None, SimpleNamespace(global_step=15), None)  # resumed from checkpoint-15
    assert applied == [stages[1]] and callback.log_values()["schedule/stage"] == 2
    for step in range(15, 25):  # as the Trainer calls them: begin at `step`, end once it is done
        callback.on_step_begin(None, SimpleNamespace(global_step=step), None)
        assert callback.index == (2 if step >= 20 else 1)
        callback.on_step_end(None, SimpleNamespace(global_step=step + 1), None)
    assert applied == [stages[1], stages[2]]  # each boundary applied once
    assert callback.log_values() == {"schedule/stage": 3, "schedule/temperature": 1.4, "schedule/max_completion_length": 32}


# ----------------------------------------------------------------------------------------------
# Temperature search
# ----------------------------------------------------------------------------------------------


def test_parse_sweep_range():
    assert parse_sweep_range("0.6:1.6:0.1") == [0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6]
    assert parse_sweep_range("1:2:0.25") == [1.0, 1.25, 1.5, 1.75, 2.0]
    assert parse_sweep_range("1.0:1.0:0.1") == [1.0]
    for bad in ["0.6:1.6", "a:b:c", "1.6:0.6:0.1", "0:1:0.1", "0.6:1.6:0"]:
        with pytest.raises(UserError):
            parse_sweep_range(bad)


def test_distinct_ngram_ratio():
    assert distinct_ngram_ratio(["a b c d e"]) == 1.0  # 2 four-grams, both new
    assert distinct_ngram_ratio(["a b c d", "a b c d"]) == 0.5
    assert distinct_ngram_ratio(["a b c d e", "a b c d x", "p q r s"]) == pytest.approx(4 / 5)
    assert distinct_ngram_ratio(["too short", ""]) == 0.0
    assert distinct_ngram_ratio([]) == 0.0
    assert distinct_ngram_ratio(["a b", "a b"], n=2) == 0.5
    assert distinct_ngram_ratio(["12+34=46", "12+34=46"], unit="char") == 0.5


def test_sweep_row_accuracy_stderr_and_diversity():
    row = sweep_row(1.0, [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], [["a b c d"] * 4, ["a b c d e", "f g h i"], ["x"]])
    assert row["temperature"] == 1.0 and row["accuracy"] == pytest.approx(0.5)
    # standard error of the per-problem means 0.5, 1, 0: sample sd 0.5, over sqrt(3)
    assert row["accuracy_stderr"] == pytest.approx(0.5 / math.sqrt(3))
    assert row["diversity"] == pytest.approx((0.25 + 1.0 + 0.0) / 3)


def _rows(temperatures, accuracies, stderrs, diversities):
    return [
        {"temperature": t, "accuracy": a, "accuracy_stderr": s, "diversity": d}
        for t, a, s, d in zip(temperatures, accuracies, stderrs, diversities)
    ]


TEMPERATURES = [0.6, 0.8, 1.0, 1.2, 1.4, 1.6]
DIVERSITIES = [0.30, 0.40, 0.50, 0.60, 0.70, 0.80]


def test_stage_one_rule_is_the_edge_of_the_accuracy_plateau():
    # best 0.50 ± 0.03 at 0.8: 1.0 and 1.2 stay above 0.47, 1.4 falls off.
    rows = _rows(TEMPERATURES, [0.45, 0.50, 0.49, 0.475, 0.40, 0.20], [0.03] * 6, DIVERSITIES)
    assert recommend_temperature(rows) == 1.2
    # A temperature that comes back within reach after a drop is beyond the zone.
    rows = _rows(TEMPERATURES, [0.45, 0.50, 0.49, 0.40, 0.48, 0.20], [0.03] * 6, DIVERSITIES)
    assert recommend_temperature(rows) == 1.0
    # The best is the highest temperature: it is chosen; and the rows' order does not matter.
    rows = _rows(TEMPERATURES, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.01] * 6, DIVERSITIES)
    assert recommend_temperature(list(reversed(rows))) == 1.6
    # With no spread (stderr 0), only ties with the best count.
    rows = _rows(TEMPERATURES, [0.5, 0.6, 0.6, 0.59, 0.3, 0.1], [0.0] * 6, DIVERSITIES)
    assert recommend_temperature(rows) == 1.0


def test_later_stage_rule_reaches_the_target_diversity_never_below_the_current_temperature():
    rows = _rows(TEMPERATURES, [0.5] * 6, [0.02] * 6, DIVERSITIES)
    assert recommend_temperature(rows, target_diversity=0.55) == 1.2
    assert recommend_temperature(rows, target_diversity=0.55, current_temperature=1.4) == 1.4
    assert recommend_temperature(rows, target_diversity=0.35, current_temperature=1.0) == 1.0
    # Nothing reaches the target: the most diverse temperature at or above the current one.
    assert recommend_temperature(rows, target_diversity=0.95, current_temperature=1.0) == 1.6
    assert recommend_temperature(rows, target_diversity=0.95, current_temperature=1.8) == 1.8
    with pytest.raises(UserError):
        recommend_temperature([])


def test_sweep_report_table_json_and_plot(tmp_path):
    rows = _rows(TEMPERATURES, [0.45, 0.50, 0.49, 0.475, 0.40, 0.20], [0.03] * 6, DIVERSITIES)
    recommended = recommend_temperature(rows)
    table = format_sweep_table(rows, recommended)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows) and "temperature" in lines[0]
    marked = [line for line in lines if "recommended" in line]
    assert len(marked) == 1 and marked[0].split()[0] == "1.2"

    json_path, png_path = write_sweep_report(rows, recommended, tmp_path / "sweep")
    report = json.loads(json_path.read_text())
    assert json_path.name == "temperature_sweep.json" and png_path.name == "temperature_sweep.png"
    assert report["recommended_temperature"] == 1.2 and report["temperatures"] == rows and "standard error" in report["rule"]
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png_path.stat().st_size > 5000
