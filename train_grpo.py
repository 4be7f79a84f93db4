"""POLARIS-style GRPO training on TRL's `GRPOTrainer`.

    # the demo: the whole recipe on the offline toy world, on CPU, in a few minutes
    python train_grpo.py

    # a real model from a recipe, with command-line overrides
    python train_grpo.py --config recipes/qwen3-0.6b-lora-8gb.yaml --max_steps 200

Arguments come from TRL's `TrlParser`: `ScriptArguments` (data and evaluation), `PolarisConfig`
(TRL's `GRPOConfig` with POLARIS defaults: 8 rollouts per prompt, no KL, clip-higher, token-mean
loss, constant lr 1e-6) and `PolarisModelConfig` (TRL's `ModelConfig`, LoRA / quantization flags, plus
`--gguf_file`); see polaris_trainer.py and options.py. Models load through generation.py: a hub id, a local
directory, a LoRA adapter, `toy` or a llama.cpp GGUF file (dequantized to a float model).

`main` reads top to bottom: arguments, model, data, held-out accuracy before, trainer, train, save,
held-out accuracy after, report. What each step calls lives in the module of its concern: the trainer
(polaris_trainer.py and its mixins), checkpoints and resuming (checkpoints.py), memory (memory_planner.py),
generation (generation.py), the measurement and the report (report.py).
"""

import sys
import time
from pathlib import Path

from options import print_short_help_and_exit  # imports data.py: quiet bitsandbytes

if __name__ == "__main__":
    print_short_help_and_exit()  # `--help` answers before the seconds of importing torch and TRL below

from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config

from checkpoints import check_output_dir, find_resume_checkpoint, report_interrupt
from data import UserError, check_options, filter_long_prompts, load_problems, run_cli
from generation import TOY_NAME, save_merged_model
from options import check_model_options
from polaris_trainer import PolarisConfig, PolarisGRPOTrainer, PolarisModelConfig, ScriptArguments
from report import accuracy_before_from, eval_settings, finish_report, measure_accuracy, print_step_lines, quiet_library_warnings


DEMO_RECIPE = Path(__file__).resolve().parent / "recipes" / "demo.yaml"


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
# Main
# ----------------------------------------------------------------------------------------------


def main(script_args: ScriptArguments, training_args: PolarisConfig, model_args: ModelConfig, trainer_class=None):
    """Train and measure; `trainer_class` (default `PolarisGRPOTrainer`) lets ablations run TRL's own."""
    from transformers import set_seed

    from generation import load_tokenizer
    from rewards import get_reward_funcs

    start = time.time()
    quiet_library_warnings()
    set_seed(training_args.seed)

    # 1. Arguments: what cannot work stops here, before anything loads; --plan stops after the plan.
    check_model_options(training_args, model_args, planning=script_args.plan)
    if script_args.plan:
        from memory_planner import print_plan

        return print_plan(script_args, training_args, model_args)
    plan_generation(script_args, training_args, model_args)
    resume_checkpoint = find_resume_checkpoint(training_args)  # a wrong path fails at once
    check_output_dir(script_args, training_args, resume_checkpoint)
    base_model_name = model_args.model_name_or_path
    resolve_names(script_args, model_args)
    try:
        reward_funcs = get_reward_funcs(script_args.reward_funcs)
    except (ValueError, ImportError, AttributeError) as error:
        raise UserError(str(error)) from error

    # 2. Model and data.
    tokenizer = load_tokenizer(model_args.model_name_or_path, getattr(model_args, "gguf_file", None), training_args.trust_remote_code)
    train_dataset = load_training_data(script_args, tokenizer)
    eval_problems = load_eval_problems(script_args)
    model = load_model(model_args, training_args)

    # 3. Held-out accuracy before training (a resumed run keeps its first measurement).
    measurement = eval_settings(eval_problems, script_args, training_args)
    accuracy_before = None
    if eval_problems is not None:
        accuracy_before = accuracy_before_from(resume_checkpoint, measurement)
        if accuracy_before is None:
            accuracy_before = measure_accuracy(model, tokenizer, eval_problems, script_args, training_args, "Accuracy before")
            print(f"Held-out accuracy before training: {accuracy_before:.3f}")
        else:
            print(f"Held-out accuracy before training: {accuracy_before:.3f} (kept in {resume_checkpoint})")

    # 4. Trainer.
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

    # 5. Train; an interrupt leaves a checkpoint and says how to resume.
    trainer.train(resume_from_checkpoint=str(resume_checkpoint) if resume_checkpoint else None)
    interrupt = getattr(trainer, "interrupt", None)
    if interrupt is not None and interrupt.stopped_by:
        return report_interrupt(trainer, interrupt, Path(__file__).name, ["--config", str(shown_path(DEMO_RECIPE))])

    # 6. Save: the model (or adapter), the trainer state and, asked for, the adapter merged into its base.
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    save_merged(trainer, script_args, training_args, model_args)

    # 7. Held-out accuracy after training, summary.json, learning_curve.png and the report.
    accuracy_after = None
    if eval_problems is not None:
        accuracy_after = measure_accuracy(trainer.model, tokenizer, eval_problems, script_args, training_args, "Accuracy after")
    return finish_report(trainer, script_args, model_args, eval_problems, accuracy_before, accuracy_after, time.time() - start,
                         is_demo=base_model_name == TOY_NAME)  # fmt: skip


