#!/usr/bin/env bash
# Set up (if needed), build the tiny GaMS-shaped model, and run test_input.json through the
# worker on CPU, printing each streamed chunk: scripts/run-local.sh [--test_input '{"input": ...}']
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RUNPOD_SKIP_AUTO_SYSTEM_CHECKS=true VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1
export MODEL_NAME=${MODEL_NAME:-$(.venv/bin/python -m builder.tiny_model | tail -n 1)}
export MAX_MODEL_LEN=${MAX_MODEL_LEN:-1024} GPU_MEMORY_UTILIZATION=${GPU_MEMORY_UTILIZATION:-0.2}
exec .venv/bin/python handler.py "$@"
