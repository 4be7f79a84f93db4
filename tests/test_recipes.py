"""Every recipe parses and plans offline; the POLARIS recipes keep the published numbers; each consumer
preset's header states the memory the planner computes and fits its GPU; the accelerate configs load
the way `accelerate launch` loads them."""

import re

import pytest

from conftest import ROOT, SHARED_COPIES


RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
POLARIS_RECIPES = {"polaris-4b.yaml", "polaris-7b.yaml"}
CONSUMER_RECIPES = [recipe for recipe in RECIPES if recipe.name not in POLARIS_RECIPES | {"demo.yaml"}]
ACCELERATE_CONFIGS = sorted((ROOT / "accelerate").glob("*.yaml"))


def header_numbers(recipe):
    """(target GPU in GB, expected peak in GiB) from a consumer recipe's comment header."""
    text = recipe.read_text()
    gpu = re.search(r"on one (\d+) GB GPU", text)
    peak = re.search(r"Expected peak: ([\d.]+) GiB", text)
    return (int(gpu.group(1)) if gpu else None), (float(peak.group(1)) if peak else None)


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """No network and an empty Hugging Face cache: model shapes come from the built-in table."""
    from huggingface_hub import constants  # a submodule: `import huggingface_hub` alone may not have loaded it

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))


def test_the_expected_recipes_exist():
    names = {recipe.name for recipe in RECIPES}
    assert POLARIS_RECIPES | {
        "qwen3-0.6b-lora-8gb.yaml", "qwen3-1.7b-qlora-12gb.yaml", "r1-distill-qwen-1.5b-lora-16gb.yaml", "qwen3-4b-qlora-24gb.yaml",
    } <= names  # fmt: skip


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_recipe_parses(recipe):
    from train_grpo import parse_args

    script_args, training_args, model_args = parse_args(["--config", str(recipe)])
    assert model_args.model_name_or_path and script_args.dataset_name
    if recipe.name == "demo.yaml":
        return
    assert script_args.dataset_name == "POLARIS-Project/Polaris-Dataset-53K"  # hub ids for users
    assert training_args.num_generations == 8 and training_args.beta == 0.0 and training_args.epsilon_high == 0.28
    assert training_args.rollout_rescue and training_args.informative_substitution
    assert len(training_args.stages) == 3
    if model_args.load_in_4bit:
        assert model_args.use_peft and not training_args.use_vllm
    elif recipe.name not in POLARIS_RECIPES:  # a bf16 base: vLLM serves the adapter where it is installed
        assert training_args.use_vllm and training_args.vllm_optional and training_args.vllm_mode == "colocate"
        assert training_args.vllm_enable_sleep_mode and training_args.vllm_max_model_length == 512 + training_args.stages[-1]["max_completion_length"]


@pytest.mark.parametrize("recipe", CONSUMER_RECIPES, ids=[r.name for r in CONSUMER_RECIPES])
def test_consumer_recipe_measures_on_a_held_out_benchmark(recipe, shared_dir):
    """A hub benchmark evaluate.py knows, read with its split and columns; the tests' offline copy of it
    loads through the same options, limited to the recipe's number of problems."""
    import evaluate
    from train_grpo import load_eval_problems, parse_args

    script_args, _, _ = parse_args(["--config", str(recipe)])
    hub_id = script_args.eval_dataset_name
    benchmark = next((b for b in evaluate.BENCHMARKS.values() if b.dataset == hub_id), None)
    assert benchmark is not None, f"{recipe.name}: eval_dataset_name {hub_id!r} is not one of evaluate.BENCHMARKS"
    assert (script_args.dataset_test_split, script_args.eval_problem_column, script_args.eval_answer_column) == (
        benchmark.split, benchmark.problem_column, benchmark.answer_column,
    )  # fmt: skip
    assert 0 < script_args.eval_max_problems <= 200 and script_args.eval_num_samples >= 1  # a small sample
    assert hub_id in SHARED_COPIES, f"no offline copy of {hub_id} in ../shared for the tests"
    offline = str(shared_dir / SHARED_COPIES[hub_id])
    script_args, _, _ = parse_args(["--config", str(recipe), "--eval_dataset_name", offline])
    problems = load_eval_problems(script_args)
    assert len(problems) == script_args.eval_max_problems
    assert all(problems["problem"]) and all(answer is not None for answer in problems["answer"])