def plan_generation(script_args: ScriptArguments, training_args: PolarisConfig, model_args: ModelConfig):
    """`generation_chunk_size: auto` planned for this GPU, and a launch that differs from the planned one, each
    said in one line."""
    from memory_planner import launch_differs_from_plan, resolve_auto_generation_chunk

    note = resolve_auto_generation_chunk(script_args, training_args, model_args)
    if note and training_args.process_index == 0:
        print(note)
    note = launch_differs_from_plan(script_args, training_args) if script_args.accelerate_config else None
    if note and training_args.process_index == 0:
        print(f"note: {note}", file=sys.stderr)


def resolve_names(script_args: ScriptArguments, model_args: ModelConfig):
    """`toy` as the toy world's model and data (built on first use); a missing model or data set in one line."""
    from generation import resolve_toy

    model_args.model_name_or_path = resolve_toy(model_args.model_name_or_path, script_args.toy_dir, "model")
    if not model_args.model_name_or_path and not getattr(model_args, "gguf_file", None):
        raise UserError("no model given: pass --model_name_or_path (a hub id, a local directory, a .gguf file or `toy`)")
    if not script_args.dataset_name:
        raise UserError("no training data given: pass --dataset_name (a hub id, a local file or `toy`)")
    script_args.dataset_name = resolve_toy(script_args.dataset_name, script_args.toy_dir, "train")
    script_args.eval_dataset_name = resolve_toy(script_args.eval_dataset_name, script_args.toy_dir, "test")


def save_merged(trainer, script_args: ScriptArguments, training_args: PolarisConfig, model_args: ModelConfig):
    """`--save_merged`: the base model with the trained adapter merged in, in OUTPUT_DIR/merged."""
    if not script_args.save_merged:
        return
    if not model_args.use_peft:
        print(f"--save_merged: nothing to merge without --use_peft, {training_args.output_dir} holds the whole model")
    elif trainer.accelerator.is_main_process:
        merged_dir = save_merged_model(
            training_args.output_dir, Path(training_args.output_dir) / "merged", dtype="bfloat16" if training_args.bf16 else None,
            trust_remote_code=training_args.trust_remote_code,
        )  # fmt: skip
        print(f"Merged model (base + adapter): {merged_dir}")


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------


def shown_path(path: Path) -> Path:
    """`path` relative to the working directory when it is inside it, as a user would type it."""
    return path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path


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
        print(f"{'No arguments' if not args else 'Only ' + ' '.join(args)}: running the demo recipe {shown_path(DEMO_RECIPE)}")
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
