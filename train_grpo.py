"""POLARIS-style GRPO training on TRL's `GRPOTrainer`.

    # the demo: the whole recipe on the offline toy world, on CPU, in a few minutes
    python train_grpo.py

    # a real model from a recipe, with command-line overrides
    python train_grpo.py --config recipes/qwen3-0.6b-lora-8gb.yaml --max_steps 200

Arguments come from TRL's `TrlParser`: `ScriptArguments` (data and evaluation), `PolarisConfig`
(TRL's `GRPOConfig` with POLARIS defaults: 8 rollouts per prompt, no KL, clip-higher, token-mean
loss, constant lr 1e-6) and `PolarisModelConfig` (TRL's `ModelConfig`, LoRA / quantization flags, plus
`--gguf_file`). Models load through generation.py: a hub id, a local directory, a LoRA adapter, `toy`
or a llama.cpp GGUF file (`--model_name_or_path model.gguf`, dequantized to a float model).
"""

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from options import PolarisOptions, ScriptOptions, print_short_help_and_exit  # imports data.py: quiet bitsandbytes

if __name__ == "__main__":
    print_short_help_and_exit()  # `--help` answers before the seconds of importing torch and TRL below

from trl import GRPOConfig, GRPOTrainer, ModelConfig, TrlParser, get_peft_config, get_quantization_config
from trl import ScriptArguments as TrlScriptArguments

from batch_repair import BatchRepairMixin
from checkpoints import CheckpointMixin
from data import UserError, check_options, filter_long_prompts, load_problems, run_cli
from generation import TOY_NAME
from step_batch import StepBatchMixin
from toy import model_hash


DEMO_RECIPE = Path(__file__).resolve().parent / "recipes" / "demo.yaml"


@dataclass
class ScriptArguments(ScriptOptions, TrlScriptArguments):
    """Data, rewards and the before/after measurement (options.py). `dataset_name` is a hub id, a local
    .parquet/.jsonl/.json/.csv file, or `toy`."""


@dataclass
class PolarisConfig(PolarisOptions, GRPOConfig):
    """`GRPOConfig` with the POLARIS defaults and the options TRL lacks (options.py)."""

    def __post_init__(self):
        import torch

        if self.activation_checkpointing is None:  # TRL's default (on), under the new name (options.py)
            self.activation_checkpointing = True if self.gradient_checkpointing is None else self.gradient_checkpointing
        if self.gradient_checkpointing is None:
            self.gradient_checkpointing = self.activation_checkpointing  # the name transformers 5.17's Trainer reads

        # TRL defaults bf16 to True, which fails on machines without bfloat16: choose it here instead.
        has_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if self.bf16 and not has_bf16:
            raise UserError("bf16 was asked for but this machine has no GPU with bfloat16 support: pass --bf16 false")
        if self.bf16 is None:
            self.bf16 = has_bf16 and not self.fp16
        if not torch.cuda.is_available():
            self.use_cpu = True
        if not 0.0 <= self.min_informative_fraction < 1.0:
            raise UserError(f"--min_informative_fraction must be in [0, 1), got {self.min_informative_fraction}")
        from step_batch import check_step_geometry, resolve_generation_chunks

        note = resolve_generation_chunks(self)
        super().__post_init__()
        from schedules import resolve_stage_config

        resolve_stage_config(self)
        # Printed when a trainer is built (step_batch.py), not here: a command that fails later gets one line.
        self.geometry_notes = ([note] if note else []) + check_step_geometry(self)


@dataclass
class PolarisModelConfig(ModelConfig):
    """TRL's `ModelConfig` and a GGUF file."""

    gguf_file: str | None = field(
        default=None,
        metadata={"help": "A GGUF (llama.cpp) file: its path, or its name inside --model_name_or_path (a directory or hub repo)."},
    )


