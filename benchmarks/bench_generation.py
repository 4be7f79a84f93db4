"""Batched sampling against one prompt at a time: problems per second on the toy model.

Both runs sample the same problems, the same number of samples per problem, at the same temperature
and length limit, in this process, with `generation.sample_completions` (what `filter_data.py`,
`evaluate.py` and the demo's before/after measurement use):

- batched: `--batch_size` sequences (problems x samples) per `generate` call, prompts grouped by
  length and left-padded;
- one prompt at a time: one `generate` call per problem (its n samples together).

    python benchmarks/bench_generation.py                      # 64 problems x 8 samples, 48 tokens
    python benchmarks/bench_generation.py --num_problems 16    # quicker

On a GPU the gap grows with the batch; on a CPU it is smaller, as each step's matrix work grows with it.
"""

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


@dataclass
class BenchArguments:
    num_problems: int = field(default=64, metadata={"help": "Toy training problems sampled by both runs."})
    num_samples: int = field(default=8, metadata={"help": "Samples per problem."})
    max_tokens: int = field(default=48, metadata={"help": "Longest completion (the demo recipe's length)."})
    temperature: float = field(default=1.0)
    batch_size: int = field(default=256, metadata={"help": "Sequences per generate call in the batched run."})
    seed: int = field(default=0)
    toy_dir: str = field(default=str(REPO_ROOT / "outputs" / "toy"), metadata={"help": "Toy world (built if missing)."})


def timed_sampling(model, tokenizer, prompts, args: BenchArguments, batch_size: int) -> dict:
    from generation import sample_completions

    start = time.perf_counter()
    samples = sample_completions(
        model, tokenizer, prompts, num_samples=args.num_samples, temperature=args.temperature,
        max_new_tokens=args.max_tokens, batch_size=batch_size, seed=args.seed, progress=False,
    )
    seconds = time.perf_counter() - start
    tokens = [s.num_tokens for group in samples for s in group]
    assert len(samples) == len(prompts) and all(len(group) == args.num_samples for group in samples)
    return {"seconds": seconds, "problems_per_s": len(prompts) / seconds, "mean_tokens": sum(tokens) / len(tokens)}


def main(args: BenchArguments):
    import torch

    import toy
    from data import load_problems
    from generation import load_model, load_tokenizer

    world = toy.build_toy_world(toy.ToyArguments(output_dir=args.toy_dir))
    tokenizer = load_tokenizer(str(world / "model"))
    model = load_model(str(world / "model"))
    problems = load_problems(str(world / "train.jsonl"))
    prompts = problems.select(range(min(args.num_problems, len(problems))))["prompt"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"{len(prompts)} problems x {args.num_samples} samples, up to {args.max_tokens} tokens, temperature {args.temperature}; {device}")

    timed_sampling(model, tokenizer, prompts[:2], args, args.batch_size)  # warm-up: first-call costs count for neither
    one_at_a_time = timed_sampling(model, tokenizer, prompts, args, args.num_samples)
    batched = timed_sampling(model, tokenizer, prompts, args, args.batch_size)

    print(f"\n{'run':<32}{'seconds':>9}{'problems/s':>12}{'mean tokens':>13}")
    for name, row in (("one prompt per call", one_at_a_time), (f"batched ({args.batch_size} sequences/call)", batched)):
        print(f"{name:<32}{row['seconds']:>9.1f}{row['problems_per_s']:>12.2f}{row['mean_tokens']:>13.2f}")
    print(f"\nbatched / one at a time: {batched['problems_per_s'] / one_at_a_time['problems_per_s']:.1f}x problems per second")


if __name__ == "__main__":
    from transformers import HfArgumentParser

    main(*HfArgumentParser(BenchArguments).parse_args_into_dataclasses())
