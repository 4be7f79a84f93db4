"""batch_repair.py: rollout rescue, informative substitution, dynamic sampling and the per-prompt ledger.

Constructed batches with known rewards check exactly which groups are rescued and substituted; runs of
the trainer on the toy model check that the rows TRL trains on carry their own tokens, old log-probs,
rewards and advantages; a 2-process run checks the cross-process path and the ledger."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from batch_repair import (
    LEDGER_FILE,
    PromptLedger,
    choose_rescues,
    correct_rows,
    enough_informative,
    first_correct_rows,
    informative_groups,
    loss_token_count,
    merge_rows,
    plan_batch,
    row_fields,
    row_sources,
    take_rows,
)
from conftest import ROOT
from data import UserError, build_messages, prompt_id


# ----------------------------------------------------------------------------------------------
# A scripted reward: known rewards per group, whatever the toy model writes
# ----------------------------------------------------------------------------------------------

KEPT = "<think>kept</think>\n\\boxed{7}"  # a correct completion the toy model never writes itself
LEDGER_ENV = "RESCUE_TEST_LEDGER"  # set: read kept completions from this ledger file (multi-process run;
# the run saves a checkpoint every step, which writes the ledger before the next step generates)


def kept_text(pid: str) -> str | None:
    path = os.environ.get(LEDGER_ENV)
    if not path:
        return KEPT
    if not os.path.exists(path):
        return None
    return PromptLedger.load(path).kept_completion(pid)


def scripted_reward(completions, script, prompt_id, trainer_state=None, **kwargs):
    """Per row, by the row's `script` column: `right` 1, `wrong` 0, `mixed` alternating 0/1 along the batch,
    `rescue` 1 only for the prompt's kept completion, `solve_first` alternating at step 0 and then like
    `rescue`. Groups hold an even number of consecutive rows, so `mixed` groups are half right."""
    rewards = []
    for i, (completion, kind, pid) in enumerate(zip(completions, script, prompt_id, strict=True)):
        text = completion[0]["content"] if isinstance(completion, list) else completion
        if kind == "solve_first" and trainer_state is not None and trainer_state.global_step == 0:
            kind = "mixed"
        if kind == "right":
            rewards.append(1.0)
        elif kind == "wrong":
            rewards.append(0.0)
        elif kind == "mixed":
            rewards.append(float(i % 2))
        else:
            rewards.append(1.0 if text == kept_text(pid) else 0.0)
    return rewards


def scripted_rows(scripts: list[str], num_generations: int, tag: str = "") -> list[dict]:
    """Generation-batch rows (each prompt repeated, as TRL's sampler does) for one group per script."""
    rows = []
    for g, script in enumerate(scripts):
        problem = f"What is {g + 2} * {g + 3}?{tag} ({script})"
        row = {"problem": problem, "answer": "7", "prompt_id": prompt_id(problem), "prompt": build_messages(problem), "script": script}
        rows += [dict(row) for _ in range(num_generations)]
    return rows


# ----------------------------------------------------------------------------------------------
# Pure decisions on constructed batches
# ----------------------------------------------------------------------------------------------


def test_informative_and_correct_rows():
    rewards = torch.tensor([0, 0, 0, 0, 1, 0, 1, 0, 1, 1, 1, 1, float("nan"), 0, 0, 0.0])
    assert informative_groups(rewards, 4).tolist() == [False, True, False, False]
    assert correct_rows(torch.tensor([[1.0, 0.0], [0.5, 1.0], [float("nan"), 1.0]])).tolist() == [True, False, False]
    assert first_correct_rows(rewards >= 1, 4) == {1: 4, 2: 8}
    with pytest.raises(ValueError, match="groups of 4"):
        informative_groups(torch.zeros(6), 4)


def test_rescue_replaces_the_last_rollout_of_all_failed_groups_with_a_kept_completion():
    # groups: solved once, all failed with a kept completion, all failed without one, all failed with one
    correct = torch.tensor([0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).bool()
    kept = {"b", "d", "a"}
    rows = choose_rescues(correct, ["a", "b", "c", "d"], 4, kept.__contains__)
    assert rows == [7, 15]  # groups b and d; a is already informative, c has nothing to rescue with


def test_substitution_draws_informative_groups_without_replacement_while_possible():
    informative = [True, False, False, True, False, False, True, False]  # 3 of 8 informative > 1/3
    plan = plan_batch(informative, 1 / 3, random.Random(0))
    targets = [1, 2, 4, 5, 7]
    assert not plan.kept_unchanged and plan.substituted == 5 and plan.informative_after == 8
    assert [plan.group_sources[g] for g in (0, 3, 6)] == [0, 3, 6]  # informative groups stay
    sources = [plan.group_sources[t] for t in targets]
    assert sorted(sources[:3]) == [0, 3, 6]  # every donor once before any is used twice
    assert sorted(sources[3:]) in ([0, 3], [0, 6], [3, 6])  # then a fresh draw, again without replacement
    # the same seed gives the same plan (every process decides alike)
    assert plan_batch(informative, 1 / 3, random.Random(0)).group_sources == plan.group_sources


def test_batches_with_too_few_informative_groups_are_kept_unchanged():
    plan = plan_batch([True, False, False], 1 / 3, random.Random(0))  # exactly a third: POLARIS skips
    assert plan.kept_unchanged and plan.group_sources == [0, 1, 2] and not plan.changes_rows
    assert plan.informative_after == 1
    plan = plan_batch([True, True, False], 1 / 3, random.Random(0))
    assert not plan.kept_unchanged and plan.group_sources[2] in (0, 1)
    assert plan_batch([False, False], 0.0, random.Random(0)).kept_unchanged  # nothing to copy from
    assert plan_batch([True, False], 1 / 3, random.Random(0), substitute=False).group_sources == [0, 1]
    full = plan_batch([True, True], 1 / 3, random.Random(0))
    assert not full.kept_unchanged and full.substituted == 0 and full.informative_after == 2


def test_fresh_groups_fill_first_then_substitution():
    # dynamic sampling found fresh informative groups 4 and 6 (pool ids after the batch's own 0..3)
    plan = plan_batch([False, True, False, False], 1 / 3, random.Random(1), substitute=True, fresh_informative=[4, 6])
    assert plan.group_sources[:3] == [4, 1, 6] and plan.fresh_used == 2
    assert plan.substituted == 1 and plan.group_sources[3] in (4, 1, 6)
    assert enough_informative(2, 4, 1 / 3, substitute=True) and not enough_informative(1, 3, 1 / 3, substitute=True)
    assert not enough_informative(3, 4, 1 / 3, substitute=False) and enough_informative(4, 4, 1 / 3, substitute=False)


PAD = 0


def process_slice(first_token, prompt_lengths, completion_lengths):
    """One process' rows as TRL returns them: row r's tokens are all `first_token + r`, its old log-probs
    the negative, left-padded prompts and right-padded completions of the given lengths."""
    pad, rows = PAD, len(prompt_lengths)
    prompt_width, completion_width = max(prompt_lengths), max(completion_lengths)
    batch = {
        "prompt_ids": torch.full((rows, prompt_width), pad), "prompt_mask": torch.zeros(rows, prompt_width, dtype=torch.long),
        "completion_ids": torch.full((rows, completion_width), pad), "completion_mask": torch.zeros(rows, completion_width, dtype=torch.long),
        "old_per_token_logps": torch.zeros(rows, completion_width),
        "advantages": torch.arange(rows, dtype=torch.float) + first_token, "num_items_in_batch": torch.tensor(0),
    }
    for r, (p, c) in enumerate(zip(prompt_lengths, completion_lengths)):
        batch["prompt_ids"][r, prompt_width - p :] = first_token + r
        batch["prompt_mask"][r, prompt_width - p :] = 1
        batch["completion_ids"][r, :c] = first_token + r
        batch["completion_mask"][r, :c] = 1
        batch["old_per_token_logps"][r, :c] = -(first_token + r)
    return batch


def test_copied_rows_carry_their_own_tokens_logps_and_advantages_across_processes():
    """Two processes' slices of different padding widths, merged as gathering does, then groups copied."""
    pad = PAD

    # 2 processes x 6 rows, groups of 4: group 1 straddles the processes
    process0 = process_slice(100, [2, 3, 2, 2, 3, 3], [4, 1, 2, 3, 2, 2])
    process1 = process_slice(200, [5, 5, 4, 4, 4, 4], [6, 6, 6, 6, 6, 5])
    fields = row_fields(process0, pad)
    assert fields["prompt_ids"] == (True, pad) and fields["completion_mask"] == (False, 0) and fields["advantages"] == (None, 0)
    pool = merge_rows([process0, process1], fields)
    assert pool["prompt_ids"].shape == (12, 5) and pool["completion_ids"].shape == (12, 6)

    sources = row_sources([1, 1, 0], 4)  # group 0 <- copy of group 1 (which straddles), group 2 <- copy of group 0
    assert sources.tolist() == [4, 5, 6, 7, 4, 5, 6, 7, 0, 1, 2, 3]
    for process, expected in ((0, [104, 105, 200, 201, 104, 105]), (1, [200, 201, 100, 101, 102, 103])):
        local = take_rows(pool, sources[process * 6 : (process + 1) * 6])
        tokens = [int(row[mask.bool()][0]) for row, mask in zip(local["completion_ids"], local["completion_mask"])]
        prompt_tokens = [int(row[mask.bool()][0]) for row, mask in zip(local["prompt_ids"], local["prompt_mask"])]
        assert tokens == expected and prompt_tokens == expected  # the prompt travels with its completion
        assert local["advantages"].tolist() == expected  # each row keeps its own advantage
        for row in range(6):
            mask = local["completion_mask"][row].bool()
            assert (local["old_per_token_logps"][row][mask] == -expected[row]).all()
            assert (local["old_per_token_logps"][row][~mask] == 0).all()
        assert loss_token_count(local) == local["completion_mask"].sum()
    assert loss_token_count({**process0, "tool_mask": torch.zeros_like(process0["completion_mask"])}) == 0
    with pytest.raises(ValueError, match="pixel_values"):
        row_fields({**process0, "pixel_values": torch.zeros(6, 3)}, pad)


class ThreadedProcesses:
    """An accelerator per thread whose `gather` and `broadcast` are real collectives over the threads (a
    barrier), so `copy_rows` runs as on several processes; `received_rows` counts the rows process 0 gets."""

    def __init__(self, num_processes):
        import threading

        self.num_processes, self.barrier, self.slots = num_processes, threading.Barrier(num_processes), [None] * num_processes
        self.received_rows = 0

    def gather(self, process, tensor):
        self.slots[process] = tensor
        self.barrier.wait()
        result = torch.cat(self.slots)
        self.barrier.wait()
        return result

    def broadcast(self, process, tensor, from_process):
        if process == from_process:
            self.slots[0] = tensor
        self.barrier.wait()
        if process != from_process:
            tensor.copy_(self.slots[0])
            if process == 0:
                self.received_rows += tensor.shape[0]
        self.barrier.wait()
        return tensor

    def accelerator(self, process):
        group = self

        class Accelerator:
            num_processes, process_index = group.num_processes, process

            def gather(self, tensor):
                return group.gather(process, tensor)

        return Accelerator()

    def run(self, function):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.num_processes) as pool:
            return list(pool.map(lambda p: function(self.accelerator(p), lambda t, source: self.broadcast(p, t, source)), range(self.num_processes)))


def test_copy_rows_moves_only_copied_rows_and_gives_the_whole_batch_gathers_rows():
    """3 processes x 8 rows, groups of 4, two batches (the second: dynamic sampling's fresh groups):
    every process gets exactly the rows the whole-batch gather gave, and only cross-process copies travel."""
    from batch_repair import copy_rows, rows_to_send

    lengths = lambda seed: ([1 + (seed + r) % 4 for r in range(8)], [1 + (seed * 3 + r) % 7 for r in range(8)])  # noqa: E731
    batches = [[process_slice(1000 * b + 100 * p, *lengths(3 * b + p)) for p in range(3)] for b in range(2)]
    fields = row_fields(batches[0][0], PAD)
    whole = merge_rows([merge_rows(batch, fields) for batch in batches], fields)  # what gathering every row gave every process
    # groups: 0-1 on process 0, 2-3 on 1, 4-5 on 2; fresh groups 6-11. Group 0 <- 3, 1 <- 1, 2 <- 9 (fresh, process 1),
    # 3 <- 3, 4 <- 0, 5 <- 11 (fresh, process 2)
    sources = row_sources([3, 1, 9, 3, 0, 11], 4).tolist()
    group = ThreadedProcesses(3)
    copied = group.run(
        lambda accelerator, broadcast: copy_rows(accelerator, [batch[accelerator.process_index] for batch in batches], fields, sources, broadcast)
    )
    for process, rows in enumerate(copied):
        expected = take_rows(whole, torch.tensor(sources[process * 8 : (process + 1) * 8]))
        assert rows.keys() == expected.keys()
        for key in expected:
            assert torch.equal(rows[key], expected[key]), (process, key)
    sends = rows_to_send(sources, 8, 3)
    assert [len(rows) for rows in sends] == [4, 4, 0]  # group 3 (process 1) to process 0; group 0 (process 0) to process 2
    assert sum(len(rows) for rows in sends) < whole["completion_ids"].shape[0]
    # process 0 receives only the 4 rows of group 3 it copies (it sends group 0's rows to process 2), once per
    # field, where the whole-batch gather brought it all 48 rows
    assert group.received_rows == len(fields) * 4


def test_ledger_file_format_and_round_trip(tmp_path):
    import base64
    import zlib

    kept = "<think>1+1=2</think>\n\\boxed{2}"
    ledger = PromptLedger()
    ledger.record("p1", 0.25, kept, step=3)
    ledger.record("p1", 0.0)
    ledger.record("p2", float("nan"))
    path = ledger.save(tmp_path / LEDGER_FILE)
    content = json.loads(path.read_text())
    assert content == {
        "version": 2,
        "prompts": {
            "p1": {"seen": 2, "group_rewards": [0.25, 0.0], "kept_completion_zlib": content["prompts"]["p1"]["kept_completion_zlib"], "kept_step": 3},
            "p2": {"seen": 1, "group_rewards": [None], "kept_completion_zlib": None, "kept_step": None},
        },
    }
    # the completion as the docstring says to read it back
    assert zlib.decompress(base64.b64decode(content["prompts"]["p1"]["kept_completion_zlib"])).decode() == kept
    loaded = PromptLedger.load(path)
    assert loaded.kept_completion("p1") == kept and loaded.kept_completion("p3") is None and not loaded.has_kept("p2")
    assert loaded.digest() == ledger.digest()
    ledger.record("p2", 1.0, "x", step=4)
    assert loaded.digest() != ledger.digest()
    # a version-1 ledger (plain-text completion), as earlier runs wrote it, is still read
    (tmp_path / "v1.json").write_text(json.dumps({"version": 1, "prompts": {
        "p1": {"seen": 2, "group_rewards": [0.25, 0.0], "kept_completion": kept, "kept_step": 3},
        "p2": {"seen": 1, "group_rewards": [None], "kept_completion": None, "kept_step": None},
    }}))  # fmt: skip
    assert PromptLedger.load(tmp_path / "v1.json").digest() == loaded.digest()
    (tmp_path / "bad.json").write_text('{"version": 9}')
    with pytest.raises(UserError, match="version-1 or version-2"):
        PromptLedger.load(tmp_path / "bad.json")


# ----------------------------------------------------------------------------------------------
# The trainer on the toy model, with scripted rewards
# ----------------------------------------------------------------------------------------------


def make_trainer(toy_world, tmp_path, dataset_rows, **overrides):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from train_grpo import PolarisConfig, PolarisGRPOTrainer

    settings = dict(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, steps_per_generation=2, num_generations=4,
        max_completion_length=20, learning_rate=1e-4, report_to="none", logging_steps=1, save_strategy="no", seed=0,
    )
    settings.update(overrides)
    return PolarisGRPOTrainer(
        model=str(toy_world / "model"),
        reward_funcs=[scripted_reward],
        args=PolarisConfig(**settings),
        train_dataset=Dataset.from_list(dataset_rows),
        processing_class=AutoTokenizer.from_pretrained(toy_world / "model"),
    )


def completion_text(trainer, output, row):
    ids = output["completion_ids"][row][output["completion_mask"][row].bool()]
    return trainer.processing_class.decode(ids, skip_special_tokens=True)


def group_of(output, row_slice):
    return {key: output[key][row_slice] for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "old_per_token_logps", "advantages")}


