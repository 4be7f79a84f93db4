"""Crash-safe training (checkpoints.py): complete-or-ignored checkpoints, exact resumption, clean interrupts.

The end-to-end tests compare interrupted and resumed runs with one uninterrupted reference run (same seed):
the log of every step (loss, grad norm, rewards, stage, repair counts), the per-prompt ledger, the whole-run
repair counts and the held-out accuracy after training must be equal. The runs are the demo recipe scaled
down to seconds: 4 toy problems, 2 per generation round, `steps_per_generation` 2 (so checkpoints fall
inside generation rounds), 4 steps per epoch (so resumed runs start in later epochs), a stage switch at
step 4 and a checkpoint after every step. The reward is scripted (`scripted_reward`), so groups are mixed,
all-failed, substituted and rescued in every run, on any toy world.
"""

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checkpoints import (
    COMPLETE_MARKER,
    GENERATION_BUFFER,
    RECIPE_STATE_FILE,
    InterruptCallback,
    ResumableRepeatSampler,
    mark_complete,
    newest_complete_checkpoint,
    resolve_resume_checkpoint,
    resume_command,
    rotate_checkpoints,
    unmark,
)
from conftest import ROOT
from data import UserError


MAX_STEPS = 10
# The second stage starts on a condition (two generation rounds with any reward: step 4, before its step 6)
# and drops the prompts solved more than 60% of the time so far (the mastered one; not the forgotten one, solved
# half the time, which is rescued later), so a resume must restore the decision and the refresh.
STAGES = json.dumps([
    {"step": 0, "temperature": 1.0, "max_completion_length": 24},
    {"step": 6, "temperature": 1.2, "max_completion_length": 20, "when": {"metric": "reward", "above": 0.0, "steps": 2}, "refresh_data": True},
])


def scripted_reward(completions, forgotten, mastered, trainer_state=None, **kwargs):
    """A fixed function of the text, the row and the step, whatever the toy model writes. The `forgotten`
    problem is solved by every other rollout in the first stage (steps 0-3) and by none in the second, so
    its groups there are rescued with the completion the ledger kept; the `mastered` one by three rollouts in
    four, so the refresh drops it; the other problems are solved by the rollouts whose text has an even hash."""
    second_stage = trainer_state is not None and trainer_state.global_step >= 4
    rewards = []
    for row, (completion, forget) in enumerate(zip(completions, forgotten, strict=True)):
        text = completion[0]["content"] if isinstance(completion, list) else completion
        if forget:
            rewards.append(0.0 if second_stage else float(row % 2))
        elif mastered[row]:
            rewards.append(float(row % 4 != 0))
        else:
            rewards.append(1.0 if hashlib.sha1(text.encode()).digest()[0] % 2 == 0 else 0.0)
    return rewards


# ----------------------------------------------------------------------------------------------
# Finding, marking and rotating checkpoints
# ----------------------------------------------------------------------------------------------


def fake_checkpoint(run: Path, step: int, complete: bool = True) -> Path:
    path = run / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    if complete:
        mark_complete(path, step)
    return path


def test_newest_complete_checkpoint_skips_incomplete_ones_with_one_warning_each(tmp_path):
    run = tmp_path / "run"
    for step, complete in ((2, True), (10, True), (12, False), (14, False)):
        fake_checkpoint(run, step, complete)
    (run / "checkpoint-last").mkdir()  # not a checkpoint name: ignored
    warnings = []
    assert newest_complete_checkpoint(run, warnings.append) == run / "checkpoint-10"  # 10 after 2: by step, not by name
    assert len(warnings) == 2 and "checkpoint-14" in warnings[0] and "checkpoint-12" in warnings[1]
    assert all("incomplete" in warning for warning in warnings)
    assert json.loads((run / "checkpoint-10" / COMPLETE_MARKER).read_text()) == {"global_step": 10}


