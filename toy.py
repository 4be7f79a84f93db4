"""The offline demo world: a tiny Qwen3 model that half-knows arithmetic.

Everything here is built locally, with no hub access, so the whole POLARIS recipe can be run and
tested on a laptop CPU:

- a deterministic character-level tokenizer with a Qwen-style chat template,
- synthetic math problems of graded difficulty in the same schema as real data (`problem`, `answer`),
- a tiny Qwen3-architecture model given a short supervised warm start, so that it writes
  `<think>...</think>` then `\\boxed{N}` and solves some problems always, some sometimes and some never.

    python toy.py    # into outputs/toy in the repository, or --output_dir DIR

writes `model/` (model + tokenizer, loadable with `AutoModelForCausalLM` / `AutoTokenizer`),
`train.jsonl`, `test.jsonl` and `recipe.json` into the output directory. A second call with the same
recipe reuses what is there (the recipe hash is stored in `recipe.json`).
"""

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data import DEFAULT_PROMPT_SUFFIX, UserError, build_messages


TOY_RECIPE_VERSION = 5  # bump when the generator or the warm start changes meaning
TOY_DIR_ENV = "POLARIS_TOY_DIR"
TOY_DIR_HELP = f"Where the toy world is built and cached: ${TOY_DIR_ENV} if set, else outputs/toy in the repository."


def default_toy_dir() -> str:
    """One toy world per clone, whatever the current directory (a notebook in notebooks/ finds the one the
    demo built); $POLARIS_TOY_DIR moves it."""
    return os.environ.get(TOY_DIR_ENV) or str(Path(__file__).resolve().parent / "outputs" / "toy")


