#!/usr/bin/env bash
# Create .venv with vLLM's CPU build and the runpod SDK (idempotent; fast when done before).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.installed-$(cat requirements-cpu.txt requirements-runpod.txt | sha256sum | cut -c1-12)
if [ -f "$stamp" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
echo "== installing CPU requirements into .venv (a few minutes the first time)"
.venv/bin/pip install -q --disable-pip-version-check -r requirements-cpu.txt 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/pip install -q --disable-pip-version-check --no-deps -r requirements-runpod.txt 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import vllm, runpod, transformers; print('vllm', vllm.__version__, '| runpod', runpod.__version__, '| transformers', transformers.__version__)"
rm -f .venv/.installed-*; touch "$stamp"
