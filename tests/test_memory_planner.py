"""The memory planner's arithmetic: hand-computed cases, and the parts checked against what torch,
autograd and bitsandbytes really allocate for small models on the CPU."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

import memory_planner as mp
from data import UserError


MiB = 1024**2
QWEN3_06B = mp.BUILTIN_SHAPES["Qwen/Qwen3-0.6B"]


def tiny_qwen3_config(layers=2):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=500, hidden_size=64, intermediate_size=176, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=24, tie_word_embeddings=True)  # fmt: skip


def tiny_qwen2_config(layers=2):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=500, hidden_size=96, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=6,
                       num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip


def setup(**overrides):
    values = dict(micro_batch=1, generation_batch=1, max_prompt_length=1, stages=[(0, 1.0, 1)])
    return mp.RunSetup(**{**values, **overrides})


# ----------------------------------------------------------------------------------------------
# Hand-computed cases
# ----------------------------------------------------------------------------------------------


def test_qwen3_0_6b_parameter_count_by_hand():
    # embeddings 151936 x 1024 (tied) = 155,582,464
    # per layer: q 1024x2048 + k 1024x1024 + v 1024x1024 + o 2048x1024 = 6,291,456
    #            gate, up, down 3 x 1024x3072 = 9,437,184; norms 2 x 1024 + q/k norms 2 x 128 = 2,304
    # 28 layers x 15,730,944 = 440,466,432; final norm 1,024
    assert QWEN3_06B.linear_parameters() == 28 * 15_728_640 == 440_401_920
    assert QWEN3_06B.num_parameters() == 155_582_464 + 440_466_432 + 1_024 == 596_049_920
    # The published sizes (billions) of the other built-in shapes.
    sizes = {name: round(shape.num_parameters() / 1e9, 2) for name, shape in mp.BUILTIN_SHAPES.items()}
    assert sizes == {
        "Qwen/Qwen3-0.6B": 0.60, "Qwen/Qwen3-1.7B": 1.72, "Qwen/Qwen3-4B": 4.02, "Qwen/Qwen3-8B": 8.19,
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": 1.78, "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": 7.62,
    }  # fmt: skip


def test_qlora_weights_adapters_and_kv_cache_by_hand():
    s = setup(micro_batch=2, generation_batch=8, max_prompt_length=512, stages=[(0, 1.0, 2048)], quantization="4bit", use_peft=True,
              lora_r=16, lora_target_modules=None, lora_dropout=0.0, optimizer="adamw_torch_fused")  # fmt: skip
    # 4-bit linear layers: 440,401,920 x (1/2 byte + one fp32 absmax per 64) = 247,726,080 bytes;
    # the other 155,648,000 parameters (embeddings, norms) in bf16: 311,296,000 bytes.
    assert mp.weight_bytes(QWEN3_06B, s) == 247_726_080 + 311_296_000
    # PEFT's default for qwen3 is q_proj and v_proj: 16 x (1024 + 2048) + 16 x (1024 + 1024) = 81,920 per layer.
    assert mp.trainable_parameters(QWEN3_06B, s) == 28 * 81_920 == 2_293_760
    estimate = mp.estimate(QWEN3_06B, s, 2048)
    assert estimate.parts["trainable parameters (LoRA adapters)"] == 2_293_760 * 2  # bf16 adapters under QLoRA
    assert estimate.parts["gradients"] == 2_293_760 * 2
    assert estimate.parts["optimizer state"] == 2_293_760 * 2 * 2  # two AdamW moments in bf16
    # KV cache: 2 (key, value) x 28 layers x 8 heads x 128 x 2 bytes = 114,688 bytes per token,
    # for 8 sequences of 512 + 2048 tokens.
    assert estimate.parts["generation KV cache"] == 8 * 2560 * 114_688 == 2_348_810_240


def test_checkpointed_activations_by_hand():
    s = setup(micro_batch=2, max_prompt_length=512, stages=[(0, 1.0, 2048)], quantization="4bit", use_peft=True, lora_r=16,
              lora_target_modules=["q_proj", "v_proj"], lora_dropout=0.0)  # fmt: skip
    # One layer, per token, bf16 (a = 2), frozen norms, bf16 adapters reading their input uncopied:
    #   input and post-attention norms: 2 x (fp32 input 4 x 1024 + 1/rms 4)            =  8,200
    #   q_norm: 4 x 2048 + 4 x 16 heads; k_norm: 4 x 1024 + 4 x 8 heads                = 12,384
    #   attention: q, k, v after RoPE and its output, 2 x (2048 + 1024 + 1024 + 2048),
    #              plus a fp32 log-sum-exp per head 4 x 16                              = 12,352
    #   MLP: gate output, SiLU output, up output: 3 x 2 x 3072                          = 18,432
    #   the normed input read by the q and v adapters: 2 x 1024                         =  2,048
    #   lora_A outputs: 2 adapters x 2 bytes x r 16                                      =     64
    assert mp.layer_activation_bytes(QWEN3_06B, s) == 53_480
    # Checkpointed: each of 28 layers keeps its bf16 input (2 x 1024), one layer is recomputed;
    # the micro-batch is 2 x (512 + 2048) = 5,120 tokens.
    assert mp.saved_activation_bytes(QWEN3_06B, s, 5_120, checkpointing=True) == 5_120 * (28 * 2_048 + 53_480) == 567_418_880
    assert mp.saved_activation_bytes(QWEN3_06B, s, 5_120, checkpointing=False) == 5_120 * 28 * 53_480


def test_optimizer_state_per_parameter():
    assert mp.optimizer_state_bytes("adamw_torch_fused", 4) == 8
    assert mp.optimizer_state_bytes("adamw_torch", 2) == 4
    assert mp.optimizer_state_bytes("paged_adamw_8bit", 4) == 2
    assert mp.optimizer_state_bytes("lion_32bit", 4) == 4
    assert mp.optimizer_state_bytes("sgd", 4) == 0 and mp.optimizer_state_bytes("adafactor", 4) == 0


# ----------------------------------------------------------------------------------------------
# Checked against torch, autograd and bitsandbytes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_config", [tiny_qwen3_config, tiny_qwen2_config], ids=["qwen3", "qwen2-bias-untied"])
def test_parameter_count_matches_transformers(make_config):
    from transformers import AutoModelForCausalLM

    config = make_config()
    model = AutoModelForCausalLM.from_config(config)
    assert mp.ModelShape.from_config(config.to_dict()).num_parameters() == sum(p.numel() for p in model.parameters())


def saved_tensor_bytes_per_token(config, dtype, lora_targets=None, lora_dropout=0.0, adapter_dtype=None, checkpointing=False, tokens=(2, 64)):
    """Bytes of the tensors autograd keeps for backward in one forward pass (parameters excluded), per token."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    if lora_targets is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, target_modules=lora_targets, lora_dropout=lora_dropout))
        for parameter in model.parameters():
            if parameter.requires_grad and adapter_dtype is not None:
                parameter.data = parameter.data.to(adapter_dtype)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    storages = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    backbone = model.get_base_model().model if lora_targets is not None else model.model
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        backbone(input_ids=torch.randint(0, config.vocab_size, tokens))
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(size for pointer, size in storages.items() if pointer not in parameters) / (tokens[0] * tokens[1])


