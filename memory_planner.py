"""Peak GPU memory of a GRPO run, estimated from the model's shape and the run's settings, before any weights load.

    python train_grpo.py --config recipes/qwen3-1.7b-qlora-12gb.yaml --plan --gpu_memory 12

The model's shape comes from its config.json (a local directory or the Hugging Face cache) or, offline,
from `BUILTIN_SHAPES`. The estimate adds up, per GPU:

- the weights at their precision (4-bit or 8-bit linear layers under QLoRA, 16-bit embeddings and norms),
- the trainable parameters (LoRA adapters or the whole model): their gradients and optimizer state,
- training phase: the activations kept for the backward pass of one micro-batch of the longest sequences
  (max_prompt_length + max_completion_length of the longest stage), with or without gradient
  checkpointing, TRL's chunked log-prob LM head, and the backward pass's working set,
- generation phase (transformers `generate`): the KV cache of a whole generation batch at full length,
- vLLM's share of the GPU (colocate mode reserves `vllm_gpu_memory_utilization` of it up front; with
  `vllm_enable_sleep_mode` it holds that share while sampling only, and gives it back while training),
- the CUDA context and the allocator's fragmentation (rules of thumb).

Several GPUs (`--accelerate_config`, the file the run is launched with): ZeRO-2/3 and FSDP keep 1/N of the
sharded state per GPU, CPU offload (FSDP2's CPUOffloadPolicy, DeepSpeed's offload_param/offload_optimizer)
moves it to CPU memory, and what stays on the GPU is the weights and gradients of the layers in flight.

The peak is the larger of the two phases. It assumes every completion reaches max_completion_length: early
in a run completions are shorter, so a setting that is over budget can run for hours and then fail when
responses grow. Every stage must fit: the longest, or one whose `auto` chunk samples more at once.
`python benchmarks/gpu_check.sh` compares these estimates with measured peaks on a GPU.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from data import UserError


GIB = 1024**3
FP32 = 4
CUDA_CONTEXT_BYTES = 0.5 * GIB  # CUDA context and cuBLAS workspaces: outside torch's allocator statistics
FRAGMENTATION = 0.10  # the caching allocator's unusable slack, as a share of activations and KV cache
# TRL 1.16's chunked log-prob kernel (trl/kernels/chunked_logprob.py) projects hidden states onto the
# vocabulary in tiles of at most TOKEN_CHUNK tokens x VOCAB_CHUNK vocabulary entries.
LOGPROB_TOKEN_CHUNK = 4096
LOGPROB_VOCAB_CHUNK = 32768
# vLLM asleep (sleep level 2, TRL's vllm_enable_sleep_mode) frees its weights and KV cache but keeps its
# CUDA graphs and sampler buffers: a rule of thumb, like the CUDA context.
VLLM_ASLEEP_BYTES = 1.0 * GIB
# ZeRO-3 / FSDP gather the weights of the layer that computes and prefetch the next one.
LAYERS_IN_FLIGHT = 2


# ----------------------------------------------------------------------------------------------
# Model shapes
# ----------------------------------------------------------------------------------------------


LINEAR_GROUPS = {
    # linear layers of one decoder layer, grouped by the tensor they read
    "attention input": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention output": ("self_attn.o_proj",),
    "mlp input": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp output": ("mlp.down_proj",),
}


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on in a dense decoder-only transformer of the Llama / Qwen family."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    model_type: str = "qwen3"
    qkv_bias: bool = False  # Qwen2 (and so R1-Distill-Qwen) adds biases to q, k and v
    qk_norm: bool = True  # Qwen3 RMS-normalises queries and keys per head
    max_position_embeddings: int | None = None

    @classmethod
    def from_config(cls, config: dict, name: str = "the model") -> "ModelShape":
        config = config.get("text_config") or config
        if config.get("num_experts") or config.get("num_local_experts"):
            raise UserError(f"{name} is a mixture-of-experts model, which the memory planner does not cover")
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        missing = [key for key in required if not config.get(key)]
        if missing:
            raise UserError(f"the config.json of {name} lacks {', '.join(missing)}: the memory planner covers dense decoder-only models")
        model_type = str(config.get("model_type", ""))
        heads = int(config["num_attention_heads"])
        return cls(
            vocab_size=int(config["vocab_size"]),
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
            model_type=model_type,
            qkv_bias=bool(config.get("attention_bias", model_type == "qwen2")),
            qk_norm=model_type.startswith("qwen3"),
            max_position_embeddings=config.get("max_position_embeddings"),
        )

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_layers(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder layer."""
        h, q, kv, inter = self.hidden_size, self.q_dim, self.kv_dim, self.intermediate_size
        return {
            "self_attn.q_proj": (h, q),
            "self_attn.k_proj": (h, kv),
            "self_attn.v_proj": (h, kv),
            "self_attn.o_proj": (q, h),
            "mlp.gate_proj": (h, inter),
            "mlp.up_proj": (h, inter),
            "mlp.down_proj": (inter, h),
        }

    def linear_parameters(self) -> int:
        """Weights of the decoder layers' linear layers: what bitsandbytes quantizes."""
        return self.num_layers * sum(i * o for i, o in self.linear_layers().values())

    def num_parameters(self) -> int:
        per_layer_rest = 2 * self.hidden_size  # the two RMSNorm weights
        if self.qk_norm:
            per_layer_rest += 2 * self.head_dim
        if self.qkv_bias:
            per_layer_rest += self.q_dim + 2 * self.kv_dim
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.linear_parameters() + self.num_layers * per_layer_rest + embeddings + self.hidden_size

    def kv_cache_bytes_per_token(self, dtype_bytes: int) -> int:
        """A key and a value vector per layer and KV head."""
        return 2 * self.num_layers * self.kv_dim * dtype_bytes


def _qwen3(hidden, inter, layers, heads, tie, kv_heads=8):
    return ModelShape(151936, hidden, inter, layers, heads, kv_heads, 128, tie, "qwen3", False, True, 40960)


def _qwen2(vocab, hidden, inter, layers, heads, kv_heads):
    return ModelShape(vocab, hidden, inter, layers, heads, kv_heads, hidden // heads, False, "qwen2", True, False, 131072)


# Shapes of the common models (from their config.json), for planning without the hub.
BUILTIN_SHAPES = {
    "Qwen/Qwen3-0.6B": _qwen3(1024, 3072, 28, 16, tie=True),
    "Qwen/Qwen3-1.7B": _qwen3(2048, 6144, 28, 16, tie=True),
    "Qwen/Qwen3-4B": _qwen3(2560, 9728, 36, 32, tie=True),
    "Qwen/Qwen3-8B": _qwen3(4096, 12288, 36, 32, tie=False),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": _qwen2(151936, 1536, 8960, 28, 12, 2),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": _qwen2(152064, 3584, 18944, 28, 28, 4),
}


def builtin_shape(name: str) -> ModelShape | None:
    lowered = {key.lower(): shape for key, shape in BUILTIN_SHAPES.items()}
    return lowered.get(name.lower())


def toy_shape() -> ModelShape:
    """The toy world's model (toy.py), without building the toy world."""
    import toy

    return ModelShape.from_config(toy.build_model(toy.build_tokenizer(), seed=0).config.to_dict(), "the toy model")


def find_model_shape(name: str, revision: str | None = None) -> tuple[ModelShape, str]:
    """The shape of `name` and where it came from: a local directory's config.json, the Hugging Face
    cache (no download), or the built-in table."""
    if name == "toy":
        return toy_shape(), "toy.py"
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} has no config.json: give a model directory or a hub id")
        return ModelShape.from_config(json.loads((path / "config.json").read_text()), name), str(path / "config.json")
    cached = None
    if "/" in name and not name.startswith((".", "/")):
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(name, "config.json", revision=revision)
        except ValueError:  # not a valid repo id
            cached = None
    if isinstance(cached, str):
        return ModelShape.from_config(json.loads(Path(cached).read_text()), name), "the Hugging Face cache"
    shape = builtin_shape(name)
    if shape is not None:
        return shape, "the built-in table"
    raise UserError(
        f"the shape of '{name}' is unknown offline: give a local model directory, download its config.json "
        f"(huggingface-cli download {name} config.json), or plan one of: {', '.join(BUILTIN_SHAPES)}"
    )


