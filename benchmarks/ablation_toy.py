"""Ablation on the toy world: each POLARIS ingredient switched off in turn, and the baselines a user would pick instead.

    python benchmarks/ablation_toy.py --quick                 # a laptop: one seed, a few steps, every arm
    python benchmarks/ablation_toy.py                         # seeds 0 1 2, the demo recipe's steps
    python benchmarks/ablation_toy.py --seeds 0 1 --max_steps 30 --arms polaris no_difficulty_filter
    python benchmarks/ablation_toy.py --learning_rate 2e-4    # other flags go to train_grpo.py

Every arm starts from the demo recipe (recipes/demo.yaml) trained on the difficulty-filtered toy problems,
changes one thing (see `ARMS`), and runs `train_grpo.main`. All arms take the same steps with the same
rollouts per step (prompts x num_generations); dynamic sampling generates extra batches on top, which the
table counts as generated completion tokens. Every trained model is then measured the same way, whatever
it was trained at: `evaluate.main` on held-out toy problems drawn apart from the training set, at one
temperature and one length.

Per arm it reports held-out accuracy (avg@k, sampled) and, over paired seeds (same seed, same data order,
same evaluation problems), the mean difference to the full recipe with a 95% t-interval, plus the
measurement's own standard error of that difference (from the per-problem paired differences), so a
reader sees whether a 0.02 difference could be resolved. Also: the informative fraction of the groups
trained on, the truncated fraction, generated tokens and CPU seconds, and what the toy world shows of the
phenomena each ingredient targets (too-easy prompts, zero-variance groups, diversity collapse, truncation).

Resumable: each finished (arm, seed) run is written to `<output_dir>/ablation_toy.json` at once; a rerun
with the same settings skips it (the held-out samples and the filter's samples are resumable files too).
Writes `ablation_toy.md` (the table) and `ablation_toy.png` (differences with their intervals).
"""

import copy
import dataclasses
import hashlib
import json
import math
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable


REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

FULL = "polaris"
RESULTS_FILE = "ablation_toy.json"
# The algorithm settings taken from TRL's `GRPOConfig` defaults for the TRL arm. The learning rate, batch shape
# and steps stay the recipe's: TRL's 1e-6 does not move a 0.8M-parameter model in 40 steps.
TRL_DEFAULT_KEYS = ("beta", "epsilon", "epsilon_high", "loss_type", "scale_rewards", "temperature", "top_p", "top_k",
                    "weight_decay", "lr_scheduler_type")  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Arms: edits of the recipe
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arm:
    description: str
    edit: Callable[[dict], None] = lambda recipe: None  # changes the recipe (a dict read from YAML) in place
    filtered: bool = True  # trains on the difficulty-filtered problems
    trl_trainer: bool = False  # TRL's own `GRPOTrainer` instead of `PolarisGRPOTrainer`


def set_all_stages(key: str, value_of: Callable[[list[dict]], float]) -> Callable[[dict], None]:
    """An edit giving every stage the same `key` (e.g. the first stage's temperature)."""

    def edit(recipe: dict):
        value = value_of(recipe["stages"])
        for stage in recipe["stages"]:
            stage[key] = value

    return edit


def no_repairs(recipe: dict):
    recipe.update(rollout_rescue=False, informative_substitution=False, dynamic_sampling=False)


def one_stage(temperature: float | None = None, length_of=lambda stages: stages[-1]["max_completion_length"]):
    """A single fixed stage, no refresh: the recipe's last length and (by default) first temperature."""

    def edit(recipe: dict):
        stages = recipe.pop("stages")
        recipe["temperature"] = stages[0]["temperature"] if temperature is None else temperature
        recipe["max_completion_length"] = length_of(stages)

    return edit


def trl_defaults(recipe: dict):
    import trl

    defaults = {f.name: f.default for f in dataclasses.fields(trl.GRPOConfig)}
    no_repairs(recipe)
    one_stage(length_of=lambda stages: stages[0]["max_completion_length"])(recipe)
    recipe.update({key: defaults[key] for key in TRL_DEFAULT_KEYS})


