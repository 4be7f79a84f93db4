"""Stages that start on a measured condition, and the in-run data refresh (schedules.py, batch_repair.py)."""

import json
from types import SimpleNamespace

import pytest

from data import UserError
from schedules import Condition, Stage, StageScheduleCallback, parse_stages, stages_as_dicts
from test_rescue import make_trainer, scripted_rows


# ----------------------------------------------------------------------------------------------
# Writing conditions
# ----------------------------------------------------------------------------------------------


def test_conditions_parse_round_trip_and_bad_ones_are_user_errors():
    written = [
        {"step": 0, "temperature": 1.0, "max_completion_length": 64},
        {"step": 300, "temperature": 1.1, "max_completion_length": 96, "when": {"metric": "truncated", "above": 0.1, "steps": 5}, "refresh_data": True},
        {"step": 500, "temperature": 1.2, "max_completion_length": 128, "when": {"metric": "reward", "below": 0.2}},
    ]
    stages = parse_stages(written)
    assert stages[1] == Stage(300, 1.1, 96, Condition("truncated", 0.1, True, 5), True)
    assert stages[2].when == Condition("reward", 0.2, False, 5) and stages[2].when.log_key == "sampled/reward"
    assert parse_stages(stages_as_dicts(stages)) == stages
    assert stages_as_dicts(parse_stages("0:1.0:8"))[0] == {"step": 0, "temperature": 1.0, "max_completion_length": 8}
    bad = {
        "one of above": {"metric": "reward", "above": 0.1, "below": 0.5},
        "unknown keys": {"metric": "reward", "above": 0.1, "window": 3},
        "a number": {"metric": "reward", "above": "high"},
        "at least 1 step": {"metric": "reward", "above": 0.1, "steps": 0},
    }
    for fragment, when in bad.items():
        with pytest.raises(UserError, match=fragment):
            parse_stages([written[0], {**written[1], "when": when}])
    with pytest.raises(UserError, match="first stage starts the run"):
        parse_stages([{**written[0], "refresh_data": True}])


# ----------------------------------------------------------------------------------------------
# The callback: when a condition fires
# ----------------------------------------------------------------------------------------------


def fake_trainer(monkeypatch):
    """A stand-in trainer with TRL's metrics; the stages the callback applies (schedules.apply_stage) are recorded."""
    import schedules

    applied = []
    monkeypatch.setattr(schedules, "apply_stage", lambda trainer, stage: applied.append(stage))
    trainer = SimpleNamespace(accelerator=SimpleNamespace(is_main_process=False), _metrics={"train": {}})
    return trainer, applied


def run_steps(callback, trainer, values, first_step=0, key="completions/clipped_ratio"):
    """Drive the callback as the Trainer does; each step appends its value to the trainer's metrics (a
    log after every second step clears them, as TRL's `log` does). Returns the stage index in force at each step."""
    in_force = []
    for offset, value in enumerate(values):
        step = first_step + offset
        callback.on_step_begin(None, SimpleNamespace(global_step=step), None)
        in_force.append(callback.index)
        trainer._metrics["train"].setdefault(key, []).extend([value, value])  # two generation batches' worth
        callback.on_step_end(None, SimpleNamespace(global_step=step + 1), None)
        if step % 2:
            trainer._metrics["train"].clear()
    return in_force


def test_a_condition_fires_when_it_has_held_over_its_window_and_not_before(monkeypatch):
    stages = [Stage(0, 1.0, 8), Stage(100, 1.2, 16, Condition("truncated", 0.3, True, 3)), Stage(200, 1.4, 32)]
    trainer, applied = fake_trainer(monkeypatch)
    callback = StageScheduleCallback(trainer, stages)
    callback.on_train_begin(None, SimpleNamespace(global_step=0), None)
    in_force = run_steps(callback, trainer, [0.5, 0.5, 0.1, 0.4, 0.5, 0.6, 0.7, 0.0])
    # held at steps 3, 4, 5 (not 0-1: broken at 2): stage 2 from step 6
    assert in_force == [0, 0, 0, 0, 0, 0, 1, 1]
    assert callback.started[1] == {"stage": 1, "step": 6, "reason": "truncated above 0.3 for 3 steps: 0.4, 0.5, 0.6"}
    assert applied == stages[:2]