# ----------------------------------------------------------------------------------------------
# The run's settings
# ----------------------------------------------------------------------------------------------


@dataclass
class RunSetup:
    """The settings the memory of one GPU depends on (`setup_from_args` reads them from the arguments)."""

    micro_batch: int  # sequences per forward/backward pass: per_device_train_batch_size
    generation_batch: int  # sequences sampled together: generation_chunk_size (default: the step's rollouts)
    max_prompt_length: int
    stages: list[tuple[int, float | None, int]]  # (from step, temperature, max_completion_length)
    num_generations: int = 8  # rollouts per prompt: the smallest generation batch TRL allows on one GPU
    step_rollouts: int = 0  # rollouts one process holds for the optimizer step (scored, repaired, trained)
    old_logps: bool = False  # the held rollouts carry per-token old log-probs (vLLM correction, reuse)
    weight_bytes: int = 2  # precision of the weights that are not quantized (bf16 / fp16: 2, fp32: 4)
    autocast: bool = False  # fp32 weights computed in bf16 / fp16 (mixed precision)
    quantization: str | None = None  # "4bit" or "8bit" (bitsandbytes)
    double_quant: bool = False  # bnb_4bit_use_double_quant
    use_peft: bool = False
    lora_r: int = 16
    lora_target_modules: str | list[str] | None = None
    lora_dropout: float = 0.05
    optimizer: str = "adamw_torch"
    gradient_checkpointing: bool = True
    reference_model: bool = False  # beta > 0 without PEFT keeps a frozen copy of the weights
    use_vllm: bool = False
    vllm_mode: str = "colocate"
    vllm_gpu_memory_utilization: float = 0.3
    dropout_mask_bytes: int = 1  # CUDA's fused dropout keeps a bool mask; on CPU it is in the input's dtype
    vllm_sleep: bool = False  # vllm_enable_sleep_mode: vLLM frees its memory while the trainer trains
    # Several GPUs (read from the accelerate config by `distribution_from_accelerate_config`).
    num_gpus: int = 1
    gpus_per_node: int = 1
    sharding: str | None = None  # "zero2", "zero3" or "fsdp"; None: every GPU holds the whole model
    offload_params: bool = False  # sharded weights (and, with FSDP2, gradients) live in CPU memory
    offload_optimizer: bool = False  # optimizer state (and fp32 gradients) live in CPU memory
    compute_bytes: int | None = None  # FSDP2 / DeepSpeed bf16: fp32 master weights, layers computed in 16 bits
    autocast_estimate: bool = False  # autocast: count matmul outputs at 16 bits (the estimate), not fp32 (the bound)
    # generation_chunk_size `auto` planned stage by stage: sequences sampled together, by max_completion_length
    stage_generation_batches: dict[int, int] | None = None

    def generation_batch_at(self, completion_length: int) -> int:
        """Sequences sampled together in the stage of `completion_length` tokens."""
        return (self.stage_generation_batches or {}).get(completion_length, self.generation_batch)

    @property
    def activation_bytes(self) -> int:
        # Quantized layers compute in, and return, the dtype of the rest of the model. FSDP2's
        # MixedPrecisionPolicy and DeepSpeed's bf16 hand the layers 16-bit weights: activations are 16-bit.
        # Under autocast fp32 weights are cast per matmul (see `residual_bytes`): the bound counts all at fp32.
        if self.compute_bytes:
            return self.compute_bytes
        return 2 if self.autocast and self.autocast_estimate else self.weight_bytes

    @property
    def residual_bytes(self) -> int:
        """The residual stream and the layer norms' outputs: under autocast they stay fp32 (embeddings and
        norm weights are fp32, additions are not autocast), while each matmul keeps its own 16-bit copy of
        its input and returns 16 bits (so the q/k norms, which read q_proj / k_proj, keep 16-bit tensors)."""
        return self.weight_bytes if self.autocast else self.activation_bytes

    @property
    def kv_bytes(self) -> int:
        return 2 if self.autocast or self.compute_bytes else self.weight_bytes

    @property
    def adapter_bytes(self) -> int:
        if self.quantization:
            return 2  # TRL casts QLoRA adapters to bf16 (grpo_trainer.py)
        return FP32  # PEFT keeps adapters of 16-bit models in fp32 (autocast_adapter_dtype)

    @property
    def trainable_bytes(self) -> int:
        return self.adapter_bytes if self.use_peft else self.weight_bytes

    @property
    def shards_weights(self) -> bool:
        return self.sharding in ("zero3", "fsdp") and not self.use_peft

    @property
    def longest_completion(self) -> int:
        return max(length for _, _, length in self.stages)


def step_rollouts(training_args, chunked: bool = False) -> int:
    """Rollouts one process holds per generation batch, or samples in one call (`chunked`)."""
    held = training_args.per_device_train_batch_size * training_args.steps_per_generation
    chunk = getattr(training_args, "generation_chunk_size", None)
    return min(held, chunk) if chunked and isinstance(chunk, int) and not training_args.use_vllm else held


