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
- vLLM's share of the GPU (colocate mode reserves `vllm_gpu_memory_utilization` of it up front),
- the CUDA context and the allocator's fragmentation (rules of thumb).

The peak is the larger of the two phases. It assumes every completion reaches max_completion_length: early
in a run completions are shorter, so a setting that is over budget can run for hours and then fail when
responses grow. The longest stage is the one that must fit. `python benchmarks/gpu_check.sh` compares these
estimates with measured peaks on a GPU.
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

    @property
    def activation_bytes(self) -> int:
        # Quantized layers compute in, and return, the dtype of the rest of the model. Under autocast,
        # residual stream and norms stay fp32 while matmuls return 16-bit: counting all at fp32 bounds it.
        return self.weight_bytes

    @property
    def kv_bytes(self) -> int:
        return 2 if self.autocast else self.weight_bytes

    @property
    def adapter_bytes(self) -> int:
        if self.quantization:
            return 2  # TRL casts QLoRA adapters to bf16 (grpo_trainer.py)
        return FP32  # PEFT keeps adapters of 16-bit models in fp32 (autocast_adapter_dtype)

    @property
    def trainable_bytes(self) -> int:
        return self.adapter_bytes if self.use_peft else self.weight_bytes

    @property
    def longest_completion(self) -> int:
        return max(length for _, _, length in self.stages)


