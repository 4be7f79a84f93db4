"""library_internals.py: the list of library internals the recipe touches is complete, matches the pinned
versions, and a library change is reported in one line naming our code and the pinned version."""

import ast
import importlib
import importlib.util

import pytest

import library_internals
from conftest import ROOT
from library_internals import GRPO, METHOD_OVERRIDE, LIBRARY_INTERNALS, check_library_internals, has_attribute, pinned_versions


MIXINS = ("batch_repair.BatchRepairMixin", "checkpoints.CheckpointMixin", "step_batch.StepBatchMixin")
TRAINER = "polaris_trainer.PolarisGRPOTrainer"
OUR_MODULES = sorted(path for path in ROOT.glob("*.py") if path.name != "library_internals.py")


def our_object(path: str):
    module, *names = path.split(".")
    obj = importlib.import_module(module)
    for name in names:
        obj = getattr(obj, name)
    return obj


def listed(target: str, place: str | None = None) -> bool:
    return any(entry.target == target and (place is None or place in entry.places) for entry in LIBRARY_INTERNALS)


def enclosing_functions(tree: ast.Module, module: str):
    """(node, `module.Class.function`) for every node inside a function of `tree`."""
    def walk(node, scope):
        for child in ast.iter_child_nodes(node):
            inner = scope + [child.name] if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) else scope
            yield child, ".".join([module, *inner])
            yield from walk(child, inner)

    yield from walk(tree, [])


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


# ----------------------------------------------------------------------------------------------
# The list is complete
# ----------------------------------------------------------------------------------------------


def test_every_trainer_method_the_mixins_redefine_is_listed():
    from trl import GRPOTrainer

    missing = []
    for path in (*MIXINS, TRAINER):
        cls = our_object(path)
        for name in vars(cls):
            if not callable(getattr(cls, name)) or not hasattr(GRPOTrainer, name):
                continue
            if name == "__init__" and path != TRAINER:  # the mixins pass (*args, **kwargs) through unchanged
                continue
            if not listed(f"{GRPO}.{name}", f"{path}.{name}"):
                missing.append(f"{path}.{name}")
    assert not missing, f"not in library_internals.LIBRARY_INTERNALS: {missing}"


def test_every_private_method_reached_through_super_is_listed():
    calls = []
    for path in OUR_MODULES:
        for node, place in enclosing_functions(ast.parse(path.read_text()), path.stem):
            if (
                isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and is_private(node.func.attr)
                and isinstance(node.func.value, ast.Call) and getattr(node.func.value.func, "id", None) == "super"
            ):  # fmt: skip
                calls.append((place, node.func.attr))
    assert len(calls) >= 11  # the hooks of batch_repair.py, checkpoints.py and step_batch.py
    missing = [
        f"{place} -> super().{name}" for place, name in calls
        if not any(entry.name == name and place in entry.places for entry in LIBRARY_INTERNALS)
    ]  # fmt: skip
    assert not missing, f"not in library_internals.LIBRARY_INTERNALS (or without this place): {missing}"


def test_every_private_library_attribute_our_code_touches_is_listed():
    """Every private name our modules use (as `x._name`, or as a string: getattr, `__dict__[...]`) that one of the
    library classes the recipe reaches into has, is listed under that class."""
    from transformers import CompileConfig, TrainingArguments
    from trl import GRPOTrainer
    from trl.generation.vllm_generation import VLLMGeneration

    classes = {
        GRPO: GRPOTrainer,
        "trl.generation.vllm_generation.VLLMGeneration": VLLMGeneration,
        "transformers.training_args.TrainingArguments": TrainingArguments,
        "transformers.generation.configuration_utils.CompileConfig": CompileConfig,
    }
    used = set()
    for path in OUR_MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and is_private(node.attr):
                used.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and is_private(node.value) and node.value.isidentifier():
                used.add(node.value)
    # Names our code reads on other objects that these classes happen to share (not reached through them).
    elsewhere = {"_name"}  # rewards.py: a multiprocessing Process' name, for its forkserver start (Python's own internals)
    touched = [(owner, name) for name in sorted(used - elsewhere) for owner, cls in classes.items() if has_attribute(cls, name)]
    assert ("trl.generation.vllm_generation.VLLMGeneration", "_llm_weights_sleeping") in touched  # the scan sees them
    missing = [f"{owner}.{name}" for owner, name in touched if not listed(f"{owner}.{name}")]
    assert not missing, f"not in library_internals.LIBRARY_INTERNALS: {missing}"


