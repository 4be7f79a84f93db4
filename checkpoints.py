"""Crash-safe training: checkpoints that are complete or ignored, exact resumption, a clean stop on Ctrl-C.

    python train_grpo.py --config RECIPE --resume_from_checkpoint true     # the newest complete checkpoint of --output_dir
    python train_grpo.py --config RECIPE --resume_from_checkpoint outputs/run/checkpoint-200

Complete checkpoints. transformers writes a checkpoint file by file (weights, optimizer, scheduler, RNG
states, trainer_state.json) and the recipe adds its own files; a kill in between leaves a directory that
looks like a checkpoint and is not one. Here, once every process has written its part, the main process
flushes the files to disk and writes `checkpoint_complete.json` (`{"global_step": N}`) last, atomically.
Only directories holding it count: resuming skips the others with a warning, and `save_total_limit`
rotation runs after the marker is written (deleting incomplete directories first), so a kill at any moment
leaves the previous complete checkpoint in place. A checkpoint directory that is written again (a run
resumed from an earlier step) loses its marker before the first new file is written.

Exact resumption. transformers and TRL restore weights, optimizer, scheduler, RNG states and skip the
batches already trained on. What the recipe adds is restored too:
- the prompt ledger with the rescue buffer and the whole-run repair counts (batch_repair.py);
- the stage of the schedule, which follows from the step (schedules.py applies it when training starts);
- TRL's generation counter and, when a checkpoint falls inside a generation round (`steps_per_generation`
  above `gradient_accumulation_steps`), the generated batch still being trained on (`generation_buffer-<rank>.pt`),
  which a resumed run would otherwise sample again;
- the data order of later epochs: TRL's `RepeatSampler` draws each epoch's permutation from one generator,
  which a resumed run restarts at epoch 0; `ResumableRepeatSampler` draws the permutation of the epoch it is in.
`recipe_state.json` holds the counters and whatever the training script records (`run_record`). A resumed run
with the same settings takes the same steps as an uninterrupted one: same batches, completions, rewards,
stages and ledger (tests/test_resume.py).

Interrupts. The first SIGINT (Ctrl-C) or SIGTERM lets the current optimizer step finish, saves a checkpoint
and stops training (`InterruptCallback`); train_grpo.py then prints how to resume and exits with 130 (SIGINT)
or 143 (SIGTERM), the codes a shell gives a process the signal ended. A second signal acts at once (the
default handlers are back). With several processes every process takes the decision at the same step (the
flags are gathered after each step), so a signal that reaches only one of them stops all of them cleanly.
"""

import json
import os
import pickle
import shlex
import shutil
import signal
import sys
import threading
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer import TRAINING_ARGS_NAME
from trl.trainer.utils import RepeatSampler

from data import UserError


CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = "checkpoint_complete.json"
RECIPE_STATE_FILE = "recipe_state.json"
RECIPE_STATE_VERSION = 1
GENERATION_BUFFER = "generation_buffer-{rank}.pt"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
TRUE_WORDS = ("true", "yes", "1", "last", "latest")
FALSE_WORDS = ("", "false", "no", "0", "none")


# ----------------------------------------------------------------------------------------------
# Finding complete checkpoints
# ----------------------------------------------------------------------------------------------


def checkpoint_step(path) -> int | None:
    """N for a directory named checkpoint-N, else None."""
    name = Path(path).name
    suffix = name[len(CHECKPOINT_PREFIX) :]
    return int(suffix) if name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def list_checkpoints(output_dir) -> list[Path]:
    """The checkpoint-N directories of `output_dir`, oldest step first."""
    directory = Path(output_dir)
    if not directory.is_dir():
        return []
    found = [path for path in directory.iterdir() if path.is_dir() and checkpoint_step(path) is not None]
    return sorted(found, key=checkpoint_step)


def is_complete(checkpoint) -> bool:
    return (Path(checkpoint) / COMPLETE_MARKER).is_file()


def print_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def newest_complete_checkpoint(output_dir, warn=print_warning) -> Path | None:
    """The complete checkpoint with the highest step; `warn` is called once for each newer incomplete one skipped."""
    for checkpoint in reversed(list_checkpoints(output_dir)):
        if is_complete(checkpoint):
            return checkpoint
        warn(f"skipping {checkpoint}: incomplete (no {COMPLETE_MARKER}: it was cut short while being written)")
    return None


