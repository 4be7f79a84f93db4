"""Math answer verification and TRL reward functions for the POLARIS recipe.

The reward is the only teacher in RL for reasoning, so the verifier must be:

* correct: a right answer in another form (`\\dfrac{1}{2}`, `0.5`, `x = 3`, `025`) scores 1, a wrong one 0;
* safe: nothing in a completion is ever executed, and an unparseable gold answer never scores 1;
* bounded: every completion gets `TIMEOUT_S` seconds of CPU time (env `POLARIS_REWARD_TIMEOUT`, default 2), so
  that it scores the same on a busy machine as on a quiet one, and at most `WALL_PER_CPU` times that in wall
  time, from the main thread, another thread or an asyncio loop alike;
* fast: a normalised-string / exact-rational path decides most completions in microseconds; only the rest
  go to math_verify, in a pebble ProcessPool (one worker per core, at most 8, forked from the verifier's own
  fork server with math_verify preloaded) where a worker that overruns its deadline ends or is killed and replaced;
* callable from anywhere: a script with or without an `if __name__ == "__main__":` guard, one on standard input,
  `python -c`, a notebook, a thread or a forked child. Workers never import the caller's `__main__`, so its code
  never runs twice; workers that cannot start raise `RewardWorkerError` instead of scoring hard answers 0.

Usage with GRPOTrainer (weights come from `GRPOConfig.reward_weights`, in the same order as the names):

    from rewards import get_reward_funcs
    trainer = GRPOTrainer(..., reward_funcs=get_reward_funcs(["accuracy", "format"]))

The dataset needs an `answer` column (or `solution` / `ground_truth` / verl's `reward_model`). The accuracy
rewards report `rewards/timeouts`, `rewards/errors`, `rewards/no_answer` and `rewards/rejected` for each batch
through TRL's `log_metric` callback, and also add them to the module-level counters `STATS`
(`STATS.pop()` reads and resets them, e.g. once per logging step).

Public API: `verify`, `verify_batch`, `accuracy_reward`, `think_accuracy_reward`, `format_reward`,
`REWARD_FUNCS`, `get_reward_funcs`, `STATS` / `RewardStats`, `start_workers`, `shutdown_workers`,
`RewardWorkerError`.
"""

import importlib
import io
import itertools
import logging
import math
import numbers
import os
import re
import threading
import time
from fractions import Fraction
from functools import lru_cache
from multiprocessing import context as mp_context
from multiprocessing import forkserver, popen_forkserver, reduction, spawn
from multiprocessing import util as mp_util

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Settings: module attributes or environment variables (pool size and memory apply when the pool starts)
# ---------------------------------------------------------------------------------------------------------------

TIMEOUT_S = float(os.environ.get("POLARIS_REWARD_TIMEOUT", "2.0"))  # CPU seconds a worker may spend per completion
# Wall-clock backstop for a worker that gets no CPU at all (0: WALL_PER_CPU times the CPU deadline).
WALL_TIMEOUT_S = float(os.environ.get("POLARIS_REWARD_WALL_TIMEOUT", "0"))
WALL_PER_CPU = 8.0  # a job may wait this long, in multiples of its CPU deadline, on a busy machine
CPU_KILL_GRACE_S = 0.25  # past the CPU deadline, a job stuck in C code ends its worker (SIGPROF)
NUM_WORKERS = int(os.environ.get("POLARIS_REWARD_WORKERS", "0"))  # 0 = one per CPU core, at most 8
WORKER_MEMORY_MB = int(os.environ.get("POLARIS_REWARD_MEMORY_MB", "2048"))  # address space a worker may add
WORKER_STARTUP_S = 120.0  # a worker that cannot import math_verify in this time is broken, not slow

MAX_ANSWER_CHARS = 1000  # longest gold in the POLARIS eval sets is ~200 chars
MAX_NESTING = 32  # braces/parentheses; deeper is never a real answer and makes sympy recurse
MAX_EXPONENT = 10_000  # 2^{2023} is a real answer, (x+1)^{100000} is an attack on expand()
MAX_FACTORIAL = 10_000
MAX_JOINED_BOXES = 6  # "\boxed{1}, \boxed{2}" is read as one answer {1, 2}; math_verify allows 6 too

THINK_CLOSE = "</think>"
THINK_OPEN = "<think>"


# ---------------------------------------------------------------------------------------------------------------
# Counters the trainer can read (rewards cannot return metrics in TRL 1.16)
# ---------------------------------------------------------------------------------------------------------------


class RewardStats:
    """Thread-safe counters of how completions were judged.

    judged: completions that had a gold answer; fast_path: decided without math_verify; timeouts: killed at the
    deadline; errors: math_verify or a worker failed; no_answer: no closed box (or no `</think>` when required);
    rejected: the boxed answer failed the size/exponent/nesting pre-checks. All of these score 0 except fast-path
    and math_verify verdicts.
    """

    FIELDS = ("judged", "fast_path", "timeouts", "errors", "no_answer", "rejected")

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.FIELDS, 0)

    def add(self, counts: dict) -> None:
        with self._lock:
            for key, value in counts.items():
                self._counts[key] += value

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self._counts)

    def reset(self) -> None:
        with self._lock:
            self._counts = dict.fromkeys(self.FIELDS, 0)

    def pop(self) -> dict:
        """Return the counts and reset them in one step (nothing counted in between is lost)."""
        with self._lock:
            counts, self._counts = self._counts, dict.fromkeys(self.FIELDS, 0)
            return counts

    def __getattr__(self, name):
        if name in RewardStats.FIELDS:
            return self.snapshot()[name]
        raise AttributeError(name)


STATS = RewardStats()


# ---------------------------------------------------------------------------------------------------------------
# Completion text
# ---------------------------------------------------------------------------------------------------------------

_REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")


def _message_text(message) -> str:
    content = message.get("content") or ""
    if isinstance(content, list):  # multimodal-style content parts
        content = "".join(part.get("text") or "" for part in content if isinstance(part, dict))
    if not isinstance(content, str):
        content = str(content)
    # Chat parsers may split the reasoning off the content; put the tags back so require_think still works.
    for key in _REASONING_KEYS:
        reasoning = message.get(key)
        if isinstance(reasoning, str) and reasoning:
            return f"{THINK_OPEN}{reasoning}{THINK_CLOSE}{content}"
    return content


