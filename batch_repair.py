"""Keeping every GRPO batch informative: rollout rescue, informative substitution, the per-prompt ledger.

A group is the `num_generations` rollouts of one prompt. When its rewards are all equal (all right or all
wrong) its advantages are zero and it teaches nothing; late in training most groups are like that and the
batch shrinks silently. POLARIS repairs the batch in two ways, both switchable in `PolarisConfig`:

- rollout rescue (`--rollout_rescue`): the ledger keeps, per prompt, the latest correct completion seen; when
  every rollout of that prompt fails later, one failed rollout is replaced by the kept one *before* rewards
  and old log-probs are computed, so the group becomes 1/G right and is trained on what is scored;
- informative substitution (`--informative_substitution`): zero-variance groups are replaced by copies of
  groups with mixed rewards from the same batch, drawn without replacement while possible. Whole rows are
  copied (prompt, completion, masks, old log-probs, advantages), never re-scored against the replaced
  prompt (the released POLARIS code did that, which undid the substitution). When no more than
  `--min_informative_fraction` of the groups are informative the batch is kept unchanged and counted;
  `--dynamic_sampling` (DAPO) first generates fresh prompts, at most `--dynamic_sampling_max_batches` times.

Both decide over every group of an optimizer step: `step_batch.py` makes one generation batch per step,
sampled in chunks of `--generation_chunk_size` sequences.

A rollout counts as correct when the first reward function (accuracy, by convention) gives it at least
`CORRECT_REWARD`. Decisions are taken on rewards gathered from all processes with a seeded `random.Random`,
so every process takes the same ones; only the rows copied from another process travel (`copy_rows`).

The per-prompt ledger `<output_dir>/prompt_ledger.json` (read by `filter_data.py --from_training_log`):

    {"version": 2, "prompts": {"<prompt_id>": {"seen": int, "group_rewards": [float, ...],
                                               "kept_completion_zlib": str | null, "kept_step": int | null}}}

`group_rewards` holds, per group of the prompt, the mean of the first reward function over the model's own
rollouts (before rescue); `kept_completion_zlib` the latest correct completion, UTF-8 text compressed with
zlib, in base64 (`python -c "import base64,zlib; print(zlib.decompress(base64.b64decode(S)).decode())"`);
`kept_step` is the number of optimizer steps done when the kept one was sampled. Version 1 (the completion
as plain `kept_completion` text) is still read.
It is written with every checkpoint (into the checkpoint and the output directory) and when training ends
(kept completions can be long: writing it every step would cost more than it tells), and a resumed run
reads it back from its checkpoint.

The pure logic (`choose_rescues`, `plan_batch`, the row helpers, `PromptLedger`) is unit-tested on
constructed batches; `BatchRepairMixin` wires it into TRL's `GRPOTrainer` (see `train_grpo.PolarisGRPOTrainer`).
"""

import base64
import binascii
import hashlib
import json
import os
import random
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from data import LEDGER_FILE, UserError, prompt_id as problem_prompt_id, write_line


CORRECT_REWARD = 1.0  # accuracy rewards are 1.0 for a right answer, 0.0 otherwise
LEDGER_VERSION = 2  # 2: kept completions zlib-compressed, in base64; version-1 files (plain text) are still read
LEDGER_COMPRESSION_LEVEL = 6  # zlib's default: fixed, so every process compresses to the same bytes


# ----------------------------------------------------------------------------------------------
# Decisions on a batch of known rewards
# ----------------------------------------------------------------------------------------------


def grouped(values: torch.Tensor, num_generations: int) -> torch.Tensor:
    """(num_rows,) -> (num_groups, num_generations); the rows of a group are consecutive, as TRL orders them."""
    if values.shape[0] % num_generations:
        raise ValueError(f"{values.shape[0]} rows do not split into groups of {num_generations}")
    return values.reshape(-1, num_generations)