@dataclass
class ToyArguments:
    """Arguments of `toy.py`."""

    output_dir: str = field(default_factory=default_toy_dir, metadata={"help": TOY_DIR_HELP})
    seed: int = field(default=0, metadata={"help": "Seed for data, initialisation and warm start."})
    num_train: int = field(default=2000, metadata={"help": "Number of toy RL training problems."})
    num_test: int = field(default=200, metadata={"help": "Number of held-out toy problems."})
    warmup_steps: int = field(default=800, metadata={"help": "Supervised warm-start steps."})
    sloppy_fraction: float = field(
        default=0.85,
        metadata={
            "help": "Fraction of warm-start demonstrations that end sloppily (answer left unboxed, or miscopied "
            "from the last step), on every level but the easiest: habits of imperfect SFT data that RL can unlearn. "
            "Spread over all levels, the habit also sits on answers the model computes right, in every world the "
            "recipe builds (benchmarks/demo_worlds.py); grown with difficulty it sat mostly on wrong ones."
        },
    )
    build_threads: int = field(
        default=1,
        metadata={
            "help": "Threads of the warm start. One builds the same world on every machine of a kind; on some machines "
            "more threads sum floats in another order and so build another world (benchmarks/demo_worlds.py)."
        },
    )
    force: bool = field(default=False, metadata={"help": "Rebuild even when a matching build exists."})


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Kept as single tokens but not "special", so they survive `skip_special_tokens=True` decoding.
# The instruction suffix, the role names, "What is " and "\\boxed{" are one token each too, as a real
# tokenizer compresses common text: it keeps toy sequences short (about 40 tokens for a problem and its
# solution), so the warm start and the demo fit in minutes on a CPU.
WORD_TOKENS = ["<think>", "</think>", DEFAULT_PROMPT_SUFFIX, "user", "assistant", "What is ", "\\boxed{"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer():
    """A character-level `PreTrainedTokenizerFast`: every printable ASCII character is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + ["<unk>"] + characters)}
    # BPE without merges is a character tokenizer that maps unknown characters to <unk>.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        bos_token=None,
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )
    tokenizer.add_tokens(WORD_TOKENS)
    return tokenizer


# ----------------------------------------------------------------------------------------------
# Synthetic problems
# ----------------------------------------------------------------------------------------------

# Difficulty levels, easiest first: (name, number of operands, digits per operand, operators).
LEVELS = [
    ("add_1x1", 2, (1, 1), "+"),
    ("sub_1x1", 2, (1, 1), "-"),
    ("mul_1x1", 2, (1, 1), "*"),
    ("add_2x1", 2, (2, 1), "+"),
    ("add3_1x1x1", 3, (1, 1, 1), "+-"),
    ("add_2x2", 2, (2, 2), "+"),
    ("mul_2x1", 2, (2, 1), "*"),
    ("sub_2x2", 2, (2, 2), "-"),
    ("add_3x3", 2, (3, 3), "+"),
    ("mul_2x2", 2, (2, 2), "*"),
]


def _random_number(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


def _solution_steps(numbers: list[int], operators: list[str]) -> tuple[list[str], int]:
    """Left-to-right worked steps, the way the warm start teaches the model to 'think'."""
    steps, value = [], numbers[0]
    for operator, number in zip(operators, numbers[1:]):
        if operator == "*" and number >= 10:
            # Long multiplication: split the second factor into tens and units.
            tens, units = number - number % 10, number % 10
            steps += [f"{value}*{units}={value * units}", f"{value}*{tens}={value * tens}"]
            steps.append(f"{value * units}+{value * tens}={value * number}")
            value = value * number
            continue
        result = value + number if operator == "+" else value - number if operator == "-" else value * number
        steps.append(f"{value}{operator}{number}={result}")
        value = result
    return steps, value


def make_problem(rng: random.Random, level: int) -> dict:
    name, _, digits, operator_choices = LEVELS[level]
    numbers = [_random_number(rng, d) for d in digits]
    operators = [rng.choice(operator_choices) for _ in numbers[1:]]
    expression = str(numbers[0]) + "".join(f" {op} {n}" for op, n in zip(operators, numbers[1:]))
    steps, value = _solution_steps(numbers, operators)
    return {
        "problem": f"What is {expression}?",
        "answer": str(value),
        "level": name,
        "solution": "<think>" + "\n".join(steps) + "</think>\n\\boxed{" + str(value) + "}",
    }


def sloppy_solution(rng: random.Random, problem: dict) -> str:
    """The worked solution with a careless ending: the answer unboxed, or boxed but miscopied.

    Real SFT data is imperfect and an SFT model copies its habits; these two cost reward without
    being arithmetic errors, so RL can remove them within a few dozen steps on a CPU.
    """
    thinking = problem["solution"].split("</think>")[0] + "</think>\n"
    value = int(problem["answer"])
    if rng.random() < 0.5:
        return thinking + f"The answer is {value}."
    return thinking + "\\boxed{" + str(value + rng.choice([-10, -1, 1, 10])) + "}"


def make_demonstrations(num: int, seed: int, sloppy_fraction: float) -> list[dict]:
    """Warm-start problems; a `sloppy_fraction` of those above the easiest level carry a sloppy solution.

    The easiest level stays clean, so some problems are solved 8 times out of 8 (the too-easy prompts the
    difficulty filter drops). On the other levels the habit does not depend on difficulty, as an answer style
    of SFT data does not: it then costs reward wherever the model gets the arithmetic right, which is where RL
    can turn its removal into accuracy (sloppiness that grew with difficulty sat mostly on levels whose
    arithmetic the model gets wrong, and the gain depended on how much arithmetic a world had learned).
    """
    rng = random.Random(f"{seed}-sloppy")
    level_index = {name: i for i, (name, *_) in enumerate(LEVELS)}
    problems = make_problems(num, seed, "warmstart")
    for problem in problems:
        if level_index[problem["level"]] > 0 and rng.random() < sloppy_fraction:
            problem["solution"] = sloppy_solution(rng, problem)
    return problems


def make_problems(num: int, seed: int, salt: str) -> list[dict]:
    """`num` problems spread evenly over the levels, reproducible from (seed, salt)."""
    rng = random.Random(f"{seed}-{salt}")
    problems = [make_problem(rng, i % len(LEVELS)) for i in range(num)]
    rng.shuffle(problems)
    for i, problem in enumerate(problems):
        problem["id"] = f"toy-{salt}-{i}"
    return problems


# ----------------------------------------------------------------------------------------------
# Model and warm start
# ----------------------------------------------------------------------------------------------


def build_model(tokenizer, seed: int):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config)


def _encode_example(tokenizer, problem: dict) -> tuple[list[int], list[int]]:
    prompt = tokenizer.apply_chat_template(build_messages(problem["problem"]), tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(problem["solution"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return prompt_ids + completion_ids, [-100] * len(prompt_ids) + completion_ids


def _length_grouped_batches(tokenizer, problems: list[dict], steps: int, batch_size: int, generator, pool: int = 2):
    """Random batches of similar-length sequences (as transformers' `group_by_length`): less padding.

    Every `pool` steps, `pool * batch_size` random examples are sorted by length, cut into batches, and
    the batches are shuffled.
    """
    import torch

    for start in range(0, steps, pool):
        count = min(pool, steps - start)
        indices = torch.randint(len(problems), (count * batch_size,), generator=generator).tolist()
        examples = sorted((_encode_example(tokenizer, problems[i]) for i in indices), key=lambda e: len(e[0]))
        batches = [examples[b * batch_size : (b + 1) * batch_size] for b in range(count)]
        for b in torch.randperm(count, generator=generator).tolist():
            yield batches[b]


def warm_start(model, tokenizer, problems: list[dict], steps: int, seed: int, batch_size: int = 32):
    """Supervised steps on worked solutions; few enough that the harder levels stay unreliable."""
    import torch
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    batches = _length_grouped_batches(tokenizer, problems, steps, batch_size, generator)
    progress = tqdm(batches, total=steps, desc="Toy warm start", unit="step", mininterval=1.0)
    for batch in progress:
        length = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (length - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (length - len(lab)) for _, lab in batch])
        attention_mask = torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids, _ in batch])
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model


# ----------------------------------------------------------------------------------------------
# Build with cache
# ----------------------------------------------------------------------------------------------


def recipe_hash(args: ToyArguments) -> str:
    recipe = {k: v for k, v in asdict(args).items() if k not in ("output_dir", "force")}
    recipe["version"] = TOY_RECIPE_VERSION
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def model_hash(model_dir: str | Path) -> str | None:
    """The first 8 hex digits of the sha256 of a model directory's weights: which world a run starts from.
    The same recipe builds another world where floats are summed in another order (another instruction set),
    so two users compare this before comparing their demos' numbers. None without a model.safetensors."""
    weights = Path(model_dir) / "model.safetensors"
    return hashlib.sha256(weights.read_bytes()).hexdigest()[:8] if weights.is_file() else None


def _write_jsonl(path: Path, rows: list[dict]):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _is_built(output_dir: Path, expected_hash: str) -> bool:
    recipe_file = output_dir / "recipe.json"
    return recipe_file.exists() and json.loads(recipe_file.read_text()).get("hash") == expected_hash


def build_toy_world(args: ToyArguments) -> Path:
    """Build (or reuse) the toy model and data in `args.output_dir`; return that directory."""
    from filelock import FileLock

    if args.build_threads < 1:
        raise UserError(f"--build_threads must be at least 1, got {args.build_threads}")
    output_dir = Path(args.output_dir)
    expected_hash = recipe_hash(args)
    if not args.force and _is_built(output_dir, expected_hash):
        print(f"Toy world found in {output_dir} (recipe {expected_hash}); reusing it.")
        return output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    # Several processes (parallel tests, `accelerate launch`) may ask at once: one builds, the rest wait.
    with FileLock(str(output_dir / ".build.lock")):
        if not args.force and _is_built(output_dir, expected_hash):
            return output_dir
        _build(args, output_dir, expected_hash)
    return output_dir


def _build(args: ToyArguments, output_dir: Path, expected_hash: str):
    import torch

    start = time.time()
    recipe_file = output_dir / "recipe.json"
    recipe_file.unlink(missing_ok=True)  # an interrupted rebuild must not look complete
    torch.manual_seed(args.seed)
    train = make_problems(args.num_train, args.seed, "train")
    test = make_problems(args.num_test, args.seed, "test")
    warm = make_demonstrations(32 * args.warmup_steps, args.seed, args.sloppy_fraction)

    tokenizer = build_tokenizer()
    # One thread by default: float sums taken in another order (more threads split them, another instruction set
    # orders them otherwise) grow over 800 steps into a different model; one thread builds the same world on
    # every machine of a kind. benchmarks/demo_worlds.py measures the demo on several such worlds. The build
    # took 97-156 s on one thread of a quiet 2-core machine, 97 s on two.
    threads = torch.get_num_threads()
    torch.set_num_threads(args.build_threads)
    try:
        model = build_model(tokenizer, args.seed)
        warm_start(model, tokenizer, warm, args.warmup_steps, args.seed)
    finally:
        torch.set_num_threads(threads)

    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(output_dir / "model")
    tokenizer.save_pretrained(output_dir / "model")
    columns = ("id", "problem", "answer", "level")
    _write_jsonl(output_dir / "train.jsonl", [{k: p[k] for k in columns} for p in train])
    _write_jsonl(output_dir / "test.jsonl", [{k: p[k] for k in columns} for p in test])
    recipe = {"hash": expected_hash, **{k: v for k, v in asdict(args).items() if k != "force"}}
    recipe["seconds"] = round(time.time() - start, 1)
    recipe["model_hash"] = model_hash(output_dir / "model")
    recipe_file.write_text(json.dumps(recipe, indent=2))  # written last: marks the build complete
    print(f"Toy world {recipe['model_hash']} built in {recipe['seconds']} s: {output_dir}")


def main(args: ToyArguments | None = None) -> Path:
    if args is None:
        from transformers import HfArgumentParser

        (args,) = HfArgumentParser(ToyArguments).parse_args_into_dataclasses()
    return build_toy_world(args)


if __name__ == "__main__":
    from data import run_cli

    run_cli(main)
