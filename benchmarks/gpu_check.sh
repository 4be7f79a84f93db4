#!/usr/bin/env bash
# GPU check: a few GRPO steps of Qwen3-0.6B LoRA, Qwen3-1.7B QLoRA and Qwen3-4B QLoRA at 2K and 8K completion
# tokens, on random weights (no download, no network), printing measured peak memory against the memory
# planner's estimate, rollout tokens per second and step time. About 6 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh                 # needs an NVIDIA GPU
#   bash benchmarks/gpu_check.sh --reduced       # tiny shapes on the CPU, under a minute: the same code path
#   bash benchmarks/gpu_check.sh --cases qwen3-4b-qlora --completion_lengths 4096
#
# Options: see benchmarks/gpu_check.py (GpuCheckArguments). Results: outputs/gpu_check/results.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1 PYTHONWARNINGS=ignore
exec "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