class PolarisGRPOTrainer(CheckpointMixin, BatchRepairMixin, StepBatchMixin, GRPOTrainer):
    """`GRPOTrainer` plus the POLARIS additions (see the other modules). `CheckpointMixin` (checkpoints.py):
    complete-or-ignored checkpoints, exact resumption, a checkpoint and a clean stop on Ctrl-C / SIGTERM.
    `BatchRepairMixin` (batch_repair.py): rollout rescue, informative substitution and the per-prompt ledger.
    `StepBatchMixin` (step_batch.py): the optimizer step's rollouts sampled in chunks and trained as one batch."""

    def __init__(self, *args, **kwargs):
        import generation
        from schedules import attach_stage_schedule

        if kwargs["args"].use_vllm:
            generation.prepare_vllm_environment()  # vLLM's CPU backend: its KV cache size, OpenMP waiting
        super().__init__(*args, **kwargs)
        if self.use_vllm:
            generation.adapt_colocated_vllm(self.vllm_generation)  # CPU backend only: TRL's sync cannot reach it
        self.current_stage = None
        self.stage_schedule = attach_stage_schedule(self)  # None without `stages`

    def apply_stage(self, stage):
        """Sample and score at `stage.temperature` with `stage.max_completion_length` from now on."""
        from schedules import apply_stage

        apply_stage(self, stage)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if getattr(self, "stage_schedule", None) is not None and "loss" in logs:
            logs.update(self.stage_schedule.log_values())
        super().log(logs, start_time)

    def recipe_state(self) -> dict:
        state = super().recipe_state()
        if self.stage_schedule is not None:
            state["stage_schedule"] = self.stage_schedule.state_dict()
        return state

    def load_recipe_state(self, state: dict) -> None:
        super().load_recipe_state(state)
        if self.stage_schedule is not None and state.get("stage_schedule"):
            self.stage_schedule.load_state_dict(state["stage_schedule"])

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's card names only hub models as the base ("fine-tuned version of [None](...)" for a local
        directory): name `base_model_name` (set by `main`) instead."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        base = getattr(self, "base_model_name", None)
        card = Path(self.args.output_dir) / "README.md"
        if base and self.is_world_process_zero() and card.is_file():
            card.write_text(name_base_model_in_card(card.read_text(), base, getattr(self, "base_model_path", None)))

    def stage_starts(self) -> list[dict]:
        """Each stage entered: {stage (1-based), step, reason}."""
        if self.stage_schedule is None:
            return []
        return [{**record, "stage": record["stage"] + 1} for record in self.stage_schedule.started]


def name_base_model_in_card(card: str, base_model: str, path: str | None = None) -> str:
    """The model card with its base model named: a hub id as a link (in the text and the `base_model`
    metadata), the toy world or a local directory in words."""
    if base_model == TOY_NAME:
        words = f"the offline toy model built by toy.py (`{path}`)" if path else "the offline toy model built by toy.py"
    elif Path(base_model).is_dir() or base_model.startswith((".", "/", "~")):
        words = f"the local model `{base_model}`"
    else:
        words = f"[{base_model}](https://huggingface.co/{base_model})"
        if card.startswith("---\n") and "\nbase_model:" not in card.split("\n---", 1)[0]:
            card = f"---\nbase_model: {base_model}\n" + card[len("---\n"):]
    return card.replace("[None](https://huggingface.co/None)", words)


# ----------------------------------------------------------------------------------------------
# Model and data
# ----------------------------------------------------------------------------------------------


def load_model(model_args: ModelConfig, training_args: PolarisConfig):
    """The model to train (generation.load_model: also a LoRA adapter, merged, or a GGUF file), left on
    the CPU for the trainer to place."""
    import torch

    from generation import load_model as load

    dtype = model_args.dtype
    if dtype in (None, "auto"):
        dtype = torch.bfloat16 if training_args.bf16 else None if torch.cuda.is_available() else torch.float32  # None: as saved
    kwargs = dict(revision=model_args.model_revision, attn_implementation=model_args.attn_implementation)
    if model_args.load_in_4bit or model_args.load_in_8bit:
        from dataclasses import replace

        from accelerate import PartialState

        # bitsandbytes computes in `bnb_4bit_compute_dtype`, which TRL takes from `--dtype` (float32 by
        # default): compute in the mixed-precision dtype when there is one.
        compute_dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else None
        kwargs["quantization_config"] = get_quantization_config(replace(model_args, dtype=compute_dtype))
        # Quantized weights are placed while loading: each process loads onto its own GPU.
        kwargs["device_map"] = {"": PartialState().local_process_index} if torch.cuda.is_available() else None
    return load(
        model_args.model_name_or_path, getattr(model_args, "gguf_file", None), dtype,
        trust_remote_code=training_args.trust_remote_code, device=None, **kwargs,
    )  # fmt: skip


