# Image builds: `docker buildx bake` (worker), `docker buildx bake worker-baked` (GaMS baked in,
# needs HF_TOKEN in the environment only if the repo is gated), `docker buildx bake worker-cu129`.
# Tags carry the worker version, the vLLM version and the CUDA version of the image.

variable "REGISTRY" { default = "ghcr.io/cjvt" }
variable "IMAGE" { default = "gams-worker" }
variable "VERSION" { default = "dev" }
# Must equal requirements.txt's vllm pin and the Dockerfile's CUDA (tests/test_image.py checks).
variable "VLLM_VERSION" { default = "0.32.0" }
variable "CUDA_VERSION" { default = "13.0.2" }
variable "CUDA_TAG" { default = "13.0" } # CUDA_VERSION's major.minor, for tags
variable "BAKED_MODEL" { default = "cjvt/GaMS-9B-Instruct" }
# Pin a commit for releases: the bake fetches exactly this revision.
variable "BAKED_MODEL_REVISION" { default = "main" }

function "tags" {
  params = [suffix, cuda]
  result = [
    "${REGISTRY}/${IMAGE}:${VERSION}-vllm${VLLM_VERSION}-cuda${cuda}${suffix}",
    "${REGISTRY}/${IMAGE}:latest-cuda${cuda}${suffix}",
  ]
}

group "default" {
  targets = ["worker"]
}

target "_common" {
  context    = "."
  dockerfile = "Dockerfile"
  target     = "worker"
  platforms  = ["linux/amd64"]
  labels = {
    "org.opencontainers.image.source"  = "https://github.com/cjvt/gams-worker"
    "org.opencontainers.image.version" = "${VERSION}"
    "ai.gams.vllm.version"             = "${VLLM_VERSION}"
    "ai.gams.cuda.version"             = "${CUDA_VERSION}"
  }
}

target "worker" {
  inherits = ["_common"]
  args     = { CUDA_VERSION = CUDA_VERSION }
  tags     = tags("", CUDA_TAG)
}

target "worker-baked" {
  inherits = ["_common"]
  args = {
    CUDA_VERSION   = CUDA_VERSION
    MODEL_NAME     = BAKED_MODEL
    MODEL_REVISION = BAKED_MODEL_REVISION
  }
  secret = ["id=hf_token,env=HF_TOKEN"]
  tags   = tags("-gams9b", CUDA_TAG)
}

# For hosts whose driver only reaches CUDA 12.x: vLLM's own CUDA 12.9 wheel of the same version
# and PyTorch's cu129 build. Not built by CI and untested on a GPU.
target "worker-cu129" {
  inherits = ["_common"]
  args = {
    CUDA_VERSION = "12.9.1"
    VLLM_WHEEL   = "https://github.com/vllm-project/vllm/releases/download/v${VLLM_VERSION}/vllm-${VLLM_VERSION}+cu129-cp38-abi3-manylinux_2_31_x86_64.whl"
    TORCH_INDEX  = "https://download.pytorch.org/whl/cu129"
  }
  labels = { "ai.gams.cuda.version" = "12.9.1" }
  tags   = tags("", "12.9")
}

# vLLM's CPU build on Debian (what the container tests run, there with a local base image and the
# torch CPU wheel from the machine): for trying the worker without a GPU. Not for RunPod.
target "worker-cpu" {
  inherits = ["_common"]
  args = {
    BASE_IMAGE  = "debian:bookworm"
    PYTHON      = "python3.11"
    LOCK        = "requirements-cpu.lock"
    TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
    SYSTEM_PACKAGES = "libnuma1"
  }
  labels = { "ai.gams.cuda.version" = "none" }
  tags   = ["${REGISTRY}/${IMAGE}:${VERSION}-cpu"]
}
