"""A seeded mutation search for answers the verifier (rewards.py) pays wrongly, or wrongly refuses.

From every gold of ../shared/benchmarks (MATH500, AIME, AMC, Minerva, OlympiadBench, verifier_regression.json) it
writes wrong answers by small edits that change the value (a digit, a sign, an operator, a function name, a variable,
an exponent, a unit, an interval bound, the order of a tuple, AM/PM, a dropped term) and equivalent rewrites
(reordered sums and lists, \\dfrac for \\frac, 0.5 for \\frac12, spacing, \\left( \\right)). What the verifier
rewrites before math_verify sees it (units, clock times, function equations, mixed numbers, degrees inside
trigonometric functions, decimal exponents, variables math_verify takes for units) is rare in the golds, so those
edits also get golds built from the numeric ones.

Whether an edit changed the value is decided without rewards.py: exactly (fractions) when gold and answer are plain
numbers or lists of them, by construction (or sympy's exact values) for the built golds, and otherwise by evaluating
both with sympy (latex2sympy2_extended) at random points; an edit the evaluation cannot read, or finds equal, is
dropped.

    python benchmarks/verifier_mutations.py                              # the CI sample (~7,000 answers)
    python benchmarks/verifier_mutations.py --other_golds 0 --built 150  # every gold (~9,000, a few minutes)
    python benchmarks/verifier_mutations.py --seed 3

It prints the counts by edit, every false positive and some false negatives.

tests/test_verifier_mutations.py runs it in CI; benchmarks/bench_rewards.py prints its counts.
"""

import json
import math
import os
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

WRONG_EDITS = ("digit", "sign", "operator", "function", "variable", "exponent", "unit", "bound", "tuple_order",
               "am_pm", "dropped_term")  # fmt: skip
EQUIVALENT_EDITS = ("reordered", "dfrac", "decimal_fraction", "spacing", "left_right")


@dataclass
class MutationArguments:
    seed: int = field(default=0, metadata={"help": "Seed of every random choice."})
    shared: str = field(
        default_factory=lambda: os.environ.get("POLARIS_SHARED", str(REPO_ROOT.parent / "shared")),
        metadata={"help": "The project's shared data folder (holds benchmarks/)."},
    )
    other_golds: int = field(
        default=60, metadata={"help": "Golds other than plain numbers to edit (0: all); each costs math_verify time."}
    )
    built: int = field(default=15, metadata={"help": "Built golds per family that math_verify judges."})
    show: int = field(default=10, metadata={"help": "False negatives to print (false positives are all printed)."})


@dataclass(frozen=True)
class Case:
    source: str  # benchmark of the gold, or "built" for golds made from numeric ones
    gold: str
    answer: str
    edit: str  # one of WRONG_EDITS or EQUIVALENT_EDITS

    @property
    def equivalent(self) -> bool:
        return self.edit in EQUIVALENT_EDITS


# ---------------------------------------------------------------------------------------------------------------
# Golds
# ---------------------------------------------------------------------------------------------------------------


def _gold_texts(gold) -> list[str]:
    """The acceptable answers of one stored gold, without surrounding `$` (Minerva stores lists)."""
    items = gold.tolist() if hasattr(gold, "tolist") else gold
    items = items if isinstance(items, (list, tuple)) else [items]
    texts = []
    for item in items:
        text = str(item).strip()
        while len(text) >= 2 and text[0] == "$" and text[-1] == "$":
            text = text[1:-1].strip()
        if text and text not in texts:
            texts.append(text)
    return texts


def load_golds(shared: Path) -> list[tuple[str, str]]:
    """(source, gold) for every distinct gold of the benchmarks and the labelled regression pairs."""
    import pyarrow.parquet as pq

    benchmarks = shared / "benchmarks"
    stored = []
    for name in ("aime24", "aime25", "amc23", "minerva", "olympiad"):
        stored += [(name, row["reward_model"]["ground_truth"]) for row in pq.read_table(benchmarks / f"{name}.parquet").to_pylist()]
    stored += [("math500", row["answer"]) for row in json.loads((benchmarks / "math500.json").read_text())]
    stored += [("regression", case["gold"]) for case in json.loads((benchmarks / "verifier_regression.json").read_text())]
    seen, golds = set(), []
    for source, gold in stored:
        for text in _gold_texts(gold):
            if text not in seen:
                seen.add(text)
                golds.append((source, text))
    return golds


# ---------------------------------------------------------------------------------------------------------------
# Deciding equivalence without rewards.py: exact for plain numbers, sympy at random points for the rest
# ---------------------------------------------------------------------------------------------------------------