def step_rollouts(training_args, chunked: bool = False) -> int:
    """Rollouts one process holds per generation batch, or samples in one call (`chunked`)."""
    held = training_args.per_device_train_batch_size * training_args.steps_per_generation
    chunk = getattr(training_args, "generation_chunk_size", None)
    return min(held, chunk) if chunked and chunk and not training_args.use_vllm else held


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
    return RunSetup(
        micro_batch=training_args.per_device_train_batch_size,
        generation_batch=step_rollouts(training_args, chunked=True),
        step_rollouts=step_rollouts(training_args),
        old_logps=bool(training_args.use_vllm and training_args.vllm_importance_sampling_correction)
        or training_args.num_iterations > 1,
        max_prompt_length=int(script_args.max_prompt_length or 1024),
        stages=stages,
        num_generations=training_args.num_generations,
        weight_bytes=weight_bytes,
        autocast=weight_bytes == FP32 and bool(sixteen_bit_compute),
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
    norms_train = not setup.use_peft
    total = 2 * _rms_norm_saved_bytes(h, 1, norms_train, a)  # input and post-attention norms
    if shape.qk_norm:
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
            total += 0 if already_kept else a * width
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
        return tokens * (shape.num_layers * setup.activation_bytes * shape.hidden_size + per_layer) + weight_copies
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

    @property
    def allocated(self) -> float:
        """What PyTorch allocates at the peak (comparable with torch.cuda.max_memory_allocated)."""
        return max(self.training, self.generation)

    @property
    def peak_phase(self) -> str:
        return "training" if self.training >= self.generation else "generation"

    @property
    def total(self) -> float:
        return self.allocated + self.overhead + (self.vllm_share or 0.0)


def estimate(shape: ModelShape, setup: RunSetup, completion_length: int, gpu_memory: float | None = None) -> PhaseEstimate:
    """Peak memory (bytes) of one GPU for completions of `completion_length` tokens."""
    a, h = setup.activation_bytes, shape.hidden_size
    weights = weight_bytes(shape, setup)
    trainable = trainable_parameters(shape, setup)
    gradients = trainable * setup.trainable_bytes
    optimizer = trainable * optimizer_state_bytes(setup.optimizer, setup.trainable_bytes)
    adapters = trainable * setup.adapter_bytes if setup.use_peft else 0.0
    persistent = weights + adapters + optimizer

    # Training: one micro-batch of full-length sequences (TRL pads to the longest in the batch).
    tokens = setup.micro_batch * (setup.max_prompt_length + completion_length)
    with_checkpointing = saved_activation_bytes(shape, setup, tokens, checkpointing=True)
    without_checkpointing = saved_activation_bytes(shape, setup, tokens, checkpointing=False)
    activations = with_checkpointing if setup.gradient_checkpointing else without_checkpointing
    # The chunked log-prob head keeps the final norm's tensors and its input; its backward adds a logits
    # tile, the fp32 gradient of the hidden states and, when the head trains, a fp32 weight gradient.
    head_kept = tokens * (_rms_norm_saved_bytes(h, 1, not setup.use_peft, a) + a * h)
    head_backward = min(tokens, LOGPROB_TOKEN_CHUNK) * min(shape.vocab_size, LOGPROB_VOCAB_CHUNK) * a + tokens * FP32 * h
    if not setup.use_peft:
        head_backward += shape.vocab_size * h * FP32
    # A layer's backward holds gradients of its widest intermediates (residual stream and MLP).
    layer_backward = tokens * a * (3 * h + 3 * shape.intermediate_size)
    training = persistent + gradients + activations + head_kept + max(head_backward, layer_backward)

    # Generation with transformers: the KV cache of the whole generation batch at full length, plus the
    # larger of the prompt prefill's intermediates (one layer) and, while decoding, the copy of one
    # layer's cache that DynamicCache makes as it grows and the fp32 logits of the last position.
    sequences, length = setup.generation_batch, setup.max_prompt_length + completion_length
    if setup.use_vllm:
        kv_cache = generation_work = 0.0  # inside vLLM's own memory
    else:
        kv_cache = sequences * length * shape.kv_cache_bytes_per_token(setup.kv_bytes)
        prefill = sequences * setup.max_prompt_length * a * (h + shape.q_dim + 2 * shape.kv_dim + 2 * shape.intermediate_size)
        decode = kv_cache / shape.num_layers + 2 * sequences * shape.vocab_size * FP32
        generation_work = max(prefill, decode)
    generation = persistent + kv_cache + generation_work

    # The step's rollouts stay on the GPU from sampling to the last micro-batch, twice while repair copies
    # them: int64 prompt and completion ids and masks, fp32 advantages and, when kept, fp32 old log-probs.
    rows = setup.step_rollouts
    held = 2 * rows * (length * (8 + 8) + 4 + (completion_length * FP32 if setup.old_logps else 0))
    training += held
    generation += held

    vllm_share = 0.0
    if setup.use_vllm and setup.vllm_mode == "colocate":
        vllm_share = setup.vllm_gpu_memory_utilization * gpu_memory if gpu_memory else None
    dynamic = activations + head_kept if training >= generation else kv_cache + generation_work
    overhead = CUDA_CONTEXT_BYTES + FRAGMENTATION * dynamic
    parts = {"weights": weights}
    if setup.use_peft:
        parts["trainable parameters (LoRA adapters)"] = adapters
    parts |= {
        "gradients": gradients,
        "optimizer state": optimizer,
        "activations kept for backward": activations + head_kept,
        "backward working set": max(head_backward, layer_backward),
        "generation KV cache": kv_cache,
        "generation working set": generation_work,
        "step's rollouts (ids, masks, log-probs)": held,
    }
    return PhaseEstimate(completion_length, parts, training, generation, vllm_share, overhead, without_checkpointing, with_checkpointing)


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
        warnings.append(
            f"prompt + completion reaches {longest} tokens, beyond the model's max_position_embeddings "
            f"{shape.max_position_embeddings}: extend the context (rope scaling) or shorten the completions"
        )
    worst = plan.worst
    if not setup.gradient_checkpointing and worst.activations_without_checkpointing > 2 * worst.activations_with_checkpointing:
        warnings.append(
            f"gradient_checkpointing is off: activations take {gib(worst.activations_without_checkpointing)} GiB "
            f"instead of {gib(worst.activations_with_checkpointing)} GiB with --gradient_checkpointing true"
        )
    kv = worst.parts["generation KV cache"]
    if setup.generation_batch > max(setup.micro_batch, setup.num_generations) and kv > worst.parts["activations kept for backward"]:
        warnings.append(
            f"sampling {setup.generation_batch} sequences at once holds a {gib(kv)} GiB KV cache: a smaller "
            f"--generation_chunk_size shrinks it (down to per_device_train_batch_size)"
        )
    if setup.use_vllm and setup.vllm_mode == "colocate" and plan.gpu_memory is None:
        warnings.append("vLLM colocate mode reserves vllm_gpu_memory_utilization of the GPU: pass --gpu_memory to include it")
    return warnings


def describe_setup(plan: MemoryPlan) -> list[str]:
    setup, shape = plan.setup, plan.shape
    precision = {2: "16-bit", 4: "fp32"}.get(setup.weight_bytes, f"{setup.weight_bytes}-byte")
    if setup.autocast:
        precision = "fp32 (16-bit autocast compute; activations counted at fp32, an upper bound)"
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
        f"vLLM ({setup.vllm_mode} mode)" if setup.use_vllm else f"transformers generate, {setup.generation_batch} sequences at once"
    )
    return [
        f"model: {plan.model} ({shape.num_parameters() / 1e9:.2f}B parameters; shape from {plan.shape_source or 'arguments'})",
        f"weights: {weights}; {training}",
        f"training micro-batch: {setup.micro_batch} sequence(s) of up to {setup.max_prompt_length} prompt + "
        f"{setup.longest_completion} completion tokens; "
        f"gradient checkpointing {'on' if setup.gradient_checkpointing else 'off'}",
        f"generation: {generation}",
    ]


