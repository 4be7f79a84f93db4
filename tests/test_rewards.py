"""Tests for rewards.py: correctness on real benchmark golds, safety, bounded time, and the TRL interface."""

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import rewards as R

REPO_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# shared/ data comes from the `shared_dir` fixture of tests/conftest.py (skips locally when absent, fails in CI)
# ---------------------------------------------------------------------------------------------------------------


def load_benchmark_golds(shared: Path) -> list[tuple[str, object]]:
    """(source, gold) for every problem: verl parquet reward_model.ground_truth, math500.json answer."""
    import pyarrow.parquet as pq

    golds = []
    for name in ("aime24", "aime25", "amc23", "minerva", "olympiad"):
        for row in pq.read_table(shared / "benchmarks" / f"{name}.parquet").to_pylist():
            golds.append((name, row["reward_model"]["ground_truth"]))
    for row in json.loads((shared / "benchmarks" / "math500.json").read_text()):
        golds.append(("math500", row["answer"]))
    return golds


# Correctness tests must not depend on how busy the machine is: they get a generous deadline.
CORRECTNESS_TIMEOUT_S = 10.0


@pytest.fixture(scope="module", autouse=True)
def workers():
    """Start the verifier processes once; timing assertions must not include their start-up."""
    assert R.start_workers(), "verifier worker processes did not start"
    yield
    R.shutdown_workers()


# ---------------------------------------------------------------------------------------------------------------
# Every benchmark gold
# ---------------------------------------------------------------------------------------------------------------

# Golds the verifier cannot handle end to end, with the reason. Kept honest by the test below.
UNHANDLED_GOLDS: dict[str, str] = {}

# Golds math_verify itself cannot match against their own boxed copy (the string path accepts them). None since
# stray `$` inside a gold (`221,$8`, OlympiadBench's prose answers) are read as spaces.
MATH_VERIFY_UNPARSEABLE: dict[str, str] = {}


def _items(gold) -> list:
    return list(gold) if isinstance(gold, (list, tuple)) or hasattr(gold, "tolist") else [gold]


def test_every_benchmark_gold_boxed_scores_one_and_off_by_one_scores_zero(shared_dir):
    golds = load_benchmark_golds(shared_dir)
    assert len(golds) == 30 + 30 + 83 + 272 + 675 + 500
    completions, targets, labels = [], [], []
    wrong, wrong_targets = [], []
    for source, gold in golds:
        for item in _items(gold):
            text = R.gold_strings(item)[0]
            completions.append(f"Let me work through it step by step.\n\nSo the final answer is $\\boxed{{{text}}}$.")
            targets.append(gold)
            labels.append((source, item))
            if text.lstrip("-").isdigit():
                wrong.append(f"Therefore the answer is \\boxed{{{int(text) + 1}}}.")
                wrong_targets.append(gold)
    scores = R.verify_batch(completions, targets, timeout=CORRECTNESS_TIMEOUT_S)
    failures = [(label, s) for label, s in zip(labels, scores) if s != 1.0 and str(label[1]) not in UNHANDLED_GOLDS]
    assert not failures, f"{len(failures)} golds not accepted: {failures[:10]}"
    stale = [g for g in UNHANDLED_GOLDS if g not in {str(label[1]) for label in labels}]
    assert not stale
    assert len(wrong) > 800  # AIME, AMC and most of OlympiadBench are integers
    assert R.verify_batch(wrong, wrong_targets) == [0.0] * len(wrong)


def test_benchmark_golds_through_math_verify(shared_dir, monkeypatch):
    """A spread of golds with the fast path switched off: math_verify must accept each boxed gold."""
    golds = load_benchmark_golds(shared_dir)
    items = [R.gold_strings(item)[0] for _, gold in golds for item in _items(gold)]
    sample = sorted(set(items[::9]) | {g for g in items if g in MATH_VERIFY_UNPARSEABLE})
    monkeypatch.setattr(R, "fast_match", lambda gold, answer: None)
    scores = R.verify_batch([f"\\boxed{{{g}}}" for g in sample], sample, timeout=CORRECTNESS_TIMEOUT_S)
    rejected = {g for g, s in zip(sample, scores) if s != 1.0}
    assert rejected == set(MATH_VERIFY_UNPARSEABLE) & set(sample), rejected
    assert len(sample) > 150


# ---------------------------------------------------------------------------------------------------------------
# Math-Verify's labelled regression cases
# ---------------------------------------------------------------------------------------------------------------