def resolve_resume_checkpoint(value, output_dir, warn=print_warning) -> Path | None:
    """The checkpoint `--resume_from_checkpoint` means, or None for a fresh start.

    `value`: None/false (fresh start); true (the newest complete checkpoint of `output_dir`); a checkpoint-N
    directory (which must be complete); or a run directory (its newest complete checkpoint). Anything
    else is a `UserError`."""
    if value is None or value is False:
        return None
    text = str(value).strip()
    if text.lower() in FALSE_WORDS:
        return None
    if value is True or text.lower() in TRUE_WORDS:
        found = newest_complete_checkpoint(output_dir, warn)
        if found is None:
            raise UserError(
                f"--resume_from_checkpoint true: no complete checkpoint in {output_dir} (a checkpoint-N directory holding "
                f"{COMPLETE_MARKER}): check --output_dir, give a checkpoint directory, or start without --resume_from_checkpoint"
            )
        return found
    path = Path(text)
    if not path.is_dir():
        raise UserError(f"--resume_from_checkpoint {text}: no such directory (give a checkpoint-N directory, or `true` for the newest in --output_dir)")
    if is_complete(path):
        return path
    if checkpoint_step(path) is None and list_checkpoints(path):
        found = newest_complete_checkpoint(path, warn)
        if found is not None:
            return found
        raise UserError(f"--resume_from_checkpoint {text}: none of its checkpoints is complete (no {COMPLETE_MARKER} in any): start without --resume_from_checkpoint")
    raise UserError(
        f"--resume_from_checkpoint {text}: not a complete checkpoint (no {COMPLETE_MARKER}: cut short while being written, "
        "or not a checkpoint): give an earlier checkpoint, or `true` for the newest complete one"
    )


def read_recipe_state(checkpoint) -> dict:
    """`recipe_state.json` of a checkpoint ({} when it has none)."""
    path = Path(checkpoint) / RECIPE_STATE_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON ({error}): resume from another checkpoint") from error


# ----------------------------------------------------------------------------------------------
# Writing checkpoints
# ----------------------------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some systems
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def mark_complete(checkpoint, global_step: int) -> Path:
    """Flush every file of `checkpoint` to disk, then write the marker (atomically: a renamed temporary file)."""
    checkpoint = Path(checkpoint)
    for path in sorted(checkpoint.rglob("*")):
        if path.is_file():
            _fsync(path)
    marker = checkpoint / COMPLETE_MARKER
    temporary = checkpoint / f".{COMPLETE_MARKER}.tmp"
    with open(temporary, "w") as file:
        file.write(json.dumps({"global_step": global_step}))
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, marker)
    _fsync(checkpoint)
    return marker


def unmark(checkpoint) -> None:
    """A checkpoint about to be written again is incomplete until it is marked again."""
    marker = Path(checkpoint) / COMPLETE_MARKER
    if marker.is_file():
        marker.unlink()
        _fsync(Path(checkpoint))


def rotate_checkpoints(output_dir, save_total_limit: int | None, keep=()) -> list[Path]:
    """Delete checkpoints beyond `save_total_limit`: incomplete ones first, then the complete ones completed
    longest ago; never those in `keep` (the new checkpoint, the best one). Returns the deleted directories."""
    if not save_total_limit or save_total_limit <= 0:
        return []
    keep = {Path(path).resolve() for path in keep if path}
    checkpoints = list_checkpoints(output_dir)
    incomplete = [path for path in checkpoints if not is_complete(path)]
    complete = sorted((path for path in checkpoints if is_complete(path)), key=lambda path: (path / COMPLETE_MARKER).stat().st_mtime)
    deleted, remaining = [], len(checkpoints)
    for path in incomplete + complete:
        if remaining <= save_total_limit:
            break
        if path.resolve() in keep:
            continue
        unmark(path)  # first: a kill in the middle of the deletion must not leave a "complete" remainder
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(path)
        remaining -= 1
    return deleted


