"""Ablation on the toy world: TRL's own GRPO against the POLARIS recipe, same model, data, seed and steps.

    python benchmarks/ablation_toy.py                           # seeds 0 1 2, the demo's 40 steps per arm
    python benchmarks/ablation_toy.py --seeds 0 --max_steps 20  # quicker
    python benchmarks/ablation_toy.py --learning_rate 2e-4      # other flags go to train_grpo.py
    python benchmarks/ablation_toy.py --arms vanilla polaris

Every arm starts from the demo recipe (recipes/demo.yaml) and runs `train_grpo.main`:

- vanilla: `trl.GRPOTrainer`, at the first stage's temperature and length, nothing repaired;
- polaris: `PolarisGRPOTrainer` with rollout rescue, informative substitution and the recipe's stage
  schedule;
- polaris_dynamic: polaris plus `--dynamic_sampling` (fresh prompts for batches with too few
  informative groups).

For each it reports held-out accuracy (avg@k, sampled) before and after training and the informative
fraction of the groups trained on: for vanilla what TRL reports (1 - `frac_reward_zero_std`), for polaris
the fraction after repair (`repair/informative_after`), with the model's own fraction before repair too.
Ratios are arm / vanilla. Results go to `<output_dir>/ablation_toy.json`, written after every run, and a
rerun with the same settings reuses the runs already there.
"""

import hashlib
import json
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Flags of each arm, after the recipe's; the vanilla arm also drops the stage schedule (see below).
ARMS = {
    "vanilla": ["--rollout_rescue", "false", "--informative_substitution", "false"],
    "polaris": ["--rollout_rescue", "true", "--informative_substitution", "true"],
    "polaris_dynamic": ["--rollout_rescue", "true", "--informative_substitution", "true", "--dynamic_sampling", "true"],
}


@dataclass
class AblationArguments:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "One run of every arm per seed."})
    arms: list[str] = field(default_factory=lambda: list(ARMS), metadata={"help": f"Among {', '.join(ARMS)}."})
    max_steps: int | None = field(default=None, metadata={"help": "Training steps of every run (default: the recipe's)."})
    eval_max_problems: int = field(default=200, metadata={"help": "Held-out toy problems measured before and after."})
    eval_num_samples: int = field(default=4, metadata={"help": "Samples per held-out problem (avg@k)."})
    recipe: str = field(default=str(REPO_ROOT / "recipes" / "demo.yaml"), metadata={"help": "Recipe both arms start from."})
    toy_dir: str = field(default=str(REPO_ROOT / "outputs" / "toy"), metadata={"help": "Where the toy world is built and cached."})
    output_dir: str = field(default=str(REPO_ROOT / "outputs" / "ablation_toy"), metadata={"help": "Runs and ablation_toy.json."})


def training_arguments(args: AblationArguments, arm: str, seed: int, extra: list[str]):
    """`train_grpo.parse_args` for one run: the recipe, the ablation's settings, then the user's flags."""
    from train_grpo import parse_args

    cli = [
        "--config", args.recipe, "--seed", str(seed),
        "--output_dir", str(Path(args.output_dir) / f"{arm}-seed{seed}"), "--toy_dir", args.toy_dir,
        "--eval_max_problems", str(args.eval_max_problems), "--eval_num_samples", str(args.eval_num_samples),
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
    ]
    if args.max_steps is not None:
        cli += ["--max_steps", str(args.max_steps)]
    script_args, training_args, model_args = parse_args(cli + extra + ARMS[arm])
    if arm == "vanilla":
        training_args.stages = None  # stays at the first stage's temperature and length (set by the config)
    return script_args, training_args, model_args


def informative_fractions(log_history: list[dict]) -> dict:
    """Mean over logged steps of the informative fraction of groups, as trained and as generated."""
    zero_std = [row["frac_reward_zero_std"] for row in log_history if row.get("frac_reward_zero_std") is not None]
    after = [row["repair/informative_after"] for row in log_history if "repair/informative_after" in row]
    before = [row["repair/informative_before"] for row in log_history if "repair/informative_before" in row]
    trl_reported = 1 - statistics.fmean(zero_std) if zero_std else None
    return {
        "informative_fraction_trained": statistics.fmean(after) if after else trl_reported,
        "informative_fraction_generated": statistics.fmean(before) if before else trl_reported,
        "trl_informative_fraction": trl_reported,
    }


def run_arm(args: AblationArguments, arm: str, seed: int, extra: list[str]) -> dict:
    from trl import GRPOTrainer

    from train_grpo import PolarisGRPOTrainer, main

    script_args, training_args, model_args = training_arguments(args, arm, seed, extra)
    summary = main(script_args, training_args, model_args, trainer_class=GRPOTrainer if arm == "vanilla" else PolarisGRPOTrainer)
    state = json.loads((Path(training_args.output_dir) / "trainer_state.json").read_text())
    result = {key: summary[key] for key in ("accuracy_before", "accuracy_after", "steps", "seconds")}
    result.update(informative_fractions(state["log_history"]))
    if "batch_repair" in summary:
        result["batch_repair"] = summary["batch_repair"]
    return result


