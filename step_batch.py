"""One generation batch per optimizer step: sampled in chunks, repaired together, one token-mean loss.

TRL's `GRPOTrainer` samples a *generation batch* of `per_device_train_batch_size x processes x
steps_per_generation` completions at a time and hands it out as micro-batches. The consumer recipes used to
set `steps_per_generation` below `gradient_accumulation_steps` to sample fewer sequences at once, which
split every optimizer step into several generation batches. Two things then go wrong silently:

- batch repair (batch_repair.py) sees one generation batch at a time: with 8 completions per batch that is
  a single group, which has no donor to copy from and needs none, so informative substitution never fires;
- TRL's `dapo` loss divides each generation batch by its own token count, so the step's loss is a mean of
  per-batch token-means rather than the token-mean over all completions of the step (POLARIS, DAPO).

Here the generation batch is the whole optimizer step (`steps_per_generation = gradient_accumulation_steps`,
TRL's own default) and the memory knob is `generation_chunk_size`: each process samples its rows in calls
of that many sequences, the step's rollouts are scored and repaired together, and TRL trains on them in
its micro-batches. Between steps the weights change, within a step they do not, so sampling the step's
rollouts up front draws from the same policy as sampling them round by round. A `steps_per_generation`
below `gradient_accumulation_steps` (as in TRL configs written for memory) is read as that chunk size.

A `steps_per_generation` that is a multiple of `gradient_accumulation_steps` (one generation batch reused
for several steps, TRL's off-policy mode) is kept; each micro-batch then gets the token count of its own
optimizer step as `num_items_in_batch`, so the loss stays the token-mean of each step.
"""

import contextlib
import sys

import torch

from batch_repair import loss_token_count
from data import UserError


MIN_REPAIR_GROUPS = 3  # substitution needs a mixed group to copy and a zero-variance one to replace, and a choice


AUTO_CHUNK = "auto"  # generation_chunk_size chosen by the memory planner when the model is known (train_grpo.main)


def parse_generation_chunk(value) -> int | str | None:
    """`generation_chunk_size` as given on the command line or in a recipe: a positive count, `auto` or None."""
    if value is None or value == AUTO_CHUNK:
        return value
    try:
        chunk = int(value)
    except (TypeError, ValueError):
        chunk = 0
    if chunk < 1 or str(value).strip() not in (str(chunk), f"{chunk}.0"):
        raise UserError(f"--generation_chunk_size must be a positive number of sequences or `auto`, got {value}")
    return chunk


def resolve_generation_chunks(config) -> str | None:
    """Before TRL's `GRPOConfig.__post_init__`: turn a generation batch smaller than an optimizer step into
    chunks of one step-sized generation batch. Returns a one-line note when it did."""
    config.generation_chunk_size = parse_generation_chunk(config.generation_chunk_size)
    per_device, accumulation = config.per_device_train_batch_size, config.gradient_accumulation_steps
    steps = config.steps_per_generation
    if steps is None or config.generation_batch_size is not None or steps >= accumulation:
        return None  # a `generation_batch_size` below the step is refused after TRL's checks
    if config.generation_chunk_size is None:
        config.generation_chunk_size = per_device * steps
    config.steps_per_generation = config.generation_batch_size = None  # TRL: one generation batch per step
    return (
        f"sampling {config.generation_chunk_size} sequences at a time per process (generation_chunk_size) and "
        f"training each optimizer step's {per_device * accumulation} rollouts per process as one batch "
        "(steps_per_generation = gradient_accumulation_steps)"
    )


STATIC_CACHE_ROUNDING = 256  # tokens: a compiled decode keeps its shape while prompts vary within this


