#!/usr/bin/env bash
# The CPU environment for local runs and tests (idempotent; fast when done before):
#   scripts/setup.sh                 .venv with exactly requirements-cpu.lock (what CI and the CPU image run)
#   scripts/setup.sh --resolve DIR [CONSTRAINTS]   a venv at DIR resolved afresh from requirements-cpu.txt
#                                    (scripts/lock.sh cpu), within CONSTRAINTS (a pip constraints file)
# Both install --no-deps where runpod is concerned: runpod 1.12.0 declares fastapi>=0.141.1, vLLM
# pins fastapi<0.137, and the SDK works with 0.136.3 (MAINTAINERS.md, "One lock").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_quietly() {  # pip without its noise about this machine's absent extra indexes; pip's exit status
  "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
  return "${PIPESTATUS[0]}"
}

if [ "${1:-}" = --resolve ]; then
  venv=${2:?scripts/setup.sh --resolve DIR}
  "$PY" -m venv "$venv"
  pip_quietly "$venv/bin/pip" install -q --disable-pip-version-check ${3:+-c "$3"} -r requirements-cpu.txt
  pip_quietly "$venv/bin/pip" install -q --disable-pip-version-check --no-deps -r requirements-runpod.txt
  # PyPI's builds break `import transformers` beside torch 2.13.0+cpu; text models do not need them.
  "$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  exit 0
fi

stamp=.venv/.installed-$(sha256sum requirements-cpu.lock | cut -c1-12)
if [ -f "$stamp" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
echo "== installing requirements-cpu.lock into .venv (a few minutes the first time)"
pip_quietly .venv/bin/pip install -q --disable-pip-version-check --no-deps -r requirements-cpu.lock
.venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true  # from an older .venv
.venv/bin/python -c "import vllm, runpod, transformers; print('vllm', vllm.__version__, '| runpod', runpod.__version__, '| transformers', transformers.__version__)"
rm -f .venv/.installed-*; touch "$stamp"
