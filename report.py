"""What a training run shows: the before/after measurement on held-out problems, the one-line console log
per step, the learning curve (PNG), summary.json and the closing report."""

import json
import time
from pathlib import Path


# ----------------------------------------------------------------------------------------------
# Before and after: held-out accuracy
# ----------------------------------------------------------------------------------------------


def measure_accuracy(model, tokenizer, problems, script_args, training_args, desc: str):
    """Mean sampled accuracy (avg@k) at the training temperature, as POLARIS reports it."""
    from generation import sample_completions
    from rewards import verify

    samples = sample_completions(
        model,
        tokenizer,
        problems["prompt"],
        num_samples=script_args.eval_num_samples,
        temperature=training_args.temperature,
        top_p=training_args.top_p,
        top_k=training_args.top_k,
        max_new_tokens=training_args.max_completion_length,
        seed=training_args.seed,
        desc=desc,
    )
    scores = [verify(s.text, answer) for group, answer in zip(samples, problems["answer"]) for s in group]
    return sum(scores) / len(scores)


def eval_settings(eval_problems, script_args, training_args) -> dict | None:
    """What the before/after measurement depends on (a resumed run reuses the first run's `before` if it matches)."""
    if eval_problems is None:
        return None
    return {
        "dataset": script_args.eval_dataset_name, "problems": len(eval_problems), "num_samples": script_args.eval_num_samples,
        "temperature": training_args.temperature, "top_p": training_args.top_p, "top_k": training_args.top_k,
        "max_new_tokens": training_args.max_completion_length, "seed": training_args.seed,
    }


def accuracy_before_from(checkpoint: Path | None, measurement: dict) -> float | None:
    from checkpoints import read_recipe_state

    record = (read_recipe_state(checkpoint).get("run") or {}) if checkpoint is not None else {}
    return record.get("accuracy_before") if record.get("eval") == measurement else None


# ----------------------------------------------------------------------------------------------
# The console during training
# ----------------------------------------------------------------------------------------------


def format_step_line(logs: dict, step: int, max_steps: int, seconds_per_step: float | None) -> str | None:
    """One console line for a training log: step, reward and informative fraction of the trained batch (TRL's
    keys when the batch was not repaired), stage, mean completion length, time per step. None for other logs."""
    reward = logs.get("trained/reward", logs.get("reward"))
    zero_std = logs.get("trained/frac_reward_zero_std", logs.get("frac_reward_zero_std"))
    if reward is None and "loss" not in logs:
        return None
    parts = [f"step {step}/{max_steps}"]
    if reward is not None:
        parts.append(f"reward {reward:.3f}")
    if zero_std is not None:
        parts.append(f"informative {1.0 - zero_std:.2f}")
    if logs.get("schedule/stage") is not None:
        parts.append(f"stage {logs['schedule/stage']}")
    if logs.get("completions/mean_length") is not None:
        parts.append(f"length {logs['completions/mean_length']:.1f}")
    if seconds_per_step is not None:
        parts.append(f"{seconds_per_step:.1f} s/step")
    return "  ".join(parts)


def step_line_callbacks():
    """transformers' console loggers (`ProgressCallback`, `PrinterCallback` without tqdm) with the ~40-key dict
    of every log replaced by `format_step_line`; trainer_state.json and `--report_to` still get every key."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class StepTimer:
        def on_train_begin(self, args, state, control, **kwargs):
            super().on_train_begin(args, state, control, **kwargs)
            self.last = (time.time(), state.global_step)

        def line(self, logs, state):
            if "train_runtime" in logs:
                return f"trained {state.global_step} steps in {logs['train_runtime']:.0f} s"
            now, (then, then_step) = time.time(), getattr(self, "last", (None, None))
            seconds = (now - then) / (state.global_step - then_step) if then and state.global_step > then_step else None
            self.last = (now, state.global_step)
            return format_step_line(logs, state.global_step, state.max_steps, seconds)

    class StepLineProgress(StepTimer, ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            line = self.line(logs or {}, state)
            if line is None:
                return super().on_log(args, state, control, logs=logs, **kwargs)
            if state.is_world_process_zero and self.training_bar is not None:
                self.training_bar.write(line)

    class StepLinePrinter(StepTimer, PrinterCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            line = self.line(logs or {}, state)
            if line is None:
                return super().on_log(args, state, control, logs=logs, **kwargs)
            if state.is_local_process_zero:
                print(line, flush=True)

    return {ProgressCallback: StepLineProgress, PrinterCallback: StepLinePrinter}


def print_step_lines(trainer):
    """Put the one-line console loggers in place of transformers' own."""
    for original, replacement in step_line_callbacks().items():
        if trainer.pop_callback(original) is not None:
            trainer.add_callback(replacement)


