"""The demo on several toy worlds: is its gain a property of the recipe, or of one machine's floating point?

    python benchmarks/demo_worlds.py --quick              # two worlds: toy seeds 0 and 1
    python benchmarks/demo_worlds.py                      # every world in WORLDS
    python benchmarks/demo_worlds.py --worlds seed2 avx2  # some of them
    python benchmarks/demo_worlds.py --max_steps 40       # other flags go to train_grpo.py

The same toy recipe builds another model wherever floats are summed in another order: another toy seed,
more threads, another instruction set (a user's laptop without AVX-512). Each world here is built as a user's
machine would build it (`toy.py` in its own process, under the world's thread count and CPU kernels) and the
demo is run on it as `python train_grpo.py --seed N` runs it (recipes/demo.yaml, its default seed unless
`--demo_seed`), also in its own process under the same CPU kernels. Instruction sets are emulated with the
switches torch, MKL and oneDNN honour (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA):
a machine can step down to an older instruction set, not up.

Per world it prints the model's hash (toy.model_hash), held-out accuracy before and after, the gain, and the
build's and the demo's seconds; then the minimum and median gain. Resumable: each finished world is written to
`<output_dir>/demo_worlds.json` at once and a rerun with the same settings skips it (built worlds are reused
too). Writes `demo_worlds.md` (the table) and `demo_worlds.png` (before/after per world).
"""

import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

RESULTS_FILE = "demo_worlds.json"
TARGET_GAIN = 0.10  # what the README promises a user of the demo
# Switches that make torch (ATen's vectorized kernels), MKL (matrix products) and oneDNN use an instruction set.
CPU_SWITCHES = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}


@dataclass(frozen=True)
class World:
    description: str
    toy_seed: int = 0
    build_threads: int = 1
    cpu: str | None = None  # a key of CPU_SWITCHES: build and demo run with that instruction set; None: the machine's

    def environment(self) -> dict:
        return CPU_SWITCHES[self.cpu] if self.cpu else {}


WORLDS = {
    **{f"seed{seed}": World(f"toy seed {seed}, built on one thread", toy_seed=seed) for seed in range(5)},
    "two_threads": World("toy seed 0, built on two threads (another summation order)", build_threads=2),
    "avx2": World("toy seed 0, built and trained with AVX2 kernels (a machine without AVX-512)", cpu="avx2"),
}
QUICK_WORLDS = ["seed0", "seed1"]  # two worlds on any machine (threads or kernels may change nothing on some)


@dataclass
class DemoWorldsArguments:
    worlds: list[str] = field(default_factory=lambda: list(WORLDS), metadata={"help": f"Among {', '.join(WORLDS)}."})
    demo_seed: int | None = field(default=None, metadata={"help": "The demo's --seed on every world (default: the recipe's)."})
    max_steps: int | None = field(default=None, metadata={"help": "The demo's training steps (default: the recipe's)."})
    warmup_steps: int | None = field(default=None, metadata={"help": "The toy warm start's steps (default: toy.py's)."})
    quick: bool = field(default=False, metadata={"help": f"Only {' and '.join(QUICK_WORLDS)}: does the gain survive another world?"})
    recipe: str = field(default=str(REPO_ROOT / "recipes" / "demo.yaml"), metadata={"help": "The demo recipe."})
    output_dir: str = field(default=str(REPO_ROOT / "outputs" / "demo_worlds"), metadata={"help": "Worlds, runs, results, table and plot."})


# ----------------------------------------------------------------------------------------------
# One world: build, then the demo
# ----------------------------------------------------------------------------------------------


def run_logged(command: list[str], log: Path, environment: dict) -> float:
    """Run `command` with its output in `log`; its wall seconds. A failure raises with the log's last lines."""
    start = time.time()
    with open(log, "w") as file:
        process = subprocess.run(command, cwd=REPO_ROOT, stdout=file, stderr=subprocess.STDOUT, env={**os.environ, **environment})
    if process.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(command[1:3])} failed (exit {process.returncode}); the end of {log}:\n{tail}")
    return time.time() - start


def build_world(world: World, toy_dir: Path, args: DemoWorldsArguments) -> dict:
    """toy.py in its own process (reuses a finished build): the world's recipe.json (hash, build seconds)."""
    toy_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(REPO_ROOT / "toy.py"), "--output_dir", str(toy_dir), "--seed", str(world.toy_seed),
               "--build_threads", str(world.build_threads)]  # fmt: skip
    if args.warmup_steps is not None:
        command += ["--warmup_steps", str(args.warmup_steps)]
    run_logged(command, toy_dir / "build.log", world.environment())
    return json.loads((toy_dir / "recipe.json").read_text())