def deepscaler(recipe: dict):
    no_repairs(recipe)
    for stage in recipe["stages"]:
        stage.update(temperature=0.6)
        stage.pop("refresh_data", None)


def justrl(recipe: dict):
    no_repairs(recipe)
    one_stage()(recipe)


def chain(*edits: Callable[[dict], None]) -> Callable[[dict], None]:
    def edit(recipe: dict):
        for each in edits:
            each(recipe)

    return edit


ARMS = {
    FULL: Arm("the full recipe: filtered data, two stages (temperature and length rise), rescue, substitution"),
    "no_difficulty_filter": Arm("trained on all toy problems, the 8/8-solved ones included", filtered=False),
    "no_rising_temperature": Arm("every stage at the first stage's temperature", set_all_stages("temperature", lambda s: s[0]["temperature"])),
    "no_growing_length": Arm("every stage at the first stage's length", set_all_stages("max_completion_length", lambda s: s[0]["max_completion_length"])),
    "no_rollout_rescue": Arm("all-failed groups are not given a kept correct completion", lambda r: r.update(rollout_rescue=False)),
    "no_informative_substitution": Arm("zero-variance groups are trained as they are", lambda r: r.update(informative_substitution=False)),
    "plus_dynamic_sampling": Arm("DAPO's dynamic sampling added (off in the recipe): extra batches when few groups are informative",
                                 lambda r: r.update(dynamic_sampling=True)),
    "trl_grpo": Arm("TRL's GRPOTrainer with TRL's defaults (no clip-higher, linear lr decay), one stage, no filter, no repairs",
                    trl_defaults, filtered=False, trl_trainer=True),
    "deepscaler": Arm("DeepScaleR-style: temperature 0.6, lengths growing, no filter, no repairs", deepscaler, filtered=False),
    "justrl": Arm("JustRL-style: one stage at fixed settings (longest length), no filter, no repairs", justrl, filtered=False),
}  # fmt: skip


@dataclass
class AblationArguments:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Paired seeds: one run of every arm per seed."})
    arms: list[str] = field(default_factory=lambda: list(ARMS), metadata={"help": f"Among {', '.join(ARMS)} ({FULL} is always run)."})
    max_steps: int | None = field(default=None, metadata={"help": "Training steps of every run (default: the recipe's); stage steps scale with it."})
    prompts_per_step: int | None = field(default=None, metadata={"help": "Prompts per optimizer step (default: the recipe's)."})
    eval_problems: int = field(default=1000, metadata={"help": "Held-out toy problems every trained model is measured on."})
    eval_num_samples: int = field(default=4, metadata={"help": "Samples per held-out problem (avg@k)."})
    eval_temperature: float = field(default=1.0, metadata={"help": "Temperature of the held-out measurement, the same for every arm."})
    eval_max_tokens: int | None = field(default=None, metadata={"help": "Length of the held-out measurement (default: the recipe's longest stage)."})
    filter_num_samples: int = field(default=8, metadata={"help": "Samples per training problem for the difficulty filter (POLARIS: 8)."})
    quick: bool = field(default=False, metadata={"help": "A laptop check of every arm: seed 0, 6 steps of 8 prompts, 100 held-out problems x 2, filter at 2 samples."})
    recipe: str = field(default=str(REPO_ROOT / "recipes" / "demo.yaml"), metadata={"help": "Recipe every arm starts from."})
    toy_dir: str = field(default=str(REPO_ROOT / "outputs" / "toy"), metadata={"help": "Where the toy world is built and cached."})
    output_dir: str = field(default=str(REPO_ROOT / "outputs" / "ablation_toy"), metadata={"help": "Runs, results, table and plot."})


def apply_quick(args: AblationArguments) -> AblationArguments:
    if not args.quick:
        return args
    return dataclasses.replace(args, seeds=[0], max_steps=6, prompts_per_step=8, eval_problems=100, eval_num_samples=2, filter_num_samples=2)


