"""The batch repair's bookkeeping at POLARIS-4B's scale, before and after, without a model.

Two costs that grow with the run, each measured both ways in this process on the same data:

- the per-prompt ledger (batch_repair.PromptLedger): bytes per prompt in the file and in each process'
  memory, with the kept correct completion as plain text (ledger version 1, before) and zlib-compressed
  (version 2, after). The completions are distinct slices of a real text corpus (sympy's source: English,
  code and formulas) of polaris-4b's stage-3 lengths; real model completions compress differently, so the
  ratio printed is for this proxy text.
- the repair's extra memory on one process when informative substitution copies groups: every row of the
  optimizer step gathered to every process (`merge_rows` of all, then `take_rows`: before) against `copy_rows` (after), where each
  owner broadcasts only the rows another process copies, one owner and one field at a time, at
  polaris-4b's shapes: 32 processes x 32 rows of 1,024 prompt + 52,224 completion tokens (int64 ids and
  masks, as TRL holds them). The 32 processes are threads whose broadcast is a barrier and a copy, as
  torch.distributed's; both paths give the same rows (checked).

    python benchmarks/bench_repair_scale.py                       # polaris-4b, a quarter of the groups substituted
    python benchmarks/bench_repair_scale.py --zero_variance_fraction 0.6 --sample_prompts 50
"""

import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

MiB = 1024**2


@dataclass
class BenchArguments:
    num_prompts: int = field(default=53_000, metadata={"help": "Prompts in the data set (POLARIS: 53K), for the totals."})
    sample_prompts: int = field(default=100, metadata={"help": "Prompts whose ledger entries are built and measured."})
    max_completion_tokens: int = field(default=52_224, metadata={"help": "polaris-4b's stage-3 completion length."})
    min_completion_fraction: float = field(default=0.25, metadata={"help": "Kept completions are uniformly 25-100% of the maximum."})
    chars_per_token: float = field(default=4.0, metadata={"help": "Characters of text per token (an assumption)."})
    num_processes: int = field(default=32)
    rows_per_process: int = field(default=32, metadata={"help": "per_device_train_batch_size x gradient_accumulation_steps."})
    num_generations: int = field(default=8)
    max_prompt_tokens: int = field(default=1024)
    zero_variance_fraction: float = field(default=0.25, metadata={"help": "Groups replaced by copies of informative ones."})
    seed: int = field(default=0)


# ----------------------------------------------------------------------------------------------
# The ledger
# ----------------------------------------------------------------------------------------------


def corpus_text(min_chars: int) -> str:
    """Distinct real text: sympy's source files, concatenated until there is enough."""
    import sympy

    pieces, total = [], 0
    for path in sorted(Path(sympy.__file__).parent.rglob("*.py")):
        text = path.read_text(errors="replace")
        pieces.append(text)
        total += len(text)
        if total >= min_chars:
            return "".join(pieces)
    print(f"sympy's source holds {total} characters, fewer than the {min_chars} asked for: lower --sample_prompts", file=sys.stderr)
    sys.exit(2)


def kept_completions(args: BenchArguments) -> list[str]:
    rng = random.Random(args.seed)
    lengths = [int(args.chars_per_token * args.max_completion_tokens * rng.uniform(args.min_completion_fraction, 1.0)) for _ in range(args.sample_prompts)]
    text, start, completions = corpus_text(sum(lengths)), 0, []
    for length in lengths:  # consecutive slices: no completion repeats another
        completions.append(text[start : start + length])
        start += length
    return completions


def version_1_entry_bytes(completion: str) -> tuple[int, int]:
    """(file, memory) bytes of a ledger entry holding its completion as text, as version 1 did."""
    import json

    entry = {"seen": 2, "group_rewards": [0.125, 0.5], "kept_completion": completion, "kept_step": 300}
    return len(json.dumps(entry).encode()), sys.getsizeof(completion)


def version_2_entry_bytes(completion: str) -> tuple[int, int]:
    """(file, memory) bytes of the entry PromptLedger writes and holds now."""
    import json

    from batch_repair import PromptLedger

    ledger = PromptLedger()
    ledger.record("p", 0.125)
    ledger.record("p", 0.5, completion, step=300)
    entry = ledger.prompts["p"]
    return len(json.dumps(PromptLedger.entry_json(entry)).encode()), sys.getsizeof(entry["kept_zlib"])