# ----------------------------------------------------------------------------------------------
# The data order
# ----------------------------------------------------------------------------------------------


class ResumableRepeatSampler(RepeatSampler):
    """TRL's `RepeatSampler` whose permutation depends on the epoch it is told (`set_epoch`), not on how many
    times it was iterated: epoch e gets the (e+1)-th permutation of the seeded generator, as in an uninterrupted
    run, also when a resumed run starts in epoch e."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle and self.seed is not None:
            self.generator.manual_seed(self.seed)
            for _ in range(self.epoch):  # the permutations of the epochs before
                torch.randperm(self.num_samples, generator=self.generator)
        yield from super().__iter__()


# ----------------------------------------------------------------------------------------------
# Interrupts
# ----------------------------------------------------------------------------------------------


class InterruptCallback(TrainerCallback):
    """The first SIGINT or SIGTERM during `train()`: finish the optimizer step, save a checkpoint, stop.

    The handler only records the signal and puts the previous handlers back, so a second signal acts at
    once (KeyboardInterrupt for SIGINT, termination for SIGTERM). After each step the processes gather
    their flags, so all of them stop after the same step. `stopped_by` (signal number) and `stopped_at`
    (global step) say what happened; `exit_code` is 128 + the signal number."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.received = None
        self.stopped_by = None
        self.stopped_at = None
        self._previous = {}

    @property
    def exit_code(self) -> int | None:
        return 128 + self.stopped_by if self.stopped_by else None

    def on_train_begin(self, args, state, control, **kwargs):
        self.received = self.stopped_by = self.stopped_at = None
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)

    def on_train_end(self, args, state, control, **kwargs):
        self._restore()

    def _restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum, frame):
        self.received = signum
        self._restore()
        name = signal.Signals(signum).name
        again = "Ctrl-C" if signum == signal.SIGINT else name
        # os.write, not print: the signal may arrive in the middle of another write to the same stream
        os.write(2, f"\n{name}: saving a checkpoint after this step, then stopping ({again} again to stop at once)\n".encode())

    def _agreed_signal(self) -> int:
        accelerator = self.trainer.accelerator
        local = int(self.received or 0)
        if accelerator.num_processes == 1:
            return local
        flags = accelerator.gather(torch.tensor([local], device=accelerator.device))
        return int(flags.max())

    def on_step_end(self, args, state, control, **kwargs):
        signum = self._agreed_signal()
        if signum:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_by, self.stopped_at = signum, state.global_step


def resume_command(checkpoint, argv: list[str] | None = None, default_args: list[str] = (), num_processes: int = 1) -> str:
    """The command line that resumes this run from `checkpoint`: the same arguments (or `default_args` when there
    were none), without any earlier --resume_from_checkpoint."""
    argv = list(sys.argv if argv is None else argv)
    script, args, kept = argv[0], argv[1:], []
    skip_next = False
    for arg in args:
        if skip_next:
            skip_next = False
        elif arg == "--resume_from_checkpoint":
            skip_next = True
        elif not arg.startswith("--resume_from_checkpoint="):
            kept.append(arg)
    kept = kept or list(default_args)
    launcher = ["python"] if num_processes == 1 else ["accelerate", "launch", "--num_processes", str(num_processes)]
    return shlex.join([*launcher, script, *kept, "--resume_from_checkpoint", str(checkpoint)])


# ----------------------------------------------------------------------------------------------
# The trainer side
# ----------------------------------------------------------------------------------------------