def quiet_library_warnings():
    """TRL 1.16 itself calls the `gradient_checkpointing_*` model methods transformers 5 deprecated, around
    every generation (trl/models/utils.py): not our calls, and printed at every checkpoint. Only those."""
    import warnings

    warnings.filterwarnings(
        "ignore",
        message=r"`(is_gradient_checkpointing|gradient_checkpointing_enable|gradient_checkpointing_disable)` is deprecated",
        category=FutureWarning,
        module=r"transformers\.modeling_utils",
    )


# ----------------------------------------------------------------------------------------------
# After training: summary.json, learning_curve.png, the report
# ----------------------------------------------------------------------------------------------


def training_trend(log_history: list[dict]) -> dict:
    """Mean reward of the model's own rollouts over the first and the last fifth of the logged steps (before
    batch repair, which raises the trained batch's), and the informative fraction of the groups trained on
    over the run (after batch repair; TRL's own keys when nothing was repaired)."""
    rows = [row for row in log_history if row.get("sampled/reward", row.get("reward")) is not None]
    if not rows:
        return {}
    fifth = max(1, len(rows) // 5)

    def mean(values):
        values = [value for value in values if value is not None]
        return sum(values) / len(values) if values else None

    rewards = [row.get("sampled/reward", row.get("reward")) for row in rows]
    zero_std = [row.get("trained/frac_reward_zero_std", row.get("frac_reward_zero_std")) for row in rows]
    informative = mean([1.0 - value for value in zero_std if value is not None])
    return {"reward_first": mean(rewards[:fifth]), "reward_last": mean(rewards[-fifth:]), "informative_trained": informative}


def write_summary(output_dir: Path, summary: dict):
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))