def completion_text(completion) -> str:
    """Text of a completion, plain (`str`) or conversational (`[{"role": "assistant", "content": ...}, ...]`).

    Only assistant messages count: a tool result that prints `\\boxed{...}` is not the model's answer.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if not isinstance(completion, (list, tuple)):
        return ""
    parts = [
        _message_text(m) for m in completion if isinstance(m, dict) and m.get("role", "assistant") == "assistant"
    ]
    return "\n".join(parts)


def _answer_region(text: str, require_think: bool) -> str | None:
    """The part of the completion that may hold the answer (None: the reasoning never finished)."""
    if not require_think:
        return text
    head, sep, tail = text.partition(THINK_CLOSE)
    return tail if sep else None


# ---------------------------------------------------------------------------------------------------------------
# Extracting the last \boxed{...} (linear time, no recursion: a completion can be 1 MB or 10,000 braces deep)
# ---------------------------------------------------------------------------------------------------------------

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_BRACE_TOKENS = re.compile(r"\\.|[{}]", re.DOTALL)  # an escaped char (\{, \}, \\) never opens or closes a group
_BARE_BOX_ARG = re.compile(r"[^\s$]{1,100}")  # `\boxed 5`, as some models write it
# Text allowed between boxes that together form one answer: "\boxed{1}, \boxed{2}", "$\boxed{a}$ and $\boxed{b}$",
# "\boxed{(3,3)} \text{ for part (a) and } \boxed{(1,1)}", "y_1 = \boxed{..} \) and \( y_2 = \boxed{..}".
_GAP_NOISE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\s*\{|\\q?quad|\\[,;:!\[\]()]|[${}]")
_GAP_CONNECTOR = re.compile(r"(?:\s|[,;&]|and\b|or\b|for\b|part\b|\(\w\)|[A-Za-z](?:_\w{1,3})?\s*=)*")
_MAX_GAP_CHARS = 60

NO_ANSWER, REJECTED = "no_answer", "rejected"


def _read_box(text: str, start: int, command: str):
    """Content and end of the box whose command starts at `start`; NO_ANSWER if unclosed, REJECTED if huge."""
    i = start + len(command)
    n = len(text)
    spaced = i < n and text[i] in " \t"
    while i < n and text[i] in " \t":
        i += 1
    if i < n and text[i] == "{":
        limit = min(n, i + MAX_ANSWER_CHARS + 2)
        depth = 0
        for match in _BRACE_TOKENS.finditer(text, i, limit):
            token = match.group()
            if token == "{":
                depth += 1
            elif token == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : match.start()], match.end()
        return REJECTED if limit < n else NO_ANSWER
    if spaced:
        match = _BARE_BOX_ARG.match(text, i)
        if match:
            return match.group(), match.end()
    return NO_ANSWER


class _BoxFinder:
    """Walks box commands from the end of the text; each character is searched at most once per command."""

    def __init__(self, text: str):
        self.text = text
        self.next = {cmd: text.rfind(cmd) for cmd in _BOX_COMMANDS}

    def pop(self):
        command = max(self.next, key=self.next.get)
        start = self.next[command]
        if start < 0:
            return None, None
        self.next[command] = self.text.rfind(command, 0, start)
        return start, command


def _is_connector(gap: str) -> bool:
    if len(gap) > _MAX_GAP_CHARS or "\n\n" in gap:
        return False
    return _GAP_CONNECTOR.fullmatch(_GAP_NOISE.sub(" ", gap)) is not None


def extract_answer(text: str):
    """(answer, status) for the last box in `text`; status is "ok", NO_ANSWER or REJECTED ("rejected").

    Boxes right before the last one, joined only by a connector such as ", " or " and ", belong to the same
    answer ("the solutions are \\boxed{1} and \\boxed{2}") and are returned joined by ", ".
    """
    finder = _BoxFinder(text)
    start, command = finder.pop()
    # `\fboxsep` or `\boxedanswer` are other commands: skip a few of those, not an unbounded number.
    for _ in range(8):
        if start is None or text[start + len(command) : start + len(command) + 1] in ("{", " ", "\t", ""):
            break
        start, command = finder.pop()
    if start is None:
        return None, NO_ANSWER
    box = _read_box(text, start, command)
    if not isinstance(box, tuple):
        return None, box
    parts = [box[0]]
    while len(parts) < MAX_JOINED_BOXES:
        prev_start, prev_command = finder.pop()
        if prev_start is None or start - prev_start > MAX_ANSWER_CHARS + _MAX_GAP_CHARS:
            break
        window = text[prev_start:start]  # the earlier box must close before the later one starts
        prev = _read_box(window, 0, prev_command)
        if not isinstance(prev, tuple) or not _is_connector(window[prev[1] :]):
            break
        parts.insert(0, prev[0])
        start = prev_start
    answer = ", ".join(p.strip() for p in parts)
    if not answer.strip():
        return None, NO_ANSWER
    return answer, "ok"


# ---------------------------------------------------------------------------------------------------------------
# Pre-checks: cheap, in the parent, so that pathological answers never reach sympy
# ---------------------------------------------------------------------------------------------------------------

_HUGE = "\ue000"  # stands for a folded integer power too large to write out
_INT_POWER = re.compile(r"(\d+)\s*\^\s*(?:\{\s*(\d+)\s*\}|(\d))")
_HUGE_IN_EXPONENT = re.compile(r"\^\s*(?:\{[^{}]*" + _HUGE + "|" + _HUGE + ")")
_EXPONENT_LITERAL = re.compile(r"\^\s*\{?\s*(\d+)")
_FACTORIAL = re.compile(r"(\d+)\s*!")


def _max_nesting(s: str) -> int:
    depth = deepest = 0
    for ch in s:
        if ch in "{(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "})":
            depth = max(depth - 1, 0)
    return deepest


def _has_huge_power(s: str) -> bool:
    """Fold numeric power towers from the inside (9^{9^{9}} -> 9^{387420489}) and reject a huge exponent."""
    for _ in range(s.count("^") + 1):
        if any(int(m.group(1)) > MAX_EXPONENT for m in _EXPONENT_LITERAL.finditer(s)):
            return True
        if _HUGE_IN_EXPONENT.search(s):
            return True
        match = _INT_POWER.search(s)
        if match is None:
            return False
        base, exponent = int(match.group(1)), int(match.group(2) or match.group(3))
        digits = exponent * math.log10(base) if base > 1 else 0
        folded = str(base**exponent) if digits <= 6 else _HUGE
        s = s[: match.start()] + folded + s[match.end() :]
    return False


def pathological_reason(answer: str) -> str | None:
    """Why an extracted answer must not reach sympy, or None if it is safe to verify."""
    if len(answer) > MAX_ANSWER_CHARS:
        return "too long"
    if "__" in answer:  # dunder names only appear in code, never in an answer
        return "code-like"
    if answer.count("^") > 64:
        return "too many powers"
    if _max_nesting(answer) > MAX_NESTING:
        return "too deeply nested"
    if _has_huge_power(answer):
        return "huge power"
    if any(int(m.group(1)) > MAX_FACTORIAL for m in _FACTORIAL.finditer(answer)):
        return "huge factorial"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Gold answers and the fast path
# ---------------------------------------------------------------------------------------------------------------


def gold_strings(gold) -> list[str]:
    """Acceptable answers as clean strings: str, int, float (142.0 -> "142"), or a list / numpy array of those."""
    if gold is None:
        return []
    if isinstance(gold, bytes):
        gold = gold.decode("utf-8", "replace")
    if isinstance(gold, str):
        text = gold.strip()
        if text.endswith("$."):  # "$(-\infty, 0) \cup \{1\}$." (OlympiadBench)
            text = text[:-1]
        while len(text) >= 2 and text[0] == "$" and text[-1] == "$":  # $x$ and $$x$$
            text = text[1:-1].strip()
        return [text] if text else []
    if isinstance(gold, bool):
        return []
    if isinstance(gold, numbers.Integral):
        return [str(int(gold))]
    if isinstance(gold, numbers.Real):
        value = float(gold)
        if not math.isfinite(value):
            return []
        return [str(int(value))] if value.is_integer() else [repr(value)]
    if hasattr(gold, "tolist"):  # numpy arrays and scalars
        return gold_strings(gold.tolist())
    if isinstance(gold, (list, tuple)):
        out = []
        for item in gold:
            out += [g for g in gold_strings(item) if g not in out]
        return out
    return gold_strings(str(gold))


_CANON_NOISE = re.compile(r"\\left(?![a-zA-Z])|\\right(?![a-zA-Z])|\\displaystyle|\\[,;:! ]|\\q?quad|\$|\s+")
_CANON_TEXT = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mbox)\{([^{}]*)\}")
_CANON_SCRIPT = re.compile(r"([\^_])\{(\w)\}")
_LEADING_ASSIGNMENT = re.compile(r"[A-Za-z](?:_\w|_\{\w+\})?=(?!=)")
# Plain rationals in canonical form: 12, -0.5, .5, \frac{3}{4}, \frac{-3}{4}, \frac34, 3/4, and scientific notation
# 3.2\times10^{4}, 3.2\cdot10^{-3}, 3.2e4, 10^{-3} (canonical() has removed the spaces and the braces of one-digit scripts).
_RATIONAL = re.compile(
    r"(?P<sign>[-+]?)(?:(?P<mant>\d+(?:\.\d*)?|\.\d+)(?:(?:\\times|\\cdot)10\^(?:\{(?P<exb>[-+]?\d{1,3})\}|(?P<exd>\d))"
    r"|[eE](?P<exe>[-+]?\d{1,3}))|(?P<power>10\^(?:\{(?P<pexb>[-+]?\d{1,3})\}|(?P<pexd>\d)))|(?P<dec>\d+(?:\.\d*)?|\.\d+)|\\frac\{(?P<fn>[-+]?\d+)\}\{(?P<fd>[-+]?\d+)\}"
    r"|\\frac(?P<sn>\d)(?P<sd>\d)|(?P<qn>\d+)/(?P<qd>\d+))"
)
EXACT, DECIMAL, SCIENTIFIC = "exact", "decimal", "scientific"
# Two numbers further apart than this, relative to their size, differ whatever math_verify's rounding says.
_RELATIVE_GAP = Fraction(1, 10**5)


@lru_cache(maxsize=4096)
def canonical(s: str) -> str:
    """Presentation-free form of a LaTeX answer: no `$`, spacing, `\\left`, `\\dfrac`, `\\text{}` wrappers."""
    s = _CANON_NOISE.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _CANON_TEXT.sub(r"\1", s)
    s = _CANON_SCRIPT.sub(r"\1\2", s)
    return s.rstrip(".")


def _as_rational(s: str) -> tuple[Fraction, str] | None:
    """(value, kind) for a plain number; kind is EXACT, DECIMAL (math_verify compares it rounded) or SCIENTIFIC."""
    match = _RATIONAL.fullmatch(s)
    if match is None or len(s) > 100:
        return None
    groups = match.groupdict()
    try:
        if groups["mant"] is not None or groups["power"] is not None:
            mantissa = Fraction(groups["mant"] or 1)
            exponent = int(groups["exb"] or groups["exd"] or groups["exe"] or groups["pexb"] or groups["pexd"])
            value, kind = mantissa * Fraction(10) ** exponent, SCIENTIFIC
        elif groups["dec"] is not None:
            value, kind = Fraction(groups["dec"]), (DECIMAL if "." in groups["dec"] else EXACT)
        else:
            num = groups["fn"] or groups["sn"] or groups["qn"]
            den = groups["fd"] or groups["sd"] or groups["qd"]
            value, kind = Fraction(int(num), int(den)), EXACT
    except (ValueError, ZeroDivisionError):
        return None
    return (-value if groups["sign"] == "-" else value), kind


# ---------------------------------------------------------------------------------------------------------------
# Answer classes math_verify misreads, rewritten (for the fast path and the workers alike) or decided outright
# ---------------------------------------------------------------------------------------------------------------

_TEXT_WRAPPER = re.compile(r"\\(?:text|textrm|textnormal|mathrm|mbox)\s*\{([^{}]*)\}")
_LATEX_SPACE = re.compile(r"\\[,;:! ]|~|\$")


def _plain(s: str) -> str:
    """`\\text{}` wrappers opened, LaTeX spacing as spaces, runs of spaces as one."""
    return " ".join(_LATEX_SPACE.sub(" ", _TEXT_WRAPPER.sub(r" \1 ", s)).split())


# Clock times: 14:05, 14:05:00, 2:05 PM, 2:05 p.m.
_CLOCK = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2}))?(?:\s*(?P<half>[aApP])\.?\s*[mM]\.?)?")


def _clock(s: str):
    """(seconds after midnight, has AM/PM, hour as written) for a clock time, else None."""
    match = _CLOCK.fullmatch(_plain(s))
    if match is None:
        return None
    hour, minute, second = int(match[1]), int(match[2]), int(match[3] or 0)
    half = (match["half"] or "").lower()
    if minute > 59 or second > 59 or hour > (12 if half else 23) or (half and hour == 0):
        return None
    hour24 = hour % 12 + 12 * (half == "p") if half else hour
    return hour24 * 3600 + minute * 60 + second, bool(half), hour, match[3] is not None


def _clock_verdict(gold: str, answer: str) -> bool | None:
    """Clock times compared as times (math_verify reads 14:05 as the ratio 14/5).

    A time without AM/PM is a 24-hour time: `9:30` is `9:30 a.m.` and not `9:30 p.m.`, `14:05` is `2:05 PM`. A gold
    that can only be a time (seconds, AM/PM or an hour past 12) against an answer that is not a time is a miss;
    `1:20` may be a ratio and goes on as before.
    """
    g = _clock(gold)
    if g is None:
        return None
    a = _clock(answer)
    if a is None:
        return False if (g[1] or g[3] or g[2] > 12) else None
    return g[0] == a[0]


# Equations naming the same function differently: `g(t) = 3t+1` against `y = 3t+1`.
# The name is a letter or a Greek letter: `\sin(x) = ...` is an equation in x, not a function named \sin.
_GREEK = ("alpha|beta|gamma|delta|epsilon|varepsilon|zeta|eta|theta|vartheta|iota|kappa|lambda|mu|nu|xi|rho|sigma|tau|"
          "upsilon|phi|varphi|chi|psi|omega|Gamma|Delta|Theta|Lambda|Xi|Sigma|Upsilon|Phi|Psi|Omega")
_NAMED_EQUATION = re.compile(
    rf"\s*(?P<name>[A-Za-z]|\\(?:{_GREEK})(?![A-Za-z]))(?:_\{{?\w+\}}?)?\s*"
    r"(?:(?:\\left)?\(\s*(?P<arg>[A-Za-z])\s*(?:\\right)?\))?\s*=(?P<rhs>[^=<>,;]+)"
)


def _same_function_names(gold: str, answer: str) -> tuple[str, str]:
    """Right-hand sides only, when both sides define one function and at least one names its argument.

    Two bare names (`x = 2` against `y = 2`) are left to math_verify: they may name different unknowns.
    `f(x)` against `f(t)` too: the variable differs, so the right-hand sides differ.
    """
    g, a = _NAMED_EQUATION.fullmatch(gold), _NAMED_EQUATION.fullmatch(answer)
    if g is None or a is None or not (g["arg"] or a["arg"]):
        return gold, answer
    if g["arg"] and a["arg"] and g["arg"] != a["arg"]:
        return gold, answer
    if (not g["arg"] and g["name"] == a["arg"]) or (not a["arg"] and a["name"] == g["arg"]):
        return gold, answer  # `t = 3t+1` is an equation in t, not a function of it
    return g["rhs"].strip(), a["rhs"].strip()


# Units written as plain text: `7 days`, `12 m^2`, `40 km/h`, `3 square units` (and `\text{}` ones in answers).
_UNIT_ABBREVIATIONS = frozenset(
    "m cm mm km s ms ns g kg mg h hr hrs min mL ml in ft yd mi lb lbs oz mph kph Hz kHz MHz GHz kW kWh eV keV MeV "
    "nm um mol Pa kPa atm K sq cu".split()
)
_NOT_UNITS = frozenset(
    "and or mod pmod sin cos tan cot sec csc log ln exp max min gcd lcm lim det arg inf sup not for all any are the "
    "with where when if then no none yes true false undefined".split()
)
_UNIT_WORD = r"[A-Za-z]+(?:\^\{?[23]\}?)?"
_NUMBER_AND_UNIT = re.compile(
    rf"(?P<num>.*?[\d}}.])\s*(?P<unit>{_UNIT_WORD}(?:(?:\s+|\s*/\s*){_UNIT_WORD}){{0,2}})"
)


def _unit_key(unit: str) -> str:
    words = []
    for word in re.findall(r"[A-Za-z]+|\^\{?[23]\}?|/", unit):
        if len(word) >= 3 and word.isalpha():
            word = word.lower()
            word = word[:-1] if len(word) >= 4 and word.endswith("s") else word  # days = day
        words.append(word.replace("{", "").replace("}", ""))
    return " ".join(words)


# A unit in `\text{}` after any expression (`5\sqrt{2}\text{ cm}`): the wrapper says it is words, not variables.
_TEXT_UNIT_TAIL = re.compile(
    r"(?P<expr>.*?[^\s\\])\s*\\(?:text|textrm|textnormal|mathrm|mbox)\s*\{\s*(?P<unit>[A-Za-z][A-Za-z ]*?)\s*\}"
    r"(?P<power>\s*\^\s*(?:\{\s*[23]\s*\}|[23]))?\s*"
)
_ASSIGNED_NAME = re.compile(r"^\s*[A-Za-z](?:_\{?\w+\}?)?\s*=\s*")
_TEXT_WRAPPER_NAME = re.compile(r"\\(?:text|textrm|textnormal|mathrm|mbox)(?![A-Za-z])")
_DEGREE_SIGN = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree(?![A-Za-z])")


def _is_unit_word(word: str) -> bool:
    return word in _UNIT_ABBREVIATIONS or (len(word) >= 3 and word.lower() not in _NOT_UNITS)


def _split_unit(s: str, plain_needs_space: bool = True) -> tuple[str, str | None]:
    """(number part, unit) when `s` is a number followed by a unit, or any expression followed by a `\\text{}` unit,
    else (s, None).

    A unit is a known abbreviation or a word of three letters or more that is no mathematical word, so `3 e` and
    `5 x` stay products of variables while the `e` in `7 weeks` is never read as Euler's number. The number part
    may hold LaTeX (`\\frac{1}{2}`, `3 \\times 10^{8}`) but no bare letter.
    """
    if len(s) > 200:
        return s, None
    text = _plain(s).replace(" ^", "^")
    match = _NUMBER_AND_UNIT.fullmatch(text)
    if match is not None:
        number, unit = match["num"].strip(), match["unit"]
        value = _ASSIGNED_NAME.sub("", number, count=1)  # `x = 5 cm`: the fast path drops the `x =` later
        if (not re.search(r"[A-Za-z]", re.sub(r"\\[A-Za-z]+", "", value)) and re.search(r"\d", value)
                and not re.search(r"[\w})]\s*[-+=<>,]", value)  # `5 + 2s` is a sum in s, not 7 seconds
                and all(_is_unit_word(w) for w in re.findall(r"[A-Za-z]+", unit))):
            return number, _unit_key(unit)
    tail = _TEXT_UNIT_TAIL.fullmatch(s)
    if tail is not None and not _TEXT_WRAPPER_NAME.search(tail["expr"]) and all(map(_is_unit_word, tail["unit"].split())):
        return tail["expr"].strip(), _unit_key(tail["unit"] + (tail["power"] or "").replace(" ", ""))
    return s, None


# Mixed numbers: `2 3/4` and `2\frac{3}{4}` are 11/4 (canonical() would make `2 3/4` the number 23/4).
_MIXED_NUMBER = re.compile(
    r"\s*(?P<sign>-?)\s*(?P<whole>\d+)(?:\s+(?P<qn>\d+)\s*/\s*(?P<qd>\d+)|\s*\\[dt]?frac\s*\{\s*(?P<fn>\d+)\s*\}"
    r"\s*\{\s*(?P<fd>\d+)\s*\})\s*"
)


def _mixed_number(s: str) -> str:
    """A mixed number as an improper fraction. Only a proper fraction after a whole number reads as one: in `2 5/4`
    or `0 3/4` the reading is unclear, and the answer is left as written (math_verify, not the fast path, decides)."""
    match = _MIXED_NUMBER.fullmatch(s)
    if match is None:
        return s
    whole, num, den = int(match["whole"]), int(match["qn"] or match["fn"]), int(match["qd"] or match["fd"])
    if whole == 0 or num == 0 or num >= den or len(s) > 40:
        return s if match["fn"] else s.replace(" ", "\\,")  # `\,` keeps canonical() from gluing the digits
    return f"{match['sign']}\\frac{{{whole * den + num}}}{{{den}}}"


# A degree sign inside a trigonometric argument: math_verify drops it and computes sin(30) in radians.
_TRIG_DEGREES = re.compile(
    r"\\(?P<fn>sin|cos|tan|cot|sec|csc)\s*(?P<open>\\left\(|\()?\s*(?P<deg>-?\d+(?:\.\d+)?)\s*"
    r"(?:\^\s*(?:\{\s*\\circ\s*\}|\\circ)|°)\s*(?P<close>\\right\)|\))?"
)


def _degrees_in_trig(s: str) -> str:
    def radians(m):
        if bool(m["open"]) != bool(m["close"]):
            return m[0]
        return f"\\{m['fn']}\\left(\\frac{{{m['deg']}\\pi}}{{180}}\\right)"

    return _TRIG_DEGREES.sub(radians, s) if "\\" in s else s


def _top_level_items(s: str) -> list[str]:
    """`s` cut at its commas outside brackets and braces."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(s):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(s[start:i])
            start = i + 1
    return items + [s[start:]]


