"""LoRA and QLoRA (4-bit) on the toy model: training saves an adapter that evaluate.py loads, a merged
model matches the adapter on its base, and QLoRA with vLLM is refused in one line."""

import json

import pytest

from conftest import ROOT  # noqa: F401  (puts the project on sys.path)


def toy_peft_args(toy_world, output_dir, quantized: bool) -> list[str]:
    return [
        "--model_name_or_path", str(toy_world / "model"),
        "--dataset_name", str(toy_world / "train.jsonl"),
        "--output_dir", str(output_dir),
        "--use_peft", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.0",
        "--lora_target_modules", "all-linear",
        *(["--load_in_4bit"] if quantized else []),
        "--save_merged",
        "--max_steps", "2", "--per_device_train_batch_size", "16", "--num_generations", "4",
        "--max_completion_length", "32", "--max_prompt_length", "128", "--temperature", "1.0",
        "--learning_rate", "2e-3", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
        "--seed", "0", "--disable_tqdm", "true",
    ]  # fmt: skip


def logits_of(model, input_ids):
    import torch

    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.slow
@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora-4bit"])
def test_peft_run_saves_an_adapter_that_evaluate_loads(toy_world, tmp_path, monkeypatch, quantized):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import evaluate
    import train_grpo

    loaded = {}
    original_load_model = train_grpo.load_model

    def recording_load_model(model_args, training_args):
        model = original_load_model(model_args, training_args)
        loaded["4bit"] = bool(getattr(model, "is_loaded_in_4bit", False))
        loaded["linear_types"] = {type(module).__name__ for module in model.modules() if "Linear" in type(module).__name__}
        return model

    monkeypatch.setattr(train_grpo, "load_model", recording_load_model)
    run_dir = tmp_path / "run"
    summary = train_grpo.main(*train_grpo.parse_args(toy_peft_args(toy_world, run_dir, quantized)))

    assert summary["steps"] == 2
    assert loaded["4bit"] == quantized
    assert ("Linear4bit" in loaded["linear_types"]) == quantized
    # An adapter, not a whole model, and it trained (LoRA's B matrices start at zero).
    assert (run_dir / "adapter_config.json").exists() and not (run_dir / "model.safetensors").exists()
    adapter = load_file(str(run_dir / "adapter_model.safetensors"))
    assert any("lora_B" in name and tensor.abs().max() > 0 for name, tensor in adapter.items())
    state = json.loads((run_dir / "trainer_state.json").read_text())
    assert any(row.get("grad_norm", 0) > 0 for row in state["log_history"])

    # The merged model (saved by --save_merged, no peft needed) equals the adapter applied to the full-precision base.
    merged = AutoModelForCausalLM.from_pretrained(str(run_dir / "merged"), dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(toy_world / "model"), dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, str(run_dir))
    input_ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    assert torch.allclose(logits_of(merged, input_ids), logits_of(with_adapter, input_ids).float(), atol=1e-3)
    with with_adapter.disable_adapter():
        assert not torch.allclose(logits_of(merged, input_ids), logits_of(with_adapter, input_ids), atol=1e-6)

    # evaluate.py takes the adapter directory as --model and samples with it on its base.
    eval_dir = tmp_path / "eval"
    result = evaluate.main(
        evaluate.EvalArguments(
            model=str(run_dir), data=[str(toy_world / "test.jsonl")], num_samples=2, max_problems=4,
            temperature=1.0, top_k=0, max_tokens=48, output_dir=str(eval_dir), ngram_unit="char", batch_size=8,
        )
    )  # fmt: skip
    assert result["base_model"] == str(toy_world / "model")
    assert (eval_dir / "summary.json").exists()
    rows = [json.loads(line) for line in (eval_dir / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 8


def test_qlora_with_vllm_is_one_line_error(toy_world, tmp_path, monkeypatch, capsys):
    """The command line's path (run_cli), in this process: one line on stderr, exit code 2, before any loading."""
    import train_grpo
    from data import run_cli

    argv = ["train_grpo.py", "--model_name_or_path", str(toy_world / "model"), "--dataset_name", str(toy_world / "train.jsonl"),
            "--use_peft", "--load_in_4bit", "--use_vllm", "--output_dir", str(tmp_path / "o")]  # fmt: skip
    monkeypatch.setattr("sys.argv", argv)
    monkeypatch.setattr(train_grpo, "load_model", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_grpo.cli)
    assert exit_info.value.code == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: --load_in_4bit") and "--use_vllm" in errors[0]
    assert "CUDA only" in errors[0]  # vLLM's CPU backend here; on CUDA vLLM serves the adapter over a 4-bit base


def test_quantization_without_peft_is_refused(toy_world):
    from data import UserError
    from options import check_model_options
    from train_grpo import parse_args

    _, training_args, model_args = parse_args(["--output_dir", "x", "--model_name_or_path", str(toy_world / "model"), "--load_in_8bit"])
    with pytest.raises(UserError, match="--use_peft"):
        check_model_options(training_args, model_args)