class CheckpointMixin:
    """Complete-or-ignored checkpoints, exact resumption and clean interrupts for a subclass of TRL's
    `GRPOTrainer` (place it first in the bases, so its marker is written after every other file).

    Hooks into transformers 5 / TRL 1.16: `train` (resolves `resume_from_checkpoint=True` to the newest
    complete checkpoint), `_save_checkpoint` (marker, rotation, recipe state), `_load_optimizer_and_scheduler`
    (recipe state), `_get_train_sampler` and `_run_epoch` (data order). Other mixins add to the recipe
    state by overriding `recipe_state()` / `load_recipe_state(state)` and calling `super()`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_record = {}  # what the training script wants kept with every checkpoint (recipe_state.json "run")
        self.resumed_from = None
        self.interrupt = InterruptCallback(self)
        self.add_callback(self.interrupt)
        self._resumable_sampler = None

    # -- the recipe's state --

    def recipe_state(self) -> dict:
        parent = getattr(super(), "recipe_state", None)
        state = parent() if parent else {}
        state.update(
            version=RECIPE_STATE_VERSION,
            global_step=self.state.global_step,
            num_processes=self.accelerator.num_processes,
            generation_step=self._step,
            run=self.run_record,
        )
        return state

    def load_recipe_state(self, state: dict) -> None:
        parent = getattr(super(), "load_recipe_state", None)
        if parent:
            parent(state)
        self._step = int(state.get("generation_step", self._step))
        self.run_record = {**(state.get("run") or {}), **self.run_record}  # what this run set wins

    def _mid_generation_round(self) -> bool:
        generate_every = self.args.steps_per_generation * self.num_iterations
        return self._step % generate_every != 0 and self._buffered_inputs is not None

    def _save_recipe_state(self, checkpoint: Path) -> None:
        buffer = checkpoint / GENERATION_BUFFER.format(rank=self.accelerator.process_index)
        if self._mid_generation_round():
            torch.save(self._buffered_inputs, buffer)
        elif buffer.exists():  # left by an earlier write of this directory
            buffer.unlink()
        if self.args.should_save:
            (checkpoint / RECIPE_STATE_FILE).write_text(json.dumps(self.recipe_state(), indent=1, default=str))

    def _load_recipe_state(self, checkpoint: Path) -> None:
        state = read_recipe_state(checkpoint)
        if not state:
            return
        self.load_recipe_state(state)
        buffer = checkpoint / GENERATION_BUFFER.format(rank=self.accelerator.process_index)
        if not buffer.is_file():
            return
        if state.get("num_processes") != self.accelerator.num_processes:
            if self.accelerator.is_main_process:
                print_warning(
                    f"{checkpoint} was saved by {state.get('num_processes')} processes, this run has "
                    f"{self.accelerator.num_processes}: the rest of its generation round is sampled again"
                )
            return
        device = self.accelerator.device
        location = "cpu" if device.type == "cpu" else device  # torch.load cannot map to "cpu:0", the device of CPU processes
        try:
            self._buffered_inputs = torch.load(buffer, map_location=location, weights_only=True)
        except (RuntimeError, pickle.UnpicklingError) as error:
            print_warning(f"could not read {buffer} ({str(error).splitlines()[0]}): the rest of its generation round is sampled again")

    # -- transformers' hooks --

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        is_main = self.accelerator.is_main_process
        checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir, warn=print_warning if is_main else (lambda message: None))
        self.resumed_from = checkpoint
        if checkpoint is not None and is_main:
            step = json.loads((checkpoint / COMPLETE_MARKER).read_text()).get("global_step", checkpoint_step(checkpoint))
            print(f"Resuming from {checkpoint} (step {step})", flush=True)
        try:
            return super().train(str(checkpoint) if checkpoint is not None else None, *args, **kwargs)
        finally:  # also when training fails: Ctrl-C goes back to its usual meaning
            self.interrupt.on_train_end(self.args, self.state, self.control)

    def _save_checkpoint(self, model, trial):
        run_dir = Path(self._get_output_dir(trial=trial))
        checkpoint = run_dir / f"{CHECKPOINT_PREFIX}{self.state.global_step}"
        if self.args.should_save:
            unmark(checkpoint)
        self.accelerator.wait_for_everyone()  # no process writes into it before the old marker is gone
        limit, self.args.save_total_limit = self.args.save_total_limit, None  # rotated below, once this one is complete
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save and (checkpoint / TRAINING_ARGS_NAME).is_file():
            torch.save(self.args, checkpoint / TRAINING_ARGS_NAME)  # the arguments as given, limit included
        self._save_recipe_state(checkpoint)
        self.accelerator.wait_for_everyone()  # every process has written its part
        if self.args.should_save:
            mark_complete(checkpoint, self.state.global_step)
            rotate_checkpoints(run_dir, limit, keep=(checkpoint, self.state.best_model_checkpoint))

    def _load_optimizer_and_scheduler(self, checkpoint):
        import torch

        device = self.args.device
        if self.args.world_size > 1 and device.type == "cpu" and device.index is not None:
            # transformers 5.17 loads a multi-process run's optimizer state onto `args.device`, which is `cpu:0`
            # on CPU, a name torch.load cannot map to: load it as plain `cpu` (the cached property, for the call).
            self.args.__dict__["_setup_devices"] = torch.device("cpu")
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        finally:
            self.args.__dict__["_setup_devices"] = device
        if checkpoint is not None:
            self._load_recipe_state(Path(checkpoint))

    def _get_train_sampler(self, dataset=None):
        sampler = super()._get_train_sampler(dataset)
        if type(sampler) is RepeatSampler:
            sampler = ResumableRepeatSampler(
                data_source=sampler.data_source,
                mini_repeat_count=sampler.mini_repeat_count,
                batch_size=sampler.batch_size,
                repeat_count=sampler.repeat_count,
                shuffle=sampler.shuffle,
                seed=sampler.seed,
            )
            self._resumable_sampler = sampler
        return sampler

    def _run_epoch(self, *args, **kwargs):
        # transformers forwards the epoch to the sampler only through some dataloader wrappers; tell it directly
        if self._resumable_sampler is not None and "epoch" in kwargs:
            self._resumable_sampler.set_epoch(kwargs["epoch"])
        return super()._run_epoch(*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# A run's start and stop: which checkpoint to resume, an output directory that holds a run, an interrupt
# ----------------------------------------------------------------------------------------------


def find_resume_checkpoint(training_args) -> Path | None:
    """The checkpoint `--resume_from_checkpoint` (a path, or `true` for the newest complete one) names."""
    warn = print_warning if training_args.process_index == 0 else (lambda message: None)
    return resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir, warn)


RUN_FILES = ("trainer_state.json",)  # with checkpoint-N directories: what says a directory holds a run


def previous_run(output_dir) -> list[str]:
    """The names in `output_dir` that show a run was trained there (checkpoints, trainer_state.json)."""
    directory = Path(output_dir)
    if not directory.is_dir():
        return []
    return [path.name for path in list_checkpoints(directory)] + [name for name in RUN_FILES if (directory / name).exists()]


def check_output_dir(script_args, training_args, resume_checkpoint: Path | None):
    """A fresh run into a directory holding a run stops, unless `--overwrite_output_dir`, which clears it."""
    found = previous_run(training_args.output_dir) if resume_checkpoint is None else []
    if not found:
        return
    if not script_args.overwrite_output_dir:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise UserError(
            f"{training_args.output_dir} already holds a run ({shown}): continue it with --resume_from_checkpoint true, "
            "start afresh over it with --overwrite_output_dir true, or pick another --output_dir"
        )
    with training_args.main_process_first(desc="clearing the previous run"):
        if training_args.process_index == 0:
            for name in found:
                path = Path(training_args.output_dir) / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            print(f"--overwrite_output_dir: removed the previous run in {training_args.output_dir} ({len(found)} entries)")


def report_interrupt(trainer, interrupt, script: str, default_args: list[str]) -> dict:
    """One line saying where the interrupted run's checkpoint is and how to go on from it: the command line
    `script` was started with (`default_args` when it was started without any)."""
    import signal

    step = trainer.state.global_step
    checkpoint = Path(trainer.args.output_dir) / f"checkpoint-{step}"
    if trainer.accelerator.is_main_process:
        argv = sys.argv if Path(sys.argv[0]).name == script else [script, "ARGUMENTS"]
        command = resume_command(checkpoint, argv, default_args=default_args, num_processes=trainer.accelerator.num_processes)
        print(f"interrupted at step {step} ({signal.Signals(interrupt.stopped_by).name}); checkpoint saved in {checkpoint}; resume with: {command}", flush=True)
    trainer.accelerator.wait_for_everyone()  # under a launcher, no process exits (and gets the others stopped) before this line
    return {"interrupted": signal.Signals(interrupt.stopped_by).name, "exit_code": interrupt.exit_code, "steps": step, "checkpoint": str(checkpoint)}