# The model's final answer is unboxed ("The final answer is $10,455$"); its last box is an intermediate 255.
KNOWN_REGRESSION_DISAGREEMENTS = {"$10455$"}


def test_verifier_regression_cases(shared_dir):
    cases = json.loads((shared_dir / "benchmarks" / "verifier_regression.json").read_text())
    assert len(cases) == 69
    preds, golds = [c["pred"] for c in cases], [c["gold"] for c in cases]
    scores = R.verify_batch(preds, golds, timeout=CORRECTNESS_TIMEOUT_S)
    disagreements = [(c["gold"], c["expected"], s) for c, s in zip(cases, scores) if s != c["expected"]]
    print(f"verifier_regression: {len(cases) - len(disagreements)}/{len(cases)} agree; disagreements: {disagreements}")
    assert len(cases) - len(disagreements) >= 68
    assert {gold for gold, _, _ in disagreements} <= KNOWN_REGRESSION_DISAGREEMENTS


# ---------------------------------------------------------------------------------------------------------------
# Equivalent and non-equivalent forms
# ---------------------------------------------------------------------------------------------------------------

EQUIVALENT = [
    ("\\frac{1}{2}", "0.5"),
    ("0.5", "\\frac{1}{2}"),
    ("1/2", "\\frac{1}{2}"),
    ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("\\tfrac12", "0.5"),
    ("025", "25"),
    ("25", "025"),
    ("142", 142.0),
    ("142.0", "142"),
    ("142", [" 142\n"]),
    ("15\\text{ cm}^2", "15"),
    ("125 \\text{ miles}", "125"),
    ("90^\\circ", "90"),
    ("x = 3", "3"),
    ("[2,7]", "x \\in [2,7]"),
    ("(-\\infty, 3) \\cup (4, \\infty)", "(-\\infty,3)\\cup(4,\\infty)"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("(1, 2)", "$(1,2)$"),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"),
    ("2\\sqrt{3}", "\\sqrt{12}"),
    ("3, 5", "5, 3"),
    ("\\{1,2\\}", "\\{1,2\\}"),
    ("10455", "10,455"),
    ("\\text{east}", "\\text{east}"),
    ("9.60", ["9.6\n", "9.5\n"]),
]

NOT_EQUIVALENT = [
    ("\\frac{1}{3}", "0.33"),
    ("0.333", "\\frac{1}{3}"),
    ("(1,2)", "(2,1)"),
    ("[2,7)", "[2,7]"),
    ("x+1", "x-1"),
    ("3", "3, 5"),
    ("3, 5", "3"),
    ("5 = 3", "3"),  # a false statement must not score through its right-hand side
    ("2\\pi", "\\pi"),
    ("-25", "25"),
    ("26", "025"),
    ("x > 3", "x \\geq 3"),
    ("\\infty", "-\\infty"),
    ("", "0"),
    ("142", 143.0),
]


@pytest.mark.parametrize("answer,gold", EQUIVALENT)
def test_equivalent_forms_score_one(answer, gold):
    assert R.verify(f"Hence the answer is $\\boxed{{{answer}}}$.", gold, timeout=CORRECTNESS_TIMEOUT_S) == 1.0


@pytest.mark.parametrize("answer,gold", NOT_EQUIVALENT)
def test_non_equivalent_forms_score_zero(answer, gold):
    assert R.verify(f"Hence the answer is $\\boxed{{{answer}}}$.", gold, timeout=CORRECTNESS_TIMEOUT_S) == 0.0


# Answer classes math_verify misreads on its own: (answer, gold) pairs, right and wrong, for each class.
CLASS_RIGHT = {
    "mixed_number": [("2.75", "2 3/4"), ("\\frac{11}{4}", "2 3/4"), ("2 3/4", "2.75"), ("-2.75", "-2 3/4")],
    "plain_unit": [("7", "7 days"), ("7\\text{ days}", "7 days"), ("3", "3 weeks"), ("12", "12 m^2"),
                   ("12\\text{ m}^2", "12 m^2"), ("40", "40 km/h"), ("40 km/h", "40")],
    # A time without AM/PM is a 24-hour time: 9:30 is 9:30 a.m.
    "clock_time": [("14:05:00", "14:05"), ("2:05 PM", "14:05"), ("14:05", "2:05 p.m."), ("09:30", "9:30"), ("12:15\\text{ AM}", "00:15"),
                   ("9:30 a.m.", "9:30"), ("2:05 AM", "2:05"), ("9:30", "9:30 a.m.")],
    "trig_degrees": [("\\frac{1}{2}", "\\sin 30^\\circ"), ("0.5", "\\cos(60^{\\circ})"), ("1", "\\tan 45^\\circ"),
                     ("\\sin 30^\\circ", "\\frac12")],
    "scientific": [("602000000000000000000000", "6.02 \\times 10^{23}"), ("6.02e23", "6.02 \\times 10^{23}"),
                   ("0.00000015", "1.5 \\times 10^{-7}"), ("3.2 \\times 10^4", "32000"), ("0.001", "10^{-3}")],
    "imaginary_unit": [("0.5+0.5i", "\\frac{1+i}{2}"), ("\\sqrt{-1}", "i"), ("2i-1", "-1+2i"),
                       ("1+\\sqrt{-3}", "1 + i\\sqrt{3}")],
    "function_name": [("y = 3t+1", "g(t) = 3t+1"), ("f(x) = 2x+1", "y = 2x+1"), ("h(t) = 2t^2", "g(t) = 2t^2")],
    "float_exponent": [("e^{0.5x}", "e^{x/2}"), ("10^{0.3}", "10^{3/10}"), ("x^{2.5}", "x^{5/2}"),
                       ("x^{1/2}", "x^{0.5}")],
    # Found by the mutation search (tests/test_verifier_mutations.py) or listed with it: answers once refused.
    "variable_not_unit": [("3t+1", "1+3t"), ("s^{2} + 1 + b s", "s^{2}+b s+1"), ("x = 5 cm", "5"),
                          ("5\\sqrt{2}\\text{ cm}", "5\\sqrt{2}")],
    "identity": [("\\sin^2 x+\\cos^2 x", "1"), ("\\sum_{i=1}^n i^2", "\\frac{n(n+1)(2n+1)}{6}"), ("3+4j", "3+4i")],
    "stray_dollar": [("221, 8", "221,$8"), ("a=2, a=-6-4\\sqrt{2}", "a=2$, $a=-6-4 \\sqrt{2}")],
}
CLASS_WRONG = {
    "mixed_number": [("23/4", "2 3/4"), ("2.5", "2 3/4"), ("1.5", "2 3/4"), ("2.75", "-2 3/4")],
    "plain_unit": [("8", "7 days"), ("12\\text{ cm}^2", "12 m^2"), ("12 m", "12 m^2"), ("120 minutes", "2 hours"),
                   ("3e", "3 weeks"), ("3", "3 e")],
    "clock_time": [("14:06", "14:05"), ("2:05 AM", "14:05"), ("2:05 PM", "2:05"), ("9:30 p.m.", "9:30"), ("14:05:30", "14:05"),
                   ("\\frac{14}{5}", "14:05:00")],
    "trig_degrees": [("\\frac{\\sqrt{3}}{2}", "\\sin 30^\\circ"), ("0.5", "\\cos 30^\\circ"), ("0.5", "\\sin 30"),
                     ("\\sin 30", "\\sin 30^\\circ")],
    "scientific": [("0.00000016", "1.5 \\times 10^{-7}"), ("6.03 \\times 10^{23}", "6.02 \\times 10^{23}"),
                   ("2.78 \\times 10^{-6}", "2.7778 \\times 10^{-6}"), ("3200", "3.2 \\times 10^{4}"),
                   ("10^{10}", "10^9")],
    "imaginary_unit": [("0.5-0.5i", "\\frac{1+i}{2}"), ("-1", "i"), ("2i+1", "-1+2i"), ("1", "i^2")],
    "function_name": [("y = 3t+2", "g(t) = 3t+1"), ("x = 2y+1", "y = 2x+1"), ("g(y) = 2y+1", "f(x) = 2x+1"),
                      ("f(t) = 2t+1", "f(x) = 2x+1")],
    "float_exponent": [("x^{0.33}", "x^{1/3}"), ("x^{0.6667}", "x^{2/3}"), ("e^{0.5x}", "e^{x/3}"), ("x^{1.5}", "x^{5/2}")],
    # Found by the mutation search: wrong answers once paid.
    "function_name_is_no_label": [("\\cos(x)=\\frac{42}{59}", "\\sin(x)=\\frac{42}{59}"), ("\\cot t=0.1", "\\tan t=0.1")],
    "variable_not_unit": [("4", "1+3t"), ("7", "5 + 2s"), ("x+4", "x+4m"), ("2 + 3 s", "2 + 3 t")],
    "angle_unit": [("27\\text{ radians}", "27^\\circ"), ("105^\\circ", "105\\text{ radians}")],
    "tiny_number": [("0.00000015", "0.00000012"), (".0000671", ".0000672"), ("8.224 \\times 60^{-19}", "8.224 \\times 10^{-19}")],
    "repeated_item": [("-2", "-2,-2")],
    "stray_dollar": [("221", "221,$8")],
}


@pytest.mark.parametrize(
    "answer,gold", [pytest.param(a, g, id=f"{name}-{i}") for name, pairs in CLASS_RIGHT.items() for i, (a, g) in
                    enumerate(pairs)]
)
def test_answer_classes_right_score_one(answer, gold):
    assert R.verify(f"So the answer is $\\boxed{{{answer}}}$.", gold, timeout=CORRECTNESS_TIMEOUT_S) == 1.0


@pytest.mark.parametrize(
    "answer,gold", [pytest.param(a, g, id=f"{name}-{i}") for name, pairs in CLASS_WRONG.items() for i, (a, g) in
                    enumerate(pairs)]
)
def test_answer_classes_wrong_score_zero(answer, gold):
    assert R.verify(f"So the answer is $\\boxed{{{answer}}}$.", gold, timeout=CORRECTNESS_TIMEOUT_S) == 0.0


def test_answer_class_rewrites():
    assert R.comparable_pair("2 3/4", "2.75")[0] == "\\frac{11}{4}"
    assert R.comparable_pair("7 weeks", "7")[:2] == ("7", "7")  # the word is gone: no `e` left to be Euler's number
    assert R.comparable_pair("3 e", "3")[0] == "3 e"  # a single letter is a variable, not a unit
    assert R.comparable_pair("12 m^2", "12 cm^2")[2] is False
    assert R.comparable_pair("g(t) = 3t+1", "y = 3t+1")[:2] == ("3t+1", "3t+1")
    assert R.comparable_pair("x = 2", "y = 2")[:2] == ("x = 2", "y = 2")  # two bare names may be two unknowns
    assert "\\pi" in R.comparable_pair("\\sin 30^\\circ", "0.5")[0]
    assert R.comparable_pair("90^\\circ", "90")[0] == "90^\\circ"  # outside a trig function the degree sign goes
    assert R.fast_match("14:05", "2:05 PM") is True and R.fast_match("1:20", "\\frac{1}{20}") is None


def test_fast_path_decides_only_what_is_certain():
    assert R.fast_match("\\frac{3}{4}", "0.75") is True
    assert R.fast_match("-\\frac{3}{4}", "\\frac{-3}{4}") is True
    assert R.fast_match("0.5", "1/2") is True
    assert R.fast_match("7", "x = 7") is True
    assert R.fast_match("204", "205") is False
    assert R.fast_match("\\frac{1}{3}", "0.333") is False
    # math_verify rounds floats to 6 decimals, so 0.3333333 may equal 1/3: leave it to math_verify.
    assert R.fast_match("\\frac{1}{3}", "0.3333333") is None
    assert R.fast_match("\\sqrt{12}", "2\\sqrt{3}") is None
    assert R.fast_match("1/0", "1") is None


def test_multiple_candidate_boxes_do_not_hedge():
    assert R.verify("\\boxed{3} or \\boxed{5}", "3") == 0.0
    assert R.verify("\\boxed{3}, \\boxed{5}", "3, 5") == 1.0
    # A corrected answer later in the text is the answer, not a set with the earlier one.
    assert R.verify("So \\boxed{3}. Wait, that is wrong. Redo: the answer is \\boxed{5}", "5") == 1.0


def test_gold_normalisation():
    assert R.gold_strings(142.0) == ["142"]
    assert R.gold_strings(0.25) == ["0.25"]
    assert R.gold_strings(["9.6\n", "$9.6$", "\\frac{48}{5}\n"]) == ["9.6", "\\frac{48}{5}"]
    assert R.gold_strings("$$x^2$$") == ["x^2"]
    assert R.gold_strings(None) == [] and R.gold_strings("  $ $ ") == [] and R.gold_strings(float("nan")) == []
    np = pytest.importorskip("numpy")
    assert R.gold_strings(np.array(["4\n", "4.0"])) == ["4", "4.0"]
    assert R.gold_strings(np.int64(7)) == ["7"] and R.gold_strings(np.float64(3.0)) == ["3"]
    assert R.verify("\\boxed{4}", np.array(["5\n", "4\n"])) == 1.0


@pytest.mark.parametrize("gold", ["", "$$", "  ", None, [], "\\frac{1}{", "{{"])
@pytest.mark.parametrize("answer", ["", "\\frac{1}{", "0", "{}"])
def test_unusable_gold_never_scores_one(gold, answer):
    assert R.verify(f"\\boxed{{{answer}}}", gold) == 0.0
    assert R.verify(f"\\boxed{{{answer}}}", gold, require_think=True) == 0.0


def test_require_think():
    gold = "7"
    assert R.verify("<think>maybe \\boxed{7}</think> the answer is \\boxed{7}", gold, require_think=True) == 1.0
    # Only text after the first </think> counts, and without </think> the answer is not trusted.
    assert R.verify("<think>\\boxed{7}</think> so \\boxed{8}", gold, require_think=True) == 0.0
    assert R.verify("<think>still thinking \\boxed{7}", gold, require_think=True) == 0.0
    assert R.verify("<think>still thinking \\boxed{7}", gold) == 1.0


# ---------------------------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------------------------


def test_extract_last_box():
    assert R.extract_answer("\\boxed{1} then \\boxed{\\frac{2}{3}} done") == ("\\frac{2}{3}", "ok")
    assert R.extract_answer("\\fbox{12}") == ("12", "ok")
    assert R.extract_answer("so \\boxed 5$.") == ("5", "ok")
    assert R.extract_answer("\\boxed{\\{1, 2\\}}") == ("\\{1, 2\\}", "ok")
    assert R.extract_answer("\\boxed{a^{b^{c}}}") == ("a^{b^{c}}", "ok")
    assert R.extract_answer("\\boxed{(1, 2)}, \\boxed{(2, 1)}") == ("(1, 2), (2, 1)", "ok")
    assert R.extract_answer("no answer here") == (None, "no_answer")
    assert R.extract_answer("\\boxed{1} and finally \\boxed{") == (None, "no_answer")


def test_extraction_is_linear_and_not_recursive():
    deep = "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}"
    assert R.extract_answer(deep) == (None, "rejected")
    start = time.perf_counter()
    for text in ("x" * 1_000_000 + "\\boxed{7}", "\\boxed{" * 150_000, "{" * 1_000_000, "\\boxed{1}" * 100_000):
        R.extract_answer(text)
    assert time.perf_counter() - start < 1.0


def test_precheck_reasons():
    assert R.pathological_reason("2^{2023}") is None
    assert R.pathological_reason("\\frac{10^{100}}{3}") is None
    assert R.pathological_reason("9^{9^{9^{9}}}") == "huge power"
    assert R.pathological_reason("9^{9^9}") == "huge power"
    assert R.pathological_reason("(x+1)^{100000}") == "huge power"
    assert R.pathological_reason("100000!") == "huge factorial"
    assert R.pathological_reason("(" * 50 + ")" * 50) == "too deeply nested"
    assert R.pathological_reason("__import__('os')") == "code-like"


# ---------------------------------------------------------------------------------------------------------------
# Adversarial completions: 0, within the deadline, from any thread, without side effects
# ---------------------------------------------------------------------------------------------------------------

DEADLINE_S = 1.0
MARGIN_S = 1.0  # generous: the machine running the tests may be busy
PWNED = Path("/tmp/pwned_xyz")

ADVERSARIAL_GOLD = "x^2"  # symbolic, so that math_verify has to try simplify() on whatever reaches it
ADVERSARIAL = {
    "nested_10k": "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
    "power_tower": "The answer is \\boxed{9^{9^{9^{9}}}}",
    "huge_expand": "\\boxed{(x+1)^{100000}}",
    "slow_simplify": "\\boxed{(x+1)^{5000} - (x+2)^{5000}}",  # passes the pre-checks: the deadline must stop it
    "one_megabyte": "Let me think. " * 75_000 + "\\boxed{3}" + " more text" * 1000,
    "unclosed": "so the answer is \\boxed{2",
    "code": "\\boxed{__import__('os').system('touch /tmp/pwned_xyz')}",
    "code_no_dunder": "\\boxed{eval(\"open('/tmp/pwned_xyz', 'w')\")}",
    "code_lambda": "\\boxed{(lambda: exec(\"open('/tmp/pwned_xyz','w')\"))()}",
}


def _run_main(fn):
    return fn()


def _run_thread(fn):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("value", fn()))
    thread.start()
    thread.join()
    return out["value"]


