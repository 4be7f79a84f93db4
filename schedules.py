"""Multi-stage training inside one run: the stage schedule, applying a stage's temperature and length to
TRL, the conditions that start a stage, and the temperature search at a stage's start.

POLARIS trains in stages: the rollout temperature is raised as RL lowers the model's entropy
(Qwen3-4B 1.4 -> 1.45 -> 1.5) and the response length grows (40K -> 48K -> 52K tokens). POLARIS
restarts a run per stage; here a stage schedule switches both inside one run:

    # recipe (YAML)
    stages:
      - {step: 0, temperature: 1.4, max_completion_length: 39936}
      - {step: 300, temperature: 1.45, max_completion_length: 48128}

    # command line
    python train_grpo.py ... --stages "0:1.4:39936,300:1.45:48128"

A stage starts at the optimizer step `step` (0-based, `trainer.state.global_step`), so a stage at
step 300 governs the 301st step and after. A stage at step 0 replaces `--temperature` and
`--max_completion_length`; without one, those two govern the steps before the first stage.
`StageScheduleCallback` calls `apply_stage` at each boundary, which updates every place TRL 1.16 reads
the two values (`apply_stage` below lists them). Logged with every training log: `schedule/stage`
(1-based), `schedule/temperature`, `schedule/max_completion_length`. The stages are parsed once, when the
config is built (`resolve_stage_config`); everything about a stage's temperature lives here.

A stage with `search_temperatures` probes its candidates with the current model when it starts and picks
one by the diversity rule of temperature_sweep.py, the arithmetic `evaluate.py --sweep_temperature` uses.
"""

import math
from dataclasses import dataclass, replace
from pathlib import Path

from transformers import TrainerCallback

from data import UserError, write_line
from temperature_sweep import describe_rule, format_sweep_table, recommend_temperature, sweep_row, write_sweep_report


# ----------------------------------------------------------------------------------------------
# The stage schedule
# ----------------------------------------------------------------------------------------------


# What a condition may watch: a short name, or any key of the training log.
CONDITION_METRICS = {
    "truncated": "completions/clipped_ratio",  # completions cut at max_completion_length: the length is binding
    "all_correct": "repair/all_correct",  # groups whose rollouts are all right: the data is getting easy
    "reward": "sampled/reward",  # mean reward of the model's own rollouts
    "informative": "repair/informative_before",  # groups with mixed rewards, before repair
}
CONDITION_FORMAT = "{metric: truncated|all_correct|reward|informative|<log key>, above: X or below: X, steps: N}"


@dataclass(frozen=True)
class Condition:
    """`metric` above (or below) `threshold` at each of the last `steps` optimizer steps of the stage before."""

    metric: str
    threshold: float
    above: bool = True
    steps: int = 5

    @property
    def log_key(self) -> str:
        return CONDITION_METRICS.get(self.metric, self.metric)

    def holds(self, value: float) -> bool:
        return value > self.threshold if self.above else value < self.threshold

    def describe(self) -> str:
        return f"{self.metric} {'above' if self.above else 'below'} {self.threshold:g} for {self.steps} steps"


@dataclass(frozen=True)
class Stage:
    """From optimizer step `step` on, sample at `temperature` with at most `max_completion_length` tokens.

    With `when`, the stage starts as soon as its condition has held over the last `when.steps` steps, and at
    `step` at the latest. With `refresh_data`, the prompts the run has mastered are dropped when it starts."""

    step: int
    temperature: float
    max_completion_length: int
    when: Condition | None = None
    refresh_data: bool = False
    search_temperatures: tuple[float, ...] | None = None  # chosen among these by diversity when the stage starts


STAGE_KEYS = ("step", "temperature", "max_completion_length")
OPTIONAL_STAGE_KEYS = ("when", "refresh_data", "search_temperatures")
STAGE_FORMAT = (
    'a list of {step, temperature, max_completion_length[, when, refresh_data]} or "STEP:TEMPERATURE:LENGTH,..." '
    '(e.g. "0:1.4:39936,300:1.45:48128")'
)


def _stage_from_text(text: str) -> Stage:
    parts = text.strip().split(":")
    if len(parts) != 3:
        raise UserError(f"stage '{text.strip()}' is not STEP:TEMPERATURE:LENGTH: write stages as {STAGE_FORMAT}")
    return _stage_from_mapping(dict(zip(STAGE_KEYS, parts)), shown=f"'{text.strip()}'")