def test_trainer_rescues_and_substitutes_known_groups(toy_world, tmp_path):
    rows = scripted_rows(["rescue", "mixed", "wrong", "right"], 4)  # groups A, B, C, D
    trainer = make_trainer(toy_world, tmp_path, rows)
    ids = [rows[4 * g]["prompt_id"] for g in range(4)]
    trainer.ledger.record(ids[0], 1.0, KEPT, step=0)  # A was solved once before
    trainer.model.train()
    output = trainer._generate_and_score_completions(rows)
    metrics = {k.split("/")[1]: v for k, v in trainer._metrics["train"].items() if k.startswith("repair/")}
    # before: only B informative; A is rescued (2 of 4 > 1/3), so C and D are replaced by A and B
    assert metrics["informative_before"] == [0.25] and metrics["groups_rescued"] == [1.0]
    assert metrics["groups_substituted"] == [2.0] and metrics["informative_after"] == [1.0]
    assert metrics["solve_none"] == [2.0] and metrics["solve_all"] == [1.0] and metrics["batch_kept_unchanged"] == [0.0]

    # TRL scored the rows it trains on: the rescued rollout is the kept one, scored right, and the
    # advantages follow from the final rewards
    assert trainer._batch_rewards[:, 0].tolist() == [0, 0, 0, 1, 0, 1, 0, 1, 0, 0, 0, 0, 1, 1, 1, 1]
    assert completion_text(trainer, output, 3) == KEPT
    assert output["advantages"][:4] == pytest.approx([-0.5, -0.5, -0.5, 1.5], abs=1e-3)
    assert output["advantages"][4:8] == pytest.approx([-0.866, 0.866, -0.866, 0.866], abs=1e-3)

    # C and D now hold whole copies of A and B (one each: without replacement), prompt included
    groups = [group_of(output, slice(4 * g, 4 * g + 4)) for g in range(4)]
    sources = []
    for target in (2, 3):
        match = [s for s in (0, 1) if all(torch.equal(groups[target][k], groups[s][k]) for k in groups[s])]
        assert len(match) == 1, f"group {target} is not a copy of group A or B"
        sources += match
    assert sorted(sources) == [0, 1]
    assert output["num_items_in_batch"] == output["completion_mask"].sum()

    # old log-probs belong to the tokens of each row, rescued and copied rows included
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model,
            torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1),
            torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1),
            output["completion_ids"].shape[1],
        )
    mask = output["completion_mask"].bool()
    assert torch.allclose(logps[mask], output["old_per_token_logps"][mask], atol=1e-4)

    # the ledger records the model's own results (before rescue) and the newest correct completion
    entries, ledger = trainer.ledger.prompts, trainer.ledger
    assert entries[ids[0]]["seen"] == 2 and entries[ids[0]]["group_rewards"] == [1.0, 0.0] and entries[ids[0]]["kept_step"] == 0
    assert ledger.kept_completion(ids[0]) == KEPT
    assert entries[ids[1]]["group_rewards"] == [0.5] and ledger.kept_completion(ids[1]) == completion_text(trainer, output, 5)
    assert entries[ids[2]] == {"seen": 1, "group_rewards": [0.0], "kept_zlib": None, "kept_step": None}
    assert entries[ids[3]]["group_rewards"] == [1.0] and isinstance(ledger.kept_completion(ids[3]), str)


