"""Benchmark this project's accuracy reward against TRL's built-in `trl.rewards.accuracy_reward`.

Both judge the same few thousand realistic completions: benchmark gold answers (../shared/benchmarks) written in
equivalent forms (\\dfrac, spacing, 025, 142.0, x = 3, units, a/b) and wrong ones (off by one, another problem's
answer, no box, cut off mid-box), surrounded by long reasoning text. It prints completions per second, per-call
latency (p50/p99/max), the speed ratio and how often the two rewards agree, then times one pathological completion
through each reward from a worker thread, where math_verify's signal-based timeouts cannot work.

It then prints the false-positive and false-negative counts of the seeded mutation search of
benchmarks/verifier_mutations.py (wrong answers made by small edits of the golds, and equivalent rewrites).

It also times the worker pool's start-up and the replacement of a killed worker, as ratios to a fresh interpreter
that only imports math_verify (the least any process-based verifier pays), and scores a correct `\\sum` answer
(~1 s of CPU) on a machine made busy with CPU burners: under the CPU-time deadline and, for comparison, under a
wall-clock deadline of the same length.

    python benchmarks/bench_rewards.py            # 3000 completions
    python benchmarks/bench_rewards.py --quick    # 300 completions, shorter caps
"""

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

PATHOLOGICAL = "Expanding everything, the answer is $\\boxed{(x+1)^{5000} - (x+2)^{5000}}$."
PATHOLOGICAL_GOLD = "x^2"  # symbolic: both verifiers must try to simplify the difference
SUM_ANSWER = "The series is Basel's: $\\boxed{\\sum_{n=1}^{\\infty} \\frac{1}{n^2}}$."
SUM_GOLD = "\\frac{\\pi^2}{6}"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run: 300 completions, 10 s cap")
    parser.add_argument("-n", "--num-completions", type=int, default=None, help="default 3000 (300 with --quick)")
    parser.add_argument("--batch-size", type=int, default=64, help="completions per reward call in the throughput run")
    parser.add_argument("--cap", type=float, default=None, help="outer cap (s) for TRL's pathological case")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--burners", type=int, default=None, help="CPU burners for the busy-machine case (2 per core)")
    parser.add_argument("--shared", default=os.environ.get("POLARIS_SHARED", str(REPO_ROOT.parent / "shared")))
    args = parser.parse_args()
    args.num_completions = args.num_completions or (300 if args.quick else 3000)
    args.cap = args.cap or (10.0 if args.quick else 30.0)
    return args


# ---------------------------------------------------------------------------------------------------------------
# Realistic completions
# ---------------------------------------------------------------------------------------------------------------


def load_problems(shared: Path) -> list[tuple[str, object]]:
    """(problem text, gold as stored) for every benchmark problem."""
    import pyarrow.parquet as pq

    problems = []
    for name in ("aime24", "aime25", "amc23", "minerva", "olympiad"):
        for row in pq.read_table(shared / "benchmarks" / f"{name}.parquet").to_pylist():
            prompt = row["prompt"][0]["content"] if isinstance(row["prompt"], list) else str(row["prompt"])
            problems.append((prompt, row["reward_model"]["ground_truth"]))
    for row in json.loads((shared / "benchmarks" / "math500.json").read_text()):
        problems.append((row["problem"], row["answer"]))
    return problems


def equivalent_forms(gold: str) -> list[tuple[str, str]]:
    """(form name, answer) rewrites a correct solver might produce."""
    spaced = re.sub(r"\s*([=+,]|(?<!\{)-)\s*", r" \1 ", gold).strip()  # "x=1,y=-2" -> "x = 1 , y = - 2"
    forms = [("exact", gold), ("spaced", spaced), ("dollars", f"${gold}$")]
    if "\\frac" in gold:
        forms.append(("dfrac", gold.replace("\\frac", "\\dfrac")))
    if re.fullmatch(r"-?\d+", gold):
        forms += [("zero_padded", "0" + gold), ("decimal", gold + ".0"), ("assignment", f"x = {gold}"),
                  ("units", gold + "\\text{ units}")]
    match = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", gold)
    if match:
        forms.append(("slash", f"{match.group(1)}{match.group(2)}/{match.group(3)}"))
    if gold.startswith("(") and gold.endswith(")"):
        forms.append(("left_right", "\\left" + gold[:-1] + "\\right)"))
    return forms