def scale_stage_steps(recipe: dict, max_steps: int):
    """Stages start at the same fraction of the run when `--max_steps` differs from the recipe's."""
    old = recipe.get("max_steps")
    for stage in recipe.get("stages") or []:
        if old and stage["step"]:
            stage["step"] = max(1, round(stage["step"] * max_steps / old))
    recipe["max_steps"] = max_steps


def arm_recipe(base: dict, arm: str, args: AblationArguments, filtered_data: str, train_data: str) -> dict:
    """The recipe one arm trains with (a new dict): the common settings, then the arm's edit."""
    recipe = copy.deepcopy(base)
    if args.max_steps is not None:
        scale_stage_steps(recipe, args.max_steps)
    if args.prompts_per_step is not None:
        recipe["per_device_train_batch_size"] = args.prompts_per_step * recipe.get("num_generations", 8)
    recipe.update(dataset_name=filtered_data if ARMS[arm].filtered else train_data, eval_dataset_name=None,
                  logging_steps=1, save_strategy="no", report_to="none", overwrite_output_dir=True)  # fmt: skip
    ARMS[arm].edit(recipe)
    return recipe


# ----------------------------------------------------------------------------------------------
# Data: held-out problems and the difficulty filter
# ----------------------------------------------------------------------------------------------


def write_heldout(path: Path, num: int, toy_seed: int) -> Path:
    """`num` toy problems drawn apart from train.jsonl and test.jsonl (their own salt), same levels mix."""
    import toy

    if not path.is_file():
        rows = [{k: p[k] for k in ("id", "problem", "answer", "level")} for p in toy.make_problems(num, toy_seed, "ablation-heldout")]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run_difficulty_filter(args: AblationArguments, toy_dir: Path, base: dict, output_dir: Path) -> dict:
    """filter_data.py on the toy training problems at the first stage's temperature and length (resumable)."""
    import filter_data

    first = (base.get("stages") or [{}])[0]
    filter_args = filter_data.FilterArguments(
        model=str(toy_dir / "model"), dataset=str(toy_dir / "train.jsonl"), output=str(output_dir / "train_filtered.jsonl"),
        num_samples=args.filter_num_samples, temperature=float(first.get("temperature", base.get("temperature", 1.0))),
        max_tokens=int(first.get("max_completion_length", base.get("max_completion_length", 48))), seed=0, toy_dir=str(toy_dir),
    )  # fmt: skip
    return filter_data.main(filter_args)


# ----------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------


class GeneratedTokenCounter:
    """Counts the completion tokens the policy samples while training (dynamic sampling's extra batches
    included; rescued rollouts are copies, not samples)."""

    generated_tokens = 0

    def _generate(self, prompts):
        generated = super()._generate(prompts)
        if self.model.training:
            sampled = getattr(self, "_generated_completion_ids", None) or generated[1]  # before rescue, when repaired
            type(self).generated_tokens += sum(len(ids) for ids in sampled)
        return generated


def counting(trainer_class):
    return type(f"Counting{trainer_class.__name__}", (GeneratedTokenCounter, trainer_class), {"generated_tokens": 0})


def training_arguments(recipe_path: Path, seed: int, output_dir: Path, toy_dir: str, extra: list[str]):
    from train_grpo import parse_args

    return parse_args(["--config", str(recipe_path), "--seed", str(seed), "--output_dir", str(output_dir), "--toy_dir", toy_dir, *extra])