def _run_executor(fn):
    with ThreadPoolExecutor(max_workers=2) as pool:
        return pool.submit(fn).result()


def _run_asyncio(fn):
    async def main():
        return await asyncio.to_thread(fn)

    return asyncio.run(main())


CONTEXTS = {"main": _run_main, "thread": _run_thread, "executor": _run_executor, "asyncio": _run_asyncio}


@pytest.mark.parametrize("context", list(CONTEXTS))
@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_completion_scores_zero_in_time(name, context):
    PWNED.unlink(missing_ok=True)
    R.start_workers()  # a worker killed by an earlier case is back before the clock starts
    completion = ADVERSARIAL[name]
    before = R.STATS.snapshot()
    start = time.perf_counter()
    score = CONTEXTS[context](
        lambda: R.verify(completion, ADVERSARIAL_GOLD, timeout=DEADLINE_S, wall_timeout=DEADLINE_S)
    )
    elapsed = time.perf_counter() - start
    assert score == 0.0
    assert elapsed < DEADLINE_S + MARGIN_S, f"{name} from {context} took {elapsed:.2f}s"
    assert not PWNED.exists()
    after = R.STATS.snapshot()
    assert after["judged"] == before["judged"] + 1
    if name == "slow_simplify":
        assert after["timeouts"] == before["timeouts"] + 1


