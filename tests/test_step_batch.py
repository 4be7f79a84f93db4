"""step_batch.py and the step-wide repair: every recipe repairs over the prompts of an optimizer step, the
rollouts are sampled in chunks, the loss is the token-mean over the step however it is cut into
micro-batches, dynamic sampling draws new prompts every round, what was trained is logged."""

import hashlib
import json

import pytest
import torch

from batch_repair import rescued_row_ratios
from conftest import ROOT
from data import UserError
from test_rescue import scripted_reward, scripted_rows


RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
CONSUMER_RECIPES = [r for r in RECIPES if r.name not in {"demo.yaml", "polaris-4b.yaml", "polaris-7b.yaml"}]


# ----------------------------------------------------------------------------------------------
# Geometry: what one generation batch holds
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_recipe_repairs_over_the_prompts_of_an_optimizer_step(recipe):
    import memory_planner
    from step_batch import repair_groups
    from train_grpo import parse_args

    script_args, config, model_args = parse_args(["--config", str(recipe)])
    prompts_per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps // config.num_generations
    assert repair_groups(config) == prompts_per_step  # one process; N processes multiply both
    assert config.steps_per_generation == config.gradient_accumulation_steps
    if recipe in CONSUMER_RECIPES:
        # `auto`: as many sequences at once as the GPU holds (tests/test_fast_sampling.py); the planner holds the step's 64
        assert prompts_per_step == 8 and config.generation_chunk_size == "auto"
        setup = memory_planner.setup_from_args(script_args, config, model_args)
        assert setup.step_rollouts == 64
        assert "repaired\n#   together (all 8 groups)" in recipe.read_text()


def test_steps_per_generation_below_the_step_becomes_the_chunk_size():
    from train_grpo import parse_args

    _, config, _ = parse_args(["--output_dir", "x", "--per_device_train_batch_size", "2", "--steps_per_generation", "4",
                               "--gradient_accumulation_steps", "32", "--num_generations", "8"])
    assert config.generation_chunk_size == 8 and config.steps_per_generation == 32 and config.generation_batch_size == 64
    assert "sampling 8 sequences at a time" in config.geometry_notes[0]


def test_too_few_groups_for_repair_is_one_line_and_bad_geometry_is_refused():
    from train_grpo import parse_args

    _, config, _ = parse_args(["--output_dir", "x", "--per_device_train_batch_size", "8", "--num_generations", "8"])
    [note] = config.geometry_notes
    assert "batch repair sees 1 group(s)" in note and "--gradient_accumulation_steps" in note
    _, config, _ = parse_args(["--output_dir", "x", "--per_device_train_batch_size", "8", "--num_generations", "8", "--informative_substitution", "false"])
    assert config.geometry_notes == []
    with pytest.raises(UserError, match="generation_chunk_size"):
        parse_args(["--output_dir", "x", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "4",
                    "--generation_batch_size", "8", "--num_generations", "4"])
    with pytest.raises(UserError, match="multiple of gradient_accumulation_steps"):
        parse_args(["--output_dir", "x", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
                    "--steps_per_generation", "3", "--num_generations", "4"])
    with pytest.raises(UserError, match="generation_chunk_size"):
        parse_args(["--output_dir", "x", "--generation_chunk_size", "0"])


def test_importance_sampling_is_off_by_default_and_rescued_rows_take_their_groups_ratio():
    from train_grpo import parse_args

    _, config, _ = parse_args(["--output_dir", "x"])
    assert config.vllm_importance_sampling_correction is False
    # per sequence: rows 0-3 one group, row 3 rescued; rows 4-7 all rescued but row 4
    sums = torch.tensor([0.5, 1.0, 0.0, 1.0, 0.8, 1.0, 1.0, 1.0])
    counts = torch.ones(8)
    assert rescued_row_ratios(sums, counts, [3, 5, 6, 7], 4) == pytest.approx({3: 0.5, 5: 0.8, 6: 0.8, 7: 0.8})
    # per token: the group's token-weighted mean ratio
    sums, counts = torch.tensor([1.8, 3.0, 0.0, 9.0]), torch.tensor([2.0, 4.0, 0.0, 9.0])
    assert rescued_row_ratios(sums, counts, [2], 4) == pytest.approx({2: (1.8 + 3.0 + 9.0) / 15})
    assert rescued_row_ratios(sums, counts, [0, 1, 2, 3], 4) == {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}


# ----------------------------------------------------------------------------------------------
# The loss: token-mean over the optimizer step, however it is chunked
# ----------------------------------------------------------------------------------------------

SCRIPT_TEXT = "<think>so the answer is</think> \\boxed{7}"