def log_means(log_history: list[dict]) -> dict:
    """Run means of what the trainer logged: informative fractions, truncation, and entropy early and late."""
    def mean(key, rows=log_history):
        values = [row[key] for row in rows if row.get(key) is not None]
        return statistics.fmean(values) if values else None

    zero_std = mean("frac_reward_zero_std")
    trained_zero_std = mean("trained/frac_reward_zero_std")
    steps = [row for row in log_history if row.get("entropy") is not None]
    tenth = max(1, len(steps) // 10)
    return {
        "informative_fraction_generated": None if zero_std is None else 1 - zero_std,
        "informative_fraction_trained": (1 - trained_zero_std) if trained_zero_std is not None else (None if zero_std is None else 1 - zero_std),
        "all_correct_fraction": mean("repair/all_correct"),
        "truncated_fraction": mean("completions/clipped_ratio"),
        "entropy_first": mean("entropy", steps[:tenth]) if steps else None,
        "entropy_last": mean("entropy", steps[-tenth:]) if steps else None,
        "training_reward": mean("sampled/reward") if mean("sampled/reward") is not None else mean("reward"),
    }


def evaluate_model(model_dir: Path, heldout: Path, args: AblationArguments, seed: int, max_tokens: int) -> dict:
    """Held-out avg@k of one trained model with `evaluate.main`; per-problem accuracies for the paired errors."""
    import evaluate

    eval_dir = model_dir / "heldout_eval"
    evaluate.main(evaluate.EvalArguments(
        model=str(model_dir), data=[str(heldout)], num_samples=args.eval_num_samples, temperature=args.eval_temperature,
        top_p=1.0, top_k=0, max_tokens=max_tokens, seed=seed, batch_size=512, output_dir=str(eval_dir), ngram_unit="char",
    ))  # fmt: skip
    return per_problem_accuracy(eval_dir / evaluate.SAMPLES_FILE)


def per_problem_accuracy(samples_file: Path) -> dict:
    correct: dict[str, list[bool]] = {}
    for line in samples_file.read_text().splitlines():
        row = json.loads(line)
        correct.setdefault(row["problem_id"], []).append(bool(row["correct"]))
    per_problem = {pid: sum(c) / len(c) for pid, c in correct.items()}
    return {"accuracy": statistics.fmean(per_problem.values()), "per_problem": per_problem}


def run_arm(arm: str, seed: int, recipe: dict, args: AblationArguments, heldout: Path, eval_max_tokens: int, extra: list[str]) -> dict:
    import yaml
    from trl import GRPOTrainer

    from train_grpo import PolarisGRPOTrainer, main

    run_dir = Path(args.output_dir) / f"{arm}-seed{seed}"
    shutil.rmtree(run_dir / "heldout_eval", ignore_errors=True)  # samples of an interrupted run's model: it is trained again
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe_path = run_dir / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    script_args, training_args, model_args = training_arguments(recipe_path, seed, run_dir, args.toy_dir, extra)
    trainer_class = counting(GRPOTrainer if ARMS[arm].trl_trainer else PolarisGRPOTrainer)
    wall, cpu = time.time(), time.process_time()
    summary = main(script_args, training_args, model_args, trainer_class=trainer_class)
    train_seconds, train_cpu = time.time() - wall, time.process_time() - cpu
    state = json.loads((run_dir / "trainer_state.json").read_text())
    measured = evaluate_model(run_dir, heldout, args, seed, eval_max_tokens)
    rollouts_per_step = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    return {
        "accuracy": measured["accuracy"],
        "per_problem": measured["per_problem"],
        "steps": summary["steps"],
        "rollouts_per_step": rollouts_per_step,
        "generated_tokens": trainer_class.generated_tokens,
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(train_cpu, 1),
        "stages": summary.get("stages", []),
        "batch_repair": summary.get("batch_repair"),
        **log_means(state["log_history"]),
    }


# ----------------------------------------------------------------------------------------------
# Statistics (pure)
# ----------------------------------------------------------------------------------------------

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}  # fmt: skip


def t_quantile_975(df: int) -> float:
    """Student's t 97.5% quantile (two-sided 95%); between table rows the next smaller df's (wider) value."""
    if df >= 60:
        return 1.96 + 2.4 / df  # within 0.003 of the exact value from 60 on
    return T_975[max(k for k in T_975 if k <= df)]


def paired_interval(differences: list[float]) -> dict:
    """Mean of paired differences and its 95% t-interval over the pairs (None with fewer than two)."""
    n = len(differences)
    mean = statistics.fmean(differences) if differences else None
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n, "stderr": None}
    stderr = statistics.stdev(differences) / math.sqrt(n)
    half = t_quantile_975(n - 1) * stderr
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n, "stderr": stderr}