def balanced_chunk(remaining: int, chunk: int) -> int:
    """The size of the next generate call: `remaining` sequences in as few calls of at most `chunk` as possible,
    of sizes that differ by at most one (64 in chunks of 10: 10 and nine, not a last call of 4), so a compiled
    decode sees at most two batch shapes."""
    calls = -(-remaining // chunk)
    return -(-remaining // calls)


def static_cache_length(prompt_ids: list[list[int]], max_new_tokens: int) -> int:
    """A static KV cache's length for these prompts, rounded up: transformers keeps the longest it has made,
    so calls with shorter padded prompts reuse the same cache and compiled graph."""
    needed = max(len(ids) for ids in prompt_ids) + max_new_tokens
    return -(-needed // STATIC_CACHE_ROUNDING) * STATIC_CACHE_ROUNDING


def unplanned_auto_chunk() -> int | None:
    """`auto` where nothing planned it (train_grpo.main plans it from the model's shape): all at once on a CPU,
    the planner's safe default on a GPU, said in one line."""
    from memory_planner import SAFE_GENERATION_CHUNK

    if not torch.cuda.is_available():
        return None
    print(f"note: generation_chunk_size auto is planned by train_grpo.py (memory_planner.resolve_auto_generation_chunk); "
          f"unplanned, {SAFE_GENERATION_CHUNK} sequences are sampled at a time", file=sys.stderr)  # fmt: skip
    return SAFE_GENERATION_CHUNK


def check_step_geometry(config) -> list[str]:
    """After TRL's `__post_init__`: refuse generation batches that straddle optimizer steps and return the
    warnings worth a line (repair that sees too few groups to work)."""
    steps, accumulation = config.steps_per_generation, config.gradient_accumulation_steps
    if steps < accumulation:
        raise UserError(
            f"generation_batch_size {config.generation_batch_size} is smaller than an optimizer step's rollouts: "
            "batch repair and the token-mean loss need the whole step; drop it and set --generation_chunk_size "
            "to sample fewer sequences at once"
        )
    if steps % accumulation:
        raise UserError(
            f"steps_per_generation {steps} is not a multiple of gradient_accumulation_steps {accumulation}: a "
            "generation batch would straddle optimizer steps; use a multiple, or a smaller --generation_chunk_size "
            "to sample fewer sequences at once"
        )
    groups = repair_groups(config)
    warnings = []
    repairs = getattr(config, "informative_substitution", False) or getattr(config, "dynamic_sampling", False)
    if repairs and groups < MIN_REPAIR_GROUPS:
        warnings.append(
            f"batch repair sees {groups} group(s) per generation batch ({config.generation_batch_size} completions / "
            f"{config.num_generations} rollouts), too few for informative substitution: raise "
            "--gradient_accumulation_steps or --per_device_train_batch_size to at least "
            f"{MIN_REPAIR_GROUPS * config.num_generations} completions per step"
        )
    return warnings


def repair_groups(config) -> int:
    """Groups that batch repair decides over at once: those of one generation batch."""
    return config.generation_batch_size // config.num_generations


class StepBatchMixin:
    """Chunked sampling of the step's generation batch and a per-step token count for the loss, for a
    subclass of TRL's `GRPOTrainer` (before it in the bases).

    Hooks into TRL 1.16: `_generate_single_turn` (transformers generation in `generation_chunk_size` calls,
    halved on out-of-memory, through a LoRA adapter merged into its unquantized base and, with
    `generation_compile`, a compiled static-cache decode; vLLM manages its own memory and gets the whole
    batch), `_prepare_inputs` (the `num_items_in_batch` of every micro-batch of a new generation batch)."""

    def __init__(self, *args, **kwargs):
        from generation import MergedAdapter, compile_decoding

        super().__init__(*args, **kwargs)
        if self.args.generation_chunk_size == AUTO_CHUNK:  # a trainer built directly, not by train_grpo.main
            self.args.generation_chunk_size = unplanned_auto_chunk()
        self.merged_adapter = None
        if not self.use_vllm:
            # Sharded weights (ZeRO-3, FSDP) are gathered for generation by TRL; they are not merged into.
            sharded = self.is_fsdp_enabled or (self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3)
            model = self.accelerator.unwrap_model(self.model)
            self.merged_adapter = MergedAdapter(model) if not sharded and MergedAdapter.applies(model) else None
            if self.args.generation_compile:
                compile_decoding(self.generation_config)
        if self.accelerator.is_main_process:
            for line in getattr(self.args, "geometry_notes", []):
                print(f"note: {line}", file=sys.stderr)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if self.use_vllm or images is not None or multimodal_fields:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        with self.merged_adapter.merged() if self.merged_adapter is not None else contextlib.nullcontext():
            return self._generate_in_chunks(prompt_ids, num_generations, has_tool_images), None  # generate gives no log-probs

    def _generate_in_chunks(self, prompt_ids, num_generations, has_tool_images) -> list[list[int]]:
        """TRL's transformers generation, `generation_chunk_size` prompts a call; a chunk that runs out of GPU
        memory is halved (for the rest of the run) and sampled again, and a compiled decode that fails falls
        back to eager decoding; each said in one line."""
        from generation import decode_eagerly

        completion_ids, start = [], 0
        while start < len(prompt_ids):
            chunk = self.args.generation_chunk_size or len(prompt_ids)
            size = balanced_chunk(len(prompt_ids) - start, chunk)
            batch = prompt_ids[start : start + size]
            if self.generation_config.cache_implementation == "static":
                self.generation_config.max_cache_len = static_cache_length(batch, self.generation_config.max_new_tokens)
            try:
                # inference_mode, not TRL's no_grad: no autograd bookkeeping per decode step; only token lists leave it
                with torch.inference_mode():
                    ids, _ = super()._generate_single_turn(batch, None, {}, num_generations, has_tool_images)
            except torch.OutOfMemoryError:
                if size <= 1:
                    raise
                self.args.generation_chunk_size = max(1, size // 2)
                if getattr(self.args, "stage_generation_chunks", None):  # the plan was short: later stages' chunks too
                    self.args.stage_generation_chunks = {length: max(1, c // 2) for length, c in self.args.stage_generation_chunks.items()}
                torch.cuda.empty_cache()
                print(f"note: out of GPU memory sampling {size} sequences at once: going on with generation_chunk_size "
                      f"{self.args.generation_chunk_size}", file=sys.stderr, flush=True)  # fmt: skip
                continue
            except Exception as error:  # noqa: BLE001  (compilers raise many kinds; eager decoding is the same policy)
                if not decode_eagerly(self.generation_config, error):
                    raise
                continue
            completion_ids.extend(ids)
            start += len(ids)
        return completion_ids

    def _prepare_inputs(self, generation_batch):
        buffered = self._buffered_inputs
        inputs = super()._prepare_inputs(generation_batch)
        if self.model.training and self._buffered_inputs is not buffered:
            self._count_tokens_per_step(self._buffered_inputs)
        return inputs

    def _count_tokens_per_step(self, micro_batches: list[dict]) -> None:
        """Give every micro-batch the loss tokens of its optimizer step, all processes together, scaled so that
        TRL's `dapo` normaliser (`num_items_in_batch / processes x accumulation / steps_per_generation`) is the
        step's token count over processes: the step's loss is then its token-mean, however it is chunked."""
        steps, accumulation = self.args.steps_per_generation, self.args.gradient_accumulation_steps
        if steps % accumulation or len(micro_batches) != steps:
            return
        windows = steps // accumulation
        local = torch.stack([
            sum(loss_token_count(batch) for batch in micro_batches[w * accumulation : (w + 1) * accumulation])
            for w in range(windows)
        ]).to(self.accelerator.device)
        per_step = self.accelerator.gather(local).view(-1, windows).sum(dim=0)
        for index, batch in enumerate(micro_batches):
            batch["num_items_in_batch"] = per_step[index // accumulation] * windows
