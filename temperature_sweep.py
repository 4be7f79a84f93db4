"""The diversity-based temperature search's arithmetic, shared by `evaluate.py --sweep_temperature` (offline,
before a stage) and the in-run search of schedules.py (at a stage's start).

Samples of n completions per problem at each temperature become rows of accuracy (avg@n with its standard
error over problems) and diversity (distinct-4-gram ratio); `recommend_temperature` picks one (its rule in
its docstring); the table, JSON and plot are written beside.
"""

import json
import math
from pathlib import Path

from data import UserError


SWEEP_JSON = "temperature_sweep.json"
SWEEP_PNG = "temperature_sweep.png"


def parse_sweep_range(text: str) -> list[float]:
    """`"0.6:1.6:0.1"` (START:STOP:STEP, STOP included) -> [0.6, 0.7, ..., 1.6]."""
    parts = str(text).split(":")
    try:
        start, stop, step = (float(part) for part in parts)
    except ValueError:
        raise UserError(f"temperature range '{text}' is not START:STOP:STEP (e.g. 0.6:1.6:0.1)") from None
    if not (start > 0 and stop >= start and step > 0):
        raise UserError(f"temperature range '{text}' needs 0 < START <= STOP and STEP > 0 (e.g. 0.6:1.6:0.1)")
    count = int(math.floor((stop - start) / step + 1e-6)) + 1
    # Rounded to the precision of the inputs, so 0.6 + 3 * 0.1 reads 0.9 in the table and the JSON.
    decimals = max(_decimals(part) for part in parts)
    return [round(start + i * step, decimals) for i in range(count)]


def _decimals(text: str) -> int:
    text = text.strip().lower()
    if "e" in text:
        return 10
    return len(text.split(".")[1]) if "." in text else 0


def distinct_ngram_ratio(texts: list[str], n: int = 4, unit: str = "word") -> float:
    """Unique over total n-grams among one problem's responses (0.0 when there are none).

    n-grams are taken within each response, of whitespace-separated words (`unit="word"`, the
    definition reported by `evaluate.py`), or of characters (`unit="char"`, for text without spaces,
    such as the toy world's arithmetic).
    """
    if unit not in ("word", "char"):
        raise UserError(f"unknown n-gram unit '{unit}': use word or char")
    total, unique = 0, set()
    for text in texts:
        tokens = text.split() if unit == "word" else list(text)
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def sweep_row(temperature: float, scores: list[list[float]], texts: list[list[str]], n: int = 4, unit: str = "word") -> dict:
    """One temperature's row from its samples: `scores[i]` and `texts[i]` are problem i's n scores and responses.

    `accuracy` is avg@n (the mean of all scores); `accuracy_stderr` is the standard error of the
    per-problem means (problems are the independent draws); `diversity` is the distinct-n-gram
    ratio of each problem's responses, averaged over problems.
    """
    means = [sum(group) / len(group) for group in scores if group]
    if not means:
        raise UserError(f"no samples at temperature {temperature}")
    accuracy = sum(sum(group) for group in scores) / sum(len(group) for group in scores)
    stderr = 0.0
    if len(means) > 1:
        mean = sum(means) / len(means)
        stderr = math.sqrt(sum((m - mean) ** 2 for m in means) / (len(means) - 1) / len(means))
    diversity = sum(distinct_ngram_ratio(group, n, unit) for group in texts) / max(len(texts), 1)
    return {"temperature": temperature, "accuracy": accuracy, "accuracy_stderr": stderr, "diversity": diversity}


def describe_rule(target_diversity: float | None = None, current_temperature: float | None = None) -> str:
    if target_diversity is None:
        return (
            "stage 1: the highest temperature reached from the most accurate one, going up, while accuracy "
            "stays within one standard error of the best (the edge of the controlled exploration zone)"
        )
    floor = f", never below the current {current_temperature:g}" if current_temperature is not None else ""
    return (
        f"later stage: the lowest temperature whose diversity reaches the target {target_diversity:g}{floor}; "
        "if none does, the most diverse one"
    )