def test_too_few_informative_groups_keep_the_batch_and_dynamic_sampling_fills_it(toy_world, tmp_path):
    rows = scripted_rows(["wrong", "mixed", "wrong", "right"], 4)  # 1 of 4 informative
    trainer = make_trainer(toy_world, tmp_path, rows)
    trainer.model.train()
    output = trainer._generate_and_score_completions(rows)
    metrics = trainer._metrics["train"]
    assert metrics["repair/batch_kept_unchanged"] == [1.0] and metrics["repair/groups_substituted"] == [0.0]
    assert metrics["repair/informative_after"] == [0.25]
    assert output["advantages"][:4].abs().max() == 0 and output["advantages"][4:8].abs().min() > 0

    # with dynamic sampling, fresh prompts (here all of them mixed) replace the zero-variance groups
    fresh_rows = scripted_rows(["mixed"] * 6, 1, tag=" Again.")
    trainer = make_trainer(toy_world, tmp_path, fresh_rows, dynamic_sampling=True)
    trainer.model.train()
    output = trainer._generate_and_score_completions(rows)
    metrics = trainer._metrics["train"]
    assert metrics["repair/fresh_groups"] == [3.0] and metrics["repair/extra_generation_batches"] == [1.0]
    assert metrics["repair/informative_after"] == [1.0] and metrics["repair/groups_substituted"] == [0.0]
    assert metrics["repair/extra_generation_seconds"][0] > 0
    prompts = [trainer.processing_class.decode(output["prompt_ids"][4 * g][output["prompt_mask"][4 * g].bool()]) for g in range(4)]
    assert "Again." not in prompts[1] and all("Again. (mixed)" in p for p in prompts[:1] + prompts[2:])
    assert output["num_items_in_batch"] == output["completion_mask"].sum()
    assert trainer.repair_summary()["extra_generation_batches"] == 1
    assert sum(e["seen"] for e in trainer.ledger.prompts.values()) == 8  # the fresh groups are recorded too


