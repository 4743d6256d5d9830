#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on CPU: scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/container-setup.sh  # podman and the local base images (tests/test_container_*.py)
export RUNPOD_SKIP_AUTO_SYSTEM_CHECKS=true VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