def run_demo(world: World, toy_dir: Path, run_dir: Path, args: DemoWorldsArguments, extra: list[str]) -> tuple[dict, float]:
    """`train_grpo.py` with the demo recipe on the world, in its own process: its summary.json and wall seconds.
    The world's files are named, not `toy` (which means the default toy recipe's world, and would rebuild it);
    no checkpoints, which change no number."""
    command = [sys.executable, str(REPO_ROOT / "train_grpo.py"), "--config", args.recipe, "--model_name_or_path", str(toy_dir / "model"),
               "--dataset_name", str(toy_dir / "train.jsonl"), "--eval_dataset_name", str(toy_dir / "test.jsonl"),
               "--output_dir", str(run_dir), "--overwrite_output_dir", "true", "--save_strategy", "no"]  # fmt: skip
    if args.demo_seed is not None:
        command += ["--seed", str(args.demo_seed)]
    if args.max_steps is not None:
        command += ["--max_steps", str(args.max_steps)]
    run_dir.mkdir(parents=True, exist_ok=True)
    seconds = run_logged(command + extra, run_dir.parent / f"{run_dir.name}.log", world.environment())
    return json.loads((run_dir / "summary.json").read_text()), seconds


def measure_world(name: str, args: DemoWorldsArguments, extra: list[str]) -> dict:
    world = WORLDS[name]
    output_dir = Path(args.output_dir)
    print(f"\n--- {name}: {world.description} ---", flush=True)
    recipe = build_world(world, output_dir / "worlds" / name, args)
    print(f"world {recipe['model_hash']} (built in {recipe['seconds']:.0f} s); demo running", flush=True)
    summary, demo_seconds = run_demo(world, output_dir / "worlds" / name, output_dir / "runs" / name, args, extra)
    return {
        "world": name, "description": world.description, "model_hash": recipe["model_hash"],
        "before": summary["accuracy_before"], "after": summary["accuracy_after"],
        "gain": summary["accuracy_after"] - summary["accuracy_before"],
        "build_seconds": recipe["seconds"], "demo_seconds": round(demo_seconds, 1),
        "steps": summary["steps"], "stages": summary.get("stages"),
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Results: resuming, table, plot
# ----------------------------------------------------------------------------------------------


def settings_hash(args: DemoWorldsArguments, extra: list[str]) -> str:
    """What a finished world's numbers depend on besides the world: the recipe's settings (not its comments),
    the toy recipe, the overrides."""
    import yaml

    import toy

    settings = {
        "recipe": yaml.safe_load(Path(args.recipe).read_text()), "toy_recipe_version": toy.TOY_RECIPE_VERSION, "demo_seed": args.demo_seed,
        "max_steps": args.max_steps, "warmup_steps": args.warmup_steps, "extra": extra,
    }  # fmt: skip
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def load_finished(path: Path, settings: str) -> dict:
    """Finished worlds of an earlier run with the same settings (none when the settings changed)."""
    if not path.is_file():
        return {}
    previous = json.loads(path.read_text())
    return previous.get("worlds", {}) if previous.get("settings_hash") == settings else {}


def gain_distribution(records: list[dict]) -> dict:
    gains = [record["gain"] for record in records]
    if not gains:
        return {"worlds": 0}
    return {"worlds": len(gains), "min": min(gains), "median": statistics.median(gains), "mean": statistics.fmean(gains),
            "at_least_target": sum(gain >= TARGET_GAIN for gain in gains)}  # fmt: skip


def format_table(records: list[dict], distribution: dict) -> str:
    lines = [
        "| world | model hash | before | after | gain | build s | demo s | total s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        total = r["build_seconds"] + r["demo_seconds"]
        lines.append(f"| {r['world']} | {r['model_hash']} | {r['before']:.3f} | {r['after']:.3f} | {r['gain']:+.3f} | "
                     f"{r['build_seconds']:.0f} | {r['demo_seconds']:.0f} | {total:.0f} |")  # fmt: skip
    if distribution["worlds"]:
        lines.append("")
        lines.append(f"{distribution['worlds']} worlds: gain min {distribution['min']:+.3f}, median {distribution['median']:+.3f}, "
                     f"mean {distribution['mean']:+.3f}; {distribution['at_least_target']} of {distribution['worlds']} "
                     f"at least +{TARGET_GAIN:.2f}")  # fmt: skip
    return "\n".join(lines)


def plot_worlds(records: list[dict], path: Path):
    """Held-out accuracy before and after per world, the gain written above, the promised gain's line from the lowest start."""
    from matplotlib.figure import Figure  # not pyplot: no display needed

    if not records:
        return None
    figure = Figure(figsize=(1.2 * len(records) + 2, 3.5))
    axis = figure.subplots()
    positions = range(len(records))
    axis.bar([p - 0.2 for p in positions], [r["before"] for r in records], width=0.4, label="before")
    axis.bar([p + 0.2 for p in positions], [r["after"] for r in records], width=0.4, label="after the demo")
    for p, r in zip(positions, records):
        axis.annotate(f"{r['gain']:+.3f}", (p, max(r["before"], r["after"]) + 0.01), ha="center", fontsize=8)
    axis.set_xticks(list(positions), [f"{r['world']}\n{r['model_hash']}" for r in records], fontsize=7)
    axis.set_ylabel("held-out accuracy")
    axis.set_ylim(0, min(1.05, max(r["after"] for r in records) + 0.15))  # room for the legend above the gains
    axis.legend(fontsize="small", loc="upper left", ncols=2)
    axis.set_title(f"The demo on {len(records)} toy worlds (target gain +{TARGET_GAIN:.2f})")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def write_results(output_dir: Path, settings: str, args: DemoWorldsArguments, extra: list[str], finished: dict) -> dict:
    records = [finished[name] for name in args.worlds if name in finished]
    distribution = gain_distribution(records)
    markdown = format_table(records, distribution)
    report = {"settings_hash": settings, "arguments": asdict(args), "extra_arguments": extra, "worlds": finished,
              "distribution": distribution, "markdown": markdown}  # fmt: skip
    (output_dir / RESULTS_FILE).write_text(json.dumps(report, indent=2))
    (output_dir / "demo_worlds.md").write_text(markdown + "\n")
    plot_worlds(records, output_dir / "demo_worlds.png")
    return report


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def check_arguments(args: DemoWorldsArguments):
    from data import UserError, did_you_mean

    if not Path(args.recipe).is_file():
        raise UserError(f"no such recipe file: {args.recipe}")
    if not args.worlds:
        raise UserError(f"--worlds is empty: give at least one of {', '.join(WORLDS)}")
    for name in args.worlds:
        if name not in WORLDS:
            raise UserError(f"unknown world {name} (worlds: {', '.join(WORLDS)}){did_you_mean(name, WORLDS)}")
    for option in ("max_steps", "warmup_steps"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            raise UserError(f"--{option} must be at least 1, got {getattr(args, option)}")


def main(args: DemoWorldsArguments, extra: list[str]) -> dict:
    if args.quick:
        args.worlds = QUICK_WORLDS
    check_arguments(args)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = settings_hash(args, extra)
    finished = load_finished(output_dir / RESULTS_FILE, settings)
    todo = [name for name in args.worlds if name not in finished]
    print(f"{len(todo)} world(s) to run, {len(args.worlds) - len(todo)} kept in {output_dir / RESULTS_FILE}")
    for name in todo:
        finished[name] = record = measure_world(name, args, extra)
        print(f"{name}: world {record['model_hash']}  {record['before']:.3f} -> {record['after']:.3f}  ({record['gain']:+.3f})  "
              f"build {record['build_seconds']:.0f} s, demo {record['demo_seconds']:.0f} s", flush=True)  # fmt: skip
        write_results(output_dir, settings, args, extra, finished)  # nothing finished is lost

    report = write_results(output_dir, settings, args, extra, finished)
    print("\n" + report["markdown"])
    print(f"\nresults: {output_dir / RESULTS_FILE}, {output_dir / 'demo_worlds.md'}, {output_dir / 'demo_worlds.png'}")
    return report


def cli():
    from transformers import HfArgumentParser

    args, extra = HfArgumentParser(DemoWorldsArguments).parse_args_into_dataclasses(return_remaining_strings=True)
    main(args, extra)


if __name__ == "__main__":
    from data import run_cli

    run_cli(cli)