def test_a_condition_that_never_holds_starts_the_stage_at_its_step(monkeypatch):
    stages = [Stage(0, 1.0, 8), Stage(4, 1.2, 16, Condition("truncated", 0.3, True, 2))]
    trainer, _ = fake_trainer(monkeypatch)
    callback = StageScheduleCallback(trainer, stages)
    callback.on_train_begin(None, SimpleNamespace(global_step=0), None)
    assert run_steps(callback, trainer, [0.0] * 6) == [0, 0, 0, 0, 1, 1]
    assert callback.started[-1]["reason"] == "step 4 (its condition did not hold)"


def test_stages_start_with_a_generation_round(monkeypatch):
    stages = [Stage(0, 1.0, 8), Stage(100, 1.2, 16, Condition("truncated", 0.3, True, 1))]
    trainer, _ = fake_trainer(monkeypatch)
    callback = StageScheduleCallback(trainer, stages, steps_per_round=3)  # completions are sampled every 3 steps
    callback.on_train_begin(None, SimpleNamespace(global_step=0), None)
    assert run_steps(callback, trainer, [0.0, 0.5, 0.5, 0.5, 0.5]) == [0, 0, 0, 1, 1]  # held after step 1, starts at 3


def test_a_resumed_callback_continues_the_window_exactly(monkeypatch):
    stages = [Stage(0, 1.0, 8), Stage(100, 1.2, 16, Condition("truncated", 0.3, True, 3))]
    values = [0.1, 0.5, 0.5, 0.5, 0.2, 0.2]
    trainer, _ = fake_trainer(monkeypatch)
    reference = StageScheduleCallback(trainer, stages)
    reference.on_train_begin(None, SimpleNamespace(global_step=0), None)
    expected = run_steps(reference, trainer, values)

    trainer, _ = fake_trainer(monkeypatch)
    first = StageScheduleCallback(trainer, stages)
    first.on_train_begin(None, SimpleNamespace(global_step=0), None)
    in_force = run_steps(first, trainer, values[:3])
    saved = json.loads(json.dumps(first.state_dict()))  # as recipe_state.json keeps it, mid-window
    trainer, _ = fake_trainer(monkeypatch)
    resumed = StageScheduleCallback(trainer, stages)
    resumed.load_state_dict(saved)
    resumed.on_train_begin(None, SimpleNamespace(global_step=3), None)
    in_force += run_steps(resumed, trainer, values[3:], first_step=3)
    assert in_force == expected == [0, 0, 0, 0, 1, 1]
    assert resumed.started == reference.started


# ----------------------------------------------------------------------------------------------
# In a run: refresh drops mastered prompts, exactly on resume
# ----------------------------------------------------------------------------------------------

SCRIPTS = ["mixed", "right", "mixed", "wrong", "mixed", "right", "mixed", "wrong"]
REFRESH_STAGES = [
    {"step": 0, "temperature": 1.0, "max_completion_length": 8},
    {"step": 50, "temperature": 1.2, "max_completion_length": 10, "when": {"metric": "all_correct", "above": 0.1, "steps": 1}, "refresh_data": True},
]


def refresh_run(toy_world, tmp_path, name, **overrides):
    rows = scripted_rows(SCRIPTS, 1)
    settings = dict(
        output_dir=str(tmp_path / name), max_steps=5, per_device_train_batch_size=16, steps_per_generation=None,
        num_generations=4, stages=REFRESH_STAGES, save_strategy="steps", save_steps=1,
    )
    settings.update(overrides)
    return make_trainer(toy_world, tmp_path, rows, **settings), {row["prompt_id"]: row["script"] for row in rows}


