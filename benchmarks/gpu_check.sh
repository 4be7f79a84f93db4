#!/usr/bin/env bash
# GPU check: one optimizer step of each consumer recipe's geometry (64 rollouts, 1,024-token completions,
# generation_chunk_size auto, capped at the recipe's GPU memory) on random weights (no download, no network):
# peak memory measured against the memory planner, seconds per step, and the trainer's rollout tokens per
# second beside plain generate, compiled decoding and continuous batching on the same batch. About 8 minutes
# on one GPU (--time_budget_s skips the cases not started in time).
#
#   bash benchmarks/gpu_check.sh                 # needs an NVIDIA GPU
#   bash benchmarks/gpu_check.sh --reduced       # tiny shapes on the CPU, under 2 minutes: the same code path
#   bash benchmarks/gpu_check.sh --cases qwen3-4b-qlora-24gb --generation_compile true
#
# Options: see benchmarks/gpu_check.py (GpuCheckArguments). Results: outputs/gpu_check/results.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1 PYTHONWARNINGS=ignore
exec "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