def one_layer_bytes(make_config, dtype, **kwargs):
    """What one more decoder layer adds (so the embedding, final norm and first layer's specifics cancel)."""
    return saved_tensor_bytes_per_token(make_config(3), dtype, **kwargs) - saved_tensor_bytes_per_token(make_config(2), dtype, **kwargs)


ACTIVATION_CASES = {
    # id: (config, dtype, planner settings, measurement settings)
    "qwen3-fp32-full": (tiny_qwen3_config, "float32", dict(weight_bytes=4), {}),
    "qwen3-bf16-full": (tiny_qwen3_config, "bfloat16", dict(weight_bytes=2), {}),
    "qwen3-bf16-lora-fp32-adapters-dropout": (
        tiny_qwen3_config, "bfloat16", dict(weight_bytes=2, use_peft=True, lora_r=8, lora_target_modules="all-linear", lora_dropout=0.05),
        dict(lora_targets="all-linear", lora_dropout=0.05),
    ),
    "qwen3-fp32-lora-qv": (
        tiny_qwen3_config, "float32", dict(weight_bytes=4, use_peft=True, lora_r=8, lora_target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
        dict(lora_targets=["q_proj", "v_proj"]),
    ),
    "qwen3-fp32-bf16-adapters": (  # adapters in another dtype than the activations, as QLoRA on a CPU
        tiny_qwen3_config, "float32", dict(weight_bytes=4, quantization="4bit", use_peft=True, lora_r=8, lora_target_modules="all-linear", lora_dropout=0.0),
        dict(lora_targets="all-linear", adapter_dtype="bfloat16"),
    ),
    "qwen2-bf16-lora-fp32-adapters": (
        tiny_qwen2_config, "bfloat16", dict(weight_bytes=2, use_peft=True, lora_r=8, lora_target_modules="all-linear", lora_dropout=0.0),
        dict(lora_targets="all-linear"),
    ),
    "qwen2-fp32-full": (tiny_qwen2_config, "float32", dict(weight_bytes=4), {}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ACTIVATION_CASES))
def test_layer_activations_match_what_autograd_saves(case):
    import torch

    make_config, dtype, planner_settings, measured_settings = ACTIVATION_CASES[case]
    if "adapter_dtype" in measured_settings:
        measured_settings = {**measured_settings, "adapter_dtype": getattr(torch, measured_settings["adapter_dtype"])}
    shape = mp.ModelShape.from_config(make_config().to_dict())
    # On the CPU dropout keeps its mask in the input's dtype (CUDA keeps one byte per element).
    planned = mp.layer_activation_bytes(shape, setup(dropout_mask_bytes=4, **planner_settings))
    assert one_layer_bytes(make_config, getattr(torch, dtype), **measured_settings) == planned


def test_autocast_estimate_matches_what_autograd_saves_under_cpu_autocast():
    """fp32 weights under bf16 autocast: the planner's estimate is what autograd keeps (the 16-bit weight copies
    autocast makes are counted apart), between the all-bf16 count and the fp32 bound the verdict uses."""
    import torch

    def measured(layers):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return saved_tensor_bytes_per_token(tiny_qwen3_config(layers), torch.float32)

    shape = mp.ModelShape.from_config(tiny_qwen3_config().to_dict())
    weight_copies = 2 * shape.linear_parameters() / shape.num_layers / 128  # per token of the (2, 64) batch
    estimate = mp.layer_activation_bytes(shape, setup(weight_bytes=4, autocast=True, autocast_estimate=True))
    assert measured(3) - measured(2) - weight_copies == estimate
    bound = mp.layer_activation_bytes(shape, setup(weight_bytes=4, autocast=True))
    assert mp.layer_activation_bytes(shape, setup(weight_bytes=2)) < estimate < bound


def test_checkpointed_layers_keep_only_their_input():
    import torch

    shape = mp.ModelShape.from_config(tiny_qwen3_config().to_dict())
    measured = one_layer_bytes(tiny_qwen3_config, torch.float32, lora_targets="all-linear", checkpointing=True)
    assert measured == 4 * shape.hidden_size  # the planner's per-layer term under checkpointing: a x hidden


@pytest.mark.parametrize("quantization,nested", [("4bit", False), ("4bit", True), ("8bit", False)])
def test_quantized_weights_match_bitsandbytes(tmp_path, quantization, nested):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = tiny_qwen3_config()
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    if quantization == "4bit":
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=nested, bnb_4bit_compute_dtype=torch.float32)
    else:
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bnb, dtype=torch.float32)
    storages = {}
    for parameter in model.parameters():
        storages[parameter.untyped_storage().data_ptr()] = parameter.untyped_storage().nbytes()
        state = getattr(parameter, "quant_state", None)
        if state is not None:  # 4-bit block constants
            storages[state.absmax.data_ptr()] = state.absmax.untyped_storage().nbytes()
            if state.nested:
                storages[state.state2.absmax.data_ptr()] = state.state2.absmax.untyped_storage().nbytes()
        scales = getattr(parameter, "SCB", None)
        if scales is not None:  # 8-bit row scales
            storages[scales.data_ptr()] = scales.untyped_storage().nbytes()
    planned = mp.weight_bytes(mp.ModelShape.from_config(config.to_dict()), setup(weight_bytes=4, quantization=quantization, double_quant=nested))
    # Nested quantization rounds its second-level constants up per matrix: at most one fp32 more for each
    # of the 2 x 7 linear layers.
    assert abs(sum(storages.values()) - planned) <= (4 * 14 if nested else 0)