def scripted_generation(calls):
    """A stand-in for TRL's sampler: rollout j of a prompt is a fixed slice of SCRIPT_TEXT's tokens whose
    length depends on the prompt and j, so every chunking trains on the same completions. Records the
    number of sequences of each call."""

    def generate(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        calls.append(len(prompt_ids))
        tokens = self.processing_class.encode(SCRIPT_TEXT, add_special_tokens=False)
        completions = []
        for row, ids in enumerate(prompt_ids):
            digest = hashlib.sha1(json.dumps(list(ids)).encode()).digest()[0]
            length = 2 + (digest + 5 * (row % num_generations)) % (len(tokens) - 2)
            completions.append(tokens[:length] + [self.processing_class.eos_token_id])
        return completions, None

    return generate


def length_reward(completions, **kwargs):
    """Mixed groups from the completions alone: right when the text has an even length."""
    return [float(len(c[0]["content"] if isinstance(c, list) else c) % 2 == 0) for c in completions]


class GradientRecorder:
    """A callback keeping the gradients of the first optimizer step, as the optimizer would see them."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Recorder(TrainerCallback):
            gradients = None

            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                if self.gradients is None:
                    self.gradients = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

        return Recorder()


def first_step_gradients(toy_world, tmp_path, monkeypatch, name, polaris=True, **geometry):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from data import build_messages
    from train_grpo import PolarisConfig, PolarisGRPOTrainer

    calls = []
    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", scripted_generation(calls))
    rows = [{"prompt": build_messages(f"What is {i} + {i + 1}?"), "answer": "7"} for i in range(4)]
    settings = dict(
        output_dir=str(tmp_path / name), num_generations=4, max_completion_length=32, learning_rate=1e-3, max_steps=1,
        report_to="none", logging_steps=1, save_strategy="no", seed=0, max_grad_norm=0.0, use_cpu=True, bf16=False,
        **geometry,
    )
    config = PolarisConfig(**settings) if polaris else GRPOConfig(**settings)
    recorder = GradientRecorder()
    trainer = (PolarisGRPOTrainer if polaris else GRPOTrainer)(
        model=str(toy_world / "model"), reward_funcs=[length_reward], args=config,
        train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(toy_world / "model"),
        callbacks=[recorder],
    )
    trainer.train()
    return recorder.gradients, calls, trainer.state.log_history[0]


def test_the_accumulated_gradient_is_the_one_big_batch_gradient(toy_world, tmp_path, monkeypatch, capsys):
    reference, calls, log = first_step_gradients(toy_world, tmp_path, monkeypatch, "big", per_device_train_batch_size=16)
    assert calls == [16] and 0 < log["trained/frac_reward_zero_std"] + log["repair/informative_before"]
    chunkings = {  # name: (geometry, sequences per sampling call)
        "2x8-4-at-a-time": (dict(per_device_train_batch_size=2, gradient_accumulation_steps=8, steps_per_generation=2), [4] * 4),
        "4x4-8-at-a-time": (dict(per_device_train_batch_size=4, gradient_accumulation_steps=4, generation_chunk_size=8), [8] * 2),
    }
    for name, (geometry, expected_calls) in chunkings.items():
        gradients, calls, _ = first_step_gradients(toy_world, tmp_path, monkeypatch, name, **geometry)
        assert calls == expected_calls
        if "steps_per_generation" in geometry:  # said once, when the trainer is built
            assert capsys.readouterr().err.count("note: sampling 4 sequences at a time") == 1
        for key, value in reference.items():
            assert torch.allclose(gradients[key], value, rtol=1e-4, atol=1e-7), f"{name}: {key} differs"

    # TRL on its own, two generation batches per step: a mean of two token-means, not the step's token-mean
    control, _, _ = first_step_gradients(
        toy_world, tmp_path, monkeypatch, "trl", polaris=False,
        per_device_train_batch_size=2, gradient_accumulation_steps=8, steps_per_generation=4,
    )
    assert not all(torch.allclose(control[key], value, rtol=1e-3, atol=1e-6) for key, value in reference.items())


# ----------------------------------------------------------------------------------------------
# Each consumer recipe's batch geometry on the toy model
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", CONSUMER_RECIPES, ids=[r.name for r in CONSUMER_RECIPES])
def test_consumer_geometry_substitutes_within_the_step(recipe, toy_world, tmp_path, monkeypatch):
    """The recipe's per-device batch, accumulation, chunk size and rollouts, on the toy model with short
    completions: 8 prompts, 4 of them mixed, 2 always right, 2 always wrong. One generation batch of 64 is
    sampled (`generation_chunk_size: auto`, with no GPU to plan for: all at once), and the 4 zero-variance groups
    are replaced by copies of mixed ones."""
    import yaml
    from trl import GRPOTrainer

    from test_rescue import make_trainer

    recipe_args = yaml.safe_load(recipe.read_text())
    geometry = {key: recipe_args[key] for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "generation_chunk_size", "num_generations")}
    calls, original = [], GRPOTrainer._generate_single_turn

    def counted(self, prompt_ids, *args, **kwargs):
        calls.append(len(prompt_ids))
        return original(self, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", counted)
    rows = scripted_rows(["mixed", "right", "mixed", "wrong", "mixed", "right", "mixed", "wrong"], 1)
    trainer = make_trainer(toy_world, tmp_path, rows, max_steps=1, max_completion_length=8, steps_per_generation=None, **geometry)
    trainer.train()
    log = trainer.state.log_history[0]
    assert calls == [64]
    assert log["repair/informative_before"] == 0.5 and log["repair/groups_substituted"] == 4
    assert log["repair/informative_after"] == 1 and log["trained/frac_reward_zero_std"] == 0
    assert log["frac_reward_zero_std"] == 0.5  # TRL's, of the batch before the repair
    assert log["sampled/reward"] == pytest.approx(0.5) and 0 < log["trained/reward"] < 1
    assert 0 < log["trained/completions/mean_length"] <= log["trained/completions/max_length"] <= 8


# ----------------------------------------------------------------------------------------------
# Dynamic sampling: new prompts every generation round
# ----------------------------------------------------------------------------------------------


def test_dynamic_sampling_draws_different_prompts_in_every_round(toy_world, tmp_path):
    from test_rescue import make_trainer

    rows = scripted_rows(["wrong"] * 40, 1)
    trainer = make_trainer(toy_world, tmp_path, rows, dynamic_sampling=True, num_generations=4, per_device_train_batch_size=8)
    drawn = []
    for micro_step in (0, 2, 4):  # three generation rounds of the same optimizer step
        trainer._step = micro_step
        drawn.append(tuple(row["problem"] for row in trainer._fresh_inputs(8, attempt=1)))
    assert len(set(drawn)) == 3
    trainer._step = 2
    assert tuple(row["problem"] for row in trainer._fresh_inputs(8, attempt=1)) == drawn[1]  # a resumed run draws the same