def _repeats_lost(gold: str, answer: str) -> bool:
    """A list gold that repeats an item (`-2, -2`: a pair, or a double root) against a list of another length:
    math_verify compares lists as sets, where `-2` would equal it. A bracketed answer is left to math_verify."""
    items = _top_level_items(canonical(gold))  # canonical: no `\,`, whose comma is no separator
    if len(items) < 2 or len(set(items)) == len(items):
        return False
    answer = canonical(answer)
    answer_items = _top_level_items(answer)
    return len(answer_items) != len(items) and not (len(answer_items) == 1 and answer[:1] in "([{\\")


@lru_cache(maxsize=4096)
def comparable_pair(gold: str, answer: str) -> tuple[str, str, bool | None]:
    """Gold and answer rewritten where math_verify misreads them, and a verdict when that alone settles it.

    Units: both present and different is a miss (`2 hours` is not `120 minutes`, `27^\\circ` is not
    `27\\text{ radians}`: conservative, no conversions); one side without a unit compares the numbers, as `\\text{}`
    units always have. A list gold that repeats an item (`-2, -2`) needs as many items in the answer.
    """
    clock = _clock_verdict(gold, answer)
    if clock is not None:
        return gold, answer, clock
    if _repeats_lost(gold, answer):
        return gold, answer, False
    gold, answer = _same_function_names(gold, answer)
    (gold, gold_unit), (answer, answer_unit) = _split_unit(gold), _split_unit(answer)
    # The degree sign is a unit too when the other side names one: `27^\circ` is not `27\text{ radians}`.
    if answer_unit and not gold_unit and _DEGREE_SIGN.search(gold):
        gold_unit = "degree"
    if gold_unit and not answer_unit and _DEGREE_SIGN.search(answer):
        answer_unit = "degree"
    if gold_unit and answer_unit and gold_unit != answer_unit:
        return gold, answer, False
    return _degrees_in_trig(_mixed_number(gold)), _degrees_in_trig(_mixed_number(answer)), None


