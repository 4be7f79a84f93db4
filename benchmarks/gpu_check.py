"""GPU check: one optimizer step of each consumer recipe's geometry, on random weights, with no network.

    bash benchmarks/gpu_check.sh              # a machine with an NVIDIA GPU: about 8 minutes
    bash benchmarks/gpu_check.sh --reduced    # tiny shapes on the CPU: the same code path in under 2 minutes

Each case is a consumer recipe (recipes/*-Ngb.yaml) as it is parsed for training: its model shape (a
random-weight checkpoint built from `memory_planner.BUILTIN_SHAPES` and saved, so 4-bit bases load through
bitsandbytes as in training), LoRA or QLoRA, 64 rollouts a step, its micro-batches and activation
checkpointing, `generation_chunk_size: auto` planned for the recipe's GPU, and completions of
`--completion_tokens`. On a GPU the process is capped at the recipe's GPU memory
(`torch.cuda.set_per_process_memory_fraction`), so a large GPU shows what a user's 8-24 GB card gets. Random
weights almost never sample the end token, so completions run to their maximum: the planner's worst case.
The toy character tokenizer stands in for the real one (the ids it reads exist in every vocabulary).

Printed per case: the generation batch chosen, peak memory measured (`torch.cuda.max_memory_allocated`)
against the planner's estimate for sampling and for training, seconds per optimizer step, and rollout tokens
per second of the trainer beside plain `model.generate` on the same weights (the adapter merged, as the trainer
samples) and the same batch, in the same process; then the same batch decoded by the other decoders, side by
side: `compiled` (static cache + torch.compile, `generation_compile`; its compile time apart) and `continuous`
(transformers' continuous batching, `generate_batch`, CUDA only). Results go to `<output_dir>/results.json`
case by case.
"""

import gc
import hashlib
import json
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import UserError, run_cli  # noqa: E402


ROOT = Path(__file__).resolve().parent.parent
# The consumer recipes, the two the speed targets name first, so that a cut-short run still measures them.
CASES = ("qwen3-0.6b-lora-8gb", "qwen3-4b-qlora-24gb", "r1-distill-qwen-1.5b-lora-16gb", "qwen3-1.7b-qlora-12gb")
DECODERS = ("eager", "compiled", "continuous")


@dataclass
class GpuCheckArguments:
    reduced: bool = field(default=False, metadata={"help": "Tiny shapes on the CPU (checks that the script runs; no GPU numbers)."})
    output_dir: str = field(default="outputs/gpu_check", metadata={"help": "Where checkpoints and results.json go."})
    cases: str = field(default=",".join(CASES), metadata={"help": "Recipes to run (names in recipes/ without .yaml)."})
    completion_tokens: int = field(default=1024, metadata={"help": "Completion length (reduced mode: 64)."})
    prompt_tokens: int = field(default=128, metadata={"help": "Prompt length in tokens (reduced mode: 24)."})
    decoders: str = field(
        default=",".join(DECODERS),
        metadata={"help": "Decoders timed on one generation batch beside the trainer (reduced mode: eager; `continuous` needs CUDA)."},
    )
    generation_compile: bool = field(default=False, metadata={"help": "The trainer itself decodes compiled (generation_compile)."})
    memory_cap: bool = field(default=True, metadata={"help": "Cap this process at the recipe's GPU memory."})
    time_budget_s: float = field(default=420.0, metadata={"help": "Cases not started within this many seconds are skipped."})


def tiny_shape(shape, layers: int):
    """The reduced mode's stand-in for `shape`: same architecture, a few thousand times smaller."""
    from dataclasses import replace

    return replace(shape, vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=16)


