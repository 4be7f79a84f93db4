"""GPU check: real GRPO steps at the consumer recipes' model sizes, on random weights, with no network.

    bash benchmarks/gpu_check.sh              # a machine with an NVIDIA GPU: about 6 minutes
    bash benchmarks/gpu_check.sh --reduced    # tiny shapes on the CPU: the same code path in under a minute

Cases: Qwen3-0.6B LoRA, Qwen3-1.7B QLoRA and Qwen3-4B QLoRA, each at 2K and 8K completion tokens. For
each model a random-weight checkpoint is built from `memory_planner.BUILTIN_SHAPES` (no download) and
saved; each case loads it as training does (`train_grpo.load_model`: bf16, or 4-bit through
bitsandbytes), wraps it with LoRA r=32 on every linear layer and runs two GRPO steps with
`PolarisGRPOTrainer` and a random reward (one generation round reused for both steps, `num_iterations 2`).
Random weights almost never sample the end token, so completions run to their maximum: the planner's
worst case. The toy character tokenizer stands in for the real one (the ids it reads exist in every vocabulary).

Printed per case: peak memory measured (`torch.cuda.max_memory_allocated`) against the planner's estimate
for the sampling phase and for the training phase, rollout tokens per second and seconds per step.
At 2K tokens completions are sampled with transformers `generate` as in training. At 8K, sampling token
by token would not fit the time budget: a chunked prefill of prompt + 8K random tokens fills the same KV
cache that sampling at full length holds, and the steps train on those tokens; rollout speed is not
measured there. Results are appended to `<output_dir>/results.json` case by case.
"""

import gc
import hashlib
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import UserError, run_cli  # noqa: E402


@dataclass
class GpuCheckArguments:
    reduced: bool = field(default=False, metadata={"help": "Tiny shapes on the CPU (checks that the script runs; no GPU numbers)."})
    output_dir: str = field(default="outputs/gpu_check", metadata={"help": "Where checkpoints and results.json go."})
    completion_lengths: str = field(default="2048,8192", metadata={"help": "Completion lengths to run (reduced mode: 16,32)."})
    sample_up_to: int = field(default=2048, metadata={"help": "Sample with generate up to this length; longer ones are prefilled."})
    sequences: int = field(default=4, metadata={"help": "Completions per step (one prompt x this many rollouts)."})
    prompt_tokens: int = field(default=128, metadata={"help": "Prompt length in tokens."})
    cases: str = field(default="qwen3-0.6b-lora,qwen3-1.7b-qlora,qwen3-4b-qlora", metadata={"help": "Which cases to run."})
    time_budget_s: float = field(default=450.0, metadata={"help": "Cases not started within this many seconds are skipped."})


# case name -> (built-in shape, 4-bit base)
CASES = {
    "qwen3-0.6b-lora": ("Qwen/Qwen3-0.6B", False),
    "qwen3-1.7b-qlora": ("Qwen/Qwen3-1.7B", True),
    "qwen3-4b-qlora": ("Qwen/Qwen3-4B", True),
}


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


class PhasePeaks:
    """Peak memory of the sampling phase and of what follows (the training steps), on CUDA."""

    def __init__(self):
        self.generation_peak = None
        self.generation_seconds = 0.0
        self.generated_tokens = 0

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
    """Wrap the trainer's sampling to time it and to split the peak memory into phases."""
    original = trainer._generate_single_turn

    def timed(*args, **kwargs):
        peaks.start_generation()
        completion_ids, logprobs = original(*args, **kwargs)
        peaks.end_generation(sum(len(ids) for ids in completion_ids))
        return completion_ids, logprobs

    trainer._generate_single_turn = timed


def prefill_rollout(length: int, peaks: PhasePeaks):
    """A `rollout_func` that fills the KV cache of full-length completions by a chunked prefill of
    prompt + `length` random tokens, instead of sampling them one by one, and returns those tokens."""
    import torch

    def rollout(prompts, trainer):
        tokenizer, model = trainer.processing_class, trainer.model
        prompt_ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True)["input_ids"] for p in prompts]
        vocabulary = [i for i in range(min(len(tokenizer), model.config.get_text_config().vocab_size)) if i not in trainer.eos_token_ids]
        rng = random.Random(trainer.state.global_step)
        completion_ids = [[rng.choice(vocabulary) for _ in range(length)] for _ in prompts]
        device = next(model.parameters()).device
        sequences = torch.tensor([p + c for p, c in zip(prompt_ids, completion_ids)], device=device)
        peaks.start_generation()
        was_training = model.training
        model.eval()  # no gradient checkpointing, so the cache is kept
        with torch.no_grad():
            cache = None
            for start in range(0, sequences.size(1), 1024):
                output = model(input_ids=sequences[:, start : start + 1024], past_key_values=cache, use_cache=True, logits_to_keep=1)
                cache = output.past_key_values
        del cache, output
        model.train(was_training)
        peaks.end_generation(0)
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}

    return rollout


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