_INTEGER = re.compile(r"-?\d+")
_DECIMAL = re.compile(r"-?(?:\d+\.\d*|\.\d+|\d+)")
_FRAC = re.compile(r"(-?)\\[dt]?frac\s*(?:\{\s*(-?\d+)\s*\}\s*\{\s*(\d+)\s*\}|(\d)(\d))")
_SLASH = re.compile(r"(-?\d+)\s*/\s*(\d+)")
_SCIENTIFIC = re.compile(r"(-?\d+(?:\.\d+)?)\s*(?:\\times|\\cdot)\s*10\s*\^\s*(?:\{\s*(-?\d+)\s*\}|(\d))")


def number_value(text: str) -> Fraction | None:
    """The exact value of a plain number: 12, -0.5, \\frac{3}{4}, \\frac34, 3/4, 8.7 \\times 10^{8}."""
    text = text.strip()
    try:
        if _DECIMAL.fullmatch(text):
            return Fraction(text)
        if match := _FRAC.fullmatch(text):
            value = Fraction(int(match[2] or match[4]), int(match[3] or match[5]))
            return -value if match[1] else value
        if match := _SLASH.fullmatch(text):
            return Fraction(int(match[1]), int(match[2]))
        if match := _SCIENTIFIC.fullmatch(text):
            return Fraction(match[1]) * Fraction(10) ** int(match[2] or match[3])
    except (ValueError, ZeroDivisionError):
        return None
    return None


def split_top_level(text: str, separator: str = ",") -> list[str]:
    """`text` cut at the separators outside any bracket or brace."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0 and text.startswith(separator, i):
            parts.append(text[start:i])
            start = i + len(separator)
        i += 1
    parts.append(text[start:])
    return parts


def plain_value(text: str):
    """A plain number, an ordered tuple `(a, b)` of them or an unordered list `a, b` of those, exactly; else None."""
    text = text.strip()
    parts = split_top_level(text)
    if len(parts) > 1:
        values = [plain_value(part) for part in parts]
        return None if None in values or any(not p.strip() for p in parts) else ("list", frozenset(Counter(values).items()))
    if text.startswith("(") and text.endswith(")") and "(" not in text[1:-1]:
        inner = split_top_level(text[1:-1])
        values = [number_value(part) for part in inner]
        return None if len(inner) < 2 or None in values else ("tuple", tuple(values))
    return number_value(text)


_POINTS = 2


def _point_value(name: str, point: int) -> float:
    """The value of variable `name` at random point `point`, the same for gold and answer."""
    return random.Random(f"{name}/{point}").uniform(0.3, 1.7)


def _fingerprint(obj):
    """A comparable summary of a sympy object: numbers rounded to 9 significant digits at random points."""
    import sympy

    if isinstance(obj, sympy.MatrixBase):
        entries = tuple(_fingerprint(e) for e in obj)
        return None if None in entries else ("matrix", obj.shape, entries)
    if isinstance(obj, (list, tuple, sympy.Tuple)):
        items = tuple(_fingerprint(e) for e in obj)
        return None if None in items else ("tuple", items)
    if isinstance(obj, (sympy.FiniteSet, sympy.Union, set, frozenset)):
        items = [_fingerprint(e) for e in (obj.args if isinstance(obj, sympy.Basic) else obj)]
        return None if None in items else ("set", frozenset(items))
    if isinstance(obj, sympy.Interval):
        ends = (_fingerprint(obj.start), _fingerprint(obj.end))
        return None if None in ends else ("interval", ends, obj.left_open, obj.right_open)
    if isinstance(obj, sympy.core.relational.Relational):
        sides = (_fingerprint(obj.lhs), _fingerprint(obj.rhs))
        return None if None in sides else (type(obj).__name__, sides)
    if not isinstance(obj, sympy.Expr):
        return None
    if obj.has(sympy.oo, -sympy.oo, sympy.zoo):
        return ("infinite", sympy.srepr(obj))
    values = []
    for point in range(_POINTS):
        substituted = obj.xreplace({s: sympy.Float(_point_value(s.name, point)) for s in obj.free_symbols})
        try:
            value = complex(sympy.N(substituted, 20))
        except (TypeError, ValueError, ArithmeticError):
            return None
        imag = value.imag if abs(value.imag) > 1e-12 * max(1.0, abs(value.real)) else 0.0
        values.append((f"{value.real:.9g}", f"{imag:.9g}"))
    return ("value", tuple(values))


_SYMPY_CACHE: dict[str, object] = {}


def sympy_fingerprint(text: str):
    """latex2sympy2_extended's reading of `text`, summarised by _fingerprint (None: unreadable)."""
    if text not in _SYMPY_CACHE:
        from latex2sympy2_extended import latex2sympy

        try:
            _SYMPY_CACHE[text] = _fingerprint(latex2sympy(text))
        except Exception:  # the parser raises many kinds of errors on what it cannot read
            _SYMPY_CACHE[text] = None
    return _SYMPY_CACHE[text]