def transformers_config(shape, tokenizer):
    from transformers import Qwen2Config, Qwen3Config

    kwargs = dict(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        tie_word_embeddings=shape.tie_word_embeddings,
        max_position_embeddings=shape.max_position_embeddings or 32768,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    if shape.model_type.startswith("qwen3"):
        return Qwen3Config(head_dim=shape.head_dim, **kwargs)
    return Qwen2Config(**kwargs)


def build_random_checkpoint(shape, tokenizer, path: Path, dtype) -> Path:
    """Random weights of `shape`, saved like a downloaded model (built on the GPU when there is one)."""
    import torch
    from transformers import AutoModelForCausalLM

    if (path / "config.json").exists():
        return path
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(transformers_config(shape, tokenizer), dtype=dtype)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    free_memory()
    return path


def free_memory():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def random_reward(completions, **kwargs):
    """Rewards with variance in every group, so every step has advantages to train on."""
    return [random.random() for _ in completions]


def training_problems(tokenizer, prompt_tokens: int, count: int, path: Path):
    """Problems whose chat prompt is exactly `prompt_tokens` tokens long, loaded as training loads data."""
    from data import build_messages, load_problems

    overhead = len(tokenizer.apply_chat_template(build_messages("", prompt_suffix=""), add_generation_prompt=True, tokenize=True)["input_ids"])
    rows = [{"problem": "".join(random.Random(i).choice("0123456789+-*") for _ in range(prompt_tokens - overhead)), "answer": "0"} for i in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return load_problems(str(path), prompt_suffix="")


def recipe_gpu_gib(recipe: Path) -> int:
    """The GPU size a consumer recipe is written for, from its first line ("... on one 8 GB GPU")."""
    found = re.search(r"on one (\d+) GB GPU", recipe.read_text())
    if not found:
        raise UserError(f"{recipe} does not say which GPU it is for ('on one N GB GPU' in its first line)")
    return int(found.group(1))


def recipe_model(recipe: Path) -> str:
    import yaml

    return yaml.safe_load(recipe.read_text())["model_name_or_path"]


class PhasePeaks:
    """Peak memory of the sampling phase and of what follows (the training steps), and sampling's speed."""

    def __init__(self):
        self.generation_peak = None
        self.generation_seconds = 0.0
        self.generated_tokens = 0
        self.calls = []

    def start_generation(self):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._started = time.perf_counter()

    def end_generation(self, tokens: int):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.generation_peak = max(self.generation_peak or 0, torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        self.generation_seconds += time.perf_counter() - self._started
        self.generated_tokens += tokens


def time_generation(trainer, peaks: PhasePeaks):
    """Wrap the trainer's sampling (chunks, adapter merge and all) to time it and split the peak into phases."""
    original = trainer._generate_single_turn

    def timed(prompt_ids, *args, **kwargs):
        peaks.start_generation()
        completion_ids, logprobs = original(prompt_ids, *args, **kwargs)
        peaks.end_generation(sum(len(ids) for ids in completion_ids))
        peaks.calls.append(len(prompt_ids))
        return completion_ids, logprobs

    trainer._generate_single_turn = timed


def warm_up(trainer, prompt_ids: list[list[int]]):
    """One short sampling call of the trainer before anything is timed: a first call pays once-per-run costs
    (memory pools, kernel selection, the adapter's copy of its base) that neither speed should count."""
    max_new_tokens = trainer.generation_config.max_new_tokens
    trainer.generation_config.max_new_tokens = 2
    try:
        trainer._generate_single_turn(prompt_ids, None, {}, trainer.num_generations)
    finally:
        trainer.generation_config.max_new_tokens = max_new_tokens


class StepTimer:
    """A `TrainerCallback` timing optimizer steps."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.seconds.append(time.perf_counter() - timer._start)

        self.seconds = []
        self.callback = Callback()


# ----------------------------------------------------------------------------------------------
# Decoders side by side, on the trainer's weights and generation batch
# ----------------------------------------------------------------------------------------------


def completion_tokens(rows, eos_ids: set[int]) -> int:
    """Tokens up to and including each row's first end-of-sequence token, as the trainer counts them."""
    total = 0
    for row in rows:
        stop = next((i for i, token in enumerate(row) if token in eos_ids), None)
        total += len(row) if stop is None else stop + 1
    return total


def decode(trainer, prompt_ids: list[list[int]], decoder: str) -> dict:
    """Tokens per second of one generation batch: `eager` and `compiled` through `model.generate` with the
    trainer's generation config, `continuous` through `generate_batch`. The compiled decoder runs twice:
    the first call compiles (`compile_seconds`), the second is timed."""
    import copy

    import torch

    from generation import adapter_merged, compile_decoding
    from step_batch import static_cache_length

    config = copy.deepcopy(trainer.generation_config)
    config.cache_implementation, config.disable_compile = None, True
    eos_ids = set(trainer.eos_token_ids)
    pad = trainer.processing_class.pad_token_id
    model = trainer.model
    was_training = model.training
    model.eval()
    result = {}
    try:
        with adapter_merged(model) as sampled, torch.inference_mode():
            device = next(sampled.parameters()).device
            length = max(map(len, prompt_ids))
            input_ids = torch.tensor([[pad] * (length - len(ids)) + ids for ids in prompt_ids], device=device)
            attention_mask = (torch.arange(length, device=device)[None, :] >= torch.tensor([length - len(ids) for ids in prompt_ids], device=device)[:, None]).long()

            def run():
                synchronize()
                start = time.perf_counter()
                if decoder == "continuous":
                    outputs = sampled.generate_batch(prompt_ids, generation_config=config, progress_bar=False)
                    rows = [output.generated_tokens for output in outputs.values()]
                else:
                    rows = sampled.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)[:, length:].tolist()
                synchronize()
                return completion_tokens(rows, eos_ids), time.perf_counter() - start

            if decoder == "compiled":
                compile_decoding(config)
                config.max_cache_len = static_cache_length(prompt_ids, config.max_new_tokens)
                result["compile_seconds"] = round(run()[1], 1)
            tokens, seconds = run()
            result["tokens_per_s"] = round(tokens / seconds, 1)
    except Exception as error:  # noqa: BLE001  (a decoder that cannot run here is a result, not a crash)
        result["error"] = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:160]}"
    finally:
        model.train(was_training)
        free_memory()
    return result


