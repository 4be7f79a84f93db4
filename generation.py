"""Batched sampling of n completions per prompt with transformers.

Shared by the demo's before/after measurement in `train_grpo.py`, by `filter_data.py` and by
`evaluate.py`, so that every number this project reports comes from the same sampling code.
Prompts are grouped by length (less padding), left-padded, and each prompt's n samples come from
one `generate` call; on CUDA out-of-memory the batch is halved and retried.
"""

from dataclasses import dataclass


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
    pad = tokenizer.pad_token_id
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
) -> list[list[Sample]]:
    """Sample `num_samples` completions for each chat prompt; returns them in the prompts' order.

    `batch_size` counts sequences (prompts x samples) per `generate` call. A `seed` makes the run
    reproducible: the generator is reseeded before each batch.
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
            if prompts_per_batch == 1:
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
