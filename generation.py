"""Batched sampling of n completions per prompt with transformers.

Shared by the demo's before/after measurement in `train_grpo.py`, by `filter_data.py` and by
`evaluate.py`, so that every number this project reports comes from the same sampling code.
Prompts are grouped by length (less padding), left-padded, and each prompt's n samples come from
one `generate` call; on CUDA out-of-memory the batch is halved and retried.

`sample_completions_vllm` is the same with vLLM (optional, not installed by requirements.txt): one
seed per prompt, so a prompt's samples do not depend on the other prompts of the call.
"""

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Sample:
    text: str
    num_tokens: int
    truncated: bool  # stopped by the length limit rather than by an end-of-sequence token


def _prompt_ids(tokenizer, messages) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _generate_batch(model, tokenizer, batch_ids, num_samples, max_new_tokens, sampling):
    import torch

    length = max(len(ids) for ids in batch_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (length - len(ids)) + ids for ids in batch_ids], device=model.device)
    attention_mask = torch.tensor([[0] * (length - len(ids)) + [1] * len(ids) for ids in batch_ids], device=model.device)
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_samples,
            pad_token_id=pad,
            **sampling,
        )
    completion_ids = output[:, length:].tolist()
    eos_ids = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list) else [model.generation_config.eos_token_id or tokenizer.eos_token_id])
    samples = []
    for ids in completion_ids:
        stop = next((i for i, token in enumerate(ids) if token in eos_ids), None)
        kept = ids[: stop + 1] if stop is not None else [t for t in ids if t != pad]
        text = tokenizer.decode(kept, skip_special_tokens=True)
        samples.append(Sample(text=text, num_tokens=len(kept), truncated=stop is None and len(kept) >= max_new_tokens))
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
    """Sample `num_samples` completions for each chat prompt; returns them in the prompts' order.

    `batch_size` counts sequences (prompts x samples) per `generate` call. A `seed` makes the run
    reproducible: the generator is reseeded before each batch. Batched sampling depends on which
    prompts share a batch, so the same prompts with the same `batch_size` and `seed` give the same
    samples. With `adapt_batch_size=False` a CUDA out-of-memory error is raised instead of halving
    the batch, for callers that must know the batch size every result was drawn with.
    """
    import torch
    from tqdm.auto import tqdm

    sampling = {"do_sample": temperature > 0}
    if temperature > 0:
        sampling.update(temperature=temperature, top_p=top_p, top_k=top_k)
    else:
        sampling.update(temperature=None, top_p=None, top_k=None)
    encoded = [_prompt_ids(tokenizer, messages) for messages in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    prompts_per_batch = max(1, batch_size // num_samples)
    results: list[list[Sample] | None] = [None] * len(encoded)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(encoded), desc=desc, unit="prompt", disable=not progress)
    position, batch_number = 0, 0
    while position < len(order):
        indices = order[position : position + prompts_per_batch]
        if seed is not None:
            torch.manual_seed(seed + batch_number)
        try:
            batch = _generate_batch(model, tokenizer, [encoded[i] for i in indices], num_samples, max_new_tokens, sampling)
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


# ----------------------------------------------------------------------------------------------
# Loading, and the vLLM backend
# ----------------------------------------------------------------------------------------------


def _torch_dtype(dtype: str):
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _load_error(model_name: str, error: Exception):
    from data import UserError

    looks_like_path = Path(model_name).is_absolute() or model_name.startswith((".", "~")) or model_name.count("/") > 1
    if looks_like_path and not Path(model_name).expanduser().exists():  # a hub id is `name` or `org/name`
        return UserError(f"no such model directory: {model_name}")
    reason = (str(error).strip() or type(error).__name__).splitlines()[0]
    return UserError(
        f"could not load model '{model_name}': {reason} (give a local model directory, or a hub id that is downloadable or already cached)"
    )


def load_tokenizer(model_name: str, trust_remote_code: bool = False):
    """The model's tokenizer (its chat template builds every prompt); `data.UserError` when it cannot be loaded."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:  # missing files, no network, an invalid name
        raise _load_error(model_name, error) from error


def load_model(model_name: str, dtype: str = "auto", trust_remote_code: bool = False):
    """A transformers model for sampling: eval mode, on the GPU when there is one.

    `dtype`: `auto` (bfloat16 or float16 on a GPU, float32 on CPU), `bfloat16`, `float16` or `float32`.
    Raises `data.UserError` (one line) when the model cannot be loaded.
    """
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(model_name, dtype=_torch_dtype(dtype), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:  # missing weights, no network, an unknown architecture
        raise _load_error(model_name, error) from error
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval()


def load_vllm(
    model_name: str, dtype: str = "auto", seed: int = 0, max_model_len: int | None = None, trust_remote_code: bool = False, **llm_kwargs
):
    """A `vllm.LLM`; raises `data.UserError` (one line) when vLLM is not installed.

    `llm_kwargs` go to `vllm.LLM` as they are (e.g. `hf_overrides` for YaRN, `gpu_memory_utilization`)."""
    from data import UserError

    try:
        from vllm import LLM
    except ImportError as error:
        raise UserError(
            f"the vllm backend needs vLLM, which cannot be imported ({error}): pip install vllm on a CUDA machine, or use --backend hf"
        ) from None
    try:
        return LLM(model=model_name, dtype=dtype, seed=seed, max_model_len=max_model_len, trust_remote_code=trust_remote_code, **llm_kwargs)
    except (OSError, ValueError) as error:
        raise _load_error(model_name, error) from error


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
    requests = [{"prompt_token_ids": _prompt_ids(tokenizer, messages)} for messages in prompts]
    outputs = llm.generate(requests, params, use_tqdm=False)
    return [
        [Sample(text=o.text, num_tokens=len(o.token_ids), truncated=o.finish_reason == "length") for o in output.outputs]
        for output in outputs
    ]