# ----------------------------------------------------------------------------------------------
# One case
# ----------------------------------------------------------------------------------------------


def case_arguments(recipe: Path, checkpoint: Path, args: GpuCheckArguments, work_dir: Path, on_gpu: bool):
    """The recipe as training parses it, with the check's model, length and one optimizer step."""
    from train_grpo import parse_args

    script_args, training_args, model_args = parse_args([
        "--config", str(recipe), "--model_name_or_path", str(checkpoint), "--output_dir", str(work_dir / recipe.stem),
        "--max_steps", "1", "--stages", f"0:1.0:{args.completion_tokens}", "--max_prompt_length", str(args.prompt_tokens),
        "--generation_compile", str(args.generation_compile).lower(), "--save_strategy", "no", "--report_to", "none",
        "--logging_steps", "1", "--seed", "0", "--disable_tqdm", "true", "--rollout_rescue", "false",
        "--informative_substitution", "false", "--temperature", "1.0", "--use_vllm", "false",  # the transformers path
        *([] if on_gpu else ["--dtype", "float32"]),  # the CPU computes in fp32
    ])  # fmt: skip
    return script_args, training_args, model_args


def run_case(name: str, shape, checkpoint: Path, tokenizer, args: GpuCheckArguments, work_dir: Path, decoders: list[str]) -> dict:
    import torch
    from trl import get_peft_config

    from memory_planner import estimate, resolve_auto_generation_chunk, setup_from_args
    from train_grpo import PolarisGRPOTrainer, load_model

    on_gpu = torch.cuda.is_available()
    recipe = ROOT / "recipes" / f"{name}.yaml"
    gpu_gib = recipe_gpu_gib(recipe)
    script_args, training_args, model_args = case_arguments(recipe, checkpoint, args, work_dir, on_gpu)
    script_args.gpu_memory = gpu_gib if on_gpu else None  # `auto` plans for the recipe's GPU; on a CPU it samples the whole step
    chunk_note = resolve_auto_generation_chunk(script_args, training_args, model_args)
    setup = setup_from_args(script_args, training_args, model_args)
    if not on_gpu:  # the CPU computes in fp32
        setup.autocast = False
    planned = estimate(shape, setup, args.completion_tokens)
    rollouts = setup.step_rollouts
    dataset = training_problems(tokenizer, args.prompt_tokens, rollouts // training_args.num_generations, work_dir / "problems.jsonl")

    if on_gpu and args.memory_cap:
        torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_gib * 1024**3 / torch.cuda.get_device_properties(0).total_memory))
    # Whatever an earlier case left allocated is not this case's: measured peaks are counted above it.
    baseline = torch.cuda.memory_allocated() if on_gpu else 0
    model = load_model(model_args, training_args)
    peaks, timer = PhasePeaks(), StepTimer()
    trainer = PolarisGRPOTrainer(
        model=model,
        reward_funcs=[random_reward],
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=[timer.callback],
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)  # the table below is the output
    trainer.remove_callback(ProgressCallback)
    chunk = training_args.generation_chunk_size or rollouts
    prompt_ids = [tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True)["input_ids"] for row in dataset]
    batch = [ids for ids in prompt_ids for _ in range(training_args.num_generations)][:chunk]
    warm_up(trainer, batch)
    time_generation(trainer, peaks)
    if on_gpu:
        synchronize()
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    training_peak = torch.cuda.max_memory_allocated() - baseline if on_gpu else None
    generation_peak = peaks.generation_peak - baseline if peaks.generation_peak is not None else None

    # The same weights and generation batch, decoded by each decoder; eager is plain `generate`.
    decoded = {decoder: decode(trainer, batch, decoder) for decoder in decoders}
    trainer.accelerator.free_memory()  # drops the accelerator's references to the model and optimizer
    del trainer, model
    free_memory()
    if on_gpu:
        torch.cuda.set_per_process_memory_fraction(1.0)

    rollout_speed = round(peaks.generated_tokens / peaks.generation_seconds, 1) if peaks.generation_seconds else None
    plain_speed = decoded.get("eager", {}).get("tokens_per_s")
    row = {
        "case": name,
        "memory_cap_gib": gpu_gib if on_gpu and args.memory_cap else None,
        "completion_tokens": args.completion_tokens,
        "rollouts_per_step": rollouts,
        "generation_chunk": chunk,
        "generation_calls": peaks.calls,
        "chunk_note": chunk_note,
        "trainer_decoding": "compiled" if args.generation_compile else "eager",
        "mean_completion_length": round(peaks.generated_tokens / rollouts, 1),
        "measured_generation_bytes": generation_peak,
        "planned_generation_bytes": round(planned.generation),
        "measured_training_bytes": training_peak,
        "planned_training_bytes": round(planned.training),
        "rollout_tokens_per_s": rollout_speed,
        "plain_generate_tokens_per_s": plain_speed,
        "rollout_over_plain": round(rollout_speed / plain_speed, 3) if rollout_speed and plain_speed else None,
        "decoders": decoded,
        "generation_seconds": round(peaks.generation_seconds, 2),
        "seconds_per_step": round(sum(timer.seconds) / len(timer.seconds), 2) if timer.seconds else None,
    }
    if on_gpu:
        row["memory_allocated_before_bytes"] = baseline
        row["peak_ratio_measured_over_planned"] = round(max(generation_peak or 0, training_peak) / planned.allocated, 3)
    return row