def fast_match(gold: str, answer: str) -> bool | None:
    """True/False when a string or plain-number comparison settles it, None when math_verify must decide."""
    gold, answer, verdict = comparable_pair(gold, answer)
    if verdict is not None:
        return verdict
    g, a = canonical(gold), canonical(answer)
    if not g or not a:
        return None
    if "=" not in g:
        a = _LEADING_ASSIGNMENT.sub("", a, count=1) if _LEADING_ASSIGNMENT.match(a) else a
    if g == a:
        return True
    gn, an = _as_rational(g), _as_rational(a)
    if gn is None or an is None:
        return None
    (gv, g_kind), (av, a_kind) = gn, an
    if gv == av:
        return True
    if DECIMAL not in (g_kind, a_kind) or SCIENTIFIC in (g_kind, a_kind):
        # Two different exact rationals ("025" == "25" and 2/4 == \frac{1}{2} were caught above); scientific
        # notation states its precision, so it is compared exactly (math_verify's 6-decimal rounding would make
        # 1.5\times10^{-7} equal 1.6\times10^{-7}).
        return False
    # math_verify rounds floats (6 decimals, 15 digits): only a gap that rounding cannot close is a sure "no".
    gap = abs(gv - av)
    if gap >= Fraction(2, 10**6) and gap >= max(abs(gv), abs(av)) * Fraction(1, 10**12):
        return False
    # Below 0.1 the rounding keeps few significant digits (below 1e-6, none): 0.00000012 is not 0.00000015.
    if gap > max(abs(gv), abs(av)) * _RELATIVE_GAP:
        return False
    return None