def test_resume_argument(tmp_path):
    run = tmp_path / "run"
    fake_checkpoint(run, 3)
    fake_checkpoint(run, 5, complete=False)
    quiet = lambda message: None  # noqa: E731
    for fresh in (None, False, "false", "", "None"):
        assert resolve_resume_checkpoint(fresh, run, quiet) is None
    for newest in (True, "true", "True"):
        assert resolve_resume_checkpoint(newest, run, quiet) == run / "checkpoint-3"
    assert resolve_resume_checkpoint(str(run / "checkpoint-3"), tmp_path / "elsewhere", quiet) == run / "checkpoint-3"
    assert resolve_resume_checkpoint(str(run), tmp_path / "elsewhere", quiet) == run / "checkpoint-3"  # a run directory
    with pytest.raises(UserError, match="no such directory"):
        resolve_resume_checkpoint(str(run / "checkpoint-4"), run, quiet)
    with pytest.raises(UserError, match="not a complete checkpoint"):
        resolve_resume_checkpoint(str(run / "checkpoint-5"), run, quiet)
    with pytest.raises(UserError, match="no complete checkpoint"):
        resolve_resume_checkpoint("true", tmp_path / "empty", quiet)


def test_bad_resume_argument_fails_before_anything_loads(tmp_path):
    from train_grpo import main, parse_args

    for value, message in ((str(tmp_path / "missing"), "no such directory"), ("true", "no complete checkpoint")):
        args = parse_args(["--model_name_or_path", "no-such-model", "--dataset_name", "toy", "--output_dir", str(tmp_path / "o"), "--resume_from_checkpoint", value])
        with pytest.raises(UserError, match=message):
            main(*args)


def test_rotation_deletes_incomplete_then_oldest_complete_and_never_the_new_one(tmp_path):
    run = tmp_path / "run"
    old = fake_checkpoint(run, 2)
    cut = fake_checkpoint(run, 3, complete=False)
    kept = fake_checkpoint(run, 4)
    time.sleep(0.01)
    new = fake_checkpoint(run, 6)
    assert rotate_checkpoints(run, 2, keep=(new,)) == [cut, old]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert rotate_checkpoints(run, 1, keep=(kept, new)) == [] and rotate_checkpoints(run, None) == []
    unmark(new)  # written again: incomplete until marked again
    assert not (new / COMPLETE_MARKER).exists() and newest_complete_checkpoint(run, lambda m: None) == kept


def test_resumable_sampler_draws_the_permutation_of_its_epoch():
    from trl.trainer.utils import RepeatSampler

    settings = dict(data_source=list(range(7)), mini_repeat_count=2, batch_size=3, repeat_count=2, shuffle=True, seed=5)
    trl_sampler = RepeatSampler(**settings)
    uninterrupted = [list(trl_sampler) for _ in range(4)]  # TRL: one generator, iterated epoch after epoch
    assert uninterrupted[0] != uninterrupted[1]
    for epoch in (3, 1, 0, 2):  # a fresh sampler told its epoch, in any order
        sampler = ResumableRepeatSampler(**settings)
        sampler.set_epoch(epoch)
        assert list(sampler) == uninterrupted[epoch]


def test_first_signal_asks_for_a_checkpoint_second_one_acts_at_once():
    from types import SimpleNamespace

    from transformers import TrainerControl

    trainer = SimpleNamespace(accelerator=SimpleNamespace(num_processes=1))
    callback, control = InterruptCallback(trainer), TrainerControl()
    inherited = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    # Python's own Ctrl-C handler, as in a terminal: a shell starting pytest in the background hands it an
    # ignored SIGINT, which the callback rightly restores, and then no second signal would raise.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    callback.on_train_begin(None, None, control)
    try:
        callback.on_step_end(None, SimpleNamespace(global_step=3), control)
        assert not control.should_save and not control.should_training_stop and callback.stopped_by is None
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs between bytecodes
        assert callback.received == signal.SIGINT
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # a second one acts at once
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        callback.on_step_end(None, SimpleNamespace(global_step=4), control)
        assert control.should_save and control.should_training_stop
        assert (callback.stopped_by, callback.stopped_at, callback.exit_code) == (signal.SIGINT, 4, 130)
    finally:
        callback.on_train_end(None, None, control)
        signal.signal(signal.SIGINT, inherited[0])
        signal.signal(signal.SIGTERM, inherited[1])


