#!/usr/bin/env bash
# Regenerate requirements.lock: every package of the GPU image pinned as name==version, resolved
# by pip for the image's platform (Linux x86_64, glibc 2.39 = Ubuntu 24.04, CPython 3.12) from
# requirements.txt, plus requirements-runpod.txt (installed --no-deps in the image).
#   scripts/lock.sh            (needs PyPI and a Python 3.12: LOCK_PYTHON=/path/to/python3.12)
#   scripts/lock.sh cpu        requirements-cpu.lock: the CPU test environment resolved afresh from
#                              requirements-cpu.txt, at requirements.lock's version of every package the two
#                              share (CI tests what the image ships); scripts/setup.sh installs it into .venv,
#                              the CPU test image too. Run it after scripts/lock.sh.
# Markers (e.g. torch's `setuptools; python_version >= "3.12"`) are evaluated by the interpreter
# that runs pip, whatever --python-version says, so pip must run on Python 3.12 itself.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = cpu ]; then
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
  # The image's pins, less what the CPU build has its own of: torch+cpu, vLLM's CPU package (which pins
  # setuptools==78.1.1 where the CUDA one takes any), no CUDA libraries; and networkx, whose image
  # version needs Python 3.12 (the CPU tests run 3.11).
  grep -E '^[A-Za-z0-9].*==' requirements.lock \
    | grep -vE '^(torch|vllm|setuptools|networkx|flashinfer-|nvidia-|cuda-|torchvision|torchaudio|torchcodec)[=-]' \
    > "$scratch/image-pins.txt"
  bash scripts/setup.sh --resolve "$scratch/venv" "$scratch/image-pins.txt"
  {
    echo "# The CPU test environment's packages, resolved from requirements-cpu.txt (+ requirements-runpod.txt,"
    echo "# --no-deps) by scripts/lock.sh cpu; scripts/setup.sh installs exactly these into .venv, and the CPU"
    echo "# test image is built from them. torch 2.13.0+cpu comes from the machine's wheel folder (/opt/wheels)."
    "$scratch/venv/bin/python" -m pip list --disable-pip-version-check --format=freeze --exclude pip | sort -f
  } > requirements-cpu.lock
  echo "requirements-cpu.lock: $(grep -c '==' requirements-cpu.lock) packages"
  exit 0
fi
PY=${LOCK_PYTHON:-}
if [ -z "$PY" ]; then  # the first Python 3.12 found (pyenv's shims exist but may refuse to run it)
  for candidate in python3.12 "$HOME"/.pyenv/versions/3.12.*/bin/python3.12 /usr/bin/python3.12; do
    if "$candidate" -c '' 2>/dev/null; then PY=$candidate; break; fi
  done
fi
PIP_VERSION=26.0.1
"${PY:-false}" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' \
  || { echo "lock.sh: $PY is not Python 3.12 (set LOCK_PYTHON)" >&2; exit 1; }
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
"$PY" -m venv "$work/venv"
# --isolated: this machine's pip.conf, PIP_* variables and constraint files must not shape the lock.
pip=("$work/venv/bin/pip" --isolated --disable-pip-version-check ${PIP_CERT:+--cert "$PIP_CERT"})
"${pip[@]}" install -q "pip==$PIP_VERSION"
# pip expands no manylinux_2_x tag by itself: list those glibc 2.39 runs.
platforms=()
for minor in $(seq 39 -1 5); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64
            --platform linux_x86_64)
"${pip[@]}" install -q --dry-run --ignore-installed \
  --only-binary=:all: --target "$work/target" --python-version 3.12 --implementation cp --abi cp312 \
  "${platforms[@]}" --report "$work/report.json" -r requirements.txt
"$work/venv/bin/python" - "$work/report.json" requirements-runpod.txt > requirements.lock <<'PY'
import json, re, sys

report = json.load(open(sys.argv[1]))
pins = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
        for item in report["install"]}
no_deps = [line.split("#")[0].strip() for line in open(sys.argv[2]) if "==" in line.split("#")[0]]
print("# The GPU image's packages, resolved for Linux x86_64 (glibc 2.39), CPython 3.12, by")
print("# scripts/lock.sh from requirements.txt. Do not edit: change requirements.txt and rerun it.")
print("# The Dockerfile installs this file with --no-deps, so nothing outside it gets in.")
for name in sorted(pins):
    print(f"{name}=={pins[name]}")
print("# From requirements-runpod.txt: declares fastapi[all]>=0.141.1, which vLLM's fastapi pin")
print("# rules out; its job loop does not use fastapi (tests/test_image.py).")
for line in no_deps:
    name = re.split(r"[=<>!~\[; ]", line)[0].lower().replace("_", "-")
    assert name not in pins, f"{name} is resolved from requirements.txt and also installed --no-deps"
    print(line)
PY
echo "requirements.lock: $(grep -c '==' requirements.lock) packages"