# ---------------------------------------------------------------------------------------------------------------
# Worker processes: pebble's ProcessPool on the standard library's forkserver; math_verify in each worker's
# main thread, under a CPU-time deadline that the worker enforces itself
# ---------------------------------------------------------------------------------------------------------------


def _limit_resources(memory_mb: int) -> None:
    import resource

    try:  # Linux; elsewhere the deadline and the CPU cap still bound a worker
        with open("/proc/self/statm") as f:
            current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = current + memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (OSError, ValueError):
        pass


@lru_cache(maxsize=1)
def _math_verify():
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    # Predictions: LaTeX only (ExprExtractionConfig goes through sympy's parse_expr, i.e. eval). math_verify's unit
    # removal is off on both sides: it strips a trailing `t`, `s` or `m` as a unit, so `1+3t` read as 4. Units are
    # split off by comparable_pair instead, where a bare letter stays a variable.
    normalization = NormalizationConfig(
        basic_latex=True, units=False, malformed_operators=True, nits=True, boxed="all", equations=False
    )
    pred_config = [
        LatexExtractionConfig(normalization_config=normalization, boxed_match_priority=0, try_extract_without_anchor=False)
    ]
    gold_config = [LatexExtractionConfig(normalization_config=normalization), ExprExtractionConfig()]
    return parse, verify, pred_config, gold_config


# A `$` left inside an answer (`221,$8` for `$221$, $8$`): math_verify would read only what comes before it.
_STRAY_DOLLAR = re.compile(r"(?<!\\)\$")


@lru_cache(maxsize=4096)
def _parse_gold(gold: str):
    parse, _, _, gold_config = _math_verify()
    return parse(f"${_STRAY_DOLLAR.sub(' ', gold)}$", extraction_config=gold_config, parsing_timeout=None)


def _is_false_equation(expr) -> bool:
    """`5 = 3`: math_verify would compare only the right-hand side, so a false statement could score."""
    import sympy

    if not isinstance(expr, sympy.Equality) or expr.free_symbols:
        return False
    try:
        difference = complex(sympy.N(expr.lhs - expr.rhs))
        scale = max(1.0, abs(complex(sympy.N(expr.rhs))))
    except Exception:
        return False
    return abs(difference) > 1e-9 * scale


def _math_verify_match(golds: tuple, answer: str) -> float:
    """1.0 if math_verify finds `answer` equivalent to any gold (gold first: its comparison is asymmetric).

    math_verify's own timeouts (signal.alarm, wall time) are off: the worker's CPU deadline bounds the whole job.
    """
    parse, verify, pred_config, _ = _math_verify()
    for gold in golds:
        gold, pair_answer, verdict = comparable_pair(gold, answer)
        if verdict is not None:
            if verdict:
                return 1.0
            continue
        pred = parse(
            "\\boxed{" + _STRAY_DOLLAR.sub(" ", pair_answer) + "}",
            extraction_config=pred_config,
            extraction_mode="first_match",
            parsing_timeout=None,
        )
        pred = [p for p in pred if not _is_false_equation(p)]
        gold_parsed = _parse_gold(gold) if pred else None
        if not gold_parsed:  # an unparseable gold never yields 1
            continue
        for g, p in itertools.product(gold_parsed, pred):
            g, p = _bound_indices_renamed(g), _bound_indices_renamed(p)
            g, p = _imaginary_unit(g, _symbols_as_in(g, p))
            g, p = _rational_exponents(g), _rational_exponents(p)
            if _number_vs_variables(g, p) or _numbers_differ(g, p):
                continue
            if verify(g, p, timeout_seconds=None):
                return 1.0
    return 0.0


_IMAGINARY_NAMES = ({"i"}, {"j"})


def _imaginary_unit(gold, pred):
    """`i` (or the engineers' `j`) as the imaginary unit when it is the gold's only variable (`3+4i`,
    `1 + i\\sqrt{3}`) and the answer has no other than `i` or `j`. A gold with more variables (`\\omega i`, `x_i`)
    keeps `i` a variable: too ambiguous to rewrite."""
    import sympy

    if not (isinstance(gold, sympy.Expr) and isinstance(pred, sympy.Expr)):
        return gold, pred
    names = {s.name for s in gold.free_symbols}
    if names not in _IMAGINARY_NAMES or not {s.name for s in pred.free_symbols} <= {"i", "j"}:
        return gold, pred
    to_unit = {s: sympy.I for s in gold.free_symbols | pred.free_symbols}
    return gold.xreplace(to_unit), pred.xreplace(to_unit)


def _bound_indices_renamed(expr):
    """A sum's or product's index named `i` or `j` renamed: math_verify would take it for the imaginary unit
    (`\\sum_{i=1}^n i^2` then differs from n(n+1)(2n+1)/6)."""
    import sympy

    if not isinstance(expr, sympy.Basic) or not expr.has(sympy.Sum, sympy.Product):
        return expr

    def rename(e):
        mapping = {limit[0]: sympy.Symbol("k_index", integer=True) for limit in e.limits if limit[0].name in ("i", "j")}
        limits = [(mapping.get(limit[0], limit[0]), *limit[1:]) for limit in e.limits]
        return type(e)(e.function.xreplace(mapping), *limits)

    try:
        return expr.replace(lambda e: isinstance(e, (sympy.Sum, sympy.Product)), rename)
    except Exception:  # an expression sympy cannot rebuild is compared as it was
        return expr