def test_worker_killed_past_deadline_even_in_c_code(monkeypatch):
    """With the pre-checks off, 9^{9^9} reaches sympy (a GMP power that signals cannot interrupt)."""
    monkeypatch.setattr(R, "pathological_reason", lambda answer: None)
    R.start_workers()
    before = R.STATS.snapshot()
    start = time.perf_counter()
    assert _run_thread(lambda: R.verify("\\boxed{9^{9^9}}", "2", timeout=DEADLINE_S, wall_timeout=DEADLINE_S)) == 0.0
    assert time.perf_counter() - start < DEADLINE_S + MARGIN_S
    # Without the wall-clock backstop, the worker's own CPU limit (SIGPROF) ends it: a timeout, not a hang.
    R.start_workers()
    assert _run_thread(lambda: R.verify("\\boxed{9^{9^9}}", "2", timeout=DEADLINE_S, wall_timeout=60)) == 0.0
    assert time.perf_counter() - start < 30
    after = R.STATS.snapshot()
    assert after["timeouts"] == before["timeouts"] + 2
    # The pool recovers: the next hard answer is judged normally.
    R.start_workers()
    assert R.verify("\\boxed{\\sqrt{12}}", "2\\sqrt{3}") == 1.0


def test_deadline_counts_cpu_time_not_wall_time():
    """A correct answer whose worker is starved of CPU (here: stopped for 3 s) still scores 1 under a 2 s deadline;
    a slow one still times out by its CPU time when the wall-clock backstop is far away."""
    import signal

    pids = R._worker_pids(CORRECTNESS_TIMEOUT_S)
    assert len(pids) == R._pool_size()
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault(
        "score", R.verify("\\boxed{\\sqrt{12}}", "2\\sqrt{3}", timeout=2.0, wall_timeout=30.0)))
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        thread.start()
        time.sleep(3.0)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    thread.join(30)
    assert result["score"] == 1.0
    before = R.STATS.snapshot()
    slow = ADVERSARIAL["slow_simplify"]
    assert R.verify(slow, ADVERSARIAL_GOLD, timeout=DEADLINE_S, wall_timeout=30.0) == 0.0
    assert R.STATS.snapshot()["timeouts"] == before["timeouts"] + 1


