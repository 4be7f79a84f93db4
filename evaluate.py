"""Evaluate a model the way POLARIS reports it: n sampled answers per problem, avg@n and pass@k.

    # the POLARIS benchmarks with POLARIS's settings for a 4B model (temperature 1.4, top_p 1.0,
    # top_k 20, 90K-token answers through YaRN, "train short, test long")
    python evaluate.py --model POLARIS-Project/Polaris-4B-Preview --backend vllm --yarn_factor 1.5

    # local files in verl's parquet schema or the `problem`/`answer` schema; a LoRA adapter as the model
    python evaluate.py --model outputs/my-run --data ../shared/benchmarks/aime24.parquet --num_samples 8

    # a llama.cpp GGUF file (or --model DIR --gguf_file NAME.gguf), dequantized by transformers
    python evaluate.py --model SmolLM2-135M-Instruct.Q4_1.gguf --data ../shared/benchmarks/math500.json --max_problems 50

    # the offline toy world (toy.py), on a CPU
    python evaluate.py --model toy --data toy --num_samples 8 --temperature 1.0 --top_k 0 --max_tokens 64

    # temperature search before a training stage (POLARIS's diversity-based temperature)
    python evaluate.py --model M --data train_sample.parquet --sweep_temperature 0.6:1.6:0.1

Named benchmarks (`--benchmarks aime24,aime25,amc23,minerva,olympiad,math500`) come from the hub
datasets in `BENCHMARKS`; each has POLARIS's number of samples per problem unless `--num_samples`
says otherwise. Prompts are built by `data.load_problems`, as in training. Answers are judged by
`rewards.verify`. Models load and sample through generation.py, as in filter_data.py and training.

Per benchmark: avg@n with its standard error over problems, unbiased pass@k and majority-vote
maj@k for k = 1, 2, 4, ... up to n, problems solved by no sample and by all, truncation rate, rate
of answers without a box, mean response length (tokens) and distinct-4-gram diversity.
Writes `samples.jsonl` (one row per sample, appended problem by problem: a killed run resumes where
it stopped, matching finished problems by a hash of the settings) and `summary.json` (all metrics
and the full settings) into `--output_dir`, and prints a table. Under `accelerate launch` the processes
sample the chunks in turn and the main process writes what one process would (processes.py).
"""

import hashlib
import json
import math
import platform
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import generation
from data import DEFAULT_PROMPT_SUFFIX, HubUnavailable, UserError, check_options, hub_offline, load_problems, prompt_token_ids, run_cli
from toy import TOY_DIR_HELP, default_toy_dir


@dataclass(frozen=True)
class HubBenchmark:
    """Where a named benchmark lives on the hub, and how POLARIS reports it."""

    dataset: str
    split: str
    problem_column: str
    answer_column: str
    num_samples: int  # avg@k as POLARIS reports it
    description: str


# The same problem sets as POLARIS's evaluation parquet files (verl schema, as in ../shared/benchmarks).
BENCHMARKS = {
    "aime24": HubBenchmark("HuggingFaceH4/aime_2024", "train", "problem", "answer", 32, "AIME 2024, 30 problems"),
    "aime25": HubBenchmark("math-ai/aime25", "test", "problem", "answer", 32, "AIME 2025, 30 problems"),
    "amc23": HubBenchmark("AI-MO/aimo-validation-amc", "train", "problem", "answer", 8, "AMC12 2022-2023 with integer answers, 83 problems"),
    # Minerva Math is the 272 MIT OCW problems of the Minerva paper, not MATH with a Minerva prompt.
    "minerva": HubBenchmark("math-ai/minervamath", "test", "question", "answer", 4, "Minerva Math (MIT OCW), 272 problems"),
    "olympiad": HubBenchmark("math-ai/olympiadbench", "test", "question", "final_answer", 4, "OlympiadBench, English text-only math, 675 problems"),
    "math500": HubBenchmark("HuggingFaceH4/MATH-500", "test", "problem", "answer", 4, "MATH-500 (not a POLARIS table column)"),
}
POLARIS_BENCHMARKS = ("aime24", "aime25", "amc23", "minerva", "olympiad")
DEFAULT_NUM_SAMPLES = 4  # for local files that are not named like a known benchmark
SWEEP_NUM_SAMPLES = 16  # POLARIS's temperature search samples 16 answers per problem
SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"