def _symbols_as_in(gold, pred):
    """The answer's variables made the gold's variables of the same name: the parser marks them `real=False` next to
    an `i` (`\\sum_{i=1}^n`), and sympy would then take `n` and `n` for two variables."""
    import sympy

    if not (isinstance(gold, sympy.Basic) and isinstance(pred, sympy.Basic)):
        return pred
    by_name = {s.name: s for s in gold.free_symbols}
    mapping = {s: by_name[s.name] for s in pred.free_symbols if s.name in by_name and by_name[s.name] != s}
    return pred.xreplace(mapping) if mapping else pred


def _rational_exponents(expr):
    """Decimal exponents as the rationals they write (`x^{0.5}` as `x^{1/2}`, `e^{0.5x}` as `e^{x/2}`): sympy cannot
    prove a float power equal to a rational one. `x^{0.33}` becomes 33/100, still not 1/3."""
    import sympy

    if not isinstance(expr, sympy.Basic) or not expr.has(sympy.Float):
        return expr

    def rationalize(e):
        return e.xreplace({f: sympy.Rational(str(f)) for f in e.atoms(sympy.Float)})

    try:
        expr = expr.replace(
            lambda e: isinstance(e, sympy.Pow) and e.exp.has(sympy.Float),
            lambda e: sympy.Pow(e.base, rationalize(e.exp)),
        )
        return expr.replace(
            lambda e: isinstance(e, sympy.exp) and e.args[0].has(sympy.Float),
            lambda e: sympy.exp(rationalize(e.args[0])),
        )
    except Exception:  # an expression sympy cannot rebuild is compared as it was
        return expr


_SAMPLE_POINTS = (0.37, 1.29, 2.11)  # no special values of the usual functions


def _numeric(expr) -> complex | None:
    import sympy

    try:
        value = complex(sympy.N(expr, 30))
    except (TypeError, ValueError, ArithmeticError):
        return None
    return value if math.isfinite(value.real) and math.isfinite(value.imag) else None


def _number_vs_variables(gold, pred) -> bool:
    """A number against an expression in variables (10.1 vs e^{at}/2): never equal, since math_verify is strict
    about variables, and proving it through simplify() is the slowest thing math_verify does. Unless the expression
    takes the number's value wherever it is sampled (`\\sin^2 x + \\cos^2 x` against 1): math_verify decides that."""
    import sympy

    if not (isinstance(gold, sympy.Expr) and isinstance(pred, sympy.Expr)):
        return False  # relations, sets, tuples, matrices and strings have their own rules
    if bool(gold.free_symbols) == bool(pred.free_symbols):
        return False
    number, expression = (pred, gold) if gold.free_symbols else (gold, pred)
    target = _numeric(number)
    if target is None:
        return True
    for x in _SAMPLE_POINTS:
        value = _numeric(expression.xreplace({s: sympy.Float(x) for s in expression.free_symbols}))
        if value is None or abs(value - target) > 1e-9 * max(1.0, abs(target)):
            return True
    return False


def _numbers_differ(gold, pred) -> bool:
    """Two numbers further apart than _RELATIVE_GAP of their size (8.2 \\times 60^{-19} against
    8.2 \\times 10^{-19}): math_verify rounds to 6 decimals, which makes all numbers below 1e-6 equal."""
    import sympy

    if not (isinstance(gold, sympy.Expr) and isinstance(pred, sympy.Expr)) or gold.free_symbols or pred.free_symbols:
        return False
    g, p = _numeric(gold), _numeric(pred)
    if g is None or p is None:
        return False
    return abs(g - p) > max(abs(g), abs(p)) * float(_RELATIVE_GAP)


_WARM_UP = [
    (("1/2",), "\\frac{1}{2}"),
    (("\\frac{1}{2}(e^{at} + e^{-at})",), "10.1"),
    (("(1, \\frac{\\pi}{2}]",), "[1, 2) \\cup \\{3\\}"),
    (("x = 2, y = 3",), "\\sqrt{3} x^2 \\leq 2"),
    (("90^\\circ",), "90\\%"),
]


def _quiet_math_verify_logs() -> None:
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


class _CpuDeadline(BaseException):
    """A job used its CPU time. A BaseException, so that math_verify's `except Exception` cannot swallow it."""


def _on_cpu_deadline(signum, frame):
    raise _CpuDeadline()


def _init_worker(memory_mb: int) -> None:
    """Runs once in each new worker, before it takes a job: memory cap, quiet logs, warm caches.

    The forkserver has imported sympy and math_verify; the warm-up builds the LaTeX parser and triggers simplify's
    lazy imports (~0.3 s of CPU) so that no job pays for them against its deadline.
    """
    import signal

    _limit_resources(memory_mb)
    _quiet_math_verify_logs()
    signal.signal(signal.SIGVTALRM, _on_cpu_deadline)
    for golds, answer in _WARM_UP:
        _math_verify_match(golds, answer)


def _judge_in_worker(golds: tuple, answer: str, cpu_s: float) -> tuple[float, str]:
    """(score, status) for one job, within `cpu_s` seconds of this worker's CPU time.

    The deadline counts CPU, not wall time, so a correct answer scores the same on a busy machine as on a quiet one:
    ITIMER_VIRTUAL raises in Python code; ITIMER_PROF, a little later, ends the process (SIGPROF's default action)
    when the job is stuck in C code (a huge GMP power) where no Python handler can run. The parent's wall-clock
    limit (pebble's per-task timeout) is the backstop for a worker that gets no CPU at all.
    """
    import signal

    cpu_s = max(cpu_s, 0.001)  # a zero interval would switch the timer off
    signal.setitimer(signal.ITIMER_VIRTUAL, cpu_s)
    signal.setitimer(signal.ITIMER_PROF, cpu_s + CPU_KILL_GRACE_S)
    try:
        return _math_verify_match(golds, answer), "ok"
    except _CpuDeadline:
        return 0.0, "timeout"
    except Exception:  # MemoryError and RecursionError included
        return 0.0, "error"
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.setitimer(signal.ITIMER_PROF, 0)


def _worker_pid() -> int:
    time.sleep(0.05)  # long enough that each idle worker takes one of the pings sent at once
    return os.getpid()


# Not this module: the fork server cannot see the caller's sys.path, and `import rewards` there could find another
# copy (the one in its working directory). Each worker imports it after taking the caller's sys.path.
_WORKER_PRELOAD = ["sympy", "math_verify", "latex2sympy2_extended"]
_MAIN_MODULE_KEYS = ("init_main_from_name", "init_main_from_path")
_SERVER = None
_SERVER_PID = None
_SERVER_LOCK = threading.Lock()


def _worker_fork_server():
    """This process's own fork server (a fresh interpreter that imports sympy and math_verify once and forks each
    worker from that state in milliseconds), started on first use and again in a forked child.

    Its own, not the standard library's shared one: its preload list is the verifier's and nobody else's, and it
    never imports the calling script (`__main__` is not preloaded).
    """
    global _SERVER, _SERVER_PID
    with _SERVER_LOCK:
        if _SERVER is None or _SERVER_PID != os.getpid():
            _SERVER, _SERVER_PID = forkserver.ForkServer(), os.getpid()
            _SERVER.set_forkserver_preload(list(_WORKER_PRELOAD))
        return _SERVER