def run_case(name: str, shape, qlora: bool, checkpoint: Path, tokenizer, length: int, args: GpuCheckArguments, work_dir: Path) -> dict:
    import torch
    from trl import ModelConfig, get_peft_config

    from memory_planner import estimate, setup_from_args
    from train_grpo import PolarisConfig, PolarisGRPOTrainer, load_model

    on_gpu = torch.cuda.is_available()
    sampled = length <= args.sample_up_to
    training_args = PolarisConfig(
        output_dir=str(work_dir / f"{name}-{length}"),
        per_device_train_batch_size=args.sequences,
        num_generations=args.sequences,
        steps_per_generation=1,
        gradient_accumulation_steps=1,
        num_iterations=2,  # one generation round serves both steps
        max_steps=2,
        max_completion_length=length,
        temperature=1.0,
        learning_rate=1e-5,
        gradient_checkpointing=True,
        rollout_rescue=False,  # not with a rollout_func; no effect on memory
        informative_substitution=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
    )
    model_args = ModelConfig(
        model_name_or_path=str(checkpoint),
        dtype="bfloat16" if on_gpu else "float32",
        use_peft=True,
        lora_r=32,
        lora_alpha=64,
        lora_dropout=0.0,
        lora_target_modules=["all-linear"],
        load_in_4bit=qlora,
    )
    script_args = SimpleNamespace(max_prompt_length=args.prompt_tokens)
    setup = setup_from_args(script_args, training_args, model_args)
    if not on_gpu:  # the CPU computes in fp32, and its dropout masks are full-width (no dropout here)
        setup.autocast = False
    planned = estimate(shape, setup, length)

    dataset = training_problems(tokenizer, args.prompt_tokens, 16, work_dir / "problems.jsonl")
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
        rollout_func=None if sampled else prefill_rollout(length, peaks),
        callbacks=[timer.callback],
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)  # the table below is the output
    trainer.remove_callback(ProgressCallback)
    if sampled:
        time_generation(trainer, peaks)
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    training_peak = torch.cuda.max_memory_allocated() - baseline if on_gpu else None
    generation_peak = peaks.generation_peak - baseline if peaks.generation_peak is not None else None
    mean_length = next((row["completions/mean_length"] for row in trainer.state.log_history if "completions/mean_length" in row), None)
    trainer.accelerator.free_memory()  # drops the accelerator's references to the model and optimizer
    del trainer, model
    free_memory()

    row = {
        "case": name,
        "completion_tokens": length,
        "sampling": "generate" if sampled else "prefill",
        "mean_completion_length": mean_length,
        "measured_generation_bytes": generation_peak,
        "planned_generation_bytes": round(planned.generation),
        "measured_training_bytes": training_peak,
        "planned_training_bytes": round(planned.training),
        "rollout_tokens_per_s": round(peaks.generated_tokens / peaks.generation_seconds, 1) if sampled and peaks.generation_seconds else None,
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

    return (
        f"{row['case']:<18}{row['completion_tokens']:>7} {row['sampling']:<9}"
        f"{number(row['measured_generation_bytes'], 9, unit)}{number(row['planned_generation_bytes'], 9, unit)}"
        f"{number(row['measured_training_bytes'], 10, unit)}{number(row['planned_training_bytes'], 9, unit)}"
        f"{number(row.get('peak_ratio_measured_over_planned'), 7)}"
        f"{number(row['rollout_tokens_per_s'], 10, digits=1)}{number(row['seconds_per_step'], 8)}"
    )


def header(unit_name: str) -> str:
    return (
        f"{'case':<18}{'tokens':>7} {'sampling':<9}{'gen ' + unit_name:>9}{'planned':>9}{'train ' + unit_name:>10}{'planned':>9}"
        f"{'ratio':>7}{'rollout/s':>10}{'s/step':>8}"
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
        args.completion_lengths, args.sample_up_to, args.prompt_tokens = "16,32", 16, 24
    unknown = [case for case in args.cases.split(",") if case not in CASES]
    if unknown:
        raise UserError(f"unknown case(s) {', '.join(unknown)}: choose from {', '.join(CASES)}")
    lengths = [int(length) for length in args.completion_lengths.split(",")]
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results_path = output_dir / "results.json"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (reduced mode)"
    results = {"device": device, "reduced": args.reduced, "cases": []}
    tokenizer = toy.build_tokenizer()
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    unit, unit_name = (1024**2, "MiB") if args.reduced else (1024**3, "GiB")
    datasets.disable_progress_bars()
    start = time.time()
    print(f"GPU check on {device}: peak memory allocated by sampling (gen) and training, measured and planned")
    print(f"(memory_planner); ratio = measured / planned peak; rollout tokens per second; seconds per step\n{header(unit_name)}")
    jobs = [(case, length) for case in args.cases.split(",") for length in lengths]
    for index, (case, length) in enumerate(tqdm(jobs, desc="GPU check", file=sys.stderr)):
        hub_id, qlora = CASES[case]
        shape = BUILTIN_SHAPES[hub_id] if not args.reduced else tiny_shape(BUILTIN_SHAPES[hub_id], layers=2 + index // len(lengths))
        if time.time() - start > args.time_budget_s:
            print(f"{case:<18}{length:>7} skipped: over the {args.time_budget_s:.0f} s budget")
            continue
        shape_id = hashlib.sha1(repr(shape).encode()).hexdigest()[:8]  # a changed shape gets a new checkpoint
        checkpoint = build_random_checkpoint(shape, tokenizer, output_dir / f"random-{case}-{shape_id}", dtype)
        row = run_case(case, shape, qlora, checkpoint, tokenizer, length, args, output_dir)
        print(format_row(row, unit), flush=True)
        results["cases"].append(row)
        results_path.write_text(json.dumps(results, indent=2))
    print(f"\n{len(results['cases'])} case(s) in {time.time() - start:.0f} s; results: {results_path}")
    return results


if __name__ == "__main__":
    from transformers import HfArgumentParser

    run_cli(lambda: main(HfArgumentParser(GpuCheckArguments).parse_args_into_dataclasses()[0]))