def wrong_forms(gold: str, other: str) -> list[tuple[str, str]]:
    if re.fullmatch(r"-?\d+", gold):
        return [("off_by_one", str(int(gold) + 1)), ("other_problem", other)]
    return [("other_problem", other)]


def reasoning(problem: str, rng: random.Random) -> str:
    """A few hundred to several thousand characters of plausible working, with inline math."""
    steps = [
        "Let me restate the problem. {p}",
        "We set $x = {a}$ and $y = {b}$, so $x + y = {c}$.",
        "Squaring gives $({a})^2 = {d}$, and $\\frac{{{d}}}{{{a}}} = {a}$.",
        "Hmm, wait. Let me double-check the case $n = {a}$: it gives ${c}$, which is consistent.",
        "By symmetry the remaining cases contribute $\\sqrt{{{d}}} = {a}$ each.",
        "So far the partial answer is $\\boxed{{{c}}}$, but we still need the last step.",
    ]
    out = []
    for _ in range(rng.randint(3, 40)):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        out.append(rng.choice(steps).format(p=problem[:400], a=a, b=b, c=a + b, d=a * a))
    return "<think>\n" + "\n".join(out) + "\n</think>\n\n"


def build_completions(problems, n: int, rng: random.Random):
    """(text, gold for this project, solution for TRL, form) for n completions."""
    from rewards import gold_strings

    items = []
    for _ in range(n):
        problem, gold = rng.choice(problems)
        first = gold_strings(gold)[0]
        other = gold_strings(rng.choice(problems)[1])[0]
        roll = rng.random()
        if roll < 0.5:
            form, answer = rng.choice(equivalent_forms(first))
        elif roll < 0.9:
            form, answer = rng.choice(wrong_forms(first, other))
        else:
            form, answer = "no_box", None
        text = reasoning(problem, rng)
        if answer is None:
            text += f"Therefore the answer is ${first}$." if rng.random() < 0.5 else f"The answer is \\boxed{{{first}"
        else:
            ending = rng.choice(["**Final Answer**\n\\[\n\\boxed{%s}\n\\]", "Thus the answer is $\\boxed{%s}$."])
            text += ending % answer
        # TRL takes one solution string; it expects LaTeX in $...$ (bare LaTeX often fails to parse as gold).
        items.append((text, gold, f"${first}$", form))
    return items


# ---------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------


def ours(items):
    import rewards

    return rewards.accuracy_reward([text for text, *_ in items], answer=[gold for _, gold, _, _ in items])


def trl_reward(items):
    from trl.rewards import accuracy_reward

    completions = [[{"role": "assistant", "content": text}] for text, *_ in items]
    return accuracy_reward(completions, solution=[solution for _, _, solution, _ in items])


def summarize(latencies: list[float], batched_seconds: float) -> dict:
    latencies = sorted(latencies)
    return {
        "per_s_single": len(latencies) / sum(latencies),
        "per_s_batched": len(latencies) / batched_seconds,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
        "max_ms": 1000 * latencies[-1],
    }


def measure(rewards_to_compare: dict, items, batch_size: int):
    """Per-call latency on single completions, then throughput on batches, for each reward.

    The rewards take turns on every completion (and every batch), so that both see the same machine load:
    on a shared machine, timing one after the other would compare the load, not the rewards.
    """
    latencies = {name: [] for name in rewards_to_compare}
    scores = {name: [] for name in rewards_to_compare}
    for item in items:
        for name, fn in rewards_to_compare.items():
            start = time.perf_counter()
            scores[name] += fn([item])
            latencies[name].append(time.perf_counter() - start)
    batched_seconds = dict.fromkeys(rewards_to_compare, 0.0)
    changed = dict.fromkeys(rewards_to_compare, 0)  # a verdict that differs between the passes (a timeout)
    for i in range(0, len(items), batch_size):
        for name, fn in rewards_to_compare.items():
            start = time.perf_counter()
            batched = fn(items[i : i + batch_size])
            batched_seconds[name] += time.perf_counter() - start
            changed[name] += sum(a != b for a, b in zip(batched, scores[name][i : i + batch_size]))
    stats = {name: summarize(latencies[name], batched_seconds[name]) for name in rewards_to_compare}
    for name in rewards_to_compare:
        stats[name]["changed"] = changed[name]
    return scores, stats