def _stage_from_mapping(mapping: dict, shown: str | None = None) -> Stage:
    shown = shown or str(dict(mapping))
    missing = [key for key in STAGE_KEYS if key not in mapping]
    unknown = [key for key in mapping if key not in STAGE_KEYS + OPTIONAL_STAGE_KEYS]
    if missing or unknown:
        problem = f"lacks {', '.join(missing)}" if missing else f"has unknown keys {', '.join(map(str, unknown))}"
        raise UserError(f"stage {shown} {problem}: write stages as {STAGE_FORMAT}")
    try:
        step, length = _as_int(mapping["step"]), _as_int(mapping["max_completion_length"])
        temperature = float(mapping["temperature"])
    except (TypeError, ValueError):
        raise UserError(
            f"stage {shown} is not numbers: step and max_completion_length must be whole numbers, temperature a number "
            f"(write stages as {STAGE_FORMAT})"
        ) from None
    refresh = mapping.get("refresh_data", False)
    if not isinstance(refresh, bool):
        raise UserError(f"stage {shown}: refresh_data must be true or false")
    return Stage(step, temperature, length, _condition(mapping.get("when"), shown), refresh, _candidates(mapping.get("search_temperatures"), shown))


def _candidates(value, shown: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        candidates = tuple(sorted(float(t) for t in value))
    except (TypeError, ValueError):
        raise UserError(f"stage {shown}: search_temperatures must be a list of temperatures, e.g. [1.45, 1.5, 1.55]") from None
    if len(candidates) < 2 or not all(t > 0 and math.isfinite(t) for t in candidates):
        raise UserError(f"stage {shown}: search_temperatures needs two or more temperatures above 0")
    return candidates


def _condition(value, shown: str) -> Condition | None:
    if value is None or isinstance(value, Condition):
        return value
    if not isinstance(value, dict) or "metric" not in value or ("above" in value) == ("below" in value):
        raise UserError(f"stage {shown}: `when` must be {CONDITION_FORMAT} (one of above / below)")
    unknown = set(value) - {"metric", "above", "below", "steps", "threshold"}
    if unknown:
        raise UserError(f"stage {shown}: `when` has unknown keys {', '.join(sorted(map(str, unknown)))}: write {CONDITION_FORMAT}")
    try:
        threshold = float(value["above"] if "above" in value else value["below"])
        steps = _as_int(value.get("steps", 5))
    except (TypeError, ValueError):
        raise UserError(f"stage {shown}: `when` needs a number for above/below and a whole number of steps") from None
    if steps < 1:
        raise UserError(f"stage {shown}: `when` must hold for at least 1 step")
    return Condition(str(value["metric"]), threshold, "above" in value, steps)


def _as_int(value) -> int:
    number = float(value)
    if not number.is_integer():
        raise ValueError(value)
    return int(number)


def parse_stages(value) -> list[Stage] | None:
    """Read a stage schedule from the command-line string, a YAML list (of mappings or strings) or
    `Stage`s, and validate it: steps start at 0 or more and increase, temperatures are positive,
    lengths are positive integers. Returns None for an empty value; raises `UserError` otherwise."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str) and value.strip().startswith("["):  # a YAML / JSON list on the command line
        import yaml

        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise UserError(f"stages '{value}' do not parse as a YAML list: {str(error).splitlines()[0]}") from None
    if isinstance(value, str):
        items = [part for part in value.split(",") if part.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise UserError(f"stages must be {STAGE_FORMAT}, not {type(value).__name__}")
    if not items:
        return None
    stages = []
    for item in items:
        if isinstance(item, Stage):
            stages.append(item)
        elif isinstance(item, str):
            stages.append(_stage_from_text(item))
        elif isinstance(item, dict):
            stages.append(_stage_from_mapping(item))
        else:
            raise UserError(f"stage {item!r} is neither a mapping nor a string: write stages as {STAGE_FORMAT}")
    if stages[0].when is not None or stages[0].refresh_data or stages[0].search_temperatures:
        raise UserError(
            "the first stage starts the run: it can have no `when` condition, refresh_data or search_temperatures "
            "(search its temperature before training: evaluate.py --sweep_temperature)"
        )
    for index, stage in enumerate(stages):
        if stage.step < 0:
            raise UserError(f"stage {index + 1} starts at step {stage.step}: steps must be 0 or more")
        if index and stage.step <= stages[index - 1].step:
            raise UserError(
                f"stage steps must increase: stage {index + 1} starts at step {stage.step}, "
                f"not after stage {index} at step {stages[index - 1].step}"
            )
        if not (stage.temperature > 0 and math.isfinite(stage.temperature)):
            raise UserError(f"stage {index + 1} (step {stage.step}) has temperature {stage.temperature}: it must be above 0")
        if stage.max_completion_length <= 0:
            raise UserError(
                f"stage {index + 1} (step {stage.step}) has max_completion_length {stage.max_completion_length}: it must be a positive number of tokens"
            )
    return stages


def stages_as_dicts(stages: list[Stage] | None) -> list[dict] | None:
    """The schedule as plain data, as it is kept in the training config (JSON-serialisable); the optional
    keys only where they are set."""
    if stages is None:
        return None
    rows = []
    for stage in stages:
        row = {key: getattr(stage, key) for key in STAGE_KEYS}
        if stage.when is not None:
            when = stage.when
            row["when"] = {"metric": when.metric, "above" if when.above else "below": when.threshold, "steps": when.steps}
        if stage.refresh_data:
            row["refresh_data"] = True
        if stage.search_temperatures:
            row["search_temperatures"] = list(stage.search_temperatures)
        rows.append(row)
    return rows


def stage_index_at(stages: list[Stage], step: int) -> int:
    """Index of the stage that governs optimizer step `step` (the last one starting at or before it)."""
    index = 0
    for i, stage in enumerate(stages):
        if stage.step <= step:
            index = i
    return index


def resolve_stage_config(config) -> None:
    """Validate `config.stages` (a `PolarisConfig`, after `GRPOConfig.__post_init__`) and make the config agree with it.

    The schedule is stored back as a list of dicts, starting at step 0: a first stage at step 0
    sets `config.temperature` and `config.max_completion_length` (which TRL reads when the trainer
    is built, and the before/after measurement uses); a first stage later than 0 gets a stage 0 made
    of those two values.
    """
    stages = parse_stages(config.stages)
    if stages is None:
        config.stages = None
        return
    if stages[0].step > 0:
        if not config.max_completion_length:
            raise UserError("the first stage starts after step 0 and --max_completion_length is not set: add a stage at step 0")
        stages.insert(0, Stage(0, float(config.temperature), int(config.max_completion_length)))
    config.temperature = stages[0].temperature
    config.max_completion_length = stages[0].max_completion_length
    config.stages = stages_as_dicts(stages)  # what a recipe or trainer_state records
    config.parsed_stages = stages  # what the schedule runs: parsed once, here

    overridden = sorted({"temperature", "max_new_tokens", "max_tokens"} & set(config.generation_kwargs or {}))
    if overridden:
        raise UserError(f"generation_kwargs sets {', '.join(overridden)}, which would override the stage schedule: remove it from generation_kwargs")
    longest = max(stage.max_completion_length for stage in stages)
    if config.use_vllm and config.vllm_max_model_length and longest >= config.vllm_max_model_length:
        raise UserError(
            f"a stage allows {longest} completion tokens but vLLM is started with vllm_max_model_length "
            f"{config.vllm_max_model_length}: raise --vllm_max_model_length above prompt + completion length"
        )
    # Completions are generated once per round of `steps_per_generation * num_iterations` micro-steps and
    # reused for the rest of it; a stage that began mid-round would score the round's completions at a
    # temperature they were not sampled at. So every stage must start a generation round.
    micro_steps_per_round = config.steps_per_generation * config.num_iterations
    every = micro_steps_per_round // math.gcd(config.gradient_accumulation_steps, micro_steps_per_round)
    for stage in stages:
        if stage.step % every and stage.when is None:
            raise UserError(
                f"the stage at step {stage.step} would start in the middle of a generation round: with "
                f"gradient_accumulation_steps={config.gradient_accumulation_steps}, steps_per_generation="
                f"{config.steps_per_generation} and num_iterations={config.num_iterations}, completions are "
                f"generated every {every} steps: start stages at multiples of {every}"
            )


# ----------------------------------------------------------------------------------------------
# Applying a stage to a GRPOTrainer
# ----------------------------------------------------------------------------------------------


def fused_head_temperature_cells(model) -> list:
    """The closure cells that hold the temperature of TRL's fused LM head on `model`.

    TRL 1.16 builds the head at trainer init (`trl.trainer.utils.add_fused_lm_head`) as a closure
    over the temperature, which divides the logits before the log-softmax of the loss and of the
    old/reference log-probs. Rebinding that one cell updates every later call. The head may sit
    under wrappers (accelerate's autocast keeps the wrapped forward in `_original_forward` and
    `__wrapped__`), which are followed; `functools.wraps` gives the head the model's own name, so it
    is recognised by its code object.
    """
    cells, seen = [], set()
    pending = [getattr(model, "forward", None), getattr(model, "_original_forward", None)]
    while pending:
        function = pending.pop()
        function = getattr(function, "__func__", function)
        if function is None or id(function) in seen:
            continue
        seen.add(id(function))
        code = getattr(function, "__code__", None)
        if code is not None and code.co_name == "_fused_forward" and "temperature" in code.co_freevars:
            cells.append(function.__closure__[code.co_freevars.index("temperature")])
            continue
        pending.append(getattr(function, "__wrapped__", None))
    return cells


def trainer_temperature_cells(trainer) -> list:
    """Temperature cells of the fused heads of the policy (its base model under PEFT) and of the reference model."""
    from accelerate.utils import is_peft_model

    model = trainer.model
    cells = fused_head_temperature_cells(model.get_base_model() if is_peft_model(model) else model)
    if getattr(trainer, "ref_model", None) is not None:
        cells += fused_head_temperature_cells(trainer.ref_model)
    if not cells:
        raise RuntimeError(
            "the fused LM head that scores log-probabilities was not found on the model, so a stage could "
            "not update its temperature (this code follows trl==1.16.0; see requirements.txt)"
        )
    return cells


def apply_stage(trainer, stage: Stage) -> None:
    """Make a `GRPOTrainer` sample and score at `stage.temperature` with `stage.max_completion_length`.

    The places TRL 1.16 reads the two values after init:
    - `trainer.temperature`, `trainer.max_completion_length` (tool-call truncation, the `dr_grpo`
      normaliser, and anything reading the trainer);
    - `trainer.generation_config` and `trainer.generation_kwargs` (transformers generation; the
      kwargs override the model's own generation config on every call);
    - `trainer.vllm_generation.temperature` / `.max_completion_length` (vLLM builds its
      `SamplingParams` from them on every call, in colocate and server mode);
    - the fused LM head's temperature (log-probs of the loss, of the old policy and of the reference).
    `trainer.args` keeps the configured values, so the config stays a record of what was asked for, except
    `generation_chunk_size` where `auto` planned one per stage (`stage_generation_chunks`, by length).
    """
    temperature, length = float(stage.temperature), int(stage.max_completion_length)
    trainer.temperature = temperature
    trainer.max_completion_length = length
    if getattr(trainer, "use_vllm", False):
        trainer.vllm_generation.temperature = temperature
        trainer.vllm_generation.max_completion_length = length
    if getattr(trainer, "generation_config", None) is not None:
        trainer.generation_config.temperature = temperature
        trainer.generation_config.max_new_tokens = length
    if getattr(trainer, "generation_kwargs", None) is not None:
        trainer.generation_kwargs.update(temperature=temperature, max_new_tokens=length)
    cells = getattr(trainer, "_stage_temperature_cells", None)
    if cells is None:
        cells = trainer._stage_temperature_cells = trainer_temperature_cells(trainer)
    for cell in cells:
        cell.cell_contents = temperature
    chunks = getattr(trainer.args, "stage_generation_chunks", None)
    if chunks and length in chunks:
        trainer.args.generation_chunk_size = chunks[length]
    trainer.current_stage = stage


class StageScheduleCallback(TrainerCallback):
    """Enters each stage of `stages` on `trainer`: at its `step`, or earlier when its `when` condition has held
    over the last steps of the stage before (also right after resuming).

    A condition is read at the end of every optimizer step from the values the step added to the trainer's
    metrics (gathered over processes, so every process takes the same decision) and the stage starts with
    the next step that begins a generation round. Which stages started, when and why, the condition's
    recent values and a decided start are kept in `state_dict()`, which the trainer saves with every
    checkpoint, so a resumed run enters its stages at the same steps as the uninterrupted one."""

    def __init__(self, trainer, stages: list[Stage], steps_per_round: int = 1):
        self.trainer = trainer
        self.stages = stages
        self.steps_per_round = max(1, steps_per_round)  # optimizer steps per generation round
        self.index = None
        self.in_force = None  # the stage applied, with the searched temperature
        self.started = []  # one record per stage entered: {stage, step, reason}
        self.recent = []  # the next stage's condition values, newest last
        self.pending = None  # a start decided at the end of a step: {stage, reason}
        self.target_diversity = None  # the probe's diversity at the temperature of the stage in force (searches)
        self._marks = {}

    # -- checkpointed state --

    def state_dict(self) -> dict:
        return {"started": self.started, "recent": self.recent, "pending": self.pending, "target_diversity": self.target_diversity}

    def load_state_dict(self, state: dict) -> None:
        self.started = list(state.get("started") or [])
        self.recent = list(state.get("recent") or [])
        self.pending = state.get("pending")
        self.target_diversity = state.get("target_diversity")

    # -- transformers' hooks --

    def on_train_begin(self, args, state, control, **kwargs):
        if self.started:  # resumed: the stage the interrupted run was in
            self._apply(self.started[-1], state.global_step, resumed=True)
        else:  # a new run, or a checkpoint without the record: the stage its step falls in
            self._enter(stage_index_at(self.stages, state.global_step), state.global_step, "step")
            if any(stage.search_temperatures for stage in self.stages) and self.target_diversity is None:
                stage = self.stages[self.index]
                rows = self._probe([stage.temperature], stage.max_completion_length)
                self.target_diversity = rows[0]["diversity"]
        self._start_step_marks()

    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._enter(pending["stage"], step, pending["reason"])
        self._start_step_marks()

    def on_step_end(self, args, state, control, **kwargs):
        following = (self.index or 0) + 1
        if following >= len(self.stages) or self.pending is not None:
            return
        stage, steps_done = self.stages[following], state.global_step
        condition = stage.when
        if condition is not None:
            value = self._step_value(condition.log_key)
            if value is not None:
                self.recent = (self.recent + [round(value, 6)])[-condition.steps :]
        if steps_done % self.steps_per_round:
            return  # a stage begins with a generation round
        if condition is not None and len(self.recent) == condition.steps and all(condition.holds(v) for v in self.recent):
            self.pending = {"stage": following, "reason": f"{condition.describe()}: {', '.join(f'{v:g}' for v in self.recent)}"}
        elif steps_done >= stage.step:
            self.pending = {"stage": following, "reason": f"step {stage.step}" + (" (its condition did not hold)" if condition else "")}

    # -- entering a stage --

    def _enter(self, index: int, step: int, reason: str):
        if index == self.index:
            return
        record = {"stage": index, "step": step, "reason": reason}
        stage = self.stages[index]
        if stage.search_temperatures:
            record.update(self._search_temperature(index))
        self.started.append(record)
        self.recent = []
        self._apply(record, step)
        if index > 0 and stage.refresh_data and hasattr(self.trainer, "refresh_training_data"):
            record["refresh"] = self.trainer.refresh_training_data(stage=index + 1)

    def _apply(self, record: dict, step: int, resumed: bool = False):
        index = record["stage"]
        stage = self.stages[index]
        if record.get("temperature") is not None:  # chosen by the search when the stage started
            stage = replace(stage, temperature=record["temperature"])
        apply_stage(self.trainer, stage)
        self.index, self.in_force = index, stage
        if self.trainer.accelerator.is_main_process:
            why = f" ({record['reason']})" if not resumed and index > 0 else ""
            chunk = self.trainer.args.generation_chunk_size if getattr(self.trainer.args, "stage_generation_chunks", None) else None
            write_line(
                f"Stage {index + 1}/{len(self.stages)} from step {step}{why}: temperature {stage.temperature:g}, "
                f"max completion length {stage.max_completion_length}{f', {chunk} sequences a generate call' if chunk else ''}"
                f"{' (resumed)' if resumed else ''}"
            )

    # -- the temperature search at a stage start --

    def _search_temperature(self, index: int) -> dict:
        """Probe the stage's candidate temperatures with the current model and choose by `recommend_temperature`'s
        later-stage rule: the lowest one whose diversity reaches the diversity the stage before started at."""
        stage, current = self.stages[index], self.in_force.temperature
        rows = self._probe(list(stage.search_temperatures), stage.max_completion_length)
        target = self.target_diversity
        chosen = recommend_temperature(rows, target, current)
        chosen_row = next((row for row in rows if math.isclose(row["temperature"], chosen)), None)
        if chosen_row is not None:  # the diversity this stage starts at: the next search's target
            self.target_diversity = chosen_row["diversity"]
        trainer = self.trainer
        if trainer.accelerator.is_main_process:
            rule = describe_rule(target, current)
            directory = Path(trainer.args.output_dir) / f"stage{index + 1}_temperature_search"
            write_sweep_report(rows, chosen, directory, rule=rule)
            write_line(f"Temperature search for stage {index + 1}:\n{format_sweep_table(rows, chosen)}\n(report in {directory})")
        return {"temperature": chosen, "search": rows, "target_diversity": target}

    def _probe(self, temperatures: list[float], max_new_tokens: int) -> list[dict]:
        from accelerate.utils import broadcast_object_list

        rows = probe_temperatures(self.trainer, temperatures, max_new_tokens)
        return broadcast_object_list([rows])[0]  # the main process' measurement decides for all

    # -- the values a step added to the trainer's metrics --

    def _train_metrics(self) -> dict:
        return getattr(self.trainer, "_metrics", {}).get("train", {})

    def _start_step_marks(self):
        self._marks = {key: len(values) for key, values in self._train_metrics().items()}

    def _step_value(self, key: str) -> float | None:
        values = self._train_metrics().get(key, [])[self._marks.get(key, 0) :]
        values = [value for value in values if value == value]  # NaN: nothing measured
        return sum(values) / len(values) if values else None

    def log_values(self) -> dict:
        """The values in force, for the training log."""
        if self.index is None:
            return {}
        stage = self.in_force
        return {
            "schedule/stage": self.index + 1,
            "schedule/temperature": stage.temperature,
            "schedule/max_completion_length": stage.max_completion_length,
        }


def probe_problems(trainer) -> tuple[list, list]:
    """The temperature search's fixed probe: `temperature_search_problems` training prompts drawn with the
    run's seed (the same ones at every search, so diversities compare), and their answers."""
    import random

    args, dataset = trainer.args, trainer.train_dataset
    count = min(getattr(args, "temperature_search_problems", 16), len(dataset))
    picks = sorted(random.Random(f"{args.seed}-temperature-probe").sample(range(len(dataset)), count))
    rows = [dataset[i] for i in picks]
    return [row["prompt"] for row in rows], [row["answer"] for row in rows]


def probe_temperatures(trainer, temperatures: list[float], max_new_tokens: int) -> list[dict]:
    """Sample the probe at each temperature with the model being trained and return sweep rows (accuracy,
    diversity), as `evaluate.py --sweep_temperature` computes them. The random state of training is left
    as it was, so a run resumed before a search makes the same search."""
    import torch
    from trl.models.utils import unwrap_model_for_generation

    from generation import sample_completions
    from rewards import verify

    args = trainer.args
    prompts, answers = probe_problems(trainer)
    devices = [trainer.accelerator.device] if trainer.accelerator.device.type == "cuda" else []
    rows = []
    with torch.random.fork_rng(devices=devices), unwrap_model_for_generation(
        trainer.model_wrapped, trainer.accelerator, gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs
    ) as model:
        for temperature in temperatures:
            samples = sample_completions(
                model, trainer.processing_class, prompts, num_samples=getattr(args, "temperature_search_samples", 4),
                temperature=temperature, top_p=args.top_p, top_k=args.top_k, max_new_tokens=max_new_tokens, seed=args.seed,
                progress=False,
            )
            scores = [[float(verify(sample.text, answer)) for sample in group] for group, answer in zip(samples, answers)]
            texts = [[sample.text for sample in group] for group in samples]
            rows.append(sweep_row(temperature, scores, texts, unit=getattr(args, "temperature_search_ngram_unit", "word")))
    return rows


def attach_stage_schedule(trainer) -> StageScheduleCallback | None:
    """Register a `StageScheduleCallback` for `trainer.args.stages` (None when there is no schedule).

    Called when the trainer is built, before accelerate wraps the model, so the fused head is found
    (and a TRL that no longer has it fails here rather than training with a stale temperature).
    """
    stages = getattr(trainer.args, "parsed_stages", None)
    if stages is None and getattr(trainer.args, "stages", None):  # a config that did not go through resolve_stage_config
        stages = parse_stages(trainer.args.stages)
    if stages is None:
        return None
    trainer._stage_temperature_cells = trainer_temperature_cells(trainer)
    args = trainer.args
    micro_steps_per_round = args.steps_per_generation * args.num_iterations
    steps_per_round = max(1, micro_steps_per_round // args.gradient_accumulation_steps)
    callback = StageScheduleCallback(trainer, stages, steps_per_round)
    trainer.add_callback(callback)
    return callback