def same_value(gold: str, answer: str) -> bool | None:
    """True/False when gold and answer are decided equal or different, None when neither can be shown."""
    gold_plain, answer_plain = plain_value(gold), plain_value(answer)
    if gold_plain is not None and answer_plain is not None:
        return gold_plain == answer_plain
    gold_print, answer_print = sympy_fingerprint(gold), sympy_fingerprint(answer)
    if gold_print is None or answer_print is None:
        return None
    return gold_print == answer_print


# ---------------------------------------------------------------------------------------------------------------
# Edits that change the value
# ---------------------------------------------------------------------------------------------------------------

# Text whose digits are no values: subscripts (x_1, 204_5), \text{...}, environment names, the degree sign.
_PROTECTED = re.compile(
    r"_\s*(?:\{[^{}]*\}|\w)|\\(?:text|mathrm|textbf|mbox|operatorname)\s*\{[^{}]*\}|\\(?:begin|end)\{[^{}]*\}"
)
_TRIG_SWAPS = {"sin": "cos", "cos": "sin", "tan": "cot", "cot": "tan", "sec": "csc", "csc": "sec", "arcsin": "arccos",
               "arccos": "arcsin", "max": "min", "min": "max", "ln": "exp", "exp": "ln"}  # fmt: skip
_FUNCTION_NAME = re.compile(r"\\(" + "|".join(sorted(_TRIG_SWAPS, key=len, reverse=True)) + r")(?![A-Za-z])")
_OPERATOR_SWAPS = {"+": "-", "-": "+", "\\cdot": "+", "\\times": "+", "\\pm": "+", "\\cup": "\\cap", "\\leq": "\\geq",
                   "\\geq": "\\leq", "\\le": "\\ge", "\\ge": "\\le", "<": ">", ">": "<", "/": "\\cdot"}  # fmt: skip
_OPERATOR = re.compile(r"\\(?:cdot|times|pm|cup|leq|geq|le|ge)(?![A-Za-z])|(?<=[\w})\]])\s*[-+/<>]")
_EXPONENT = re.compile(r"\^\s*(?:\{\s*(-?\d+)\s*\}|(\d))")
_LETTER = re.compile(r"(?<![\\A-Za-z])[A-Za-z](?![A-Za-z])")
_BOUND_VARIABLES = re.compile(r"\\(?:int|sum|prod|lim)|\\frac\{d|\bd[a-z]\b")
_FRESH_LETTERS = "abcghkmnpqrstuvwz"  # never e, i, j (constants), d (differentials), x, y (often both present)


def _protected_spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in _PROTECTED.finditer(text)]


def _free(position: int, spans) -> bool:
    return not any(start <= position < end for start, end in spans)


def digit_edits(gold: str, rng: random.Random, count: int) -> list[str]:
    spans = _protected_spans(gold)
    positions = [i for i, c in enumerate(gold) if c.isdigit() and _free(i, spans) and not gold[i - 1 : i] == "^"]
    choices = [(i, digit) for i in positions for digit in "0123456789" if digit != gold[i]]
    return [gold[:i] + digit + gold[i + 1 :] for i, digit in rng.sample(choices, min(count, len(choices)))]


def sign_edit(gold: str) -> str | None:
    """The first value negated: `-` added or taken away after the start, `=`, `(` or a top-level comma."""
    match = re.search(r"(?:^|=|\(|,)\s*(-?)(?=[\w\\])", gold)
    if match is None:
        return None
    start, end = match.span(1)
    return gold[:start] + ("" if match[1] else "-") + gold[end:]


def operator_edit(gold: str, rng: random.Random) -> str | None:
    matches = [m for m in _OPERATOR.finditer(gold) if _free(m.start(), _protected_spans(gold))]
    if not matches:
        return None
    match = rng.choice(matches)
    operator = match.group().strip()
    return gold[: match.end() - len(operator)] + " " + _OPERATOR_SWAPS[operator] + " " + gold[match.end() :]


def function_edit(gold: str, rng: random.Random) -> str | None:
    matches = list(_FUNCTION_NAME.finditer(gold))
    if not matches:
        return None
    match = rng.choice(matches)
    return gold[: match.start()] + "\\" + _TRIG_SWAPS[match[1]] + gold[match.end() :]