def test_ledger_is_saved_with_checkpoints_and_read_back_on_resume(toy_world, tmp_path):
    rows = scripted_rows(["mixed", "right", "wrong", "mixed"], 1)
    one_generation_per_step = dict(per_device_train_batch_size=16, steps_per_generation=1)
    trainer = make_trainer(toy_world, tmp_path, rows, max_steps=2, save_strategy="steps", save_steps=1, **one_generation_per_step)
    trainer.train()
    run = tmp_path / "run"
    seen = lambda path: sum(e["seen"] for e in json.loads(path.read_text())["prompts"].values())  # noqa: E731
    assert seen(run / "checkpoint-1" / LEDGER_FILE) == 4 and seen(run / "checkpoint-2" / LEDGER_FILE) == 8
    assert seen(run / LEDGER_FILE) == 8

    resumed = make_trainer(toy_world, tmp_path, rows, max_steps=2, output_dir=str(tmp_path / "resumed"), **one_generation_per_step)
    resumed.train(resume_from_checkpoint=str(run / "checkpoint-1"))
    checkpoint = PromptLedger.load(run / "checkpoint-1" / LEDGER_FILE).prompts
    assert sum(e["seen"] for e in resumed.ledger.prompts.values()) == 8  # one step read back, one trained
    for pid, entry in checkpoint.items():
        assert resumed.ledger.prompts[pid]["group_rewards"][: entry["seen"]] == entry["group_rewards"]
        if entry["kept_zlib"] is not None:
            assert resumed.ledger.kept_completion(pid) is not None