def worst_case_ours(text: str) -> tuple[float, float]:
    """Time one pathological completion through this project's reward from a worker thread."""
    import rewards

    result = {}

    def run():
        start = time.perf_counter()
        result["score"] = rewards.accuracy_reward([text], answer=[PATHOLOGICAL_GOLD])[0]
        result["seconds"] = time.perf_counter() - start

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join()
    return result["seconds"], result["score"]


TRL_WORST_CASE = """
import sys, threading, time
from trl.rewards import accuracy_reward
text = sys.argv[1]
start = time.perf_counter()
thread = threading.Thread(target=lambda: print(accuracy_reward([[{"content": text}]], [sys.argv[2]]), flush=True))
thread.start()
thread.join()
print(f"seconds={time.perf_counter() - start:.3f}", flush=True)
"""


def worst_case_trl(text: str, cap: float) -> float | None:
    """TRL's reward from a worker thread, in a child process we can kill: a hung thread cannot be stopped."""
    start = time.perf_counter()
    try:
        command = [sys.executable, "-c", TRL_WORST_CASE, text, f"${PATHOLOGICAL_GOLD}$"]
        out = subprocess.run(command, capture_output=True, text=True, timeout=cap)
    except subprocess.TimeoutExpired:
        return None
    match = re.search(r"seconds=([\d.]+)", out.stdout)
    return float(match.group(1)) if match else time.perf_counter() - start


def import_baseline_seconds() -> float:
    """A fresh interpreter importing math_verify and sympy: the floor for any verifier that runs in processes."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import math_verify, sympy"], check=True)
    return time.perf_counter() - start


def worker_replacement_seconds() -> float:
    """Kill one worker (as the kernel's OOM killer would) and time until the pool answers with all workers again."""
    import rewards

    pid = next(iter(rewards._worker_pids(rewards.WORKER_STARTUP_S)))
    start = time.perf_counter()
    os.kill(pid, 9)
    while pid in rewards._worker_pids(rewards.WORKER_STARTUP_S) or not rewards.start_workers():
        pass
    return time.perf_counter() - start


def busy_machine_sum(burners: int) -> dict:
    """The correct `\\sum` answer under load: CPU-time deadline (ours) and a wall-clock deadline of the same length."""
    import rewards

    burn = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(burners)]
    try:
        time.sleep(0.5)
        out = {}
        for name, wall in (("cpu_deadline", None), ("wall_deadline", rewards.TIMEOUT_S)):
            rewards.start_workers()
            start = time.perf_counter()
            out[name] = rewards.verify(SUM_ANSWER, SUM_GOLD, wall_timeout=wall), time.perf_counter() - start
        return out
    finally:
        for proc in burn:
            proc.kill()
            proc.wait()


def print_mutation_counts(shared: Path, seed: int, quick: bool) -> None:
    """Precision and recall of this project's verifier on the mutation search: with --quick the sample that
    tests/test_verifier_mutations.py asserts in CI, else every gold (a few minutes)."""
    import verifier_mutations

    start = time.perf_counter()
    size = {} if quick else {"other_golds": 0, "built": 150}
    summary = verifier_mutations.run(shared, seed, **size)
    scope = "CI sample" if quick else "every gold"
    print(f"\nmutation search ({scope}, seed {seed}, {time.perf_counter() - start:.0f}s): {summary['wrong']} wrong answers, "
          f"false positives (scored 1) {summary['false_positives']}; {summary['equivalent']} equivalent rewrites, "
          f"false negatives (scored 0) {summary['false_negatives']} (recall {summary['recall']:.2%})")
    for case in summary["false_positive_cases"][:10]:
        print(f"  false positive [{case.edit}] gold {case.gold!r} answer {case.answer!r}")