# ----------------------------------------------------------------------------------------------
# Shapes, the verdict and the warnings
# ----------------------------------------------------------------------------------------------


def test_model_shape_sources(tmp_path, monkeypatch):
    import huggingface_hub

    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "config.json").write_text(json.dumps(tiny_qwen3_config().to_dict()))
    shape, source = mp.find_model_shape(str(tmp_path / "local"))
    assert shape.hidden_size == 64 and source.endswith("config.json")

    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(tiny_qwen2_config().to_dict()))
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    shape, source = mp.find_model_shape("acme/tiny")
    assert shape.qkv_bias and not shape.tie_word_embeddings and source == "the Hugging Face cache"

    shape, source = mp.find_model_shape("qwen/qwen3-4b")  # not cached: the built-in table, any case
    assert shape == mp.BUILTIN_SHAPES["Qwen/Qwen3-4B"] and source == "the built-in table"
    with pytest.raises(UserError, match="Qwen/Qwen3-0.6B"):
        mp.find_model_shape("acme/unknown-model")


def test_late_stage_that_does_not_fit_is_named():
    s = setup(micro_batch=2, generation_batch=8, max_prompt_length=512, use_peft=True, lora_r=32, lora_target_modules="all-linear",
              lora_dropout=0.0, stages=[(0, 1.0, 2048), (200, 1.05, 4096), (320, 1.1, 16384)])  # fmt: skip
    plan = mp.plan_memory("Qwen/Qwen3-0.6B", QWEN3_06B, s, gpu_memory_gib=8)
    totals = [estimate.total for _, estimate in plan.stages]
    assert totals == sorted(totals) and totals[0] < 8 * mp.GIB < totals[-1]
    assert plan.fits is False
    assert any("fits at step 0" in w and "step 320" in w for w in plan.warnings)
    text = mp.format_plan(plan)
    assert "DOES NOT FIT a 8 GiB GPU" in text and "from step   320" in text


