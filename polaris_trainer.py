"""The trainer and its configuration: TRL's `GRPOTrainer` with the POLARIS additions, and the argument
dataclasses `train_grpo.py` parses (TRL's, with the options of options.py mixed in).

`PolarisGRPOTrainer` composes three mixins, each a module of its own, before TRL's class; their order is the
order their hooks run in (library_internals.py lists every TRL method they override).
"""

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from trl import GRPOConfig, GRPOTrainer, ModelConfig
from trl import ScriptArguments as TrlScriptArguments

from batch_repair import BatchRepairMixin
from checkpoints import CheckpointMixin
from data import UserError
from generation import TOY_NAME
from options import PolarisOptions, ScriptOptions
from step_batch import StepBatchMixin


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

        config, peft_config = kwargs["args"], kwargs.get("peft_config")
        if config.use_vllm:
            generation.prepare_vllm_environment()  # vLLM's CPU backend: its KV cache size, OpenMP waiting
        # Colocated vLLM with LoRA: vLLM serves the adapter itself (generation.VLLMAdapterSync).
        adapter_sync = config.use_vllm and config.vllm_mode == "colocate" and getattr(peft_config, "peft_type", None) == "LORA"
        with generation.vllm_engine_with_lora(peft_config.r) if adapter_sync else contextlib.nullcontext():
            super().__init__(*args, **kwargs)
        self.vllm_adapter_sync = None
        if adapter_sync:
            self.vllm_adapter_sync = generation.VLLMAdapterSync(self.vllm_generation)
        elif self.use_vllm:
            generation.adapt_colocated_vllm(self.vllm_generation)  # CPU backend only: TRL's sync cannot reach it
        self.current_stage = None
        self.stage_schedule = attach_stage_schedule(self)  # None without `stages`

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