@pytest.mark.parametrize(
    "name,model,temperatures,lengths",
    [
        ("polaris-4b.yaml", "Qwen/Qwen3-4B", [1.4, 1.45, 1.5], [39936, 48128, 52224]),
        ("polaris-7b.yaml", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", [0.7, 1.0, 1.1], [15360, 23552, 31744]),
    ],
)
def test_polaris_recipes_keep_the_published_numbers(name, model, temperatures, lengths):
    from train_grpo import parse_args

    _, training_args, model_args = parse_args(["--config", str(ROOT / "recipes" / name)])
    assert model_args.model_name_or_path == model and not model_args.use_peft
    assert [stage["temperature"] for stage in training_args.stages] == temperatures
    assert [stage["max_completion_length"] for stage in training_args.stages] == lengths
    assert training_args.learning_rate == 1e-6 and training_args.lr_scheduler_type == "constant"
    assert training_args.loss_type == "dapo" and training_args.epsilon == 0.2
    # 128 prompts x 8 rollouts per step on the 32 GPUs the header launches.
    assert "--num_processes 32" in (ROOT / "recipes" / name).read_text()
    assert training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * 32 == 128 * 8
    # verl's hybrid engine at rollout.gpu_memory_utilization=0.8, FSDP with param and optimizer offload.
    assert training_args.vllm_enable_sleep_mode and training_args.vllm_gpu_memory_utilization == 0.8
    script_args, _, _ = parse_args(["--config", str(ROOT / "recipes" / name)])
    assert script_args.accelerate_config == "accelerate/fsdp_offload.yaml"


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_plan_runs_offline(recipe, offline_hub, monkeypatch, capsys):
    import memory_planner
    import train_grpo

    gpu, expected_peak = header_numbers(recipe)
    monkeypatch.setattr(train_grpo, "load_model", lambda *a: pytest.fail("weights were loaded"))
    args = train_grpo.parse_args(["--config", str(recipe), "--plan", "--gpu_memory", str(gpu or 80)])
    plan = train_grpo.main(*args)
    assert isinstance(plan, memory_planner.MemoryPlan)
    assert "Memory plan" in capsys.readouterr().out
    if recipe.name in POLARIS_RECIPES:
        # POLARIS's 80 GB GPUs, on the GPU count of the recipe's accelerate config (4 nodes x 8).
        assert plan.setup.num_gpus == 32 and plan.setup.sharding == "fsdp" and plan.setup.offload_params
        assert plan.fits and plan.worst.vllm_sleep
        return
    if recipe.name == "demo.yaml":
        return
    # A consumer preset fits the GPU it is written for, and its header states the planner's number.
    assert gpu and expected_peak, f"{recipe.name} lacks 'on one N GB GPU' or 'Expected peak: X GiB' in its header"
    assert plan.fits
    assert expected_peak == pytest.approx(plan.worst.total / memory_planner.GIB, abs=0.006)


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=[c.name for c in ACCELERATE_CONFIGS])
def test_accelerate_config_loads_as_accelerate_launch_loads_it(config, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    cluster = load_config_from_file(str(config))
    assert cluster.mixed_precision == "bf16"
    args = launch_command_parser().parse_args(["--config_file", str(config), "train_grpo.py", "--config", "recipes/polaris-4b.yaml"])
    _validate_launch_command(args)  # fills the launch arguments from the file, as `accelerate launch` does
    expected = {
        "single_gpu.yaml": ("NO", 1),
        "multi_gpu.yaml": ("MULTI_GPU", 8),
        "deepspeed_zero2.yaml": ("DEEPSPEED", 8),
        "deepspeed_zero3.yaml": ("DEEPSPEED", 8),
        "fsdp.yaml": ("FSDP", 8),
        "fsdp_offload.yaml": ("FSDP", 32),
    }[config.name]
    assert (cluster.distributed_type.value, args.num_processes) == expected
    assert args.use_deepspeed == config.name.startswith("deepspeed") and args.use_fsdp == config.name.startswith("fsdp")
    if args.use_deepspeed:
        assert cluster.deepspeed_config["zero_stage"] == int(config.name[-6])
        assert "gradient_accumulation_steps" not in cluster.deepspeed_config  # taken from the recipe
    if args.use_fsdp:
        from accelerate import FullyShardedDataParallelPlugin
        from accelerate.utils.launch import prepare_multi_gpu_env

        for key, value in prepare_multi_gpu_env(args).items():
            if key.startswith(("FSDP_", "ACCELERATE_USE_FSDP")):
                monkeypatch.setenv(key, value)
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.state_dict_type.name == "FULL_STATE_DICT"
        from torch.distributed.fsdp import CPUOffloadPolicy

        # The POLARIS recipes' file offloads weights, gradients and optimizer state to the CPU, as verl did.
        assert isinstance(plugin.cpu_offload, CPUOffloadPolicy) == (config.name == "fsdp_offload.yaml")


def test_a_run_launched_otherwise_than_its_plan_is_noted(monkeypatch):
    import memory_planner
    import train_grpo

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    script_args, training_args, _ = train_grpo.parse_args(["--config", str(ROOT / "recipes" / "polaris-4b.yaml")])
    note = memory_planner.launch_differs_from_plan(script_args, training_args)
    assert "32 processes, fsdp" in note and "1 process(es), no sharding" in note
    script_args, training_args, _ = train_grpo.parse_args(
        ["--config", str(ROOT / "recipes" / "demo.yaml"), "--accelerate_config", str(ROOT / "accelerate" / "single_gpu.yaml")]
    )
    assert memory_planner.launch_differs_from_plan(script_args, training_args) is None