def informative_groups(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """(num_groups,) bool: the group's rewards differ, so its advantages are not all zero (TRL's test)."""
    groups = grouped(rewards.float(), num_generations)
    mean = torch.nanmean(groups, dim=1, keepdim=True)
    count = (~torch.isnan(groups)).sum(dim=1)
    variance = torch.nanmean((groups - mean) ** 2, dim=1)
    std = torch.where(count > 1, variance.sqrt(), torch.zeros_like(variance))
    std = torch.nan_to_num(std, nan=0.0)
    return ~torch.isclose(std, torch.zeros_like(std))


def correct_rows(rewards_per_func: torch.Tensor) -> torch.Tensor:
    """(num_rows,) bool: the first reward function (accuracy) says the rollout is right. NaN is not right."""
    first = rewards_per_func[:, 0] if rewards_per_func.dim() == 2 else rewards_per_func
    return torch.nan_to_num(first.float(), nan=-float("inf")) >= CORRECT_REWARD


def choose_rescues(correct: torch.Tensor, group_prompt_ids: list[str], num_generations: int, has_kept) -> list[int]:
    """Rows to replace by the kept completion: the last rollout of every group whose rollouts all failed and
    whose prompt has a kept correct completion (`has_kept(prompt_id) -> bool`)."""
    solved_any = grouped(correct, num_generations).any(dim=1).tolist()
    return [
        group * num_generations + num_generations - 1
        for group, (solved, pid) in enumerate(zip(solved_any, group_prompt_ids, strict=True))
        if not solved and has_kept(pid)
    ]


def first_correct_rows(correct: torch.Tensor, num_generations: int) -> dict[int, int]:
    """group -> its first correct row, for the groups with one (the completion the ledger keeps)."""
    found = {}
    for row in torch.nonzero(correct).flatten().tolist():
        found.setdefault(row // num_generations, row)
    return found


def enough_informative(num_informative: int, num_groups: int, min_informative_fraction: float, substitute: bool) -> bool:
    """Whether a batch needs no more fresh groups: substitution can fill it (strictly more than the minimum
    fraction is informative) or, without substitution, every group already is informative."""
    if substitute:
        return num_informative > min_informative_fraction * num_groups + 1e-9
    return num_informative >= num_groups


@dataclass
class RepairPlan:
    """Which group of the pool fills each group slot of the batch. Pool ids: the batch's own groups are
    0..n-1, groups of fresh batches (dynamic sampling) follow."""

    group_sources: list[int]
    fresh_used: int = 0  # zero-variance groups replaced by fresh informative groups
    substituted: int = 0  # zero-variance groups replaced by a copy of an informative group
    kept_unchanged: bool = False  # too few informative groups: substitution skipped
    informative_after: int = 0

    @property
    def changes_rows(self) -> bool:
        return any(source != slot for slot, source in enumerate(self.group_sources))


def plan_batch(
    informative: list[bool],
    min_informative_fraction: float,
    rng: random.Random,
    substitute: bool = True,
    fresh_informative: list[int] = (),
) -> RepairPlan:
    """Plan the repair of one batch given which of its groups are informative.

    Zero-variance groups are first filled with fresh informative groups (pool ids, dynamic sampling), in
    order; the remaining ones, when `substitute` and strictly more than `min_informative_fraction` of the
    groups are then informative, by copies of informative groups drawn without replacement while possible
    (a new draw of all of them when they run out). Otherwise the batch stays as it is and `kept_unchanged`.
    """
    sources = list(range(len(informative)))
    is_informative = list(informative)
    zero_variance = [g for g, ok in enumerate(informative) if not ok]
    fresh = list(fresh_informative)
    plan = RepairPlan(sources)
    for slot in zero_variance[: len(fresh)]:
        sources[slot], is_informative[slot] = fresh[plan.fresh_used], True
        plan.fresh_used += 1
    targets = [g for g, ok in enumerate(is_informative) if not ok]
    donors = [g for g, ok in enumerate(is_informative) if ok]
    if substitute and targets:
        if not donors or not enough_informative(len(donors), len(informative), min_informative_fraction, True):
            plan.kept_unchanged = True
        else:
            pool = []
            for slot in targets:
                if not pool:
                    pool = rng.sample(donors, len(donors))
                sources[slot] = sources[pool.pop()]
                is_informative[slot] = True
                plan.substituted += 1
    plan.informative_after = sum(is_informative)
    return plan


def rescued_row_ratios(ratio_sums: torch.Tensor, token_counts: torch.Tensor, rescued_rows: list[int], num_generations: int) -> dict[int, float]:
    """row -> importance-sampling ratio for every rescued row: the mean ratio of its group's sampled rows
    (per token: `ratio_sums` / `token_counts` over the group; per sequence: counts of 1). A rescued completion
    was not sampled by this policy, so it has no ratio of its own (TRL would give it 1, full weight, while
    its group-mates are down-weighted); it gets the weight its group was given. A group of rescued rows only
    keeps 1."""
    rescued = set(rescued_rows)
    values = {}
    for row in rescued_rows:
        group = row // num_generations
        mates = [r for r in range(group * num_generations, (group + 1) * num_generations) if r not in rescued]
        count = float(sum(token_counts[r] for r in mates))
        values[row] = float(sum(ratio_sums[r] for r in mates)) / count if count > 0 else 1.0
    return values


def row_sources(group_sources: list[int], num_generations: int) -> torch.Tensor:
    """Pool row for every row of the repaired batch: whole groups are copied, row by row."""
    return torch.tensor([source * num_generations + j for source in group_sources for j in range(num_generations)])


# ----------------------------------------------------------------------------------------------
# Copying rows of TRL's batch dict
# ----------------------------------------------------------------------------------------------

# Per-row tensors of `GRPOTrainer._generate_and_score_completions`' output and how each is padded.
PROMPT_FIELDS = {"prompt_ids": "pad", "prompt_mask": 0}  # left-padded to the prompt width
COMPLETION_FIELDS = {  # right-padded to the completion width
    "completion_ids": "pad",
    "completion_mask": 0,
    "tool_mask": 1,
    "old_per_token_logps": 0.0,
    "sampling_per_token_logps": 0.0,
    "ref_per_token_logps": 0.0,
    "importance_sampling_ratio": 1.0,
}
VECTOR_FIELDS = ("advantages",)
RECOMPUTED_FIELDS = ("num_items_in_batch",)  # depends on the rows: recomputed after they change


def row_fields(batch: dict, pad_token_id: int, sequence_level_ratio: bool = False) -> dict:
    """key -> (pad_first, pad_value) for the per-row tensors of `batch` (pad_first None: no width to pad).

    Anything else in the batch (images, ...) cannot be copied row by row: refuse rather than train on a
    batch whose rows no longer match."""
    fields = {}
    for key, value in batch.items():
        if value is None or key in RECOMPUTED_FIELDS:
            continue
        if key in PROMPT_FIELDS:
            fields[key] = (True, pad_token_id if PROMPT_FIELDS[key] == "pad" else PROMPT_FIELDS[key])
        elif key in COMPLETION_FIELDS:
            per_sequence = key == "importance_sampling_ratio" and sequence_level_ratio
            pad_value = pad_token_id if COMPLETION_FIELDS[key] == "pad" else COMPLETION_FIELDS[key]
            fields[key] = (None if per_sequence else False, pad_value)
        elif key in VECTOR_FIELDS:
            fields[key] = (None, 0)
        else:
            raise ValueError(
                f"cannot copy the rows of a batch holding '{key}' (multimodal or custom rollouts): "
                "turn off --informative_substitution and --dynamic_sampling"
            )
    return fields


def pad_width(tensor: torch.Tensor, width: int, pad_first: bool, value) -> torch.Tensor:
    missing = width - tensor.shape[1]
    if missing <= 0:
        return tensor
    padding = torch.full((tensor.shape[0], missing, *tensor.shape[2:]), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([padding, tensor] if pad_first else [tensor, padding], dim=1)


def merge_rows(batches: list[dict], fields: dict) -> dict:
    """Concatenate the rows of several batches, padding prompt/completion tensors to common widths."""
    merged = {}
    for key, (pad_first, value) in fields.items():
        tensors = [batch[key] for batch in batches]
        if pad_first is not None:
            width = max(t.shape[1] for t in tensors)
            tensors = [pad_width(t, width, pad_first, value) for t in tensors]
        merged[key] = torch.cat(tensors, dim=0)
    return merged


def take_rows(rows: dict, index: torch.Tensor) -> dict:
    """The rows `index` of every per-row tensor, in that order."""
    return {key: tensor[index.to(tensor.device)] for key, tensor in rows.items()}


def row_owner(pool_row: int, local_rows: int, num_processes: int) -> tuple[int, int]:
    """(process, row of that process' own pool) of a pool row: each batch of the pool is every process'
    `local_rows` rows in process order, and a process' own pool is its rows of every batch, batch by batch."""
    batch, within = divmod(pool_row, local_rows * num_processes)
    process, index = divmod(within, local_rows)
    return process, batch * local_rows + index


def rows_to_send(sources: list[int], local_rows: int, num_processes: int) -> list[list[int]]:
    """Per process, the pool rows it sends: those that fill a slot on another process (each once, in order).
    Every process computes the same lists from the same plan."""
    sends = [set() for _ in range(num_processes)]
    for slot, source in enumerate(sources):
        owner, _ = row_owner(source, local_rows, num_processes)
        if owner != slot // local_rows:
            sends[owner].add(source)
    return [sorted(rows) for rows in sends]


def global_widths(accelerator, batches: list[dict], fields: dict) -> dict[str, int]:
    """The widest prompt / completion tensor of any process and batch, per field: the width gathering the
    whole batch would pad to, so rows come out the same however many processes there are."""
    padded = [key for key, (pad_first, _) in fields.items() if pad_first is not None]
    if not padded:
        return {}
    local = torch.tensor([max(batch[key].shape[1] for batch in batches) for key in padded], device=batches[0][padded[0]].device)
    widest = accelerator.gather(local.unsqueeze(0)).reshape(-1, len(padded)).max(dim=0).values.tolist()
    return dict(zip(padded, widest, strict=True))


def own_rows(batches: list[dict], fields: dict, widths: dict[str, int]) -> dict:
    """This process' rows of every batch of the pool, batch by batch, padded to the common widths."""
    own = {}
    for key, (pad_first, value) in fields.items():
        tensors = [batch[key] for batch in batches]
        if pad_first is not None:
            tensors = [pad_width(t, widths[key], pad_first, value) for t in tensors]
        own[key] = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
    return own


def copy_rows(accelerator, batches: list[dict], fields: dict, sources: list[int], broadcast=None) -> dict:
    """This process' rows of the repaired batch: slot i of all processes gets pool row `sources[i]`.

    Rows a process owns are taken locally. Each row that fills a slot on another process is broadcast once
    by its owner, one owner and one field at a time, so beyond its new rows a process holds at most one
    owner's copied rows of one field. The rows equal those of gathering every process' rows (`merge_rows`)
    and taking the slots' (`take_rows`), at the same widths, so a run copies the same rows on any number of processes. `broadcast(tensor, from_process)`
    defaults to accelerate's (in place)."""
    if broadcast is None:
        from accelerate.utils import broadcast
    local_rows = batches[0]["completion_ids"].shape[0]
    num_processes, process = accelerator.num_processes, accelerator.process_index
    own = own_rows(batches, fields, global_widths(accelerator, batches, fields))
    slots = range(process * local_rows, (process + 1) * local_rows)
    owners = [row_owner(sources[slot], local_rows, num_processes)[0] for slot in slots]
    local_index = torch.tensor([row_owner(sources[slot], local_rows, num_processes)[1] if owner == process else 0 for slot, owner in zip(slots, owners)])
    output = {key: tensor[local_index.to(tensor.device)] for key, tensor in own.items()}
    # Every process walks the same owners and fields in the same order: the broadcasts pair up.
    for owner, rows in enumerate(rows_to_send(sources, local_rows, num_processes)):
        if not rows:
            continue
        position = {row: j for j, row in enumerate(rows)}
        wanted = [(i, position[sources[slot]]) for i, slot in enumerate(slots) if owners[i] == owner != process]
        index = torch.tensor([row_owner(row, local_rows, num_processes)[1] for row in rows])
        for key, tensor in own.items():
            if owner == process:
                buffer = tensor[index.to(tensor.device)]
            else:
                buffer = torch.empty((len(rows), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
            buffer = broadcast(buffer, owner)
            if wanted:
                targets = torch.tensor([i for i, _ in wanted], device=tensor.device)
                output[key][targets] = buffer[torch.tensor([j for _, j in wanted], device=tensor.device)]
            del buffer
    return output


def loss_token_count(batch: dict) -> torch.Tensor:
    """Tokens that carry loss in this process' rows (TRL's `num_items_in_batch` before gathering)."""
    mask = batch["completion_mask"]
    if batch.get("tool_mask") is not None:
        mask = mask * batch["tool_mask"]
    return mask.sum()


# ----------------------------------------------------------------------------------------------
# Per-prompt ledger
# ----------------------------------------------------------------------------------------------


def compress_completion(text: str) -> bytes:
    return zlib.compress(text.encode("utf-8"), LEDGER_COMPRESSION_LEVEL)


def decompress_completion(blob: bytes) -> str:
    return zlib.decompress(blob).decode("utf-8")


class PromptLedger:
    """Per prompt: groups seen, the mean reward of each, and the latest correct completion (the rescue buffer).

    At POLARIS's scale (53K prompts, correct completions of up to 52K tokens, a ledger on every process) the
    kept completions are nearly all of it: each is held zlib-compressed (`kept_zlib`), replaced rather than
    added to, and decompressed only when a group needs rescuing. Digest and file are produced entry by
    entry, never as one string of the whole ledger."""

    def __init__(self, prompts: dict | None = None):
        self.prompts = prompts if prompts is not None else {}

    def record(self, prompt_id: str, mean_reward: float, kept_completion: str | None = None, step: int | None = None,
               kept_zlib: bytes | None = None):  # fmt: skip
        """One group of `prompt_id`; a correct completion (text, or already compressed) replaces the kept one."""
        entry = self.prompts.setdefault(prompt_id, {"seen": 0, "group_rewards": [], "kept_zlib": None, "kept_step": None})
        entry["seen"] += 1
        entry["group_rewards"].append(None if mean_reward != mean_reward else round(float(mean_reward), 6))
        if kept_completion is not None:
            kept_zlib = compress_completion(kept_completion)
        if kept_zlib is not None:
            entry["kept_zlib"], entry["kept_step"] = kept_zlib, step

    def has_kept(self, prompt_id: str) -> bool:
        entry = self.prompts.get(prompt_id)
        return bool(entry and entry["kept_zlib"] is not None)

    def kept_completion(self, prompt_id: str) -> str | None:
        return decompress_completion(self.prompts[prompt_id]["kept_zlib"]) if self.has_kept(prompt_id) else None

    @staticmethod
    def entry_json(entry: dict) -> dict:
        """An entry as the file holds it: the compressed completion in base64."""
        kept = entry["kept_zlib"]
        return {
            "seen": entry["seen"], "group_rewards": entry["group_rewards"],
            "kept_completion_zlib": base64.b64encode(kept).decode("ascii") if kept is not None else None,
            "kept_step": entry["kept_step"],
        }  # fmt: skip

    def json_chunks(self):
        """The file's text, one entry at a time."""
        yield f'{{"version": {LEDGER_VERSION}, "prompts": {{'
        for i, (prompt_id, entry) in enumerate(self.prompts.items()):
            yield ("" if i == 0 else ", ") + json.dumps(prompt_id) + ": " + json.dumps(self.entry_json(entry))
        yield "}}"

    def digest(self) -> str:
        """A hash of the content (every process compares theirs at each checkpoint), streamed entry by entry."""
        digest = hashlib.sha1()
        for prompt_id in sorted(self.prompts):
            entry = self.prompts[prompt_id]
            digest.update(json.dumps([prompt_id, entry["seen"], entry["group_rewards"], entry["kept_step"]]).encode())
            digest.update(entry["kept_zlib"] or b"-")
        return digest.hexdigest()

    def save(self, path) -> Path:
        """Write atomically, entry by entry: a reader (filter_data.py) never sees half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with temporary.open("w") as file:
            for chunk in self.json_chunks():
                file.write(chunk)
        os.replace(temporary, path)
        return path

    @classmethod
    def load(cls, path) -> "PromptLedger":
        """A version-2 ledger, or a version-1 one (plain-text completions, compressed as they are read)."""
        try:
            content = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise UserError(f"cannot read the prompt ledger {path}: {error}") from error
        if not isinstance(content, dict) or content.get("version") not in (1, LEDGER_VERSION) or not isinstance(content.get("prompts"), dict):
            raise UserError(f"{path} is not a version-1 or version-{LEDGER_VERSION} prompt ledger")
        prompts = {}
        try:
            for prompt_id, entry in content["prompts"].items():
                if content["version"] == 1:
                    kept = compress_completion(entry["kept_completion"]) if entry.get("kept_completion") is not None else None
                else:
                    kept = base64.b64decode(entry["kept_completion_zlib"]) if entry.get("kept_completion_zlib") is not None else None
                rewards = [None if r is None else float(r) for r in entry.get("group_rewards") or []]
                prompts[prompt_id] = {"seen": entry.get("seen", len(rewards)), "group_rewards": rewards, "kept_zlib": kept, "kept_step": entry.get("kept_step")}
        except (AttributeError, TypeError, ValueError, binascii.Error) as error:
            raise UserError(f"{path}: malformed prompt ledger entry ({error})") from error
        return cls(prompts)

    def group_rewards(self) -> dict[str, list[float]]:
        """{prompt_id: the mean reward of each of its groups, in order}; a group that could not be scored (null)
        tells nothing and is left out."""
        return {prompt_id: [r for r in entry["group_rewards"] if r is not None] for prompt_id, entry in self.prompts.items()}


def pooled_mean_rewards(group_rewards: dict[str, list]) -> dict[str, float]:
    """prompt_id -> the mean of its groups' mean rewards (groups that could not be scored are left out)."""
    pooled = {}
    for pid, rewards in group_rewards.items():
        known = [float(r) for r in rewards or [] if r is not None]
        if known:
            pooled[pid] = sum(known) / len(known)
    return pooled


def mastered_prompts(group_rewards: dict[str, list], max_mean_reward: float) -> set[str]:
    """The prompts a stage refresh drops: pooled mean reward above `max_mean_reward` (POLARIS: 0.9)."""
    return {pid for pid, mean in pooled_mean_rewards(group_rewards).items() if mean > max_mean_reward}


def row_prompt_id(row: dict) -> str:
    """The row's `prompt_id` column (data.py adds it), else a hash of its prompt."""
    if row.get("prompt_id") is not None:
        return str(row["prompt_id"])
    prompt = row.get("prompt")
    return problem_prompt_id(prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, default=str))


# ----------------------------------------------------------------------------------------------
# The trainer side
# ----------------------------------------------------------------------------------------------


@dataclass
class ScoredBatch:
    """One generation batch as TRL returns it, with what the repair needs to know about its groups."""

    output: dict  # this process' rows
    informative_before: torch.Tensor  # (num_groups,) before rescue: the model's own rollouts
    informative: torch.Tensor  # (num_groups,) after rescue
    solve_none: int
    solve_all: int
    rescued: int
    rewards: torch.Tensor  # (num_rows,) weighted reward of every row, all processes, after rescue
    rewards_before: torch.Tensor  # (num_rows,) the same before rescue
    lengths: torch.Tensor  # (num_rows,) completion tokens of every row, all processes, after rescue


class BatchRepairMixin:
    """Rollout rescue, informative substitution, dynamic sampling and the per-prompt ledger for a subclass of
    TRL's `GRPOTrainer` (place it before `GRPOTrainer` in the bases). Settings come from the `PolarisConfig`
    fields `rollout_rescue`, `informative_substitution`, `min_informative_fraction`, `dynamic_sampling` and
    `dynamic_sampling_max_batches`; a plain `GRPOConfig` turns everything but the ledger off.

    Hooks into TRL 1.16: `_generate` (rescue, after sampling, before old log-probs and rewards),
    `_calculate_rewards` (reuses the scores rescue computed), `_generate_and_score_completions` (ledger,
    substitution, dynamic sampling), `_save_checkpoint` / `log` / `_load_optimizer_and_scheduler` (ledger
    file), `recipe_state` / `load_recipe_state` (whole-run counts, checkpoints.py)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ledger = PromptLedger()
        self.repair_totals = Counter()  # whole-run counts (see `repair_summary`)
        self.refreshes = []  # one record per stage refresh
        self._generation_inputs = None  # rows being generated, for the rewards rescue computes
        self._group_prompt_ids = None  # prompt id of every group of the batch, all processes
        self._generated_completion_ids = None  # this process' completion token ids, after rescue
        self._rewards_before_rescue = None  # gathered rewards_per_func of the model's own rollouts
        self._rescued_rewards = None  # gathered rewards_per_func after rescue, handed to TRL's scoring
        self._batch_rewards = None  # gathered rewards_per_func TRL used for the advantages
        self._num_rescued = 0
        self._rescued_rows = []  # gathered row indices of the rescued rollouts
        self.dropped_prompt_ids = set()  # mastered prompts dropped by stage refreshes: never trained on again
        self._remaining_rows = None  # dataset rows still sampled, once prompts were dropped
        self._check_repair_supported()

    # -- settings --

    def _setting(self, name, default=False):
        return getattr(self.args, name, default)

    def _check_repair_supported(self):
        if not (self._setting("rollout_rescue") or self._setting("informative_substitution") or self._setting("dynamic_sampling")):
            return
        if self.tools or self.rollout_func is not None or self.environment_factories is not None or self._is_vlm:
            raise UserError(
                "rollout rescue, informative substitution and dynamic sampling support single-turn text rollouts only: "
                "pass --rollout_rescue false --informative_substitution false --dynamic_sampling false"
            )
        if not 0.0 <= self._setting("min_informative_fraction", 1 / 3) < 1.0:
            raise UserError("--min_informative_fraction must be in [0, 1)")
        if self._setting("dynamic_sampling") and not hasattr(self.train_dataset, "__getitem__"):
            raise UserError("--dynamic_sampling needs a map-style (not streaming) training dataset")

    # -- generation and scoring hooks --

    def _generate(self, prompts):
        generated = super()._generate(prompts)
        if not self.model.training:
            return generated
        prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images = generated
        self._generated_completion_ids = completion_ids
        if self._setting("rollout_rescue"):
            completion_ids, completions, logprobs = self._rescue_rollouts(prompts, completion_ids, completions, logprobs)
        return prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards, self._rescued_rewards = self._rescued_rewards, None
        if rewards is None:
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._batch_rewards = rewards
        return rewards

    def _rescue_rollouts(self, prompts, completion_ids, completions, logprobs):
        """Score the rollouts once; in every all-failed group whose prompt has a kept correct completion, put
        that completion in place of the last rollout; rescore only the replaced rows; keep all the scores for
        TRL's own reward step, so it neither scores twice nor misses the replacement."""
        inputs = self._generation_inputs
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids)  # gathered
        self._rewards_before_rescue = rewards
        rows = choose_rescues(
            correct_rows(rewards), self._group_prompt_ids, self.num_generations,
            self.ledger.has_kept,
        )
        self._num_rescued, self._rescued_rows = len(rows), rows
        if rows:
            completion_ids, completions, logprobs = list(completion_ids), list(completions), logprobs
            local_rows, offset = len(prompts), self.accelerator.process_index * len(prompts)
            for row in rows:
                if offset <= row < offset + local_rows:
                    i = row - offset
                    kept = self.ledger.kept_completion(self._group_prompt_ids[row // self.num_generations])
                    completion_ids[i] = self._encode_completion(kept)
                    text = self._decode_completion(completion_ids[i])
                    completions[i] = [{"role": "assistant", "content": text}] if isinstance(completions[i], list) else text
                    if logprobs is not None:  # not sampled: no sampling log-probs (NaN = no correction)
                        logprobs = list(logprobs)
                        logprobs[i] = [None] * len(completion_ids[i])
            rewards = self._rescore_rows(rows, inputs, prompts, completions, completion_ids, rewards.clone())
            self._generated_completion_ids = completion_ids
        self._rescued_rewards = rewards
        return completion_ids, completions, logprobs

    def _rescore_rows(self, rows, inputs, prompts, completions, completion_ids, rewards):
        """Score the replaced rows. TRL's scoring gathers across processes, so every process scores the same
        number of rows (padding with repeats) and keeps the scores of the real ones."""
        local_rows, num_processes = len(prompts), self.accelerator.num_processes
        per_process = [[r - p * local_rows for r in rows if p * local_rows <= r < (p + 1) * local_rows] for p in range(num_processes)]
        count = max(len(local) for local in per_process)
        local = per_process[self.accelerator.process_index]
        picks = local + [local[0] if local else 0] * (count - len(local))
        # Reward functions may log extra columns and metrics per row; the batch already logged them once.
        saved_extra = {k: list(v) for k, v in self._pending_extra_logs.items()}
        saved_metrics = {k: list(v) for k, v in self._pending_metrics.items()}
        scores = super()._calculate_rewards(
            [inputs[i] for i in picks], [prompts[i] for i in picks],
            [completions[i] for i in picks], [completion_ids[i] for i in picks],
        )
        self._pending_extra_logs.clear()
        self._pending_extra_logs.update(saved_extra)
        self._pending_metrics.clear()
        self._pending_metrics.update(saved_metrics)
        for p, local_list in enumerate(per_process):
            for j, i in enumerate(local_list):
                rewards[p * local_rows + i] = scores[p * count + j]
        return rewards

    def _encode_completion(self, text: str) -> list[int]:
        """Token ids of a kept completion, ended by EOS and cut to the current completion length."""
        tokenizer = self._tokenizer
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else self.eos_token_ids[0]
        return (list(ids) + [eos])[: self.max_completion_length]

    def _decode_completion(self, ids) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    # -- the batch --

    def _score_batch(self, inputs) -> ScoredBatch:
        """Generate and score with TRL (rescue happens inside), then record every group in the ledger."""
        num_generations = self.num_generations
        self._generation_inputs = inputs
        self._group_prompt_ids = gather_object_list([row_prompt_id(row) for row in inputs])[::num_generations]
        self._rewards_before_rescue, self._rescued_rewards, self._num_rescued, self._rescued_rows = None, None, 0, []
        output = super()._generate_and_score_completions(inputs)
        if self._rescued_rows and output.get("importance_sampling_ratio") is not None:
            self._align_rescued_ratios(output)

        before = self._rewards_before_rescue if self._rewards_before_rescue is not None else self._batch_rewards
        weights = self.reward_weights.to(before.device)
        correct = correct_rows(before)
        solved = grouped(correct, num_generations).sum(dim=1)
        self._record_in_ledger(before, correct, len(inputs))
        rewards_before, rewards = (weighted_rewards(r, weights) for r in (before, self._batch_rewards))
        lengths = torch.tensor([len(ids) for ids in self._generated_completion_ids], device=self.accelerator.device)
        return ScoredBatch(
            output=output,
            informative_before=informative_groups(rewards_before, num_generations).cpu(),
            informative=informative_groups(rewards, num_generations).cpu(),
            solve_none=int((solved == 0).sum()),
            solve_all=int((solved == num_generations).sum()),
            rescued=self._num_rescued,
            rewards=rewards.cpu(),
            rewards_before=rewards_before.cpu(),
            lengths=self.accelerator.gather(lengths).cpu(),
        )

    def _align_rescued_ratios(self, output: dict) -> None:
        """Rescued rows take their group's mean importance-sampling ratio (see `rescued_row_ratios`)."""
        ratio = output["importance_sampling_ratio"]
        mask = output["completion_mask"] if output.get("tool_mask") is None else output["completion_mask"] * output["tool_mask"]
        if ratio.shape[1] == 1:  # one ratio per sequence
            sums, counts = ratio[:, 0], torch.ones_like(ratio[:, 0])
        else:
            sums, counts = (ratio * mask).sum(dim=1), mask.sum(dim=1).to(ratio.dtype)
        sums, counts = self.accelerator.gather(sums).cpu(), self.accelerator.gather(counts).cpu()
        values = rescued_row_ratios(sums, counts, self._rescued_rows, self.num_generations)
        offset, local_rows = self.accelerator.process_index * ratio.shape[0], ratio.shape[0]
        for row, value in values.items():
            if offset <= row < offset + local_rows:
                ratio[row - offset] = value

    def _record_in_ledger(self, rewards, correct, local_rows):
        """Every process records the same groups (gathered rewards), so all ledgers stay identical. The kept
        completions travel between processes compressed."""
        num_generations = self.num_generations
        keep = first_correct_rows(correct, num_generations)
        offset = self.accelerator.process_index * local_rows
        local_kept = [
            (row, compress_completion(self._decode_completion(self._generated_completion_ids[row - offset])))
            for row in keep.values()
            if offset <= row < offset + local_rows
        ]
        kept_by_row = dict(gather_object_list(local_kept))
        means = torch.nanmean(grouped(rewards[:, 0].float(), num_generations), dim=1).tolist()
        for group, (pid, mean) in enumerate(zip(self._group_prompt_ids, means, strict=True)):
            kept = kept_by_row.get(keep[group]) if group in keep else None
            self.ledger.record(pid, mean, step=self.state.global_step, kept_zlib=kept)

    def _fresh_inputs(self, local_rows: int, attempt: int) -> list[dict]:
        """A new generation batch of random training prompts (dynamic sampling), the same on every process."""
        num_generations, num_processes = self.num_generations, self.accelerator.num_processes
        num_groups = local_rows * num_processes // num_generations
        # Seeded by the generation round (TRL's micro-step counter, restored on resume), not only the step.
        rng = random.Random(f"{self.args.seed}-fresh-{self.state.global_step}-{self._step}-{attempt}")
        picks = draw_rows(rng, self._sampled_rows(), num_groups)
        rows = [index for index in picks for _ in range(num_generations)]
        start = self.accelerator.process_index * local_rows
        return [self.train_dataset[index] for index in rows[start : start + local_rows]]

    # -- stage refresh: mastered prompts are not sampled again --

    def refresh_training_data(self, stage: int | None = None) -> dict:
        """Drop the prompts the ledger shows mastered (`filter_data.py --from_training_log`'s rule, threshold
        `--refresh_max_mean_reward`); prompts never seen stay. Later batches draw other prompts in their place."""
        threshold = self._setting("refresh_max_mean_reward", 0.9)
        ids = self._dataset_prompt_ids()
        in_dataset = set(ids)
        before = len(self.dropped_prompt_ids & in_dataset)
        mastered = mastered_prompts({pid: e["group_rewards"] for pid, e in self.ledger.prompts.items()}, threshold)
        self.dropped_prompt_ids |= mastered & in_dataset
        self._remaining_rows = [i for i, pid in enumerate(ids) if pid not in self.dropped_prompt_ids]
        dropped = len(self.dropped_prompt_ids & in_dataset)
        counts = {
            "stage": stage, "step": self.state.global_step, "dropped": dropped - before, "dropped_in_all": dropped,
            "never_seen": len(in_dataset - self.ledger.prompts.keys()), "remaining": len(self._remaining_rows),
        }
        self.refreshes.append(counts)
        if self.accelerator.is_main_process:
            write_line(
                f"Refresh at step {counts['step']}: dropped {counts['dropped']} prompts with mean reward above {threshold:g} "
                f"({dropped} of {len(in_dataset)} in all, {counts['never_seen']} never seen); sampling from the "
                f"{counts['remaining']} training rows left",
            )
        return counts

    def _dataset_prompt_ids(self) -> list[str]:
        dataset = self.train_dataset
        if "prompt_id" in getattr(dataset, "column_names", []):
            return [str(pid) for pid in dataset["prompt_id"]]
        return [row_prompt_id(row) for row in dataset]

    def _sampled_rows(self) -> Sequence[int]:
        """Dataset rows still trained on (all of them until a refresh drops some)."""
        if not self.dropped_prompt_ids:
            return range(len(self.train_dataset))
        if self._remaining_rows is None:
            self._remaining_rows = [i for i, pid in enumerate(self._dataset_prompt_ids()) if pid not in self.dropped_prompt_ids]
        return self._remaining_rows

    def _without_dropped(self, inputs: list[dict]) -> list[dict]:
        """Replace the groups of dropped prompts by groups of prompts still sampled, drawn the same way on every
        process (seeded by the generation round)."""
        num_generations = self.num_generations
        group_ids = gather_object_list([row_prompt_id(row) for row in inputs])[::num_generations]
        dropped = [g for g, pid in enumerate(group_ids) if pid in self.dropped_prompt_ids]
        remaining = self._sampled_rows()
        if not dropped or not remaining:
            return inputs
        rng = random.Random(f"{self.args.seed}-refresh-{self.state.global_step}-{self._step}")
        picks = draw_rows(rng, remaining, len(dropped))
        rows, start = list(inputs), self.accelerator.process_index * len(inputs)
        for group, index in zip(dropped, picks):
            for row in range(group * num_generations, (group + 1) * num_generations):
                if start <= row < start + len(inputs):
                    rows[row - start] = self.train_dataset[index]
        self.repair_totals["groups_of_dropped_prompts_replaced"] += len(dropped)
        return rows

    def _generate_and_score_completions(self, inputs):
        if not self.model.training:
            return super()._generate_and_score_completions(inputs)
        if self.dropped_prompt_ids:
            inputs = self._without_dropped(inputs)
        substitute = self._setting("informative_substitution")
        min_fraction = self._setting("min_informative_fraction", 1 / 3)
        batches = [self._score_batch(inputs)]
        first = batches[0]
        num_groups = first.informative.numel()

        fresh, extra_seconds = [], 0.0
        if self._setting("dynamic_sampling"):
            start = time.perf_counter()
            while not enough_informative(int(first.informative.sum()) + len(fresh), num_groups, min_fraction, substitute) and (
                len(batches) <= self._setting("dynamic_sampling_max_batches", 3)
            ):
                extra = self._score_batch(self._fresh_inputs(len(inputs), len(batches)))
                fresh += [num_groups * len(batches) + g for g in torch.nonzero(extra.informative).flatten().tolist()]
                batches.append(extra)
            extra_seconds = time.perf_counter() - start

        rng = random.Random(f"{self.args.seed}-substitution-{self.state.global_step}-{self._step}")
        plan = plan_batch(first.informative.tolist(), min_fraction, rng, substitute, fresh)
        output = self._assemble_batch(batches, plan) if plan.changes_rows else first.output
        self._log_repair(first, plan, num_groups, extra_batches=len(batches) - 1, extra_seconds=extra_seconds)
        self._log_trained(batches, plan, num_groups)
        return output

    def _assemble_batch(self, batches: list[ScoredBatch], plan: RepairPlan) -> dict:
        """Copy whole rows (from any process, from any batch of the pool) into this process' slots."""
        first = batches[0].output
        sequence_level = str(getattr(self, "vllm_importance_sampling_mode", None) or "").startswith("sequence")
        fields = row_fields(first, self._tokenizer.pad_token_id, sequence_level)
        sources = row_sources(plan.group_sources, self.num_generations).tolist()
        output = copy_rows(self.accelerator, [batch.output for batch in batches], fields, sources)
        output["num_items_in_batch"] = self.accelerator.gather(loss_token_count(output)).sum()
        return output

    def _log_repair(self, first: ScoredBatch, plan: RepairPlan, num_groups: int, extra_batches: int, extra_seconds: float):
        metrics = {
            "informative_before": float(first.informative_before.float().mean()),
            "informative_after": plan.informative_after / num_groups,
            "groups_rescued": first.rescued,
            "groups_substituted": plan.substituted,
            "solve_none": first.solve_none,
            "solve_all": first.solve_all,
            "all_correct": first.solve_all / num_groups,
            "batch_kept_unchanged": int(plan.kept_unchanged),
        }
        if self._setting("dynamic_sampling"):
            metrics.update(fresh_groups=plan.fresh_used, extra_generation_batches=extra_batches, extra_generation_seconds=extra_seconds)
        for name, value in metrics.items():
            self._metrics["train"][f"repair/{name}"].append(float(value))
        self.repair_totals.update(
            batches=1,
            groups=num_groups,
            informative_groups_before=int(first.informative_before.sum()),
            informative_groups_after=plan.informative_after,
            groups_rescued=first.rescued,
            groups_substituted=plan.substituted,
            fresh_groups=plan.fresh_used,
            solve_none=first.solve_none,
            solve_all=first.solve_all,
            batches_kept_unchanged=int(plan.kept_unchanged),
            extra_generation_batches=extra_batches,
        )
        self.repair_totals["extra_generation_seconds"] += extra_seconds

    def _log_trained(self, batches: list[ScoredBatch], plan: RepairPlan, num_groups: int):
        """What the step trains on, after rescue, substitution and dynamic sampling, beside TRL's `reward`,
        `frac_reward_zero_std` and `completions/*`, which describe the generation batch before the repair."""
        rows = row_sources(plan.group_sources, self.num_generations)
        rewards = torch.cat([batch.rewards for batch in batches])[rows]
        lengths = torch.cat([batch.lengths for batch in batches])[rows].float()
        metrics = {
            "sampled/reward": torch.nanmean(batches[0].rewards_before).item(),  # the model's own rollouts
            "trained/reward": torch.nanmean(rewards).item(),
            "trained/frac_reward_zero_std": 1.0 - plan.informative_after / num_groups,
            "trained/completions/mean_length": lengths.mean().item(),
            "trained/completions/max_length": lengths.max().item(),
        }
        for name, value in metrics.items():
            self._metrics["train"][name].append(float(value))

    def repair_summary(self) -> dict:
        """Whole-run counts, with the informative fraction of generated and of trained groups."""
        totals = dict(self.repair_totals)
        groups = totals.get("groups", 0)
        if groups:
            totals["informative_fraction_before"] = totals.get("informative_groups_before", 0) / groups
            totals["informative_fraction_after"] = totals.get("informative_groups_after", 0) / groups
        totals["extra_generation_seconds"] = round(totals.get("extra_generation_seconds", 0.0), 2)
        return totals

    # -- the ledger file --

    def save_ledger(self, directory=None) -> Path | None:
        if not self.accelerator.is_main_process:
            return None
        return self.ledger.save(Path(directory or self.args.output_dir) / LEDGER_FILE)

    def log(self, logs, start_time=None):
        super().log(logs, start_time)
        if "train_runtime" in logs:  # the last log of `train()`: the run's final ledger
            self.save_ledger()

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        digests = gather_object_list([self.ledger.digest()])
        if len(set(digests)) > 1:  # every process takes the same decisions; a difference is a bug, not noise
            raise RuntimeError(f"the prompt ledgers of the processes differ: {digests}")
        checkpoint = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            self.save_ledger(checkpoint)
            self.save_ledger()

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and (Path(checkpoint) / LEDGER_FILE).is_file():
            self.ledger = PromptLedger.load(Path(checkpoint) / LEDGER_FILE)

    # -- the whole-run counts, kept in checkpoints.py's recipe_state.json --

    def recipe_state(self) -> dict:
        parent = getattr(super(), "recipe_state", None)
        state = parent() if parent else {}
        state["repair_totals"] = dict(self.repair_totals)
        state["dropped_prompt_ids"] = sorted(self.dropped_prompt_ids)
        state["refreshes"] = self.refreshes
        return state

    def load_recipe_state(self, state: dict) -> None:
        parent = getattr(super(), "load_recipe_state", None)
        if parent:
            parent(state)
        self.repair_totals = Counter(state.get("repair_totals") or {})
        self.dropped_prompt_ids = set(state.get("dropped_prompt_ids") or [])
        self.refreshes = list(state.get("refreshes") or [])
        self._remaining_rows = None


def draw_rows(rng: random.Random, rows: Sequence[int], count: int) -> list[int]:
    """`count` of `rows`, without replacement while there are enough."""
    return rng.sample(rows, count) if count <= len(rows) else rng.choices(rows, k=count)


def weighted_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(num_rows,) the weighted sum TRL's advantages start from; NaN where no function scored the row."""
    total = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
    return total.masked_fill(torch.isnan(rewards_per_func).all(dim=1), float("nan"))


def gather_object_list(values: list) -> list:
    """The lists of all processes, concatenated in process order (the list itself with one process)."""
    from accelerate.utils import gather_object

    return gather_object(values)
