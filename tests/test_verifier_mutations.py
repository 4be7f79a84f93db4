"""The verifier's precision and recall under the seeded mutation search of benchmarks/verifier_mutations.py: no wrong
answer made by a small edit of a benchmark gold scores 1, and at least 99% of the equivalent rewrites do. Whether
an edit changed the value is decided there without rewards.py; the tests at the end check that decision."""

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import verifier_mutations as M  # noqa: E402


@pytest.fixture(scope="module")
def search(shared_dir):
    import rewards

    assert rewards.start_workers(), "verifier worker processes did not start"
    return M.run(shared_dir, seed=0)


def test_no_wrong_answer_scores_one(search):
    assert search["wrong"] >= 5000
    missing = [edit for edit in M.WRONG_EDITS if not search["by_edit"][edit].get("cases")]
    assert not missing, f"no wrong answers made by: {missing}"
    paid = [(case.edit, case.gold, case.answer) for case in search["false_positive_cases"]]
    assert search["false_positives"] == 0, f"{len(paid)} wrong answers scored 1: {paid[:20]}"


def test_equivalent_rewrites_score_one(search):
    missing = [edit for edit in M.EQUIVALENT_EDITS if not search["by_edit"][edit].get("cases")]
    assert not missing, f"no rewrites made by: {missing}"
    refused = [(case.edit, case.gold, case.answer) for case in search["false_negative_cases"]]
    assert search["recall"] >= 0.99, f"recall {search['recall']:.2%}; refused: {refused[:20]}"


@pytest.mark.parametrize(
    "gold,answer,same",
    [
        ("\\frac{3}{4}", "0.75", True),
        ("8.7 \\times 10^{8}", "870000000", True),
        ("1,-1,7", "7, 1,-1", True),  # a list of answers: order free
        ("(1, 2)", "(2, 1)", False),  # a tuple: order matters
        ("-2,-2", "-2", False),
        ("x^2+2x+1", "(x+1)^2", True),
        ("\\sin x", "\\cos x", False),
        ("\\sin(\\frac{\\pi}{4})", "\\cos(\\frac{\\pi}{4})", True),  # a function-name edit that keeps the value
        ("2t+1", "2s+1", False),
        ("[2, 7)", "[2, 7]", False),
        ("\\frac{1}{", "1", None),  # unreadable: such an edit is dropped, not counted
    ],
)
def test_equivalence_is_decided_without_the_verifier(gold, answer, same):
    assert M.same_value(gold, answer) is same


def test_edits_do_what_they_say():
    import random

    rng = random.Random(0)
    assert all(M.number_value(answer) != M.number_value("1234") for answer in M.digit_edits("1234", rng, 6))
    edited = M.digit_edits("x_{1} + 204_5", rng, 3)  # subscripts (indices, bases) are names, not values
    assert len(edited) == 3 and all(a.startswith("x_{1} + ") and a.endswith("_5") and a != "x_{1} + 204_5" for a in edited)
    assert M.sign_edit("-\\frac{3}{4}") == "\\frac{3}{4}" and M.sign_edit("y = 2x") == "-y = 2x"
    assert M.function_edit("\\sin(x)=\\frac{1}{2}", rng) == "\\cos(x)=\\frac{1}{2}"
    assert M.tuple_order_edit("(3, 5)", rng).replace(" ", "") == "(5,3)"
    assert M._signed_terms("x^2-2x+1") == [("+", "x^2"), ("-", "2x"), ("+", "1")]
    assert M._signed_terms("1.5 \\times 10^{-7}") == [("+", "1.5 \\times 10^{-7}")]
    assert M._decimal_or_fraction("\\frac{7}{128}") == "0.0546875" and M._decimal_or_fraction("0.75") == "\\frac34"
    assert M._decimal_or_fraction("\\frac{1}{3}") is None  # no terminating decimal: no rewrite