def format_row(row: dict, unit: int) -> str:
    def number(value, width, scale=1, digits=2):
        return f"{value / scale:>{width}.{digits}f}" if isinstance(value, (int, float)) else f"{'n/a':>{width}}"

    others = "  ".join(
        f"{name} {result['tokens_per_s']:.0f}" + (f" (+{result['compile_seconds']:.0f} s compile)" if "compile_seconds" in result else "")
        if "tokens_per_s" in result else f"{name}: {result.get('error', 'n/a')}"
        for name, result in row["decoders"].items() if name != "eager"
    )  # fmt: skip
    return (
        f"{row['case']:<31}{number(row['memory_cap_gib'], 4, digits=0)}{row['generation_chunk']:>6}"
        f"{number(row['measured_generation_bytes'], 8, unit)}{number(row['planned_generation_bytes'], 8, unit)}"
        f"{number(row['measured_training_bytes'], 8, unit)}{number(row['planned_training_bytes'], 8, unit)}"
        f"{number(row.get('peak_ratio_measured_over_planned'), 7)}{number(row['seconds_per_step'], 8, digits=1)}"
        f"{number(row['rollout_tokens_per_s'], 10, digits=0)}{number(row['plain_generate_tokens_per_s'], 9, digits=0)}"
        f"{number(row['rollout_over_plain'], 7)}" + (f"  {others}" if others else "")
    )