def measurement_stderr(arm: dict[str, float], full: dict[str, float]) -> float:
    """Standard error of one run's accuracy difference from the evaluation alone: per-problem paired
    differences (same problems), their standard deviation over sqrt(problems)."""
    common = sorted(arm.keys() & full.keys())
    differences = [arm[p] - full[p] for p in common]
    return statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else float("nan")


def compare_arms(runs: dict[str, dict[str, dict]], arms: list[str]) -> dict:
    """Per arm over the seeds where both it and the full recipe finished: mean accuracy, paired difference
    to the full recipe with its 95% interval, and the evaluation's share of the error."""
    table = {}
    for arm in arms:
        seeds = sorted((s for s, done in runs.items() if arm in done and FULL in done), key=int)
        if not seeds:
            continue
        differences = [runs[s][arm]["accuracy"] - runs[s][FULL]["accuracy"] for s in seeds]
        per_seed_errors = [measurement_stderr(runs[s][arm]["per_problem"], runs[s][FULL]["per_problem"]) for s in seeds]
        row = {
            "seeds": seeds,
            "accuracy": statistics.fmean(runs[s][arm]["accuracy"] for s in seeds),
            "difference": paired_interval(differences) if arm != FULL else None,
            # the evaluation's standard error of the mean difference (seeds are independent measurements)
            "measurement_stderr": None if arm == FULL else math.sqrt(sum(e * e for e in per_seed_errors)) / len(seeds),
            "measurement_stderr_per_seed": None if arm == FULL else statistics.fmean(per_seed_errors),
        }
        for key in ("informative_fraction_trained", "informative_fraction_generated", "truncated_fraction", "generated_tokens",
                    "train_cpu_seconds", "train_seconds", "training_reward"):  # fmt: skip
            values = [runs[s][arm].get(key) for s in seeds]
            row[key] = statistics.fmean(values) if all(v is not None for v in values) else None
        table[arm] = row
    return table


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def format_table(table: dict, before: float | None) -> str:
    """A Markdown table: accuracy, difference to the full recipe [95% interval], its measurement error, and costs."""
    full_tokens = table.get(FULL, {}).get("generated_tokens")
    lines = [
        "| arm | held-out acc | diff vs full [95% CI] | eval SE of diff | informative trained | truncated | gen. tokens (x full) | train CPU s | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, row in table.items():
        d = row["difference"]
        if d is None:
            diff = "-"
        elif d["low"] is None:
            diff = f"{d['mean']:+.3f}"
        else:
            diff = f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
        se = "-" if row["measurement_stderr"] is None else f"{row['measurement_stderr']:.4f}"
        info = "-" if row["informative_fraction_trained"] is None else f"{row['informative_fraction_trained']:.2f}"
        trunc = "-" if row["truncated_fraction"] is None else f"{row['truncated_fraction']:.3f}"
        tokens = f"{row['generated_tokens']:,.0f}" + (f" ({row['generated_tokens'] / full_tokens:.2f})" if full_tokens else "")
        lines.append(f"| {arm} | {row['accuracy']:.3f} | {diff} | {se} | {info} | {trunc} | {tokens} | {row['train_cpu_seconds']:.0f} | {len(row['seeds'])} |")
    if before is not None:
        lines.append(f"\nBefore training: {before:.3f} (the warm-started toy model, same measurement).")
    errors = [row for row in table.values() if row.get("measurement_stderr") is not None]
    if errors:
        per_seed = statistics.fmean(row["measurement_stderr_per_seed"] for row in errors)
        of_mean = statistics.fmean(row["measurement_stderr"] for row in errors)
        verdict = "resolves" if 2 * of_mean <= 0.02 else "does not resolve"
        lines.append(
            f"Evaluation standard error of a paired difference: {per_seed:.4f} for one seed, {of_mean:.4f} for the mean over "
            f"seeds; the measurement alone {verdict} 0.02 at 2 standard errors. The 95% interval also holds the seed-to-seed "
            "spread of training, which the measurement cannot remove."
        )
    return "\n".join(lines)


def plot_differences(table: dict, path: Path) -> Path | None:
    """Each arm's paired difference to the full recipe with its 95% interval (a dot alone: one seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(arm, row["difference"]) for arm, row in table.items() if row["difference"] is not None]
    if not rows:
        return None
    figure, axis = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    for y, (arm, d) in enumerate(rows):
        if d["low"] is not None:
            axis.plot([d["low"], d["high"]], [y, y], color="tab:blue", linewidth=2)
        axis.plot([d["mean"]], [y], "o", color="tab:blue")
    axis.axvline(0, color="gray", linestyle="--", linewidth=1)
    axis.set_yticks(range(len(rows)), [arm for arm, _ in rows])
    axis.invert_yaxis()
    seeds = max(d["n"] for _, d in rows)
    axis.set_xlabel(f"held-out accuracy minus the full recipe's\n(paired over {seeds} seed(s); line: 95% interval)")
    axis.set_title("Toy-world ablation")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def phenomena(filter_summary: dict, runs: dict) -> dict:
    """How much of what each ingredient targets the toy world shows, measured."""
    counts = filter_summary.get("counts", [])
    total = sum(row.get("problems", 0) for row in counts) or None
    n = max((int(str(row["difficulty"]).split("/")[1]) for row in counts if "/" in str(row.get("difficulty", ""))), default=None)

    def share(k):
        return sum(row["problems"] for row in counts if str(row.get("difficulty")) == f"{k}/{n}") / total if total and n else None

    full_runs = [arms[FULL] for arms in runs.values() if FULL in arms]
    def full_mean(key):
        values = [run[key] for run in full_runs if run.get(key) is not None]
        return statistics.fmean(values) if values else None

    return {
        "too_easy_prompts (solved n/n before training)": share(n),
        "never_solved_prompts (0/n before training)": share(0),
        "zero_variance_groups while training (full recipe, before repair)": None if full_mean("informative_fraction_generated") is None else 1 - full_mean("informative_fraction_generated"),
        "truncated completions while training (full recipe)": full_mean("truncated_fraction"),
        "entropy first tenth -> last tenth of training (full recipe)": (full_mean("entropy_first"), full_mean("entropy_last")),
        "groups rescued per run (full recipe)": statistics.fmean(run["batch_repair"].get("groups_rescued", 0) for run in full_runs) if full_runs else None,
        "groups substituted per run (full recipe)": statistics.fmean(run["batch_repair"].get("groups_substituted", 0) for run in full_runs) if full_runs else None,
        "groups per run (full recipe)": statistics.fmean(run["batch_repair"].get("groups", 0) for run in full_runs) if full_runs else None,
    }  # fmt: skip


def settings_hash(args: AblationArguments, extra: list[str]) -> str:
    """What the runs depend on (not which seeds or arms are asked for, nor where results go)."""
    settings = {k: v for k, v in asdict(args).items() if k not in ("seeds", "arms", "output_dir", "quick")}
    settings["extra"] = extra
    settings["recipe_text"] = Path(args.recipe).read_text() if Path(args.recipe).is_file() else None
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def load_finished_runs(results_path: Path, settings: str) -> dict:
    """The runs a previous call with the same settings finished ({seed: {arm: result}}); none otherwise."""
    if not results_path.is_file():
        return {}
    previous = json.loads(results_path.read_text())
    return previous.get("runs", {}) if previous.get("settings_hash") == settings else {}


def pending_runs(runs: dict, seeds: list[int], arms: list[str]) -> list[tuple[int, str]]:
    """(seed, arm) pairs still to run, seed by seed so that finished seeds are complete pairs."""
    return [(seed, arm) for seed in seeds for arm in arms if arm not in runs.get(str(seed), {})]


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def check_arguments(args: AblationArguments):
    from data import UserError

    if not Path(args.recipe).is_file():
        raise UserError(f"no such recipe file: {args.recipe}")
    unknown = sorted(set(args.arms) - set(ARMS))
    if unknown:
        raise UserError(f"unknown arm(s) {', '.join(unknown)}: choose among {', '.join(ARMS)}")
    if not args.seeds:
        raise UserError("--seeds is empty: give at least one seed")
    for name in ("eval_problems", "eval_num_samples", "filter_num_samples"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max_steps must be at least 1, got {args.max_steps}")


def main(args: AblationArguments, extra: list[str]) -> dict:
    import yaml

    import toy

    args = apply_quick(args)
    check_arguments(args)
    arms = [FULL] + [arm for arm in args.arms if arm != FULL]
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    toy_args = toy.ToyArguments(output_dir=args.toy_dir)
    toy_dir = toy.build_toy_world(toy_args)
    base = yaml.safe_load(Path(args.recipe).read_text())
    heldout = write_heldout(output_dir / f"heldout-{args.eval_problems}.jsonl", args.eval_problems, toy_args.seed)
    eval_max_tokens = args.eval_max_tokens or max(
        [s["max_completion_length"] for s in base.get("stages") or []] or [base.get("max_completion_length", 48)]
    )
    filter_summary = run_difficulty_filter(args, toy_dir, base, output_dir)
    before = evaluate_model_before(toy_dir, heldout, args, eval_max_tokens, output_dir)

    results_path = output_dir / RESULTS_FILE
    settings = settings_hash(args, extra)
    runs = load_finished_runs(results_path, settings)
    todo = pending_runs(runs, args.seeds, arms)
    print(f"{len(todo)} run(s) to do, {len(args.seeds) * len(arms) - len(todo)} kept in {results_path}")
    for seed, arm in todo:
        print(f"\n--- seed {seed}: {arm} ({ARMS[arm].description}) ---", flush=True)
        recipe = arm_recipe(base, arm, args, filter_summary["output"], str(toy_dir / "train.jsonl"))
        runs.setdefault(str(seed), {})[arm] = run_arm(arm, seed, recipe, args, heldout, eval_max_tokens, extra)
        write_results(results_path, settings, args, extra, runs, arms, before, filter_summary)  # nothing finished is lost

    report = write_results(results_path, settings, args, extra, runs, arms, before, filter_summary)
    print("\n" + report["markdown"])
    print("\nWhat the toy world shows of the phenomena the ingredients target:")
    for name, value in report["phenomena"].items():
        print(f"  {name}: {value}")
    print(f"\nresults: {results_path}, {output_dir / 'ablation_toy.md'}, {output_dir / 'ablation_toy.png'}")
    return report


def evaluate_model_before(toy_dir: Path, heldout: Path, args: AblationArguments, max_tokens: int, output_dir: Path) -> float:
    """The warm-started model on the same held-out problems: where every arm starts."""
    import evaluate

    eval_dir = output_dir / "before_eval"
    evaluate.main(evaluate.EvalArguments(
        model=str(toy_dir / "model"), data=[str(heldout)], num_samples=args.eval_num_samples, temperature=args.eval_temperature,
        top_p=1.0, top_k=0, max_tokens=max_tokens, seed=0, batch_size=512, output_dir=str(eval_dir), ngram_unit="char",
    ))  # fmt: skip
    return per_problem_accuracy(eval_dir / evaluate.SAMPLES_FILE)["accuracy"]


def write_results(path: Path, settings: str, args, extra, runs, arms, before, filter_summary) -> dict:
    asked = {seed: done for seed, done in runs.items() if int(seed) in args.seeds}
    table = compare_arms(asked, arms)
    markdown = format_table(table, before)
    report = {
        "settings_hash": settings, "arguments": asdict(args), "extra_arguments": extra, "accuracy_before": before,
        "arms": {arm: ARMS[arm].description for arm in arms}, "table": table, "markdown": markdown,
        "phenomena": phenomena(filter_summary, asked), "runs": runs,
    }  # fmt: skip
    path.write_text(json.dumps(report, indent=2))
    (path.parent / "ablation_toy.md").write_text(markdown + "\n")
    plot_differences(table, path.parent / "ablation_toy.png")
    return report


def cli():
    from transformers import HfArgumentParser

    args, extra = HfArgumentParser(AblationArguments).parse_args_into_dataclasses(return_remaining_strings=True)
    main(args, extra)


if __name__ == "__main__":
    from data import run_cli

    run_cli(cli)