def test_resume_command_repeats_the_arguments():
    argv = ["train_grpo.py", "--config", "my recipe.yaml", "--resume_from_checkpoint", "old", "--seed=3", "--resume_from_checkpoint=older"]
    assert resume_command("out/checkpoint-7", argv) == "python train_grpo.py --config 'my recipe.yaml' --seed=3 --resume_from_checkpoint out/checkpoint-7"
    assert resume_command("o/checkpoint-1", ["t.py"], default_args=["--config", "d.yaml"], num_processes=2) == (
        "accelerate launch --num_processes 2 t.py --config d.yaml --resume_from_checkpoint o/checkpoint-1"
    )


# ----------------------------------------------------------------------------------------------
# End to end: interrupted and resumed runs against an uninterrupted one
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def problems(toy_world, tmp_path_factory) -> Path:
    rows = [json.loads(line) for line in (toy_world / "train.jsonl").read_text().splitlines()[:4]]
    path = tmp_path_factory.mktemp("resume_data") / "train.jsonl"
    path.write_text("".join(json.dumps({**row, "forgotten": i == 0, "mastered": i == 1}) + "\n" for i, row in enumerate(rows)))
    return path


def training_args(toy_world, problems, output_dir, *extra, per_device_train_batch_size=4) -> list[str]:
    """The demo recipe (toy model, held-out toy problems), scaled down to seconds."""
    return [
        "--config", str(ROOT / "recipes" / "demo.yaml"), "--toy_dir", str(toy_world), "--dataset_name", str(problems),
        "--eval_num_samples", "1", "--eval_max_problems", "8", "--output_dir", str(output_dir),
        "--reward_funcs", "test_resume.scripted_reward", "--seed", "0", "--max_steps", str(MAX_STEPS),
        "--per_device_train_batch_size", str(per_device_train_batch_size), "--gradient_accumulation_steps", "1",
        "--steps_per_generation", "2", "--num_generations", "4", "--stages", STAGES, "--refresh_max_mean_reward", "0.6", "--learning_rate", "1e-3",
        "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "0", "--report_to", "none", *extra,
    ]  # fmt: skip


def environment() -> dict:
    return {
        **os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]),
    }  # fmt: skip


def run_training(args, timeout=600) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "train_grpo.py"), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=environment())


def start_training(command, log: Path) -> subprocess.Popen:
    with open(log, "w") as file:  # a file, not a pipe: a full pipe would block the run
        return subprocess.Popen(command, cwd=ROOT, stdout=file, stderr=subprocess.STDOUT, env=environment())


def wait_for(appeared, process: subprocess.Popen, log: Path, timeout=300):
    deadline = time.time() + timeout
    while not appeared():
        assert process.poll() is None, f"the run ended too early:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"nothing happened in {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.02)


def outcome(output_dir: Path) -> dict:
    """Everything an uninterrupted and a resumed run must agree on (timings left out)."""
    state = json.loads((output_dir / "trainer_state.json").read_text())
    compared = ("loss", "grad_norm", "reward", "reward_std", "rewards/", "schedule/", "repair/", "completions/mean_length", "num_tokens")
    steps = {
        row["step"]: {key: value for key, value in row.items() if key.startswith(compared)}
        for row in state["log_history"]
        if "loss" in row
    }
    summary = json.loads((output_dir / "summary.json").read_text())
    return {
        "global_step": state["global_step"],
        "steps": steps,
        "ledger": json.loads((output_dir / "prompt_ledger.json").read_text()),
        "batch_repair": summary["batch_repair"],
        "accuracy_before": summary["accuracy_before"],
        "accuracy_after": summary["accuracy_after"],
        "stages": summary["stages"],
        "refreshes": summary["refreshes"],
    }


def assert_same_run(resumed: dict, reference: dict):
    assert resumed["global_step"] == reference["global_step"] == MAX_STEPS
    assert sorted(resumed["steps"]) == list(range(1, MAX_STEPS + 1))
    for step, logged in reference["steps"].items():
        assert resumed["steps"][step] == logged, f"step {step} differs"
    assert resumed["ledger"] == reference["ledger"]
    for key in ("batch_repair", "accuracy_before", "accuracy_after", "stages", "refreshes"):
        assert resumed[key] == reference[key], key