def measure_ledger(args: BenchArguments) -> dict:
    completions = kept_completions(args)
    before = [version_1_entry_bytes(c) for c in completions]
    after = [version_2_entry_bytes(c) for c in completions]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return {
        "chars": mean([len(c) for c in completions]),
        "file_before": mean([b[0] for b in before]), "file_after": mean([a[0] for a in after]),
        "memory_before": mean([b[1] for b in before]), "memory_after": mean([a[1] for a in after]),
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The repair's gather
# ----------------------------------------------------------------------------------------------


def process_batch(args: BenchArguments, generator) -> dict:
    """One process' rows as TRL's `_generate_and_score_completions` returns them for polaris-4b."""
    import torch

    rows, prompt, completion = args.rows_per_process, args.max_prompt_tokens, args.max_completion_tokens
    return {
        "prompt_ids": torch.randint(0, 151_936, (rows, prompt), generator=generator),
        "prompt_mask": torch.ones(rows, prompt, dtype=torch.long),
        "completion_ids": torch.randint(0, 151_936, (rows, completion), generator=generator),
        "completion_mask": torch.ones(rows, completion, dtype=torch.long),
        "advantages": torch.randn(rows, generator=generator),
    }


def nbytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class ThreadedBroadcast:
    """Each simulated process is a thread; a broadcast hands the owner's tensor to the others (a barrier),
    as torch.distributed does. Records the largest tensor process 0 holds in a broadcast."""

    def __init__(self, num_processes):
        import threading

        self.barrier, self.slot, self.largest = threading.Barrier(num_processes), None, 0

    def __call__(self, process, tensor, from_process):
        if process == from_process:
            self.slot = tensor
        self.barrier.wait()
        if process != from_process:
            tensor.copy_(self.slot)
        if process == 0:
            self.largest = max(self.largest, tensor.numel() * tensor.element_size())
        self.barrier.wait()
        return tensor


def measure_repair(args: BenchArguments) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from batch_repair import copy_rows, merge_rows, plan_batch, row_fields, row_sources, rows_to_send, take_rows

    generator = torch.Generator().manual_seed(args.seed)
    # Every process' rows are process 0's tensors (values do not change the sizes); process 0 is measured.
    batch = process_batch(args, generator)
    fields = row_fields(batch, pad_token_id=0)
    num_groups = args.num_processes * args.rows_per_process // args.num_generations
    rng = random.Random(args.seed)
    informative = [rng.random() >= args.zero_variance_fraction for _ in range(num_groups)]
    plan = plan_batch(informative, 1 / 3, random.Random(args.seed))
    sources = row_sources(plan.group_sources, args.num_generations).tolist()
    local_rows = args.rows_per_process

    # Before: every process' rows reach every process (what the repair's gather returned), then it takes its slots.
    pool = merge_rows([batch] * args.num_processes, fields)
    before_output = take_rows(pool, torch.tensor(sources[:local_rows]))
    before = {"gathered": nbytes(pool), "output": nbytes(before_output)}
    del pool

    # After: copy_rows on every simulated process; each owner broadcasts only the rows others copy from it.
    broadcast = ThreadedBroadcast(args.num_processes)

    class Accelerator:
        num_processes = args.num_processes

        def __init__(self, process):
            self.process_index = process

        def gather(self, tensor):  # the widths: every process' are process 0's
            return torch.cat([tensor] * args.num_processes)

    def run(process):
        output = copy_rows(Accelerator(process), [batch], fields, sources, lambda t, source: broadcast(process, t, source))
        return output if process == 0 else None

    with ThreadPoolExecutor(args.num_processes) as pool:
        after_output = list(pool.map(run, range(args.num_processes)))[0]
    after = {"largest broadcast": broadcast.largest, "output": nbytes(after_output)}
    same = all(torch.equal(after_output[key], before_output[key]) for key in fields)
    return {
        "groups": num_groups, "substituted": plan.substituted,
        "rows_copied_across": sum(len(r) for r in rows_to_send(sources, local_rows, args.num_processes)),
        "rows": args.num_processes * local_rows, "before": before, "after": after, "same_rows": same,
    }  # fmt: skip


def main(args: BenchArguments):
    ledger = measure_ledger(args)
    print(f"Ledger entry of a prompt with a kept completion ({args.sample_prompts} prompts, completions of "
          f"{ledger['chars'] / args.chars_per_token:,.0f} tokens on average, proxy text):")  # fmt: skip
    for where in ("file", "memory"):
        b, a = ledger[f"{where}_before"], ledger[f"{where}_after"]
        print(f"  {where + ' bytes per prompt':<26} before {b:>12,.0f}   after {a:>12,.0f}   ratio {b / a:5.2f}x")
    total = lambda value: value * args.num_prompts / 1024**3  # noqa: E731
    print(f"  at {args.num_prompts:,} prompts with a kept completion: file {total(ledger['file_before']):.2f} -> "
          f"{total(ledger['file_after']):.2f} GiB per write, memory {total(ledger['memory_before']):.2f} -> "
          f"{total(ledger['memory_after']):.2f} GiB in every process")  # fmt: skip

    repair = measure_repair(args)
    before, after = repair["before"], repair["after"]
    extra_before, extra_after = before["gathered"] + before["output"], after["largest broadcast"] + after["output"]
    print()
    print(f"Informative substitution, {args.num_processes} processes x {args.rows_per_process} rows of "
          f"{args.max_prompt_tokens} + {args.max_completion_tokens} tokens: {repair['substituted']} of {repair['groups']} groups "
          f"substituted, {repair['rows_copied_across']} of {repair['rows']} rows copied from another process")  # fmt: skip
    print(f"  {'held at once beyond the new rows':<34} before {before['gathered'] / MiB:>10,.1f} MiB   after "
          f"{after['largest broadcast'] / MiB:>10,.1f} MiB   (the whole batch / one owner's copied rows of one field)")  # fmt: skip
    print(f"  {'peak extra memory of the repair':<34} before {extra_before / MiB:>10,.1f} MiB   after {extra_after / MiB:>10,.1f} MiB"
          f"   ratio {extra_before / extra_after:5.2f}x   (with this process' {after['output'] / MiB:,.1f} MiB of new rows)")  # fmt: skip
    print(f"  same rows both ways: {repair['same_rows']}")
    if not repair["same_rows"]:
        raise SystemExit("the two paths gave different rows")


if __name__ == "__main__":
    from transformers import HfArgumentParser

    main(HfArgumentParser(BenchArguments).parse_args_into_dataclasses()[0])