def check_model_options(training_args: PolarisConfig, model_args: ModelConfig):
    """Combinations of LoRA, quantization and vLLM that cannot work, caught before anything loads."""
    bits = "--load_in_4bit" if model_args.load_in_4bit else "--load_in_8bit" if model_args.load_in_8bit else None
    if bits and not model_args.use_peft:
        raise UserError(f"{bits} freezes the base model in low precision: add --use_peft to train LoRA adapters on it (QLoRA)")
    if bits and training_args.use_vllm:
        raise UserError(
            f"{bits} (QLoRA) cannot run with --use_vllm: TRL cannot sync LoRA adapters into quantized vLLM weights; "
            "drop --use_vllm (transformers then generates) or drop the quantization"
        )
    if training_args.use_vllm:
        check_vllm_mode(training_args)


def check_vllm_mode(training_args: PolarisConfig):
    """vLLM is installed, and server mode has the CUDA its weight transfer needs (TRL sends the weights to
    the server over NCCL; its communicator raises NotImplementedError off CUDA)."""
    import importlib.util

    import torch

    if importlib.util.find_spec("vllm") is None:
        raise UserError(
            "--use_vllm needs vLLM: pip install vllm==0.31.0 (CUDA; the version trl 1.16 and these pins support), "
            "or drop --use_vllm (transformers then generates)"
        )
    if training_args.vllm_mode == "server" and not torch.cuda.is_available():
        raise UserError(
            "--vllm_mode server needs CUDA: TRL sends the weights to the vLLM server over NCCL, which this machine "
            "lacks; use --vllm_mode colocate (vLLM in this process, also on CPU) or drop --use_vllm"
        )


def launch_differs_from_plan(script_args: ScriptArguments, training_args: PolarisConfig) -> str | None:
    """A note when the run was launched otherwise than the `--accelerate_config` its plan counts."""
    import os

    from memory_planner import distribution_from_accelerate_config

    planned = distribution_from_accelerate_config(script_args.accelerate_config, script_args.num_gpus)
    launched = "fsdp" if os.environ.get("ACCELERATE_USE_FSDP") == "true" else "deepspeed" if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" else None
    wanted = {"fsdp": "fsdp", "zero2": "deepspeed", "zero3": "deepspeed"}.get(planned.get("sharding"))
    if launched == wanted and training_args.world_size == planned["num_gpus"]:
        return None
    return (
        f"the memory plan counts {script_args.accelerate_config} ({planned['num_gpus']} processes, {wanted or 'no sharding'}) "
        f"but this run has {training_args.world_size} process(es), {launched or 'no sharding'}: launch with "
        f"accelerate launch --config_file {script_args.accelerate_config}, or check the plan with --accelerate_config"
    )


def save_merged_model(adapter_dir: str | Path, merged_dir: str | Path, dtype=None, trust_remote_code: bool = False) -> Path:
    """Merge a LoRA adapter into its base model and save the result, loadable without peft.

    The base model is loaded again in full precision (`dtype`, default float32) on the CPU, so a QLoRA
    adapter is merged into the unquantized weights and the GPU's memory is not needed.
    """
    import torch

    from generation import load_model, load_tokenizer

    merged = load_model(str(adapter_dir), dtype=dtype or torch.float32, trust_remote_code=trust_remote_code, device=None)
    merged_dir = Path(merged_dir)
    merged.save_pretrained(merged_dir)
    load_tokenizer(str(adapter_dir), trust_remote_code=trust_remote_code).save_pretrained(merged_dir)
    return merged_dir


