"""What the demo changed in the toy model's answers: habit or arithmetic?

    python benchmarks/toy_habits.py                                   # outputs/toy/model vs outputs/demo
    python benchmarks/toy_habits.py --before W/model --after RUN_DIR  # another world and its demo run

Both models answer the same held-out toy problems the way the demo measures them (recipes/demo.yaml: avg@4,
temperature 1, the first stage's 40 tokens, seed 0). Every answer is sorted by how it ends:
- right: scored 1 by the reward (rewards.verify);
- computed right: the last step of its worked solution gives the right result, whatever the ending says;
- unboxed: the result stated in words, no \\boxed{} (a sloppy ending);
- miscopied: a \\boxed{} answer other than the last step's result (the other sloppy ending);
- truncated: no \\boxed{} and no stated answer within the token limit.
Printed overall and per level, and written to `<output_dir>/toy_habits.json`.
"""

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

KINDS = ("right", "computed_right", "unboxed", "miscopied", "truncated")


@dataclass
class ToyHabitsArguments:
    before: str = field(default=str(REPO_ROOT / "outputs" / "toy" / "model"), metadata={"help": "The warm-started toy model."})
    after: str = field(default=str(REPO_ROOT / "outputs" / "demo"), metadata={"help": "The model the demo trained from it."})
    problems: str = field(default=str(REPO_ROOT / "outputs" / "toy" / "test.jsonl"), metadata={"help": "Held-out toy problems."})
    num_samples: int = field(default=4, metadata={"help": "Answers per problem (the demo's eval_num_samples)."})
    temperature: float = field(default=1.0, metadata={"help": "The demo's first-stage temperature."})
    max_new_tokens: int = field(default=40, metadata={"help": "The demo's first-stage max completion length."})
    seed: int = field(default=0, metadata={"help": "The demo recipe's seed."})
    output_dir: str = field(default=str(REPO_ROOT / "outputs" / "toy_habits"), metadata={"help": "Where toy_habits.json goes."})


def classify(text: str, answer: str) -> dict:
    """How one answer ends (see the module's docstring)."""
    from rewards import verify

    thinking, _, ending = text.partition("</think>")
    results = re.findall(r"=(-?\d+)", thinking)
    computed = results[-1] if results else None
    boxed = re.search(r"\\boxed\{(-?\d+)\}", ending)
    stated = re.search(r"answer is (-?\d+)", ending)
    return {
        "right": verify(text, answer) == 1.0,
        "computed_right": computed == answer,
        "unboxed": boxed is None and stated is not None,
        "miscopied": boxed is not None and boxed.group(1) != computed,
        "truncated": boxed is None and stated is None,
    }


def fractions(rows: list[dict]) -> dict:
    return {kind: round(sum(row[kind] for row in rows) / len(rows), 4) for kind in KINDS} | {"answers": len(rows)}


def measure(model_dir: str, problems, args: ToyHabitsArguments, desc: str) -> dict:
    """Fractions of each kind of ending, overall and per level."""
    from generation import load_model, load_tokenizer, sample_completions

    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    samples = sample_completions(model, tokenizer, problems["prompt"], num_samples=args.num_samples, temperature=args.temperature,
                                 max_new_tokens=args.max_new_tokens, seed=args.seed, desc=desc)  # fmt: skip
    rows = [classify(s.text, answer) | {"level": level} for group, answer, level in zip(samples, problems["answer"], problems["level"]) for s in group]
    levels = sorted({row["level"] for row in rows})
    return {"all": fractions(rows), "levels": {level: fractions([r for r in rows if r["level"] == level]) for level in levels}}


def format_table(before: dict, after: dict) -> str:
    lines = ["| level | " + " | ".join(f"{kind} before -> after" for kind in KINDS) + " |", "|---" * (len(KINDS) + 1) + "|"]
    rows = [("all", before["all"], after["all"])] + [(level, before["levels"][level], after["levels"][level]) for level in before["levels"]]
    for level, b, a in rows:
        lines.append(f"| {level} | " + " | ".join(f"{b[kind]:.3f} -> {a[kind]:.3f}" for kind in KINDS) + " |")
    return "\n".join(lines)


def main(args: ToyHabitsArguments) -> dict:
    from data import UserError, load_problems

    for path in (args.before, args.after, args.problems):
        if not Path(path).exists():
            raise UserError(f"{path} does not exist: build the toy world and run the demo first (python train_grpo.py)")
    problems = load_problems(args.problems)
    results = {"arguments": vars(args), "before": measure(args.before, problems, args, "before"), "after": measure(args.after, problems, args, "after")}
    results["markdown"] = format_table(results["before"], results["after"])
    print(results["markdown"])
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / "toy_habits.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    from transformers import HfArgumentParser

    from data import run_cli

    (arguments,) = HfArgumentParser(ToyHabitsArguments).parse_args_into_dataclasses()
    run_cli(main, arguments)