class _WorkerPopen(popen_forkserver.Popen):
    """How a worker starts: `popen_forkserver.Popen._launch`, on the verifier's fork server, less `__main__`.

    multiprocessing sends every child the path or module name of the parent's `__main__` to run again (as
    `__mp_main__`) so that functions defined there can be unpickled. Workers run only this module's functions, so
    that step is dropped: a script without an `if __name__ == "__main__":` guard, one read from standard input,
    `python -c`, a notebook kernel or a forked child all call the verifier without their code running again.
    """

    def _launch(self, process_obj):
        prep_data = spawn.get_preparation_data(process_obj._name)
        for key in _MAIN_MODULE_KEYS:
            prep_data.pop(key, None)
        buf = io.BytesIO()
        mp_context.set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            mp_context.set_spawning_popen(None)
        self.sentinel, w = _worker_fork_server().connect_to_new_process(self._fds)
        parent_w = os.dup(w)  # the child's sentinel of its parent, as in the standard library
        self.finalizer = mp_util.Finalize(self, mp_util.close_fds, (parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


class _WorkerProcess(mp_context.ForkServerProcess):
    @staticmethod
    def _Popen(process_obj):
        return _WorkerPopen(process_obj)


class _WorkerContext(mp_context.ForkServerContext):
    """The forkserver start method with the two changes of `_WorkerPopen`; what pebble starts workers with."""

    Process = _WorkerProcess


class RewardWorkerError(RuntimeError):
    """The verifier's worker processes could not start: answers that need math_verify cannot be judged."""


def _new_pool(size: int, initializer=_init_worker, initargs=None):
    from pebble import ProcessPool

    initargs = (WORKER_MEMORY_MB,) if initargs is None else initargs
    return ProcessPool(max_workers=size, initializer=initializer, initargs=initargs, context=_WorkerContext())


def _pool_size() -> int:
    size = NUM_WORKERS or min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2)
    return max(1, size)


def _wall_limit(cpu_s: float) -> float:
    return WALL_TIMEOUT_S or WALL_PER_CPU * cpu_s


def _outcome(future) -> tuple[float, str]:
    """A finished job's (score, status); a worker that died at its CPU deadline (SIGPROF) timed out."""
    import signal
    from concurrent.futures import CancelledError
    from concurrent.futures import TimeoutError as FutureTimeout
    from concurrent.futures.process import BrokenProcessPool

    from pebble import ProcessExpired

    try:
        return future.result(timeout=0)
    except FutureTimeout:  # pebble killed it at the wall-clock limit
        return 0.0, "timeout"
    except ProcessExpired as died:
        return 0.0, "timeout" if died.exitcode in (-signal.SIGPROF, -signal.SIGXCPU) else "error"
    except (BrokenProcessPool, CancelledError):  # the pool broke (all workers died) before the job ran
        return 0.0, "broken"
    except BaseException:  # the job itself failed outside math_verify (e.g. a deadline hit on the way out)
        return 0.0, "error"


def _run_jobs(pool, size: int, jobs: list, cpu_s: float, wall_s: float) -> list[tuple[float, str]]:
    """Judge (golds, answer) jobs in parallel. pebble starts a job's wall clock when a worker takes it; the budget
    here also bounds jobs that never find a worker (a pool whose workers cannot start)."""
    from concurrent.futures import wait as wait_futures

    futures = [pool.schedule(_judge_in_worker, args=(golds, answer, cpu_s), timeout=wall_s) for golds, answer in jobs]
    budget = wall_s * math.ceil(len(jobs) / size) + 0.5
    done, late = wait_futures(futures, timeout=budget)
    for future in late:
        future.cancel()  # pebble stops the worker still running it
    return [_outcome(f) if f in done else (0.0, "timeout") for f in futures]


_POOL = None
_POOL_PID = None
_POOL_LOCK = threading.Lock()


def _pool(fresh: bool = False):
    """The worker pool, created on first use (never at import), again in a forked child process, and again after
    pebble gave up on it (all workers died, e.g. to the kernel's OOM killer, while none had a job)."""
    global _POOL, _POOL_PID
    with _POOL_LOCK:
        if _POOL is not None and _POOL_PID == os.getpid() and (fresh or not _POOL.active):
            _POOL.stop()
            _POOL = None
        if _POOL is None or _POOL_PID != os.getpid():
            _POOL, _POOL_PID = _new_pool(_pool_size()), os.getpid()
        return _POOL


_RUN_LOCK = threading.Lock()
_STARTED_POOL = None  # the pool whose workers have answered once


def _started_pool(fresh: bool = False):
    """The pool, once one of its workers has answered: a pool whose workers cannot start (a broken install, no
    memory for a process) is one clear error, not every hard answer scored 0."""
    global _STARTED_POOL
    try:
        pool = _pool(fresh)
        if pool is not _STARTED_POOL:
            pool.schedule(_worker_pid).result(timeout=WORKER_STARTUP_S)
            _STARTED_POOL = pool
    except Exception as error:
        raise RewardWorkerError(
            f"the reward verifier's worker processes could not start ({type(error).__name__}: {error}); a worker's own "
            "error, if it got that far, is printed above (e.g. math_verify missing from this Python)"
        ) from error
    return pool


def _verify_jobs(jobs: list, cpu_s: float, wall_s: float) -> list[tuple[float, str]]:
    """One caller at a time has the workers, so that another caller's jobs cannot eat into its time budget."""
    size = _pool_size()
    with _RUN_LOCK:
        results = _run_jobs(_started_pool(), size, jobs, cpu_s, wall_s)
        broken = [i for i, (_, status) in enumerate(results) if status == "broken"]
        if broken:  # once, on a fresh pool: these jobs never ran, or ran on a pool that was already gone
            retried = _run_jobs(_started_pool(fresh=True), size, [jobs[i] for i in broken], cpu_s, wall_s)
            for i, result in zip(broken, retried, strict=True):
                results[i] = result
    return [(score, "error" if status == "broken" else status) for score, status in results]


def _forget_parent_pool() -> None:
    """In a child forked from a caller: the parent's pool, fork server and locks (perhaps held by one of its
    threads at the fork) are not this process's; the first hard answer starts its own."""
    global _POOL_LOCK, _RUN_LOCK, _SERVER_LOCK, _STARTED_POOL
    _POOL_LOCK, _RUN_LOCK, _SERVER_LOCK, _STARTED_POOL = threading.Lock(), threading.Lock(), threading.Lock(), None
    STATS._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_parent_pool)


def _worker_pids(timeout: float) -> set[int]:
    """Pids of the workers that answer within `timeout` (all of them, unless some cannot start)."""
    size, pids, end = _pool_size(), set(), time.monotonic() + timeout
    while len(pids) < size and time.monotonic() < end:
        try:
            for future in [_pool().schedule(_worker_pid) for _ in range(size)]:
                pids.add(future.result(timeout=max(end - time.monotonic(), 0.01)))
        except Exception:  # not started yet, or the pool broke (the next _pool() makes a new one)
            time.sleep(0.1)
    return pids