def load_training_data(script_args: ScriptArguments, tokenizer):
    dataset = load_problems(
        script_args.dataset_name,
        split=script_args.dataset_train_split,
        problem_column=script_args.problem_column,
        answer_column=script_args.answer_column,
        prompt_suffix=script_args.prompt_suffix,
        system_prompt=script_args.system_prompt,
    )
    dataset, dropped = filter_long_prompts(dataset, tokenizer, script_args.max_prompt_length)
    print(f"Training problems: {len(dataset)} ({dropped} dropped as longer than {script_args.max_prompt_length} tokens)")
    if len(dataset) == 0:
        raise UserError(f"no training problem is left after dropping prompts over {script_args.max_prompt_length} tokens: raise --max_prompt_length")
    return dataset


def load_eval_problems(script_args: ScriptArguments):
    if not script_args.eval_dataset_name:
        return None
    dataset = load_problems(
        script_args.eval_dataset_name,
        split=script_args.dataset_test_split,
        problem_column=script_args.eval_problem_column,
        answer_column=script_args.eval_answer_column,
        prompt_suffix=script_args.prompt_suffix,
        system_prompt=script_args.system_prompt,
        column_options="--eval_problem_column / --eval_answer_column",
    )
    if script_args.eval_max_problems:
        dataset = dataset.select(range(min(len(dataset), script_args.eval_max_problems)))
    return dataset


# ----------------------------------------------------------------------------------------------
# Measurement and reporting
# ----------------------------------------------------------------------------------------------


def measure_accuracy(model, tokenizer, problems, script_args: ScriptArguments, training_args: PolarisConfig, desc: str):
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


def write_summary(output_dir: Path, summary: dict):
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))


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
# Resuming and interrupts (checkpoints.py)
# ----------------------------------------------------------------------------------------------


def find_resume_checkpoint(training_args: PolarisConfig) -> Path | None:
    """The checkpoint `--resume_from_checkpoint` (a path, or `true` for the newest complete one) names."""
    from checkpoints import print_warning, resolve_resume_checkpoint

    warn = print_warning if training_args.process_index == 0 else (lambda message: None)
    return resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir, warn)


RUN_FILES = ("trainer_state.json",)  # with checkpoint-N directories: what says a directory holds a run


def previous_run(output_dir) -> list[str]:
    """The names in `output_dir` that show a run was trained there (checkpoints, trainer_state.json)."""
    from checkpoints import list_checkpoints

    directory = Path(output_dir)
    if not directory.is_dir():
        return []
    return [path.name for path in list_checkpoints(directory)] + [name for name in RUN_FILES if (directory / name).exists()]


def check_output_dir(script_args: ScriptArguments, training_args: PolarisConfig, resume_checkpoint: Path | None):
    """A fresh run into a directory holding a run stops, unless `--overwrite_output_dir`, which clears it."""
    import shutil

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


def eval_settings(eval_problems, script_args: ScriptArguments, training_args: PolarisConfig) -> dict | None:
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