def test_every_place_names_our_code_and_every_library_is_pinned():
    kinds = set(library_internals.VERBS)
    for entry in LIBRARY_INTERNALS:
        assert entry.kind in kinds, entry
        for place in entry.places:
            our_object(place)  # AttributeError / ImportError: the code moved, the list did not
        assert entry.library_name in pinned_versions(), f"{entry.library_name} has no pin in constraints.txt"
    assert len({(entry.place, entry.target) for entry in LIBRARY_INTERNALS}) == len(LIBRARY_INTERNALS)


def test_the_mixins_come_before_grpo_trainer_and_checkpoints_first():
    """CheckpointMixin first: its marker is written after every other mixin's files and it restores their state
    after they loaded theirs; the other mixins' hooks must run before TRL's."""
    from trl import GRPOTrainer

    mro = our_object(TRAINER).__mro__
    positions = {path: mro.index(our_object(path)) for path in MIXINS}
    assert min(positions.values()) == positions["checkpoints.CheckpointMixin"]
    assert max(positions.values()) < mro.index(GRPOTrainer)


# ----------------------------------------------------------------------------------------------
# The check
# ----------------------------------------------------------------------------------------------


def test_no_drift_on_the_pinned_versions():
    assert check_library_internals() == []


def test_a_changed_signature_is_one_line_naming_the_override_and_the_pin(monkeypatch):
    from trl import GRPOTrainer

    def changed(self, inputs, prompts, completions, completion_ids_list, reward_kwargs=None):  # a parameter more
        return None

    monkeypatch.setattr(GRPOTrainer, "_calculate_rewards", changed)
    lines = check_library_internals()
    trl = pinned_versions()["trl"]
    assert lines == [
        "batch_repair.BatchRepairMixin._calculate_rewards, batch_repair.BatchRepairMixin._rescue_rollouts, "
        f"batch_repair.BatchRepairMixin._rescore_rows overrides {GRPO}._calculate_rewards written for trl {trl}: "
        "signature is now (self, inputs, prompts, completions, completion_ids_list, reward_kwargs=None), was "
        f"(self, inputs, prompts, completions, completion_ids_list) (installed trl {library_internals.installed_version('trl')})"
    ]


def test_a_hook_trl_no_longer_calls_is_reported(monkeypatch):
    """The silent case: TRL keeps the method but stops calling it (here: a generation step that no longer goes
    through `_generate` and `_calculate_rewards`), so the overrides would never run."""
    from trl import GRPOTrainer

    def inlined(self, inputs):
        return {}

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", inlined)
    lines = check_library_internals()
    assert len(lines) == 2
    assert lines[0].startswith("batch_repair.BatchRepairMixin._generate overrides ")
    assert lines[1].startswith("batch_repair.BatchRepairMixin._calculate_rewards, ")
    assert all(f"{GRPO}._generate_and_score_completions no longer uses" in line for line in lines)


def test_a_removed_flag_and_a_lost_closure_cell_are_reported(monkeypatch):
    import trl.trainer.utils
    from transformers import CompileConfig

    monkeypatch.delattr(CompileConfig, "_compile_all_devices")

    def add_fused_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
        def _fused_forward(self, *args, **kwargs):  # the temperature now read from elsewhere
            return None

        return _fused_forward

    monkeypatch.setattr(trl.trainer.utils, "add_fused_lm_head", add_fused_lm_head)
    lines = check_library_internals()
    assert len(lines) == 2, lines
    assert lines[0].startswith("schedules.fused_head_temperature_cells, schedules.apply_stage rebinds a closure cell of ")
    assert lines[0].split(": ", 1)[1].startswith("its `_fused_forward` no longer closes over `temperature`")
    assert lines[1].startswith("generation.compile_decoding sets the private flag ")
    assert "CompileConfig no longer has `_compile_all_devices`" in lines[1]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_entries_are_skipped_without_vllm(monkeypatch):
    from vllm import LLM

    monkeypatch.setattr(LLM, "wake_up", lambda self: None)
    assert len(check_library_internals()) == 1  # drifted, and checked while vLLM is installed
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "vllm" else find_spec(name, *args))
    assert check_library_internals() == []