def ratio(numerator, denominator):
    return None if numerator is None or not denominator else numerator / denominator


MEASURES = ("accuracy_before", "accuracy_after", "informative_fraction_trained", "informative_fraction_generated", "seconds")


def aggregate(runs: dict, arms: list[str]) -> dict:
    """Means over the seeds that have every arm, arm / vanilla ratios, per-seed accuracy differences."""
    seeds = sorted((seed for seed, done in runs.items() if all(arm in done for arm in arms)), key=int)
    if not seeds:
        return {"seeds": []}
    means = {arm: {key: statistics.fmean(runs[s][arm][key] for s in seeds) for key in MEASURES} for arm in arms}
    others = [arm for arm in arms if arm != "vanilla"]
    totals = {"seeds": seeds, "mean": means}
    if "vanilla" in arms:
        totals["ratio_over_vanilla"] = {arm: {key: ratio(means[arm][key], means["vanilla"][key]) for key in MEASURES} for arm in others}
        totals["accuracy_after_minus_vanilla"] = {
            arm: {s: runs[s][arm]["accuracy_after"] - runs[s]["vanilla"]["accuracy_after"] for s in seeds} for arm in others
        }
        totals["at_least_vanilla_accuracy_on_every_seed"] = {
            arm: all(runs[s][arm]["accuracy_after"] >= runs[s]["vanilla"]["accuracy_after"] for s in seeds) for arm in others
        }
    return totals


def format_row(label: str, arm: str, values: dict, ratio_row: bool = False) -> str:
    cells = [f"{values[key]:>11.3f}" if values[key] is not None else f"{'-':>11}" for key in MEASURES[:2]]
    cells += [f"{values[key]:>21.3f}" if values[key] is not None else f"{'-':>21}" for key in MEASURES[2:4]]
    cells.append(f"{values['seconds']:>9.{2 if ratio_row else 0}f}")
    return f"{label:<7}{arm:<25}" + "".join(cells)


def print_table(runs: dict, totals: dict, arms: list[str]):
    print("\n" + "=" * 106)
    print(f"{'seed':<7}{'arm':<25}{'acc before':>11}{'acc after':>11}{'informative trained':>21}{'inform. generated':>21}{'seconds':>9}")
    for seed in sorted(runs, key=int):
        for arm in arms:
            if arm in runs[seed]:
                print(format_row(seed, arm, runs[seed][arm]))
    if totals["seeds"]:
        for arm in arms:
            print(format_row("mean", arm, totals["mean"][arm]))
        for arm, ratios in totals.get("ratio_over_vanilla", {}).items():
            print(format_row("ratio", f"{arm}/vanilla", ratios, ratio_row=True))
        for arm, ok in totals.get("at_least_vanilla_accuracy_on_every_seed", {}).items():
            print(f"{arm}: accuracy after >= vanilla on every seed: {ok}")
    print("=" * 106)


def settings_hash(args: AblationArguments, extra: list[str]) -> str:
    settings = {k: v for k, v in asdict(args).items() if k not in ("seeds", "arms", "output_dir")}
    settings["extra"] = extra
    settings["recipe_text"] = Path(args.recipe).read_text() if Path(args.recipe).is_file() else None
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def main(args: AblationArguments, extra: list[str]) -> dict:
    from data import UserError

    if not Path(args.recipe).is_file():
        raise UserError(f"no such recipe file: {args.recipe}")
    unknown = sorted(set(args.arms) - set(ARMS))
    if unknown:
        raise UserError(f"unknown arm(s) {', '.join(unknown)}: choose among {', '.join(ARMS)}")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results_path = output_dir / "ablation_toy.json"
    settings = settings_hash(args, extra)
    previous = json.loads(results_path.read_text()) if results_path.is_file() else {}
    runs = previous.get("runs", {}) if previous.get("settings_hash") == settings else {}

    for seed in args.seeds:
        for arm in args.arms:
            if arm in runs.get(str(seed), {}):
                print(f"seed {seed} {arm}: reusing the finished run in {results_path}")
                continue
            print(f"\n--- seed {seed}: {arm} ---")
            runs.setdefault(str(seed), {})[arm] = run_arm(args, arm, seed, extra)
            report = {"settings_hash": settings, "arguments": asdict(args), "extra_arguments": extra, "runs": runs}
            report["aggregate"] = aggregate(runs, args.arms)
            results_path.write_text(json.dumps(report, indent=2))  # after every run: nothing finished is lost

    asked = {seed: arms for seed, arms in runs.items() if int(seed) in args.seeds}
    totals = aggregate(asked, args.arms)
    print_table(asked, totals, args.arms)
    print(f"results: {results_path}")
    return totals


def cli():
    from transformers import HfArgumentParser

    args, extra = HfArgumentParser(AblationArguments).parse_args_into_dataclasses(return_remaining_strings=True)
    main(args, extra)


if __name__ == "__main__":
    from data import run_cli

    run_cli(cli)