def test_workers_have_a_memory_cap():
    import resource

    soft, _ = R._pool().schedule(resource.getrlimit, args=(resource.RLIMIT_AS,)).result(timeout=CORRECTNESS_TIMEOUT_S)
    assert soft != resource.RLIM_INFINITY
    assert resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY or soft != resource.getrlimit(
        resource.RLIMIT_AS)[0]  # the cap is the workers', not the caller's


def test_batch_with_hanging_completion_keeps_the_others():
    R.start_workers()
    completions = ["\\boxed{(x+1)^{5000} - (x+2)^{5000}}", "\\boxed{\\sqrt{12}}", "\\boxed{7}", "\\boxed{1/2}"]
    golds = ["x^2", "2\\sqrt{3}", "7", "0.5"]
    assert R.verify_batch(completions, golds, timeout=DEADLINE_S, wall_timeout=DEADLINE_S) == [0.0, 1.0, 1.0, 1.0]


def test_worker_that_died_while_idle_costs_no_answer():
    for pid in R._worker_pids(CORRECTNESS_TIMEOUT_S):
        os.kill(pid, 9)  # e.g. the kernel's OOM killer between two batches
    time.sleep(0.2)
    completions = ["\\boxed{\\sqrt{12}}", "\\boxed{2\\sqrt{3}}", "\\boxed{\\sqrt{3}}"]
    assert R.verify_batch(completions, ["2\\sqrt{3}"] * 3, timeout=CORRECTNESS_TIMEOUT_S) == [1.0, 1.0, 0.0]