@dataclass
class EvalArguments:
    """Arguments of `evaluate.py`."""

    model: str = field(
        metadata={"help": "Hub id, local model directory, LoRA adapter directory (loaded on its base), a .gguf file, or `toy`."}
    )
    gguf_file: str | None = field(
        default=None, metadata={"help": "A GGUF (llama.cpp) file: its path, or its name inside the --model directory or hub repo."}
    )
    benchmarks: str | None = field(
        default=None,
        metadata={"help": f"Comma-separated names from {', '.join(BENCHMARKS)}. Default without --data: {','.join(POLARIS_BENCHMARKS)}."},
    )
    data: list[str] = field(
        default_factory=list,
        metadata={"help": "Local problem files (.parquet/.jsonl/.json/.csv, verl or problem/answer schema), or `toy`."},
    )
    num_samples: int | None = field(
        default=None, metadata={"help": "Samples per problem (the n of avg@n). Default: POLARIS's per benchmark (AIME 32, AMC 8, others 4)."}
    )
    temperature: float = field(default=1.4, metadata={"help": "Sampling temperature (POLARIS 4B: 1.4, its training temperature)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling (POLARIS: 1.0)."})
    top_k: int = field(default=20, metadata={"help": "Top-k sampling, 0 = off (POLARIS 4B: 20)."})
    max_tokens: int = field(default=90000, metadata={"help": "Longest answer in tokens (POLARIS: 90000, with --yarn_factor)."})
    output_dir: str = field(default="outputs/eval", metadata={"help": "Where samples.jsonl and summary.json go."})
    backend: Literal["hf", "vllm"] = field(default="hf", metadata={"help": "hf (transformers generate) or vllm (needs vLLM installed)."})
    yarn_factor: float | None = field(
        default=None, metadata={"help": "YaRN rope scaling factor for inference only (POLARIS: 1.5); the context becomes original x factor."}
    )
    original_max_position_embeddings: int | None = field(
        default=None, metadata={"help": "Context the model was trained with (default: the config's max_position_embeddings)."}
    )
    max_problems: int | None = field(default=None, metadata={"help": "Evaluate only the first N problems of each benchmark."})
    seed: int = field(default=0, metadata={"help": "Base seed; each problem's samples get a seed derived from it."})
    batch_size: int = field(default=64, metadata={"help": "Sequences (problems x samples) per generate call (hf backend)."})
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(
        default="auto", metadata={"help": "auto: bfloat16 on a GPU that has it, float16 on other GPUs, float32 on CPU."}
    )
    problem_column: str = field(default="problem", metadata={"help": "Question column of --data files."})
    answer_column: str = field(default="answer", metadata={"help": "Gold answer column of --data files."})
    prompt_suffix: str = field(default=DEFAULT_PROMPT_SUFFIX, metadata={"help": "Appended to every problem (as in training)."})
    system_prompt: str | None = field(default=None, metadata={"help": "Optional system message (as in training)."})
    ngram_unit: Literal["word", "char"] = field(
        default="word", metadata={"help": "Diversity n-grams of words, or of characters (text without spaces, e.g. the toy world)."}
    )
    sweep_temperature: str | None = field(
        default=None, metadata={"help": "Temperature search START:STOP:STEP (e.g. 0.6:1.6:0.1): accuracy and diversity per temperature."}
    )
    target_diversity: float | None = field(
        default=None, metadata={"help": "Sweep, later stages: the diversity to get back (the previous stage's)."}
    )
    current_temperature: float | None = field(default=None, metadata={"help": "Sweep, later stages: never recommend below this."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub."})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "vLLM: fraction of GPU memory to use."})
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM: GPUs per model."})
    toy_dir: str = field(default_factory=default_toy_dir, metadata={"help": TOY_DIR_HELP})


@dataclass
class Benchmark:
    name: str
    source: str  # hub id or file
    num_samples: int
    problems: list[dict]  # problem, answer, prompt_id, prompt (chat messages), problem_id


# ----------------------------------------------------------------------------------------------
# Metrics (pure functions of the samples)
# ----------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Computed as a product, without the huge binomials (Chen et al. 2021): 1 - prod_{i=n-c+1}^{n} (1 - k/i).
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def k_values(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    values = [2**i for i in range(n.bit_length()) if 2**i <= n]
    return values if values[-1] == n else values + [n]


def majority_vote(answers: list[str | None], correct: list[bool]) -> float:
    """Score of the most frequent answer among one group of samples (answers without a box do not vote).

    Ties count as a uniformly random choice among the tied answers: the mean of their correctness.
    """
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return 0.0
    top = max(votes.values())
    tied = [answer for answer, count in votes.items() if count == top]
    scores = []
    for answer in tied:
        marks = [c for a, c in zip(answers, correct) if a == answer]
        scores.append(sum(marks) / len(marks))
    return sum(scores) / len(scores)


def maj_at_k(answers: list[str | None], correct: list[bool], k: int) -> float:
    """maj@k estimated from n >= k i.i.d. samples: the mean majority-vote score over the n // k disjoint groups of k."""
    groups = len(answers) // k
    if groups == 0:
        raise ValueError(f"maj@{k} needs at least {k} samples, got {len(answers)}")
    return sum(majority_vote(answers[g * k : (g + 1) * k], correct[g * k : (g + 1) * k]) for g in range(groups)) / groups


def vote_key(answer: str | None) -> str | None:
    """Answers that differ only in presentation (`\\dfrac` / `\\frac`, spaces, `$`) vote together."""
    from rewards import canonical

    return None if answer is None else canonical(answer)


def benchmark_metrics(problems: list[list[dict]], ngram_unit: str = "word") -> dict:
    """All metrics of one benchmark from its sample rows: `problems[i]` holds problem i's n rows
    (`correct`, `extracted_answer`, `completion`, `length`, `truncated`), every problem the same n."""
    from temperature_sweep import sweep_row

    if not problems:
        raise ValueError("no problems")
    n = len(problems[0])
    if any(len(rows) != n for rows in problems):
        raise ValueError("every problem needs the same number of samples")
    correct = [[bool(row["correct"]) for row in rows] for rows in problems]
    # avg@n, its standard error over problems and distinct-4 come from the one implementation the
    # temperature sweep uses (temperature_sweep.py).
    row = sweep_row(
        None, [[float(c) for c in marks] for marks in correct], [[r["completion"] for r in rows] for rows in problems], n=4, unit=ngram_unit
    )
    counts = [sum(marks) for marks in correct]
    keys = [[vote_key(r["extracted_answer"]) for r in rows] for rows in problems]
    samples = [r for rows in problems for r in rows]
    ks = k_values(n)
    return {
        "num_problems": len(problems),
        "num_samples": n,
        "avg_at_k": row["accuracy"],
        "avg_at_k_stderr": row["accuracy_stderr"],
        "pass_at_k": {str(k): sum(pass_at_k(n, c, k) for c in counts) / len(counts) for k in ks},
        "maj_at_k": {str(k): sum(maj_at_k(a, m, k) for a, m in zip(keys, correct)) / len(correct) for k in ks},
        "solved_by_none": sum(c == 0 for c in counts),
        "solved_by_all": sum(c == n for c in counts),
        "truncation_rate": sum(bool(r["truncated"]) for r in samples) / len(samples),
        "no_box_rate": sum(r["extracted_answer"] is None for r in samples) / len(samples),
        "mean_length": sum(r["length"] for r in samples) / len(samples),
        "distinct_4": row["diversity"],
    }


# ----------------------------------------------------------------------------------------------
# Benchmarks
# ----------------------------------------------------------------------------------------------


def benchmark_specs(args: EvalArguments) -> list[tuple[str, str, dict, int]]:
    """(name, source, load_problems keyword arguments, samples per problem) for each set to evaluate."""
    names = [n.strip() for n in (args.benchmarks or "").split(",") if n.strip()]
    if not names and not args.data:
        names = list(POLARIS_BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise UserError(
            f"unknown benchmark '{unknown[0]}': known names are {', '.join(BENCHMARKS)}; "
            f"for another problem set pass a local file: --data path/to/{unknown[0]}.parquet"
        )
    specs = []
    for name in names:
        hub = BENCHMARKS[name]
        columns = dict(split=hub.split, problem_column=hub.problem_column, answer_column=hub.answer_column)
        specs.append((name, hub.dataset, columns, hub.num_samples))
    for path in args.data:
        source = generation.resolve_toy(path, args.toy_dir, "test")
        name = generation.TOY_NAME if path == generation.TOY_NAME else Path(source).stem
        default_k = BENCHMARKS[name].num_samples if name in BENCHMARKS else DEFAULT_NUM_SAMPLES
        specs.append((name, source, dict(problem_column=args.problem_column, answer_column=args.answer_column), default_k))
    taken = Counter()
    unique = []
    for name, source, columns, k in specs:
        taken[name] += 1
        unique.append((name if taken[name] == 1 else f"{name}-{taken[name]}", source, columns, k))
    return unique


def load_benchmark(name: str, source: str, columns: dict, num_samples: int, args: EvalArguments) -> Benchmark:
    is_hub = name in BENCHMARKS and source == BENCHMARKS[name].dataset
    try:
        dataset = load_problems(source, prompt_suffix=args.prompt_suffix, system_prompt=args.system_prompt, **columns)
    except HubUnavailable as error:
        if not is_hub:
            raise
        if hub_offline():
            why = "the hub is offline (HF_HUB_OFFLINE is set)"
        elif error.__cause__ is None:  # data.check_source: no answer from the hub at all
            why = "the hub cannot be reached (without network, HF_HUB_OFFLINE=1 reads the Hugging Face cache)"
        else:
            why = f"it could not be downloaded ({type(error.__cause__).__name__})"
        raise UserError(
            f"benchmark '{name}' comes from the hub dataset {source}, but {why}: "
            f"pass a local copy instead, e.g. --data path/to/{name}.parquet"
        ) from error
    if args.max_problems:
        dataset = dataset.select(range(min(len(dataset), args.max_problems)))
    problems = [dict(row) for row in dataset]
    seen = Counter()
    for row in problems:  # a problem that appears twice is evaluated twice, under two ids
        seen[row["prompt_id"]] += 1
        row["problem_id"] = row["prompt_id"] if seen[row["prompt_id"]] == 1 else f"{row['prompt_id']}-{seen[row['prompt_id']]}"
    if args.num_samples:
        num_samples = args.num_samples
    elif args.sweep_temperature:
        num_samples = SWEEP_NUM_SAMPLES
    return Benchmark(name=name, source=source, num_samples=num_samples, problems=problems)


# ----------------------------------------------------------------------------------------------
# Model: YaRN, and the sampler of the chosen backend (generation.py)
# ----------------------------------------------------------------------------------------------


def apply_yarn(config, factor: float, original_max_position_embeddings: int | None = None) -> dict:
    """Set YaRN rope scaling on a transformers config, in place, the way transformers 5 reads it.

    `rope_parameters` gets `rope_type: yarn`, the factor and the original context and keeps
    `rope_theta` (the old `rope_scaling` spelling would lose it); `max_position_embeddings` becomes
    original x factor. Returns the values to record and to pass to vLLM as `hf_overrides`.
    """
    if not factor > 1.0:
        raise UserError(f"--yarn_factor must be above 1 (it multiplies the context), got {factor}")
    parameters = dict(getattr(config, "rope_parameters", None) or {})
    nested = bool(parameters) and all(isinstance(value, dict) for value in parameters.values())
    layers = parameters if nested else {None: parameters}
    original = original_max_position_embeddings
    for layer_parameters in layers.values():
        original = original or layer_parameters.get("original_max_position_embeddings")
    original = int(original or config.max_position_embeddings)
    theta = getattr(config, "rope_theta", None)
    scaled = {}
    for layer, layer_parameters in layers.items():
        new = {key: value for key, value in layer_parameters.items() if key != "type"}
        if theta is not None:
            new.setdefault("rope_theta", theta)
        new.update(rope_type="yarn", factor=float(factor), original_max_position_embeddings=original)
        scaled[layer] = new
    config.rope_parameters = scaled if nested else scaled[None]
    config.max_position_embeddings = int(original * factor)
    return {
        "original_max_position_embeddings": original,
        "rope_parameters": config.rope_parameters,
        "max_position_embeddings": config.max_position_embeddings,
    }


def load_config(model: str, args: EvalArguments):
    """The model's config (its base's for an adapter), with YaRN applied when asked for; and the rope record."""
    config = generation.load_config(model, args.gguf_file, args.trust_remote_code)
    rope = {"yarn_factor": args.yarn_factor, "original_max_position_embeddings": None}
    if args.yarn_factor is not None:
        rope.update(apply_yarn(config, args.yarn_factor, args.original_max_position_embeddings))
    else:
        rope.update(rope_parameters=getattr(config, "rope_parameters", None), max_position_embeddings=config.max_position_embeddings)
    return config, rope


def load_sampler(model: str, config, rope: dict, args: EvalArguments):
    """The sampler of `--backend` with the model loaded; YaRN goes to vLLM through `hf_overrides`."""
    settings = generation.SamplingSettings(top_p=args.top_p, top_k=args.top_k, max_new_tokens=args.max_tokens)
    common = dict(gguf_file=args.gguf_file, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    if args.backend == "hf":
        return generation.load_sampler("hf", model, settings, batch_size=args.batch_size, config=config, **common)
    vllm_kwargs = dict(gpu_memory_utilization=args.gpu_memory_utilization, tensor_parallel_size=args.tensor_parallel_size)
    if args.yarn_factor is not None:
        vllm_kwargs["hf_overrides"] = {"rope_parameters": rope["rope_parameters"], "max_position_embeddings": rope["max_position_embeddings"]}
    return generation.load_sampler(
        "vllm", model, settings, seed=args.seed, max_model_len=rope["max_position_embeddings"] if args.yarn_factor is not None else None,
        merged_dir=Path(args.output_dir) / "merged_model", **common, **vllm_kwargs,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The samples file (generation.SampleStore): one row per sample, appended problem by problem
# ----------------------------------------------------------------------------------------------


def settings_hash(settings: dict, num_samples: int, temperature: float) -> str:
    """Rows of samples drawn with these settings carry this hash; a rerun skips problems that have them all."""
    keyed = {**settings, "num_samples": num_samples, "temperature": temperature}
    return hashlib.sha1(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:12]


def read_samples(store: generation.SampleStore, settings_hashes: set[str] | None = None) -> dict[tuple[str, str, str], dict[int, dict]]:
    """{(settings_hash, benchmark, problem_id): {sample_index: row}}, only for `settings_hashes` if given;
    a later row replaces an earlier one."""
    groups = defaultdict(dict)
    for row in store.records():
        if settings_hashes is None or row["settings_hash"] in settings_hashes:
            groups[(row["settings_hash"], row["benchmark"], row["problem_id"])][row["sample_index"]] = row
    return groups


def complete_rows(groups, key: tuple[str, str, str], num_samples: int) -> list[dict] | None:
    rows = groups.get(key, {})
    if any(i not in rows for i in range(num_samples)):
        return None
    return [rows[i] for i in range(num_samples)]


def score_samples(benchmark: Benchmark, problems: list[dict], samples, key: str, temperature: float) -> list[dict]:
    """Sample rows for `problems` (judged by rewards.verify_batch)."""
    from rewards import extract_answer, verify_batch

    completions = [s.text for group in samples for s in group]
    golds = [p["answer"] for p, group in zip(problems, samples) for _ in group]
    verdicts = verify_batch(completions, golds)
    rows, position = [], 0
    for problem, group in zip(problems, samples):
        for index, sample in enumerate(group):
            answer, status = extract_answer(sample.text)
            rows.append(
                {
                    "settings_hash": key,
                    "benchmark": benchmark.name,
                    "problem_id": problem["problem_id"],
                    "sample_index": index,
                    "temperature": temperature,
                    "gold": problem["answer"],
                    "completion": sample.text,
                    "extracted_answer": answer if status == "ok" else None,
                    "correct": bool(verdicts[position]),
                    "length": sample.num_tokens,
                    "truncated": bool(sample.truncated),
                }
            )
            position += 1
    return rows


def sample_benchmark(benchmark: Benchmark, temperature: float, settings: dict, store: generation.SampleStore, get_sampler, seed: int) -> int:
    """Sample and judge every problem of `benchmark` that has no finished samples in the store; returns how many were sampled."""
    from tqdm.auto import tqdm

    from processes import is_main_process, share_from_main

    num_samples = benchmark.num_samples
    key = settings_hash(settings, num_samples, temperature)

    def finished_problems():
        groups = read_samples(store, {key})
        return {p["problem_id"] for p in benchmark.problems if complete_rows(groups, (key, benchmark.name, p["problem_id"]), num_samples)}

    done = share_from_main(finished_problems)  # under accelerate launch only the main process reads and writes the file
    pending = [p for p in benchmark.problems if p["problem_id"] not in done]
    label = f"{benchmark.name} (T={temperature:g}, n={num_samples})"
    if done and is_main_process():
        print(f"{label}: {len(done)}/{len(benchmark.problems)} problems already sampled in {store.path}, {len(pending)} to go")
    if not pending:
        return 0
    sampler = get_sampler()
    per_call = sampler.problems_per_call(num_samples)
    # Chunks are cut from the whole benchmark, not from what is left, so a resumed run samples each
    # chunk exactly as an uninterrupted one would (same problems, same seeds), in any process.
    chunks = [benchmark.problems[i : i + per_call] for i in range(0, len(benchmark.problems), per_call)]
    todo_chunks = [todo for todo in ([p for p in chunk if p["problem_id"] not in done] for chunk in chunks) if todo]
    bar = tqdm(total=len(benchmark.problems), initial=len(done), desc=label, unit="problem", disable=not is_main_process())
    generation.sample_into_store(
        sampler, todo_chunks, num_samples, temperature, seed, problem_key=lambda p: p["problem_id"],
        make_records=lambda todo, samples: score_samples(benchmark, todo, samples, key, temperature), store=store, bar=bar,
    )  # fmt: skip
    return len(pending)


# ----------------------------------------------------------------------------------------------
# Settings, summary, table
# ----------------------------------------------------------------------------------------------


def package_versions(backend: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    names = ["torch", "transformers", "peft", "datasets", "math-verify"] + (["vllm"] if backend == "vllm" else [])
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"


def sampling_settings(args: EvalArguments, model: str, rope: dict) -> dict:
    """Everything that changes what is sampled: the basis of the settings hash."""
    return {
        "model": model,
        "backend": args.backend,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "max_tokens": args.max_tokens,
        "seed": args.seed,
        "yarn_factor": rope["yarn_factor"],
        "original_max_position_embeddings": rope["original_max_position_embeddings"],
        "prompt_suffix": args.prompt_suffix,
        "system_prompt": args.system_prompt,
        **({"gguf_file": args.gguf_file} if args.gguf_file else {}),  # absent when unset: earlier files still resume
    }


def collect_metrics(benchmarks: list[Benchmark], temperature: float, settings: dict, store: generation.SampleStore, ngram_unit: str):
    """Per benchmark: the metrics and the rows they were computed from, read back from the samples file."""
    groups = read_samples(store, {settings_hash(settings, b.num_samples, temperature) for b in benchmarks})
    metrics, rows_by_benchmark = {}, {}
    for benchmark in benchmarks:
        n = benchmark.num_samples
        key = settings_hash(settings, n, temperature)
        problems = [complete_rows(groups, (key, benchmark.name, p["problem_id"]), n) for p in benchmark.problems]
        if any(rows is None for rows in problems):
            raise RuntimeError(f"{benchmark.name}: some problems have no finished samples in {store.path}")
        rows_by_benchmark[benchmark.name] = problems
        metrics[benchmark.name] = {"source": benchmark.source, "settings_hash": key, **benchmark_metrics(problems, ngram_unit)}
    return metrics, rows_by_benchmark


def format_table(metrics: dict) -> str:
    """The printed table: percentages, as POLARIS reports them; n is the number of samples per problem."""
    header = (
        f"{'benchmark':<12}{'problems':>9}{'n':>4}{'avg@n':>7}{'± s.e.':>7}{'pass@n':>8}{'maj@n':>7}"
        f"{'none':>6}{'all':>6}{'trunc%':>8}{'nobox%':>8}{'mean len':>10}{'dist-4':>8}"
    )
    lines = [header, "-" * len(header)]
    for name, m in metrics.items():
        n = str(m["num_samples"])
        lines.append(
            f"{name:<12}{m['num_problems']:>9}{n:>4}{100 * m['avg_at_k']:>7.1f}{100 * m['avg_at_k_stderr']:>7.1f}"
            f"{100 * m['pass_at_k'][n]:>8.1f}{100 * m['maj_at_k'][n]:>7.1f}{m['solved_by_none']:>6}{m['solved_by_all']:>6}"
            f"{100 * m['truncation_rate']:>8.1f}{100 * m['no_box_rate']:>8.1f}{m['mean_length']:>10.0f}{m['distinct_4']:>8.3f}"
        )
    return "\n".join(lines)


def check_arguments(args: EvalArguments) -> None:
    if args.num_samples is not None and args.num_samples < 1:
        raise UserError(f"--num_samples must be at least 1, got {args.num_samples}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be 0 (greedy) or more, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise UserError(f"--top_k must be 0 (off) or more, got {args.top_k}")
    if args.max_tokens < 1:
        raise UserError(f"--max_tokens must be at least 1, got {args.max_tokens}")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.original_max_position_embeddings is not None and args.yarn_factor is None:
        raise UserError("--original_max_position_embeddings only matters with --yarn_factor: add --yarn_factor (POLARIS: 1.5)")
    if (args.target_diversity is not None or args.current_temperature is not None) and not args.sweep_temperature:
        raise UserError("--target_diversity and --current_temperature belong to a temperature search: add --sweep_temperature START:STOP:STEP")


def warn_about_context(benchmarks: list[Benchmark], tokenizer, rope: dict, args: EvalArguments) -> None:
    """Say so when prompt + answer can run past the model's context (POLARIS extends it with YaRN)."""
    context = rope["max_position_embeddings"]
    if not context:
        return
    longest = max(len(prompt_token_ids(tokenizer, p["prompt"])) for b in benchmarks for p in b.problems)
    if longest + args.max_tokens > context:
        fix = "raise --yarn_factor" if args.yarn_factor else "add --yarn_factor (POLARIS: 1.5), or lower --max_tokens"
        print(
            f"warning: prompts of up to {longest} tokens + --max_tokens {args.max_tokens} exceed the model's context of "
            f"{context} positions: answers that long run on positions the model never saw; {fix}"
        )


def report_sweep(temperatures: list[float], results: dict, benchmarks: list[Benchmark], args: EvalArguments) -> dict:
    """Accuracy and diversity per temperature over all problems of all the sets together, the
    recommended temperature, and the JSON, plot and table (temperature_sweep.py)."""
    from temperature_sweep import describe_rule, format_sweep_table, recommend_temperature, sweep_row, write_sweep_report

    rows = []
    for temperature in temperatures:
        problems = [rows_of_problem for b in benchmarks for rows_of_problem in results[temperature][1][b.name]]
        scores = [[float(r["correct"]) for r in rows_of_problem] for rows_of_problem in problems]
        texts = [[r["completion"] for r in rows_of_problem] for rows_of_problem in problems]
        rows.append(sweep_row(temperature, scores, texts, n=4, unit=args.ngram_unit))
    recommended = recommend_temperature(rows, args.target_diversity, args.current_temperature)
    rule = describe_rule(args.target_diversity, args.current_temperature)
    json_path, png_path = write_sweep_report(rows, recommended, args.output_dir, rule=rule)
    print("\n" + format_sweep_table(rows, recommended))
    print(f"\nrecommended temperature: {recommended:g} ({rule})")
    print(f"wrote {json_path} and {png_path}")
    return {"temperatures": rows, "recommended_temperature": recommended, "rule": rule}


def main(args: EvalArguments) -> dict:
    start = time.time()
    check_arguments(args)
    specs = benchmark_specs(args)  # before any heavy import: a wrong name fails at once
    benchmarks = [load_benchmark(*spec, args) for spec in specs]
    from temperature_sweep import parse_sweep_range

    temperatures = parse_sweep_range(args.sweep_temperature) if args.sweep_temperature else [args.temperature]
    model = generation.resolve_toy(args.model, args.toy_dir, "model")
    config, rope = load_config(model, args)
    settings = sampling_settings(args, model, rope)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    store = generation.SampleStore(output_dir / SAMPLES_FILE)
    from processes import is_main_process

    if is_main_process():
        store.drop_partial_line()

    sampler = None

    def get_sampler():  # loaded only when something is left to sample
        nonlocal sampler
        if sampler is None:
            sampler = load_sampler(model, config, rope, args)
            if is_main_process():
                warn_about_context(benchmarks, sampler.tokenizer, rope, args)
        return sampler

    sampled = 0
    for temperature in temperatures:
        for benchmark in benchmarks:
            sampled += sample_benchmark(benchmark, temperature, settings, store, get_sampler, args.seed)
    # The numbers are computed from the samples file, so they cover resumed runs and can be checked against it.
    if not is_main_process():  # the main process gathered everything and writes the results
        return {}
    results = {t: collect_metrics(benchmarks, t, settings, store, args.ngram_unit) for t in temperatures}

    summary = {
        "model": args.model,
        "resolved_model": model,
        "base_model": generation.adapter_base(model),
        "settings": {
            **settings,
            "temperature": temperatures if args.sweep_temperature else args.temperature,
            "num_samples": {b.name: b.num_samples for b in benchmarks},
            "rope": rope,
            "ngram_unit": args.ngram_unit,
            "max_problems": args.max_problems,
            "dtype": args.dtype,
            "batch_size": args.batch_size,
            "versions": package_versions(args.backend),
            "device": device_name(),
        },
        "problems_sampled_this_run": sampled,
        "seconds": round(time.time() - start, 1),
        "samples_file": str(store.path),
    }
    if args.sweep_temperature:
        summary["benchmarks_by_temperature"] = {str(t): results[t][0] for t in temperatures}
        summary["sweep"] = report_sweep(temperatures, results, benchmarks, args)
    else:
        summary["benchmarks"] = results[args.temperature][0]
        yarn = f", YaRN x{args.yarn_factor:g} to {rope['max_position_embeddings']} positions" if args.yarn_factor else ""
        print(f"\n{args.model}: temperature {args.temperature:g}, top_p {args.top_p:g}, top_k {args.top_k}, max_tokens {args.max_tokens}{yarn}")
        print(format_table(summary["benchmarks"]))
    (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    print(f"wrote {output_dir / SUMMARY_FILE} and {store.path}")
    return summary


def parse_args(argv: list[str] | None = None) -> EvalArguments:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(EvalArguments, allow_abbrev=False)  # no prefix matching: --num_sample is unknown
    (args,) = parser.parse_args_into_dataclasses(args=check_options(parser, argv))
    return args


def cli():
    from processes import release

    try:
        main(parse_args(sys.argv[1:]))
    finally:
        release()


if __name__ == "__main__":
    run_cli(cli)
