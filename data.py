"""Problem sets and prompts, shared by `train_grpo.py`, `filter_data.py` and `evaluate.py`.

Two schemas are accepted and normalised to the same columns:

- Polaris-53K / MATH style: `problem`, `answer`;
- verl parquet (as POLARIS ships its benchmarks): `prompt` (a list of chat messages whose user turn
  already ends in the instruction suffix), `reward_model.ground_truth`, `extra_info.index`/`id`.

Every loaded set has `problem` (the bare question), `answer` (the gold answer: a string, number or
list of acceptable answers), `prompt_id` (a stable hash of the problem, used by the per-prompt
ledger) and `prompt` (chat messages built by `build_messages`, the one place prompts are made).
"""

import functools
import hashlib
import logging
import os
import re
import sys
from pathlib import Path

# Every script imports this module before torch: bitsandbytes logs at import, as a warning that reads like an
# error, that the optional `kernels` package for its CPU 4-bit kernel is missing (it falls back to its own).
# Its errors still show.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


DEFAULT_PROMPT_SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."
LEDGER_FILE = "prompt_ledger.json"  # per-prompt rewards of a run: written by batch_repair.py, read by filter_data.py
LOCAL_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
LOCAL_SUFFIXES = (*LOCAL_FORMATS, ".gguf")
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")  # `name` or `org/name`


class UserError(Exception):
    """Bad input from the user: reported as one line with exit code 2, without a traceback."""


class HubUnavailable(UserError):
    """A hub id that could not be fetched: no network, offline mode without a cached copy, or no such repository."""


def run_cli(main, *args):
    """Run a script's `main`, turning `UserError` into one line on stderr and exit code 2.

    `--debug` on the command line (or POLARIS_DEBUG=1) shows the full traceback instead.
    """
    debug = "--debug" in sys.argv or os.environ.get("POLARIS_DEBUG") == "1"
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
    try:
        return main(*args)
    except UserError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def write_line(message: str):
    """Print a message above any progress bar instead of into it (tqdm.write), flushed at once."""
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()


def did_you_mean(name: str, known) -> str:
    """": did you mean X?" for the closest of `known` to a mistyped `name`, or "" when none is close."""
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f": did you mean {close[0]}?" if close else ""


def check_options(parser, args: list[str] | None = None, recipe: dict | None = None, recipe_path=None) -> list[str]:
    """`args` (default: the command line) once every `--option` in it and every key of `recipe` is one that
    `parser` knows; otherwise a `UserError` naming the closest known one. Build `parser` with
    allow_abbrev=False so that argparse does not silently take a prefix for a longer option."""
    args = list(sys.argv[1:] if args is None else args)
    options = {option for option in parser._option_string_actions if option.startswith("--")} | {"--config", "--debug"}
    for token in args:
        if token == "--":
            break
        name = token.split("=", 1)[0]
        if name.startswith("--") and name not in options:
            raise UserError(f"unknown option {name}{did_you_mean(name, options) or ' (see --help)'}")
    keys = {action.dest for action in parser._actions} | {"env"}  # `env`: TRL's recipe key for environment variables
    for key in recipe or {}:
        if key not in keys:
            raise UserError(f"unknown key '{key}' in recipe {recipe_path}{did_you_mean(key, keys) or ' (see --help for the options)'}")
    return args


# ----------------------------------------------------------------------------------------------
# Local paths and the hub: what a name means, and fast errors when it cannot be had
# ----------------------------------------------------------------------------------------------


def looks_local(name: str) -> bool:
    """A name only a local path can mean: ./, ../, /, ~, a file suffix, or a path no hub id has the shape of."""
    return (
        name.startswith(("./", "../", "/", "~", ".\\", "..\\"))
        or os.path.isabs(name)
        or name.lower().endswith(LOCAL_SUFFIXES)
        or ((os.sep in name or "/" in name) and not HUB_ID.fullmatch(name))
    )


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE) is set: the libraries read their cache only."""
    from huggingface_hub import constants

    flags = (os.environ.get(name, "").lower() in ("1", "true", "yes", "on") for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(flags)


@functools.cache
def hub_unreachable(endpoint: str) -> str | None:
    """Why `endpoint` cannot be reached (None when it answers), asked once per process. huggingface_hub
    retries a failed connection five times over about 25 s per file, so a run without network would
    otherwise wait a minute before its error."""
    import httpx
    from huggingface_hub import constants, get_session

    try:
        get_session().head(endpoint, timeout=constants.HF_HUB_ETAG_TIMEOUT, follow_redirects=False)
    except httpx.HTTPError as error:
        return (str(error).strip() or type(error).__name__).splitlines()[0]
    return None


def check_source(name: str, kind: str) -> None:
    """Fail at once, in one line, when `name` (a `kind`: "model directory", "dataset file") cannot be had:
    a local-looking path that does not exist, or a hub id while the hub cannot be reached."""
    if Path(name).expanduser().exists():
        return
    if looks_local(name):
        raise UserError(f"no such {kind}: {name}")
    if hub_offline():  # the libraries read the cache and say what it lacks
        return
    from huggingface_hub import constants

    reason = hub_unreachable(constants.ENDPOINT)
    if reason is not None:
        raise HubUnavailable(
            f"no local path '{name}', and the hub cannot be reached to fetch it ({constants.ENDPOINT}: {reason}): "
            "without network, set HF_HUB_OFFLINE=1 to use the Hugging Face cache, or pass a local path"
        )


def build_messages(problem: str, prompt_suffix: str = DEFAULT_PROMPT_SUFFIX, system_prompt: str | None = None):
    """The chat messages for one problem: the user turn is the problem followed by the suffix."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": problem.strip() + prompt_suffix}]