def report_interrupt(trainer, interrupt) -> dict:
    """One line saying where the interrupted run's checkpoint is and how to go on from it."""
    import signal

    from checkpoints import resume_command

    step = trainer.state.global_step
    checkpoint = Path(trainer.args.output_dir) / f"checkpoint-{step}"
    if trainer.accelerator.is_main_process:
        script = Path(__file__).name
        argv = sys.argv if Path(sys.argv[0]).name == script else [script, "ARGUMENTS"]
        demo = DEMO_RECIPE.relative_to(Path.cwd()) if DEMO_RECIPE.is_relative_to(Path.cwd()) else DEMO_RECIPE
        command = resume_command(checkpoint, argv, default_args=["--config", str(demo)], num_processes=trainer.accelerator.num_processes)
        print(f"interrupted at step {step} ({signal.Signals(interrupt.stopped_by).name}); checkpoint saved in {checkpoint}; resume with: {command}", flush=True)
    trainer.accelerator.wait_for_everyone()  # under a launcher, no process exits (and gets the others stopped) before this line
    return {"interrupted": signal.Signals(interrupt.stopped_by).name, "exit_code": interrupt.exit_code, "steps": step, "checkpoint": str(checkpoint)}


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main(script_args: ScriptArguments, training_args: PolarisConfig, model_args: ModelConfig, trainer_class=None):
    """Train and measure; `trainer_class` (default `PolarisGRPOTrainer`) lets ablations run TRL's own."""
    from transformers import set_seed

    from generation import load_tokenizer, resolve_toy
    from rewards import get_reward_funcs

    start = time.time()
    quiet_library_warnings()
    set_seed(training_args.seed)
    is_demo = model_args.model_name_or_path == TOY_NAME
    check_model_options(training_args, model_args)
    if script_args.plan:
        from memory_planner import print_plan

        return print_plan(script_args, training_args, model_args)
    note = launch_differs_from_plan(script_args, training_args) if script_args.accelerate_config else None
    if note and training_args.process_index == 0:
        print(f"note: {note}", file=sys.stderr)
    resume_checkpoint = find_resume_checkpoint(training_args)  # before anything loads: a wrong path fails at once
    check_output_dir(script_args, training_args, resume_checkpoint)
    base_model_name = model_args.model_name_or_path
    model_args.model_name_or_path = resolve_toy(model_args.model_name_or_path, script_args.toy_dir, "model")
    gguf_file = getattr(model_args, "gguf_file", None)
    if not model_args.model_name_or_path and not gguf_file:
        raise UserError("no model given: pass --model_name_or_path (a hub id, a local directory, a .gguf file or `toy`)")
    if not script_args.dataset_name:
        raise UserError("no training data given: pass --dataset_name (a hub id, a local file or `toy`)")
    script_args.dataset_name = resolve_toy(script_args.dataset_name, script_args.toy_dir, "train")
    script_args.eval_dataset_name = resolve_toy(script_args.eval_dataset_name, script_args.toy_dir, "test")
    try:
        reward_funcs = get_reward_funcs(script_args.reward_funcs)
    except (ValueError, ImportError, AttributeError) as error:
        raise UserError(str(error)) from error

    tokenizer = load_tokenizer(model_args.model_name_or_path, gguf_file, training_args.trust_remote_code)
    train_dataset = load_training_data(script_args, tokenizer)
    eval_problems = load_eval_problems(script_args)
    model = load_model(model_args, training_args)

    accuracy_before, measurement = None, eval_settings(eval_problems, script_args, training_args)
    if eval_problems is not None:
        accuracy_before = accuracy_before_from(resume_checkpoint, measurement)
        if accuracy_before is None:
            accuracy_before = measure_accuracy(model, tokenizer, eval_problems, script_args, training_args, "Accuracy before")
            print(f"Held-out accuracy before training: {accuracy_before:.3f}")
        else:
            print(f"Held-out accuracy before training: {accuracy_before:.3f} (kept in {resume_checkpoint})")

    trainer = (trainer_class or PolarisGRPOTrainer)(
        model=model,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    print_step_lines(trainer)
    trainer.base_model_name, trainer.base_model_path = base_model_name, model_args.model_name_or_path  # for the model card
    if hasattr(trainer, "run_record"):  # kept with every checkpoint, so a resumed run need not measure again
        trainer.run_record.update(accuracy_before=accuracy_before, eval=measurement)
    trainer.train(resume_from_checkpoint=str(resume_checkpoint) if resume_checkpoint else None)
    interrupt = getattr(trainer, "interrupt", None)
    if interrupt is not None and interrupt.stopped_by:
        return report_interrupt(trainer, interrupt)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    if script_args.save_merged and model_args.use_peft and trainer.accelerator.is_main_process:
        merged_dir = save_merged_model(
            training_args.output_dir,
            Path(training_args.output_dir) / "merged",
            dtype="bfloat16" if training_args.bf16 else None,
            trust_remote_code=training_args.trust_remote_code,
        )
        print(f"Merged model (base + adapter): {merged_dir}")
    elif script_args.save_merged and not model_args.use_peft:
        print(f"--save_merged: nothing to merge without --use_peft, {training_args.output_dir} holds the whole model")

    accuracy_after = None
    if eval_problems is not None:
        accuracy_after = measure_accuracy(trainer.model, tokenizer, eval_problems, script_args, training_args, "Accuracy after")

    output_dir = Path(training_args.output_dir)
    summary = {
        "accuracy_before": accuracy_before,
        "accuracy_after": accuracy_after,
        "eval_num_samples": script_args.eval_num_samples,
        "eval_problems": len(eval_problems) if eval_problems is not None else 0,
        "steps": trainer.state.global_step,
        "seconds": round(time.time() - start, 1),
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
    if trainer.accelerator.is_main_process:
        write_summary(output_dir, summary)
        plot_learning_curve(trainer.state.log_history, output_dir / "learning_curve.png", summary.get("stages", []), accuracy_before, accuracy_after)
        print_report(summary, output_dir, is_demo)
    return summary


def make_parser():
    # allow_abbrev=False: `--max_step 3` is an unknown option, not silently --max_steps
    return TrlParser((ScriptArguments, PolarisConfig, PolarisModelConfig), allow_abbrev=False)


DEMO_OPTIONS = ("--seed",)  # `python train_grpo.py --seed 3`: the demo with another seed


def demo_arguments(args: list[str]) -> bool:
    """No arguments, or only one of `DEMO_OPTIONS` with its value: the command runs the demo recipe."""
    if len(args) == 2:
        return args[0] in DEMO_OPTIONS
    if len(args) == 1:
        option, equals, _ = args[0].partition("=")
        return bool(equals) and option in DEMO_OPTIONS
    return not args


def parse_args(args: list[str] | None = None):
    """Parse the command line (and `--config`); no arguments at all means the demo recipe."""
    import yaml

    args = list(sys.argv[1:] if args is None else args)
    print_short_help_and_exit(args)
    args = ["--help" if arg == "--help-all" else arg for arg in args]  # TRL's full list
    if demo_arguments(args):
        shown = DEMO_RECIPE.relative_to(Path.cwd()) if DEMO_RECIPE.is_relative_to(Path.cwd()) else DEMO_RECIPE
        print(f"{'No arguments' if not args else 'Only ' + ' '.join(args)}: running the demo recipe {shown}")
        args = ["--config", str(DEMO_RECIPE), *args]
    if "--config" in args:
        config_path = Path(args[args.index("--config") + 1]) if args.index("--config") + 1 < len(args) else None
        if config_path is None or not config_path.is_file():
            raise UserError(f"no such recipe file: {config_path} (see recipes/ for examples)")
    parser = make_parser()
    try:
        recipe = yaml.safe_load(config_path.read_text()) if "--config" in args else None
        check_options(parser, args, recipe if isinstance(recipe, dict) else None, config_path if "--config" in args else None)
        return parser.parse_args_and_config(args)
    except yaml.YAMLError as error:
        raise UserError(f"the recipe file does not parse as YAML: {str(error).splitlines()[0]} ...") from error
    except (ValueError, TypeError) as error:
        raise UserError(f"invalid arguments: {str(error).splitlines()[0]}") from error


def cli():
    try:
        summary = main(*parse_args())
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print("stopped at once by Ctrl-C; resume from the newest complete checkpoint with --resume_from_checkpoint true", file=sys.stderr)
        sys.exit(130)
    if isinstance(summary, dict) and summary.get("exit_code"):  # interrupted: 130 (SIGINT) or 143 (SIGTERM)
        sys.exit(summary["exit_code"])


if __name__ == "__main__":
    run_cli(cli)