@pytest.fixture(scope="module")
def reference(toy_world, problems, tmp_path_factory) -> tuple[Path, dict]:
    output_dir = tmp_path_factory.mktemp("resume_reference") / "run"
    result = run_training(training_args(toy_world, problems, output_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    ran = outcome(output_dir)
    # the run exercises what a resume must restore: both stages, rescues from the kept completions
    assert {logged["schedule/stage"] for logged in ran["steps"].values()} == {1, 2}
    assert ran["stages"][1]["reason"].startswith("reward above 0") and ran["stages"][1]["step"] == 4
    assert ran["refreshes"][0]["dropped"] > 0
    assert ran["batch_repair"]["groups_rescued"] > 0 and ran["batch_repair"]["batches"] == MAX_STEPS // 2
    return output_dir, ran


@pytest.mark.slow
def test_sigkill_after_the_first_checkpoint_then_resume_gives_the_uninterrupted_run(toy_world, problems, reference, tmp_path):
    output_dir = tmp_path / "run"
    args = training_args(toy_world, problems, output_dir, "--save_total_limit", "2")
    log = tmp_path / "killed.log"
    process = start_training([sys.executable, str(ROOT / "train_grpo.py"), *args], log)
    try:
        wait_for((output_dir / "checkpoint-1" / COMPLETE_MARKER).exists, process, log)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (output_dir / "summary.json").exists()  # killed before the end

    result = run_training(args + ["--resume_from_checkpoint", "true"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming from" in result.stdout and "(kept in" in result.stdout  # the first run's measurement is reused
    assert_same_run(outcome(output_dir), reference[1])
    checkpoints = sorted(p.name for p in output_dir.glob("checkpoint-*"))
    assert len(checkpoints) == 2 and all((output_dir / name / COMPLETE_MARKER).exists() for name in checkpoints)


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_at_the_next_step_and_the_printed_command_resumes(toy_world, problems, reference, tmp_path):
    output_dir = tmp_path / "run"
    args = training_args(toy_world, problems, output_dir, "--save_strategy", "no")  # the only checkpoint is the interrupt's
    log = tmp_path / "interrupted.log"
    process = start_training([sys.executable, str(ROOT / "train_grpo.py"), *args], log)
    try:
        wait_for(lambda: re.search(r"^step \d+/\d+ ", log.read_text(), re.M) is not None, process, log)  # the first step is logged
        process.send_signal(signal.SIGINT)
        process.wait(timeout=300)
    finally:
        process.kill()
    output = log.read_text()
    assert process.returncode == 130, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith("interrupted at step")]
    assert len(lines) == 1, output[-3000:]
    step = int(lines[0].split()[3])
    checkpoint = output_dir / f"checkpoint-{step}"
    assert 1 <= step < MAX_STEPS and f"checkpoint saved in {checkpoint};" in lines[0]
    assert (checkpoint / COMPLETE_MARKER).exists() and (checkpoint / RECIPE_STATE_FILE).exists()
    assert [p.name for p in output_dir.glob("checkpoint-*")] == [checkpoint.name]
    assert not (output_dir / "summary.json").exists()  # the run stopped: no final measurement

    command = shlex.split(lines[0].split("resume with: ")[1])
    assert command[0] == "python" and command[-2:] == ["--resume_from_checkpoint", str(checkpoint)]
    result = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600, env=environment())
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming from {checkpoint} (step {step})" in result.stdout
    assert_same_run(outcome(output_dir), reference[1])


@pytest.mark.slow
def test_checkpoint_cut_short_is_skipped_with_a_warning(toy_world, problems, reference, tmp_path):
    """checkpoint-5 is in the second epoch and inside a generation round; checkpoint-6 was cut short."""
    reference_dir, ran = reference
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    for step in (5, 6):
        shutil.copytree(reference_dir / f"checkpoint-{step}", output_dir / f"checkpoint-{step}")
    assert (output_dir / "checkpoint-5" / GENERATION_BUFFER.format(rank=0)).exists()
    cut = output_dir / "checkpoint-6"
    (cut / COMPLETE_MARKER).unlink()
    with open(cut / "optimizer.pt", "r+b") as file:
        file.truncate(100)

    result = run_training(training_args(toy_world, problems, output_dir, "--resume_from_checkpoint", "true"))
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: skipping")]
    assert len(warnings) == 1 and str(cut) in warnings[0] and "incomplete" in warnings[0]
    assert f"Resuming from {output_dir / 'checkpoint-5'} (step 5)" in result.stdout
    assert_same_run(outcome(output_dir), ran)


# ----------------------------------------------------------------------------------------------
# Two processes (accelerate launch on CPU)
# ----------------------------------------------------------------------------------------------


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """local rank -> pid of the processes `accelerate launch` started."""
    workers = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        ranks = [item.split(b"=", 1)[1] for item in environ if item.startswith(b"LOCAL_RANK=")]
        if parent == launcher_pid and ranks:
            workers[int(ranks[0])] = int(entry.name)
    return workers


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the launched processes in /proc")
def test_two_processes_stop_at_the_same_step_when_one_gets_sigterm_and_resume(toy_world, problems, reference, tmp_path):
    """The 8-row generation batch of the reference is split over 2 processes: the same prompts in the same order."""
    from test_multiprocess import launch_two_processes

    output_dir = tmp_path / "run"
    args = training_args(toy_world, problems, output_dir, per_device_train_batch_size=2)
    log = tmp_path / "two.log"
    launcher = start_training([*launch_two_processes(), str(ROOT / "train_grpo.py"), *args], log)
    try:
        wait_for((output_dir / "checkpoint-1" / COMPLETE_MARKER).exists, launcher, log)
        workers = worker_pids(launcher.pid)
        assert sorted(workers) == [0, 1]
        os.kill(workers[1], signal.SIGTERM)  # only one process gets it: both must stop after the same step
        launcher.wait(timeout=300)
    finally:
        launcher.kill()
    output = log.read_text()
    lines = [line for line in output.splitlines() if line.startswith("interrupted at step")]
    assert len(lines) == 1 and "(SIGTERM)" in lines[0] and "resume with: accelerate launch --num_processes 2 " in lines[0], output[-3000:]
    assert "exitcode  : 143" in output
    step = int(lines[0].split()[3])
    checkpoint = output_dir / f"checkpoint-{step}"
    assert (checkpoint / COMPLETE_MARKER).exists() and (checkpoint / "rng_state_0.pth").exists() and (checkpoint / "rng_state_1.pth").exists()
    assert json.loads((checkpoint / RECIPE_STATE_FILE).read_text())["num_processes"] == 2
    assert not (output_dir / f"checkpoint-{step + 1}").exists()

    resumed_log = tmp_path / "resumed.log"
    resumed = start_training([*launch_two_processes(), str(ROOT / "train_grpo.py"), *args, "--resume_from_checkpoint", "true"], resumed_log)
    assert resumed.wait(timeout=600) == 0, resumed_log.read_text()[-3000:]
    ran, one_process = outcome(output_dir), reference[1]
    assert ran["global_step"] == MAX_STEPS and sorted(ran["steps"]) == list(range(1, MAX_STEPS + 1))
    # where one process is expected to agree (each process samples with its own random stream, so texts and
    # rewards differ): the prompts, their order and counts until the refresh (which follows the rewards), the
    # steps at which the stages started, the measurement before training
    assert list(ran["ledger"]["prompts"]) == list(one_process["ledger"]["prompts"])
    boundary = one_process["stages"][1]["step"]
    seen = lambda run: {pid: e["seen"] for pid, e in json.loads((run / f"checkpoint-{boundary}" / "prompt_ledger.json").read_text())["prompts"].items()}  # noqa: E731
    assert seen(output_dir) == seen(reference[0])
    assert [(s["stage"], s["step"]) for s in ran["stages"]] == [(s["stage"], s["step"]) for s in one_process["stages"]]
    assert [r["step"] for r in ran["refreshes"]] == [r["step"] for r in one_process["refreshes"]]
    assert ran["accuracy_before"] == one_process["accuracy_before"]
    assert ran["batch_repair"]["batches"] == one_process["batch_repair"]["batches"]