def header(unit_name: str) -> str:
    return (
        f"{'case (recipe)':<31}{'cap':>4}{'chunk':>6}{'gen ' + unit_name:>8}{'planned':>8}{'train':>8}{'planned':>8}{'ratio':>7}"
        f"{'s/step':>8}{'rollout/s':>10}{'plain/s':>9}{'r/p':>7}  other decoders, tokens/s"
    )


def main(args: GpuCheckArguments):
    import datasets
    import torch
    from tqdm import tqdm

    import toy
    from memory_planner import BUILTIN_SHAPES

    if not args.reduced and not torch.cuda.is_available():
        raise UserError("no CUDA GPU here: run on a machine with an NVIDIA GPU, or pass --reduced for the CPU smoke mode")
    if args.reduced:
        args.completion_tokens, args.prompt_tokens = 64, 24
        # One thread: on a small, shared CPU, OpenMP threads waiting for a busy core make the same generate call
        # several times slower from one call to the next, which would swamp every ratio printed here.
        torch.set_num_threads(1)
        if args.decoders == ",".join(DECODERS):
            args.decoders = "eager"  # inductor takes a minute to compile on a CPU, and continuous batching needs CUDA
    cases, decoders = args.cases.split(","), args.decoders.split(",")
    unknown = [case for case in cases if case not in CASES] + [decoder for decoder in decoders if decoder not in DECODERS]
    if unknown:
        raise UserError(f"unknown case(s) or decoder(s) {', '.join(unknown)}: cases {', '.join(CASES)}; decoders {', '.join(DECODERS)}")
    if "eager" not in decoders:
        decoders.insert(0, "eager")  # plain generate: the baseline every ratio is taken against
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results_path = output_dir / "results.json"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (reduced mode)"
    results = {"device": device, "reduced": args.reduced, "torch": torch.__version__, "cases": []}
    tokenizer = toy.build_tokenizer()
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    unit, unit_name = (1024**2, "MiB") if args.reduced else (1024**3, "GiB")
    datasets.disable_progress_bars()
    start = time.time()
    print(f"GPU check on {device}: one optimizer step per consumer recipe, {args.completion_tokens}-token completions, random weights.")
    print("cap: GiB the process may allocate (the recipe's GPU); chunk: sequences per generate call (auto); gen / train: peak")
    print("memory measured and planned; ratio: measured / planned peak; s/step: the optimizer step, sampling included;")
    print(f"rollout/s: the trainer's sampling; plain/s: model.generate on the same weights and batch; r/p: their ratio\n{header(unit_name)}")
    for case in tqdm(cases, desc="GPU check", file=sys.stderr):
        if time.time() - start > args.time_budget_s:
            print(f"{case:<31} skipped: over the {args.time_budget_s:.0f} s budget")
            continue
        shape = BUILTIN_SHAPES[recipe_model(ROOT / "recipes" / f"{case}.yaml")]
        shape = tiny_shape(shape, layers=2) if args.reduced else shape
        shape_id = hashlib.sha1(repr(shape).encode()).hexdigest()[:8]  # a changed shape gets a new checkpoint
        checkpoint = build_random_checkpoint(shape, tokenizer, output_dir / f"random-{case}-{shape_id}", dtype)
        row = run_case(case, shape, checkpoint, tokenizer, args, output_dir, decoders)
        print(format_row(row, unit), flush=True)
        results["cases"].append(row)
        results_path.write_text(json.dumps(results, indent=2))
    print(f"\n{len(results['cases'])} case(s) in {time.time() - start:.0f} s; results: {results_path}")
    return results


if __name__ == "__main__":
    from transformers import HfArgumentParser

    run_cli(lambda: main(HfArgumentParser(GpuCheckArguments).parse_args_into_dataclasses()[0]))
