"""The fast rollout path without vLLM: a LoRA adapter merged into its base while sampling (the same policy,
the base restored bit for bit), compiled static-cache decoding (the same tokens as eager), a generation
chunk planned from the GPU's memory (`auto`) and halved on out-of-memory, each fault said in one line."""

import pytest
import torch

from conftest import ROOT
from data import UserError


def tiny_qwen3(dtype=torch.float32, seed: int = 0):
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def with_trained_lora(model):
    """LoRA on every linear layer with non-zero B (a freshly made adapter is a no-op and would prove nothing)."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.2)
    return peft_model.eval()


def base_weights(model) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters() if "base_layer" in name}


def log_probs(model, input_ids):
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=input_ids).logits.float(), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merged_adapter_samples_the_same_policy_and_restores_the_base_exactly(dtype):
    from generation import MergedAdapter

    model = with_trained_lora(tiny_qwen3(dtype))
    input_ids = torch.randint(2, 256, (3, 20), generator=torch.Generator().manual_seed(1))
    unmerged, before = log_probs(model, input_ids), base_weights(model)
    adapter = MergedAdapter(model)
    assert MergedAdapter.applies(model) and len(adapter.layers) == 14  # 7 linear layers x 2 decoder layers
    for _ in range(10):  # ten sampling rounds, as ten optimizer steps would
        with adapter.merged():
            assert all(layer.merged for layer in adapter.layers)
            merged = log_probs(model, input_ids)
    assert not any(layer.merged for layer in adapter.layers)
    # The merged weights round once to the model's precision: bf16 keeps ~3 significant digits.
    assert (merged - unmerged).abs().max() < (1e-5 if dtype == torch.float32 else 0.05)
    after = base_weights(model)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert torch.equal(log_probs(model, input_ids), unmerged)

    # Control: PEFT's in-place merge and unmerge, as TRL's vLLM sync does them, leave the base off.
    for _ in range(10):
        model.merge_adapter()
        model.unmerge_adapter()
    drifted = base_weights(model)
    assert not all(torch.equal(before[name], drifted[name]) for name in before)


def test_merged_adapter_leaves_quantized_and_plain_models_alone():
    from generation import MergedAdapter, adapter_merged

    plain = tiny_qwen3()
    assert not MergedAdapter.applies(plain)
    with adapter_merged(plain) as sampled:
        assert sampled is plain
    lora = with_trained_lora(tiny_qwen3())
    lora.get_base_model().hf_quantizer = object()  # what transformers sets on a bitsandbytes model
    assert not MergedAdapter.applies(lora)


def test_compiled_decoding_gives_the_eager_greedy_tokens():
    """Static cache + torch.compile through a LoRA model. Compiled with `aot_eager` (dynamo's graph capture
    and the static cache's indexing, in seconds on a CPU); inductor's kernels are measured on a GPU by
    benchmarks/gpu_check.sh."""
    from transformers import GenerationConfig

    from generation import compile_decoding

    model = with_trained_lora(tiny_qwen3())
    input_ids = torch.randint(2, 256, (4, 12), generator=torch.Generator().manual_seed(2))
    config = GenerationConfig(max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=1, disable_compile=True)
    eager = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
    compile_decoding(config, backend="aot_eager", mode=None)
    compiled_calls = []
    original = model.get_base_model().get_compiled_call

    def counted(compile_config):
        compiled_calls.append(compile_config.backend)
        return original(compile_config)

    model.get_base_model().get_compiled_call = counted
    compiled = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
    assert compiled_calls and set(compiled_calls) == {"aot_eager"}  # the decode steps did go through the compiler
    assert torch.equal(eager, compiled)


# ----------------------------------------------------------------------------------------------
# Inside training
# ----------------------------------------------------------------------------------------------


def toy_trainer(toy_world, tmp_path, **overrides):
    """One step on four toy prompts x 4 rollouts, sampled `generation_chunk_size` at a time."""
    from test_rescue import make_trainer, scripted_rows

    settings = dict(max_steps=1, max_completion_length=8, steps_per_generation=None, per_device_train_batch_size=16, num_generations=4)
    return make_trainer(toy_world, tmp_path, scripted_rows(["mixed", "right", "mixed", "wrong"], 1), **(settings | overrides))


def test_training_samples_through_the_merged_adapter_and_trains_the_unmerged_one(toy_world, tmp_path, monkeypatch):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import GRPOTrainer

    from test_rescue import scripted_reward, scripted_rows
    from train_grpo import PolarisConfig, PolarisGRPOTrainer

    seen, original = [], GRPOTrainer._generate_single_turn

    def recording(self, prompt_ids, *args, **kwargs):
        seen.append([layer.merged for layer in self.merged_adapter.layers])
        return original(self, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", recording)
    config = PolarisConfig(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=16, num_generations=4, max_completion_length=8,
        learning_rate=1e-2, max_steps=1, report_to="none", logging_steps=1, save_strategy="no", seed=0, generation_chunk_size=8,
    )  # fmt: skip
    trainer = PolarisGRPOTrainer(
        model=str(toy_world / "model"), reward_funcs=[scripted_reward], args=config,
        train_dataset=Dataset.from_list(scripted_rows(["mixed", "right", "mixed", "wrong"], 1)),
        processing_class=AutoTokenizer.from_pretrained(toy_world / "model"),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0),
    )  # fmt: skip
    before = base_weights(trainer.model)
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    trainer.train()
    assert len(seen) == 2 and all(all(merged) and merged for merged in seen)  # 2 chunks of 8, both merged
    assert not any(layer.merged for layer in trainer.merged_adapter.layers)
    after = base_weights(trainer.model)
    assert all(torch.equal(before[name], after[name]) for name in before)  # the frozen base is untouched
    assert any(not torch.equal(p, lora_before[n]) for n, p in trainer.model.named_parameters() if "lora_" in n)


def test_out_of_memory_halves_the_chunk_and_goes_on(toy_world, tmp_path, monkeypatch, capsys):
    from trl import GRPOTrainer

    calls, original = [], GRPOTrainer._generate_single_turn

    def small_gpu(self, prompt_ids, *args, **kwargs):
        calls.append(len(prompt_ids))
        if len(prompt_ids) > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", small_gpu)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    trainer = toy_trainer(toy_world, tmp_path, generation_chunk_size=16)
    trainer.train()
    assert calls == [16, 8, 4, 4, 4, 4] and trainer.args.generation_chunk_size == 4
    notes = [line for line in capsys.readouterr().err.splitlines() if "out of GPU memory" in line]
    assert len(notes) == 2 and notes[-1].endswith("going on with generation_chunk_size 4")
    assert trainer.state.global_step == 1


def test_failed_compiled_decoding_falls_back_to_eager_in_one_line(toy_world, tmp_path, capsys):
    def failing_backend(graph_module, example_inputs):
        raise RuntimeError("no compiler on this machine")

    trainer = toy_trainer(toy_world, tmp_path, generation_compile=True)
    assert trainer.generation_config.cache_implementation == "static" and not trainer.generation_config.disable_compile
    trainer.generation_config.compile_config.backend, trainer.generation_config.compile_config.mode = failing_backend, None
    trainer.train()
    notes = [line for line in capsys.readouterr().err.splitlines() if "compiled decoding failed" in line]
    assert len(notes) == 1 and "decoding eagerly from now on" in notes[0]
    assert trainer.generation_config.disable_compile and trainer.state.global_step == 1


# ----------------------------------------------------------------------------------------------
# generation_chunk_size: auto
# ----------------------------------------------------------------------------------------------


CONSUMER_RECIPES = {  # recipe: the GPU memory (GiB) it is written for
    "qwen3-0.6b-lora-8gb.yaml": 8, "qwen3-1.7b-qlora-12gb.yaml": 12,
    "r1-distill-qwen-1.5b-lora-16gb.yaml": 16, "qwen3-4b-qlora-24gb.yaml": 24,
}  # fmt: skip


@pytest.mark.parametrize("recipe", sorted(CONSUMER_RECIPES))
def test_auto_chunk_is_the_largest_the_recipes_gpu_holds_at_each_stage(recipe, capsys):
    from dataclasses import replace

    import memory_planner
    from train_grpo import main, parse_args

    # The transformers path: where vLLM is not installed the bf16 recipes fall back to it (vllm_optional).
    recipe_args = ["--config", str(ROOT / "recipes" / recipe), "--use_vllm", "false"]
    script_args, config, model_args = parse_args([*recipe_args, "--plan", "--gpu_memory", str(CONSUMER_RECIPES[recipe])])
    assert config.generation_chunk_size == "auto"
    plan = main(script_args, config, model_args)
    lengths = [length for *_, length in plan.setup.stages]
    chunks = [plan.setup.generation_batch_at(length) for length in lengths]
    assert config.generation_chunk_size == chunks[0] and config.stage_generation_chunks == dict(zip(lengths, chunks))
    assert all(isinstance(c, int) and 8 <= c < 64 for c in chunks) and chunks == sorted(chunks, reverse=True) and chunks[0] > chunks[-1]
    assert plan.fits  # each stage planned with its own chunk
    printed = capsys.readouterr().out
    assert f"generation_chunk_size auto: {' / '.join(map(str, chunks))} of the step's 64 rollouts" in printed
    gpu = CONSUMER_RECIPES[recipe] * memory_planner.GIB
    for length, chunk in zip(lengths, chunks):  # the largest that fits at its stage: one more does not
        at = replace(plan.setup, stage_generation_batches=None, generation_batch=chunk)
        assert memory_planner.estimate(plan.shape, at, length, gpu).generation_total <= gpu
        more = replace(at, generation_batch=chunk + 1)
        assert memory_planner.estimate(plan.shape, more, length, gpu).generation_total > gpu

    # A GPU twice as large samples more at once; one with room for the whole step samples all of it.
    _, config, _ = parse_args(recipe_args)
    memory_planner.resolve_auto_generation_chunk(replace(script_args, gpu_memory=2 * CONSUMER_RECIPES[recipe]), config, model_args)
    assert config.generation_chunk_size > chunks[0]
    _, config, _ = parse_args(recipe_args)
    memory_planner.resolve_auto_generation_chunk(replace(script_args, gpu_memory=1000), config, model_args)
    assert config.generation_chunk_size == 64 and config.stage_generation_chunks is None


def test_each_stage_samples_its_planned_chunk_and_out_of_memory_halves_the_later_ones(toy_world, tmp_path, monkeypatch, capsys):
    from trl import GRPOTrainer

    calls, original = [], GRPOTrainer._generate_single_turn

    def recording(self, prompt_ids, *args, **kwargs):
        calls.append((self.max_completion_length, len(prompt_ids)))
        if self.state.global_step == 2 and len(prompt_ids) > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", recording)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    stages = [{"step": 0, "temperature": 1.0, "max_completion_length": 6}, {"step": 1, "temperature": 1.0, "max_completion_length": 8},
              {"step": 2, "temperature": 1.0, "max_completion_length": 10}]  # fmt: skip
    trainer = toy_trainer(toy_world, tmp_path, max_steps=3, stages=stages, generation_chunk_size=16)
    trainer.args.stage_generation_chunks = {6: 16, 8: 8, 10: 8}  # as memory_planner.resolve_auto_generation_chunk plans them
    trainer.train()
    assert calls == [(6, 16), (8, 8), (8, 8), (10, 8), (10, 4), (10, 4), (10, 4), (10, 4)]
    assert trainer.args.stage_generation_chunks == {6: 8, 8: 4, 10: 4}  # the plan was short: every stage's chunk halved
    stage_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Stage ")]
    assert [line.split(", ")[-1] for line in stage_lines] == [f"{chunk} sequences a generate call" for chunk in (16, 8, 8)]


def test_auto_chunk_where_nothing_can_be_planned_says_what_it_chose(monkeypatch):
    from dataclasses import replace

    import memory_planner
    from train_grpo import parse_args

    recipe = str(ROOT / "recipes" / "qwen3-4b-qlora-24gb.yaml")
    script_args, config, model_args = parse_args(["--config", recipe])
    monkeypatch.setattr(memory_planner, "local_gpu_memory_gib", lambda: None)
    note = memory_planner.resolve_auto_generation_chunk(script_args, config, model_args)
    assert config.generation_chunk_size == 64 and "no GPU to plan for" in note
    _, config, model_args = parse_args(["--config", recipe, "--model_name_or_path", "someone/unknown-model"])
    note = memory_planner.resolve_auto_generation_chunk(replace(script_args, gpu_memory=24), config, model_args)
    assert config.generation_chunk_size == memory_planner.SAFE_GENERATION_CHUNK and "does not know the shape" in note
    with pytest.raises(UserError, match="positive number of sequences or `auto`"):
        parse_args(["--config", recipe, "--generation_chunk_size", "many"])


def test_plan_needs_no_vllm_installed(monkeypatch, capsys):
    import importlib.util

    from train_grpo import main, parse_args

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "vllm" else find_spec(name, *args))
    args = parse_args(["--config", str(ROOT / "recipes" / "polaris-4b.yaml"), "--plan", "--gpu_memory", "80"])
    assert main(*args).fits
    args = parse_args(["--config", str(ROOT / "recipes" / "polaris-4b.yaml")])
    with pytest.raises(UserError, match="--use_vllm needs vLLM"):
        main(*args)


def test_vllm_optional_falls_back_to_transformers_in_one_line(monkeypatch, capsys):
    import importlib.util

    from options import check_model_options
    from train_grpo import parse_args

    recipe = str(ROOT / "recipes" / "qwen3-0.6b-lora-8gb.yaml")  # use_vllm with vllm_optional
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "vllm" else find_spec(name, *args))
    _, training_args, model_args = parse_args(["--config", recipe])
    assert training_args.use_vllm and training_args.vllm_optional
    check_model_options(training_args, model_args)
    assert not training_args.use_vllm
    [note] = capsys.readouterr().err.strip().splitlines()
    assert "not installed" in note and "sampling with transformers instead (--vllm_optional)" in note
    _, training_args, model_args = parse_args(["--config", recipe, "--vllm_optional", "false"])
    with pytest.raises(UserError, match="needs vLLM, which is not installed.*--vllm_optional true"):
        check_model_options(training_args, model_args)