def start_workers(timeout: float = WORKER_STARTUP_S) -> bool:
    """Start the verifier processes now (e.g. before training) instead of on the first hard completion; True once
    every worker has answered."""
    return len(_worker_pids(timeout)) >= _pool_size()


def shutdown_workers() -> None:
    """Stop the workers and their fork server (the next hard answer starts them again)."""
    global _POOL, _SERVER
    with _POOL_LOCK:
        if _POOL is not None and _POOL_PID == os.getpid():
            _POOL.stop()
            _POOL.join(timeout=10)
        if _SERVER is not None and _SERVER_PID == os.getpid():
            _SERVER._stop()  # closes the server's lifeline pipe and reaps it
        _POOL = _SERVER = None


# ---------------------------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------------------------


def _judge(completions: list, golds: list, require_think: bool, timeout: float | None, wall_timeout: float | None):
    """Scores (1.0/0.0, None where there is no gold) and the per-batch counts."""
    timeout = TIMEOUT_S if timeout is None else timeout
    wall_timeout = _wall_limit(timeout) if wall_timeout is None else wall_timeout
    counts = dict.fromkeys(RewardStats.FIELDS, 0)
    scores: list[float | None] = [None] * len(completions)
    jobs: dict[tuple, list[int]] = {}  # (golds, answer) -> rows: a GRPO group often repeats the same answer
    for row, (completion, gold) in enumerate(zip(completions, golds, strict=True)):
        gold_list = gold_strings(gold)
        if not gold_list:
            continue
        counts["judged"] += 1
        scores[row] = 0.0
        try:
            region = _answer_region(completion_text(completion), require_think)
            answer, status = extract_answer(region) if region is not None else (None, NO_ANSWER)
            if status != "ok":
                counts[status] += 1
                continue
            verdicts = [fast_match(g, answer) for g in gold_list]
            if any(v is True for v in verdicts) or all(v is False for v in verdicts):
                counts["fast_path"] += 1
                scores[row] = 1.0 if any(verdicts) else 0.0
                continue
            if pathological_reason(answer):  # only what goes on to sympy needs the pre-checks
                counts[REJECTED] += 1
                continue
        except Exception:  # a bug here must cost one completion its reward, not the run
            logger.exception("reward pre-processing failed")
            counts["errors"] += 1
            continue
        # Golds that differ only in presentation (MinervaMath lists "\\frac{a}{b}\n" and "\\frac{a}{b}") once.
        undecided = tuple({canonical(g): g for g, v in zip(gold_list, verdicts, strict=True) if v is None}.values())
        jobs.setdefault((undecided, answer), []).append(row)
    if jobs:
        verdicts = _verify_jobs(list(jobs), timeout, wall_timeout)  # RewardWorkerError if no worker can start
        for rows, (score, status) in zip(jobs.values(), verdicts, strict=True):
            for row in rows:
                scores[row] = score
            if status in ("timeout", "error"):
                counts["timeouts" if status == "timeout" else "errors"] += len(rows)
    STATS.add(counts)
    return scores, counts


def verify(completion, gold, require_think: bool = False, *, timeout: float | None = None,
           wall_timeout: float | None = None) -> float:
    """1.0 if the last `\\boxed{}` of `completion` is equivalent to `gold` (or any item of a list of golds), else 0.0.

    With `require_think`, only text after the first `</think>` counts and a completion without it scores 0.
    Timeouts, errors and answers without a usable gold all score 0.0. `timeout` is in CPU seconds of the worker
    (default `TIMEOUT_S`), `wall_timeout` the wall-clock backstop (default `WALL_PER_CPU` times `timeout`).
    """
    scores, _ = _judge([completion], [gold], require_think, timeout, wall_timeout)
    return scores[0] or 0.0


def verify_batch(completions: list, golds: list, require_think: bool = False, *, timeout: float | None = None,
                 wall_timeout: float | None = None):
    """`verify` for many completions at once, judged in parallel; None where a gold is missing."""
    return _judge(list(completions), list(golds), require_think, timeout, wall_timeout)[0]


# ---------------------------------------------------------------------------------------------------------------
# TRL reward functions: (completions, **kwargs) -> list[float | None]
# ---------------------------------------------------------------------------------------------------------------

_GOLD_COLUMNS = ("answer", "solution", "ground_truth")


def _gold_column(kwargs: dict, n: int) -> list:
    for key in _GOLD_COLUMNS:
        if kwargs.get(key) is not None:
            return list(kwargs[key])
    if kwargs.get("reward_model") is not None:  # verl parquet schema
        return [(r or {}).get("ground_truth") if isinstance(r, dict) else None for r in kwargs["reward_model"]]
    raise ValueError(f"accuracy reward needs a gold column: one of {', '.join(_GOLD_COLUMNS)} (got {sorted(kwargs)})")


def _log_counts(kwargs: dict, counts: dict) -> None:
    log_metric = kwargs.get("log_metric")
    if callable(log_metric):
        for key in ("timeouts", "errors", "no_answer", "rejected"):
            log_metric(f"rewards/{key}", float(counts[key]))


def accuracy_reward(completions, **kwargs) -> list[float | None]:
    """1.0 when the last boxed answer matches the row's `answer`, else 0.0; None where the gold is missing."""
    scores, counts = _judge(completions, _gold_column(kwargs, len(completions)), False, None, None)
    _log_counts(kwargs, counts)
    return scores


def think_accuracy_reward(completions, **kwargs) -> list[float | None]:
    """accuracy_reward on the text after `</think>`; a completion that never closes its reasoning scores 0."""
    scores, counts = _judge(completions, _gold_column(kwargs, len(completions)), True, None, None)
    _log_counts(kwargs, counts)
    return scores


def has_think_format(text: str) -> bool:
    """`<think>reasoning</think> ... \\boxed{answer}`; the opening tag may be missing because many chat templates
    (DeepSeek-R1, Qwen3) put it in the prompt."""
    head, sep, tail = text.partition(THINK_CLOSE)
    if not sep or THINK_CLOSE in tail or THINK_OPEN in tail:
        return False
    reasoning = head.strip()
    if reasoning.startswith(THINK_OPEN):
        reasoning = reasoning[len(THINK_OPEN) :]
    if THINK_OPEN in reasoning or not reasoning.strip():
        return False
    return extract_answer(tail)[1] == "ok"


def format_reward(completions, **kwargs) -> list[float]:
    """1.0 for reasoning closed by `</think>` followed by a `\\boxed{}` answer, else 0.0."""
    return [1.0 if has_think_format(completion_text(c)) else 0.0 for c in completions]


REWARD_FUNCS = {
    "accuracy": accuracy_reward,
    "think_accuracy": think_accuracy_reward,
    "format": format_reward,
}


def get_reward_funcs(names) -> list:
    """Reward functions for registry names or dotted import paths (`package.module.function`), in order."""
    if isinstance(names, str):
        names = [names]
    funcs = []
    for name in names:
        if name in REWARD_FUNCS:
            funcs.append(REWARD_FUNCS[name])
            continue
        known = ", ".join(sorted(REWARD_FUNCS))
        if "." not in name:
            raise ValueError(f"Unknown reward function {name!r}: use one of {known} or a path package.module.function")
        module_path, func_name = name.rsplit(".", 1)
        try:
            func = getattr(importlib.import_module(module_path), func_name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"Cannot import reward function {name!r} ({e}); known names: {known}") from None
        if not callable(func):
            raise ValueError(f"Reward function {name!r} is not callable; known names: {known}")
        funcs.append(func)
    return funcs