def variable_edit(gold: str, rng: random.Random) -> str | None:
    """Every occurrence of one variable renamed to a letter the gold does not use (bound variables excluded)."""
    if _BOUND_VARIABLES.search(gold):
        return None
    spans = _protected_spans(gold)
    letters = sorted({m.group() for m in _LETTER.finditer(gold) if _free(m.start(), spans)} - set("eijEIdD"))
    used = {c.lower() for c in re.sub(r"\\[A-Za-z]+", "", gold) if c.isalpha()}
    fresh = [c for c in _FRESH_LETTERS if c not in used]
    if not letters or not fresh:
        return None
    old, new = rng.choice(letters), rng.choice(fresh)
    return _LETTER.sub(lambda m: new if m.group() == old and _free(m.start(), spans) else m.group(), gold)


def exponent_edit(gold: str, rng: random.Random) -> str | None:
    matches = list(_EXPONENT.finditer(gold))
    if not matches:
        return None
    match = rng.choice(matches)
    return gold[: match.start()] + "^{" + str(int(match[1] or match[2]) + 1) + "}" + gold[match.end() :]


def bound_edit(gold: str, rng: random.Random) -> str | None:
    """An interval's finite end made open where it was closed or closed where it was open; `\\le` made `<`."""
    if match := re.search(r"\\le(?:q)?(?![a-z])|\\ge(?:q)?(?![a-z])|<|>", gold):
        swap = {"<": "\\le", ">": "\\ge"}.get(match.group(), "<" if "le" in match.group() else ">")
        return gold[: match.start()] + swap + gold[match.end() :]
    if not re.search(r"\\infty|\\cup|\[[^\]]*\)|\([^)]*\]|\[[^\]]*\]|\\in\b", gold):
        return None
    ends = [m for m in re.finditer(r"[\[(](?!\s*-?\\infty)|(?<!\\infty)[\])]", gold) if "\\left" not in gold[m.start() - 5 : m.start()]]
    ends = [m for m in ends if not (m.group() in "])" and gold[: m.start()].rstrip().endswith("infty"))]
    if not ends:
        return None
    match = rng.choice(ends)
    flip = {"[": "(", "(": "[", "]": ")", ")": "]"}[match.group()]
    return gold[: match.start()] + flip + gold[match.end() :]


def tuple_order_edit(gold: str, rng: random.Random) -> str | None:
    """Two different entries of one ordered tuple (or column vector) swapped."""
    tuples = [m for m in re.finditer(r"\(([^()]*,[^()]*)\)", gold)]
    if "pmatrix" in gold:
        body = re.search(r"\\begin\{pmatrix\}(.*)\\end\{pmatrix\}", gold, re.DOTALL)
        entries = body[1].split("\\\\") if body else []
        pairs = [(i, j) for i in range(len(entries)) for j in range(i + 1, len(entries)) if entries[i].strip() != entries[j].strip()]
        if pairs and "&" not in body[1]:
            i, j = rng.choice(pairs)
            entries[i], entries[j] = entries[j], entries[i]
            return gold[: body.start(1)] + "\\\\".join(entries) + gold[body.end(1) :]
    if not tuples or "\\infty" in gold:
        return None
    match = rng.choice(tuples)
    items = split_top_level(match[1])
    pairs = [(i, j) for i in range(len(items)) for j in range(i + 1, len(items)) if items[i].strip() != items[j].strip()]
    if not pairs:
        return None
    i, j = rng.choice(pairs)
    items[i], items[j] = items[j], items[i]
    return gold[: match.start(1)] + ",".join(items) + gold[match.end(1) :]


def dropped_term_edit(gold: str, rng: random.Random) -> str | None:
    """One item of a top-level list, or one term of a top-level sum, left out."""
    items = split_top_level(gold)
    if len(items) > 1:
        i = rng.randrange(len(items))
        return ",".join(items[:i] + items[i + 1 :])
    terms = _signed_terms(gold)
    if terms is None or len(terms) < 2:
        return None
    i = rng.randrange(len(terms))
    return _join_terms(terms[:i] + terms[i + 1 :])


def _signed_terms(text: str) -> list[tuple[str, str]] | None:
    """[(sign, term)] of a top-level sum, or None when `text` is no plain sum (a relation, a list, a ±)."""
    if re.search(r"[=<>,;:]|\\pm|\\mp|\\cup|\\in\b|\\le|\\ge|\\text|\\begin|\\quad", text):
        return None
    terms, depth, start, sign, i = [], 0, 0, "+", 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2 if i + 1 < len(text) and not text[i + 1].isalpha() else 1
            while i < len(text) and text[i].isalpha():
                i += 1
            continue
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0 and char in "+-":
            before = text[start:i].strip()
            if before and not re.search(r"(?:\\times|\\cdot|[*/^_]|\d[eE])\s*$", before):
                terms.append((sign, before))
                sign, start = char, i + 1
            elif not before:
                sign, start = ("-" if (sign == "-") != (char == "-") else "+"), i + 1
        i += 1
    last = text[start:].strip()
    if not last:
        return None
    terms.append((sign, last))
    return terms