def prompt_token_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The token ids the model sees for chat `messages`: its chat template (a default system prompt
    included) with the assistant turn opened, as TRL's trainer and every sampler build them."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def prompt_id(problem: str) -> str:
    """A stable id for a problem, independent of its position in any file."""
    return hashlib.sha1(problem.strip().encode()).hexdigest()[:16]


def _load_raw(source: str, split: str):
    from datasets import load_dataset

    path = Path(source).expanduser()
    if looks_local(source) or path.exists():
        if not path.exists():
            raise UserError(f"no such dataset file: {source} (give a local .parquet/.jsonl/.json/.csv file or a hub id)")
        if path.suffix.lower() not in LOCAL_FORMATS:
            raise UserError(f"unsupported dataset file type '{path.suffix}' for {source}: use .parquet, .jsonl, .json or .csv")
        if path.suffix.lower() == ".json" and path.read_text()[:1] == "[":
            import json

            from datasets import Dataset

            return Dataset.from_list(json.loads(path.read_text()))
        with open(path, "rb") as f:
            is_blank = not f.read(4096).strip()
        if is_blank:
            raise UserError(f"{source} is empty: give a file with at least one problem")
        try:
            return load_dataset(LOCAL_FORMATS[path.suffix.lower()], data_files=str(path), split="train")
        except Exception as error:  # datasets raises many kinds for a file it cannot read (0-row parquet included)
            raise UserError(f"could not read {source} as {LOCAL_FORMATS[path.suffix.lower()]} ({type(error).__name__}): is it empty or damaged?") from error
    check_source(source, "dataset file")
    try:
        return load_dataset(source, split=split)
    except Exception as error:  # the hub raises many kinds; all mean "could not get it"
        offline = " while HF_HUB_OFFLINE is set (is it in the cache?)" if hub_offline() else ""
        raise HubUnavailable(
            f"could not load dataset '{source}' from the hub{offline} ({type(error).__name__}); "
            "pass a local .parquet/.jsonl/.json/.csv file instead"
        ) from error


def _strip_suffix(text: str, suffix: str) -> str:
    text = text.strip()
    for candidate in (suffix.strip(), DEFAULT_PROMPT_SUFFIX.strip()):
        if candidate and text.endswith(candidate):
            return text[: -len(candidate)].strip()
    return text


def _normalise_row(row: dict, problem_column: str, answer_column: str, prompt_suffix: str) -> dict:
    if problem_column in row and row[problem_column] is not None:
        problem = row[problem_column]
    else:  # verl schema: the question is the last user message, with the suffix already appended
        user_turns = [m["content"] for m in row["prompt"] if m["role"] == "user"]
        problem = _strip_suffix(user_turns[-1], prompt_suffix)
    if answer_column in row and row[answer_column] is not None:
        answer = row[answer_column]
    else:
        answer = (row.get("reward_model") or {}).get("ground_truth")
    return {"problem": problem, "answer": answer}


def load_problems(
    source: str,
    split: str = "train",
    problem_column: str = "problem",
    answer_column: str = "answer",
    prompt_suffix: str = DEFAULT_PROMPT_SUFFIX,
    system_prompt: str | None = None,
    column_options: str = "--problem_column / --answer_column",
):
    """Load a problem set from a local file or the hub and normalise it (see the module docstring).
    `column_options`: the options that set the columns, named when the set lacks them."""
    dataset = _load_raw(source, split)
    if len(dataset) == 0:
        raise UserError(f"{source} has no rows")
    columns = set(dataset.column_names)
    has_problem = problem_column in columns or "prompt" in columns
    has_answer = answer_column in columns or "reward_model" in columns
    if not (has_problem and has_answer):
        raise UserError(
            f"{source} has columns {sorted(columns)}; expected '{problem_column}' and '{answer_column}' "
            f"(or verl's 'prompt' and 'reward_model'): set {column_options}"
        )

    def normalise(row):
        fields = _normalise_row(row, problem_column, answer_column, prompt_suffix)
        fields["prompt_id"] = prompt_id(fields["problem"])
        fields["prompt"] = build_messages(fields["problem"], prompt_suffix, system_prompt)
        return fields

    drop = [c for c in ("prompt", "reward_model") if c in columns]
    dataset = dataset.map(normalise, remove_columns=drop, desc="Building prompts")
    with_answer = dataset.filter(lambda row: row["answer"] is not None, desc="Dropping rows without answer")
    if len(with_answer) == 0:
        raise UserError(f"{source}: no row has an answer in '{answer_column}'")
    if len(with_answer) < len(dataset):
        print(f"{source}: dropped {len(dataset) - len(with_answer)} rows without an answer")
    return with_answer


def filter_long_prompts(dataset, tokenizer, max_prompt_length: int | None):
    """Drop prompts longer than `max_prompt_length` tokens (TRL 1.16 no longer truncates them).

    Returns the filtered dataset and the number of prompts dropped.
    """
    if not max_prompt_length:
        return dataset, 0

    def prompt_length(row):
        return {"prompt_length": len(prompt_token_ids(tokenizer, row["prompt"]))}

    with_lengths = dataset.map(prompt_length, desc="Measuring prompts")
    kept = with_lengths.filter(lambda row: row["prompt_length"] <= max_prompt_length).remove_columns("prompt_length")
    return kept, len(dataset) - len(kept)