def main():
    args = parse_args()
    shared = Path(args.shared)
    if not (shared / "benchmarks").is_dir():
        print(f"error: shared data not found at {shared} (set POLARIS_SHARED or --shared)", file=sys.stderr)
        sys.exit(2)
    import rewards

    rng = random.Random(args.seed)
    items = build_completions(load_problems(shared), args.num_completions, rng)
    texts = [t for t, _, _, _ in items]
    mean_chars = statistics.mean(len(t) for t in texts)
    print(f"{len(texts)} completions, mean {mean_chars:.0f} chars; forms: {dict(Counter(f for *_, f in items))}")

    baseline = import_baseline_seconds()
    start = time.perf_counter()
    rewards.start_workers()
    startup = time.perf_counter() - start
    replacement = worker_replacement_seconds()
    print(f"worker pool start-up (once per run): {startup:.2f}s = {startup / baseline:.2f}x a fresh interpreter "
          f"importing math_verify ({baseline:.2f}s); a killed worker replaced in {replacement:.2f}s = "
          f"{replacement / baseline:.2f}x")
    rewards.STATS.reset()

    names = ("rewards.accuracy_reward", "trl.rewards.accuracy_reward")
    scores, stats = measure(dict(zip(names, (ours, trl_reward))), items, args.batch_size)
    our_counts = rewards.STATS.pop()
    our_scores, trl_scores = scores[names[0]], scores[names[1]]

    print(f"\n{'reward':<28}{'compl/s (1/call)':>18}{'compl/s (batch)':>17}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    for name in names:
        s = stats[name]
        print(f"{name:<28}{s['per_s_single']:>18.0f}{s['per_s_batched']:>17.0f}"
              f"{s['p50_ms']:>9.2f}{s['p99_ms']:>9.2f}{s['max_ms']:>9.1f}")
    ours_s, trl_s = stats[names[0]], stats[names[1]]
    print(f"speed ratio (ours / TRL): {ours_s['per_s_single'] / trl_s['per_s_single']:.1f}x one at a time, "
          f"{ours_s['per_s_batched'] / trl_s['per_s_batched']:.1f}x batched (batch {args.batch_size})")
    print(f"our counters (both passes): {our_counts}")
    print(f"verdicts that differ between the single and batched passes: "
          f"ours {ours_s['changed']}, TRL {trl_s['changed']}")

    agree = sum(a == b for a, b in zip(our_scores, trl_scores))
    print(f"\nagreement: {agree}/{len(items)} = {agree / len(items):.1%}")
    by_form = defaultdict(Counter)
    for (_, _, _, form), a, b in zip(items, our_scores, trl_scores):
        by_form[form][(a, b)] += 1
    print(f"{'form':<15}{'n':>6}  (ours, TRL) counts")
    for form, counts in sorted(by_form.items()):
        print(f"{form:<15}{sum(counts.values()):>6}  {dict(sorted(counts.items(), key=str))}")

    print_mutation_counts(shared, args.seed, quick=args.quick)

    print(f"\nworst case, from a worker thread: {PATHOLOGICAL!r} against gold {PATHOLOGICAL_GOLD!r}")
    seconds, score = worst_case_ours(PATHOLOGICAL)
    print(f"  rewards.accuracy_reward:     {seconds:.2f}s, score {score} (deadline {rewards.TIMEOUT_S}s)")
    trl_seconds = worst_case_trl(PATHOLOGICAL, args.cap)
    verdict = f"{trl_seconds:.2f}s" if trl_seconds is not None else f"no bound (still running after {args.cap:.0f}s)"
    print(f"  trl.rewards.accuracy_reward: {verdict}")

    burners = args.burners if args.burners is not None else 2 * (os.cpu_count() or 2)
    print(f"\nbusy machine ({burners} CPU burners): {SUM_ANSWER!r} against gold {SUM_GOLD!r}")
    for name, (score, seconds) in busy_machine_sum(burners).items():
        print(f"  {name:<14} {rewards.TIMEOUT_S}s: score {score}, {seconds:.2f}s wall")
    rewards.shutdown_workers()


if __name__ == "__main__":
    main()