def plot_learning_curve(log_history: list[dict], path: Path, stage_starts: list[dict] = (), accuracy_before: float | None = None,
                        accuracy_after: float | None = None):
    """Rewards and the informative fraction per logged step: of what the model sampled and, after batch
    repair, of what it trained on (TRL's `reward` and `frac_reward_zero_std` describe the batch before it).
    Stage boundaries are marked with what started them; held-out accuracy before and after, when measured,
    at the first and last step."""
    from matplotlib.figure import Figure  # not pyplot: a notebook's plotting backend stays as it is

    rows = [row for row in log_history if "reward" in row]
    if not rows:
        return None
    steps = [row["step"] for row in rows]

    def series(key, transform=lambda value: value):
        return [transform(row[key]) if row.get(key) is not None else None for row in rows]

    figure = Figure(figsize=(6, 3.5))
    axis = figure.subplots()
    if any("trained/reward" in row for row in rows):
        axis.plot(steps, series("sampled/reward"), marker="o", label="mean reward, sampled")
        axis.plot(steps, series("trained/reward"), marker=".", label="mean reward, trained")
        informative = series("trained/frac_reward_zero_std", lambda value: 1.0 - value)
        axis.plot(steps, informative, label="informative groups, trained")
    else:  # TRL's own trainer (ablations): no repair, sampled is trained
        axis.plot(steps, series("reward"), marker="o", label="mean reward")
        if any("frac_reward_zero_std" in row for row in rows):
            axis.plot(steps, series("frac_reward_zero_std", lambda value: 1.0 - value), label="informative groups")
    if accuracy_before is not None and accuracy_after is not None:
        last = log_history[-1].get("step", steps[-1]) if log_history else steps[-1]
        axis.plot([0, last], [accuracy_before, accuracy_after], "k*--", markersize=10, linewidth=1,
                  label=f"held-out accuracy {accuracy_before:.3f} -> {accuracy_after:.3f}")
    for start in stage_starts:
        if start["stage"] > 1:
            axis.axvline(start["step"], color="gray", linestyle="--", linewidth=1)
            reason = start["reason"].split(":")[0]
            axis.annotate(f"stage {start['stage']}: {reason}", (start["step"], 0.98), rotation=90, va="top", ha="right", fontsize=7, color="gray")
    axis.set_xlabel("step")
    axis.set_ylim(-0.02, 1.02)
    axis.legend(fontsize="small")
    axis.set_title("Training rewards" + (" and held-out accuracy" if accuracy_before is not None and accuracy_after is not None else ""))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def print_report(summary: dict, output_dir: Path, is_demo: bool):
    print("\n" + "=" * 60)
    print(f"{'':<28}{'start':>10}{'end':>10}")
    if summary.get("accuracy_before") is not None:
        label = f"held-out accuracy (avg@{summary['eval_num_samples']})"
        world = f"   model {summary['model_hash']}" if summary.get("model_hash") else ""
        print(f"{label:<28}{summary['accuracy_before']:>10.3f}{summary['accuracy_after']:>10.3f}   ({summary['accuracy_after'] - summary['accuracy_before']:+.3f}){world}")
    trend = summary.get("training", {})
    if trend.get("reward_first") is not None:
        print(f"{'training reward, sampled':<28}{trend['reward_first']:>10.3f}{trend['reward_last']:>10.3f}   (first / last fifth of steps)")
    if trend.get("informative_trained") is not None:
        print(f"{'informative groups trained':<28}{trend['informative_trained']:>20.2f}   (mean over steps)")
    for start in summary.get("stages", []):
        print(f"stage {start['stage']} from step {start['step']}" + (f": {start['reason']}" if start["stage"] > 1 else ""))
    print(f"steps: {summary['steps']}   time: {summary['seconds']:.0f} s")
    print(f"outputs: {output_dir}/ (model, trainer_state.json, summary.json, learning_curve.png)")
    if is_demo:
        print("\nTrain a real model from a recipe:")
        print("  python train_grpo.py --config recipes/qwen3-0.6b-lora-8gb.yaml")
    print("=" * 60)


def finish_report(trainer, script_args, model_args, eval_problems, accuracy_before, accuracy_after, seconds: float, is_demo: bool) -> dict:
    """The run's summary (returned, and written to summary.json), its learning curve and the closing report."""
    from toy import model_hash

    summary = {
        "accuracy_before": accuracy_before,
        "accuracy_after": accuracy_after,
        "eval_num_samples": script_args.eval_num_samples,
        "eval_problems": len(eval_problems) if eval_problems is not None else 0,
        "steps": trainer.state.global_step,
        "seconds": round(seconds, 1),
        "model": model_args.model_name_or_path,
        "model_hash": model_hash(model_args.model_name_or_path) if is_demo else None,  # the toy world: machines build different ones
        "dataset": script_args.dataset_name,
    }
    if hasattr(trainer, "repair_summary"):
        summary["batch_repair"] = trainer.repair_summary()
    if getattr(trainer, "stage_schedule", None) is not None:
        summary["stages"] = trainer.stage_starts()
        summary["refreshes"] = trainer.refreshes
    summary["training"] = training_trend(trainer.state.log_history)
    output_dir = Path(trainer.args.output_dir)
    if trainer.accelerator.is_main_process:
        write_summary(output_dir, summary)
        plot_learning_curve(trainer.state.log_history, output_dir / "learning_curve.png", summary.get("stages", []), accuracy_before, accuracy_after)
        print_report(summary, output_dir, is_demo)
    return summary