def test_bad_repair_settings_are_user_errors():
    from train_grpo import parse_args

    with pytest.raises(UserError, match="min_informative_fraction"):
        parse_args(["--output_dir", "x", "--min_informative_fraction", "1.5"])
    _, config, _ = parse_args(["--output_dir", "x"])
    assert config.rollout_rescue and config.informative_substitution and not config.dynamic_sampling
    assert config.min_informative_fraction == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------------------------
# Two processes
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_process_run_rescues_substitutes_and_keeps_one_ledger(toy_world, tmp_path):
    """3 groups of 8 over 2 processes x 12 rows: the middle group straddles them. Step 0: `solve_first` and
    `mixed` are informative, `right` is replaced. Step 1: `solve_first` fails and is rescued with the
    completion kept at step 0 (possibly from the other process), `right` is replaced again."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"problem": f"Say {s}!", "answer": "7", "script": s}) + "\n" for s in ("right", "solve_first", "mixed")))
    output_dir = tmp_path / "out"
    env = {
        **os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]), LEDGER_ENV: str(output_dir / LEDGER_FILE),
    }
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train_grpo.py"),
        "--model_name_or_path", str(toy_world / "model"), "--dataset_name", str(data), "--output_dir", str(output_dir),
        "--reward_funcs", "test_rescue.scripted_reward", "--max_steps", "2", "--per_device_train_batch_size", "12",
        "--num_generations", "8", "--max_completion_length", "16", "--temperature", "2.0", "--learning_rate", "1e-4",
        "--logging_steps", "1", "--save_steps", "1", "--report_to", "none",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Training problems: 3") == 2  # two processes

    logs = [row for row in json.loads((output_dir / "trainer_state.json").read_text())["log_history"] if "repair/informative_after" in row]
    assert [row["repair/informative_before"] for row in logs] == pytest.approx([2 / 3, 1 / 3])
    assert [row["repair/groups_rescued"] for row in logs] == [0, 1]
    assert [row["repair/groups_substituted"] for row in logs] == [1, 1]
    assert [row["repair/informative_after"] for row in logs] == [1, 1]

    ledger = json.loads((output_dir / LEDGER_FILE).read_text())["prompts"]
    by_problem = {prompt_id(f"Say {s}!"): s for s in ("right", "solve_first", "mixed")}
    assert set(ledger) == set(by_problem)
    scripts = {by_problem[pid]: entry for pid, entry in ledger.items()}
    assert scripts["right"]["group_rewards"] == [1.0, 1.0] and scripts["mixed"]["group_rewards"] == [0.5, 0.5]
    assert scripts["solve_first"]["group_rewards"] == [0.5, 0.0] and scripts["solve_first"]["kept_step"] == 0
    assert all(entry["seen"] == 2 == len(entry["group_rewards"]) for entry in ledger.values())
    assert json.loads((output_dir / "checkpoint-2" / LEDGER_FILE).read_text())["prompts"] == ledger
    first_step = json.loads((output_dir / "checkpoint-1" / LEDGER_FILE).read_text())["prompts"]
    assert all(entry["seen"] == 1 and entry["group_rewards"] == ledger[pid]["group_rewards"][:1] for pid, entry in first_step.items())
    summary = json.loads((output_dir / "summary.json").read_text())["batch_repair"]
    assert summary["informative_fraction_after"] == 1.0 and summary["groups_rescued"] == 1