def test_broken_worker_install_scores_zero_without_hanging():
    """Workers that die on start-up (here: their initializer exits) cost their answers, not a hung trainer."""
    pool = R._new_pool(2, initializer=os._exit, initargs=(3,))
    start = time.perf_counter()
    try:
        results = R._run_jobs(pool, 2, [(("2",), "\\sqrt{4}")] * 3, DEADLINE_S, DEADLINE_S)
    finally:
        pool.stop()
    assert [score for score, _ in results] == [0.0] * 3
    assert time.perf_counter() - start < 10


def test_workers_that_cannot_start_are_one_clear_error(monkeypatch):
    """Through verify, a pool whose workers die on start-up raises RewardWorkerError, quickly, instead of scoring
    every answer that needs math_verify 0; the fast path still judges, and a working pool comes back."""
    R.shutdown_workers()
    new_pool = R._new_pool
    monkeypatch.setattr(R, "_new_pool", lambda size: new_pool(size, initializer=os._exit, initargs=(3,)))
    start = time.perf_counter()
    with pytest.raises(R.RewardWorkerError, match="could not start"):
        R.verify("\\boxed{\\sqrt{12}}", "2\\sqrt{3}")
    assert time.perf_counter() - start < 10
    assert R.verify("\\boxed{0.75}", "3/4") == 1.0
    monkeypatch.undo()
    R.shutdown_workers()
    assert R.start_workers()
    assert R.verify("\\boxed{\\sqrt{12}}", "2\\sqrt{3}") == 1.0