def recommend_temperature(rows: list[dict], target_diversity: float | None = None, current_temperature: float | None = None) -> float:
    """The temperature to train at, from sweep rows (`temperature`, `accuracy`, `accuracy_stderr`, `diversity`).

    Stage 1 (no target): POLARIS picks the temperature where diversity is high before accuracy
    collapses. From the most accurate temperature, go up while accuracy stays at or above
    best accuracy - its standard error; the last temperature before the first drop is chosen. A
    higher temperature that recovers by chance after a drop is not: the zone is contiguous.

    Later stages (`target_diversity`, the diversity the previous stage trained at): RL has lowered
    the model's entropy, so the temperature is raised just enough to get that diversity back: the
    lowest temperature whose diversity is at least the target, never below `current_temperature`.
    If none reaches it, the most diverse temperature at or above the current one; if the sweep has
    none at or above it, the current temperature.
    """
    if not rows:
        raise UserError("the temperature sweep has no rows")
    rows = sorted(rows, key=lambda row: row["temperature"])
    if target_diversity is None:
        best_index = max(range(len(rows)), key=lambda i: (rows[i]["accuracy"], -rows[i]["temperature"]))
        best = rows[best_index]
        threshold = best["accuracy"] - (best.get("accuracy_stderr") or 0.0)
        chosen = best
        for row in rows[best_index + 1 :]:
            if row["accuracy"] < threshold:
                break
            chosen = row
        return chosen["temperature"]
    candidates = [row for row in rows if current_temperature is None or row["temperature"] >= current_temperature]
    if not candidates:
        return current_temperature
    reaching = [row for row in candidates if row["diversity"] >= target_diversity]
    if reaching:
        return reaching[0]["temperature"]
    return max(candidates, key=lambda row: (row["diversity"], -row["temperature"]))["temperature"]


def _temperature_text(temperature: float) -> str:
    """1.0 -> "1.0", 1.45 -> "1.45": at least one decimal, at most three."""
    text = f"{temperature:.3f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def format_sweep_table(rows: list[dict], recommended: float | None) -> str:
    """A plain-text table, one line per temperature, the recommended one marked."""
    lines = [f"{'temperature':>11}  {'accuracy':>8}  {'± s.e.':>7}  {'diversity':>9}", "-" * 42]
    for row in sorted(rows, key=lambda row: row["temperature"]):
        mark = "  <- recommended" if recommended is not None and math.isclose(row["temperature"], recommended) else ""
        lines.append(
            f"{_temperature_text(row['temperature']):>11}  {row['accuracy']:>8.3f}  {row.get('accuracy_stderr') or 0.0:>7.3f}  {row['diversity']:>9.3f}{mark}"
        )
    return "\n".join(lines)


def write_sweep_report(rows: list[dict], recommended: float | None, output_dir, rule: str | None = None) -> tuple[Path, Path]:
    """Write `temperature_sweep.json` and `temperature_sweep.png` (accuracy with standard-error bars
    and diversity against temperature, the recommendation marked) into `output_dir`."""
    from matplotlib.figure import Figure  # not pyplot: a notebook's plotting backend stays as it is

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda row: row["temperature"])
    json_path = output_dir / SWEEP_JSON
    report = {"temperatures": rows, "recommended_temperature": recommended, "rule": rule or describe_rule()}
    json_path.write_text(json.dumps(report, indent=2))

    temperatures = [row["temperature"] for row in rows]
    figure = Figure(figsize=(6.5, 4))
    accuracy_axis = figure.subplots()
    accuracy_axis.errorbar(
        temperatures, [row["accuracy"] for row in rows], yerr=[row.get("accuracy_stderr") or 0.0 for row in rows],
        marker="o", capsize=3, color="tab:blue", label="accuracy (avg@n ± s.e.)",
    )
    accuracy_axis.set_xlabel("sampling temperature")
    accuracy_axis.set_ylabel("accuracy", color="tab:blue")
    diversity_axis = accuracy_axis.twinx()
    diversity_axis.plot(temperatures, [row["diversity"] for row in rows], marker="s", color="tab:orange", label="distinct-4-gram ratio")
    diversity_axis.set_ylabel("diversity", color="tab:orange")
    if recommended is not None:
        accuracy_axis.axvline(recommended, color="gray", linestyle="--", label=f"recommended {_temperature_text(recommended)}")
    handles = accuracy_axis.get_legend_handles_labels()[0] + diversity_axis.get_legend_handles_labels()[0]
    accuracy_axis.legend(handles=handles, loc="best", fontsize=8)
    accuracy_axis.set_title("Accuracy and diversity against temperature")
    figure.tight_layout()
    png_path = output_dir / SWEEP_PNG
    figure.savefig(png_path, dpi=100)
    return json_path, png_path