def format_plan(plan: MemoryPlan) -> str:
    worst_stage = max(plan.stages, key=lambda item: item[1].total)
    (step, _, length), worst = worst_stage
    lines = ["Memory plan (estimate per GPU, before any weights load)", *("  " + line for line in describe_setup(plan)), ""]
    lines.append(f"Peak at the longest completions ({length} tokens, from step {step}), in GiB:")
    for name, value in worst.parts.items():
        note = ""
        if name == "activations kept for backward":
            other = worst.activations_without_checkpointing if plan.setup.gradient_checkpointing else worst.activations_with_checkpointing
            note = f"   ({'without' if plan.setup.gradient_checkpointing else 'with'} gradient checkpointing the layers would keep {gib(other)})"
        lines.append(f"  {name:<40}{gib(value):>8}{note}")
    lines.append(f"  {'peak phase: ' + worst.peak_phase:<40}{gib(worst.allocated):>8}   (what torch.cuda.max_memory_allocated reports)")
    lines.append(f"  {'CUDA context and fragmentation':<40}{gib(worst.overhead):>8}")
    if plan.setup.use_vllm and plan.setup.vllm_mode == "colocate":
        share = gib(worst.vllm_share) if worst.vllm_share is not None else "?"
        lines.append(f"  {'vLLM share (colocate)':<40}{share:>8}   (vllm_gpu_memory_utilization {plan.setup.vllm_gpu_memory_utilization})")
    lines.append(f"  {'total':<40}{gib(worst.total):>8}")
    if len(plan.stages) > 1:
        lines += ["", "By stage:"]
        for (s_step, temperature, s_length), e in plan.stages:
            verdict = "" if plan.gpu_memory is None else ("  fits" if e.total <= plan.gpu_memory else "  DOES NOT FIT")
            lines.append(f"  from step {s_step:>5}: temperature {temperature}, max_completion_length {s_length:>6}: {gib(e.total):>7} GiB{verdict}")
    if not plan.setup.use_peft:
        sharded = worst.parts["weights"] + worst.parts["gradients"] + worst.parts["optimizer state"]
        lines += [
            "",
            f"Weights, gradients and optimizer state take {gib(sharded)} GiB: ZeRO-3 / FSDP (accelerate/) divide them "
            f"among the GPUs, for a total of {gib(worst.total - sharded + sharded / 8)} GiB per GPU on 8 GPUs and "
            f"{gib(worst.total - sharded + sharded / 32)} GiB on 32.",
        ]
    lines.append("")
    if plan.gpu_memory is None:
        lines.append("No GPU size given: pass --gpu_memory GiB (e.g. 8, 12, 16, 24) for a verdict.")
    elif plan.fits:
        lines.append(f"Fits a {plan.gpu_memory / GIB:g} GiB GPU: {gib(plan.gpu_memory - worst.total)} GiB to spare at the longest stage.")
    else:
        lines.append(f"DOES NOT FIT a {plan.gpu_memory / GIB:g} GiB GPU: {gib(worst.total - plan.gpu_memory)} GiB short at the longest stage.")
    lines.append("Assumes every completion reaches max_completion_length: early steps use less, so only this worst case is safe.")
    lines += [f"warning: {warning}" for warning in plan.warnings]
    return "\n".join(lines)


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
    setup = setup_from_args(script_args, training_args, model_args)
    gpu_memory = script_args.gpu_memory if script_args.gpu_memory else local_gpu_memory_gib()
    plan = plan_memory(name, shape, setup, gpu_memory, source)
    print(format_plan(plan))
    return plan