def test_repeated_answers_in_a_batch_are_judged_once(monkeypatch):
    dispatched = []
    run = R._run_jobs
    monkeypatch.setattr(R, "_run_jobs", lambda pool, size, jobs, *rest: dispatched.append(len(jobs)) or run(
        pool, size, jobs, *rest))
    completions = ["\\boxed{\\sqrt{12}}"] * 6 + ["\\boxed{\\sqrt{3}}"] * 2  # a GRPO group: 8 samples, 2 answers
    scores = R.verify_batch(completions, ["2\\sqrt{3}"] * 8, timeout=CORRECTNESS_TIMEOUT_S)
    assert scores == [1.0] * 6 + [0.0] * 2
    assert dispatched == [2]


def test_concurrent_callers():
    completions = ["\\boxed{\\frac{3}{4}}", "\\boxed{0.75}", "\\boxed{3/4}", "\\boxed{4/3}"] * 4
    expected = [1.0, 1.0, 1.0, 0.0] * 4
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: R.verify_batch(completions, ["0.75"] * 16), range(4)))
    assert results == [expected] * 4


# ---------------------------------------------------------------------------------------------------------------
# TRL reward functions
# ---------------------------------------------------------------------------------------------------------------


def _conversational(text):
    return [{"role": "assistant", "content": text}]


def test_accuracy_reward_plain_and_conversational():
    texts = ["<think>ok</think> \\boxed{\\dfrac{1}{2}}", "\\boxed{3}", "no box at all", "\\boxed{4}"]
    answers = ["0.5", "4", "1", None]
    expected = [1.0, 0.0, 0.0, None]
    assert R.accuracy_reward(texts, answer=answers) == expected
    assert R.accuracy_reward([_conversational(t) for t in texts], answer=answers) == expected
    # The columns TRL passes along are accepted and ignored.
    extra = dict(prompts=["p"] * 4, completion_ids=[[1]] * 4, trainer_state=object(), problem=["q"] * 4)
    assert R.accuracy_reward(texts, answer=answers, **extra) == expected