def test_refresh_drops_mastered_prompts_and_a_resumed_run_follows_the_same_stages(toy_world, tmp_path):
    trainer, scripts = refresh_run(toy_world, tmp_path, "run")
    trainer.train()
    starts = trainer.stage_starts()
    assert len(starts) == 2 and starts[1]["reason"].startswith("all_correct above 0.1 for 1 steps")
    boundary = starts[1]["step"]
    assert 0 < boundary < 5
    refresh = trainer.refreshes[0]
    right = {pid for pid, script in scripts.items() if script == "right"}
    seen_right = {pid for pid in right if pid in trainer.ledger.prompts}
    assert refresh["step"] == boundary and refresh["dropped"] == len(seen_right) > 0
    assert trainer.dropped_prompt_ids == seen_right
    # after the boundary no dropped prompt is trained on again: their groups were all recorded before it
    for pid in seen_right:
        assert trainer.ledger.prompts[pid]["seen"] == len(trainer.ledger.prompts[pid]["group_rewards"])
    seen_before = json.loads((tmp_path / "run" / f"checkpoint-{boundary}" / "prompt_ledger.json").read_text())["prompts"]
    assert all(trainer.ledger.prompts[pid]["seen"] == seen_before[pid]["seen"] for pid in seen_right)
    assert sum(e["seen"] for e in trainer.ledger.prompts.values()) == 5 * 4  # every step still trains 4 groups
    log = [row for row in trainer.state.log_history if "schedule/stage" in row]
    assert [row["schedule/stage"] for row in log] == [1] * boundary + [2] * (5 - boundary)

    resumed, _ = refresh_run(toy_world, tmp_path, "resumed", output_dir=str(tmp_path / "resumed"))
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / f"checkpoint-{boundary - 1 if boundary > 1 else boundary}"))
    assert resumed.stage_starts()[1:] == starts[1:]
    assert resumed.dropped_prompt_ids == trainer.dropped_prompt_ids
    assert resumed.ledger.prompts == trainer.ledger.prompts


def test_a_stage_chooses_its_temperature_in_the_run_by_the_sweep_rule(toy_world, tmp_path, monkeypatch):
    import generation
    from rewards import verify
    from schedules import probe_problems
    from temperature_sweep import recommend_temperature, sweep_row

    sampled, original = {}, generation.sample_completions

    def recorded(*args, temperature, **kwargs):
        sampled[temperature] = original(*args, temperature=temperature, **kwargs)
        return sampled[temperature]

    monkeypatch.setattr(generation, "sample_completions", recorded)

    stages = [
        {"step": 0, "temperature": 0.8, "max_completion_length": 8},
        {"step": 2, "temperature": 1.0, "max_completion_length": 10, "search_temperatures": [0.8, 1.2, 1.6, 2.0]},
    ]
    trainer, _ = refresh_run(
        toy_world, tmp_path, "search", max_steps=3, stages=stages, save_strategy="no",
        temperature_search_problems=4, temperature_search_samples=3, temperature_search_ngram_unit="char",
    )
    trainer.train()
    record = trainer.stage_schedule.started[1]
    rows = record["search"]
    assert [row["temperature"] for row in rows] == [0.8, 1.2, 1.6, 2.0]
    assert record["target_diversity"] is not None  # measured at the first stage's temperature when the run began
    assert record["temperature"] == recommend_temperature(rows, record["target_diversity"], 0.8)
    report = json.loads((tmp_path / "search" / "stage2_temperature_search" / "temperature_sweep.json").read_text())
    assert report["recommended_temperature"] == record["temperature"] and report["temperatures"] == rows
    assert (tmp_path / "search" / "stage2_temperature_search" / "temperature_sweep.png").is_file()
    assert trainer.temperature == record["temperature"] == trainer.state.log_history[2]["schedule/temperature"]
    # the rows are what the offline sweep computes from the same samples
    _, answers = probe_problems(trainer)
    for row in rows:
        groups = sampled[row["temperature"]]
        scores = [[float(verify(sample.text, answer)) for sample in group] for group, answer in zip(groups, answers)]
        assert row == sweep_row(row["temperature"], scores, [[sample.text for sample in group] for group in groups], unit="char")