def test_checkpointing_vllm_and_reference_model_change_the_estimate():
    base = dict(micro_batch=4, generation_batch=8, max_prompt_length=512, stages=[(0, 1.0, 4096)], use_peft=True, lora_target_modules="all-linear")
    with_checkpointing = mp.estimate(QWEN3_06B, setup(**base), 4096)
    without = mp.estimate(QWEN3_06B, setup(**base, gradient_checkpointing=False), 4096)
    assert without.training > with_checkpointing.training
    assert with_checkpointing.activations_without_checkpointing == without.activations_without_checkpointing
    plan = mp.plan_memory("m", QWEN3_06B, setup(**base, gradient_checkpointing=False), 80)
    assert any("gradient_checkpointing is off" in w for w in plan.warnings)

    colocated = mp.estimate(QWEN3_06B, setup(**base, use_vllm=True, vllm_gpu_memory_utilization=0.25), 4096, gpu_memory=24 * mp.GIB)
    assert colocated.parts["generation KV cache"] == 0 and colocated.vllm_share == 6 * mp.GIB
    server = mp.estimate(QWEN3_06B, setup(**base, use_vllm=True, vllm_mode="server"), 4096, gpu_memory=24 * mp.GIB)
    assert server.vllm_share == 0

    full = dict(base, use_peft=False)
    no_reference = mp.weight_bytes(QWEN3_06B, setup(**full))
    assert mp.weight_bytes(QWEN3_06B, setup(**full, reference_model=True)) == 2 * no_reference


