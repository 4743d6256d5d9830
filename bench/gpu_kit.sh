#!/usr/bin/env bash
# The offline kit for the lent GPU machine, made from requirements.lock: the image's versions, less
# what the GaMS job path never imports and what the GPU host already has at the lock's version.
#   bash bench/gpu_kit.sh [OUT_DIR]     (default .gpu, git-ignored; ~20 min on 2 cores, mostly xz)
# It writes the wheel list and runs ../shared/gpu/build-kit.sh's packing with it (a scratch copy of
# that folder whose wheels.txt is this list), so OUT_DIR/part00.. and OUT_DIR/install.sh are as
# ../shared/gpu/README.md describes. MAINTAINERS.md ("The GPU kit for vLLM 0.32.0") says what installing it took.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.gpu}
SHARED=${SHARED_GPU:-../shared/gpu}
scratch=$(mktemp -d); trap 'rm -rf "$scratch"' EXIT
cp "$SHARED"/build-kit.sh "$SHARED"/install.sh.in "$SHARED"/repack_stored.py "$scratch/"
python3 - requirements.lock > "$scratch/wheels.txt" <<'PY'
import re, sys

# Imported only for other models, quantizations or GPUs than GaMS (bf16/FP8 Gemma 2 on Hopper), or
# never on the job path. FlashInfer is left out on purpose: in the image it is installed without its
# precompiled kernels and with no nvcc on the path, so vLLM's has_flashinfer() is False and nothing
# uses it; the GPU host has nvcc and ninja, so there it would be on. Leaving it out keeps it off.
NOT_CARRIED = {
    "flashinfer-python", "nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-base", "nvidia-cutlass-dsl-libs-core",
    "nvidia-cutlass-dsl-libs-cu12", "nvidia-cutlass-dsl-libs-cu13", "tilelang", "quack-kernels", "tokenspeed-mla",
    "tokenspeed-triton", "humming-kernels", "mistral-common", "pycountry", "pynvvideocodec", "torchcodec",
    "torchaudio", "opencv-python-headless", "nvidia-cuda-nvcc", "nvidia-nvvm", "nvidia-cuda-crt",
    "nvidia-cuda-cccl", "cuda-tile", "z3-solver", "numba", "llvmlite", "instanttensor", "nccl4py",
    "nccl-extensions", "nvidia-cudnn-frontend", "runpod",  # runpod: --no-deps below, as in the image
}
# CUDA libraries the GPU host's torch 2.11.0+cu130 already has at exactly the lock's version.
ON_HOST_AT_LOCK_VERSION = {
    "nvidia-cuda-cupti", "nvidia-cuda-nvrtc", "nvidia-cuda-runtime", "nvidia-cufft", "nvidia-cufile",
    "nvidia-curand", "nvidia-cusolver", "nvidia-cusparse", "nvidia-nvshmem-cu13", "nvidia-nvtx",
}
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if "==" not in line:
        continue
    name = re.split(r"[=<>!~\[; ]", line)[0].lower().replace("_", "-")
    if name not in NOT_CARRIED and name not in ON_HOST_AT_LOCK_VERSION:
        print(line)
PY
grep -E '^runpod==' requirements-runpod.txt >> "$scratch/wheels.txt"
# NCCL's wheel is tagged manylinux_2_18, which build-kit.sh's platform list lacks.
sed -i 's/--platform manylinux_2_17_x86_64 /--platform manylinux_2_17_x86_64 --platform manylinux_2_18_x86_64 /' \
  "$scratch/build-kit.sh"
echo "== $(wc -l < "$scratch/wheels.txt") wheels from requirements.lock"
bash "$scratch/build-kit.sh" "$OUT" 2> >(grep -v "^WARNING: Location" >&2)