def _join_terms(terms: list[tuple[str, str]]) -> str:
    first_sign, first = terms[0]
    text = ("-" if first_sign == "-" else "") + first
    return text + "".join(f" {sign} {term}" for sign, term in terms[1:])


def wrong_answers(gold: str, rng: random.Random, digits: int) -> list[tuple[str, str]]:
    """(edit, answer) candidates; whether each really changed the value is decided later by same_value."""
    candidates = [("digit", answer) for answer in digit_edits(gold, rng, digits)]
    for edit, make in (("sign", lambda: sign_edit(gold)), ("operator", lambda: operator_edit(gold, rng)),
                       ("function", lambda: function_edit(gold, rng)), ("variable", lambda: variable_edit(gold, rng)),
                       ("exponent", lambda: exponent_edit(gold, rng)), ("bound", lambda: bound_edit(gold, rng)),
                       ("tuple_order", lambda: tuple_order_edit(gold, rng)),
                       ("dropped_term", lambda: dropped_term_edit(gold, rng))):  # fmt: skip
        answer = make()
        if answer is not None and answer.strip() and answer != gold:
            candidates.append((edit, answer))
    return candidates


# ---------------------------------------------------------------------------------------------------------------
# Rewrites that keep the value
# ---------------------------------------------------------------------------------------------------------------