def test_plan_exits_before_any_weights_load(monkeypatch, capsys):
    import toy
    import train_grpo

    monkeypatch.setattr(train_grpo, "load_model", lambda *a: pytest.fail("weights were loaded"))
    monkeypatch.setattr(toy, "build_toy_world", lambda *a: pytest.fail("the toy world was built"))
    plan = train_grpo.main(*train_grpo.parse_args(["--config", str(ROOT / "recipes" / "demo.yaml"), "--plan", "--gpu_memory", "8"]))
    assert isinstance(plan, mp.MemoryPlan) and plan.fits
    assert "Memory plan" in capsys.readouterr().out


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_in_reduced_mode(tmp_path):
    """benchmarks/gpu_check.sh on tiny shapes on the CPU: every consumer recipe builds, loads (4-bit included),
    plans its chunk, samples its 64 rollouts, trains one step and is decoded again by plain generate."""
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--reduced", "--output_dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    assert [row["case"] for row in results["cases"]] == list(gpu_check.CASES)
    for row in results["cases"]:
        assert row["rollouts_per_step"] == 64 and row["generation_calls"] == [64]  # `auto` without a GPU: the whole step
        assert "no GPU to plan for" in row["chunk_note"] and row["trainer_decoding"] == "eager"
        assert 0 < row["mean_completion_length"] <= 64 and row["seconds_per_step"] > 0
        assert 0 < row["planned_generation_bytes"] and 0 < row["planned_training_bytes"]
        assert row["rollout_tokens_per_s"] > 0 and row["plain_generate_tokens_per_s"] > 0 and row["rollout_over_plain"] > 0
        assert set(row["decoders"]) == {"eager"}
    assert "qwen3-4b-qlora-24gb" in result.stdout and "results:" in result.stdout


# ----------------------------------------------------------------------------------------------
# Several GPUs: sharding, CPU offload, vLLM sleep mode
# ----------------------------------------------------------------------------------------------


QWEN3_4B = mp.BUILTIN_SHAPES["Qwen/Qwen3-4B"]


def full_setup(**overrides):
    values = dict(micro_batch=1, generation_batch=8, step_rollouts=32, max_prompt_length=1024, stages=[(0, 1.0, 8192)],
                  weight_bytes=4, optimizer="adamw_torch_fused", use_vllm=True, vllm_gpu_memory_utilization=0.8)  # fmt: skip
    return mp.RunSetup(**{**values, **overrides})


def test_fsdp_shards_and_offloads_by_hand():
    p = QWEN3_4B.num_parameters()
    root = 151936 * 2560 + 2560  # tied embeddings and the final norm stay gathered
    layer = (p - root) / 36
    sharded = mp.estimate(QWEN3_4B, full_setup(sharding="fsdp", num_gpus=8, gpus_per_node=8, compute_bytes=2), 8192, 80 * mp.GIB)
    assert sharded.parts["weights"] == p * 4 / 8 and sharded.parts["gradients"] == p * 4 / 8
    assert sharded.parts["optimizer state"] == p * 8 / 8
    assert sharded.parts["weights gathered in flight (16-bit)"] == 2 * (root + 2 * layer)
    assert sharded.parts["gradients in flight (16-bit)"] == 2 * (root + layer)
    offloaded = mp.estimate(
        QWEN3_4B, full_setup(sharding="fsdp", num_gpus=32, gpus_per_node=8, compute_bytes=2, offload_params=True, offload_optimizer=True),
        8192, 80 * mp.GIB,
    )  # fmt: skip
    assert offloaded.parts["weights"] == offloaded.parts["gradients"] == offloaded.parts["optimizer state"] == 0
    assert offloaded.cpu_offload_per_node == pytest.approx(p * 16 / 32 * 8)
    # bf16 compute from fp32 masters: the activations are the bf16 ones, not the fp32 bound.
    bf16 = mp.estimate(QWEN3_4B, full_setup(weight_bytes=2), 8192, 80 * mp.GIB)
    assert offloaded.parts["activations kept for backward"] == bf16.parts["activations kept for backward"]