def distribution_from_accelerate_config(path: str, num_gpus: int | None = None) -> dict:
    """The `RunSetup` fields an accelerate config file (accelerate/*.yaml) decides: GPU count, sharding,
    CPU offload and whether the layers compute in 16 bits from fp32 master weights."""
    import yaml

    path = Path(path)
    if not path.is_file() and not path.is_absolute() and (Path(__file__).resolve().parent / path).is_file():
        path = Path(__file__).resolve().parent / path  # recipes name the project's accelerate/ files
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise UserError(f"cannot read the accelerate config {path}: {error}") from error
    if not isinstance(config, dict) or "distributed_type" not in config:
        raise UserError(f"{path} is not an accelerate config (no distributed_type): see accelerate/")
    kind = str(config["distributed_type"])
    machines = int(config.get("num_machines") or 1)
    gpus = int(num_gpus or config.get("num_processes") or 1)
    fields = dict(num_gpus=gpus, gpus_per_node=max(1, gpus // machines))
    sixteen_bit = config.get("mixed_precision") in ("bf16", "fp16")
    if kind == "DEEPSPEED":
        deepspeed = config.get("deepspeed_config") or {}
        stage = int(deepspeed.get("zero_stage", 0))
        if stage not in (2, 3):
            raise UserError(f"{path}: the planner covers DeepSpeed ZeRO stages 2 and 3, not {stage}")
        fields.update(
            sharding=f"zero{stage}",
            offload_params=stage == 3 and deepspeed.get("offload_param_device") == "cpu",
            offload_optimizer=deepspeed.get("offload_optimizer_device") == "cpu",
            compute_bytes=2 if sixteen_bit else None,  # DeepSpeed bf16 turns the model into bf16, fp32 masters in the optimizer
        )
    elif kind == "FSDP":
        fsdp = config.get("fsdp_config") or {}
        offload = bool(fsdp.get("fsdp_offload_params"))
        # FSDP2's CPUOffloadPolicy moves weights, gradients and the optimizer step to the CPU together.
        fields.update(sharding="fsdp", offload_params=offload, offload_optimizer=offload, compute_bytes=2 if sixteen_bit else None)
    elif kind not in ("MULTI_GPU", "NO"):
        raise UserError(f"{path}: the planner covers DDP, DeepSpeed ZeRO-2/3 and FSDP, not {kind}")
    return fields


def setup_from_args(script_args, training_args, model_args) -> RunSetup:
    """Read a `RunSetup` from train_grpo's three argument dataclasses.

    The plan is for a GPU run. `--dtype` sets the weights' precision (TRL's default, float32, keeps fp32
    weights under bf16 autocast: mixed precision; "auto" loads the checkpoint's 16 bits); planned on a
    machine without a GPU, where the arguments turn bf16 off, bf16 compute is assumed.
    """
    import torch

    weight_bytes = FP32 if str(model_args.dtype) in ("float32", "torch.float32") else 2
    sixteen_bit_compute = training_args.bf16 or training_args.fp16 or not torch.cuda.is_available()
    if training_args.stages:
        stages = [(int(s["step"]), float(s["temperature"]), int(s["max_completion_length"])) for s in training_args.stages]
    else:
        stages = [(0, training_args.temperature, int(training_args.max_completion_length))]
    quantization = "4bit" if model_args.load_in_4bit else "8bit" if model_args.load_in_8bit else None
    optimizer = getattr(training_args.optim, "value", training_args.optim)
    accelerate_config = getattr(script_args, "accelerate_config", None)
    num_gpus = getattr(script_args, "num_gpus", None)
    distribution = distribution_from_accelerate_config(accelerate_config, num_gpus) if accelerate_config else {}
    if num_gpus and not accelerate_config:
        distribution = dict(num_gpus=num_gpus, gpus_per_node=min(num_gpus, 8))
    return RunSetup(
        micro_batch=training_args.per_device_train_batch_size,
        generation_batch=step_rollouts(training_args, chunked=True),
        stage_generation_batches=None if training_args.use_vllm else getattr(training_args, "stage_generation_chunks", None),
        step_rollouts=step_rollouts(training_args),
        old_logps=bool(training_args.use_vllm and training_args.vllm_importance_sampling_correction)
        or training_args.num_iterations > 1,
        max_prompt_length=int(script_args.max_prompt_length or 1024),
        stages=stages,
        num_generations=training_args.num_generations,
        weight_bytes=weight_bytes,
        # FSDP2 / DeepSpeed bf16 hand the layers 16-bit weights: no autocast at work (see `compute_bytes`).
        autocast=weight_bytes == FP32 and bool(sixteen_bit_compute) and not distribution.get("compute_bytes"),
        quantization=quantization,
        double_quant=bool(model_args.use_bnb_nested_quant),
        use_peft=bool(model_args.use_peft),
        lora_r=model_args.lora_r,
        lora_target_modules=model_args.lora_target_modules,
        lora_dropout=model_args.lora_dropout,
        optimizer=str(optimizer),
        gradient_checkpointing=bool(training_args.gradient_checkpointing),
        reference_model=training_args.beta != 0.0 and not model_args.use_peft,
        use_vllm=bool(training_args.use_vllm),
        vllm_mode=training_args.vllm_mode,
        vllm_gpu_memory_utilization=training_args.vllm_gpu_memory_utilization,
        vllm_sleep=bool(training_args.use_vllm and training_args.vllm_mode == "colocate" and training_args.vllm_enable_sleep_mode),
        **distribution,
    )


def lora_targets(shape: ModelShape, target_modules) -> list[str]:
    """The linear layers of a decoder layer that LoRA wraps, following PEFT's matching rules: None is
    PEFT's default for the architecture, "all-linear" every linear layer but the LM head, another string
    a regular expression over full module names, a list names matched by suffix."""
    names = list(shape.linear_layers())
    full_name = {name: f"model.layers.0.{name}" for name in names}
    if target_modules is None:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

        target_modules = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(shape.model_type, ["q_proj", "v_proj"])
    if target_modules == "all-linear":
        targets = names
    elif isinstance(target_modules, str):
        targets = [name for name in names if re.fullmatch(target_modules, full_name[name])]
    else:
        wanted = list(target_modules)
        targets = [name for name in names if any(full_name[name] == w or full_name[name].endswith("." + w) for w in wanted)]
    if not targets:
        raise UserError(
            f"lora_target_modules {target_modules!r} matches no linear layer (they are "
            f"{', '.join(name.split('.')[-1] for name in names)}, or all-linear)"
        )
    return targets


# ----------------------------------------------------------------------------------------------
# The arithmetic
# ----------------------------------------------------------------------------------------------


def optimizer_state_bytes(optimizer: str, param_bytes: int) -> float:
    """Optimizer state per trainable parameter. AdamW keeps two moments in the parameter's dtype; the 8-bit
    optimizers of bitsandbytes keep them in one byte each; Lion keeps one; SGD (no momentum by default)
    and Adafactor (factored moments: a row and a column per matrix) keep next to nothing."""
    name = optimizer.lower()
    if name.startswith("sgd") or "adafactor" in name:
        return 0.0
    states = 1 if "lion" in name else 2
    return states * (1 if "8bit" in name else param_bytes)


def quantized_bytes_per_parameter(setup: RunSetup) -> float:
    if setup.quantization == "4bit":
        # Two weights per byte, plus one fp32 absmax per block of 64 weights; nested quantization stores
        # those absmax in 8 bits with one fp32 per 256 of them.
        absmax = (1 + FP32 / 256) / 64 if setup.double_quant else FP32 / 64
        return 0.5 + absmax
    if setup.quantization == "8bit":
        return 1.0  # int8 weights (plus one fp32 scale per output row, counted separately)
    return float(setup.weight_bytes)


def weight_bytes(shape: ModelShape, setup: RunSetup) -> float:
    """All weights. bitsandbytes quantizes the decoder layers' linear layers; embeddings, the LM head,
    norms and biases stay in the model's dtype. A reference model (beta > 0, no PEFT) doubles them."""
    linear = shape.linear_parameters()
    rest = shape.num_parameters() - linear
    total = linear * quantized_bytes_per_parameter(setup) + rest * setup.weight_bytes
    if setup.quantization == "8bit":
        total += shape.num_layers * sum(out for _, out in shape.linear_layers().values()) * FP32
    return total * (2 if setup.reference_model else 1)


def trainable_parameters(shape: ModelShape, setup: RunSetup) -> int:
    """LoRA adds A (r x in) and B (out x r) to each targeted linear layer; without PEFT everything trains."""
    if not setup.use_peft:
        return shape.num_parameters()
    layers = shape.linear_layers()
    return shape.num_layers * sum(setup.lora_r * (layers[name][0] + layers[name][1]) for name in lora_targets(shape, setup.lora_target_modules))


def _rms_norm_saved_bytes(width: int, rows: int, trainable_weight: bool, activation_bytes: int) -> int:
    """Tensors an RMSNorm keeps for backward, per token: its input cast to fp32 and 1/rms (fp32) per row,
    plus the normalised input when its weight trains (the weight's gradient needs it)."""
    return FP32 * width + FP32 * rows + (activation_bytes * width if trainable_weight else 0)


def layer_activation_bytes(shape: ModelShape, setup: RunSetup) -> int:
    """Bytes one decoder layer keeps for the backward pass, per token, with SDPA / flash attention (no
    seq x seq attention matrix). Counted tensor by tensor from what autograd saves in transformers' Qwen
    layers; tests/test_memory_planner.py checks it against the tensors autograd really saves."""
    a, h, inter = setup.activation_bytes, shape.hidden_size, shape.intermediate_size
    q, kv = shape.q_dim, shape.kv_dim
    norms_train, r = not setup.use_peft, setup.residual_bytes
    total = 2 * _rms_norm_saved_bytes(h, 1, norms_train, r)  # input and post-attention norms
    if shape.qk_norm:  # they read q_proj / k_proj outputs: their normalised input is kept in that dtype
        total += _rms_norm_saved_bytes(q, shape.num_heads, norms_train, a)
        total += _rms_norm_saved_bytes(kv, shape.num_kv_heads, norms_train, a)
    # Attention keeps q, k and v after RoPE, its output (which is also o_proj's input) and a fp32 log-sum-exp per head.
    total += a * (q + 2 * kv + q) + FP32 * shape.num_heads
    # The gated MLP keeps gate_proj's output (for SiLU), SiLU's output and up_proj's output (for the product).
    total += 3 * a * inter
    group_width = {"attention input": h, "attention output": q, "mlp input": h, "mlp output": inter}
    targets = set(lora_targets(shape, setup.lora_target_modules)) if setup.use_peft else set()
    for group, members in LINEAR_GROUPS.items():
        width = group_width[group]
        already_kept = group == "attention output"  # the attention output, counted above
        if not setup.use_peft:
            # A trained linear layer keeps its input for its weight's gradient; a frozen one keeps nothing.
            # Autocast casts an fp32 input (from a norm) once per matmul, and each keeps its own 16-bit copy.
            copies = len(members) if r != a and group in ("attention input", "mlp input") else 1
            total += 0 if already_kept else copies * a * width
            continue
        wrapped = [name for name in members if name in targets]
        if not wrapped:
            continue
        if setup.adapter_bytes != a or setup.lora_dropout > 0:
            # Each adapter keeps its own copy of the input, cast to the adapter's dtype and/or passed
            # through dropout (which also keeps its mask).
            mask = setup.dropout_mask_bytes * width if setup.lora_dropout > 0 else 0
            total += len(wrapped) * (setup.adapter_bytes * width + mask)
        elif not already_kept:
            total += a * width  # the input itself, shared by the adapters that read it
        total += len(wrapped) * setup.adapter_bytes * setup.lora_r  # lora_A's output, kept for lora_B
    return total


def saved_activation_bytes(shape: ModelShape, setup: RunSetup, tokens: int, checkpointing: bool) -> int:
    """Activations of one micro-batch of `tokens` tokens held at once during its backward pass. With
    gradient checkpointing each layer keeps only its input, and one layer at a time is recomputed."""
    per_layer = layer_activation_bytes(shape, setup)
    weight_copies = 0
    if setup.autocast:
        # Autocast hands matmuls 16-bit copies of the fp32 weights, which they keep for backward: every
        # layer's without checkpointing, the recomputed layer's with it, and the LM head's.
        layers_in_flight = 1 if checkpointing else shape.num_layers
        weight_copies = 2 * (shape.linear_parameters() // shape.num_layers * layers_in_flight + shape.vocab_size * shape.hidden_size)
    if checkpointing:
        return tokens * (shape.num_layers * setup.residual_bytes * shape.hidden_size + per_layer) + weight_copies
    return tokens * shape.num_layers * per_layer + weight_copies


@dataclass
class PhaseEstimate:
    """One stage's estimate: bytes by part, and the phase (training or generation) that peaks."""

    completion_length: int
    parts: dict[str, float]
    training: float
    generation: float
    vllm_share: float | None  # None: a share of a GPU whose size is unknown
    overhead: float
    activations_without_checkpointing: float
    activations_with_checkpointing: float
    # vllm_enable_sleep_mode: vLLM holds its share while sampling only, `vllm_asleep` while training.
    vllm_sleep: bool = False
    vllm_asleep: float = 0.0
    overhead_training: float = 0.0
    overhead_generation: float = 0.0
    cpu_offload_per_node: float = 0.0  # what CPU offload keeps in one node's CPU memory

    @property
    def allocated(self) -> float:
        """What PyTorch allocates at the peak (comparable with torch.cuda.max_memory_allocated)."""
        return max(self.training, self.generation)

    @property
    def training_total(self) -> float:
        return self.training + self.overhead_training + self.vllm_asleep

    @property
    def generation_total(self) -> float:
        return self.generation + self.overhead_generation + (self.vllm_share or 0.0)

    @property
    def peak_phase(self) -> str:
        if self.vllm_sleep:
            return "training" if self.training_total >= self.generation_total else "generation"
        return "training" if self.training >= self.generation else "generation"

    @property
    def total(self) -> float:
        if self.vllm_sleep:  # the phases take turns on the GPU: the peak is the larger one
            return max(self.training_total, self.generation_total)
        return self.allocated + self.overhead + (self.vllm_share or 0.0)


def sharded_state(shape: ModelShape, setup: RunSetup, weights: float, gradients: float, optimizer: float) -> dict[str, float]:
    """Per GPU under ZeRO / FSDP: 1/N of the state each shards, none of what CPU offload moves to CPU memory,
    and the 16-bit weights and gradients of the layers in flight; `cpu` is what one GPU's share of CPU
    memory holds. Without sharding (or with PEFT, whose adapters are small) every GPU holds everything."""
    state = dict(weights=weights, gradients=gradients, optimizer=optimizer, weights_in_flight=0.0, gradients_in_flight=0.0, cpu=0.0)
    if setup.sharding is None or setup.use_peft:
        return state
    n, compute = setup.num_gpus, setup.compute_bytes or setup.weight_bytes
    parameters, h = shape.num_parameters(), shape.hidden_size
    # The root module (embeddings, LM head when untied, final norm) stays gathered from forward to backward.
    root = shape.vocab_size * h * (1 if shape.tie_word_embeddings else 2) + h
    layer = (parameters - root) / shape.num_layers
    on_gpu = lambda value, offloaded: (0.0, value / n) if offloaded else (value / n, 0.0)  # noqa: E731
    if setup.sharding == "fsdp":
        # FSDP2 shards the fp32 weights and gathers them in the compute dtype (MixedPrecisionPolicy).
        shard_weights, cpu_weights = on_gpu(weights, setup.offload_params)
    else:
        # DeepSpeed keeps the model in 16 bits (ZeRO-3: 1/N of it, ZeRO-2: all of it) and the fp32 master
        # weights in the optimizer, with the optimizer state.
        model = parameters * compute
        master = weights if compute != setup.weight_bytes else 0.0
        model_gpu, model_cpu = on_gpu(model, setup.offload_params) if setup.sharding == "zero3" else (model, 0.0)
        master_gpu, master_cpu = on_gpu(master, setup.offload_optimizer)
        shard_weights, cpu_weights = model_gpu + master_gpu, model_cpu + master_cpu
    shard_gradients, cpu_gradients = on_gpu(gradients, setup.offload_optimizer)
    shard_optimizer, cpu_optimizer = on_gpu(optimizer, setup.offload_optimizer)
    state.update(weights=shard_weights, gradients=shard_gradients, optimizer=shard_optimizer, cpu=cpu_weights + cpu_gradients + cpu_optimizer)
    if setup.shards_weights:
        state["weights_in_flight"] = compute * (root + LAYERS_IN_FLIGHT * layer)
        state["gradients_in_flight"] = compute * (root + layer)  # unsharded until reduce-scattered
    return state


def estimate(shape: ModelShape, setup: RunSetup, completion_length: int, gpu_memory: float | None = None) -> PhaseEstimate:
    """Peak memory (bytes) of one GPU for completions of `completion_length` tokens."""
    a, h = setup.activation_bytes, shape.hidden_size
    trainable = trainable_parameters(shape, setup)
    adapters = trainable * setup.adapter_bytes if setup.use_peft else 0.0
    state = sharded_state(
        shape, setup, weight_bytes(shape, setup), trainable * setup.trainable_bytes,
        trainable * optimizer_state_bytes(setup.optimizer, setup.trainable_bytes),
    )  # fmt: skip
    weights, gradients, optimizer = state["weights"], state["gradients"], state["optimizer"]
    persistent = weights + adapters + optimizer

    # Training: one micro-batch of full-length sequences (TRL pads to the longest in the batch).
    tokens = setup.micro_batch * (setup.max_prompt_length + completion_length)
    with_checkpointing = saved_activation_bytes(shape, setup, tokens, checkpointing=True)
    without_checkpointing = saved_activation_bytes(shape, setup, tokens, checkpointing=False)
    activations = with_checkpointing if setup.gradient_checkpointing else without_checkpointing
    # The chunked log-prob head keeps the final norm's tensors and its input; its backward adds a logits
    # tile, the fp32 gradient of the hidden states and, when the head trains, a fp32 weight gradient
    # (sharded runs: counted with the gradients in flight).
    head_kept = tokens * (_rms_norm_saved_bytes(h, 1, not setup.use_peft, setup.residual_bytes) + a * h)
    head_backward = min(tokens, LOGPROB_TOKEN_CHUNK) * min(shape.vocab_size, LOGPROB_VOCAB_CHUNK) * a + tokens * FP32 * h
    if not setup.use_peft and not setup.shards_weights:
        head_backward += shape.vocab_size * h * FP32
    # A layer's backward holds gradients of its widest intermediates (residual stream and MLP).
    layer_backward = tokens * a * (3 * h + 3 * shape.intermediate_size)
    in_flight = state["weights_in_flight"] + state["gradients_in_flight"]
    training = persistent + gradients + in_flight + activations + head_kept + max(head_backward, layer_backward)

    # Generation with transformers: the KV cache of the whole generation batch at full length, plus the
    # larger of the prompt prefill's intermediates (one layer) and, while decoding, the copy of one
    # layer's cache that DynamicCache makes as it grows and the fp32 logits of the last position.
    sequences, length = setup.generation_batch_at(completion_length), setup.max_prompt_length + completion_length
    weight_sync = 0.0
    if setup.use_vllm:
        kv_cache = generation_work = 0.0  # inside vLLM's own memory
        if setup.shards_weights:
            # TRL pushes the weights to vLLM one gathered tensor at a time; the largest is the embedding
            # (FSDP2 gathers its fp32 shards, DeepSpeed its 16-bit partitions).
            weight_sync = shape.vocab_size * h * (setup.weight_bytes if setup.sharding == "fsdp" else (setup.compute_bytes or setup.weight_bytes))
    else:
        kv_cache = sequences * length * shape.kv_cache_bytes_per_token(setup.kv_bytes)
        prefill = sequences * setup.max_prompt_length * a * (h + shape.q_dim + 2 * shape.kv_dim + 2 * shape.intermediate_size)
        decode = kv_cache / shape.num_layers + 2 * sequences * shape.vocab_size * FP32
        generation_work = max(prefill, decode)
        if setup.shards_weights:
            # transformers' generate runs on the gathered model: ZeRO-3 gathers all of it
            # (ds3_gather_for_generation), FSDP2 a layer at a time.
            generation_work += shape.num_parameters() * (setup.compute_bytes or setup.weight_bytes) if setup.sharding == "zero3" else state["weights_in_flight"]
    generation = persistent + kv_cache + generation_work + weight_sync

    # The step's rollouts stay on the GPU from sampling to the last micro-batch, twice while repair copies
    # them: int64 prompt and completion ids and masks, fp32 advantages and, when kept, fp32 old log-probs.
    rows = setup.step_rollouts
    held = 2 * rows * (length * (8 + 8) + 4 + (completion_length * FP32 if setup.old_logps else 0))
    training += held
    generation += held

    vllm_share = 0.0
    if setup.use_vllm and setup.vllm_mode == "colocate":
        vllm_share = setup.vllm_gpu_memory_utilization * gpu_memory if gpu_memory else None
    overhead_training = CUDA_CONTEXT_BYTES + FRAGMENTATION * (activations + head_kept)
    overhead_generation = CUDA_CONTEXT_BYTES + FRAGMENTATION * (kv_cache + generation_work)
    overhead = overhead_training if training >= generation else overhead_generation
    parts = {"weights": weights}
    if setup.use_peft:
        parts["trainable parameters (LoRA adapters)"] = adapters
    parts |= {"gradients": gradients, "optimizer state": optimizer}
    if setup.shards_weights:
        parts["weights gathered in flight (16-bit)"] = state["weights_in_flight"]
        parts["gradients in flight (16-bit)"] = state["gradients_in_flight"]
    parts |= {
        "activations kept for backward": activations + head_kept,
        "backward working set": max(head_backward, layer_backward),
        "generation KV cache": kv_cache,
        "generation working set": generation_work,
    }
    if weight_sync:
        parts["weight push to vLLM (one tensor)"] = weight_sync
    parts["step's rollouts (ids, masks, log-probs)"] = held
    return PhaseEstimate(
        completion_length, parts, training, generation, vllm_share, overhead, without_checkpointing, with_checkpointing,
        vllm_sleep=setup.vllm_sleep and setup.use_vllm and setup.vllm_mode == "colocate",
        vllm_asleep=VLLM_ASLEEP_BYTES if setup.vllm_sleep else 0.0,
        overhead_training=overhead_training, overhead_generation=overhead_generation,
        cpu_offload_per_node=state["cpu"] * setup.gpus_per_node,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The plan: every stage, a verdict and warnings
# ----------------------------------------------------------------------------------------------


@dataclass
class MemoryPlan:
    model: str
    shape_source: str
    shape: ModelShape
    setup: RunSetup
    gpu_memory: float | None  # bytes
    stages: list[tuple[tuple[int, float | None, int], PhaseEstimate]]
    warnings: list[str] = field(default_factory=list)

    @property
    def worst(self) -> PhaseEstimate:
        return max((estimate for _, estimate in self.stages), key=lambda e: e.total)

    @property
    def fits(self) -> bool | None:
        if self.gpu_memory is None:
            return None
        return all(e.total <= self.gpu_memory and e.vllm_share is not None for _, e in self.stages)


def gib(value: float) -> str:
    return f"{value / GIB:.2f}"


def plan_memory(model: str, shape: ModelShape, setup: RunSetup, gpu_memory_gib: float | None, shape_source: str = "") -> MemoryPlan:
    gpu_memory = gpu_memory_gib * GIB if gpu_memory_gib else None
    stages = [(stage, estimate(shape, setup, stage[2], gpu_memory)) for stage in setup.stages]
    plan = MemoryPlan(model, shape_source, shape, setup, gpu_memory, stages)
    plan.warnings = plan_warnings(plan)
    return plan


def plan_warnings(plan: MemoryPlan) -> list[str]:
    setup, shape, warnings = plan.setup, plan.shape, []
    first_stage, first = plan.stages[0]
    if plan.gpu_memory is not None and first.total <= plan.gpu_memory:
        for (step, _, length), later in plan.stages[1:]:
            if later.total > plan.gpu_memory:
                warnings.append(
                    f"fits at step 0 ({gib(first.total)} GiB) but not from step {step} on (max_completion_length "
                    f"{length}: {gib(later.total)} GiB): the run would run out of memory at step {step}, not at step 1; "
                    "shorten that stage or lower per_device_train_batch_size"
                )
                break
    longest = setup.max_prompt_length + setup.longest_completion
    if shape.max_position_embeddings and longest > shape.max_position_embeddings:
        beyond = [step for step, _, length in setup.stages if setup.max_prompt_length + length > shape.max_position_embeddings]
        warnings.append(
            f"prompt + completion exceeds the model's max_position_embeddings {shape.max_position_embeddings} from step "
            f"{beyond[0]} on (up to {longest} tokens): positions past it get RoPE angles the model was not trained on (no scaling; "
            "POLARIS trained its later stages this way), and vLLM refuses such a max_model_len unless "
            "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 is set. Memory is planned for the full length; rope scaling or shorter "
            "completions avoid the extrapolation"
        )
    (_, _, worst_length), worst = max(plan.stages, key=lambda item: item[1].total)
    if not setup.gradient_checkpointing and worst.activations_without_checkpointing > 2 * worst.activations_with_checkpointing:
        warnings.append(
            f"gradient_checkpointing is off: activations take {gib(worst.activations_without_checkpointing)} GiB "
            f"instead of {gib(worst.activations_with_checkpointing)} GiB with --gradient_checkpointing true"
        )
    kv, batch = worst.parts["generation KV cache"], setup.generation_batch_at(worst_length)
    if batch > max(setup.micro_batch, setup.num_generations) and kv > worst.parts["activations kept for backward"]:
        warnings.append(
            f"sampling {batch} sequences at once holds a {gib(kv)} GiB KV cache: a smaller "
            f"--generation_chunk_size shrinks it (down to per_device_train_batch_size)"
        )
    if setup.use_vllm and setup.vllm_mode == "colocate" and plan.gpu_memory is None:
        warnings.append("vLLM colocate mode reserves vllm_gpu_memory_utilization of the GPU: pass --gpu_memory to include it")
    return warnings


def describe_setup(plan: MemoryPlan) -> list[str]:
    setup, shape = plan.setup, plan.shape
    precision = {2: "16-bit", 4: "fp32"}.get(setup.weight_bytes, f"{setup.weight_bytes}-byte")
    if setup.compute_bytes and setup.weight_bytes == FP32:
        how = "FSDP2's MixedPrecisionPolicy" if setup.sharding == "fsdp" else "DeepSpeed's bf16 model"
        precision = f"fp32 master (layers computed in 16 bits by {how}, so activations are 16-bit)"
    elif setup.autocast:
        precision = "fp32 (16-bit autocast compute; activations at fp32, an upper bound: see below)"
    if setup.quantization == "4bit":
        weights = f"4-bit linear layers{' (nested quantization)' if setup.double_quant else ''}, {precision} embeddings and norms"
    elif setup.quantization == "8bit":
        weights = f"8-bit linear layers, {precision} embeddings and norms"
    else:
        weights = f"{precision} weights"
    if setup.use_peft:
        targets = lora_targets(shape, setup.lora_target_modules)
        training = (
            f"LoRA r={setup.lora_r} on {', '.join(t.split('.')[-1] for t in targets)} "
            f"({trainable_parameters(shape, setup) / 1e6:.1f}M trainable, adapters in "
            f"{'bf16' if setup.adapter_bytes == 2 else 'fp32'}), optimizer {setup.optimizer}"
        )
    else:
        training = f"full fine-tuning ({shape.num_parameters() / 1e9:.2f}B parameters), optimizer {setup.optimizer}"
    generation = (
        f"vLLM ({setup.vllm_mode} mode{', asleep while training' if setup.vllm_sleep else ''})"
        if setup.use_vllm else f"transformers generate, {stage_values([setup.generation_batch_at(length) for *_, length in setup.stages])} sequences at once"
    )  # fmt: skip
    lines = [
        f"model: {plan.model} ({shape.num_parameters() / 1e9:.2f}B parameters; shape from {plan.shape_source or 'arguments'})",
        f"weights: {weights}; {training}",
        f"training micro-batch: {setup.micro_batch} sequence(s) of up to {setup.max_prompt_length} prompt + "
        f"{setup.longest_completion} completion tokens; "
        f"gradient checkpointing {'on' if setup.gradient_checkpointing else 'off'}",
        f"generation: {generation}",
    ]
    if setup.num_gpus > 1 or setup.sharding:
        sharding = {None: "data parallel (each GPU holds the whole model)", "zero2": "DeepSpeed ZeRO-2",
                    "zero3": "DeepSpeed ZeRO-3", "fsdp": "FSDP2"}[setup.sharding]  # fmt: skip
        offload = [name for name, on in (("weights", setup.offload_params), ("optimizer state", setup.offload_optimizer)) if on]
        if setup.sharding == "fsdp" and setup.offload_params:
            offload = ["weights, gradients and the optimizer step (CPUOffloadPolicy)"]
        lines.append(
            f"GPUs: {setup.num_gpus} ({setup.gpus_per_node} per node), {sharding}"
            + (f", CPU offload of {' and '.join(offload)}" if offload else "")
        )
    return lines


def autocast_note(plan: MemoryPlan, completion_length: int) -> list[str]:
    """Both activation figures of an autocast run: the fp32 bound the verdict uses, and the estimate."""
    import dataclasses

    setup = plan.setup
    bound = estimate(plan.shape, setup, completion_length, plan.gpu_memory)
    likely = estimate(plan.shape, dataclasses.replace(setup, autocast_estimate=True), completion_length, plan.gpu_memory)
    key = "activations kept for backward"
    return [
        f"Activations under bf16 autocast with fp32 weights: {gib(likely.parts[key])} GiB estimated, {gib(bound.parts[key])} GiB "
        f"at most (the verdict uses the bound; total {gib(likely.total)} GiB with the estimate).",
        "  Kept at 16 bits: each matmul's own copy of its input (q, k and v each cast the norm's fp32 output), attention",
        "  inputs and output, the MLP's gate, up and SiLU outputs, the q/k norms' tensors. Kept at fp32: the residual stream",
        "  (gradient-checkpoint inputs) and the layer norms' tensors, since embeddings and norm weights are fp32 and additions",
        "  are not autocast. The estimate matches autograd under CPU autocast (tests/test_memory_planner.py); CUDA autocast's",
        "  op list and the attention kernel chosen on the GPU decide the rest, unknowable offline: benchmarks/gpu_check.sh",
        "  measures it.",
    ]


def fit_reasons(plan: MemoryPlan, worst: PhaseEstimate) -> list[str]:
    """One line per distributed or vLLM option: what it keeps on the GPU, and where the rest went."""
    setup, shape, reasons = plan.setup, plan.shape, []
    p = shape.num_parameters()
    if setup.shards_weights:
        on_gpu = worst.parts["weights"] + worst.parts["gradients"] + worst.parts["optimizer state"]
        where = (
            f"CPU offload keeps {gib(worst.cpu_offload_per_node)} GiB of them in each node's CPU memory "
            f"({setup.gpus_per_node} GPUs), {gib(on_gpu)} GiB stay on the GPU"
            if worst.cpu_offload_per_node else f"1/{setup.num_gpus} of them, {gib(on_gpu)} GiB, per GPU"
        )
        reasons.append(
            f"{'FSDP2' if setup.sharding == 'fsdp' else 'ZeRO-3'} shards fp32 weights, gradients and AdamW state "
            f"({p / 1e9:.2f}B parameters): {where}; the layers in flight gather "
            f"{gib(worst.parts['weights gathered in flight (16-bit)'] + worst.parts['gradients in flight (16-bit)'])} GiB of 16-bit weights and gradients"
        )
    elif setup.sharding == "zero2":
        reasons.append(f"ZeRO-2 shards gradients and optimizer state over {setup.num_gpus} GPUs; every GPU holds all the weights")
    if setup.compute_bytes and setup.weight_bytes == FP32:
        reasons.append("the layers compute in bf16 from the fp32 master weights, so activations are bf16 (no fp32 bound needed)")
    if setup.gradient_checkpointing:
        reasons.append(
            f"gradient checkpointing keeps each layer's input only: {gib(worst.parts['activations kept for backward'])} GiB for one "
            f"{setup.max_prompt_length + worst.completion_length}-token sequence (micro-batch {setup.micro_batch}, no padding beyond it)"
        )
    if setup.num_gpus > 1:
        reasons.append(
            "no sequence parallelism: TRL 1.16's GRPOConfig refuses cp_size / sp_size > 1, so each GPU keeps a whole "
            "sequence's activations (Ulysses over k GPUs would divide them by k); TRL's chunked log-prob head "
            f"({LOGPROB_TOKEN_CHUNK}-token tiles) keeps full-length logits off the GPU"
        )
    if worst.vllm_sleep:
        reasons.append(
            f"vllm_enable_sleep_mode: vLLM takes {setup.vllm_gpu_memory_utilization:g} of the GPU while sampling and frees it while "
            "training (sleep level 2: weights and KV cache dropped, weights pushed again before each sampling)"
        )
    elif setup.use_vllm and setup.vllm_mode == "colocate":
        reasons.append(f"vLLM colocate holds {setup.vllm_gpu_memory_utilization:g} of the GPU all along (vllm_enable_sleep_mode frees it while training)")
    return reasons if (setup.num_gpus > 1 or setup.sharding or worst.vllm_sleep) else []


def format_plan(plan: MemoryPlan) -> str:
    worst_stage = max(plan.stages, key=lambda item: item[1].total)
    (step, _, length), worst = worst_stage
    lines = ["Memory plan (estimate per GPU, before any weights load)", *("  " + line for line in describe_setup(plan)), ""]
    which = "the longest completions" if length == plan.setup.longest_completion else "the fullest stage"
    lines.append(f"Peak at {which} ({length} tokens, from step {step}), in GiB:")
    for name, value in worst.parts.items():
        note = ""
        if name == "activations kept for backward":
            other = worst.activations_without_checkpointing if plan.setup.gradient_checkpointing else worst.activations_with_checkpointing
            note = f"   ({'without' if plan.setup.gradient_checkpointing else 'with'} gradient checkpointing the layers would keep {gib(other)})"
        lines.append(f"  {name:<40}{gib(value):>8}{note}")
    setup = plan.setup
    if worst.vllm_sleep:
        lines.append(f"  {'trainer peak (training)':<40}{gib(worst.training):>8}   (the trainer's part of torch.cuda.max_memory_allocated)")
        # vLLM and the trainer take turns: each phase is the trainer's part plus vLLM's part at that time.
        share = gib(worst.vllm_share) if worst.vllm_share is not None else "?"
        lines += [
            f"  {'while training':<40}{gib(worst.training_total):>8}   (trainer {gib(worst.training)} + CUDA context and fragmentation "
            f"{gib(worst.overhead_training)} + vLLM asleep {gib(worst.vllm_asleep)}, a rule of thumb)",
            f"  {'while sampling':<40}{gib(worst.generation_total):>8}   (trainer {gib(worst.generation)} + CUDA context and fragmentation "
            f"{gib(worst.overhead_generation)} + vLLM awake {share}: vllm_gpu_memory_utilization {setup.vllm_gpu_memory_utilization})",
        ]
    else:
        lines.append(f"  {'peak phase: ' + worst.peak_phase:<40}{gib(worst.allocated):>8}   (what torch.cuda.max_memory_allocated reports)")
        lines.append(f"  {'CUDA context and fragmentation':<40}{gib(worst.overhead):>8}")
        if setup.use_vllm and setup.vllm_mode == "colocate":
            share = gib(worst.vllm_share) if worst.vllm_share is not None else "?"
            lines.append(f"  {'vLLM share (colocate)':<40}{share:>8}   (vllm_gpu_memory_utilization {setup.vllm_gpu_memory_utilization}, held all along)")
    phase = f"   (peak {'while ' + ('sampling' if worst.peak_phase == 'generation' else 'training')})" if worst.vllm_sleep else ""
    lines.append(f"  {'total':<40}{gib(worst.total):>8}{phase}")
    if setup.autocast and not setup.compute_bytes:
        lines += ["", *autocast_note(plan, length)]
    if len(plan.stages) > 1:
        lines += ["", "By stage:"]
        for (s_step, temperature, s_length), e in plan.stages:
            verdict = "" if plan.gpu_memory is None else ("  fits" if e.total <= plan.gpu_memory else "  DOES NOT FIT")
            phases = f"  (training {gib(e.training_total)}, sampling {gib(e.generation_total)})" if e.vllm_sleep else ""
            lines.append(f"  from step {s_step:>5}: temperature {temperature}, max_completion_length {s_length:>6}: {gib(e.total):>7} GiB{verdict}{phases}")
    if not setup.use_peft and setup.sharding is None:
        sharded = worst.parts["weights"] + worst.parts["gradients"] + worst.parts["optimizer state"]
        lines += [
            "",
            f"Weights, gradients and optimizer state take {gib(sharded)} GiB: ZeRO-3 / FSDP (accelerate/) divide them "
            f"among the GPUs, for a total of {gib(worst.total - sharded + sharded / 8)} GiB per GPU on 8 GPUs and "
            f"{gib(worst.total - sharded + sharded / 32)} GiB on 32.",
        ]
    reasons = fit_reasons(plan, worst)
    if reasons:
        lines += ["", "Why (what each option holds per GPU):", *("  - " + reason for reason in reasons)]
    lines.append("")
    if plan.gpu_memory is None:
        lines.append("No GPU size given: pass --gpu_memory GiB (e.g. 8, 12, 16, 24) for a verdict.")
    elif plan.fits:
        lines.append(f"Fits a {plan.gpu_memory / GIB:g} GiB GPU: {gib(plan.gpu_memory - worst.total)} GiB to spare at the fullest stage.")
    else:
        lines.append(f"DOES NOT FIT a {plan.gpu_memory / GIB:g} GiB GPU: {gib(worst.total - plan.gpu_memory)} GiB short at the fullest stage.")
    lines.append("Assumes every completion reaches max_completion_length: early steps use less, so only this worst case is safe.")
    lines += [f"warning: {warning}" for warning in plan.warnings]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# generation_chunk_size: auto
# ----------------------------------------------------------------------------------------------


SAFE_GENERATION_CHUNK = 8  # sequences per generate call where the GPU cannot be planned: the recipes' former fixed size


def largest_generation_chunk(shape: ModelShape, setup: RunSetup, gpu_memory: float) -> int:
    """The most sequences (up to the step's rollouts) one generate call may sample with the generation phase of
    every stage within `gpu_memory` bytes; 1 when not even one fits. Larger batches decode more tokens per
    step at the same per-step cost while a GPU is bound by kernel launches and weight reads."""
    from dataclasses import replace

    def fits(chunk: int) -> bool:
        trial = replace(setup, generation_batch=chunk, stage_generation_batches=None)
        return all(estimate(shape, trial, length, gpu_memory).generation_total <= gpu_memory for _, _, length in setup.stages)

    low, high = 1, max(1, setup.step_rollouts)
    while low < high:  # the estimate grows with the chunk: the largest that fits
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def resolve_auto_generation_chunk(script_args, training_args, model_args) -> str | None:
    """Turn `generation_chunk_size: auto` into a number of sequences and return the line that says which and
    why: the planner's largest fit on this GPU (or `--gpu_memory`); all of a step's rollouts where there is
    no GPU to plan for; `SAFE_GENERATION_CHUNK` where the model's shape is unknown. vLLM ignores the chunk."""
    from dataclasses import replace

    if training_args.generation_chunk_size != "auto":
        return None
    held = step_rollouts(training_args)
    if training_args.use_vllm:
        training_args.generation_chunk_size = None
        return None
    gpu_memory = getattr(script_args, "gpu_memory", None) or local_gpu_memory_gib()
    if gpu_memory is None:
        training_args.generation_chunk_size = held
        return (f"generation_chunk_size auto: no GPU to plan for, so all {held} rollouts of a step per process are "
                "sampled at once (--gpu_memory GiB plans for a GPU)")  # fmt: skip
    try:
        shape, _ = find_model_shape(model_args.model_name_or_path, model_args.model_revision)
    except UserError:
        training_args.generation_chunk_size = min(held, SAFE_GENERATION_CHUNK)
        return (f"generation_chunk_size auto: the memory planner does not know the shape of {model_args.model_name_or_path}, "
                f"so {training_args.generation_chunk_size} sequences are sampled at a time (halved on out-of-memory; "
                "--generation_chunk_size N chooses)")  # fmt: skip
    setup = setup_from_args(script_args, training_args, model_args)
    # Planned stage by stage: early stages' shorter completions leave room for more sequences at once.
    chunks = {length: largest_generation_chunk(shape, replace(setup, stages=[(step, temperature, length)]), gpu_memory * GIB)
              for step, temperature, length in setup.stages}  # fmt: skip
    lengths = [length for *_, length in setup.stages]
    training_args.generation_chunk_size = chunks[lengths[0]]
    training_args.stage_generation_chunks = chunks if len(set(chunks.values())) > 1 else None  # schedules.apply_stage sets each
    planned = max(estimate(shape, replace(setup, stage_generation_batches=chunks), length, gpu_memory * GIB).generation_total for length in lengths)
    if training_args.stage_generation_chunks is None:
        where = f"the most a {gpu_memory:g} GiB GPU holds at the longest stage"
    else:
        where = f"by stage ({stage_values(lengths)}-token completions): the most a {gpu_memory:g} GiB GPU holds at each"
    return (f"generation_chunk_size auto: {stage_values([chunks[length] for length in lengths])} of the step's {held} rollouts per "
            f"generate call, {where} (sampling planned at {gib(planned)} GiB; halved on out-of-memory)")  # fmt: skip


def stage_values(values: list) -> str:
    """`20 / 14 / 10` for values that differ by stage, `10` for one value."""
    return " / ".join(str(value) for value in values) if len(set(values)) > 1 else str(values[0])


def launch_differs_from_plan(script_args, training_args) -> str | None:
    """A note when the run was launched otherwise than the `--accelerate_config` its plan counts."""
    import os

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


def local_gpu_memory_gib() -> float | None:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GIB
    return None


def print_plan(script_args, training_args, model_args) -> MemoryPlan:
    """`train_grpo.py --plan`: print the plan of the parsed arguments, loading no weights."""
    name = model_args.model_name_or_path
    if not name:
        raise UserError("no model given: pass --model_name_or_path (a hub id, a local directory or `toy`)")
    shape, source = find_model_shape(name, model_args.model_revision)
    chunk_note = resolve_auto_generation_chunk(script_args, training_args, model_args)
    setup = setup_from_args(script_args, training_args, model_args)
    gpu_memory = script_args.gpu_memory if script_args.gpu_memory else local_gpu_memory_gib()
    plan = plan_memory(name, shape, setup, gpu_memory, source)
    print(format_plan(plan))
    if chunk_note:
        print(chunk_note)
    return plan