def _decimal_or_fraction(gold: str) -> str | None:
    """0.75 as \\frac{3}{4} (or \\frac34), \\frac{3}{4} as 0.75: only for a value whose decimal form terminates."""
    value = number_value(gold)
    if value is None or value.denominator == 1 or _SCIENTIFIC.fullmatch(gold.strip()):
        return None
    if "." in gold:
        sign = "-" if value < 0 else ""
        num, den = abs(value.numerator), value.denominator
        return f"{sign}\\frac{num}{den}" if num < 10 and den < 10 else f"{sign}\\frac{{{num}}}{{{den}}}"
    den, twos, fives = value.denominator, 0, 0
    while den % 2 == 0:
        den, twos = den // 2, twos + 1
    while den % 5 == 0:
        den, fives = den // 5, fives + 1
    if den != 1:
        return None
    places = max(twos, fives)  # value * 10**places is a whole number
    whole, part = divmod(abs(value.numerator) * 10**places // value.denominator, 10**places)
    return f"{'-' if value < 0 else ''}{whole}.{part:0{places}d}"


_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+")


def _with_left_right(gold: str) -> str | None:
    """Every pair of parentheses written \\left( ... \\right)."""
    if "(" not in gold or "\\left" in gold or "\\right" in gold:
        return None
    out, stack = list(gold), []
    for i, char in enumerate(gold):
        if char == "(":
            stack.append(i)
        elif char == ")":
            if not stack:
                return None
            out[stack.pop()], out[i] = "\\left(", "\\right)"
    return None if stack else "".join(out)


def _spaced(gold: str) -> str:
    """Spaces around operators and after commas, `\\,` thin spaces: what LaTeX ignores."""
    spaced = re.sub(r"(?<=[\w})\]])\s*([-+=<>])\s*", r" \1 ", gold)
    if "," in gold and not _THOUSANDS.fullmatch(re.sub(r"\\!\s*", "", gold)):
        return re.sub(r",\s*", ", \\\\, ", spaced)
    return "  " + spaced + " \\, "


def equivalent_answers(gold: str, rng: random.Random) -> list[tuple[str, str]]:
    candidates = [("spacing", _spaced(gold))]
    if "\\frac" in gold:
        candidates.append(("dfrac", gold.replace("\\frac", "\\dfrac")))
    if (rewritten := _decimal_or_fraction(gold)) is not None:
        candidates.append(("decimal_fraction", rewritten))
    if (rewritten := _with_left_right(gold)) is not None:
        candidates.append(("left_right", rewritten))
    items, terms = split_top_level(gold), _signed_terms(gold)
    if len(items) > 1:  # a list of answers: its order is free (`58,500` is a number, not a list)
        if not re.search(r"[=<>;$]|\\text", gold) and len(set(items)) > 1 and not _THOUSANDS.fullmatch(gold):
            reordered = items[:]
            while reordered == items:
                rng.shuffle(reordered)
            candidates.append(("reordered", ",".join(reordered)))
    elif terms is not None and len(terms) > 1:
        shuffled = terms[:]
        while shuffled == terms:
            rng.shuffle(shuffled)
        candidates.append(("reordered", _join_terms(shuffled)))
    return [(edit, answer) for edit, answer in candidates if answer != gold]


# ---------------------------------------------------------------------------------------------------------------
# Golds built from numeric ones: units, clock times, function equations (rare in the benchmarks)
# ---------------------------------------------------------------------------------------------------------------

_UNIT_PAIRS = [("\\text{ cm}", "\\text{ m}"), ("\\text{ km}", "\\text{ m}"), ("\\text{ hours}", "\\text{ minutes}"),
               ("\\text{ days}", "\\text{ weeks}"), ("\\text{ inches}", "\\text{ feet}"), ("\\text{ dollars}", "\\text{ cents}"),
               ("\\text{ kg}", "\\text{ g}"), ("\\text{ cm}^2", "\\text{ cm}"), (" \\mbox{ miles}", " \\mbox{ km}"),
               ("\\text{ seconds}", "\\text{ minutes}"), ("^\\circ", "\\text{ radians}"), (" m/s", " km/h"),
               ("\\text{ degrees}", "\\text{ radians}"), (" square units", " units")]  # fmt: skip


def unit_cases(numbers: list[str], rng: random.Random) -> list[Case]:
    cases = []
    for number in numbers:
        unit, other = rng.choice(_UNIT_PAIRS)
        if rng.random() < 0.5:
            unit, other = other, unit
        cases.append(Case("built", number + unit, number + other, "unit"))
    return cases


def clock_cases(rng: random.Random, count: int) -> list[Case]:
    """A time against the same digits in the other half of the day (a plain time reads as a 24-hour time)."""
    cases = []
    for _ in range(count):
        hour, minute = rng.randint(1, 11), rng.randint(0, 59)
        am, pm = rng.choice([("a.m.", "p.m."), ("AM", "PM"), ("\\text{ a.m.}", "\\text{ p.m.}"), ("am", "pm")])
        time = f"{hour}:{minute:02d}"
        gold, answer = rng.choice([(f"{time} {am}", f"{time} {pm}"), (f"{time} {pm}", f"{time} {am}"),
                                   (time, f"{time} {pm}"), (f"{hour + 12}:{minute:02d}", f"{time} {am}")])  # fmt: skip
        cases.append(Case("built", gold, answer, "am_pm"))
    return cases


def variable_cases(rng: random.Random, count: int) -> list[Case]:
    """`a + b t` against the number a + b, and against `a + b s`: the letters math_verify strips as units."""
    cases = []
    for _ in range(count):
        a, b = rng.randint(1, 9), rng.randint(2, 9)
        name, other = rng.sample(["t", "s", "m", "g", "h", "x", "n"], 2)
        gold = rng.choice([f"{a}+{b}{name}", f"{b}{name}+{a}", f"{a} + {b} {name}"])
        cases.append(Case("built", gold, rng.choice([str(a + b), gold.replace(name, other)]), "variable"))
    return cases


def bound_cases(numbers: list[Fraction], rng: random.Random, count: int) -> list[Case]:
    """An interval with one end opened or closed, an inequality made strict or not."""
    cases = []
    for _ in range(count):
        low, high = sorted(rng.sample(numbers, 2))
        low_text, high_text = (str(v) if v.denominator == 1 else f"\\frac{{{v.numerator}}}{{{v.denominator}}}" for v in (low, high))
        if rng.random() < 0.6:
            opening, closing = rng.choice("(["), rng.choice(")]")
            flip = {"(": "[", "[": "(", ")": "]", "]": ")"}
            gold = f"{opening}{low_text}, {high_text}{closing}"
            if rng.random() < 0.5:
                answer = f"{flip[opening]}{low_text}, {high_text}{closing}"
            else:
                answer = f"{opening}{low_text}, {high_text}{flip[closing]}"
        else:
            relation, flipped = rng.choice([("<", "\\le"), ("\\le", "<"), (">", "\\ge"), ("\\ge", ">")])
            gold, answer = f"x {relation} {low_text}", f"x {flipped} {low_text}"
        cases.append(Case("built", gold, answer, "bound"))
    return cases


def function_equation_cases(values: list[str], rng: random.Random) -> list[Case]:
    """`\\sin(x) = v` against `\\cos(x) = v` for 0 < |v| < 1 (never the same solutions), and the like."""
    cases = []
    for value in values:
        name = rng.choice(["sin", "cos", "tan", "cot"])
        variable = rng.choice(["x", "t", "\\theta"])
        argument = rng.choice([f"({variable})", f" {variable}", f"\\left({variable}\\right)"])
        gold = f"\\{name}{argument}={value}"
        cases.append(Case("built", gold, f"\\{_TRIG_SWAPS[name]}{argument}={value}", "function"))
    return cases


def mixed_number_cases(rng: random.Random, count: int) -> list[Case]:
    """`2 3/4` or `2\\frac{3}{4}` (11/4) against the same digits glued (`23/4`) or another whole or numerator."""
    cases = []
    for _ in range(count):
        den = rng.randint(2, 9)
        num, whole = rng.randint(1, den - 1), rng.randint(1, 9)
        gold = rng.choice([f"{whole} {num}/{den}", f"{whole}\\frac{{{num}}}{{{den}}}", f"{whole}\\tfrac{{{num}}}{{{den}}}"])
        answer = rng.choice([f"{whole}{num}/{den}", f"{whole + 1} {num}/{den}", f"\\frac{{{whole * den + num + 1}}}{{{den}}}"])
        cases.append(Case("built", gold, answer, "digit"))  # 10w+n, (w+1)d+n and wd+n+1 are never wd+n
    return cases


_ANGLES = (0, 30, 45, 60, 90, 120, 135, 150, 180, 210, 225, 240, 270, 300, 315, 330)


def trig_degree_cases(rng: random.Random, count: int) -> list[Case]:
    """`\\sin 30^\\circ` against the value at another angle, and against `\\sin 30` (radians): values by sympy."""
    import sympy

    cases = []
    while len(cases) < count:
        name, (angle, other) = rng.choice(["sin", "cos", "tan"]), rng.sample(_ANGLES, 2)
        function = getattr(sympy, name)
        value, other_value = function(sympy.pi * angle / 180), function(sympy.pi * other / 180)
        if value.has(sympy.zoo) or other_value.has(sympy.zoo):
            continue
        gold = rng.choice([f"\\{name} {angle}^\\circ", f"\\{name}({angle}^{{\\circ}})", f"\\{name} {angle}°"])
        if rng.random() < 0.5 and abs(complex(sympy.N(value - other_value))) > 1e-9:
            cases.append(Case("built", gold, sympy.latex(other_value), "digit"))
        elif abs(complex(sympy.N(value - function(angle)))) > 1e-9:
            cases.append(Case("built", gold, f"\\{name} {angle}", "unit"))  # the degree sign dropped: radians
    return cases


def decimal_exponent_cases(rng: random.Random, count: int) -> list[Case]:
    """`x^{p/q}` against a decimal exponent: the same value (`x^{0.75}`) or a rounded one (`x^{0.33}` for 1/3)."""
    cases = []
    for _ in range(count):
        den = rng.choice([2, 3, 4, 5, 6, 7, 8])
        num = rng.choice([n for n in range(1, 2 * den) if math.gcd(n, den) == 1])
        exponent, base = Fraction(num, den), rng.choice(["x", "t", "e", "10"])
        gold = rng.choice([f"{base}^{{{num}/{den}}}", f"{base}^{{\\frac{{{num}}}{{{den}}}}}"])
        written = _decimal_or_fraction(f"\\frac{{{num}}}{{{den}}}")
        if written is not None:
            cases.append(Case("built", gold, f"{base}^{{{written}}}", "decimal_fraction"))
        else:
            rounded = f"{float(exponent):.2f}"
            if Fraction(rounded) != exponent:
                cases.append(Case("built", gold, f"{base}^{{{rounded}}}", "exponent"))
    return cases


# ---------------------------------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------------------------------


def build_cases(shared: Path, seed: int = 0, other_golds: int = 60, built: int = 15) -> list[Case]:
    """Wrong answers (each shown to differ from its gold) and equivalent rewrites, seeded, without duplicates.

    Every gold that is a plain number gets several edits (cheap: the verifier's fast path decides most). Golds of
    other kinds (expressions, lists, intervals) cost a sympy reading here and a math_verify call in the verifier
    each: `other_golds` of them are drawn (0: all), one edit each, and `built` golds of each such built family.
    """
    rng = random.Random(seed)
    golds = load_golds(shared)
    cases, seen, edits = [], set(), Counter()

    def add(case: Case, checked: bool = True):
        key = (case.gold, case.answer)
        if key in seen or case.answer == case.gold:
            return
        if checked:
            same = same_value(case.gold, case.answer)
            if same is None or same != case.equivalent:  # unreadable, or the edit did not do what it says
                return
        seen.add(key)
        cases.append(case)
        edits[case.edit] += 1

    numbers = [(source, gold) for source, gold in golds if number_value(gold) is not None]
    others = [(source, gold) for source, gold in golds if number_value(gold) is None]
    if other_golds:
        others = rng.sample(others, min(other_golds, len(others)))
    for source, gold in numbers + others:
        candidates = wrong_answers(gold, rng, digits=6)
        if number_value(gold) is None and candidates:  # one edit, of the kind made least so far
            fewest = min(edits[edit] for edit, _ in candidates)
            candidates = [rng.choice([c for c in candidates if edits[c[0]] == fewest])]
        for edit, answer in candidates:
            add(Case(source, gold, answer, edit))
        for edit, answer in equivalent_answers(gold, rng):
            add(Case(source, gold, answer, edit), checked=edit == "reordered")  # the others only change how it looks

    plain_numbers = sorted({g for _, g in numbers if not _SCIENTIFIC.fullmatch(g)})
    for case in unit_cases(plain_numbers, rng) + unit_cases(plain_numbers, rng) + clock_cases(rng, 600):
        add(case, checked=False)  # different by construction: another unit, the other half of the day
    fractions = sorted({g for g in plain_numbers if 0 < abs(number_value(g)) < 1})
    values = sorted({number_value(g) for g in plain_numbers if abs(number_value(g)) < 1000})
    built_cases = (function_equation_cases(rng.sample(fractions, min(built, len(fractions))), rng)
                   + variable_cases(rng, built) + bound_cases(values, rng, built) + mixed_number_cases(rng, built)
                   + trig_degree_cases(rng, built) + decimal_exponent_cases(rng, built))  # fmt: skip
    for case in built_cases:
        add(case, checked=False)  # decided by construction: see each family
    return cases


def completion(answer: str) -> str:
    return f"Putting it all together, the final answer is $\\boxed{{{answer}}}$."


def score_cases(cases: list[Case]) -> list[float]:
    import rewards

    return rewards.verify_batch([completion(c.answer) for c in cases], [c.gold for c in cases])


def summarize(cases: list[Case], scores: list[float]) -> dict:
    """Counts of wrong answers and rewrites, false positives (wrong, scored 1) and false negatives, by edit."""
    by_edit = {edit: Counter() for edit in WRONG_EDITS + EQUIVALENT_EDITS}
    for case, score in zip(cases, scores, strict=True):
        counts = by_edit[case.edit]
        counts["cases"] += 1
        counts["scored_1"] += score == 1.0
    wrong = sum(by_edit[e]["cases"] for e in WRONG_EDITS)
    equivalent = sum(by_edit[e]["cases"] for e in EQUIVALENT_EDITS)
    false_negatives = equivalent - sum(by_edit[e]["scored_1"] for e in EQUIVALENT_EDITS)
    return {
        "wrong": wrong,
        "false_positives": sum(by_edit[e]["scored_1"] for e in WRONG_EDITS),
        "equivalent": equivalent,
        "false_negatives": false_negatives,
        "recall": 1 - false_negatives / max(equivalent, 1),
        "by_edit": {edit: dict(counts) for edit, counts in by_edit.items()},
        "false_positive_cases": [c for c, s in zip(cases, scores) if s == 1.0 and not c.equivalent],
        "false_negative_cases": [c for c, s in zip(cases, scores) if s != 1.0 and c.equivalent],
    }


def run(shared: Path, seed: int = 0, other_golds: int = 60, built: int = 15) -> dict:
    cases = build_cases(shared, seed, other_golds, built)
    return summarize(cases, score_cases(cases))


def print_summary(summary: dict, show: int) -> None:
    print(f"wrong answers: {summary['wrong']}, scored 1 (false positives): {summary['false_positives']}")
    print(f"equivalent rewrites: {summary['equivalent']}, scored 0 (false negatives): {summary['false_negatives']} "
          f"(recall {summary['recall']:.2%})")
    print(f"{'edit':<18}{'cases':>7}{'scored 1':>10}")
    for edit, counts in summary["by_edit"].items():
        print(f"{edit:<18}{counts.get('cases', 0):>7}{counts.get('scored_1', 0):>10}")
    for case in summary["false_positive_cases"]:
        print(f"  false positive [{case.edit}] gold {case.gold!r} answer {case.answer!r}")
    for case in summary["false_negative_cases"][:show]:
        print(f"  false negative [{case.edit}] gold {case.gold!r} answer {case.answer!r}")


def main(args: MutationArguments) -> dict:
    shared = Path(args.shared)
    if not (shared / "benchmarks").is_dir():
        print(f"error: shared data not found at {shared} (set --shared or POLARIS_SHARED)", file=sys.stderr)
        raise SystemExit(2)
    sys.path.insert(0, str(REPO_ROOT))
    summary = run(shared, args.seed, args.other_golds, args.built)
    print_summary(summary, args.show)
    return summary


if __name__ == "__main__":
    from transformers import HfArgumentParser

    main(HfArgumentParser(MutationArguments).parse_args_into_dataclasses()[0])