def test_deepspeed_zero3_keeps_a_16_bit_model_beside_the_fp32_masters():
    p = QWEN3_4B.num_parameters()
    e = mp.estimate(QWEN3_4B, full_setup(sharding="zero3", num_gpus=8, compute_bytes=2), 8192, 80 * mp.GIB)
    assert e.parts["weights"] == pytest.approx(p * (2 + 4) / 8)
    params_only = mp.estimate(QWEN3_4B, full_setup(sharding="zero3", num_gpus=8, compute_bytes=2, offload_params=True), 8192, 80 * mp.GIB)
    assert params_only.parts["weights"] == pytest.approx(p * 4 / 8)  # the fp32 masters go with the optimizer
    zero2 = mp.estimate(QWEN3_4B, full_setup(sharding="zero2", num_gpus=8, compute_bytes=2), 8192, 80 * mp.GIB)
    assert zero2.parts["weights"] == pytest.approx(p * 2 + p * 4 / 8) and zero2.parts["optimizer state"] == p * 8 / 8


def test_vllm_sleep_mode_takes_turns_with_the_trainer():
    awake = mp.estimate(QWEN3_4B, full_setup(), 8192, 80 * mp.GIB)
    asleep = mp.estimate(QWEN3_4B, full_setup(vllm_sleep=True), 8192, 80 * mp.GIB)
    assert awake.total == awake.allocated + awake.overhead + 64 * mp.GIB  # held while training too
    assert asleep.total == max(asleep.training_total, asleep.generation_total)
    assert asleep.training_total == asleep.training + asleep.overhead_training + mp.VLLM_ASLEEP_BYTES
    assert asleep.generation_total == asleep.generation + asleep.overhead_generation + 64 * mp.GIB
    assert asleep.total < awake.total


def test_accelerate_configs_give_the_distribution():
    fsdp = mp.distribution_from_accelerate_config(str(ROOT / "accelerate" / "fsdp_offload.yaml"))
    assert fsdp == dict(num_gpus=32, gpus_per_node=8, sharding="fsdp", offload_params=True, offload_optimizer=True, compute_bytes=2)
    zero3 = mp.distribution_from_accelerate_config(str(ROOT / "accelerate" / "deepspeed_zero3.yaml"), num_gpus=16)
    assert zero3["sharding"] == "zero3" and zero3["num_gpus"] == 16 and not zero3["offload_params"]
    assert mp.distribution_from_accelerate_config(str(ROOT / "accelerate" / "multi_gpu.yaml")) == dict(num_gpus=8, gpus_per_node=8)
    with pytest.raises(UserError, match="cannot read"):
        mp.distribution_from_accelerate_config(str(ROOT / "no-such.yaml"))
    with pytest.raises(UserError, match="not an accelerate config"):
        mp.distribution_from_accelerate_config(str(ROOT / "recipes" / "demo.yaml"))


def test_polaris_4b_plan_says_why_and_warns_about_positions(monkeypatch, capsys):
    import train_grpo

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    plan = train_grpo.main(*train_grpo.parse_args(["--config", str(ROOT / "recipes" / "polaris-4b.yaml"), "--plan", "--gpu_memory", "80"]))
    out = capsys.readouterr().out
    assert plan.fits and "Fits a 80 GiB GPU" in out
    assert "while training" in out and "while sampling" in out and "Why (what each option holds per GPU)" in out
    assert "no sequence parallelism" in out and "CPU offload keeps" in out
    assert any("40960 from step 300 on (up to 53248 tokens)" in w and "VLLM_ALLOW_LONG_MAX_MODEL_LEN" in w for w in plan.warnings)
    # Without the POLARIS options the same recipe does not fit: they are what makes it fit.
    plain = train_grpo.main(*train_grpo.parse_args([
        "--config", str(ROOT / "recipes" / "polaris-4b.yaml"), "--plan", "--gpu_memory", "80",
        "--accelerate_config", str(ROOT / "accelerate" / "single_gpu.yaml"), "--vllm_enable_sleep_mode", "false",
    ]))  # fmt: skip
    assert not plain.fits


def test_autocast_plan_prints_both_activation_figures():
    plan = mp.plan_memory("Qwen/Qwen3-4B", QWEN3_4B, full_setup(autocast=True, use_vllm=False), 80)
    text = mp.format_plan(plan)
    assert "estimated" in text and "at most (the verdict uses the bound" in text