def test_gold_column_fallbacks():
    texts = ["\\boxed{2}", "\\boxed{3}"]
    assert R.accuracy_reward(texts, solution=["2", "2"]) == [1.0, 0.0]
    assert R.accuracy_reward(texts, ground_truth=[2.0, 3.0]) == [1.0, 1.0]
    assert R.accuracy_reward(texts, reward_model=[{"ground_truth": ["2\n"]}, {"ground_truth": None}]) == [1.0, None]
    with pytest.raises(ValueError, match="answer"):
        R.accuracy_reward(texts, problem=["a", "b"])


def test_reasoning_split_off_by_the_chat_parser():
    message = [{"role": "assistant", "reasoning_content": "let me see", "content": "so \\boxed{12}"}]
    assert R.think_accuracy_reward([message], answer=["12"]) == [1.0]
    assert R.format_reward([message]) == [1.0]
    tool_only = [{"role": "assistant", "content": "calling"}, {"role": "tool", "content": "\\boxed{12}"}]
    assert R.accuracy_reward([tool_only], answer=["12"]) == [0.0]


def test_think_accuracy_reward():
    texts = ["<think>\\boxed{5}</think>\\boxed{6}", "<think>a</think> \\boxed{5}", "\\boxed{5}"]
    assert R.think_accuracy_reward(texts, answer=["5"] * 3) == [0.0, 1.0, 0.0]


def test_format_reward():
    texts = [
        "<think>reasoning</think>\nThe answer is \\boxed{4}.",
        "reasoning without the opening tag (it was in the prompt)</think> \\boxed{4}",
        "<think>reasoning</think> The answer is 4.",
        "<think>reasoning \\boxed{4}</think>",
        "The answer is \\boxed{4}.",
        "<think></think> \\boxed{4}",
        "<think>a</think> \\boxed{4} <think>b</think>",
        "<think>a</think> \\boxed{4",
    ]
    assert R.format_reward(texts) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert R.format_reward([_conversational(texts[0])], answer=[None]) == [1.0]


def test_counters_and_log_metric():
    logged = []
    R.STATS.reset()
    texts = ["\\boxed{1}", "nothing", "\\boxed{9^{9^{9^9}}}", "\\boxed{2}", "\\boxed{1}"]
    scores = R.accuracy_reward(
        texts, answer=["1", "1", "1", "1", None], log_metric=lambda name, value: logged.append((name, value))
    )
    assert scores == [1.0, 0.0, 0.0, 0.0, None]
    assert dict(logged) == {"rewards/timeouts": 0.0, "rewards/errors": 0.0, "rewards/no_answer": 1.0,
                            "rewards/rejected": 1.0}
    assert R.STATS.judged == 4 and R.STATS.no_answer == 1 and R.STATS.rejected == 1
    counts = R.STATS.pop()
    assert counts["judged"] == 4 and counts["fast_path"] == 2
    assert R.STATS.snapshot() == dict.fromkeys(R.RewardStats.FIELDS, 0)


def test_registry_and_dotted_paths():
    assert R.get_reward_funcs(["accuracy", "format"]) == [R.accuracy_reward, R.format_reward]
    assert set(R.REWARD_FUNCS) >= {"accuracy", "format"}
    names = {f.__name__ for f in R.REWARD_FUNCS.values()}  # TRL logs rewards/<__name__>/mean
    assert names == {"accuracy_reward", "think_accuracy_reward", "format_reward"}
    assert R.get_reward_funcs(["rewards.format_reward"]) == [R.format_reward]
    (trl_accuracy,) = R.get_reward_funcs(["trl.rewards.accuracy_reward"])
    assert trl_accuracy.__name__ == "accuracy_reward" and trl_accuracy.__module__.startswith("trl.")
    with pytest.raises(ValueError, match="accuracy, format") as err:
        R.get_reward_funcs(["acuracy"])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="no_such_module"):
        R.get_reward_funcs(["no_such_module.fn"])
    with pytest.raises(ValueError, match="not callable"):
        R.get_reward_funcs(["rewards.STATS"])


def test_import_is_cheap_and_timeout_is_configurable():
    code = (
        "import sys, rewards; "
        "print(rewards.TIMEOUT_S, 'sympy' in sys.modules, 'math_verify' in sys.modules, rewards._POOL is None)"
    )
    env = dict(os.environ, POLARIS_REWARD_TIMEOUT="3.5", PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.split() == ["3.5", "False", "False", "True"]
